#pragma once
// cuda::embedding_forward / embedding_backward: the sharded input embedding's passes over the
// GPUs of an NCCL communicator (vocab::embedding_forward / embedding_backward on the device).
// Local kernels run on `compute`, the collective on comm.stream(), ordered by events; the
// functions return without waiting. Out-of-vocabulary ids are reported to `check`.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>

#include "pipit/core/error.hpp"
#include "pipit/cuda/embedding.cuh"
#include "pipit/cuda/entry_check.cuh"
#include "pipit/cuda/nccl_communicator.cuh"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/shards.hpp"

namespace pipit::cuda {

// IF: every rank gathers its rows into `out` (contiguous), then the partials are summed on
// `root` (out is scratch on the other ranks) or on every rank (root < 0).
template <int Block = 128, class T, class O>
void embedding_forward(nccl_communicator& comm, cudaStream_t compute,
                       const vocab::vocab_shards& shards, vocab::matrix_view<const T> table,
                       std::span<const std::int64_t> tokens, vocab::matrix_view<O> out,
                       entry_check& check, int root = 0) {
  if (comm.size() != shards.ranks())
    fail("pipit::cuda: the communicator has ", comm.size(),
         " ranks but the vocabulary is split over ", shards.ranks());
  if (out.ld() != out.cols) fail("pipit::cuda: the embedding output must be contiguous");
  embedding_forward_local<Block, T, O>(shards, comm.rank(), table, tokens, out, compute, check);
  const std::span<O> flat(out.data, static_cast<std::size_t>(out.rows * out.cols));
  comm.wait_for(compute);
  if (root < 0)
    comm.all_reduce_async(flat, std::plus<>{});
  else
    comm.reduce_async(flat, std::plus<>{}, root);
  comm.signal(compute);
}

// IB: grad_out (contiguous) is broadcast from `root` (overwritten elsewhere), then every rank
// scatter-adds the rows of its tokens into grad_table.
template <scatter_policy Scatter = sorted_scatter, int Block = 128, class G, class A>
void embedding_backward(nccl_communicator& comm, cudaStream_t compute,
                        const vocab::vocab_shards& shards, std::span<const std::int64_t> tokens,
                        vocab::matrix_view<G> grad_out, vocab::matrix_view<A> grad_table,
                        entry_check& check, int root = 0) {
  if (comm.size() != shards.ranks())
    fail("pipit::cuda: the communicator has ", comm.size(),
         " ranks but the vocabulary is split over ", shards.ranks());
  if (grad_out.ld() != grad_out.cols)
    fail("pipit::cuda: the embedding-output gradient must be contiguous");
  comm.wait_for(compute);
  comm.broadcast_async(
      std::span<G>(grad_out.data, static_cast<std::size_t>(grad_out.rows * grad_out.cols)), root);
  comm.signal(compute);
  embedding_backward_local<Scatter, Block, G, A>(shards, comm.rank(), tokens,
                                                 vocab::matrix_view<const G>(grad_out), grad_table,
                                                 compute, check);
}

}  // namespace pipit::cuda
