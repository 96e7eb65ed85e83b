#pragma once
// cuda::output_layer_forward_backward<Algorithm>(comm, ...): forward and backward of the LM head
// + cross-entropy sharded over the vocabulary on the GPUs of an NCCL communicator, for one
// microbatch: vocab::output_layer_forward_backward's sequence, with the passes enqueued on the
// caller's compute stream and the collectives on comm.stream(), ordered by events in both
// directions (wait_for / signal) instead of host waits. The statistics merge is one collective
// (merge_op); naive runs its three. The only host synchronisation is the final fetch_loss(),
// which also raises for invalid targets or loss weights.
//
// Every rank calls it with the same X and targets (device) and its own weight shard
// (comm.rank() owns shard comm.rank()). grad_x (fp32) is overwritten: summed on every rank
// (grad_x_root == all_ranks) or on grad_x_root only (scratch elsewhere); grad_weight (fp32) is
// accumulated into. On return every result is complete on the device.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <type_traits>

#include "pipit/core/error.hpp"
#include "pipit/cuda/blas_handle.cuh"
#include "pipit/cuda/device_buffer.cuh"
#include "pipit/cuda/nccl_communicator.cuh"
#include "pipit/cuda/output_layer.cuh"
#include "pipit/vocab/algorithms.hpp"
#include "pipit/vocab/loss.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/shards.hpp"
#include "pipit/vocab/softmax_stats.hpp"

namespace pipit::cuda {

// grad_x_root value: all-reduce the input gradient so that every rank holds it.
inline constexpr int all_ranks = -1;

namespace detail_vocab {
inline std::span<float> flat(vocab::matrix_view<float> m) {
  if (m.ld() != m.cols)
    fail("pipit::cuda: a gradient reduced over the communicator must be contiguous (row stride ",
         m.ld(), " != ", m.cols, ")");
  return {m.data, static_cast<std::size_t>(m.rows * m.cols)};
}
inline void sum_over_ranks(nccl_communicator& comm, std::span<float> data, int root) {
  if (root == all_ranks)
    comm.all_reduce_async(data, std::plus<>{});
  else
    comm.reduce_async(data, std::plus<>{}, root);
}
// One collective on comm.stream() between two points of the compute stream.
template <class F>
void on_comm_stream(nccl_communicator& comm, cudaStream_t compute, F&& collective) {
  comm.wait_for(compute);
  collective();
  comm.signal(compute);
}
}  // namespace detail_vocab

template <vocab::output_algorithm Algorithm, std::size_t Chunk = default_chunk,
          int Block = default_block, gemm_input T>
vocab::loss_result<float> output_layer_forward_backward(
    nccl_communicator& comm, const blas_handle& blas, cudaStream_t compute,
    const vocab::vocab_shards& shards, vocab::matrix_view<const T> x,
    std::type_identity_t<vocab::matrix_view<const T>> weight, std::span<const std::int64_t> targets,
    vocab::matrix_view<float> grad_x, vocab::matrix_view<float> grad_weight,
    const vocab::loss_options& opt = {}, std::span<const float> loss_weights = {},
    int grad_x_root = all_ranks) {
  if (comm.size() != shards.ranks())
    fail("pipit::cuda: the communicator has ", comm.size(),
         " ranks but the vocabulary is split over ", shards.ranks());
  if (grad_x_root != all_ranks && (grad_x_root < 0 || grad_x_root >= comm.size()))
    fail("pipit::cuda: input-gradient root ", grad_x_root, " is outside [0, ", comm.size(), ")");
  output_layer<Algorithm, T, Chunk, Block> layer(blas, compute, shards, comm.rank(), x, weight,
                                                 targets, opt);
  detail_vocab::check_view(grad_x, x.rows, x.cols, "the input gradient");
  const std::span<float> dx = detail_vocab::flat(grad_x);
  device_buffer<float> g(targets.size(), compute);
  using detail_vocab::on_comm_stream;

  if constexpr (std::is_same_v<Algorithm, vocab::one_barrier>) {
    layer.s_pass(grad_x);  // the softmax-weighted rows accumulate in grad_x
    on_comm_stream(comm, compute, [&] { comm.all_reduce_async(layer.stats(), vocab::merge_op{}); });
    layer.input_grad_partial(grad_x);
    on_comm_stream(comm, compute, [&] { detail_vocab::sum_over_ranks(comm, dx, grad_x_root); });
    layer.loss(g.span(), loss_weights);
    if (grad_x_root == all_ranks || grad_x_root == comm.rank())
      scale_rows<Block>(grad_x, std::span<const float>(g.span()), compute);
    layer.t_pass(g.span(), grad_weight);
  } else {
    layer.s_pass();
    if constexpr (std::is_same_v<Algorithm, vocab::naive>) {
      on_comm_stream(comm, compute, [&] {
        comm.all_reduce_async(layer.naive_max(), comm::max_op{});
        comm.all_reduce_async(layer.naive_target_sums(), std::plus<>{});
      });
      const std::span<float> sums = layer.naive_sum_exp();
      on_comm_stream(comm, compute, [&] { comm.all_reduce_async(sums, std::plus<>{}); });
      layer.naive_combine();
    } else {
      on_comm_stream(comm, compute,
                     [&] { comm.all_reduce_async(layer.stats(), vocab::merge_op{}); });
    }
    layer.loss(g.span(), loss_weights);
    layer.t_pass(g.span(), grad_weight, grad_x);
    on_comm_stream(comm, compute, [&] { detail_vocab::sum_over_ranks(comm, dx, grad_x_root); });
  }
  const vocab::loss_result<float> r = layer.fetch_loss();  // waits for compute (and so for comm)
  comm.synchronize();                                      // surfaces asynchronous NCCL errors
  return r;
}

}  // namespace pipit::cuda
