#pragma once
// row_parallel_linear<T>: Y = X A^T + b with A (out x in) split by input columns, the
// row-parallel layer of Megatron-LM (Shoeybi et al., arXiv 1909.08053, section 3; Megatron's
// RowParallelLinear). Rank r of t holds columns [r in/t, (r+1) in/t) of A and the matching
// features of X (the split output of a column-parallel layer); the partial outputs X_r A_r^T are
// summed by g (reduce_from_tensor_region), and the bias, replicated, is added once after the sum.
// With sequence parallelism (Korthikanti et al., arXiv 2205.05198) the sum is a reduce-scatter:
// each rank keeps its row block of Y; backward all-gathers the output gradient (kept in `saved`
// for the weight gradient).
//
// Passes:
//   forward         Y = sum_r X_r A_r^T (+ b)      (all-reduce or reduce-scatter)
//   backward_input  dX_r = dY A_r                  (no communication without sequence
//                                                   parallelism; else all-gather dY first)
//   backward_weight dA_r += dY^T X_r, db += 1^T dY (every rank gets the whole db)
// Weight gradients accumulate (+=); input gradients are overwritten. Host only (Eigen, float or
// double).

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/core/math.hpp"
#include "pipit/tp/linear_options.hpp"
#include "pipit/tp/matrix.hpp"
#include "pipit/tp/ring_collective.hpp"

namespace pipit::tp {

template <class T>
class row_parallel_linear {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "pipit::tp::row_parallel_linear: T must be float or double (host Eigen GEMMs)");
  static constexpr const char* layer = "row_parallel_linear";

 public:
  using value_type = T;

  row_parallel_linear(std::int64_t in_features, std::int64_t out_features, int tensor_size,
                      int tensor_rank, linear_options opt = {})
      : in_(in_features), out_(out_features), t_(tensor_size), r_(tensor_rank), opt_(opt) {
    detail::check_tensor_rank(layer, tensor_size, tensor_rank);
    if (out_features < 1)
      fail("pipit::tp::row_parallel_linear: out_features ", out_features, " < 1");
    detail::check_divides(layer, in_features, "in_features", tensor_size);
  }

  std::int64_t in_features() const noexcept { return in_; }
  std::int64_t out_features() const noexcept { return out_; }
  std::int64_t local_in() const noexcept { return in_ / t_; }
  int tensor_size() const noexcept { return t_; }
  int tensor_rank() const noexcept { return r_; }
  const linear_options& options() const noexcept { return opt_; }
  // The input features (columns of A) this rank owns.
  range<std::int64_t> in_range() const noexcept { return {r_ * local_in(), (r_ + 1) * local_in()}; }
  // Rows of this rank's output and output gradient: its row block with sequence parallelism.
  std::int64_t output_rows(std::int64_t tokens) const noexcept {
    return opt_.sequence_parallel ? row_block(tokens, t_, r_).size() : tokens;
  }
  // Elements backward_input() keeps for backward_weight(): the gathered output gradient with
  // sequence parallelism, nothing otherwise (the caller keeps dY).
  std::size_t saved_size(std::int64_t tokens) const noexcept {
    return opt_.sequence_parallel ? static_cast<std::size_t>(tokens * out_) : 0;
  }

  // This rank's shard of a full out x in weight (a strided view: a column block).
  template <class U>
  matrix_view<U> weight_shard(matrix_view<U> full) const {
    detail::check_view(layer, full, out_, in_, "the full weight");
    return column_block(full, in_range().begin, local_in());
  }

