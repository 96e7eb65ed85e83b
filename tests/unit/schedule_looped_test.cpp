// Interleaved 1F1B, ZB-H1 and ZB-H2 (the looped-placement generators beyond 1F1B): validity of
// every plan and of its lowering over a sweep of shapes, the makespan and memory closed forms
// stated in each header, compile-time plans, and refused shapes.
#include <catch2/catch.hpp>

#include <algorithm>
#include <string>

#include "pipit/schedule/interleaved_one_f_one_b.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/validate.hpp"
#include "pipit/schedule/zb_h1.hpp"
#include "pipit/schedule/zb_h2.hpp"
#include "pipit/sim/simulate.hpp"

using namespace pipit::schedule;
using pipit::sim::costs;
using pipit::sim::simulate;

namespace {

// validate(plan) and, when `lowered`, validate(lower(plan)); the failing rule in the message.
void require_valid(const plan& pl, bool lowered = true) {
  const auto v = validate(pl);
  INFO(pl.schedule << " " << to_string(pl.shp) << ": " << to_string(v));
  REQUIRE(v.ok);
  if (!lowered) return;
  const auto lv = validate(lower(pl));
  INFO("lowered: " << to_string(lv));
  REQUIRE(lv.ok);
}

// The interleaved warm-up plus the forward that precedes the first backward, capped at m v.
int interleaved_peak_chunks(int p, int m, int v, int g, int r) {
  return std::min(2 * (p - r - 1) + (v - 1) * g + 1, m * v);
}

}  // namespace

TEST_CASE("interleaved 1F1B picks the smallest group that keeps Megatron's rule",
          "[schedule][interleaved]") {
  using il = interleaved_one_f_one_b;
  STATIC_REQUIRE(il::group_size(shape{4, 8, 2}) == 4);
  STATIC_REQUIRE(il::group_size(shape{4, 10, 2}) == 5);  // 10 mod 4 = 2 < 4; 10 mod 5 = 0
  STATIC_REQUIRE(il::group_size(shape{3, 7, 2}) == 4);   // 7 mod 3 = 1 < 3; 7 mod 4 = 3 >= 3
  STATIC_REQUIRE(il::group_size(shape{4, 5, 3}) == 5);
  for (int p = 1; p <= 16; ++p)
    for (int m = p; m <= 64; ++m) {
      const shape s{p, m, 2};
      const int g = il::group_size(s);
      INFO("p=" << p << " m=" << m << " G=" << g);
      REQUIRE(il::valid_group(s, g));
      for (int smaller = p; smaller < g; ++smaller) CHECK_FALSE(il::valid_group(s, smaller));
    }
}

TEST_CASE("interleaved 1F1B follows Megatron's microbatch table", "[schedule][interleaved]") {
  // Megatron's documented example: p = 2, v = 2, G = 3, m = 5 visits microbatches
  // 0 1 2 0 1 2 3 4 3 4 with chunks 0 0 0 1 1 1 0 0 1 1.
  const plan pl = make_plan<interleaved_one_f_one_b_t<3>>(shape{2, 5, 2});
  const int mbs[] = {0, 1, 2, 0, 1, 2, 3, 4, 3, 4}, chunks[] = {0, 0, 0, 1, 1, 1, 0, 0, 1, 1};
  for (int r = 0; r < 2; ++r) {
    int f = 0, b = 0;
    for (const action& a : pl.for_rank(r)) {
      if (a.kind == op::forward) {
        CHECK(a.microbatch == mbs[f]);
        CHECK(a.stage == chunks[f] * 2 + r);
        ++f;
      } else {
        REQUIRE(a.kind == op::backward);
        CHECK(a.microbatch == mbs[b]);
        CHECK(a.stage == (1 - chunks[b]) * 2 + r);
        ++b;
      }
    }
    CHECK(f == 10);
    CHECK(b == 10);
  }
  // Warm-up on rank r: 2 (p - r - 1) + (v - 1) G forwards before the steady state's first F.
  CHECK(pl.ranks[0][6].kind == op::backward);
  CHECK(pl.ranks[1][4].kind == op::backward);
}

