#pragma once
// cuda::output_layer<Algorithm, T, Chunk, Block>: one rank's share of the LM head + softmax
// cross-entropy sharded over the vocabulary (Yeung et al., arXiv 2411.05288), on a CUDA device.
// The same passes and semantics as the host reference vocab::output_layer (read its comment
// first); every buffer is device memory and every pass is enqueued on the layer's stream without
// synchronising the host, except fetch_loss().
//
// Chunked over the vocabulary: per chunk of Chunk shard rows, a cuBLAS GEMM writes the logits
// Z_c = X W_c^T (tokens x Chunk, fp32) into one reused buffer, and fused row kernels fold them
// into online-softmax statistics (S) or turn them into the logit gradient (T), which further
// GEMMs (fp32 accumulation, beta = 1) add into dW_c, dX or the one_barrier accumulator. The
// tokens x (V/p) logits are never held. Extra device memory: tokens x Chunk x (4 + sizeof(T)
// when T is 16-bit) bytes + O(tokens) + hidden floats (workspace_bytes()).
//
//   naive:        s_pass(); all_reduce(naive_max(), max); all_reduce(naive_target_sums(), +);
//                 naive_sum_exp(); all_reduce(that, +); naive_combine(); loss(g);
//                 t_pass(g, dW, dX_i); all_reduce or reduce(dX_i, +)            -> dX
//   two_barrier:  s_pass(); all_reduce(stats(), merge_op); loss(g);
//                 t_pass(g, dW, dX_i); all_reduce or reduce(dX_i, +)            -> dX
//   one_barrier:  s_pass(A); all_reduce(stats(), merge_op); input_grad_partial(A);
//                 all_reduce or reduce(A, +) -> D;  loss(g);  scale_rows(D, g) -> dX;
//                 t_pass(g, dW)
// The spans returned for the collectives are device memory, ready for cuda::nccl_communicator;
// order them against stream() with events (communicator::wait_for / signal).
//
// Differences from the host layer, all forced by the device:
// - targets (and loss weights) are device arrays. Invalid ones (an id outside [0, V) that is not
//   the ignore index, a negative or non-finite weight) are treated as ignored / 0 by the kernels
//   and raised as pipit::error by fetch_loss() (or check()), which name the first one.
// - loss(g, weights) only enqueues; fetch_loss() waits for the stream and returns the result.
// - T is float, __nv_bfloat16 or __half; statistics and gradients are float. For 16-bit T the
//   softmax weights P (one_barrier's S pass) and the logit gradient dZ are rounded to T before
//   their GEMMs (tensor cores need both operands in T), as Megatron-LM's fused kernels do; for
//   float every GEMM is fp32 (CUBLAS_COMPUTE_32F, no TF32).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

#include "pipit/core/error.hpp"
#include "pipit/cuda/blas_handle.cuh"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/device_buffer.cuh"
#include "pipit/cuda/entry_check.cuh"
#include "pipit/cuda/gemm.cuh"
#include "pipit/cuda/launch.cuh"
#include "pipit/cuda/output_layer_kernels.cuh"
#include "pipit/vocab/algorithms.hpp"
#include "pipit/vocab/cross_entropy.hpp"
#include "pipit/vocab/loss.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/shards.hpp"
#include "pipit/vocab/softmax_stats.hpp"

