#pragma once
// Vocabulary passes in the schedules (Yeung, Qi, Lin, Wan, "Balancing Pipeline Parallelism with
// Vocabulary Parallelism", arXiv 2411.05288, MLSys 2025; sections 4-7 and 9 of
// /work/shared/reference/vocabulary_parallelism.md).
//
// With the output layer and the input embedding sharded over all p pipeline ranks, every rank
// runs four more passes per microbatch k:
//   IF_k  input embedding forward (its shard's rows; the shards are then summed into F(0, k))
//   S_k   output layer, statistics pass (X_k broadcast from the last stage's F)
//   T_k   output layer, gradient pass (weight gradient; with two barriers also the input grad)
//   IB_k  input embedding backward (the gradient of F(0, k)'s input, broadcast from rank 0)
// Each is an action whose stage field is the rank's chunk-0 virtual stage (stage_of(place, shape,
// r, 0) = r for the looped and the V placement), so that placement checks hold; plan.vocab says
// which algorithm's dependencies apply.
//
// The dependency contract (dataflow.hpp, checked by validate(), timed by the simulator): the
// collectives are implied by the passes' dependencies, not written as actions —
//   F(0, k)             needs every rank's IF_k          (the embedding reduce)
//   S_k (every rank)    needs F(last virtual stage, k)    (the broadcast of X_k)
//   T_k (every rank)    needs every rank's S_k            (the statistics barrier)
//   B/BW(last, k)       needs every rank's S_k (one barrier, Algorithm 2)
//                       or every rank's T_k (two barriers, Algorithm 1: the input-grad barrier)
//   IB_k (every rank)   needs B/BW(0, k)                  (the broadcast of the embedding grad)
// A gathered input (every rank's pass) is ready when the last rank's pass ends; the simulator
// adds one costs.comm to it when p > 1. An executor must run each implied collective between
// its producers and its consumers; lower() refuses vocabulary plans (no collective actions are
// written into lowered plans yet).
//
// Placement (make_vocab_plan, add_vocab_passes), in two steps:
//  1. The base schedule is generated with the last stage's backward delayed by one period per
//     barrier (nb = 1 for one barrier, 2 for two):
//       1F1B         rank r runs min(p - r - 1 + nb, m) warm-up forwards (the paper: p - r, and
//                    one more for two barriers); peak activations min(p + nb, m) on rank 0.
//       interleaved  rank r runs nb more warm-up *chunk* forwards than Megatron's
//                    2 (p - r - 1) + (v - 1) G. Our choice (the paper has no interleaved
//                    variant): the last virtual stage's F_k is then followed by one chunk
//                    backward and one chunk forward before its B_k — one chunk period of slack
//                    per barrier, as in 1F1B — at nb / v more microbatches of activations
//                    rather than nb.
//       V-Half       both backward slots of the building block move 6 nb slots later (the
//                    paper's zbv_greedy stretches the interval by 6 per barrier): every chunk
//                    keeps one more microbatch, +nb units on every rank.
//  2. insert_vocab_passes() places the passes by the times of an eager unit-time execution of
//     that base (F, B, W = 1, BW = 2), at the same time on every rank (they are collectives):
//       S_k    at the end of F(last, k)
//       T_k    one barrier: with S_{k+1} (T_{k-1} runs just before S_k, as the paper pairs
//              them), T_{m-1} right before B/BW(last, m - 1); two barriers: halfway between S_k
//              and B/BW(last, k), which waits for every rank's T_k (with the 1F1B delay that
//              is again S_{k+1}'s time; halfway leaves the barrier slack on both sides)
//       IF_k   at the start of F(0, k - 1) (one microbatch ahead; IF_0 first of all)
//       IB_k   at the end of B/BW(0, k)
//     On a rank a pass goes before the base actions starting at the same time and after those
//     starting earlier; passes at the same time go by microbatch, then S, T, IF, IB — the same
//     order on every rank. Every dependency then goes from an earlier to a later point of one
//     global order that each rank's list follows, so the result can always execute (validate()
//     checks it anyway). insert_vocab_passes() works on any valid unlowered plan; without the
//     delay of step 1 the barrier sits on the critical path.

