// The plan model, validation, lowering and simulation, on GPipe and 1F1B (the generators with
// closed-form properties) and on hand-broken plans, one per validation rule.
#include <catch2/catch.hpp>

#include <string>

#include "pipit/schedule/gpipe.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/one_f_one_b.hpp"
#include "pipit/schedule/validate.hpp"
#include "pipit/sim/simulate.hpp"

using namespace pipit::schedule;
using pipit::sim::costs;
using pipit::sim::simulate;

TEST_CASE("action text form round-trips", "[schedule][action]") {
  for (int k = 0; k < op_count; ++k) {
    const action a = make_action(static_cast<op>(k), 12, 345);
    const auto back = parse_action(to_string(a));
    REQUIRE(back.has_value());
    CHECK(*back == a);
  }
  CHECK(to_string(make_action(op::forward, 3, 1)) == "F3.1");
  CHECK(to_string(make_action(op::backward, 0, 7)) == "BW0.7");
  STATIC_REQUIRE(parse_action("BW2.9")->kind == op::backward);
  STATIC_REQUIRE(parse_action("B2.9")->kind == op::backward_input);
  CHECK_FALSE(parse_action("X1.2"));
  CHECK_FALSE(parse_action("F1"));
  CHECK_FALSE(parse_action("F1.2x"));
  CHECK_FALSE(parse_action("F.2"));
  CHECK_FALSE(parse_action("F99999999999.1"));
}

TEST_CASE("placements map virtual stages to ranks", "[schedule][shape]") {
  const shape s{4, 8, 2};
  for (int st = 0; st < 8; ++st) {
    CHECK(rank_of(placement::looped, s, st) == st % 4);
    CHECK(stage_of(placement::looped, s, rank_of(placement::looped, s, st),
                   chunk_of(placement::looped, s, st)) == st);
    CHECK(stage_of(placement::v_shape, s, rank_of(placement::v_shape, s, st),
                   chunk_of(placement::v_shape, s, st)) == st);
  }
  CHECK(rank_of(placement::v_shape, s, 4) == 3);  // the V's tip: stages 3 and 4 share rank 3
  CHECK(rank_of(placement::v_shape, s, 7) == 0);  // rank 0 holds the first and the last stage
}

TEST_CASE("GPipe and 1F1B validate for every shape up to 16 stages and 64 microbatches",
          "[schedule][sweep]") {
  for (int p = 1; p <= 16; ++p)
    for (int m = 1; m <= 64; ++m) {
      const shape s{p, m, 1};
      const plan g = make_plan<gpipe>(s), o = make_plan<one_f_one_b>(s);
      REQUIRE(validate(g).ok);
      REQUIRE(validate(o).ok);
      if (m % 4 == 1 || p % 5 == 0) {  // lowering is the expensive part: a third of the sweep
        const auto lg = validate(lower(g)), lo = validate(lower(o));
        INFO(to_string(lg) << " / " << to_string(lo));
        REQUIRE(lg.ok);
        REQUIRE(lo.ok);
      }
    }
}

TEST_CASE("GPipe and 1F1B match the closed forms with zero latency", "[schedule][sim]") {
  const costs c{.f = 1.0, .b = 1.5, .w = 0.5};  // combined backward 2
  const double fb = c.f + c.b + c.w;
  for (int p = 1; p <= 16; ++p)
    for (int m = 1; m <= 48; m += (m < 8 ? 1 : 5)) {
      const shape s{p, m, 1};
      const auto g = simulate(make_plan<gpipe>(s), c);
      const auto o = simulate(make_plan<one_f_one_b>(s), c);
      INFO("p=" << p << " m=" << m);
      CHECK(g.makespan == Approx((m + p - 1) * fb));
      CHECK(o.makespan == Approx((m + p - 1) * fb));
      CHECK(o.bubble_fraction == Approx(double(p - 1) / (m + p - 1)));
      for (int r = 0; r < p; ++r) {
        CHECK(o.ranks[r].peak_activations == Approx(std::min(p - r, m)));
        CHECK(g.ranks[r].peak_activations == Approx(m));
        CHECK(o.ranks[r].busy == Approx(m * fb));
      }
    }
}