namespace pipit::cuda {

// Vocabulary rows per chunk unless chosen: at 8192 tokens a chunk's logits take 32 MiB, 1/16 of
// a 16k-row shard's, and each GEMM (8192 x 1024 x hidden) still fills an H200.
inline constexpr std::size_t default_chunk = 1024;
inline constexpr int default_block = 256;

namespace detail_vocab {
template <class T>
void check_view(const vocab::matrix_view<T>& v, std::int64_t rows, std::int64_t cols,
                const char* what) {
  if (v.rows != rows || v.cols != cols)
    fail("pipit::cuda: ", what, " is ", v.rows, " x ", v.cols, ", expected ", rows, " x ", cols);
  if (v.ld() < v.cols) fail("pipit::cuda: ", what, " has row stride ", v.ld(), " < ", v.cols);
  if (v.data == nullptr && rows * cols > 0) fail("pipit::cuda: ", what, " has no data");
}
inline void check_loss_options(const vocab::loss_options& opt) {
  if (!(opt.label_smoothing >= 0.0 && opt.label_smoothing <= 1.0))
    fail("pipit::cuda: label smoothing ", opt.label_smoothing, " is outside [0, 1]");
  if (!(opt.z_loss >= 0.0)) fail("pipit::cuda: z-loss coefficient ", opt.z_loss, " < 0");
}
}  // namespace detail_vocab

// m[t, :] *= s[t] on the device (Algorithm 2's dX = g (.) D); s has m.rows entries.
template <int Block = default_block>
void scale_rows(vocab::matrix_view<float> m, std::span<const float> s, cudaStream_t stream) {
  if (static_cast<std::int64_t>(s.size()) != m.rows)
    fail("pipit::cuda::scale_rows: ", s.size(), " scales for ", m.rows, " rows");
  if (m.rows == 0 || m.cols == 0) return;
  detail_vocab::scale_rows<Block>
      <<<row_blocks(m.rows), Block, 0, stream>>>(m.data, m.ld(), m.cols, s.data());
  PIPIT_CUDA_CHECK(cudaGetLastError());
}

template <vocab::output_algorithm Algorithm, gemm_input T, std::size_t Chunk = default_chunk,
          int Block = default_block>
class output_layer {
  static_assert(Chunk > 0, "pipit::cuda::output_layer: Chunk must be at least 1");
  static_assert(valid_block_size<Block>,
                "pipit::cuda::output_layer: Block must be a multiple of 32 in [32, 1024]");
  static constexpr bool is_naive = std::is_same_v<Algorithm, vocab::naive>;
  static constexpr bool is_one_barrier = std::is_same_v<Algorithm, vocab::one_barrier>;
  // The GEMM operand that holds P / dZ: a separate T buffer for 16-bit T, the logits buffer
  // itself (in place) for float.
  static constexpr bool separate_operand = !std::is_same_v<T, float>;

 public:
  using value_type = T;
  using acc_type = float;
  using stats_type = vocab::token_stats<float>;
  static constexpr std::int64_t chunk = static_cast<std::int64_t>(Chunk);

  // Device bytes a layer allocates for `tokens` tokens, `hidden` features and `real_rows` real
  // shard rows, with or without label smoothing (one_barrier's column sums): its whole extra
  // memory, inputs and outputs excluded (the stream-ordered allocator may round up).
  static constexpr std::size_t workspace_bytes(std::int64_t tokens, std::int64_t hidden,
                                               std::int64_t real_rows, bool smoothing) {
    const auto n = static_cast<std::size_t>(tokens);
    const auto c = static_cast<std::size_t>(std::min(chunk, real_rows));
    std::size_t b = n * c * sizeof(float);                     // logits chunk
    if (separate_operand) b += n * c * sizeof(T);              // P / dZ in T
    b += n * (sizeof(std::int64_t) + sizeof(stats_type));      // local targets, statistics
    b += n * sizeof(vocab::grad_coeffs<float>);                // T-pass coefficients
    b += 4 * sizeof(double) + 4 * sizeof(unsigned long long);  // loss result, two checks
    if (is_one_barrier) b += 2 * n * sizeof(float);            // local maxima, row scales
    if (is_one_barrier && smoothing) b += static_cast<std::size_t>(hidden) * sizeof(float);
    if (is_naive) b += 4 * n * sizeof(float);  // max, target/logit sums, sum exp
    return b;
  }

