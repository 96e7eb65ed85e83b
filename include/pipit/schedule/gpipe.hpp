#pragma once
// GPipe (Huang et al., NeurIPS 2019): every rank runs all microbatches' forwards, then all their
// (combined) backwards. Bubble (p - 1)(f + b); every rank keeps all m microbatches' activations
// (re-materialization, in the runtime, trades that memory for recomputation).

#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/policy_base.hpp"

namespace pipit::schedule {

struct gpipe : one_chunk_policy {
  static constexpr std::string_view name = "gpipe";
  static constexpr bool split_backward = false;

  static constexpr void generate(const shape& s, plan& out) {
    for (int r = 0; r < s.stages; ++r) {
      auto& acts = out.ranks[static_cast<std::size_t>(r)];
      acts.reserve(2 * static_cast<std::size_t>(s.microbatches));
      for (int mb = 0; mb < s.microbatches; ++mb) acts.push_back(make_action(op::forward, r, mb));
      for (int mb = 0; mb < s.microbatches; ++mb) acts.push_back(make_action(op::backward, r, mb));
    }
  }
};

}  // namespace pipit::schedule
