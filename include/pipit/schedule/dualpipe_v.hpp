#pragma once
// DualPipeV (deepseek-ai/DualPipe, dualpipe/dualpipev.py; the "cut-in-half" DualPipe, after Sea
// AI Lab; also PyTorch's ScheduleDualPipeV): V placement, m >= 2p. Rank r of p runs eight
// phases, where F0/F1 are chunk-0/1 forwards, BW a combined backward and B an input-only
// backward whose W comes later:
//   1. 2(p - r - 1) x F0            5. (p - r - 1) x (BW1, F1, BW0)
//   2. (r + 1) x (F0, F1)            6. (r + 1) x (backward 1, backward 0): the first r + 1 of
//   3. (p - r - 1) x (B1, W, F1)        these 2(r + 1) passes BW, the rest B
//   4. (m - 2p + r + 1) x            7. (p - r - 1) x (W, B0)
//      (F0, BW1, F1, BW0)            8. (r + 1) x W
// Each W runs the weight pass of the rank's oldest pending B (DualPipe's WeightGradStore is a
// FIFO). Per stage that is m forwards and m backwards: F0 2(p-r-1) + (r+1) + (m-2p+r+1), F1
// (r+1) + 2(p-r-1) + (m-2p+r+1), chunk-1 backward (p-r-1) + (m-2p+r+1) + (p-r-1) + (r+1),
// chunk-0 backward (m-2p+r+1) + (p-r-1) + (r+1) + (p-r-1); 2p - r - 1 Bs and as many Ws.
// The pairs of phases 4 and 5 are DualPipe's overlapped forward/backward steps; a plan lists
// them as consecutive actions (a runtime may fuse them).
//
// Measured (tests/unit/schedule_v_test.cpp), f = b = w, comm = 0: makespan 3m + (p - 1) / 2
// and peak activations p + 1/2 (2p + 1 chunk activations: DualPipe's "PP + 1" stages' worth)
// on every rank, for every m >= 2p.

#include <cstddef>
#include <vector>

#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/policy_base.hpp"

namespace pipit::schedule {

struct dualpipe_v : v_shape_policy {
  static constexpr std::string_view name = "dualpipe-v";
  static constexpr bool split_backward = true;  // some backwards are split, the others BW

  static constexpr shape_rule check(const shape& s) noexcept {
    if (const auto r = v_shape_policy::check(s); r != shape_rule::ok) return r;
    return s.microbatches >= 2 * s.stages ? shape_rule::ok
                                          : shape_rule::dualpipe_microbatches_at_least_twice_stages;
  }

  static constexpr void generate(const shape& s, plan& out) {
    const int p = s.stages, m = s.microbatches;
    for (int r = 0; r < p; ++r) {
      auto& acts = out.ranks[static_cast<std::size_t>(r)];
      acts.reserve(6 * static_cast<std::size_t>(m));
      const int stage[2] = {stage_of(placement::v_shape, s, r, 0),
                            stage_of(placement::v_shape, s, r, 1)};
      int next_f[2] = {0, 0}, next_b[2] = {0, 0};
      std::vector<action> pending_w;
      std::size_t head = 0;
      const auto forward = [&](int c) {
        acts.push_back(make_action(op::forward, stage[c], next_f[c]++));
      };
      const auto backward = [&](int c, bool split) {
        const int j = next_b[c]++;
        acts.push_back(make_action(split ? op::backward_input : op::backward, stage[c], j));
        if (split) pending_w.push_back(make_action(op::backward_weight, stage[c], j));
      };
      const auto weight = [&] { acts.push_back(pending_w[head++]); };

      const int tail = p - r - 1;  // ranks past this one on the way down
      for (int i = 0; i < 2 * tail; ++i) forward(0);
      for (int i = 0; i <= r; ++i) forward(0), forward(1);
      for (int i = 0; i < tail; ++i) backward(1, true), weight(), forward(1);
      for (int i = 0; i < m - 2 * p + r + 1; ++i)
        forward(0), backward(1, false), forward(1), backward(0, false);
      for (int i = 0; i < tail; ++i) backward(1, false), forward(1), backward(0, false);
      for (int i = 0; i <= r; ++i) backward(1, 2 * i >= r + 1), backward(0, 2 * i + 1 >= r + 1);
      for (int i = 0; i < tail; ++i) weight(), backward(0, true);
      for (int i = 0; i <= r; ++i) weight();
    }
  }
};

}  // namespace pipit::schedule
