#pragma once
// column_parallel_linear<T>: Y = X A^T + b with A (out x in) split by output rows, the
// column-parallel layer of Megatron-LM (Shoeybi et al., arXiv 1909.08053, section 3; Megatron's
// ColumnParallelLinear). Rank r of t holds rows [r out/t, (r+1) out/t) of A and b and produces
// those output features; the output stays split (the next layer is row-parallel).
//
// Its input passes through f (copy_to_tensor_region): identity forward, all-reduce of the
// input-gradient partials backward. With sequence parallelism (Korthikanti et al., arXiv
// 2205.05198) the input is this rank's row block: forward all-gathers it (kept in `saved` for the
// weight gradient), backward reduce-scatters the input gradient.
//
// Passes, as the zero-bubble split needs them (Qi et al., arXiv 2401.10241):
//   forward         Y_r = X A_r^T + b_r
//   backward_input  dX = sum_r dY_r A_r            (all-reduce or reduce-scatter)
//   backward_weight dA_r += dY_r^T X, db_r += 1^T dY_r   (no communication)
//   backward        both; the dX reduction is in flight during the weight-gradient GEMM
//                   (Megatron's async dgrad all-reduce, here as a stepwise ring on one thread)
// Weight gradients accumulate (+=); input gradients are overwritten.
//
// Host only: Eigen GEMMs in T (float or double).

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/core/math.hpp"
#include "pipit/tp/linear_options.hpp"
#include "pipit/tp/matrix.hpp"
#include "pipit/tp/ring_collective.hpp"

namespace pipit::tp {

template <class T>
class column_parallel_linear {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "pipit::tp::column_parallel_linear: T must be float or double (host Eigen GEMMs)");
  static constexpr const char* layer = "column_parallel_linear";

 public:
  using value_type = T;

  column_parallel_linear(std::int64_t in_features, std::int64_t out_features, int tensor_size,
                         int tensor_rank, linear_options opt = {})
      : in_(in_features), out_(out_features), t_(tensor_size), r_(tensor_rank), opt_(opt) {
    detail::check_tensor_rank(layer, tensor_size, tensor_rank);
    if (in_features < 1)
      fail("pipit::tp::column_parallel_linear: in_features ", in_features, " < 1");
    detail::check_divides(layer, out_features, "out_features", tensor_size);
  }

  std::int64_t in_features() const noexcept { return in_; }
  std::int64_t out_features() const noexcept { return out_; }
  std::int64_t local_out() const noexcept { return out_ / t_; }
  int tensor_size() const noexcept { return t_; }
  int tensor_rank() const noexcept { return r_; }
  const linear_options& options() const noexcept { return opt_; }
  // The output features (rows of A and b) this rank owns.
  range<std::int64_t> out_range() const noexcept {
    return {r_ * local_out(), (r_ + 1) * local_out()};
  }
  // Rows of this rank's input and input gradient: its row block with sequence parallelism.
  std::int64_t input_rows(std::int64_t tokens) const noexcept {
    return opt_.sequence_parallel ? row_block(tokens, t_, r_).size() : tokens;
  }
  // Elements forward() keeps for the backward passes: the gathered input with sequence
  // parallelism, nothing otherwise (the caller keeps X).
  std::size_t saved_size(std::int64_t tokens) const noexcept {
    return opt_.sequence_parallel ? static_cast<std::size_t>(tokens * in_) : 0;
  }

  // This rank's shard of a full out x in weight and of a full bias.
  template <class U>
  matrix_view<U> weight_shard(matrix_view<U> full) const {
    detail::check_view(layer, full, out_, in_, "the full weight");
    return full.block_rows(out_range().begin, local_out());
  }
  template <class U>
  std::span<U> bias_shard(std::span<U> full) const {
    detail::check_span(layer, full, out_, "the full bias");
    return full.subspan(static_cast<std::size_t>(out_range().begin),
                        static_cast<std::size_t>(local_out()));
  }

  // x: input_rows(tokens) x in; w: local_out x in; b: local_out (empty without bias);
  // y: tokens x local_out, overwritten; saved: saved_size(tokens).
  template <comm::communicator C>
  void forward(C& tp, matrix_view<const T> x, matrix_view<const T> w, std::span<const T> b,
               matrix_view<T> y, std::span<T> saved) {
    detail::check_group(layer, tp, t_, r_);
    const std::int64_t tokens = y.rows;
    detail::check_view(layer, y, tokens, local_out(), "the output");
    detail::check_view(layer, x, input_rows(tokens), in_, "the input");
    check_params(w, b);
    detail::check_span(layer, saved, static_cast<std::int64_t>(saved_size(tokens)),
                       "the saved buffer");
    const matrix_view<const T> xf = gather_input(tp, x, saved, tokens);
    auto Y = detail::as_eigen(y);
    Y.noalias() = detail::as_eigen(xf) * detail::as_eigen(w).transpose();
    if (opt_.bias) Y.rowwise() += detail::as_row(b);
  }

  // dy: tokens x local_out; dx: input_rows(tokens) x in, overwritten.
  template <comm::communicator C>
  void backward_input(C& tp, matrix_view<const T> dy, matrix_view<const T> w, matrix_view<T> dx) {
    backward_input_overlapping(tp, dy, w, dx, 0, [](int) {});
  }

