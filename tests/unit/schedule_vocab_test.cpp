// Vocabulary passes (S, T, IF, IB) in 1F1B, interleaved 1F1B and V-Half: every plan validates,
// the simulator's peaks and makespans are the closed forms of docs/schedules.md ("Vocabulary
// passes in the schedules"), and every new validation rule is caught on a hand-broken plan.
#include <catch2/catch.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/schedule/interleaved_one_f_one_b.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/one_f_one_b.hpp"
#include "pipit/schedule/v_half.hpp"
#include "pipit/schedule/validate.hpp"
#include "pipit/schedule/vocab_passes.hpp"
#include "pipit/schedule/zb_v.hpp"
#include "pipit/sim/simulate.hpp"

using namespace pipit::schedule;
using pipit::sim::costs;
using pipit::sim::simulate;

namespace {

constexpr vocab_passes algorithms[] = {vocab_passes::one_barrier, vocab_passes::two_barrier,
                                       vocab_passes::naive};

int chunks_for(std::string_view schedule) {
  return schedule == "1f1b" ? 1 : 2;
}

bool accepted(std::string_view schedule, const shape& s) {
  if (schedule == "1f1b") return one_f_one_b::check(s) == shape_rule::ok;
  if (schedule == "interleaved") return interleaved_one_f_one_b::check(s) == shape_rule::ok;
  return v_half::check(s) == shape_rule::ok;
}

plan plain_plan(std::string_view schedule, const shape& s) {
  if (schedule == "1f1b") return make_plan<one_f_one_b>(s);
  if (schedule == "interleaved") return make_plan<interleaved_one_f_one_b>(s);
  return make_plan<v_half>(s);
}

// The vocabulary plan with its S, T, IF, IB removed: the delayed base.
plan without_vocab(plan p) {
  p.vocab = vocab_passes::none;
  for (auto& acts : p.ranks)
    std::erase_if(acts, [](const action& a) { return is_vocabulary(a.kind); });
  return p;
}

int count(const plan& p, int rank, op kind, int mb) {
  int n = 0;
  for (const action& a : p.for_rank(rank)) n += a.kind == kind && a.microbatch == mb ? 1 : 0;
  return n;
}

std::string rule_of(const plan& p) {
  return std::string(validate(p).rule);
}

// Index of the first action of `kind` for microbatch mb on rank r.
std::size_t find(const plan& p, int r, op kind, int mb, int stage = -1) {
  const auto& acts = p.ranks[static_cast<std::size_t>(r)];
  for (std::size_t i = 0; i < acts.size(); ++i)
    if (acts[i].kind == kind && acts[i].microbatch == mb && (stage < 0 || acts[i].stage == stage))
      return i;
  FAIL("no such action");
  return 0;
}

void move_to(plan& p, int r, std::size_t from, std::size_t to) {
  auto& acts = p.ranks[static_cast<std::size_t>(r)];
  const action a = acts[from];
  acts.erase(acts.begin() + static_cast<std::ptrdiff_t>(from));
  acts.insert(acts.begin() + static_cast<std::ptrdiff_t>(to), a);
}

}  // namespace

TEST_CASE("every vocabulary plan validates for 1 to 16 stages and 1 to 64 microbatches",
          "[schedule][vocab][sweep]") {
  int checked = 0;
  for (const std::string_view name : vocab_schedule_names)
    for (const vocab_passes alg : algorithms)
      for (int p = 1; p <= 16; ++p)
        for (int m = 1; m <= 64; ++m) {
          const shape s{p, m, chunks_for(name)};
          if (!accepted(name, s)) {
            CHECK_THROWS_AS(make_vocab_plan(name, s, alg), pipit::error);
            continue;
          }
          const plan v = make_vocab_plan(name, s, alg);
          const validation ok = validate(v);
          INFO(name << " p=" << p << " m=" << m << " " << pipit::schedule::name(alg) << ": "
                    << to_string(ok));
          REQUIRE(ok.ok);
          REQUIRE(v.vocab == alg);
          REQUIRE(v.schedule == name);
          // One S, T, IF, IB per microbatch on every rank, at the rank's chunk-0 stage.
          for (int r = 0; r < p; ++r) {
            for (const action& a : v.for_rank(r))
              if (is_vocabulary(a.kind)) REQUIRE(a.stage == r);
            if (m <= 8)
              for (int k = 0; k < m; ++k)
                for (const op kind :
                     {op::vocab_s, op::vocab_t, op::embed_forward, op::embed_backward})
                  REQUIRE(count(v, r, kind, k) == 1);
          }
          REQUIRE(v.action_count() == plain_plan(name, s).action_count() + 4u * p * m);
          ++checked;
        }
  CHECK(checked > 4000);
  // Three chunks for interleaved 1F1B too.
  for (const vocab_passes alg : algorithms)
    for (int p = 1; p <= 8; ++p)
      for (int m = p; m <= 32; m += 3) {
        const shape s{p, m, 3};
        if (!accepted("interleaved", s)) continue;
        INFO("interleaved v=3 p=" << p << " m=" << m);
        REQUIRE(validate(make_vocab_plan("interleaved", s, alg)).ok);
      }
}