TEST_CASE("latency delays every cross-rank dependency", "[schedule][sim]") {
  // 1F1B: the critical path crosses p - 1 boundaries on the way down and p - 1 back up.
  const int p = 4, m = 8;
  const auto base = simulate(make_plan<one_f_one_b>(shape{p, m, 1}), {.f = 1, .b = 2, .w = 0});
  const auto slow =
      simulate(make_plan<one_f_one_b>(shape{p, m, 1}), {.f = 1, .b = 2, .w = 0, .comm = 0.25});
  CHECK(slow.makespan > base.makespan);
  // Lowering adds no time: communication is already the latency on the dependency.
  const auto lowered = simulate(lower(make_plan<one_f_one_b>(shape{p, m, 1})),
                                {.f = 1, .b = 2, .w = 0, .comm = 0.25});
  CHECK(lowered.makespan == Approx(slow.makespan));
  // Per-stage scale: a last stage twice as slow stretches the steady state.
  costs c{.f = 1, .b = 2, .w = 0};
  c.stage_scale = {1, 1, 1, 2};
  const auto skewed = simulate(make_plan<one_f_one_b>(shape{p, m, 1}), c);
  CHECK(skewed.makespan > base.makespan + (m - 1) * 3 - 1e-9);
  c.stage_scale = {1, 1};
  CHECK_THROWS_WITH(simulate(make_plan<one_f_one_b>(shape{p, m, 1}), c),
                    Catch::Contains("stage_scale has 2 entries"));
}

namespace {
constexpr auto one_f_one_b_4x8 = make_plan<one_f_one_b, shape{.stages = 4, .microbatches = 8}>();
constexpr auto lowered_4x8 = freeze<[] { return lower(make_plan<one_f_one_b>(shape{4, 8, 1})); }>();
}  // namespace

TEST_CASE("plans made at compile time equal plans made at run time", "[schedule][constexpr]") {
  STATIC_REQUIRE(validate(one_f_one_b_4x8).ok);
  STATIC_REQUIRE(validate(lowered_4x8).ok);
  STATIC_REQUIRE(lowered_4x8.lowered);
  const int stages = static_cast<int>(std::string("abcd").size());  // a run-time value
  CHECK(one_f_one_b_4x8.to_plan() == make_plan<one_f_one_b>(shape{stages, 8, 1}));
  CHECK(lowered_4x8.to_plan() == lower(make_plan<one_f_one_b>(shape{stages, 8, 1})));
  constexpr auto gp = make_plan<gpipe, shape{.stages = 3, .microbatches = 5}>();
  CHECK(gp.to_plan() == make_plan<gpipe>(shape{3, 5, 1}));
}

TEST_CASE("refused shapes name the schedule, the rule and the values", "[schedule][shape]") {
  CHECK_THROWS_WITH(make_plan<one_f_one_b>(shape{0, 4, 1}),
                    Catch::Contains("'1f1b'") && Catch::Contains("shape.stages must be >= 1") &&
                        Catch::Contains("stages=0, microbatches=4, chunks=1"));
  CHECK_THROWS_WITH(make_plan<gpipe>(shape{2, 0, 1}),
                    Catch::Contains("shape.microbatches must be >= 1"));
  CHECK_THROWS_WITH(make_plan<gpipe>(shape{2, 4, 3}),
                    Catch::Contains("chunks must be 1") && Catch::Contains("chunks=3"));
  CHECK_THROWS_AS(make_plan<gpipe>(shape{4096, 4096, 1}), pipit::error);
}

namespace {
// Runs validate() and returns the rule it reports.
std::string rule_of(const plan& p) {
  const auto v = validate(p);
  INFO(to_string(v));
  return std::string(v.rule);
}
}  // namespace

TEST_CASE("each validation rule catches its fault and names it", "[schedule][validate]") {
  const plan good = make_plan<one_f_one_b>(shape{3, 4, 1});
  REQUIRE(rule_of(good).empty());

  plan p = good;
  p.ranks.pop_back();
  CHECK(rule_of(p) == "shape");

  p = good;
  p.ranks[0][0].microbatch = 9;
  CHECK(rule_of(p) == "range");

  p = good;
  p.ranks[0].push_back(make_action(op::forward, 1, 0));  // stage 1 lives on rank 1
  CHECK(rule_of(p) == "placement");

  p = good;
  p.ranks[1].push_back(make_action(op::vocab_s, 1, 0));
  CHECK(rule_of(p) == "unsupported");

  p = good;
  p.ranks[1].push_back(make_action(op::send_forward, 1, 0, 2));
  CHECK(rule_of(p) == "communication");

  p = good;
  p.ranks[2].push_back(make_action(op::forward, 2, 0));
  CHECK(rule_of(p) == "duplicate");

  p = good;
  p.ranks[2].push_back(make_action(op::backward_weight, 2, 0));
  CHECK(rule_of(p) == "mixed-backward");

  p = good;
  p.ranks[2].pop_back();
  CHECK(rule_of(p) == "missing");

  p = good;  // rank 2 (the last): F2.0 BW2.0 ...; swap them
  std::swap(p.ranks[2][0], p.ranks[2][1]);
  CHECK(rule_of(p) == "order");

  p = good;  // rank 0 runs its first backward before the forwards the other ranks wait for
  p.ranks[0] = {make_action(op::forward, 0, 0), make_action(op::backward, 0, 0),
                make_action(op::forward, 0, 1), make_action(op::backward, 0, 1),
                make_action(op::forward, 0, 2), make_action(op::backward, 0, 2),
                make_action(op::forward, 0, 3), make_action(op::backward, 0, 3)};
  p.ranks[2] = {make_action(op::forward, 2, 1), make_action(op::backward, 2, 1),
                make_action(op::forward, 2, 0), make_action(op::backward, 2, 0),
                make_action(op::forward, 2, 2), make_action(op::backward, 2, 2),
                make_action(op::forward, 2, 3), make_action(op::backward, 2, 3)};
  CHECK(rule_of(p) == "cycle");
}

