#pragma once
// V-Half (Qi, Wan, Amar, Lin, "Pipeline Parallelism with Controllable Memory", arXiv 2405.15362,
// NeurIPS 2024; stable pattern as in sail-sg/zero-bubble-pipeline-parallelism zbv_greedy.py):
// like V-Min (v_min.hpp), one building block repeated every 6 unit slots, but with the chunk-0
// forwards and the chunk-1 backwards two slots apart from rank to rank, which trades a longer
// chunk-0 lifespan for fewer pipeline bubbles.
//
// Measured by tests/unit/schedule_v_test.cpp (free_at_b = 0): peak activations
// min(m, floor((p + 2) / 2)) (the paper's figure; 1F1B holds p); with f = b = w, comm = 0 and
// m > p / 2 the makespan is 3m + 7/2 floor(p / 2), one less for even p: about 7/12 of 1F1B's
// bubble 3(p - 1). The paper's 1/2 also reorders warm-up and cool-down, which a plan in plain
// slot order does not.

#include <cstddef>

#include "pipit/schedule/policy_base.hpp"
#include "pipit/schedule/v_min.hpp"

namespace pipit::schedule {

namespace detail_v {

// V-Half's block on rank i: F at 2i, f at 3p - 2 - i, chunk-1 B at 3p + d + 2i - 1, chunk-0 B
// at 6p + d - 2 - i. Modulo 6 the only pair that can coincide is f/B0 (they differ by 3p + d);
// the gap d = 3 when p is even keeps it nonzero (d = 0 would collide for every even p).
constexpr v_block_slots v_half_slots(int p, int i) noexcept {
  const int d = p % 2 == 0 ? 3 : 0;
  return {2 * i, 3 * p - 2 - i, 3 * p + d + 2 * i - 1, 6 * p + d - 2 - i};
}

}  // namespace detail_v

struct v_half : v_shape_policy {
  static constexpr std::string_view name = "v-half";
  static constexpr bool split_backward = true;

  // extra_periods > 0: both backwards of the building block that many 6-slot periods later
  // (vocab_passes.hpp: one period per vocabulary barrier, as the paper stretches the block).
  static constexpr void generate(const shape& s, plan& out, int extra_periods = 0) {
    for (int r = 0; r < s.stages; ++r) {
      detail_v::v_block_slots k = detail_v::v_half_slots(s.stages, r);
      k.backward1 += 6 * extra_periods;
      k.backward0 += 6 * extra_periods;
      detail_v::v_block_rank(s, r, k, out.ranks[static_cast<std::size_t>(r)]);
    }
  }
};

}  // namespace pipit::schedule