TEST_CASE("interleaved 1F1B validates for every shape up to 16 stages and 64 microbatches",
          "[schedule][interleaved][sweep]") {
  for (int p = 1; p <= 16; ++p)
    for (int m = p; m <= 64; ++m)
      for (int v = 1; v <= 4; ++v) {
        if (v == 1 && m % 4 != 0) continue;  // v = 1 degrades to a 1F1B-like order
        // Lowering is the expensive part: all small shapes, a quarter of the larger ones.
        require_valid(make_plan<interleaved_one_f_one_b>(shape{p, m, v}),
                      m <= 16 || m % 4 == p % 4);
      }
}

TEST_CASE("interleaved 1F1B validates with explicit group sizes", "[schedule][interleaved]") {
  const auto sweep = []<int G>() {
    using il = interleaved_one_f_one_b_t<G>;
    for (int p = 1; p <= G; ++p)
      for (int m = G; m <= 40; ++m)
        for (int v = 2; v <= 3; ++v) {
          const shape s{p, m, v};
          if (il::check(s) != shape_rule::ok) continue;
          require_valid(make_plan<il>(s));
          const auto res = simulate(make_plan<il>(s), costs{.f = 1, .b = 1, .w = 0});
          INFO("G=" << G << " p=" << p << " m=" << m << " v=" << v);
          CHECK(res.makespan == Approx(2.0 * m + 2.0 * (p - 1) / v));
          for (int r = 0; r < p; ++r)
            CHECK(res.ranks[r].peak_activations ==
                  Approx(double(interleaved_peak_chunks(p, m, v, G, r)) / v));
        }
  };
  sweep.operator()<3>();
  sweep.operator()<4>();
  sweep.operator()<5>();
  sweep.operator()<7>();
}

TEST_CASE("ZB-H1 and ZB-H2 validate for every shape up to 16 stages and 64 microbatches",
          "[schedule][zero-bubble][sweep]") {
  for (int p = 1; p <= 16; ++p)
    for (int m = 1; m <= 64; ++m) {
      const shape s{p, m, 1};
      const plan h1 = make_plan<zb_h1>(s), h2 = make_plan<zb_h2>(s);
      require_valid(h1);
      require_valid(h2);
      for (const plan* pl : {&h1, &h2})
        for (const auto& acts : pl->ranks)
          for (const action& a : acts) CHECK(a.kind != op::backward);  // split backward only
    }
}

TEST_CASE("interleaved 1F1B divides 1F1B's bubble by the chunk count",
          "[schedule][interleaved][sim]") {
  // Chunk passes take f / v and (b + w) / v; makespan m (f + b + w) + (p - 1)(f + b + w) / v.
  const costs unit{.f = 1, .b = 1, .w = 0};        // combined backward 1
  const costs skewed{.f = 1, .b = 1.5, .w = 0.5};  // combined backward 2
  for (int p = 1; p <= 16; ++p)
    for (int m = p; m <= 64; m += (m < 3 * p ? 1 : p))
      for (int v = 1; v <= 4; ++v) {
        const shape s{p, m, v};
        const plan pl = make_plan<interleaved_one_f_one_b>(s);
        const int g = interleaved_one_f_one_b::group_size(s);
        INFO("p=" << p << " m=" << m << " v=" << v << " G=" << g);
        for (const costs& c : {unit, skewed}) {
          const double fb = c.f + c.b + c.w;
          const auto res = simulate(pl, c);
          CHECK(res.makespan == Approx(m * fb + (p - 1) * fb / v));
          for (int r = 0; r < p; ++r) {
            CHECK(res.ranks[r].busy == Approx(m * fb));
            CHECK(res.ranks[r].peak_activations ==
                  Approx(double(interleaved_peak_chunks(p, m, v, g, r)) / v));
          }
        }
      }
  // Rank 0 with G = p, m >= 2p: p + (p - 1) / v microbatches in flight.
  const auto res = simulate(make_plan<interleaved_one_f_one_b>(shape{4, 16, 2}), unit);
  CHECK(res.ranks[0].peak_activations == Approx(4 + 3.0 / 2));
}