  // x: tokens x hidden (device), the same on every rank; weight: this rank's shard,
  // shard_size() x hidden (device; padding rows are never read); targets: one global id per
  // token or opt.ignore_index (device). The views and `blas` must outlive the layer; every pass
  // is enqueued on `stream`. Shapes and options are checked here, before any device call.
  output_layer(const blas_handle& blas, cudaStream_t stream, const vocab::vocab_shards& shards,
               int rank, vocab::matrix_view<const T> x, vocab::matrix_view<const T> weight,
               std::span<const std::int64_t> targets, const vocab::loss_options& opt = {})
      : blas_(&blas),
        stream_(stream),
        shards_(shards),
        rank_(rank),
        x_(x),
        w_(weight),
        targets_(targets),
        opt_(opt) {
    shards.check_rank(rank);
    detail_vocab::check_view(x, static_cast<std::int64_t>(targets.size()), x.cols, "the input X");
    detail_vocab::check_view(weight, shards.shard_size(), x.cols, "the weight shard");
    detail_vocab::check_loss_options(opt);
    (void)row_blocks(tokens());
    const auto real = shards.real_range_of(rank);
    real_begin_ = real.begin;
    real_rows_ = real.size();
    allocate();
  }

  std::int64_t tokens() const noexcept { return x_.rows; }
  std::int64_t hidden() const noexcept { return x_.cols; }
  int rank() const noexcept { return rank_; }
  const vocab::vocab_shards& shards() const noexcept { return shards_; }
  cudaStream_t stream() const noexcept { return stream_; }
  std::size_t workspace_bytes() const noexcept {
    return workspace_bytes(tokens(), hidden(), real_rows_, opt_.label_smoothing != 0.0);
  }

  // ---- S pass --------------------------------------------------------------------------------
  void s_pass() requires(!is_one_barrier) { s_pass_impl(nullptr); }
  // a (tokens x hidden, overwritten) = sum_v exp(z_v - m_local) w_v over the shard.
  void s_pass(vocab::matrix_view<float> a) requires is_one_barrier {
    detail_vocab::check_view(a, tokens(), hidden(), "the S-pass accumulator");
    s_pass_impl(&a);
  }

  // Per-token statistics (device): this shard's after s_pass; merged in place by an all-reduce
  // with vocab::merge_op (two_barrier, one_barrier) or by the naive steps, the global ones.
  std::span<stats_type> stats() noexcept { return stats_.span(); }

  // ---- naive's separate reductions (after s_pass, in this order) ------------------------------
  std::span<float> naive_max() requires is_naive {
    require_s("naive_max");
    return {max_buf_.data(), n_tok()};
  }
  std::span<float> naive_target_sums() requires is_naive {
    require_s("naive_target_sums");
    return {target_buf_.data(), 2 * n_tok()};
  }
  // After the max is reduced (ordered before this call on stream()): enqueues the local sums of
  // exp(z - global max); all-reduce the returned span with plus.
  std::span<float> naive_sum_exp() requires is_naive {
    require_s("naive_sum_exp");
    if (tokens() > 0) {
      detail_vocab::naive_sum_exp<<<stride_blocks<Block>(tokens()), Block, 0, stream_>>>(
          stats_.data(), tokens(), max_buf_.data(), sum_buf_.data());
      PIPIT_CUDA_CHECK(cudaGetLastError());
    }
    sum_ready_ = true;
    return {sum_buf_.data(), n_tok()};
  }
  void naive_combine() requires is_naive {
    require_s("naive_combine");
    if (!sum_ready_) fail("pipit::cuda::output_layer: naive_combine before naive_sum_exp");
    if (tokens() > 0) {
      detail_vocab::naive_combine<<<stride_blocks<Block>(tokens()), Block, 0, stream_>>>(
          stats_.data(), tokens(), max_buf_.data(), sum_buf_.data(), target_buf_.data());
      PIPIT_CUDA_CHECK(cudaGetLastError());
    }
  }

