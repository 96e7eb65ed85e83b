#pragma once
// V-Min (Qi, Wan, Amar, Lin, "Pipeline Parallelism with Controllable Memory", arXiv 2405.15362,
// NeurIPS 2024; stable pattern as in sail-sg/zero-bubble-pipeline-parallelism zbv_greedy.py):
// V placement, split backward, one "building block" (the six passes of one microbatch on every
// rank) repeated every 6 unit slots. Each rank runs its passes in slot order.
//
// Measured by tests/unit/schedule_v_test.cpp (free_at_b = 0): peak activations
// min(m, floor((p + 4) / 3)) (the paper's figure; 1F1B holds p); with f = b = w and comm = 0 the
// makespan is 3m + 2p - 5/2, one more when 3 | p and m >= 2, exactly 3m for p = 1: about 2/3 of
// 1F1B's bubble 3(p - 1).

#include <algorithm>
#include <cstddef>
#include <vector>

#include "pipit/core/filled.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/policy_base.hpp"

namespace pipit::schedule {

namespace detail_v {

// Slots of microbatch 0's four chunk passes on one rank (microbatch j adds 6 j): forward of
// chunk 0 and chunk 1, backward (input part) of chunk 1 and chunk 0. Chunk 1's backward runs
// from rank 0 to rank p - 1 and chunk 0's back from p - 1 to 0, mirroring the forward.
struct v_block_slots {
  int forward0, forward1, backward1, backward0;
};

// Lays the blocks of all microbatches into one rank's slot table, puts each W into the first
// idle slot after its B (in the order of the Bs), and emits the rank's passes in slot order.
// The caller's slots must be pairwise distinct modulo 6, so that no two passes collide.
constexpr void v_block_rank(const shape& s, int rank, v_block_slots k, std::vector<action>& acts) {
  const int m = s.microbatches;
  const int stage0 = stage_of(placement::v_shape, s, rank, 0);
  const int stage1 = stage_of(placement::v_shape, s, rank, 1);
  const int last = std::max({k.forward0, k.forward1, k.backward1, k.backward0}) + 6 * (m - 1);
  // Every W lands at most 2m slots past the last B, so this table never overflows.
  const auto size = static_cast<std::size_t>(last + 2 * m + 2);
  std::vector<action> slot = filled(size, action{});
  std::vector<unsigned char> used = filled<unsigned char>(size, 0);
  const auto put = [&](int at, const action& a) {
    slot[static_cast<std::size_t>(at)] = a;
    used[static_cast<std::size_t>(at)] = 1;
  };
  for (int j = 0; j < m; ++j) {
    put(k.forward0 + 6 * j, make_action(op::forward, stage0, j));
    put(k.forward1 + 6 * j, make_action(op::forward, stage1, j));
    put(k.backward1 + 6 * j, make_action(op::backward_input, stage1, j));
    put(k.backward0 + 6 * j, make_action(op::backward_input, stage0, j));
  }
  for (std::size_t at = 0; at < size; ++at) {
    if (!used[at] || slot[at].kind != op::backward_input) continue;
    std::size_t free = at + 1;
    while (used[free]) ++free;
    put(static_cast<int>(free),
        make_action(op::backward_weight, slot[at].stage, slot[at].microbatch));
  }
  acts.reserve(6 * static_cast<std::size_t>(m));
  for (std::size_t at = 0; at < size; ++at)
    if (used[at]) acts.push_back(slot[at]);
}

// V-Min's block on rank i: F at i, f at 2p - 1 - i, chunk-1 B at 2p + d + i, chunk-0 B at
// 4p + d - 1 - i. Modulo 6 every pair differs in parity except F/B1 and f/B0, which differ by
// 2p + d; the gap d = 2 when 3 | p keeps that nonzero (d = 0 would collide for p = 3, 6, ...).
constexpr v_block_slots v_min_slots(int p, int i) noexcept {
  const int d = p % 3 == 0 ? 2 : 0;
  return {i, 2 * p - 1 - i, 2 * p + d + i, 4 * p + d - 1 - i};
}

}  // namespace detail_v

struct v_min : v_shape_policy {
  static constexpr std::string_view name = "v-min";
  static constexpr bool split_backward = true;

  static constexpr void generate(const shape& s, plan& out) {
    for (int r = 0; r < s.stages; ++r)
      detail_v::v_block_rank(s, r, detail_v::v_min_slots(s.stages, r),
                             out.ranks[static_cast<std::size_t>(r)]);
  }
};

}  // namespace pipit::schedule