TEST_CASE("1F1B with vocabulary passes: p - r - 1 + barriers warm-up forwards, peak p + 1 or p + 2",
          "[schedule][vocab]") {
  for (const vocab_passes alg : algorithms) {
    const int nb = vocab_barriers(alg);
    for (int p = 1; p <= 16; ++p)
      for (int m = 1; m <= 64; m += (m < 24 ? 1 : 5)) {
        const shape s{p, m, 1};
        const plan v = make_vocab_plan("1f1b", s, alg);
        INFO("p=" << p << " m=" << m << " barriers " << nb);
        // Warm-up: the forwards before the rank's first backward.
        for (int r = 0; r < p; ++r) {
          int forwards = 0;
          for (const action& a : v.for_rank(r)) {
            if (a.kind == op::backward) break;
            forwards += a.kind == op::forward ? 1 : 0;
          }
          CHECK(forwards == std::min(p - r - 1 + nb, m) + (p - r - 1 + nb < m ? 1 : 0));
        }
        const auto r = simulate(v, costs{.f = 1, .b = 1, .w = 1});
        // Rank 0 holds exactly p + 1 (one barrier) or p + 2 (two) microbatches once m >= p + nb.
        CHECK(r.ranks[0].peak_activations == std::min(p + nb, m));
        if (m >= p + nb) CHECK(r.ranks[0].peak_activations == p + nb);
        // Rank r holds min(p - r + nb, m): the last rank 1 + nb.
        for (int k = 0; k < p; ++k)
          CHECK(r.ranks[static_cast<std::size_t>(k)].peak_activations == std::min(p - k + nb, m));
      }
  }
}

TEST_CASE("1F1B and interleaved 1F1B keep their makespan with vocabulary passes",
          "[schedule][vocab]") {
  // f = b = w = 1, comm = 0. With S = T = IF = IB = 0 the makespan is exactly the plain
  // schedule's: (m + p - 1) 3 for 1F1B, 3m + 3(p - 1)/v interleaved. With each of them eps = 0.01
  // it stays within [plain, plain + 4 eps m]: the passes add their own work on each rank and no
  // bubble.
  const double eps = 0.01;
  for (const std::string_view name : {std::string_view("1f1b"), std::string_view("interleaved")})
    for (const vocab_passes alg : algorithms)
      for (int p = 1; p <= 16; ++p)
        for (int m = 1; m <= 64; m += (m < 20 ? 1 : 7)) {
          const shape s{p, m, chunks_for(name)};
          if (!accepted(name, s)) continue;
          INFO(name << " p=" << p << " m=" << m << " " << pipit::schedule::name(alg));
          const plan v = make_vocab_plan(name, s, alg);
          const double plain =
              simulate(plain_plan(name, s), costs{.f = 1, .b = 1, .w = 1}).makespan;
          CHECK(plain == (name == "1f1b" ? 3.0 * (m + p - 1) : 3.0 * m + 3.0 * (p - 1) / 2));
          CHECK(simulate(v, costs{.f = 1, .b = 1, .w = 1}).makespan == plain);
          const auto small = simulate(v, costs{.f = 1,
                                               .b = 1,
                                               .w = 1,
                                               .vocab_s = eps,
                                               .vocab_t = eps,
                                               .embed_f = eps,
                                               .embed_b = eps});
          CHECK(small.makespan >= plain);
          CHECK(small.makespan <= plain + 4 * eps * m + 1e-9);
        }
}

