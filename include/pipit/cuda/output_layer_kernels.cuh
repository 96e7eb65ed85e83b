#pragma once
// The kernels of cuda::output_layer (output_layer.cuh). Each applies the PIPIT_HOST_DEVICE
// building blocks of pipit/vocab (accumulate, merge, gather_target, token_loss,
// token_grad_coeffs, grad_epilogue_row, local_softmax_weight) that the host layer applies, so
// the two paths share their numerics; only the loops are parallel here. Row kernels run one
// block of Block threads per token; block reductions are CUB's, whose order is fixed, so every
// result is deterministic run to run.

#include <cuda_runtime.h>
#include <cub/block/block_reduce.cuh>

#include <cstdint>
#include <limits>

#include "pipit/cuda/entry_check.cuh"
#include "pipit/vocab/cross_entropy.hpp"
#include "pipit/vocab/loss.hpp"
#include "pipit/vocab/shards.hpp"
#include "pipit/vocab/softmax_stats.hpp"

namespace pipit::cuda::detail_vocab {

using stats_t = vocab::token_stats<float>;
using softmax_t = vocab::softmax_stats<float>;
using coeffs_t = vocab::grad_coeffs<float>;

struct plus_op {
  template <class V>
  __device__ V operator()(const V& a, const V& b) const {
    return a + b;
  }
};

template <class T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <class T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

// Per token: stats := empty; local_target := the target's row in this shard or -1. Targets that
// are neither the ignore index nor in [0, V) are reported and then treated as ignored.
__global__ void prepare_targets(const std::int64_t* targets, std::int64_t tokens,
                                std::int64_t ignore_index, std::int64_t vocab_size,
                                std::int64_t begin, std::int64_t end, std::int64_t* local_target,
                                stats_t* stats, entry_check_ref check) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       t < tokens; t += stride) {
    const std::int64_t y = targets[t];
    std::int64_t lt = -1;
    if (y != ignore_index) {
      if (y < 0 || y >= vocab_size)
        check.report(t);
      else
        lt = vocab::owned_row(y, begin, end);
    }
    local_target[t] = lt;
    stats[t] = stats_t::empty();
  }
}

// Folds the logits z (tokens x n, row stride n) of rows [r0, r0 + n) into stats: the
// naive / two_barrier S pass.
template <int Block>
__global__ void __launch_bounds__(Block)
    chunk_stats(const float* z, std::int64_t n, std::int64_t r0, const std::int64_t* local_target,
                stats_t* stats) {
  using reduce_stats = cub::BlockReduce<softmax_t, Block>;
  using reduce_sum = cub::BlockReduce<float, Block>;
  __shared__ typename reduce_stats::TempStorage tmp_stats;
  __shared__ typename reduce_sum::TempStorage tmp_sum;
  const std::int64_t t = blockIdx.x;
  const float* row = z + t * n;
  softmax_t mine = softmax_t::empty();
  float sum = 0.f;
  for (std::int64_t j = threadIdx.x; j < n; j += Block) {
    const float v = row[j];
    vocab::accumulate(mine, v);
    sum += v;
  }
  const softmax_t chunk = reduce_stats(tmp_stats).Reduce(mine, vocab::merge_op{});
  const float chunk_sum = reduce_sum(tmp_sum).Reduce(sum, plus_op{});
  if (threadIdx.x == 0) {
    stats_t s = stats[t];
    const softmax_t m = vocab::merge(s.softmax(), chunk);
    s.max = m.max;
    s.sum = m.sum;
    s.target += vocab::gather_target(row, r0, n, local_target[t]);
    s.logit_sum += chunk_sum;
    stats[t] = s;
  }
}

