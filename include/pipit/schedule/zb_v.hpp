#pragma once
// ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", arXiv 2401.10241, ICLR 2024; also
// "Pipeline Parallelism with Controllable Memory", arXiv 2405.15362): V placement, split
// backward, and at most 1F1B's activation memory, p units (2p chunk activations) per rank.
//
// Time in unit slots, one chunk pass per slot (f = b = w; a slot is half a unit of the
// simulator's costs). Rank p - 1 cannot start before slot p - 1 and has 6m slots of work, so no
// plan ends before slot 6m + p - 1; nor before 4p + 2m - 1, as the V's tip runs 2m forwards
// before the last microbatch can leave it. Two constructions:
//
// * m >= 2p - 1: closed-form phases (the phase structure described for PyTorch's
//   ScheduleZBVZeroBubble; here all Ws of the cool-down go last). Rank r first fills its budget
//   with 2(p - r) - 1 chunk-0 forwards and r (chunk-1, chunk-0) forward pairs, 2p - 1 chunk
//   activations; from then on each forward is followed by a B and its W, so the budget stays
//   at 2p - 1 or 2p. Rank r idles r slots before its first pass and p - 1 - r in its cool-down,
//   and the plan ends at slot 6m + p - 1, the bound. With f = b = w and comm = 0: makespan
//   3m + (p - 1) / 2, bubble fraction (p - 1) / (6m + p - 1), peak exactly p on every rank.
// * m < 2p - 1, too few microbatches to fill the phases: a list scheduler on the same slots.
//   Each slot every rank runs a ready B (chunk 1 first, as the backward V starts there), else
//   a ready forward (chunk 1 first) that fits the budget, else its oldest pending W. A chunk-0
//   forward is admitted only with room for one more chunk activation, so the oldest
//   microbatch's chunk-1 forward always fits and the scheduler cannot deadlock. Measured for
//   p <= 16: peak min(m, p); makespan optimal for m <= p / 2 and m = p, at most 11.2% above
//   the larger bound otherwise.

#include <cstddef>
#include <initializer_list>
#include <limits>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/core/filled.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/policy_base.hpp"

namespace pipit::schedule {

namespace detail_zb_v {

constexpr void zb_v_phases(const shape& s, plan& out) {
  const int p = s.stages, m = s.microbatches;
  for (int r = 0; r < p; ++r) {
    auto& acts = out.ranks[static_cast<std::size_t>(r)];
    acts.reserve(6 * static_cast<std::size_t>(m));
    const int stage[2] = {stage_of(placement::v_shape, s, r, 0),
                          stage_of(placement::v_shape, s, r, 1)};
    int next_f[2] = {0, 0}, next_b[2] = {0, 0};
    std::vector<action> pending_w;  // FIFO: each W completes the oldest B still without one
    std::size_t head = 0;
    const auto forward = [&](int c) {
      acts.push_back(make_action(op::forward, stage[c], next_f[c]++));
    };
    const auto backward = [&](int c) {
      acts.push_back(make_action(op::backward_input, stage[c], next_b[c]));
      pending_w.push_back(make_action(op::backward_weight, stage[c], next_b[c]++));
    };
    const auto weight = [&] { acts.push_back(pending_w[head++]); };

    for (int i = 0; i < 2 * (p - r) - 1; ++i) forward(0);
    for (int i = 0; i < r; ++i) forward(1), forward(0);
    for (int i = 0; i < p - r; ++i) forward(1), backward(1), weight();
    for (int i = 0; i < m - p; ++i) {  // steady: the budget is full, each F is paid by a W
      if (next_f[0] < m) forward(0);
      backward(0), weight(), forward(1), backward(1), weight();
    }
    for (int i = 0; i < r; ++i) backward(0), backward(1);
    for (int i = 0; i < p - r; ++i) backward(0);
    while (head < pending_w.size()) weight();
  }
}

constexpr void zb_v_list(const shape& s, plan& out) {
  const int p = s.stages, m = s.microbatches, last = 2 * p - 1, budget = 2 * p;
  constexpr int never = std::numeric_limits<int>::max();
  // End slot of each stage's forward and B per microbatch.
  std::vector<int> f_end = filled(static_cast<std::size_t>(2 * p * m), never), b_end = f_end;
  const auto at = [m](int stage, int mb) { return static_cast<std::size_t>(stage * m + mb); };
  struct rank_state {
    int next_f[2] = {0, 0}, next_b[2] = {0, 0};
    int live = 0;  // chunk activations held (F adds one, W frees it)
    std::vector<action> pending_w;
    std::size_t head = 0;
  };
  std::vector<rank_state> ranks = filled(static_cast<std::size_t>(p), rank_state{});
  long long left = 6LL * p * m;
  for (int t = 0; left > 0; ++t) {
    bool acted = false;
    for (int r = 0; r < p; ++r) {
      rank_state& q = ranks[static_cast<std::size_t>(r)];
      const int stage[2] = {stage_of(placement::v_shape, s, r, 0),
                            stage_of(placement::v_shape, s, r, 1)};
      const auto done = [&](const std::vector<int>& end, int st, int mb) {
        return end[at(st, mb)] <= t;
      };
      action a{};
      bool chosen = false;
      for (const int c : {1, 0}) {
        const int j = q.next_b[c], st = stage[c];
        if (chosen || j >= m || !done(f_end, st, j) || (st < last && !done(b_end, st + 1, j)))
          continue;
        a = make_action(op::backward_input, st, j);
        b_end[at(st, j)] = t + 1;
        q.pending_w.push_back(make_action(op::backward_weight, st, j));
        ++q.next_b[c];
        chosen = true;
      }
      for (const int c : {1, 0}) {
        const int j = q.next_f[c], st = stage[c];
        if (chosen || j >= m || (st > 0 && !done(f_end, st - 1, j))) continue;
        if (q.live + (c == 0 ? 2 : 1) > budget) continue;
        a = make_action(op::forward, st, j);
        f_end[at(st, j)] = t + 1;
        ++q.live;
        ++q.next_f[c];
        chosen = true;
      }
      if (!chosen && q.head < q.pending_w.size()) {
        a = q.pending_w[q.head++];
        --q.live;
        chosen = true;
      }
      if (!chosen) continue;
      out.ranks[static_cast<std::size_t>(r)].push_back(a);
      acted = true;
      --left;
    }
    if (!acted) fail("pipit: zb-v list scheduler stalled at slot ", t, " for ", to_string(s));
  }
}

}  // namespace detail_zb_v

struct zb_v : v_shape_policy {
  static constexpr std::string_view name = "zb-v";
  static constexpr bool split_backward = true;

  static constexpr void generate(const shape& s, plan& out) {
    if (s.microbatches >= 2 * s.stages - 1)
      detail_zb_v::zb_v_phases(s, out);
    else
      detail_zb_v::zb_v_list(s, out);
  }
};

}  // namespace pipit::schedule