TEST_CASE("V-Half with vocabulary passes: every rank holds floor((p + 2) / 2) + barriers",
          "[schedule][vocab]") {
  for (const vocab_passes alg : algorithms) {
    const int nb = vocab_barriers(alg);
    for (int p = 1; p <= 16; ++p)
      for (int m = 1; m <= 64; m += (m < 24 ? 1 : 5)) {
        const shape s{p, m, 2};
        INFO("p=" << p << " m=" << m << " barriers " << nb);
        const plan v = make_vocab_plan("v-half", s, alg);
        const auto r = simulate(v, costs{.f = 1, .b = 1, .w = 1});
        const auto base = simulate(without_vocab(v), costs{.f = 1, .b = 1, .w = 1});
        const auto plain = simulate(plain_plan("v-half", s), costs{.f = 1, .b = 1, .w = 1});
        // Balanced: once m >= 2 floor(p / 2) + 1 + nb, every rank peaks at exactly
        // floor((p + 2) / 2) + nb, one unit per barrier above V-Half's; never above it.
        for (const auto& st : r.ranks) {
          CHECK(st.peak_activations <= (p + 2) / 2 + nb);
          if (m >= 2 * (p / 2) + 1 + nb) CHECK(st.peak_activations == (p + 2) / 2 + nb);
        }
        // The passes add no bubble to the stretched block; for p >= 2 and
        // m >= floor(p / 2) + 1 + nb the stretch costs exactly 1.5 (3 chunk slots) per barrier.
        CHECK(r.makespan == base.makespan);
        if (p == 1) CHECK(r.makespan == plain.makespan);
        if (p >= 2 && m >= p / 2 + 1 + nb) CHECK(r.makespan == plain.makespan + 1.5 * nb);
      }
  }
}

TEST_CASE("interleaved 1F1B with vocabulary passes: barriers / v more microbatches on rank 0",
          "[schedule][vocab]") {
  for (const vocab_passes alg : algorithms) {
    const int nb = vocab_barriers(alg);
    for (int p = 1; p <= 16; ++p)
      for (int m = p; m <= 64; m += 3) {
        const shape s{p, m, 2};
        if (!accepted("interleaved", s)) continue;
        INFO("p=" << p << " m=" << m << " barriers " << nb);
        const int g = interleaved_one_f_one_b::group_size(s);
        const auto r =
            simulate(make_vocab_plan("interleaved", s, alg), costs{.f = 1, .b = 1, .w = 1});
        CHECK(r.ranks[0].peak_activations == std::min(2 * (p - 1) + g + 1 + nb, 2 * m) / 2.0);
      }
  }
}

TEST_CASE("the collectives cost one comm each and the passes their durations",
          "[schedule][vocab]") {
  // p = 1: no collective latency, the passes just add their work.
  const plan one = make_vocab_plan("1f1b", shape{1, 4, 1}, vocab_passes::one_barrier);
  CHECK(simulate(one, costs{.f = 1, .b = 1, .w = 1, .comm = 0.5}).makespan == 12);
  CHECK(simulate(
            one,
            costs{.f = 1, .b = 1, .w = 1, .vocab_s = 1, .vocab_t = 2, .embed_f = 3, .embed_b = 4})
            .makespan == 12 + 4 * 10);
  // p = 2, m = 1: F0 | F1 (comm), S on both (broadcast: comm), BW1 after the barrier (comm),
  // BW0 (comm); IF before F0 adds a comm, IB after BW0 another.
  const plan two = make_vocab_plan("1f1b", shape{2, 1, 1}, vocab_passes::one_barrier);
  const double c = 0.25;
  const auto r = simulate(two, costs{.f = 1, .b = 1, .w = 1, .comm = c});
  // IF (0) -> F0 at c, F1 at 1 + 2c, S at 2 + 3c, BW1 at 2 + 4c .. 4 + 4c, BW0 4 + 5c .. 6 + 5c,
  // IB at 6 + 6c.
  CHECK(r.makespan == Approx(6 + 6 * c));
  const plan two_b = make_vocab_plan("1f1b", shape{2, 1, 1}, vocab_passes::two_barrier);
  CHECK(simulate(two_b, costs{.f = 1, .b = 1, .w = 1, .comm = c}).makespan == Approx(6 + 7 * c));
}

