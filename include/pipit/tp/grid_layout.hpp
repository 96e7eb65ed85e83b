#pragma once
// grid_layout: the 3D process grid of Megatron's PTD-P (Narayanan et al., arXiv 2104.04473,
// section 3): world ranks laid out over (tensor, data, pipeline) axes. The default order puts the
// tensor axis fastest, then data, then pipeline, so a node of G GPUs holds whole tensor groups
// (tensor parallelism over NVLink) and the pipeline axis crosses nodes. A user order lists the
// axes fastest first, e.g. {pipeline, tensor, data}.
//
// Pure and constexpr: coordinates, ranks and group members are plain arithmetic, checked by
// static_assert in tests and used by process_grid to split a communicator.
//
// Groups (each an ordered list of world ranks):
//   tensor   : same (data, pipeline), ordered by the tensor coordinate
//   data     : same (tensor, pipeline), ordered by the data coordinate
//   pipeline : same (tensor, data), ordered by the pipeline coordinate (stage)
//   vocab    : same data coordinate: the pipeline x tensor ranks of one model replica, ordered
//              by (pipeline, tensor); rank pipeline * tensor_size + tensor holds the vocabulary
//              shard of that index (vocabulary parallelism over every model-parallel rank)

#include <array>
#include <cstdint>
#include <string_view>

#include "pipit/core/error.hpp"

namespace pipit::tp {

enum class axis { tensor, data, pipeline };

constexpr std::string_view name(axis a) noexcept {
  return a == axis::tensor ? "tensor" : a == axis::data ? "data" : "pipeline";
}

// Sizes of the three axes.
struct grid_shape {
  int tensor = 1;
  int data = 1;
  int pipeline = 1;
  constexpr int size() const noexcept { return tensor * data * pipeline; }
  constexpr int operator[](axis a) const noexcept {
    return a == axis::tensor ? tensor : a == axis::data ? data : pipeline;
  }
  friend constexpr bool operator==(const grid_shape&, const grid_shape&) = default;
};

// A rank's position on the grid.
struct grid_coords {
  int tensor = 0;
  int data = 0;
  int pipeline = 0;
  constexpr int operator[](axis a) const noexcept {
    return a == axis::tensor ? tensor : a == axis::data ? data : pipeline;
  }
  constexpr int& operator[](axis a) noexcept {
    return a == axis::tensor ? tensor : a == axis::data ? data : pipeline;
  }
  friend constexpr bool operator==(const grid_coords&, const grid_coords&) = default;
};

// Axes listed fastest-varying first.
using axis_order = std::array<axis, 3>;
inline constexpr axis_order default_order{axis::tensor, axis::data, axis::pipeline};

// Groups are read member by member (group_member, vocab_member) rather than materialised, so the
// layout stays a small constexpr value whatever the grid's size.
class grid_layout {
 public:
  constexpr explicit grid_layout(grid_shape shape, axis_order order = default_order)
      : shape_(shape), order_(order) {
    if (shape.tensor < 1 || shape.data < 1 || shape.pipeline < 1)
      fail("pipit::tp::grid_layout: every axis needs at least 1 rank, got tensor ", shape.tensor,
           ", data ", shape.data, ", pipeline ", shape.pipeline);
    for (int i = 0; i < 3; ++i)
      for (int j = i + 1; j < 3; ++j)
        if (order[static_cast<std::size_t>(i)] == order[static_cast<std::size_t>(j)])
          fail("pipit::tp::grid_layout: the axis order names ",
               name(order[static_cast<std::size_t>(i)]),
               " twice; it must list tensor, data and pipeline once each");
  }

  constexpr const grid_shape& shape() const noexcept { return shape_; }
  constexpr const axis_order& order() const noexcept { return order_; }
  constexpr int size() const noexcept { return shape_.size(); }

  constexpr grid_coords coords_of(int rank) const {
    check_rank(rank);
    grid_coords c;
    for (const axis a : order_) {
      c[a] = rank % shape_[a];
      rank /= shape_[a];
    }
    return c;
  }

  constexpr int rank_of(grid_coords c) const {
    for (const axis a : {axis::tensor, axis::data, axis::pipeline})
      if (c[a] < 0 || c[a] >= shape_[a])
        fail("pipit::tp::grid_layout: ", name(a), " coordinate ", c[a], " is outside [0, ",
             shape_[a], ")");
    int rank = 0;
    for (int i = 2; i >= 0; --i) {
      const axis a = order_[static_cast<std::size_t>(i)];
      rank = rank * shape_[a] + c[a];
    }
    return rank;
  }

  // ---- one-axis groups: the ranks that differ from `rank` only along `a` ----------------------
  constexpr int group_size(axis a) const noexcept { return shape_[a]; }
  // The world rank of member i of `rank`'s group along `a` (member i has coordinate i on a).
  constexpr int group_member(axis a, int rank, int i) const {
    grid_coords c = coords_of(rank);
    if (i < 0 || i >= shape_[a])
      fail("pipit::tp::grid_layout: member ", i, " of a ", name(a), " group of ", shape_[a],
           " ranks");
    c[a] = i;
    return rank_of(c);
  }
  // A number that is the same for every member of the group and different between groups.
  constexpr int group_color(axis a, int rank) const { return group_member(a, rank, 0); }

  // ---- the vocabulary group: pipeline x tensor ranks of one data-parallel replica -------------
  constexpr int vocab_group_size() const noexcept { return shape_.tensor * shape_.pipeline; }
  // The index of `rank` inside its vocabulary group: pipeline * tensor_size + tensor.
  constexpr int vocab_index(int rank) const {
    const grid_coords c = coords_of(rank);
    return c.pipeline * shape_.tensor + c.tensor;
  }
  constexpr int vocab_member(int rank, int i) const {
    if (i < 0 || i >= vocab_group_size())
      fail("pipit::tp::grid_layout: member ", i, " of a vocabulary group of ", vocab_group_size(),
           " ranks");
    grid_coords c = coords_of(rank);
    c.tensor = i % shape_.tensor;
    c.pipeline = i / shape_.tensor;
    return rank_of(c);
  }
  constexpr int vocab_color(int rank) const { return vocab_member(rank, 0); }

  constexpr void check_rank(int rank) const {
    if (rank < 0 || rank >= size())
      fail("pipit::tp::grid_layout: rank ", rank, " is outside the grid [0, ", size(), ") (tensor ",
           shape_.tensor, " x data ", shape_.data, " x pipeline ", shape_.pipeline, ")");
  }

 private:
  grid_shape shape_;
  axis_order order_;
};

}  // namespace pipit::tp