  // x: tokens x local_in; w: out x local_in; b: out (empty without bias); y: output_rows x out,
  // overwritten.
  template <comm::communicator C>
  void forward(C& tp, matrix_view<const T> x, matrix_view<const T> w, std::span<const T> b,
               matrix_view<T> y) {
    detail::check_group(layer, tp, t_, r_);
    const std::int64_t tokens = x.rows;
    detail::check_view(layer, x, tokens, local_in(), "the input");
    detail::check_view(layer, w, out_, local_in(), "the weight shard");
    detail::check_span(layer, b, opt_.bias ? out_ : 0, "the bias");
    detail::check_view(layer, y, output_rows(tokens), out_, "the output");
    partial_.resize(static_cast<std::size_t>(tokens * out_));
    const std::span<T> part(partial_);
    detail::as_eigen(part, tokens, out_).noalias() =
        detail::as_eigen(x) * detail::as_eigen(w).transpose();
    std::int64_t first = 0;
    if (opt_.sequence_parallel) {
      ring_reduce_scatter_rows(tp, part, tokens, out_);
      first = row_block(tokens, t_, r_).begin;
    } else {
      ring_all_reduce_rows(tp, part, tokens, out_);
    }
    auto Y = detail::as_eigen(y);
    Y = detail::as_eigen(part, tokens, out_).middleRows(first, y.rows);
    if (opt_.bias) Y.rowwise() += detail::as_row(b);
  }

  // dy: output_rows(tokens) x out; dx: tokens x local_in, overwritten; saved: saved_size(tokens),
  // filled for backward_weight.
  template <comm::communicator C>
  void backward_input(C& tp, matrix_view<const T> dy, matrix_view<const T> w, matrix_view<T> dx,
                      std::span<T> saved) {
    detail::check_group(layer, tp, t_, r_);
    const std::int64_t tokens = dx.rows;
    detail::check_view(layer, dx, tokens, local_in(), "the input gradient");
    detail::check_view(layer, dy, output_rows(tokens), out_, "the output gradient");
    detail::check_view(layer, w, out_, local_in(), "the weight shard");
    detail::check_span(layer, saved, static_cast<std::int64_t>(saved_size(tokens)),
                       "the saved buffer");
    matrix_view<const T> full = dy;
    if (opt_.sequence_parallel) {
      const auto mine = row_block(tokens, t_, r_);
      detail::as_eigen(saved, tokens, out_).middleRows(mine.begin, mine.size()) =
          detail::as_eigen(dy);
      ring_all_gather_rows(tp, saved, tokens, out_);
      full = make_view(static_cast<const T*>(saved.data()), tokens, out_);
    }
    detail::as_eigen(dx).noalias() = detail::as_eigen(full) * detail::as_eigen(w);
  }

  // dw (out x local_in) += dY^T x; db (out; empty without bias) += column sums of dY. x as given
  // to forward(); dy as given to backward_input(), saved as it filled it.
  void backward_weight(matrix_view<const T> x, std::span<const T> saved, matrix_view<const T> dy,
                       matrix_view<T> dw, std::span<T> db) const {
    weight_piece(0, 1, x, saved, dy, dw, db);
  }

  // Piece i of `pieces` of backward_weight: output rows row_block(out, pieces, i) of dw and db.
  void weight_piece(int i, int pieces, matrix_view<const T> x, std::span<const T> saved,
                    matrix_view<const T> dy, matrix_view<T> dw, std::span<T> db) const {
    PIPIT_REQUIRE(pieces >= 1 && i >= 0 && i < pieces, "pipit::tp: weight piece ", i, " of ",
                  pieces, " (need 0 <= i < pieces)");
    const std::int64_t tokens = x.rows;
    detail::check_view(layer, x, tokens, local_in(), "the input");
    detail::check_view(layer, dw, out_, local_in(), "the weight gradient");
    if (opt_.bias) detail::check_span(layer, db, out_, "the bias gradient");
    matrix_view<const T> full = dy;
    if (opt_.sequence_parallel) {
      detail::check_span(layer, saved, tokens * out_, "the saved buffer");
      full = make_view(saved.data(), tokens, out_);
    } else {
      detail::check_view(layer, dy, tokens, out_, "the output gradient");
    }
    const auto rows = row_block(out_, pieces, i);
    if (rows.size() == 0) return;
    const auto DY = detail::as_eigen(full).middleCols(rows.begin, rows.size());
    detail::as_eigen(dw).middleRows(rows.begin, rows.size()).noalias() +=
        DY.transpose() * detail::as_eigen(x);
    if (opt_.bias) detail::as_row(db).segment(rows.begin, rows.size()) += DY.colwise().sum();
  }

 private:
  std::int64_t in_, out_;
  int t_, r_;
  linear_options opt_;
  std::vector<T> partial_;  // tokens x out: this rank's partial output, reduced in place
};

}  // namespace pipit::tp
