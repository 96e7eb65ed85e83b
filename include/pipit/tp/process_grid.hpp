#pragma once
// process_grid<C>: one rank's view of a grid_layout over a communicator: its coordinates and its
// tensor, data, pipeline and vocabulary sub-communicators, made by split() (collective: every rank
// of `world` constructs its process_grid together, in the same order as its other collectives).
//
//   pipit::tp::process_grid grid(world, pipit::tp::grid_layout({.tensor = 2, .data = 2,
//                                                               .pipeline = 2}));
//   grid.tensor().all_reduce(...);     // the f/g operators of the tensor-parallel layers
//   grid.pipeline().send(...);         // stage to stage
//   grid.data().all_reduce(grads...);  // gradient reduction
//   grid.vocab();                      // vocabulary shards over pipeline x tensor ranks
//   pipit::runtime::executor ex(grid.groups(), stage, vocab, plan);  // all three at once
//
// Works with any comm::communicator (threads, mpi, nccl): only split() is used.

#include <utility>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/runtime/comm_groups.hpp"
#include "pipit/tp/grid_layout.hpp"

namespace pipit::tp {

template <comm::communicator C>
class process_grid {
 public:
  process_grid(C& world, grid_layout layout)
      : layout_(layout),
        world_rank_(checked_rank(world, layout)),
        coords_(layout.coords_of(world_rank_)),
        tensor_(world.split(layout.group_color(axis::tensor, world_rank_), coords_.tensor)),
        data_(world.split(layout.group_color(axis::data, world_rank_), coords_.data)),
        pipeline_(world.split(layout.group_color(axis::pipeline, world_rank_), coords_.pipeline)),
        vocab_(world.split(layout.vocab_color(world_rank_), layout.vocab_index(world_rank_))) {}

  const grid_layout& layout() const noexcept { return layout_; }
  const grid_shape& shape() const noexcept { return layout_.shape(); }
  const grid_coords& coords() const noexcept { return coords_; }
  int world_rank() const noexcept { return world_rank_; }

  // Sub-communicators; a member's rank in each equals its coordinate on that axis (vocab():
  // pipeline * tensor_size + tensor).
  C& tensor() noexcept { return tensor_; }
  C& data() noexcept { return data_; }
  C& pipeline() noexcept { return pipeline_; }
  C& vocab() noexcept { return vocab_; }
  C& group(axis a) noexcept {
    return a == axis::tensor ? tensor_ : a == axis::data ? data_ : pipeline_;
  }
  // The executor's groups: pipeline(), data() and vocab() (pointers into this grid, which must
  // outlive the executor). data() is given even with one replica (the executor skips it).
  runtime::comm_groups<C> groups() noexcept { return {&pipeline_, &data_, &vocab_}; }

 private:
  static int checked_rank(const C& world, const grid_layout& layout) {
    if (world.size() != layout.size())
      fail("pipit::tp::process_grid: the communicator has ", world.size(), " ranks but the grid ",
           "tensor ", layout.shape().tensor, " x data ", layout.shape().data, " x pipeline ",
           layout.shape().pipeline, " needs ", layout.size());
    return world.rank();
  }

  grid_layout layout_;
  int world_rank_;
  grid_coords coords_;
  C tensor_;
  C data_;
  C pipeline_;
  C vocab_;
};

}  // namespace pipit::tp