TEST_CASE("add_vocab_passes transforms the supported schedules' plans and refuses others",
          "[schedule][vocab]") {
  const shape s{4, 8, 1};
  const plan base = make_plan<one_f_one_b>(s);
  CHECK(add_vocab_passes(base, vocab_passes::one_barrier) ==
        make_vocab_plan("1f1b", s, vocab_passes::one_barrier));
  CHECK(add_vocab_passes(make_plan<v_half>(shape{4, 8, 2}), vocab_passes::two_barrier) ==
        make_vocab_plan("v-half", shape{4, 8, 2}, vocab_passes::two_barrier));
  CHECK(add_vocab_passes(make_plan<interleaved_one_f_one_b>(shape{4, 8, 2}),
                         vocab_passes::one_barrier)
            .vocab == vocab_passes::one_barrier);
  CHECK_THROWS_WITH(add_vocab_passes(make_plan<zb_v>(shape{4, 8, 2}), vocab_passes::one_barrier),
                    Catch::Contains("'zb-v' has no vocabulary-pass placement"));
  plan edited = base;
  std::swap(edited.ranks[3][0], edited.ranks[3][1]);
  CHECK_THROWS_WITH(add_vocab_passes(edited, vocab_passes::one_barrier),
                    Catch::Contains("not the unmodified '1f1b' plan"));
  CHECK_THROWS_AS(make_vocab_plan("interleaved", shape{4, 2, 2}, vocab_passes::one_barrier),
                  pipit::error);
  // The generic insertion places the passes in any plan, without delaying its backwards.
  for (int p = 1; p <= 8; ++p)
    for (int m = 1; m <= 24; m += 5) {
      const plan z =
          insert_vocab_passes(make_plan<zb_v>(shape{p, m, 2}), vocab_passes::two_barrier);
      INFO("zb-v p=" << p << " m=" << m);
      CHECK(validate(z).ok);
    }
  CHECK_THROWS_AS(insert_vocab_passes(base, vocab_passes::none), pipit::error);
  CHECK_THROWS_AS(insert_vocab_passes(lower(base), vocab_passes::one_barrier), pipit::error);
  // The fast path leaves vocabulary plans to the full checks.
  CHECK_FALSE(
      detail_validate::valid_unlowered_fast(make_vocab_plan("1f1b", s, vocab_passes::one_barrier)));
}

