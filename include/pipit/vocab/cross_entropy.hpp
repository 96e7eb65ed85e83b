#pragma once
// The per-token numerics of the (sharded) cross-entropy, as PIPIT_HOST_DEVICE functions over
// plain values and pointers, shared by the host layers and the CUDA kernels.
//
// For a token with logits z over the real vocabulary of V ids, target y, label smoothing eps and
// z-loss coefficient lambda (PaLM, arXiv 2204.02311, section 5), with lse = log sum_v exp(z_v)
// and p = softmax(z), the objective and its gradient are
//     loss  = lse - (1 - eps) z_y - (eps / V) sum_v z_v + lambda lse^2
//     dloss/dz_v = (1 + 2 lambda lse) p_v - (1 - eps) [v == y] - eps / V.
// eps = lambda = 0 is the plain cross-entropy lse - z_y. The smoothing is PyTorch's (target
// distribution (1 - eps) onehot + eps / V over the whole vocabulary), which needs the sum of the
// logits over all shards: token_stats carries it.

#include <cmath>
#include <cstdint>
#include <limits>

#include "pipit/core/config.hpp"
#include "pipit/vocab/softmax_stats.hpp"

namespace pipit::vocab {

// Loss hyper-parameters in kernel-friendly form.
template <class T>
struct ce_params {
  T smoothing;  // eps in [0, 1]
  T z_loss;     // lambda >= 0
  T inv_vocab;  // 1 / V, V the real (unpadded) vocabulary size
};

// The target logit if the target's row `local_target` lies in the chunk [col_begin, col_begin+n)
// of the row z (z indexed from col_begin), else 0. local_target < 0: not in this shard.
template <class T>
PIPIT_HOST_DEVICE T gather_target(const T* z, std::int64_t col_begin, std::int64_t n,
                                  std::int64_t local_target) {
  const std::int64_t j = local_target - col_begin;
  return (local_target >= 0 && j >= 0 && j < n) ? z[j] : T(0);
}

// Per-token objective from merged (global) statistics.
template <class T>
PIPIT_HOST_DEVICE T token_loss(const token_stats<T>& s, const ce_params<T>& p) {
  const T lse = s.log_sum_exp();
  return lse - (T(1) - p.smoothing) * s.target - p.smoothing * p.inv_vocab * s.logit_sum +
         p.z_loss * lse * lse;
}

// The z-loss part of token_loss (reported separately for logging).
template <class T>
PIPIT_HOST_DEVICE T token_z_loss(const token_stats<T>& s, const ce_params<T>& p) {
  const T lse = s.log_sum_exp();
  return p.z_loss * lse * lse;
}

// g * dloss/dz_v = softmax_scale * exp(z_v - lse) - target_scale * [v == y] - uniform.
template <class T>
struct grad_coeffs {
  T lse;
  T softmax_scale;  // g (1 + 2 lambda lse)
  T target_scale;   // g (1 - eps)
  T uniform;        // g eps / V
};

// The gradient epilogue's per-token coefficients from merged statistics and the token's loss
// gradient g (0 for an ignored token: every coefficient is then 0).
template <class T>
PIPIT_HOST_DEVICE grad_coeffs<T> token_grad_coeffs(const token_stats<T>& s, T g,
                                                   const ce_params<T>& p) {
  const T lse = s.log_sum_exp();
  return {lse, g * (T(1) + T(2) * p.z_loss * lse), g * (T(1) - p.smoothing),
          g * p.smoothing * p.inv_vocab};
}

// Gradient epilogue over one row chunk, in place: z[j] (the logit of column col_begin + j)
// becomes g * dloss/dz. local_target: the target's row in this shard, or -1.
template <class T>
PIPIT_HOST_DEVICE void grad_epilogue_row(T* z, std::int64_t col_begin, std::int64_t n,
                                         std::int64_t local_target, const grad_coeffs<T>& c) {
  if (c.softmax_scale == T(0) && c.target_scale == T(0) && c.uniform == T(0)) {
    for (std::int64_t j = 0; j < n; ++j) z[j] = T(0);  // ignored token
    return;
  }
  for (std::int64_t j = 0; j < n; ++j) z[j] = c.softmax_scale * std::exp(z[j] - c.lse) - c.uniform;
  const std::int64_t t = local_target - col_begin;
  if (local_target >= 0 && t >= 0 && t < n) z[t] -= c.target_scale;
}

// Algorithm 2's correction: the S pass accumulated a = sum_v exp(z_v - m_local) w_v over the
// shard; the shard's share of sum_v softmax_scale p_v w_v is then
// softmax_scale * exp(m_local - lse) * a. Returns that factor (0 for an empty shard).
template <class T>
PIPIT_HOST_DEVICE T local_softmax_weight(T local_max, const grad_coeffs<T>& c) {
  if (local_max == -std::numeric_limits<T>::infinity()) return T(0);
  return c.softmax_scale * std::exp(local_max - c.lse);
}

}  // namespace pipit::vocab
