#pragma once
// Host kernels whose result for a row does not depend on which other rows are computed with it,
// so that splitting a batch into nano-batches changes no bit of the output.
//
// A blocked GEMM (Eigen's, a BLAS) does not have this property: its depth blocking, its
// micro-kernel for the last rows and its GEMV path for one row depend on the number of rows, and
// each changes the order in which an output element's products are summed. Here every output
// element is summed over the inner dimension in increasing order, by the same loop for every
// row, starting from zero; row tiles only change the order in which rows are visited. (A build
// that lets the compiler contract a * b + c into an FMA in some code paths and not others, e.g.
// -ffp-contract=fast with FMA instructions enabled, could still differ between rows whose
// addresses have different alignments; the runner computes a row in place, at the same address,
// with or without nano-batching.)
//
// Layouts are row-major; weights are pre-transposed (k x n, "x * wt") so that the inner loop
// runs along an output row and vectorises without reassociating a sum.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>

#include "pipit/core/error.hpp"
#include "pipit/vocab/matrix_view.hpp"

namespace pipit::nano {

using vocab::make_view;
using vocab::matrix_view;

namespace detail {
template <class T>
inline void axpy(T* __restrict y, T a, const T* __restrict w, std::int64_t n) noexcept {
  for (std::int64_t j = 0; j < n; ++j) y[j] += a * w[j];
}
}  // namespace detail

// y = x * wt (+ bias, added after the sum): x rows x k, wt k x n, y rows x n (overwritten).
template <class T>
void rowwise_gemm(matrix_view<const T> x, matrix_view<const T> wt, std::span<const T> bias,
                  matrix_view<T> y) {
  if (x.cols != wt.rows || y.rows != x.rows || y.cols != wt.cols ||
      (!bias.empty() && static_cast<std::int64_t>(bias.size()) != wt.cols))
    fail("pipit::nano::rowwise_gemm: x ", x.rows, " x ", x.cols, ", wt ", wt.rows, " x ", wt.cols,
         ", bias ", bias.size(), ", y ", y.rows, " x ", y.cols, " do not match");
  constexpr std::int64_t tile = 4;  // rows sharing each weight row while it is in cache
  const std::int64_t n = y.cols;
  for (std::int64_t i0 = 0; i0 < x.rows; i0 += tile) {
    const std::int64_t i1 = std::min(x.rows, i0 + tile);
    for (std::int64_t i = i0; i < i1; ++i) std::fill_n(y.row(i), n, T(0));
    for (std::int64_t k = 0; k < x.cols; ++k)
      for (std::int64_t i = i0; i < i1; ++i) detail::axpy(y.row(i), x.row(i)[k], wt.row(k), n);
    if (!bias.empty())
      for (std::int64_t i = i0; i < i1; ++i) detail::axpy(y.row(i), T(1), bias.data(), n);
  }
}

// y = x / sqrt(mean(x^2) + eps) * gain, row by row (RMSNorm, Zhang and Sennrich 2019).
template <class T>
void rms_norm(matrix_view<const T> x, std::span<const T> gain, T eps, matrix_view<T> y) {
  if (y.rows != x.rows || y.cols != x.cols || static_cast<std::int64_t>(gain.size()) != x.cols)
    fail("pipit::nano::rms_norm: x ", x.rows, " x ", x.cols, ", gain ", gain.size(), ", y ", y.rows,
         " x ", y.cols, " do not match");
  for (std::int64_t i = 0; i < x.rows; ++i) {
    const T* xi = x.row(i);
    T ss = 0;
    for (std::int64_t j = 0; j < x.cols; ++j) ss += xi[j] * xi[j];
    const T inv = T(1) / std::sqrt(ss / static_cast<T>(x.cols) + eps);
    T* yi = y.row(i);
    for (std::int64_t j = 0; j < x.cols; ++j)
      yi[j] = xi[j] * inv * gain[static_cast<std::size_t>(j)];
  }
}

// y = (x - mean) / sqrt(var + eps) * gamma + beta, row by row (LayerNorm, Ba, Kiros and Hinton
// 2016; the biased variance over the row, as GPT-2 and the example model compute it).
template <class T>
void layer_norm(matrix_view<const T> x, std::span<const T> gamma, std::span<const T> beta, T eps,
                matrix_view<T> y) {
  if (y.rows != x.rows || y.cols != x.cols || static_cast<std::int64_t>(gamma.size()) != x.cols ||
      static_cast<std::int64_t>(beta.size()) != x.cols)
    fail("pipit::nano::layer_norm: x ", x.rows, " x ", x.cols, ", gamma ", gamma.size(), ", beta ",
         beta.size(), ", y ", y.rows, " x ", y.cols, " do not match");
  const T n = static_cast<T>(x.cols);
  for (std::int64_t i = 0; i < x.rows; ++i) {
    const T* xi = x.row(i);
    T sum = 0;
    for (std::int64_t j = 0; j < x.cols; ++j) sum += xi[j];
    const T mean = sum / n;
    T ss = 0;
    for (std::int64_t j = 0; j < x.cols; ++j) ss += (xi[j] - mean) * (xi[j] - mean);
    const T inv = T(1) / std::sqrt(ss / n + eps);
    T* yi = y.row(i);
    for (std::int64_t j = 0; j < x.cols; ++j)
      yi[j] = (xi[j] - mean) * inv * gamma[static_cast<std::size_t>(j)] +
              beta[static_cast<std::size_t>(j)];
  }
}

// GELU, tanh form (Hendrycks and Gimpel, arXiv 1606.08415), in place.
template <class T>
void gelu_in_place(matrix_view<T> x) {
  const T c = static_cast<T>(0.7978845608028654);  // sqrt(2 / pi)
  for (std::int64_t i = 0; i < x.rows; ++i) {
    T* r = x.row(i);
    for (std::int64_t j = 0; j < x.cols; ++j) {
      const T v = r[j];
      r[j] = T(0.5) * v * (T(1) + std::tanh(c * (v + T(0.044715) * v * v * v)));
    }
  }
}

// The KV cache of one layer for decode attention: for each request (row of the batch) and local
// KV head, `capacity` positions of head_dim keys and values.
template <class T>
struct kv_cache_view {
  T* k = nullptr;
  T* v = nullptr;
  std::int64_t requests = 0, kv_heads = 0, capacity = 0, head_dim = 0;
  T* key(std::int64_t r, std::int64_t g, std::int64_t pos) const noexcept {
    return k + ((r * kv_heads + g) * capacity + pos) * head_dim;
  }
  T* value(std::int64_t r, std::int64_t g, std::int64_t pos) const noexcept {
    return v + ((r * kv_heads + g) * capacity + pos) * head_dim;
  }
};

// Decode attention (one new token per request, as NanoFlow's decode GEMV): for the requests
// [first, first + q.rows), append the new key and value at position `pos` of the cache, then
// attend with each local query head over positions [0, pos] of its KV head (grouped-query:
// query head h uses KV head h / (heads / kv_heads)). q, o: rows x heads*d; k_new, v_new: rows
// x kv_heads*d; scores: scratch of >= pos + 1 elements.
template <class T>
void decode_attention(std::int64_t first, std::int64_t heads, matrix_view<const T> q,
                      matrix_view<const T> k_new, matrix_view<const T> v_new,
                      const kv_cache_view<T>& cache, std::int64_t pos, std::span<T> scores,
                      matrix_view<T> o) {
  const std::int64_t d = cache.head_dim, g_count = cache.kv_heads;
  if (heads < 1 || g_count < 1 || heads % g_count != 0 || q.cols != heads * d ||
      o.cols != heads * d || o.rows != q.rows || k_new.cols != g_count * d ||
      v_new.cols != g_count * d || k_new.rows != q.rows || v_new.rows != q.rows || first < 0 ||
      first + q.rows > cache.requests || pos < 0 || pos >= cache.capacity ||
      static_cast<std::int64_t>(scores.size()) < pos + 1)
    fail("pipit::nano::decode_attention: requests [", first, ", ", first + q.rows, ") of ",
         cache.requests, ", ", heads, " heads over ", g_count, " KV heads of dim ", d,
         ", position ", pos, " of ", cache.capacity, ", ", scores.size(),
         " score slots: shapes do not match");
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  const std::int64_t group = heads / g_count;
  for (std::int64_t i = 0; i < q.rows; ++i) {
    const std::int64_t r = first + i;
    for (std::int64_t g = 0; g < g_count; ++g) {
      std::copy_n(k_new.row(i) + g * d, d, cache.key(r, g, pos));
      std::copy_n(v_new.row(i) + g * d, d, cache.value(r, g, pos));
    }
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t g = h / group;
      const T* qh = q.row(i) + h * d;
      T m = -INFINITY;
      for (std::int64_t s = 0; s <= pos; ++s) {
        const T* ks = cache.key(r, g, s);
        T dot = 0;
        for (std::int64_t e = 0; e < d; ++e) dot += qh[e] * ks[e];
        scores[static_cast<std::size_t>(s)] = dot * scale;
        m = std::max(m, dot * scale);
      }
      T sum = 0;
      for (std::int64_t s = 0; s <= pos; ++s) {
        const T p = std::exp(scores[static_cast<std::size_t>(s)] - m);
        scores[static_cast<std::size_t>(s)] = p;
        sum += p;
      }
      T* oh = o.row(i) + h * d;
      std::fill_n(oh, d, T(0));
      for (std::int64_t s = 0; s <= pos; ++s)
        detail::axpy(oh, scores[static_cast<std::size_t>(s)] / sum, cache.value(r, g, s), d);
    }
  }
}

}  // namespace pipit::nano
