#pragma once
// output_layer<Algorithm, T, Chunk>: one rank's share of the LM head + softmax cross-entropy
// sharded over the vocabulary (Yeung et al., arXiv 2411.05288, sections 3-5), as the LOCAL passes
// between which the caller runs the collectives. output_layer_forward_backward.hpp strings them
// together over a communicator; a pipeline runtime calls them as its S and T actions.
//
// Fused and chunked: the S pass streams over the shard's vocabulary in chunks of Chunk rows,
// computing each chunk's logits X W_c^T (tokens x Chunk) into one reused buffer and folding
// them into online-softmax statistics; the T pass recomputes each chunk's logits and turns them
// into the logit gradient in place, from which it forms the weight gradient (and, for naive and
// two_barrier, this shard's input-gradient partial). The tokens x (V/p) logits are never held:
// extra memory is tokens x Chunk (+ tokens x hidden to widen bfloat16 inputs, + Chunk x hidden
// for bfloat16 weights, + O(tokens)).
//
// Per microbatch, with g the per-token loss gradient (loss.hpp):
//   naive:        s_pass(); all_reduce(naive_max(), max); all_reduce(naive_target_sums(), +);
//                 all_reduce(naive_sum_exp(), +); naive_combine(); loss(g);
//                 t_pass(g, dW, dX_i); all_reduce or reduce(dX_i, +)          -> dX
//   two_barrier:  s_pass(); all_reduce(stats(), merge_op); loss(g);
//                 t_pass(g, dW, dX_i); all_reduce or reduce(dX_i, +)          -> dX
//   one_barrier:  s_pass(A); all_reduce(stats(), merge_op); input_grad_partial(A);
//                 all_reduce or reduce(A, +)  -> D;  loss(g);  scale_rows(D, g) -> dX;
//                 t_pass(g, dW)   (any time later: the last stage's B no longer waits for it)
// Weight gradients are accumulated (+=) into the caller's buffer, as into an fp32 main_grad;
// rows of padding ids are never touched. Input gradients are overwritten.
//
// T is the element type of X and W: float, double, or a 16-bit float such as Eigen::bfloat16;
// statistics, logits and gradients are in accum_t<T> (double for double, float otherwise).

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/vocab/algorithms.hpp"
#include "pipit/vocab/cross_entropy.hpp"
#include "pipit/vocab/loss.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/shards.hpp"
#include "pipit/vocab/softmax_stats.hpp"

namespace pipit::vocab {

// Vocabulary rows per chunk unless the caller chooses: tokens x 1024 logits (8 MiB at 2048
// tokens in fp32) keep the GEMMs efficient and the buffer at 1/16 of a 16k-row shard's logits.
inline constexpr std::size_t default_chunk = 1024;

namespace detail {
template <class T>
using row_major =
    Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using eigen_view =
    Eigen::Map<std::conditional_t<std::is_const_v<T>, const row_major<T>, row_major<T>>,
               Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
eigen_view<T> as_eigen(matrix_view<T> v) {
  return eigen_view<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.ld()));
}
template <class T>
void check_view(const matrix_view<T>& v, std::int64_t rows, std::int64_t cols, const char* what) {
  if (v.rows != rows || v.cols != cols)
    fail("pipit::vocab: ", what, " is ", v.rows, " x ", v.cols, ", expected ", rows, " x ", cols);
  if (v.ld() < v.cols) fail("pipit::vocab: ", what, " has row stride ", v.ld(), " < ", v.cols);
  if (v.data == nullptr && rows * cols > 0) fail("pipit::vocab: ", what, " has no data");
}
template <class T>
std::size_t bytes_of(const std::vector<T>& v) {
  return v.capacity() * sizeof(T);
}
}  // namespace detail

// Multiplies row t of m by s[t]: Algorithm 2's dX = g (.) D.
template <class A>
void scale_rows(matrix_view<A> m, std::span<const A> s) {
  if (static_cast<std::int64_t>(s.size()) != m.rows)
    fail("pipit::vocab::scale_rows: ", s.size(), " scales for ", m.rows, " rows");
  for (std::int64_t t = 0; t < m.rows; ++t) {
    A* r = m.row(t);
    for (std::int64_t j = 0; j < m.cols; ++j) r[j] *= s[static_cast<std::size_t>(t)];
  }
}