// one_barrier's S pass on one chunk: merges the chunk into the running statistics, writes
// p = exp(z - new max) (as P, tokens x n) for the accumulator GEMM and the factor
// exp(old max - new max) by which the accumulator row must be rescaled first (1: unchanged).
// The same step as vocab::online_softmax_chunk, with the chunk's statistics reduced by merge.
template <int Block, class P>
__global__ void __launch_bounds__(Block)
    chunk_softmax_weights(const float* z, std::int64_t n, std::int64_t r0,
                          const std::int64_t* local_target, stats_t* stats, P* p,
                          float* row_scale) {
  using reduce_stats = cub::BlockReduce<softmax_t, Block>;
  using reduce_sum = cub::BlockReduce<float, Block>;
  __shared__ typename reduce_stats::TempStorage tmp_stats;
  __shared__ typename reduce_sum::TempStorage tmp_sum;
  __shared__ float new_max;
  const std::int64_t t = blockIdx.x;
  const float* row = z + t * n;
  softmax_t mine = softmax_t::empty();
  float sum = 0.f;
  for (std::int64_t j = threadIdx.x; j < n; j += Block) {
    const float v = row[j];
    vocab::accumulate(mine, v);
    sum += v;
  }
  const softmax_t chunk = reduce_stats(tmp_stats).Reduce(mine, vocab::merge_op{});
  const float chunk_sum = reduce_sum(tmp_sum).Reduce(sum, plus_op{});
  if (threadIdx.x == 0) {
    stats_t s = stats[t];
    const softmax_t m = vocab::merge(s.softmax(), chunk);
    row_scale[t] = (m.max == s.max) ? 1.f : ::expf(s.max - m.max);  // exp(-inf) = 0
    s.max = m.max;
    s.sum = m.sum;
    s.target += vocab::gather_target(row, r0, n, local_target[t]);
    s.logit_sum += chunk_sum;
    stats[t] = s;
    new_max = m.max;
  }
  __syncthreads();
  const float mx = new_max;
  const bool none = mx == -std::numeric_limits<float>::infinity();
  P* prow = p + t * n;
  for (std::int64_t j = threadIdx.x; j < n; j += Block)
    prow[j] = from_float<P>(none ? 0.f : ::expf(row[j] - mx));
}

// a[t, :] *= row_scale[t] where the scale is not 1 (rows whose maximum grew).
template <int Block>
__global__ void __launch_bounds__(Block)
    rescale_rows(float* a, std::int64_t lda, std::int64_t cols, const float* row_scale) {
  const std::int64_t t = blockIdx.x;
  const float s = row_scale[t];
  if (s == 1.f) return;
  float* r = a + t * lda;
  for (std::int64_t j = threadIdx.x; j < cols; j += Block) r[j] *= s;
}

// m[t, :] *= s[t] for every row.
template <int Block>
__global__ void __launch_bounds__(Block)
    scale_rows(float* m, std::int64_t ld, std::int64_t cols, const float* s) {
  const std::int64_t t = blockIdx.x;
  const float f = s[t];
  float* r = m + t * ld;
  for (std::int64_t j = threadIdx.x; j < cols; j += Block) r[j] *= f;
}

// m[t, :] = 0 for every row (strided views, so not one memset).
template <int Block>
__global__ void __launch_bounds__(Block) zero_rows(float* m, std::int64_t ld, std::int64_t cols) {
  float* r = m + static_cast<std::int64_t>(blockIdx.x) * ld;
  for (std::int64_t j = threadIdx.x; j < cols; j += Block) r[j] = 0.f;
}

__global__ void copy_max(const stats_t* stats, std::int64_t tokens, float* out) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       t < tokens; t += stride)
    out[t] = stats[t].max;
}

// naive: the three reduction buffers from the local statistics.
__global__ void naive_split(const stats_t* stats, std::int64_t tokens, float* max_buf,
                            float* target_buf) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       t < tokens; t += stride) {
    max_buf[t] = stats[t].max;
    target_buf[t] = stats[t].target;
    target_buf[tokens + t] = stats[t].logit_sum;
  }
}
__global__ void naive_sum_exp(const stats_t* stats, std::int64_t tokens, const float* max_buf,
                              float* sum_buf) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       t < tokens; t += stride) {
    const stats_t s = stats[t];
    sum_buf[t] =
        s.max == -std::numeric_limits<float>::infinity() ? 0.f : s.sum * ::expf(s.max - max_buf[t]);
  }
}
__global__ void naive_combine(stats_t* stats, std::int64_t tokens, const float* max_buf,
                              const float* sum_buf, const float* target_buf) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       t < tokens; t += stride)
    stats[t] = {max_buf[t], sum_buf[t], target_buf[t], target_buf[tokens + t]};
}

// The loss and g from merged statistics: vocab::loss_forward in one block (sums in double, in a
// fixed order). out: {loss, z_loss, weight, tokens}. Invalid weights are reported and count as 0.
struct loss_sums {
  double total, z_total, weight, tokens;
  __device__ loss_sums operator+(const loss_sums& o) const {
    return {total + o.total, z_total + o.z_total, weight + o.weight, tokens + o.tokens};
  }
};