TEST_CASE("each vocabulary validation rule is caught on a hand-broken plan", "[schedule][vocab]") {
  const shape s{3, 4, 1};
  const plan good = make_vocab_plan("1f1b", s, vocab_passes::one_barrier);
  const plan good2 = make_vocab_plan("1f1b", s, vocab_passes::two_barrier);
  REQUIRE(validate(good).ok);
  REQUIRE(validate(good2).ok);
  plan p = good;

  SECTION("a vocabulary pass in a plain plan") {
    p = make_plan<one_f_one_b>(s);
    p.ranks[0].insert(p.ranks[0].begin(), make_action(op::embed_forward, 0, 0));
    CHECK(rule_of(p) == "unsupported");
    CHECK(std::string(validate(p).detail).find("plan.vocab is none") != std::string::npos);
  }
  SECTION("a plain plan marked as a vocabulary plan") {
    p = make_plan<one_f_one_b>(s);
    p.vocab = vocab_passes::one_barrier;
    CHECK(rule_of(p) == "order");  // F0.0 before its rank's IF
    p = good;
    p.vocab = vocab_passes::none;
    CHECK(rule_of(p) == "unsupported");
  }
  SECTION("a vocabulary plan marked lowered without its sends and receives") {
    p.lowered = true;
    CHECK(rule_of(p) == "recv-before-use");
  }
  SECTION("collective actions") {
    p.ranks[1].push_back(make_action(op::collective, 1, 0));
    CHECK(rule_of(p) == "unsupported");
  }
  SECTION("a vocabulary pass at another stage than the rank's chunk-0 stage") {
    p.ranks[1][find(p, 1, op::vocab_s, 2)].stage = 2;
    CHECK(rule_of(p) == "placement");
    p = good;
    p.ranks[1][find(p, 1, op::vocab_s, 2)].stage = 7;
    CHECK(rule_of(p) == "range");
  }
  SECTION("a vocabulary pass twice on a rank") {
    p.ranks[2].push_back(make_action(op::vocab_t, 2, 1));
    CHECK(rule_of(p) == "duplicate");
  }
  SECTION("a rank without one of its passes") {
    for (const op kind : {op::vocab_s, op::vocab_t, op::embed_forward, op::embed_backward}) {
      p = good;
      auto& acts = p.ranks[1];
      acts.erase(acts.begin() + static_cast<std::ptrdiff_t>(find(p, 1, kind, 3)));
      INFO(name(kind));
      const validation v = validate(p);
      // Without T nothing else breaks; without S the rank's T comes first; without IF the first
      // stage waits forever (the rank holding it is not rank 1); without IB: missing.
      CHECK(v.rule == (kind == op::vocab_s ? "order" : "missing"));
      if (kind != op::vocab_s) CHECK(v.rank == 1);
    }
  }
  SECTION("T before its S on a rank") {
    const std::size_t t = find(p, 0, op::vocab_t, 1), sp = find(p, 0, op::vocab_s, 1);
    move_to(p, 0, t, sp);
    CHECK(rule_of(p) == "order");
  }
  SECTION("S before the last stage's F on its rank") {
    const std::size_t sp = find(p, 2, op::vocab_s, 1), f = find(p, 2, op::forward, 1);
    move_to(p, 2, sp, f);
    CHECK(rule_of(p) == "order");
  }
  SECTION("the first stage's F before its rank's IF") {
    const std::size_t i = find(p, 0, op::embed_forward, 2), f = find(p, 0, op::forward, 2);
    move_to(p, 0, i, f + 1);
    CHECK(rule_of(p) == "order");
  }
  SECTION("the last stage's backward before its rank's S (one barrier) or T (two barriers)") {
    const std::size_t sp = find(p, 2, op::vocab_s, 1), b = find(p, 2, op::backward, 1);
    move_to(p, 2, sp, b);  // S after the backward
    CHECK(rule_of(p) == "order");
    p = good2;
    const std::size_t t = find(p, 2, op::vocab_t, 1), b2 = find(p, 2, op::backward, 1);
    move_to(p, 2, t, b2);
    CHECK(rule_of(p) == "order");
  }
  SECTION("IB before the first stage's backward on its rank") {
    const std::size_t i = find(p, 0, op::embed_backward, 1), b = find(p, 0, op::backward, 1);
    move_to(p, 0, i, b);
    CHECK(rule_of(p) == "order");
  }
  SECTION("a cycle through a barrier") {
    // Rank 1 runs its IB of microbatch 0 first: it needs the first stage's backward, which
    // needs rank 1's backward of microbatch 0.
    move_to(p, 1, find(p, 1, op::embed_backward, 0), 0);
    CHECK(rule_of(p) == "cycle");
    // Rank 2 runs IF of microbatch 3 after its forward of microbatch 3: F0.3 waits for it.
    p = good;
    const std::size_t i = find(p, 2, op::embed_forward, 3), f = find(p, 2, op::forward, 3);
    move_to(p, 2, i, f);
    CHECK(rule_of(p) == "cycle");
  }
}