template <output_algorithm Algorithm, class T, std::size_t Chunk = default_chunk>
class output_layer {
  static_assert(Chunk > 0, "pipit::vocab::output_layer: Chunk must be at least 1");
  static constexpr bool is_naive = std::is_same_v<Algorithm, naive>;
  static constexpr bool is_one_barrier = std::is_same_v<Algorithm, one_barrier>;

 public:
  using value_type = T;
  using acc_type = accum_t<T>;
  using stats_type = token_stats<acc_type>;
  static constexpr std::int64_t chunk = static_cast<std::int64_t>(Chunk);

  // x: tokens x hidden, the same on every rank; weight: this rank's shard, shard_size() x hidden
  // (padding rows are never read); targets: one global id per token, or opt.ignore_index.
  // The views must stay valid until the last pass.
  output_layer(const vocab_shards& shards, int rank, matrix_view<const T> x,
               matrix_view<const T> weight, std::span<const std::int64_t> targets,
               const loss_options& opt = {})
      : shards_(shards), rank_(rank), w_(weight), opt_(opt) {
    shards.check_rank(rank);
    detail::check_view(weight, shards.shard_size(), weight.cols, "the weight shard");
    real_rows_ = shards.real_rows(rank);
    bind(x, targets);
  }

  // Points the layer at another microbatch's X and targets (same shards, rank, weight and
  // options) and starts again from the S pass, keeping the buffers it has allocated: a pipeline
  // runtime keeps one layer per microbatch in flight and rebinds it.
  void bind(matrix_view<const T> x, std::span<const std::int64_t> targets) {
    detail::check_view(x, static_cast<std::int64_t>(targets.size()), w_.cols, "the input X");
    check_loss_inputs<acc_type>(shards_, targets, opt_, {});
    x_ = x;
    targets_ = targets;
    const auto real = shards_.real_range_of(rank_);
    local_target_.resize(targets.size());
    for (std::size_t t = 0; t < targets.size(); ++t)
      local_target_[t] =
          targets[t] == opt_.ignore_index ? -1 : owned_row(targets[t], real.begin, real.end);
    x_acc_.clear();  // the widened copy of the previous X (16-bit inputs) is stale
    phase_ = phase::constructed;
  }

  std::int64_t tokens() const noexcept { return x_.rows; }
  std::int64_t hidden() const noexcept { return x_.cols; }
  int rank() const noexcept { return rank_; }
  const vocab_shards& shards() const noexcept { return shards_; }

  // ---- S pass --------------------------------------------------------------------------------
  // naive, two_barrier: this shard's statistics into stats().
  void s_pass() requires(!is_one_barrier) { s_pass_impl(nullptr); }
  // one_barrier: also a (tokens x hidden, overwritten) = sum_v exp(z_v - m_local) w_v over the
  // shard, accumulated chunk by chunk with rescaling whenever a token's running maximum grows.
  void s_pass(matrix_view<acc_type> a) requires is_one_barrier {
    detail::check_view(a, tokens(), hidden(), "the S-pass accumulator");
    s_pass_impl(&a);
  }

  // Per-token statistics: this shard's after s_pass; all-reduce them in place with merge_op
  // (two_barrier, one_barrier) or run the naive steps, and they are the global ones.
  std::span<stats_type> stats() noexcept { return stats_; }
  std::span<const stats_type> stats() const noexcept { return stats_; }

  // ---- naive's separate reductions (after s_pass, in this order) ------------------------------
  // 1. the local maxima: all-reduce with comm::max_op.
  std::span<acc_type> naive_max() requires is_naive {
    require_phase(phase::s_done, "naive_max");
    return max_buf_;
  }
  // 2. target logits then logit sums (2 x tokens): all-reduce with std::plus.
  std::span<acc_type> naive_target_sums() requires is_naive {
    require_phase(phase::s_done, "naive_target_sums");
    return target_buf_;
  }
  // 3. after the max is reduced: the local sums of exp(z - global max); all-reduce with plus.
  std::span<acc_type> naive_sum_exp() requires is_naive {
    require_phase(phase::s_done, "naive_sum_exp");
    sum_buf_.resize(stats_.size());
    for (std::size_t t = 0; t < stats_.size(); ++t) {
      const stats_type& s = stats_[t];
      sum_buf_[t] = s.max == -std::numeric_limits<acc_type>::infinity()
                        ? acc_type(0)
                        : s.sum * std::exp(s.max - max_buf_[t]);
    }
    return sum_buf_;
  }
  // 4. stats() becomes the global statistics.
  void naive_combine() requires is_naive {
    require_phase(phase::s_done, "naive_combine");
    const std::size_t n = stats_.size();
    if (sum_buf_.size() != n) fail("pipit::vocab: naive_combine before naive_sum_exp");
    for (std::size_t t = 0; t < n; ++t)
      stats_[t] = {max_buf_[t], sum_buf_[t], target_buf_[t], target_buf_[n + t]};
  }

