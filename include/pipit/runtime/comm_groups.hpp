#pragma once
// comm_groups<C>: the communicators one rank's executor runs over, in one value.
//
//   pipeline : the ranks of one pipeline (this rank's stage is pipeline->rank()); required
//   data     : the ranks that hold the same stage (and vocabulary shard) of other data-parallel
//              replicas; their gradients are summed (averaged) after each step. nullptr: none
//   vocab    : the ranks that shard the vocabulary layers (runtime::vocab_layers): the
//              pipeline x tensor ranks of one replica, ordered pipeline * t + tensor, where t =
//              vocab->size() / pipeline->size() tensor ranks run each pipeline stage in
//              lockstep. nullptr: the pipeline communicator (t = 1). Read only with vocab_layers.
//
// tp::process_grid::groups() fills one from its sub-communicators:
//
//   pipit::tp::process_grid grid(world, pipit::tp::grid_layout({.tensor = 2, .pipeline = 4}));
//   pipit::runtime::executor ex(grid.groups(), stage, vocab, plan);
//
// The pointers are not owned; the communicators must outlive the executor. The groups must be
// consistent on every rank (each rank's groups the same partition of the world): the executor
// checks only what each member reports (ranks, sizes, shards, plans), not the membership.

#include "pipit/comm/communicator.hpp"

namespace pipit::runtime {

template <comm::communicator C>
struct comm_groups {
  C* pipeline;
  C* data = nullptr;
  C* vocab = nullptr;
};

}  // namespace pipit::runtime