  // dw (local_out x in) += dy^T X; db (local_out; empty without bias) += column sums of dy.
  // x and saved as given to and filled by forward().
  void backward_weight(matrix_view<const T> x, std::span<const T> saved, matrix_view<const T> dy,
                       matrix_view<T> dw, std::span<T> db) const {
    weight_piece(0, 1, x, saved, dy, dw, db);
  }

  // backward_input and backward_weight together, the dx reduction overlapping the dw GEMM.
  template <comm::communicator C>
  void backward(C& tp, matrix_view<const T> x, std::span<const T> saved, matrix_view<const T> dy,
                matrix_view<const T> w, matrix_view<T> dx, matrix_view<T> dw, std::span<T> db) {
    const int pieces = std::max(1, ring_steps(tp));
    backward_input_overlapping(tp, dy, w, dx, pieces,
                               [&](int i) { weight_piece(i, pieces, x, saved, dy, dw, db); });
  }

  // ---- building blocks for layers that overlap more work with the dx reduction --------------
  // The number of steps of the dx reduction (0 for one rank).
  template <comm::communicator C>
  int ring_steps(const C& tp) const noexcept {
    const int p = tp.size();
    return p == 1 ? 0 : (opt_.sequence_parallel ? p - 1 : 2 * (p - 1));
  }

  // backward_input, running work(i) for i < pieces while the reduction is in flight (a step
  // completes after each piece).
  template <comm::communicator C, class Work>
  void backward_input_overlapping(C& tp, matrix_view<const T> dy, matrix_view<const T> w,
                                  matrix_view<T> dx, int pieces, Work&& work) {
    detail::check_group(layer, tp, t_, r_);
    const std::int64_t tokens = dy.rows;
    detail::check_view(layer, dy, tokens, local_out(), "the output gradient");
    detail::check_view(layer, w, local_out(), in_, "the weight shard");
    detail::check_view(layer, dx, input_rows(tokens), in_, "the input gradient");
    partial_.resize(static_cast<std::size_t>(tokens * in_));
    const std::span<T> part(partial_);
    detail::as_eigen(part, tokens, in_).noalias() = detail::as_eigen(dy) * detail::as_eigen(w);
    ring_collective<C, T> ring(
        tp, part, tokens, in_,
        opt_.sequence_parallel ? ring_mode::reduce_scatter : ring_mode::all_reduce);
    overlap_with(ring, pieces, std::forward<Work>(work));
    const std::int64_t first = opt_.sequence_parallel ? row_block(tokens, t_, r_).begin : 0;
    detail::as_eigen(dx) = detail::as_eigen(part, tokens, in_).middleRows(first, dx.rows);
  }

  // Piece i of `pieces` of backward_weight: output rows row_block(local_out, pieces, i) of dw
  // (and all of db with piece 0).
  void weight_piece(int i, int pieces, matrix_view<const T> x, std::span<const T> saved,
                    matrix_view<const T> dy, matrix_view<T> dw, std::span<T> db) const {
    const std::int64_t tokens = dy.rows;
    detail::check_view(layer, dy, tokens, local_out(), "the output gradient");
    detail::check_view(layer, dw, local_out(), in_, "the weight gradient");
    if (opt_.bias) detail::check_span(layer, db, local_out(), "the bias gradient");
    const matrix_view<const T> xf = saved_input(x, saved, tokens);
    PIPIT_REQUIRE(pieces >= 1 && i >= 0 && i < pieces, "pipit::tp: weight piece ", i, " of ",
                  pieces, " (need 0 <= i < pieces)");
    const auto rows = row_block(local_out(), pieces, i);
    if (rows.size() > 0)
      detail::as_eigen(dw).middleRows(rows.begin, rows.size()).noalias() +=
          detail::as_eigen(dy).middleCols(rows.begin, rows.size()).transpose() *
          detail::as_eigen(xf);
    if (opt_.bias && i == 0) detail::as_row(db) += detail::as_eigen(dy).colwise().sum();
  }

 private:
  void check_params(matrix_view<const T> w, std::span<const T> b) const {
    detail::check_view(layer, w, local_out(), in_, "the weight shard");
    detail::check_span(layer, b, opt_.bias ? local_out() : 0, "the bias shard");
  }

  // The whole input: x itself, or x's rows all-gathered into saved.
  template <comm::communicator C>
  matrix_view<const T> gather_input(C& tp, matrix_view<const T> x, std::span<T> saved,
                                    std::int64_t tokens) const {
    if (!opt_.sequence_parallel) return x;
    const auto mine = row_block(tokens, t_, r_);
    detail::as_eigen(saved, tokens, in_).middleRows(mine.begin, mine.size()) = detail::as_eigen(x);
    ring_all_gather_rows(tp, saved, tokens, in_);
    return make_view(static_cast<const T*>(saved.data()), tokens, in_);
  }

  matrix_view<const T> saved_input(matrix_view<const T> x, std::span<const T> saved,
                                   std::int64_t tokens) const {
    if (!opt_.sequence_parallel) {
      detail::check_view(layer, x, tokens, in_, "the input");
      return x;
    }
    detail::check_span(layer, saved, tokens * in_, "the saved buffer");
    return make_view(saved.data(), tokens, in_);
  }

  std::int64_t in_, out_;
  int t_, r_;
  linear_options opt_;
  std::vector<T> partial_;  // tokens x in: this rank's dX partial, reduced in place
};

}  // namespace pipit::tp
