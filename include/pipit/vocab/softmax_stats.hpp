#pragma once
// Online-softmax statistics and their merge operator.
//
// softmax_stats {max, sum} summarises a set of logits z as m = max z and s = sum exp(z - m).
// Two summaries merge as (m, s) (+) (m', s') = (M, s e^(m - M) + s' e^(m' - M)), M = max(m, m')
// (Milakov and Gimelshein, "Online normalizer calculation for softmax", arXiv 1805.02867; the
// vocabulary-parallel form is section 3.2 of Yeung et al., arXiv 2411.05288). The operator is
// associative (up to rounding) and exactly commutative; the empty set {-inf, 0} is its identity,
// and merging two empty sets gives the empty set without evaluating exp(-inf - -inf) = NaN.
//
// token_stats adds what the cross-entropy loss needs besides the normaliser: the target logit
// (contributed by the one shard that owns the target, 0 elsewhere) and the sum of all logits
// (for label smoothing). merge_op merges both structs, so one all-reduce with merge_op replaces
// the separate MAX / SUM / SUM all-reduces of Megatron's vocabulary-parallel cross-entropy:
//     comm.all_reduce(std::span<token_stats<float>>(stats), merge_op{});
//
// Everything here is PIPIT_HOST_DEVICE over plain values and pointers: the CUDA kernels use the
// same functions as the host path.

#include <cmath>
#include <cstdint>
#include <limits>

#include "pipit/core/config.hpp"

namespace pipit::vocab {

template <class T>
struct softmax_stats {
  T max;  // max of the logits seen; -inf when none
  T sum;  // sum of exp(z - max) over the logits seen; 0 when none

  PIPIT_HOST_DEVICE static constexpr softmax_stats empty() noexcept {
    return {-std::numeric_limits<T>::infinity(), T(0)};
  }
  // log sum exp of the logits seen (-inf when none).
  PIPIT_HOST_DEVICE T log_sum_exp() const { return max + std::log(sum); }
};

// Per-token statistics of the sharded cross-entropy. Plain and trivially copyable, so that a
// communicator can all-reduce a span of them.
template <class T>
struct token_stats {
  T max;        // as softmax_stats
  T sum;        // as softmax_stats
  T target;     // logit of the token's target (summed: only the owning shard has it non-zero)
  T logit_sum;  // sum of the logits over the real vocabulary (summed)

  PIPIT_HOST_DEVICE static constexpr token_stats empty() noexcept {
    return {-std::numeric_limits<T>::infinity(), T(0), T(0), T(0)};
  }
  PIPIT_HOST_DEVICE constexpr softmax_stats<T> softmax() const noexcept { return {max, sum}; }
  PIPIT_HOST_DEVICE T log_sum_exp() const { return max + std::log(sum); }
};

// (m, s) (+) (m', s'). Only the smaller maximum's sum is rescaled, so the larger side is exact,
// and the result does not depend on the order of the operands.
template <class T>
PIPIT_HOST_DEVICE softmax_stats<T> merge(const softmax_stats<T>& a, const softmax_stats<T>& b) {
  if (b.max > a.max) return {b.max, b.sum + a.sum * std::exp(a.max - b.max)};
  if (a.max > b.max) return {a.max, a.sum + b.sum * std::exp(b.max - a.max)};
  return {a.max, a.sum + b.sum};  // equal maxima, including both empty (-inf): no exp(NaN)
}

template <class T>
PIPIT_HOST_DEVICE token_stats<T> merge(const token_stats<T>& a, const token_stats<T>& b) {
  const softmax_stats<T> s = merge(a.softmax(), b.softmax());
  return {s.max, s.sum, a.target + b.target, a.logit_sum + b.logit_sum};
}

// The reduction operator for communicators: merges softmax_stats and token_stats.
struct merge_op {
  template <class T>
  PIPIT_HOST_DEVICE softmax_stats<T> operator()(const softmax_stats<T>& a,
                                                const softmax_stats<T>& b) const {
    return merge(a, b);
  }
  template <class T>
  PIPIT_HOST_DEVICE token_stats<T> operator()(const token_stats<T>& a,
                                              const token_stats<T>& b) const {
    return merge(a, b);
  }
};

// Adds one logit to running statistics (the per-thread loop of a kernel). A -inf logit (a
// masked column) leaves the statistics unchanged.
template <class T>
PIPIT_HOST_DEVICE void accumulate(softmax_stats<T>& s, T z) {
  if (z > s.max) {
    s.sum = s.sum * std::exp(s.max - z) + T(1);
    s.max = z;
  } else if (z != -std::numeric_limits<T>::infinity()) {
    s.sum += std::exp(z - s.max);
  }
}

// Statistics of the n logits z[0..n), in two passes (max, then sum of exp). n == 0 gives empty.
template <class T>
PIPIT_HOST_DEVICE softmax_stats<T> row_stats(const T* z, std::int64_t n) {
  softmax_stats<T> s = softmax_stats<T>::empty();
  for (std::int64_t j = 0; j < n; ++j)
    if (z[j] > s.max) s.max = z[j];
  if (s.max == -std::numeric_limits<T>::infinity()) return s;
  for (std::int64_t j = 0; j < n; ++j) s.sum += std::exp(z[j] - s.max);
  return s;
}

// One step of the streaming softmax with accumulators (flash-attention style): merges the chunk
// z[0..n) into `running`, overwrites z with exp(z - new max) and returns the factor
// exp(old max - new max) by which accumulators built against the old maximum must be rescaled
// (0 when there was no old maximum, 1 when the maximum did not change).
template <class T>
PIPIT_HOST_DEVICE T online_softmax_chunk(T* z, std::int64_t n, softmax_stats<T>& running) {
  T m = running.max;
  for (std::int64_t j = 0; j < n; ++j)
    if (z[j] > m) m = z[j];
  if (m == -std::numeric_limits<T>::infinity()) {  // nothing seen yet and an all -inf chunk
    for (std::int64_t j = 0; j < n; ++j) z[j] = T(0);
    return T(1);
  }
  T sum = T(0);
  for (std::int64_t j = 0; j < n; ++j) {
    z[j] = std::exp(z[j] - m);
    sum += z[j];
  }
  const T scale = (m == running.max) ? T(1) : std::exp(running.max - m);  // exp(-inf) = 0
  running.sum = running.sum * scale + sum;
  running.max = m;
  return scale;
}

}  // namespace pipit::vocab