template <int Block>
__global__ void __launch_bounds__(Block)
    loss_kernel(const stats_t* stats, const std::int64_t* targets, const float* weights,
                std::int64_t tokens, std::int64_t vocab_size, std::int64_t ignore_index,
                vocab::ce_params<float> p, bool mean, double grad_output, float* g, double* out,
                entry_check_ref weight_check) {
  using reduce = cub::BlockReduce<loss_sums, Block>;
  __shared__ typename reduce::TempStorage tmp;
  __shared__ double scale_sh;
  const auto valid_target = [&](std::int64_t y) {
    return y != ignore_index && y >= 0 && y < vocab_size;
  };
  const auto weight_of = [&](std::int64_t t) -> double {
    if (weights == nullptr) return 1.0;
    const float w = weights[t];
    return (w >= 0.f && isfinite(w)) ? static_cast<double>(w) : 0.0;
  };
  loss_sums mine{0, 0, 0, 0};
  for (std::int64_t t = threadIdx.x; t < tokens; t += Block) {
    if (weights != nullptr && !(weights[t] >= 0.f && isfinite(weights[t]))) weight_check.report(t);
    const double w = weight_of(t);
    if (!valid_target(targets[t]) || w == 0.0) continue;
    mine.total += w * static_cast<double>(vocab::token_loss(stats[t], p));
    mine.z_total += w * static_cast<double>(vocab::token_z_loss(stats[t], p));
    mine.weight += w;
    mine.tokens += 1.0;
  }
  const loss_sums all = reduce(tmp).Reduce(mine, plus_op{});
  if (threadIdx.x == 0) {
    const double denom = mean ? all.weight : 1.0;
    const double scale = denom > 0.0 ? 1.0 / denom : 0.0;
    scale_sh = scale;
    out[0] = all.total * scale;
    out[1] = all.z_total * scale;
    out[2] = all.weight;
    out[3] = all.tokens;
  }
  __syncthreads();
  const double scale = scale_sh;
  for (std::int64_t t = threadIdx.x; t < tokens; t += Block)
    g[t] = valid_target(targets[t]) ? static_cast<float>(grad_output * weight_of(t) * scale) : 0.f;
}

// Per-token gradient coefficients from merged statistics and g.
__global__ void grad_coeffs_kernel(const stats_t* stats, const float* g, std::int64_t tokens,
                                   vocab::ce_params<float> p, coeffs_t* out) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       t < tokens; t += stride)
    out[t] = vocab::token_grad_coeffs(stats[t], g[t], p);
}

// The T pass's epilogue on one chunk: dz = g dloss/dz (grad_epilogue_row element by element),
// written as D (the GEMM operand type; in place when D is float and dz == z).
template <int Block, class D>
__global__ void __launch_bounds__(Block)
    grad_epilogue(const float* z, std::int64_t n, std::int64_t r0, const std::int64_t* local_target,
                  const coeffs_t* coeffs, D* dz) {
  const std::int64_t t = blockIdx.x;
  const coeffs_t c = coeffs[t];
  const std::int64_t lt = local_target[t];
  const float* row = z + t * n;
  D* out = dz + t * n;
  for (std::int64_t j = threadIdx.x; j < n; j += Block) {
    float v = row[j];
    vocab::grad_epilogue_row(&v, r0 + j, 1, lt, c);
    out[j] = from_float<D>(v);
  }
}

// w_sum[j] = sum over the real rows of w[:, j], in row order (one thread per column).
template <class T>
__global__ void column_sums(const T* w, std::int64_t ldw, std::int64_t rows, std::int64_t cols,
                            float* w_sum) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols;
       j += stride) {
    float s = 0.f;
    for (std::int64_t v = 0; v < rows; ++v) s += to_float(w[v * ldw + j]);
    w_sum[j] = s;
  }
}

// one_barrier after the merge: a <- f a - (1 - eps) w_target - (eps / V) w_sum with
// f = (1 + 2 lambda lse) exp(m_local - lse) (the host's input_grad_partial, row by row).
template <int Block, class T>
__global__ void __launch_bounds__(Block)
    input_grad_partial(float* a, std::int64_t lda, std::int64_t cols, const stats_t* stats,
                       const float* local_max, const std::int64_t* local_target, const T* w,
                       std::int64_t ldw, const float* w_sum, vocab::ce_params<float> p) {
  const std::int64_t t = blockIdx.x;
  const coeffs_t c = vocab::token_grad_coeffs(stats[t], 1.f, p);
  const float f = vocab::local_softmax_weight(local_max[t], c);
  const std::int64_t lt = local_target[t];
  const T* wt = lt >= 0 ? w + lt * ldw : nullptr;
  float* r = a + t * lda;
  for (std::int64_t j = threadIdx.x; j < cols; j += Block) {
    float v = r[j] * f;
    if (wt) v -= c.target_scale * to_float(wt[j]);
    if (w_sum) v -= c.uniform * w_sum[j];
    r[j] = v;
  }
}

}  // namespace pipit::cuda::detail_vocab
