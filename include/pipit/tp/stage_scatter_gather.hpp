#pragma once
// The scatter/gather optimisation for activations sent between pipeline stages under tensor
// parallelism (Narayanan et al., arXiv 2104.04473, section 4.1): the t tensor ranks of a stage
// hold the same activation, so instead of each sending all of it to its peer on the next stage,
// tensor rank r sends only its slice (the r-th of t near-equal parts) and the receivers rebuild
// the whole with an all-gather over their tensor group, over the faster intra-node links.
// Inter-stage traffic per rank drops from n to about n / t elements.
//
// The peer is the rank with the same tensor (and data) coordinate on the neighbouring stage:
// in a process_grid, grid.pipeline() connects exactly those ranks.
//
//   stage i,   tensor rank r:  send_scattered(grid.pipeline(), act, t, r, next_stage, tag);
//   stage i+1, tensor rank r:  recv_gathered(grid.pipeline(), grid.tensor(), act, prev_stage, tag);
//
// For a grouped step (comm::exchange) use scattered_send_op / scattered_recv_op in the step and
// gather_slices(tensor, act) after it.

#include <cstdint>
#include <span>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/tp/ring_collective.hpp"

namespace pipit::tp {

// Tensor rank r's slice of an n-element activation: elements row_block(n, t, r).
template <class T>
std::span<T> slice_of(std::span<T> activation, int tensor_size, int tensor_rank) {
  if (tensor_size < 1 || tensor_rank < 0 || tensor_rank >= tensor_size)
    fail("pipit::tp::slice_of: tensor rank ", tensor_rank, " of ", tensor_size);
  const auto rg = row_block(static_cast<std::int64_t>(activation.size()), tensor_size, tensor_rank);
  return activation.subspan(static_cast<std::size_t>(rg.begin),
                            static_cast<std::size_t>(rg.size()));
}

template <class T>
comm::p2p_op scattered_send_op(std::span<const T> activation, int tensor_size, int tensor_rank,
                               int peer, int tag) {
  return comm::send_op(slice_of(activation, tensor_size, tensor_rank), peer, tag);
}
template <class T>
comm::p2p_op scattered_recv_op(std::span<T> activation, int tensor_size, int tensor_rank, int peer,
                               int tag) {
  return comm::recv_op(slice_of(activation, tensor_size, tensor_rank), peer, tag);
}

// After this rank's slice arrived in place: every tensor rank's slice, all-gathered.
template <comm::communicator C, class T>
void gather_slices(C& tensor, std::span<T> activation) {
  ring_all_gather_rows(tensor, activation, static_cast<std::int64_t>(activation.size()), 1);
}

// Sends this rank's slice of the activation to `peer` on the pipeline communicator.
template <comm::communicator C, class T>
void send_scattered(C& pipeline, std::span<T> activation, int tensor_size, int tensor_rank,
                    int peer, int tag) {
  pipeline.send(slice_of(std::span<const T>(activation), tensor_size, tensor_rank), peer, tag);
}

// Receives this rank's slice from `peer` on the pipeline communicator, then all-gathers the
// slices over the tensor group (every member calls it): `activation` holds the whole.
template <comm::communicator C, class T>
void recv_gathered(C& pipeline, C& tensor, std::span<T> activation, int peer, int tag) {
  pipeline.recv(slice_of(activation, tensor.size(), tensor.rank()), peer, tag);
  gather_slices(tensor, activation);
}

}  // namespace pipit::tp
