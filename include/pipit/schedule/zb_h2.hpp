#pragma once
// ZB-H2 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, arXiv 2401.10241): split
// backward (B, then W), with more warm-up forwards than 1F1B so that no rank waits for its first
// B, and the W's shifted to the tail so that the pipeline's trapezoid becomes a parallelogram.
// Rank r runs min(2 (p - r) - 1, m) warm-up forwards, then (B, W, F) steps while forwards
// remain, then (B, W) steps, but runs a W (the oldest pending) after a B only while more than 2r
// are pending, and drains the last 2r + 1 W's at the end.
//
// Why defer 2r: rank r starts one pass after rank r - 1 and, to be bubble-free, must end one
// pass after it too, yet its last B has to end one pass before rank r - 1's last B starts. So
// each rank ends with two more W's after its last B than the rank before it: 2r + 1 on rank r.
// With each W right after its B instead, rank r's span is 3m + 2 (p - 1 - r) at unit costs and
// the makespan 3m + 2 (p - 1).
//
// With m >= 2p - 1 and zero communication latency, at f = b = w every rank is busy without a gap
// from its first F to its last W (span 3m at unit costs) and the makespan is
// m (f + b + w) + (p - 1) f, the least possible: rank p - 1 cannot start before p - 1 forwards.
// More generally the makespan is m (f + b + w) + (p - 1) max(f, f + b - 2w) when b <= 2f.
// Peak in-flight activations: min(2p - 1, m) on every rank when W frees them (rank r holds its
// 2 (p - r) - 1 warm-up forwards plus 2r deferred W's), min(2 (p - r) - 1, m) when B does.
// For m < 2p - 1 the plan is valid but not bubble-free.

#include <algorithm>

#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/policy_base.hpp"

namespace pipit::schedule {

struct zb_h2 : one_chunk_policy {
  static constexpr std::string_view name = "zb-h2";
  static constexpr bool split_backward = true;

  static constexpr void generate(const shape& s, plan& out) {
    const int p = s.stages, m = s.microbatches;
    for (int r = 0; r < p; ++r) {
      auto& acts = out.ranks[static_cast<std::size_t>(r)];
      acts.reserve(3 * static_cast<std::size_t>(m));
      const int warmup = std::min(2 * (p - r) - 1, m);
      int f = 0, b = 0, w = 0;  // W's run in microbatch order: pending ones are w .. b - 1
      const auto backward = [&] {
        acts.push_back(make_action(op::backward_input, r, b++));
        if (b - w > 2 * r) acts.push_back(make_action(op::backward_weight, r, w++));
      };
      while (f < warmup) acts.push_back(make_action(op::forward, r, f++));
      while (f < m) {
        backward();
        acts.push_back(make_action(op::forward, r, f++));
      }
      while (b < m) backward();
      while (w < m) acts.push_back(make_action(op::backward_weight, r, w++));
    }
  }
};

}  // namespace pipit::schedule