  // ---- loss (on merged statistics) -----------------------------------------------------------
  // Enqueues the reduced loss and g (device, one per token); weights: empty or one loss weight
  // per token (device). fetch_loss() returns the result.
  void loss(std::span<float> g, std::span<const float> weights = {}) {
    require_s("loss");
    if (g.size() != n_tok())
      fail("pipit::cuda::output_layer: ", g.size(), " loss gradients for ", tokens(), " tokens");
    if (!weights.empty() && weights.size() != n_tok())
      fail("pipit::cuda: ", weights.size(), " loss weights for ", tokens(), " tokens");
    weights_ = weights;
    weight_check_.reset();
    detail_vocab::loss_kernel<Block><<<1, Block, 0, stream_>>>(
        stats_.data(), targets_.data(), weights.empty() ? nullptr : weights.data(), tokens(),
        shards_.vocab_size(), opt_.ignore_index, params(), opt_.reduce == vocab::reduction::mean,
        opt_.grad_output, g.data(), loss_out_.data(), weight_check_.ref());
    PIPIT_CUDA_CHECK(cudaGetLastError());
    loss_enqueued_ = true;
  }
  // Waits for the stream; the loss of the last loss() call. Raises for invalid targets/weights.
  vocab::loss_result<float> fetch_loss() {
    if (!loss_enqueued_) fail("pipit::cuda::output_layer: fetch_loss before loss");
    double h[4] = {0, 0, 0, 0};
    PIPIT_CUDA_CHECK(
        cudaMemcpyAsync(h, loss_out_.data(), sizeof h, cudaMemcpyDeviceToHost, stream_));
    check();
    weight_check_.raise_if_bad_weights(weights_);
    return {static_cast<float>(h[0]), static_cast<float>(h[1]), static_cast<float>(h[2]),
            static_cast<std::int64_t>(h[3])};
  }
  // Waits for the stream; raises pipit::error if a target was outside the vocabulary.
  void check() const { target_check_.raise_if_bad_ids(targets_, shards_.vocab_size(), "targets"); }

  // ---- one_barrier: after the statistics merge ----------------------------------------------
  void input_grad_partial(vocab::matrix_view<float> a) requires is_one_barrier {
    require_s("input_grad_partial");
    detail_vocab::check_view(a, tokens(), hidden(), "the S-pass accumulator");
    if (tokens() == 0 || hidden() == 0) return;
    const bool smoothing = opt_.label_smoothing != 0.0;
    if (smoothing) {
      detail_vocab::column_sums<T><<<stride_blocks<Block>(hidden()), Block, 0, stream_>>>(
          w_.data, w_.ld(), real_rows_, hidden(), w_sum_.data());
      PIPIT_CUDA_CHECK(cudaGetLastError());
    }
    detail_vocab::input_grad_partial<Block, T><<<row_blocks(tokens()), Block, 0, stream_>>>(
        a.data, a.ld(), hidden(), stats_.data(), local_max_.data(), local_target_.data(), w_.data,
        w_.ld(), smoothing ? w_sum_.data() : nullptr, params());
    PIPIT_CUDA_CHECK(cudaGetLastError());
  }

  // ---- T pass --------------------------------------------------------------------------------
  // one_barrier: grad_weight (fp32, device) += dZ^T X over the real rows.
  void t_pass(std::span<const float> g,
              vocab::matrix_view<float> grad_weight) requires is_one_barrier {
    t_pass_impl(g, grad_weight, nullptr);
  }
  // naive, two_barrier: also grad_x (tokens x hidden, overwritten) = this shard's dZ W.
  void t_pass(std::span<const float> g, vocab::matrix_view<float> grad_weight,
              vocab::matrix_view<float> grad_x) requires(!is_one_barrier) {
    detail_vocab::check_view(grad_x, tokens(), hidden(), "the input gradient");
    t_pass_impl(g, grad_weight, &grad_x);
  }

 private:
  std::size_t n_tok() const noexcept { return static_cast<std::size_t>(tokens()); }
  vocab::ce_params<float> params() const { return opt_.params<float>(shards_.vocab_size()); }
  void require_s(const char* what) const {
    if (!s_done_) fail("pipit::cuda::output_layer: ", what, " called before the S pass");
  }

