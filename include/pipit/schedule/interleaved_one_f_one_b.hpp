#pragma once
// Interleaved 1F1B (Megatron's virtual pipeline; Narayanan et al., "Efficient Large-Scale Language
// Model Training on GPU Clusters Using Megatron-LM", SC'21, arXiv 2104.04473): rank r holds v
// model chunks, virtual stage s on rank s mod p. Microbatches go in groups of G: within a group,
// every microbatch passes chunk 0, then chunk 1, ...; the backward walks the same order with the
// chunks reversed. Rank r runs min(2 (p - r - 1) + (v - 1) G, m v) warm-up chunk forwards, then
// alternates one forward and one (combined) backward, then drains the backwards.
//
// With zero communication latency, chunk passes of f / v and (b + w) / v and any valid G, the
// makespan is m (f + b + w) + (p - 1)(f + b + w) / v: 1F1B's bubble divided by v. Rank r peaks
// at min(2 (p - r - 1) + (v - 1) G + 1, m v) chunk activations (each 1/v of a microbatch's
// share of the model): p + (p - 1) / v microbatches on rank 0 when G = p and m >= 2p, against
// 1F1B's p.
//
// Megatron's group rule: p <= G <= m, and m mod G is 0 or at least p. The last group holds the
// m mod G leftover microbatches. With G < p, or a last group of fewer than p, a rank reaches a
// microbatch's next chunk before that microbatch has come back round the other p - 1 ranks: the
// orders then stall ("dependency bubbles") or even form a dependency cycle. G = m always
// qualifies once m >= p.

#include <algorithm>

#include "pipit/schedule/plan.hpp"

namespace pipit::schedule {

// GroupSize 0 picks the smallest valid G >= p (G = p when p divides m, as in Megatron).
template <int GroupSize = 0>
struct interleaved_one_f_one_b_t {
  static_assert(GroupSize >= 0, "interleaved_one_f_one_b_t: GroupSize must be >= 0 (0 = auto)");

  static constexpr std::string_view name = "interleaved";
  static constexpr placement place = placement::looped;
  static constexpr bool split_backward = false;

  // For refusal messages: a fixed group size is part of what was refused.
  static std::string parameters() {
    return GroupSize > 0 ? detail::concat(" with group size G = ", GroupSize) : std::string();
  }

  static constexpr bool valid_group(const shape& s, int g) noexcept {
    const int p = s.stages, m = s.microbatches;
    return p <= g && g <= m && (m % g == 0 || m % g >= p);
  }

  // The group size used for shape s (meaningful once m >= p).
  static constexpr int group_size(const shape& s) noexcept {
    if constexpr (GroupSize > 0) {
      return GroupSize;
    } else {
      for (int g = s.stages; g < s.microbatches; ++g)
        if (valid_group(s, g)) return g;
      return s.microbatches;
    }
  }

  static constexpr shape_rule check(const shape& s) noexcept {
    if (const auto r = check_common(s); r != shape_rule::ok) return r;
    if (s.microbatches < s.stages) return shape_rule::interleaved_microbatches_at_least_stages;
    return valid_group(s, group_size(s)) ? shape_rule::ok : shape_rule::interleaved_group_size;
  }

  // extra_warmup > 0: that many more warm-up chunk forwards on every rank (vocab_passes.hpp).
  static constexpr void generate(const shape& s, plan& out, int extra_warmup = 0) {
    const int p = s.stages, m = s.microbatches, v = s.chunks, g = group_size(s);
    const int n = m * v;     // chunk passes per rank and direction
    const int full = m / g;  // groups of g; then one of m % g, if any
    // The k-th forward of every rank: microbatch and chunk. The same k names the k-th backward,
    // whose chunk is v - 1 - chunk.
    const auto entry = [&](int k, int& mb, int& chunk) {
      int base = 0, size = g;
      if (k / (g * v) < full) {
        base = k / (g * v) * g;
      } else {
        base = full * g;
        size = m - base;
      }
      const int within = k - base * v;
      mb = base + within % size;
      chunk = within / size;
    };
    for (int r = 0; r < p; ++r) {
      auto& acts = out.ranks[static_cast<std::size_t>(r)];
      acts.reserve(2 * static_cast<std::size_t>(n));
      const auto forward = [&](int k) {
        int mb = 0, chunk = 0;
        entry(k, mb, chunk);
        acts.push_back(make_action(op::forward, stage_of(place, s, r, chunk), mb));
      };
      const auto backward = [&](int k) {
        int mb = 0, chunk = 0;
        entry(k, mb, chunk);
        acts.push_back(make_action(op::backward, stage_of(place, s, r, v - 1 - chunk), mb));
      };
      // The 2 (p - r - 1) (not 1F1B's p - r - 1) lets a rank's next chunk forward arrive before
      // the rank needs it (Megatron-LM issue #169).
      const int warmup = std::min(2 * (p - r - 1) + (v - 1) * g + extra_warmup, n);
      for (int k = 0; k < warmup; ++k) forward(k);
      for (int k = 0; k + warmup < n; ++k) {
        forward(k + warmup);
        backward(k);
      }
      for (int k = n - warmup; k < n; ++k) backward(k);
    }
  }
};

using interleaved_one_f_one_b = interleaved_one_f_one_b_t<0>;

}  // namespace pipit::schedule