#include <algorithm>
#include <cstddef>
#include <string_view>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/core/filled.hpp"
#include "pipit/schedule/dataflow.hpp"
#include "pipit/schedule/interleaved_one_f_one_b.hpp"
#include "pipit/schedule/one_f_one_b.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/v_half.hpp"
#include "pipit/schedule/validate.hpp"

namespace pipit::schedule {

// Barrier points per microbatch between the last stage's F and B: 1 (one_barrier), 2
// (two_barrier, and naive, whose max and sum reductions share the first point), 0 (none).
constexpr int vocab_barriers(vocab_passes v) noexcept {
  return v == vocab_passes::one_barrier ? 1 : v == vocab_passes::none ? 0 : 2;
}

// The schedules make_vocab_plan / add_vocab_passes support.
inline constexpr std::string_view vocab_schedule_names[] = {
    one_f_one_b::name, interleaved_one_f_one_b::name, v_half::name};

constexpr bool supports_vocab_passes(std::string_view schedule) noexcept {
  for (const auto n : vocab_schedule_names)
    if (n == schedule) return true;
  return false;
}

// Inserts S, T, IF, IB of every microbatch on every rank of `base` (any valid unlowered plan
// without vocabulary passes), by the rule above, and sets plan.vocab. Throws pipit::error when
// the base is lowered, already has vocabulary passes or is invalid, or algorithm is none.
constexpr plan insert_vocab_passes(const plan& base, vocab_passes algorithm) {
  if (algorithm == vocab_passes::none)
    fail("pipit: insert_vocab_passes(): algorithm must be one_barrier, two_barrier or naive");
  if (base.lowered || base.vocab != vocab_passes::none)
    fail("pipit: insert_vocab_passes(): plan '", base.schedule,
         "' must be unlowered and without vocabulary passes");
  if (const validation v = validate(base); !v.ok)
    fail("pipit: insert_vocab_passes(): ", to_string(v));
  const shape& s = base.shp;
  const int m = s.microbatches, last = s.virtual_stages() - 1, ranks = base.rank_count();
  const execution ex =
      execute(base, [](const action& a, int) { return a.kind == op::backward ? 2.0 : 1.0; });

  // Start and end of F(last, k), F(0, k), the backward (B or BW) of the last and the first stage.
  std::vector<double> f_last_end = filled(static_cast<std::size_t>(m), 0.0);
  std::vector<double> f_first_start = f_last_end, b_last_start = f_last_end,
                      b_first_end = f_last_end;
  for (int r = 0; r < ranks; ++r) {
    const auto ru = static_cast<std::size_t>(r);
    for (std::size_t i = 0; i < base.ranks[ru].size(); ++i) {
      const action& a = base.ranks[ru][i];
      const auto k = static_cast<std::size_t>(a.microbatch);
      const bool bwd = a.kind == op::backward || a.kind == op::backward_input;
      if (a.kind == op::forward && a.stage == last) f_last_end[k] = ex.end[ru][i];
      if (a.kind == op::forward && a.stage == 0) f_first_start[k] = ex.start[ru][i];
      if (bwd && a.stage == last) b_last_start[k] = ex.start[ru][i];
      if (bwd && a.stage == 0) b_first_end[k] = ex.end[ru][i];
    }
  }

  // The vocabulary passes in one order shared by every rank: (time, microbatch, kind S T IF IB).
  struct timed {
    double time;
    int microbatch;
    op kind;
  };
  std::vector<timed> passes;
  passes.reserve(4 * static_cast<std::size_t>(m));
  const bool two = vocab_barriers(algorithm) == 2;
  for (int k = 0; k < m; ++k) {
    const auto ku = static_cast<std::size_t>(k);
    passes.push_back({f_last_end[ku], k, op::vocab_s});
    // One barrier: T_k with S_{k+1}, the last T right before the last stage's last backward.
    // Two barriers: halfway between S_k and the last stage's B_k, which needs every rank's T_k.
    const double t = two         ? (f_last_end[ku] + b_last_start[ku]) / 2
                     : k + 1 < m ? f_last_end[ku + 1]
                                 : b_last_start[ku];
    passes.push_back({std::max(t, f_last_end[ku]), k, op::vocab_t});
    passes.push_back(
        {k == 0 ? -1.0 : std::min(f_first_start[ku - 1], f_first_start[ku]), k, op::embed_forward});
    passes.push_back({b_first_end[ku], k, op::embed_backward});
  }
  std::sort(passes.begin(), passes.end(), [](const timed& a, const timed& b) {
    if (a.time != b.time) return a.time < b.time;
    if (a.microbatch != b.microbatch) return a.microbatch < b.microbatch;
    return a.kind < b.kind;
  });

  plan out = base;
  out.vocab = algorithm;
  for (int r = 0; r < ranks; ++r) {
    const auto ru = static_cast<std::size_t>(r);
    const auto& acts = base.ranks[ru];
    auto& mine = out.ranks[ru];
    mine.clear();
    mine.reserve(acts.size() + passes.size());
    const int stage = stage_of(base.place, s, r, 0);
    std::size_t i = 0;
    for (const timed& v : passes) {
      while (i < acts.size() && ex.start[ru][i] < v.time) mine.push_back(acts[i++]);
      mine.push_back(make_action(v.kind, stage, v.microbatch));
    }
    while (i < acts.size()) mine.push_back(acts[i++]);
  }
  return out;
}

// The plan of a supported schedule (1f1b, interleaved, v-half) with vocabulary passes: the base
// delayed by one period per barrier, then insert_vocab_passes(). Throws pipit::error for another
// schedule, a shape the schedule refuses, or algorithm none (then it is the plain plan).
inline plan make_vocab_plan(std::string_view schedule, const shape& s, vocab_passes algorithm) {
  const int nb = vocab_barriers(algorithm);
  plan base;
  const auto delayed = [&]<class S>() {
    if (const shape_rule r = S::check(s); r != shape_rule::ok)
      require_shape(S::name, s, r, policy_parameters<S>());
    base = plan{S::name, s, S::place, S::split_backward, false, {}};
    base.ranks.resize(static_cast<std::size_t>(s.stages));
    S::generate(s, base, nb);
  };
  if (schedule == one_f_one_b::name) {
    delayed.template operator()<one_f_one_b>();
  } else if (schedule == interleaved_one_f_one_b::name) {
    delayed.template operator()<interleaved_one_f_one_b>();
  } else if (schedule == v_half::name) {
    delayed.template operator()<v_half>();
  } else {
    fail("pipit: schedule '", schedule,
         "' has no vocabulary-pass placement (supported: 1f1b, interleaved, v-half)");
  }
  if (algorithm == vocab_passes::none) return base;
  return insert_vocab_passes(base, algorithm);
}

// The brief's transformation: `base` must be the unmodified plan of 1f1b, interleaved (automatic
// group size) or v-half; returns make_vocab_plan(base.schedule, base.shp, algorithm). Any other
// plan is refused with a pipit::error (insert_vocab_passes() takes any plan, without the delay).
inline plan add_vocab_passes(const plan& base, vocab_passes algorithm) {
  if (!supports_vocab_passes(base.schedule))
    fail("pipit: add_vocab_passes(): schedule '", base.schedule,
         "' has no vocabulary-pass placement (supported: 1f1b, interleaved, v-half; "
         "insert_vocab_passes() places them in any plan without delaying its backwards)");
  if (base.lowered || base.vocab != vocab_passes::none ||
      !(base == make_vocab_plan(base.schedule, base.shp, vocab_passes::none)))
    fail("pipit: add_vocab_passes(): the base plan is not the unmodified '", base.schedule,
         "' plan of shape ", to_string(base.shp));
  return make_vocab_plan(base.schedule, base.shp, algorithm);
}

}  // namespace pipit::schedule