TEST_CASE("ZB-H1 cuts 1F1B's bubble to a third at 1F1B's memory", "[schedule][zero-bubble][sim]") {
  for (int p = 1; p <= 16; ++p)
    for (int m = 1; m <= 64; m += (m < 2 * p ? 1 : 3)) {
      const plan pl = make_plan<zb_h1>(shape{p, m, 1});
      INFO("p=" << p << " m=" << m);
      const auto res = simulate(pl, costs{});  // f = b = w = 1
      const auto at_b = simulate(pl, costs{.free_at_b = 1});
      if (m >= p) {
        CHECK(res.makespan == Approx(3 * m + p - 1));  // m (f + b + w) + (p - 1)(f + b - w)
        for (const costs& c : {costs{.f = 1, .b = 1.5, .w = 0.5}, costs{.f = 2, .b = 1, .w = 1},
                               costs{.f = 1, .b = 3, .w = 0.75}}) {
          const auto r2 = simulate(pl, c);
          CHECK(r2.makespan == Approx(m * (c.f + c.b + c.w) + (p - 1) * (c.f + c.b - c.w)));
        }
      } else {
        CHECK(res.makespan == Approx(2 * (m + p) - 1));
      }
      for (int r = 0; r < p; ++r) {
        // W frees: rank r holds its 1F1B window plus r deferred W's; B frees: 1F1B's p - r.
        CHECK(res.ranks[r].peak_activations == Approx(std::min(p, m)));
        CHECK(at_b.ranks[r].peak_activations == Approx(std::min(p - r, m)));
      }
    }
}

TEST_CASE("ZB-H2 keeps every rank busy from its first F to its last W",
          "[schedule][zero-bubble][sim]") {
  for (int p = 1; p <= 16; ++p)
    for (int m = 1; m <= 64; m += (m < 2 * p ? 1 : 3)) {
      const plan pl = make_plan<zb_h2>(shape{p, m, 1});
      INFO("p=" << p << " m=" << m);
      const auto res = simulate(pl, costs{});  // f = b = w = 1
      const auto at_b = simulate(pl, costs{.free_at_b = 1});
      if (m >= 2 * p - 1) {
        CHECK(res.makespan == Approx(3 * m + p - 1));
        for (int r = 0; r < p; ++r) {
          CHECK(res.ranks[r].first_start == Approx(r));
          CHECK(res.ranks[r].last_end - res.ranks[r].first_start == Approx(3 * m));
        }
        for (const costs& c : {costs{.f = 1, .b = 1.5, .w = 0.5}, costs{.f = 1, .b = 2, .w = 1},
                               costs{.f = 3, .b = 2, .w = 1}}) {
          const auto r2 = simulate(pl, c);
          CHECK(r2.makespan ==
                Approx(m * (c.f + c.b + c.w) + (p - 1) * std::max(c.f, c.f + c.b - 2 * c.w)));
        }
      }
      for (int r = 0; r < p; ++r) {
        // W frees: 2 (p - r) - 1 warm-up forwards plus 2r deferred W's; B frees: the warm-up.
        CHECK(res.ranks[r].peak_activations == Approx(std::min(2 * p - 1, m)));
        CHECK(at_b.ranks[r].peak_activations == Approx(std::min(2 * (p - r) - 1, m)));
      }
    }
}

namespace {
constexpr auto interleaved_4x8x2 =
    make_plan<interleaved_one_f_one_b, shape{.stages = 4, .microbatches = 8, .chunks = 2}>();
constexpr auto interleaved_g5 =
    make_plan<interleaved_one_f_one_b_t<5>, shape{.stages = 4, .microbatches = 10, .chunks = 3}>();
constexpr auto zb_h1_4x8 = make_plan<zb_h1, shape{.stages = 4, .microbatches = 8}>();
constexpr auto zb_h2_4x8 = make_plan<zb_h2, shape{.stages = 4, .microbatches = 8}>();
constexpr auto zb_h2_lowered = freeze<[] { return lower(make_plan<zb_h2>(shape{3, 6, 1})); }>();
}  // namespace

