#pragma once
// tensor_group<T>: how a transformer block reaches the other ranks of its tensor-parallel group
// (Megatron-LM, Shoeybi et al., arXiv 1909.08053, section 3): the group's size t, this rank's
// index r in it, and a sum all-reduce over the group. The layers hold it by value and call `sum`
// only when t > 1, so the unsharded model (t = 1) does exactly the arithmetic it always did,
// with no communication. Type-erased so that the layers stay independent of the communicator.
// gather, an all-gather of row blocks, rebuilds a whole activation from the slices the ranks of
// the group received from the previous pipeline stage (gpt_stage's scatter/gather).
//
// tensor_split says how a parameter tensor is cut over the group, so that a rank's shard can be
// placed back into the whole tensor (place_shard: checkpoints, tests).

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>

#include "matrix.hpp"
#include "pipit/core/error.hpp"
#include "pipit/tp/stage_scatter_gather.hpp"

namespace gpt {

template <class T>
struct tensor_group {
  int size = 1;  // t
  int rank = 0;  // r in [0, t)
  // In-place sum over the group; every member must get bit-identical results (the replicated
  // parameters then stay equal on every rank without any communication).
  std::function<void(std::span<T>)> sum;
  // In place: this rank's slice of the span (pipit::tp::slice_of, the rank-th of `size`
  // near-equal parts) in, every rank's slice out. Pure data movement: the result is exact.
  std::function<void(std::span<T>)> gather = {};

  void all_reduce(std::span<T> s) const {
    if (size > 1) sum(s);
  }
  void all_gather(std::span<T> s) const {
    if (size == 1) return;
    if (!gather)
      pipit::fail("gpt: a tensor group of ", size,
                  " ranks has no all-gather (tensor_group::gather)");
    gather(s);
  }
};

// A tensor group over a pipit communicator (its rank and size; all_reduce with std::plus;
// all_gather around the ring, pipit::tp::gather_slices). The communicator must outlive the group
// and every layer holding it.
template <class T, class Comm>
tensor_group<T> make_tensor_group(Comm& comm) {
  tensor_group<T> g;
  g.size = comm.size();
  g.rank = comm.rank();
  g.sum = [&comm](std::span<T> s) { comm.all_reduce(s, std::plus<>{}); };
  g.gather = [&comm](std::span<T> s) { pipit::tp::gather_slices(comm, s); };
  return g;
}

inline void check_tensor_split(int size, int rank) {
  if (size < 1) pipit::fail("gpt: the tensor-parallel size must be >= 1 (got ", size, ")");
  if (rank < 0 || rank >= size)
    pipit::fail("gpt: tensor rank ", rank, " is outside [0, ", size, ")");
}

// Elements of the whole tensor a parameter is a shard of (vocabulary shards: up to the shard's
// end; the caller takes the largest over the shards).
template <class T>
std::size_t whole_size(const parameter<T>& p) {
  return p.split == tensor_split::replicated
             ? p.offset + p.value.size()
             : p.value.size() * static_cast<std::size_t>(p.tensor_size);
}

// Where element k of the shard `p` lives in the whole tensor (column-major), so that the shards
// of every tensor rank rebuild the tensor the unsharded model holds.
template <class T>
std::size_t whole_index(const parameter<T>& p, std::size_t k) {
  if (p.split == tensor_split::replicated) return p.offset + k;
  const auto n = static_cast<std::int64_t>(p.value.size());
  if (p.rows < 1 || n % p.rows != 0 || (p.split == tensor_split::q_k_v_rows && p.rows % 3 != 0))
    pipit::fail("gpt::whole_index: a shard of ", n, " elements with ", p.rows, " rows");
  const std::int64_t rows = p.rows, cols = n / rows, t = p.tensor_size, r = p.tensor_rank;
  const std::int64_t i = static_cast<std::int64_t>(k) % rows,
                     j = static_cast<std::int64_t>(k) / rows;
  switch (p.split) {
    case tensor_split::rows:
      return static_cast<std::size_t>(j * rows * t + r * rows + i);
    case tensor_split::q_k_v_rows: {
      const std::int64_t third = rows / 3, part = i / third;
      return static_cast<std::size_t>(j * rows * t + part * third * t + r * third + i % third);
    }
    default:  // cols: column block r
      return static_cast<std::size_t>((r * cols + j) * rows + i);
  }
}

// Writes the shard `p` into its place in `whole` (whole_size(p) elements at least).
template <class T, class U>
void place_shard(const parameter<T>& p, std::span<U> whole) {
  if (whole.size() < whole_size(p))
    pipit::fail("gpt::place_shard: ", whole.size(), " elements for a tensor of ", whole_size(p));
  for (std::size_t k = 0; k < p.value.size(); ++k)
    whole[whole_index(p, k)] = static_cast<U>(p.value[k]);
}

}  // namespace gpt
