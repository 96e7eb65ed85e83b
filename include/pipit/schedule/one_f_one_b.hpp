#pragma once
// 1F1B (PipeDream-Flush; Narayanan et al., SC'21, the non-interleaved Megatron schedule):
// rank r runs min(p - r - 1, m) warm-up forwards, then alternates one forward and one (combined)
// backward, then drains the remaining backwards. Same bubble as GPipe, (p - 1)(f + b), but rank r
// keeps at most min(p - r, m) microbatches' activations instead of m.

#include <algorithm>

#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/policy_base.hpp"

namespace pipit::schedule {

struct one_f_one_b : one_chunk_policy {
  static constexpr std::string_view name = "1f1b";
  static constexpr bool split_backward = false;

  // extra_warmup > 0: that many more warm-up forwards on every rank (vocab_passes.hpp delays the
  // last stage's backward by one 1F1B period per vocabulary barrier this way).
  static constexpr void generate(const shape& s, plan& out, int extra_warmup = 0) {
    const int p = s.stages, m = s.microbatches;
    for (int r = 0; r < p; ++r) {
      auto& acts = out.ranks[static_cast<std::size_t>(r)];
      acts.reserve(2 * static_cast<std::size_t>(m));
      const int warmup = std::min(p - r - 1 + extra_warmup, m);
      int f = 0, b = 0;
      while (f < warmup) acts.push_back(make_action(op::forward, r, f++));
      while (f < m) {
        acts.push_back(make_action(op::forward, r, f++));
        acts.push_back(make_action(op::backward, r, b++));
      }
      while (b < m) acts.push_back(make_action(op::backward, r, b++));
    }
  }
};

}  // namespace pipit::schedule