TEST_CASE("looped plans made at compile time equal plans made at run time",
          "[schedule][constexpr]") {
  STATIC_REQUIRE(validate(interleaved_4x8x2).ok);
  STATIC_REQUIRE(validate(interleaved_g5).ok);
  STATIC_REQUIRE(validate(zb_h1_4x8).ok);
  STATIC_REQUIRE(validate(zb_h2_4x8).ok);
  STATIC_REQUIRE(validate(zb_h2_lowered).ok);
  STATIC_REQUIRE(interleaved_4x8x2.schedule == "interleaved");
  STATIC_REQUIRE(zb_h1_4x8.split_backward && zb_h2_4x8.split_backward);
  const int stages = static_cast<int>(std::string("abcd").size());  // a run-time value
  CHECK(interleaved_4x8x2.to_plan() == make_plan<interleaved_one_f_one_b>(shape{stages, 8, 2}));
  CHECK(interleaved_g5.to_plan() == make_plan<interleaved_one_f_one_b_t<5>>(shape{stages, 10, 3}));
  CHECK(zb_h1_4x8.to_plan() == make_plan<zb_h1>(shape{stages, 8, 1}));
  CHECK(zb_h2_4x8.to_plan() == make_plan<zb_h2>(shape{stages, 8, 1}));
  CHECK(zb_h2_lowered.to_plan() == lower(make_plan<zb_h2>(shape{stages - 1, 6, 1})));
}

TEST_CASE("looped schedules refuse shapes naming the rule and the values", "[schedule][shape]") {
  using il = interleaved_one_f_one_b;
  STATIC_REQUIRE(il::check(shape{4, 3, 2}) == shape_rule::interleaved_microbatches_at_least_stages);
  STATIC_REQUIRE(interleaved_one_f_one_b_t<3>::check(shape{4, 8, 2}) ==
                 shape_rule::interleaved_group_size);  // G < p
  STATIC_REQUIRE(interleaved_one_f_one_b_t<5>::check(shape{4, 8, 2}) ==
                 shape_rule::interleaved_group_size);  // 8 mod 5 = 3 < 4
  STATIC_REQUIRE(interleaved_one_f_one_b_t<9>::check(shape{4, 8, 2}) ==
                 shape_rule::interleaved_group_size);  // G > m
  STATIC_REQUIRE(interleaved_one_f_one_b_t<6>::check(shape{4, 10, 2}) == shape_rule::ok);

  CHECK_THROWS_AS(make_plan<il>(shape{4, 3, 2}), pipit::error);
  CHECK_THROWS_WITH(make_plan<il>(shape{4, 3, 2}),
                    Catch::Contains("'interleaved'") &&
                        Catch::Contains("needs shape.microbatches >= shape.stages") &&
                        Catch::Contains("stages=4, microbatches=3, chunks=2"));
  CHECK_THROWS_WITH(make_plan<interleaved_one_f_one_b_t<5>>(shape{4, 8, 2}),
                    Catch::Contains("microbatch group G needs stages <= G <= microbatches") &&
                        Catch::Contains("with group size G = 5") &&
                        Catch::Contains("stages=4, microbatches=8, chunks=2"));
  CHECK_THROWS_WITH(make_plan<il>(shape{4, 3, 2}), !Catch::Contains("group size G ="));
  CHECK_THROWS_WITH(make_plan<il>(shape{2, 4, 0}), Catch::Contains("chunks must be >= 1"));
  CHECK_THROWS_WITH(make_plan<zb_h1>(shape{4, 8, 2}),
                    Catch::Contains("'zb-h1'") && Catch::Contains("chunks must be 1") &&
                        Catch::Contains("stages=4, microbatches=8, chunks=2"));
  CHECK_THROWS_WITH(make_plan<zb_h2>(shape{4, 0, 1}),
                    Catch::Contains("'zb-h2'") &&
                        Catch::Contains("shape.microbatches must be >= 1") &&
                        Catch::Contains("stages=4, microbatches=0, chunks=1"));
}