  // ---- loss (on merged statistics) ---------------------------------------------------------
  // The reduced loss and g (one per token) for the backward passes; weights: empty or a loss
  // mask / weight per token. Every rank can run it: it reads only merged statistics.
  loss_result<acc_type> loss(std::span<acc_type> g, std::span<const acc_type> weights = {}) const {
    check_loss_inputs<acc_type>(shards_, targets_, opt_, weights);
    return loss_forward<acc_type>(stats_, targets_, shards_.vocab_size(), opt_, weights, g);
  }

  // ---- one_barrier: after the statistics merge ----------------------------------------------
  // Turns the S-pass accumulator into this shard's share of D = sum_v dloss/dz_v w_v (without
  // g): a <- (1 + 2 lambda lse) exp(m_local - lse) a - (1 - eps) w_target - (eps / V) sum_v w_v.
  // Sum the shares over the ranks, then scale_rows(D, g) gives dX.
  void input_grad_partial(matrix_view<acc_type> a) requires is_one_barrier {
    require_phase(phase::s_done, "input_grad_partial");
    detail::check_view(a, tokens(), hidden(), "the S-pass accumulator");
    const ce_params<acc_type> p = opt_.params<acc_type>(shards_.vocab_size());
    // Label smoothing's sum of the shard's weight rows, into a member buffer: a rebound layer
    // (bind) allocates nothing in later steps.
    std::vector<acc_type>& wsum = wsum_;
    wsum.clear();
    if (p.smoothing != acc_type(0)) {
      wsum.assign(static_cast<std::size_t>(hidden()), acc_type(0));
      for (std::int64_t v = 0; v < real_rows_; ++v)
        for (std::int64_t j = 0; j < hidden(); ++j)
          wsum[static_cast<std::size_t>(j)] += static_cast<acc_type>(w_(v, j));
    }
    for (std::int64_t t = 0; t < tokens(); ++t) {
      const auto ti = static_cast<std::size_t>(t);
      const grad_coeffs<acc_type> c = token_grad_coeffs(stats_[ti], acc_type(1), p);
      const acc_type f = local_softmax_weight(local_max_[ti], c);
      acc_type* r = a.row(t);
      for (std::int64_t j = 0; j < hidden(); ++j) r[j] *= f;
      if (const std::int64_t lt = local_target_[ti]; lt >= 0) {
        const T* wr = w_.row(lt);
        for (std::int64_t j = 0; j < hidden(); ++j)
          r[j] -= c.target_scale * static_cast<acc_type>(wr[j]);
      }
      if (!wsum.empty())
        for (std::int64_t j = 0; j < hidden(); ++j)
          r[j] -= c.uniform * wsum[static_cast<std::size_t>(j)];
    }
  }

  // ---- T pass --------------------------------------------------------------------------------
  // one_barrier: the weight gradient only (grad_weight += dZ^T X over the real rows).
  void t_pass(std::span<const acc_type> g,
              matrix_view<acc_type> grad_weight) requires is_one_barrier {
    t_pass_impl(g, grad_weight, nullptr);
  }
  // naive, two_barrier: also this shard's input-gradient partial dX_i = dZ W (overwritten);
  // sum it over the ranks.
  void t_pass(std::span<const acc_type> g, matrix_view<acc_type> grad_weight,
              matrix_view<acc_type> grad_x) requires(!is_one_barrier) {
    detail::check_view(grad_x, tokens(), hidden(), "the input gradient");
    t_pass_impl(g, grad_weight, &grad_x);
  }

