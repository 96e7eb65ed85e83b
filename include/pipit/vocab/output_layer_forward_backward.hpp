#pragma once
// output_layer_forward_backward<Algorithm>(comm, ...): forward and backward of the LM head +
// cross-entropy sharded over the vocabulary on the ranks of `comm`, for one microbatch. Every
// rank calls it with the same X and targets and its own weight shard (comm.rank() owns shard
// comm.rank() of `shards`). It runs output_layer's local passes and, between them, the
// collectives the algorithm needs:
//   naive:        all_reduce max; all_reduce + (target, logit sum); all_reduce + (sum of exp);
//                 then sum of the input-gradient partials
//   two_barrier:  one all_reduce of token_stats with merge_op; then sum of the input gradient
//   one_barrier:  one all_reduce of token_stats with merge_op and right after it the sum of the
//                 input-gradient partials formed in the S pass; the T pass needs no collective
// The input gradient is summed with all_reduce (grad_x_root == all_ranks: every rank gets dX) or
// reduce (to grad_x_root only, e.g. the last pipeline stage; grad_x is scratch on the others).
// The loss and g are computed on every rank from the merged statistics (no collective).

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <type_traits>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/vocab/algorithms.hpp"
#include "pipit/vocab/loss.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/output_layer.hpp"
#include "pipit/vocab/shards.hpp"
#include "pipit/vocab/softmax_stats.hpp"

namespace pipit::vocab {

// grad_x_root value: all-reduce the input gradient so that every rank holds it.
inline constexpr int all_ranks = -1;

namespace detail {
template <class A>
std::span<A> flat(matrix_view<A> m) {
  if (m.ld() != m.cols)
    fail("pipit::vocab: a gradient reduced over the communicator must be contiguous (row stride ",
         m.ld(), " != ", m.cols, ")");
  return {m.data, static_cast<std::size_t>(m.rows * m.cols)};
}
template <comm::communicator C, class A>
void sum_over_ranks(C& comm, std::span<A> data, int root) {
  if (root == all_ranks)
    comm.all_reduce(data, std::plus<>{});
  else
    comm.reduce(data, std::plus<>{}, root);
}
}  // namespace detail

template <output_algorithm Algorithm, std::size_t Chunk = default_chunk, comm::communicator C,
          class T>
loss_result<accum_t<T>> output_layer_forward_backward(
    C& comm, const vocab_shards& shards, matrix_view<const T> x,
    std::type_identity_t<matrix_view<const T>> weight, std::span<const std::int64_t> targets,
    matrix_view<accum_t<T>> grad_x, matrix_view<accum_t<T>> grad_weight,
    const loss_options& opt = {}, std::span<const accum_t<T>> loss_weights = {},
    int grad_x_root = all_ranks) {
  using A = accum_t<T>;
  if (comm.size() != shards.ranks())
    fail("pipit::vocab: the communicator has ", comm.size(),
         " ranks but the vocabulary is split "
         "over ",
         shards.ranks());
  if (grad_x_root != all_ranks && (grad_x_root < 0 || grad_x_root >= comm.size()))
    fail("pipit::vocab: input-gradient root ", grad_x_root, " is outside [0, ", comm.size(), ")");
  output_layer<Algorithm, T, Chunk> layer(shards, comm.rank(), x, weight, targets, opt);
  check_loss_inputs<A>(shards, targets, opt, loss_weights);
  detail::check_view(grad_x, x.rows, x.cols, "the input gradient");
  const std::span<A> dx = detail::flat(grad_x);
  std::vector<A> g(targets.size());

  if constexpr (std::is_same_v<Algorithm, one_barrier>) {
    layer.s_pass(grad_x);  // the softmax-weighted rows accumulate in grad_x
    comm.all_reduce(layer.stats(), merge_op{});
    layer.input_grad_partial(grad_x);
    detail::sum_over_ranks(comm, dx, grad_x_root);
    const loss_result<A> r = layer.loss(g, loss_weights);
    if (grad_x_root == all_ranks || grad_x_root == comm.rank())
      scale_rows(grad_x, std::span<const A>(g));
    layer.t_pass(g, grad_weight);
    return r;
  } else {
    layer.s_pass();
    if constexpr (std::is_same_v<Algorithm, naive>) {
      comm.all_reduce(layer.naive_max(), comm::max_op{});
      comm.all_reduce(layer.naive_target_sums(), std::plus<>{});
      comm.all_reduce(layer.naive_sum_exp(), std::plus<>{});
      layer.naive_combine();
    } else {
      comm.all_reduce(layer.stats(), merge_op{});
    }
    const loss_result<A> r = layer.loss(g, loss_weights);
    layer.t_pass(g, grad_weight, grad_x);
    detail::sum_over_ranks(comm, dx, grad_x_root);
    return r;
  }
}

}  // namespace pipit::vocab