TEST_CASE("vocabulary plans lower with their passes as collectives at one point of every rank",
          "[schedule][vocab][lower]") {
  for (const std::string_view schedule : {"1f1b", "interleaved", "v-half"})
    for (const vocab_passes alg : algorithms)
      for (int p = 1; p <= 8; ++p)
        for (int m = 1; m <= 16; m += (m < 4 ? 1 : 5)) {
          const shape s{p, m, chunks_for(schedule)};
          if (!accepted(schedule, s)) continue;
          const plan v = make_vocab_plan(schedule, s, alg);
          const plan l = lower(v);
          INFO(schedule << " " << name(alg) << " p=" << p << " m=" << m);
          REQUIRE(validate(l).ok);
          CHECK(l.lowered);
          CHECK(l.vocab == alg);
          // Lowering only adds sends and receives: the compute passes keep their order.
          for (int r = 0; r < p; ++r) {
            std::vector<action> compute;
            for (const action& a : l.for_rank(r))
              if (is_compute(a.kind)) compute.push_back(a);
            const auto orig = v.for_rank(r);
            CHECK(std::equal(compute.begin(), compute.end(), orig.begin(), orig.end()));
          }
          // The vocabulary passes come in the same order on every rank (one global order).
          std::vector<std::pair<op, int>> first;
          for (int r = 0; r < p; ++r) {
            std::vector<std::pair<op, int>> mine;
            for (const action& a : l.for_rank(r))
              if (is_vocabulary(a.kind)) mine.emplace_back(a.kind, a.microbatch);
            if (r == 0) first = mine;
            CHECK(mine == first);
          }
          // The same plan lowered twice is the same plan.
          CHECK(lower(v) == l);
        }
}

TEST_CASE("naive vocabulary passes are placed like two barriers", "[schedule][vocab]") {
  for (const std::string_view schedule : {"1f1b", "interleaved", "v-half"})
    for (int p = 1; p <= 6; ++p)
      for (int m = 1; m <= 12; m += 3) {
        const shape s{p, m, chunks_for(schedule)};
        if (!accepted(schedule, s)) continue;
        plan naive = make_vocab_plan(schedule, s, vocab_passes::naive);
        const plan two = make_vocab_plan(schedule, s, vocab_passes::two_barrier);
        INFO(schedule << " p=" << p << " m=" << m);
        CHECK(naive.vocab == vocab_passes::naive);
        CHECK(validate(naive).ok);
        naive.vocab = vocab_passes::two_barrier;
        CHECK(naive == two);
      }
  CHECK(vocab_barriers(vocab_passes::naive) == 2);
  CHECK(vocab_passes_by_name("naive") == vocab_passes::naive);
  CHECK(vocab_passes_by_name("one-barrier") == vocab_passes::one_barrier);
  CHECK(vocab_passes_by_name("two-barrier") == vocab_passes::two_barrier);
  CHECK(vocab_passes_by_name("none") == vocab_passes::none);
  CHECK_FALSE(vocab_passes_by_name("two_barrier").has_value());
}

TEST_CASE("collective vocabulary passes in different orders on two ranks are caught",
          "[schedule][vocab][lower]") {
  const shape s{3, 4, 1};
  const plan good = make_vocab_plan("1f1b", s, vocab_passes::one_barrier);
  // Rank 1 runs IB of microbatch 0 and of microbatch 1 the other way round: as collectives they
  // wait for each other forever.
  plan bad = good;
  auto& acts = bad.ranks[1];
  const auto ib0 = std::find(acts.begin(), acts.end(), make_action(op::embed_backward, 1, 0));
  const auto ib1 = std::find(acts.begin(), acts.end(), make_action(op::embed_backward, 1, 1));
  REQUIRE(ib0 != acts.end());
  REQUIRE(ib1 != acts.end());
  std::iter_swap(ib0, ib1);
  CHECK_THROWS_WITH(lower(bad), Catch::Contains("cannot execute with its vocabulary passes as "
                                                "collectives: rank"));
  // The same swap in a lowered plan: validate() names the deadlock.
  plan lowered = lower(good);
  auto& la = lowered.ranks[1];
  const auto l0 = std::find(la.begin(), la.end(), make_action(op::embed_backward, 1, 0));
  const auto l1 = std::find(la.begin(), la.end(), make_action(op::embed_backward, 1, 1));
  REQUIRE(l0 != la.end());
  REQUIRE(l1 != la.end());
  std::iter_swap(l0, l1);
  const validation v = validate(lowered);
  CHECK(v.rule == "deadlock");
  CHECK(std::string(v.detail).find("collective") != std::string::npos);
}
