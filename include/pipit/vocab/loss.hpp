#pragma once
// The loss of the (sharded) output layer from merged per-token statistics: options (ignore
// index, loss weights / mask, mean or sum reduction, label smoothing, z-loss), the reduced loss,
// and the per-token loss gradient g that the T pass (and Algorithm 2's input gradient) scale by.
//
// With weights w_t (a loss mask: 1 or 0, or any non-negative weight; all 1 when not given) and
// valid tokens (target != ignore_index, w_t != 0):
//     sum  reduction: L = sum_valid w_t loss_t,               g_t = grad_output w_t
//     mean reduction: L = sum_valid w_t loss_t / sum_valid w_t, g_t = grad_output w_t / sum w
// A microbatch with no valid token has L = 0 and g = 0 under both reductions (PyTorch's mean
// would be 0/0 = NaN). Ignored tokens have g_t = 0 and contribute to no gradient.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>

#include "pipit/core/error.hpp"
#include "pipit/vocab/cross_entropy.hpp"
#include "pipit/vocab/shards.hpp"
#include "pipit/vocab/softmax_stats.hpp"

namespace pipit::vocab {

enum class reduction { mean, sum };

struct loss_options {
  std::int64_t ignore_index = -100;  // targets equal to this are ignored (may be any value)
  reduction reduce = reduction::mean;
  double label_smoothing = 0.0;  // eps in [0, 1]
  double z_loss = 0.0;           // lambda >= 0: adds lambda * (log Z)^2 per token
  double grad_output = 1.0;      // dObjective/dL: scales every gradient (not the loss)

  template <class T>
  ce_params<T> params(std::int64_t vocab_size) const {
    return {static_cast<T>(label_smoothing), static_cast<T>(z_loss),
            static_cast<T>(1.0 / static_cast<double>(vocab_size))};
  }
};

template <class T>
struct loss_result {
  T loss;               // the reduced objective, z-loss included
  T z_loss;             // the z-loss part of `loss` (same reduction), for logging
  T weight;             // sum of the weights of the valid tokens (their count without weights)
  std::int64_t tokens;  // number of valid tokens
};

// Throws pipit::error for options out of range and for a target outside [0, V) that is not the
// ignore index; `weights` is empty or holds one non-negative finite value per target.
template <class W>
void check_loss_inputs(const vocab_shards& shards, std::span<const std::int64_t> targets,
                       const loss_options& opt, std::span<const W> weights) {
  if (!(opt.label_smoothing >= 0.0 && opt.label_smoothing <= 1.0))
    fail("pipit::vocab: label smoothing ", opt.label_smoothing, " is outside [0, 1]");
  if (!(opt.z_loss >= 0.0)) fail("pipit::vocab: z-loss coefficient ", opt.z_loss, " < 0");
  if (!weights.empty() && weights.size() != targets.size())
    fail("pipit::vocab: ", weights.size(), " loss weights for ", targets.size(), " tokens");
  for (const std::int64_t y : targets)
    if (y != opt.ignore_index) shards.check_token(y);
  for (std::size_t t = 0; t < weights.size(); ++t)
    if (!(weights[t] >= W(0)) || !std::isfinite(static_cast<double>(weights[t])))
      fail("pipit::vocab: loss weight ", weights[t], " of token ", t,
           " is not a finite non-negative number");
}

// The reduced loss from merged statistics, and g (one value per token) for the backward passes.
template <class T>
loss_result<T> loss_forward(std::span<const token_stats<T>> stats,
                            std::span<const std::int64_t> targets, std::int64_t vocab_size,
                            const loss_options& opt, std::span<const T> weights, std::span<T> g) {
  if (stats.size() != targets.size() || g.size() != targets.size())
    fail("pipit::vocab::loss_forward: ", stats.size(), " statistics, ", targets.size(),
         " targets and ", g.size(), " gradient slots must agree");
  const ce_params<T> p = opt.params<T>(vocab_size);
  double total = 0.0, z_total = 0.0, weight = 0.0;  // scalars are summed in double
  std::int64_t tokens = 0;
  for (std::size_t t = 0; t < targets.size(); ++t) {
    const double w = weights.empty() ? 1.0 : static_cast<double>(weights[t]);
    if (targets[t] == opt.ignore_index || w == 0.0) continue;
    total += w * static_cast<double>(token_loss(stats[t], p));
    z_total += w * static_cast<double>(token_z_loss(stats[t], p));
    weight += w;
    ++tokens;
  }
  const double denom = (opt.reduce == reduction::mean) ? weight : 1.0;
  const double scale = denom > 0.0 ? 1.0 / denom : 0.0;
  for (std::size_t t = 0; t < targets.size(); ++t) {
    const double w = weights.empty() ? 1.0 : static_cast<double>(weights[t]);
    g[t] = (targets[t] == opt.ignore_index) ? T(0) : static_cast<T>(opt.grad_output * w * scale);
  }
  return {static_cast<T>(total * scale), static_cast<T>(z_total * scale), static_cast<T>(weight),
          tokens};
}

}  // namespace pipit::vocab