TEST_CASE("validation of lowered plans catches missing, early and deadlocking communication",
          "[schedule][validate][lower]") {
  const plan good = lower(make_plan<one_f_one_b>(shape{3, 4, 1}));
  REQUIRE(rule_of(good).empty());
  const auto find = [](const std::vector<action>& acts, op k, int mb) {
    for (std::size_t i = 0; i < acts.size(); ++i)
      if (acts[i].kind == k && acts[i].microbatch == mb) return i;
    return acts.size();
  };

  plan p = good;  // drop rank 1's receive of microbatch 2's activation
  p.ranks[1].erase(p.ranks[1].begin() + static_cast<long>(find(p.ranks[1], op::recv_forward, 2)));
  CHECK(rule_of(p) == "recv-before-use");

  p = good;  // drop rank 0's send of microbatch 0
  p.ranks[0].erase(p.ranks[0].begin() + static_cast<long>(find(p.ranks[0], op::send_forward, 0)));
  CHECK(rule_of(p) == "unmatched");

  p = good;  // send before the value exists
  {
    const auto i = find(p.ranks[0], op::send_forward, 1);
    std::swap(p.ranks[0][i], p.ranks[0][i - 1]);
  }
  CHECK(rule_of(p) == "send-after-produce");

  p = good;  // wrong peer
  p.ranks[0][find(p.ranks[0], op::send_forward, 0)].peer = 2;
  CHECK(rule_of(p) == "communication");

  // Deadlock: rank 1 receives microbatch 1 before it sends microbatch 0's activation, while rank 0
  // sends microbatch 1 only after receiving microbatch 0's gradient ... through rank 2, which
  // waits on rank 1. Build it by moving rank 0's send of microbatch 1 after its first RB.
  p = good;
  {
    auto& r0 = p.ranks[0];
    const auto s1 = find(r0, op::send_forward, 1);
    const action moved = r0[s1];
    r0.erase(r0.begin() + static_cast<long>(s1));
    const auto rb0 = find(r0, op::backward, 0);
    r0.insert(r0.begin() + static_cast<long>(rb0) + 1, moved);
    auto& r1 = p.ranks[1];  // and make rank 1 need microbatch 1 before it sends microbatch 0
    const auto recv1 = find(r1, op::recv_forward, 1);
    const action rf = r1[recv1];
    r1.erase(r1.begin() + static_cast<long>(recv1));
    r1.insert(r1.begin() + static_cast<long>(find(r1, op::send_forward, 0)), rf);
  }
  CHECK(rule_of(p) == "deadlock");
}

TEST_CASE("lowering puts each receive next to its send and keeps the compute order",
          "[schedule][lower]") {
  const plan p = make_plan<one_f_one_b>(shape{4, 6, 1});
  const plan l = lower(p);
  for (int r = 0; r < 4; ++r) {
    std::vector<action> compute;
    for (const auto& a : l.for_rank(r))
      if (is_compute(a.kind)) compute.push_back(a);
    CHECK(compute == p.ranks[static_cast<std::size_t>(r)]);
  }
  // 3 boundaries x 6 microbatches x (activation + gradient), each a send and a receive.
  CHECK(l.action_count() == p.action_count() + 3 * 6 * 2 * 2);
  CHECK(lower(l) == l);  // idempotent
  for (const auto& st : steps_of(l.for_rank(1)))
    if (st.communication) CHECK(st.end - st.begin <= 3);  // a step pairs at most a few transfers
  CHECK_THROWS_WITH(lower([&] {
                      plan bad = p;
                      bad.ranks[0].push_back(make_action(op::send_forward, 0, 0, 1));
                      return bad;
                    }()),
                    Catch::Contains("is not lowered but contains SF0.0"));
}