  // Bytes of the buffers this object has allocated so far (logits chunk, statistics, widened
  // inputs, per-token coefficients): its peak extra memory, inputs and outputs excluded.
  std::size_t workspace_bytes() const noexcept {
    return detail::bytes_of(chunk_) + detail::bytes_of(x_acc_) + detail::bytes_of(w_acc_) +
           detail::bytes_of(stats_) + detail::bytes_of(local_max_) +
           detail::bytes_of(local_target_) + detail::bytes_of(max_buf_) +
           detail::bytes_of(target_buf_) + detail::bytes_of(sum_buf_) + detail::bytes_of(coeffs_) +
           detail::bytes_of(wsum_);
  }

 private:
  enum class phase { constructed, s_done };
  using mat = detail::row_major<acc_type>;
  using cmap = Eigen::Map<const mat, Eigen::Unaligned, Eigen::OuterStride<>>;
  using map = Eigen::Map<mat, Eigen::Unaligned, Eigen::OuterStride<>>;

  void require_phase(phase p, const char* what) const {
    if (phase_ != p) fail("pipit::vocab::output_layer: ", what, " called before the S pass");
  }

  // X in the accumulation type (widened once for 16-bit inputs).
  cmap x_acc() {
    if constexpr (std::is_same_v<T, acc_type>) {
      return cmap(x_.data, x_.rows, x_.cols, Eigen::OuterStride<>(x_.ld()));
    } else {
      if (x_acc_.empty() && tokens() * hidden() > 0) {
        x_acc_.resize(static_cast<std::size_t>(tokens() * hidden()));
        for (std::int64_t t = 0; t < tokens(); ++t)
          for (std::int64_t j = 0; j < hidden(); ++j)
            x_acc_[static_cast<std::size_t>(t * hidden() + j)] = static_cast<acc_type>(x_(t, j));
      }
      return cmap(x_acc_.data(), tokens(), hidden(), Eigen::OuterStride<>(hidden()));
    }
  }
  // Rows [r0, r0 + n) of the weight shard in the accumulation type.
  cmap w_chunk(std::int64_t r0, std::int64_t n) {
    if constexpr (std::is_same_v<T, acc_type>) {
      return cmap(w_.row(r0), n, w_.cols, Eigen::OuterStride<>(w_.ld()));
    } else {
      w_acc_.resize(static_cast<std::size_t>(std::min(chunk, real_rows_) * hidden()));
      for (std::int64_t v = 0; v < n; ++v)
        for (std::int64_t j = 0; j < hidden(); ++j)
          w_acc_[static_cast<std::size_t>(v * hidden() + j)] = static_cast<acc_type>(w_(r0 + v, j));
      return cmap(w_acc_.data(), n, hidden(), Eigen::OuterStride<>(hidden()));
    }
  }
  // The logits of rows [r0, r0 + n) for every token, into the chunk buffer.
  map logits(const cmap& x, const cmap& wc, std::int64_t n) {
    chunk_.resize(static_cast<std::size_t>(tokens() * std::min(chunk, real_rows_)));
    map z(chunk_.data(), tokens(), n, Eigen::OuterStride<>(n));
    z.noalias() = x * wc.transpose();
    return z;
  }

  void s_pass_impl(matrix_view<acc_type>* a) {
    const auto n_tok = static_cast<std::size_t>(tokens());
    stats_.assign(n_tok, stats_type::empty());
    if constexpr (is_one_barrier) {
      local_max_.assign(n_tok, acc_type(0));
      for (std::int64_t t = 0; t < tokens(); ++t)
        std::fill(a->row(t), a->row(t) + hidden(), acc_type(0));
    }
    if (real_rows_ > 0 && tokens() > 0) {
      const cmap x = x_acc();
      for (std::int64_t r0 = 0; r0 < real_rows_; r0 += chunk) {
        const std::int64_t n = std::min(chunk, real_rows_ - r0);
        const cmap wc = w_chunk(r0, n);
        map z = logits(x, wc, n);
        for (std::int64_t t = 0; t < tokens(); ++t) {
          stats_type& s = stats_[static_cast<std::size_t>(t)];
          acc_type* row = &z(t, 0);
          s.target += gather_target(row, r0, n, local_target_[static_cast<std::size_t>(t)]);
          acc_type sum = 0;
          for (std::int64_t j = 0; j < n; ++j) sum += row[j];
          s.logit_sum += sum;
          if constexpr (is_one_barrier) {
            softmax_stats<acc_type> run = s.softmax();
            const acc_type scale = online_softmax_chunk(row, n, run);
            s.max = run.max;
            s.sum = run.sum;
            if (scale != acc_type(1)) {
              acc_type* ar = a->row(t);
              for (std::int64_t j = 0; j < hidden(); ++j) ar[j] *= scale;
            }
          } else {
            const softmax_stats<acc_type> m = merge(s.softmax(), row_stats(row, n));
            s.max = m.max;
            s.sum = m.sum;
          }
        }
        if constexpr (is_one_barrier) detail::as_eigen(*a).noalias() += z * wc;
      }
    }
    if constexpr (is_one_barrier)
      for (std::size_t t = 0; t < n_tok; ++t) local_max_[t] = stats_[t].max;
    if constexpr (is_naive) {
      max_buf_.resize(n_tok);
      target_buf_.resize(2 * n_tok);
      for (std::size_t t = 0; t < n_tok; ++t) {
        max_buf_[t] = stats_[t].max;
        target_buf_[t] = stats_[t].target;
        target_buf_[n_tok + t] = stats_[t].logit_sum;
      }
      sum_buf_.clear();
    }
    phase_ = phase::s_done;
  }