  void allocate() {
    const std::size_t n = n_tok();
    const auto c = static_cast<std::size_t>(std::min(chunk, real_rows_));
    logits_ = device_buffer<float>(n * c, stream_);
    if constexpr (separate_operand) operand_ = device_buffer<T>(n * c, stream_);
    local_target_ = device_buffer<std::int64_t>(n, stream_);
    stats_ = device_buffer<stats_type>(n, stream_);
    coeffs_ = device_buffer<vocab::grad_coeffs<float>>(n, stream_);
    loss_out_ = device_buffer<double>(4, stream_);
    target_check_ = entry_check(stream_);
    weight_check_ = entry_check(stream_);
    if constexpr (is_one_barrier) {
      local_max_ = device_buffer<float>(n, stream_);
      row_scale_ = device_buffer<float>(n, stream_);
      if (opt_.label_smoothing != 0.0)
        w_sum_ = device_buffer<float>(static_cast<std::size_t>(hidden()), stream_);
    }
    if constexpr (is_naive) {
      max_buf_ = device_buffer<float>(n, stream_);
      target_buf_ = device_buffer<float>(2 * n, stream_);
      sum_buf_ = device_buffer<float>(n, stream_);
    }
  }

  // The operand buffer P / dZ of a chunk of n rows.
  auto* operand() {
    if constexpr (separate_operand)
      return operand_.data();
    else
      return logits_.data();
  }

  // Z_c = X W[r0, r0 + n)^T into the logits buffer (tokens x n, row stride n).
  void logits(std::int64_t r0, std::int64_t n) {
    gemm_abt<T>(*blas_, stream_, tokens(), n, hidden(), x_.data, x_.ld(), w_.row(r0), w_.ld(), 0.f,
                logits_.data(), n);
  }

  void s_pass_impl(vocab::matrix_view<float>* a) {
    const std::int64_t T_ = tokens();
    target_check_.reset();
    if (T_ > 0) {
      detail_vocab::prepare_targets<<<stride_blocks<Block>(T_), Block, 0, stream_>>>(
          targets_.data(), T_, opt_.ignore_index, shards_.vocab_size(), real_begin_,
          real_begin_ + real_rows_, local_target_.data(), stats_.data(), target_check_.ref());
      PIPIT_CUDA_CHECK(cudaGetLastError());
    }
    if constexpr (is_one_barrier) {
      // The first chunk's GEMM overwrites A (beta 0); with no chunk at all, A is zeroed here.
      if ((real_rows_ == 0 || hidden() == 0) && T_ > 0 && a->cols > 0) {
        detail_vocab::zero_rows<Block>
            <<<row_blocks(T_), Block, 0, stream_>>>(a->data, a->ld(), a->cols);
        PIPIT_CUDA_CHECK(cudaGetLastError());
      }
    }
    if (T_ > 0) {
      for (std::int64_t r0 = 0; r0 < real_rows_; r0 += chunk) {
        const std::int64_t n = std::min(chunk, real_rows_ - r0);
        logits(r0, n);
        if constexpr (is_one_barrier) {
          detail_vocab::chunk_softmax_weights<Block, T>
              <<<row_blocks(T_), Block, 0, stream_>>>(logits_.data(), n, r0, local_target_.data(),
                                                      stats_.data(), operand(), row_scale_.data());
          PIPIT_CUDA_CHECK(cudaGetLastError());
          if (r0 > 0 && hidden() > 0) {  // rows whose maximum grew are rescaled first
            detail_vocab::rescale_rows<Block><<<row_blocks(T_), Block, 0, stream_>>>(
                a->data, a->ld(), hidden(), row_scale_.data());
            PIPIT_CUDA_CHECK(cudaGetLastError());
          }
          gemm_ab<T>(*blas_, stream_, T_, hidden(), n, operand(), n, w_.row(r0), w_.ld(),
                     r0 == 0 ? 0.f : 1.f, a->data, a->ld());
        } else {
          detail_vocab::chunk_stats<Block><<<row_blocks(T_), Block, 0, stream_>>>(
              logits_.data(), n, r0, local_target_.data(), stats_.data());
          PIPIT_CUDA_CHECK(cudaGetLastError());
        }
      }
      if constexpr (is_one_barrier) {
        detail_vocab::copy_max<<<stride_blocks<Block>(T_), Block, 0, stream_>>>(stats_.data(), T_,
                                                                                local_max_.data());
        PIPIT_CUDA_CHECK(cudaGetLastError());
      }
      if constexpr (is_naive) {
        detail_vocab::naive_split<<<stride_blocks<Block>(T_), Block, 0, stream_>>>(
            stats_.data(), T_, max_buf_.data(), target_buf_.data());
        PIPIT_CUDA_CHECK(cudaGetLastError());
      }
    }
    sum_ready_ = false;
    loss_enqueued_ = false;
    s_done_ = true;
  }

