#pragma once
// ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, arXiv 2401.10241): 1F1B with
// the backward split into B (input gradient, on the critical path) and W (weight gradient, needed
// by nobody downstream). Rank r keeps 1F1B's min(p - r - 1, m) warm-up forwards and F/B order;
// after each B it runs the W of the oldest pending microbatch only while more than r are pending,
// so rank r defers r weight passes and drains them at the end, where they fill the cool-down
// bubble: the last rank, deferring p - 1, finishes its B's p - 1 passes sooner, and the backward
// chain reaches rank 0 that much sooner.
//
// With m >= p, zero communication latency and w <= min(f, b) (checked on a grid of costs; it
// fails for larger w) the makespan is m (f + b + w) + (p - 1)(f + b - w), a bubble of
// (p - 1)(f + b - w) against 1F1B's (p - 1)(f + b + w): 3m + p - 1 at unit costs. Peak in-flight
// activations on rank r: p when W frees them (the r deferred weight passes hold theirs), p - r
// (1F1B's) when B does.
// For m < p at unit costs the makespan is 2 (m + p) - 1, and every rank holds all m microbatches
// (min(p - r, m) when B frees them).

#include <algorithm>

#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/policy_base.hpp"

namespace pipit::schedule {

struct zb_h1 : one_chunk_policy {
  static constexpr std::string_view name = "zb-h1";
  static constexpr bool split_backward = true;

  static constexpr void generate(const shape& s, plan& out) {
    const int p = s.stages, m = s.microbatches;
    for (int r = 0; r < p; ++r) {
      auto& acts = out.ranks[static_cast<std::size_t>(r)];
      acts.reserve(3 * static_cast<std::size_t>(m));
      const int warmup = std::min(p - r - 1, m);
      int f = 0, b = 0, w = 0;  // W's run in microbatch order: pending ones are w .. b - 1
      const auto backward = [&] {
        acts.push_back(make_action(op::backward_input, r, b++));
        if (b - w > r) acts.push_back(make_action(op::backward_weight, r, w++));
      };
      while (f < warmup) acts.push_back(make_action(op::forward, r, f++));
      while (f < m) {
        acts.push_back(make_action(op::forward, r, f++));
        backward();
      }
      while (b < m) backward();
      while (w < m) acts.push_back(make_action(op::backward_weight, r, w++));
    }
  }
};

}  // namespace pipit::schedule