  void t_pass_impl(std::span<const acc_type> g, matrix_view<acc_type> grad_weight,
                   matrix_view<acc_type>* grad_x) {
    require_phase(phase::s_done, "t_pass");
    if (static_cast<std::int64_t>(g.size()) != tokens())
      fail("pipit::vocab: ", g.size(), " loss gradients for ", tokens(), " tokens");
    detail::check_view(grad_weight, shards_.shard_size(), hidden(), "the weight gradient");
    if (grad_x)
      for (std::int64_t t = 0; t < tokens(); ++t)
        std::fill(grad_x->row(t), grad_x->row(t) + hidden(), acc_type(0));
    if (real_rows_ == 0 || tokens() == 0) return;
    bool any = false;
    for (const acc_type v : g) any = any || v != acc_type(0);
    if (!any) return;  // every token ignored: all gradients are zero
    const ce_params<acc_type> p = opt_.params<acc_type>(shards_.vocab_size());
    coeffs_.resize(static_cast<std::size_t>(tokens()));
    for (std::size_t t = 0; t < coeffs_.size(); ++t)
      coeffs_[t] = token_grad_coeffs(stats_[t], g[t], p);
    const cmap x = x_acc();
    for (std::int64_t r0 = 0; r0 < real_rows_; r0 += chunk) {
      const std::int64_t n = std::min(chunk, real_rows_ - r0);
      const cmap wc = w_chunk(r0, n);
      map z = logits(x, wc, n);
      for (std::int64_t t = 0; t < tokens(); ++t)
        grad_epilogue_row(&z(t, 0), r0, n, local_target_[static_cast<std::size_t>(t)],
                          coeffs_[static_cast<std::size_t>(t)]);
      detail::as_eigen(grad_weight.block_rows(r0, n)).noalias() += z.transpose() * x;
      if (grad_x) detail::as_eigen(*grad_x).noalias() += z * wc;
    }
  }

  vocab_shards shards_;
  int rank_;
  matrix_view<const T> x_;
  matrix_view<const T> w_;
  std::span<const std::int64_t> targets_;
  loss_options opt_;
  std::int64_t real_rows_ = 0;
  phase phase_ = phase::constructed;
  std::vector<std::int64_t> local_target_;  // the target's row in this shard, or -1
  std::vector<stats_type> stats_;
  std::vector<acc_type> local_max_;   // one_barrier: the maxima the accumulator is relative to
  std::vector<acc_type> max_buf_;     // naive: maxima
  std::vector<acc_type> target_buf_;  // naive: target logits, then logit sums
  std::vector<acc_type> sum_buf_;     // naive: sums of exp against the global maximum
  std::vector<grad_coeffs<acc_type>> coeffs_;
  std::vector<acc_type> chunk_;  // tokens x Chunk logits
  std::vector<acc_type> x_acc_;  // X widened (16-bit inputs only)
  std::vector<acc_type> w_acc_;  // a weight chunk widened (16-bit inputs only)
  std::vector<acc_type> wsum_;   // label smoothing: the sum of the shard's weight rows
};

}  // namespace pipit::vocab