  void t_pass_impl(std::span<const float> g, vocab::matrix_view<float> grad_weight,
                   vocab::matrix_view<float>* grad_x) {
    require_s("t_pass");
    if (g.size() != n_tok())
      fail("pipit::cuda::output_layer: ", g.size(), " loss gradients for ", tokens(), " tokens");
    detail_vocab::check_view(grad_weight, shards_.shard_size(), hidden(), "the weight gradient");
    const std::int64_t T_ = tokens();
    if (T_ == 0) return;
    if (grad_x && (real_rows_ == 0 || hidden() == 0) && grad_x->cols > 0) {
      detail_vocab::zero_rows<Block>
          <<<row_blocks(T_), Block, 0, stream_>>>(grad_x->data, grad_x->ld(), grad_x->cols);
      PIPIT_CUDA_CHECK(cudaGetLastError());
    }
    if (real_rows_ == 0) return;
    detail_vocab::grad_coeffs_kernel<<<stride_blocks<Block>(T_), Block, 0, stream_>>>(
        stats_.data(), g.data(), T_, params(), coeffs_.data());
    PIPIT_CUDA_CHECK(cudaGetLastError());
    for (std::int64_t r0 = 0; r0 < real_rows_; r0 += chunk) {
      const std::int64_t n = std::min(chunk, real_rows_ - r0);
      logits(r0, n);
      detail_vocab::grad_epilogue<Block, T><<<row_blocks(T_), Block, 0, stream_>>>(
          logits_.data(), n, r0, local_target_.data(), coeffs_.data(), operand());
      PIPIT_CUDA_CHECK(cudaGetLastError());
      // dW[r0, r0 + n) += dZ^T X
      gemm_atb<T>(*blas_, stream_, n, hidden(), T_, operand(), n, x_.data, x_.ld(), 1.f,
                  grad_weight.row(r0), grad_weight.ld());
      // dX = sum over chunks of dZ W_c (the first chunk overwrites)
      if (grad_x)
        gemm_ab<T>(*blas_, stream_, T_, hidden(), n, operand(), n, w_.row(r0), w_.ld(),
                   r0 == 0 ? 0.f : 1.f, grad_x->data, grad_x->ld());
    }
  }

  const blas_handle* blas_;
  cudaStream_t stream_;
  vocab::vocab_shards shards_;
  int rank_;
  vocab::matrix_view<const T> x_;
  vocab::matrix_view<const T> w_;
  std::span<const std::int64_t> targets_;
  vocab::loss_options opt_;
  std::int64_t real_begin_ = 0;
  std::int64_t real_rows_ = 0;
  bool s_done_ = false;
  bool sum_ready_ = false;
  bool loss_enqueued_ = false;
  std::span<const float> weights_;
  device_buffer<float> logits_;  // tokens x min(Chunk, real rows)
  device_buffer<T> operand_;     // P / dZ in T (16-bit T only)
  device_buffer<std::int64_t> local_target_;
  device_buffer<stats_type> stats_;
  device_buffer<vocab::grad_coeffs<float>> coeffs_;
  device_buffer<double> loss_out_;
  entry_check target_check_;
  entry_check weight_check_;
  device_buffer<float> local_max_;  // one_barrier: the maxima the accumulator is relative to
  device_buffer<float> row_scale_;  // one_barrier: per-chunk rescale factors
  device_buffer<float> w_sum_;      // one_barrier with label smoothing: column sums of W
  device_buffer<float> max_buf_, target_buf_, sum_buf_;  // naive
};

}  // namespace pipit::cuda
