// The V-shaped generators (V-Min, V-Half, ZB-V, DualPipeV): validity over a sweep of shapes,
// their lowered forms, the closed forms of peak activations and makespan the simulator
// measures (f = b = w = 1, comm = 0, free_at_b = 0), compile-time generation, refused shapes.
#include <catch2/catch.hpp>

#include <algorithm>
#include <string>
#include <type_traits>

#include "pipit/schedule/dualpipe_v.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/one_f_one_b.hpp"
#include "pipit/schedule/v_half.hpp"
#include "pipit/schedule/v_min.hpp"
#include "pipit/schedule/validate.hpp"
#include "pipit/schedule/zb_v.hpp"
#include "pipit/sim/simulate.hpp"

using namespace pipit::schedule;
using pipit::sim::simulate;

namespace {

// Smallest microbatch count each schedule accepts for p stages.
template <class S>
int min_microbatches(int p) {
  return std::is_same_v<S, dualpipe_v> ? 2 * p : 1;
}

double peak_of(const pipit::sim::result& r) {
  double peak = 0;
  for (const auto& st : r.ranks) peak = std::max(peak, st.peak_activations);
  return peak;
}

template <class S>
void sweep() {
  for (int p = 1; p <= 16; ++p)
    for (int m = min_microbatches<S>(p); m <= 64; ++m) {
      const plan pl = make_plan<S>(shape{p, m, 2});
      INFO(S::name << " p=" << p << " m=" << m);
      const auto v = validate(pl);
      INFO(to_string(v));
      REQUIRE(v.ok);
      const auto lv = validate(lower(pl));
      INFO(to_string(lv));
      REQUIRE(lv.ok);
    }
}

}  // namespace

TEST_CASE("V-shaped plans validate for every shape up to 16 stages and 64 microbatches",
          "[schedule][v][sweep]") {
  sweep<v_min>();
  sweep<v_half>();
  sweep<zb_v>();
  sweep<dualpipe_v>();
}

TEST_CASE("V-Min holds min of m and floor of p+4 over 3 activations", "[schedule][v][sim]") {
  // 1F1B holds p. With f = b = w the idle time per rank is 2p - 5/2 (none for p = 1), one more
  // when 3 divides p and m >= 2 (the block's gap), against 1F1B's 3(p - 1).
  for (int p = 1; p <= 16; ++p)
    for (int m = 1; m <= 64; ++m) {
      const auto r = simulate(make_plan<v_min>(shape{p, m, 2}), {});
      INFO("p=" << p << " m=" << m);
      CHECK(peak_of(r) == Approx(std::min(m, (p + 4) / 3)));
      const double idle = p == 1 ? 0 : 2 * p - 2.5 + (p % 3 == 0 && m >= 2 ? 1 : 0);
      CHECK(r.makespan == Approx(3 * m + idle));
    }
}

TEST_CASE("V-Half holds min of m and floor of p+2 over 2 activations", "[schedule][v][sim]") {
  // Once m > p / 2 the idle time per rank is 7/2 floor(p / 2), one less for even p (the
  // block's gap), against 1F1B's 3(p - 1): about 7/12 of it.
  for (int p = 1; p <= 16; ++p)
    for (int m = 1; m <= 64; ++m) {
      const auto r = simulate(make_plan<v_half>(shape{p, m, 2}), {});
      INFO("p=" << p << " m=" << m);
      CHECK(peak_of(r) == Approx(std::min(m, (p + 2) / 2)));
      if (m > p / 2) CHECK(r.makespan == Approx(3 * m + 3.5 * (p / 2) - (p % 2 == 0 ? 1 : 0)));
    }
}

TEST_CASE("ZB-V stays within 1F1B memory and reaches the makespan bound", "[schedule][v][sim]") {
  for (int p = 1; p <= 16; ++p)
    for (int m = 1; m <= 64; ++m) {
      const auto r = simulate(make_plan<zb_v>(shape{p, m, 2}), {});
      INFO("p=" << p << " m=" << m);
      CHECK(peak_of(r) == Approx(std::min(m, p)));
      // No plan beats 3m + (p - 1)/2 (rank p - 1 starts at (p - 1)/2 with 3m of work) nor
      // 2p + m - 1/2 (the V's tip runs 2m forwards before the last one leaves it).
      const double bound = std::max(3 * m + (p - 1) / 2.0, 2 * p + m - 0.5);
      CHECK(r.makespan >= bound - 1e-9);
      if (m >= 2 * p - 1) {  // the closed-form phases: the bound, on every rank p units
        CHECK(r.makespan == Approx(bound));
        CHECK(r.bubble_fraction == Approx((p - 1.0) / (6 * m + p - 1)));
        for (int rk = 0; rk < p; ++rk) {
          CHECK(r.ranks[rk].peak_activations == Approx(p));
          CHECK(r.ranks[rk].idle == Approx((p - 1) / 2.0));
          CHECK(r.ranks[rk].first_start == Approx(rk / 2.0));
        }
      } else if (2 * m <= p || m == p) {  // the list scheduler, where it is optimal
        CHECK(r.makespan == Approx(bound));
      } else {  // and elsewhere within 11.2 percent of the bound
        CHECK(r.makespan <= 1.112 * bound);
      }
    }
}

TEST_CASE("DualPipeV holds p+1/2 activations and reaches the makespan bound",
          "[schedule][v][sim]") {
  for (int p = 1; p <= 16; ++p)
    for (int m = 2 * p; m <= 64; ++m) {
      const plan pl = make_plan<dualpipe_v>(shape{p, m, 2});
      const auto r = simulate(pl, {});
      INFO("p=" << p << " m=" << m);
      CHECK(r.makespan == Approx(3 * m + (p - 1) / 2.0));
      for (int rk = 0; rk < p; ++rk) {
        CHECK(r.ranks[rk].peak_activations == Approx(p + 0.5));
        // 2p - r - 1 split backwards (phases 3, 6 and 7), the rest combined.
        const auto& acts = pl.ranks[rk];
        CHECK(std::count_if(acts.begin(), acts.end(), [](const action& a) {
                return a.kind == op::backward_input;
              }) == 2 * p - rk - 1);
      }
    }
}

TEST_CASE("V-shaped schedules beat 1F1B's bubble at its memory or less", "[schedule][v][sim]") {
  const int p = 8, m = 32;
  const auto base = simulate(make_plan<one_f_one_b>(shape{p, m, 1}), {});
  const auto vmin = simulate(make_plan<v_min>(shape{p, m, 2}), {});
  const auto vhalf = simulate(make_plan<v_half>(shape{p, m, 2}), {});
  const auto zbv = simulate(make_plan<zb_v>(shape{p, m, 2}), {});
  const auto dpv = simulate(make_plan<dualpipe_v>(shape{p, m, 2}), {});
  CHECK(zbv.makespan < vhalf.makespan);
  CHECK(vhalf.makespan < vmin.makespan);
  CHECK(vmin.makespan < base.makespan);
  CHECK(dpv.makespan < base.makespan);
  CHECK(peak_of(vmin) < peak_of(vhalf));
  CHECK(peak_of(vhalf) < peak_of(zbv));
  CHECK(peak_of(zbv) <= peak_of(base));
  // Uneven costs, latency and early freeing keep the plans executable.
  const pipit::sim::costs c{.f = 1.0, .b = 1.3, .w = 0.6, .comm = 0.05, .free_at_b = 0.3};
  CHECK(simulate(make_plan<zb_v>(shape{p, m, 2}), c).makespan > 0);
  CHECK(simulate(lower(make_plan<v_half>(shape{p, m, 2})), c).makespan > 0);
}

namespace {
constexpr auto v_min_4x8 = make_plan<v_min, shape{.stages = 4, .microbatches = 8, .chunks = 2}>();
constexpr auto v_half_4x8 = make_plan<v_half, shape{.stages = 4, .microbatches = 8, .chunks = 2}>();
constexpr auto zb_v_4x8 = make_plan<zb_v, shape{.stages = 4, .microbatches = 8, .chunks = 2}>();
constexpr auto zb_v_4x5 = make_plan<zb_v, shape{.stages = 4, .microbatches = 5, .chunks = 2}>();
constexpr auto dualpipe_v_4x8 =
    make_plan<dualpipe_v, shape{.stages = 4, .microbatches = 8, .chunks = 2}>();
constexpr auto lowered_v_half_3x6 = freeze<[] {
  return lower(make_plan<v_half>(shape{3, 6, 2}));
}>();
}  // namespace

TEST_CASE("V-shaped plans made at compile time equal plans made at run time",
          "[schedule][v][constexpr]") {
  STATIC_REQUIRE(validate(v_min_4x8).ok);
  STATIC_REQUIRE(validate(v_half_4x8).ok);
  STATIC_REQUIRE(validate(zb_v_4x8).ok);
  STATIC_REQUIRE(validate(zb_v_4x5).ok);  // the list scheduler (m < 2p - 1)
  STATIC_REQUIRE(validate(dualpipe_v_4x8).ok);
  STATIC_REQUIRE(validate(lowered_v_half_3x6).ok);
  STATIC_REQUIRE(v_half_4x8.place == placement::v_shape);
  STATIC_REQUIRE(v_half_4x8.split_backward);
  const int stages = static_cast<int>(std::string("abcd").size());  // a run-time value
  CHECK(v_min_4x8.to_plan() == make_plan<v_min>(shape{stages, 8, 2}));
  CHECK(v_half_4x8.to_plan() == make_plan<v_half>(shape{stages, 8, 2}));
  CHECK(zb_v_4x8.to_plan() == make_plan<zb_v>(shape{stages, 8, 2}));
  CHECK(zb_v_4x5.to_plan() == make_plan<zb_v>(shape{stages, 5, 2}));
  CHECK(dualpipe_v_4x8.to_plan() == make_plan<dualpipe_v>(shape{stages, 8, 2}));
  CHECK(lowered_v_half_3x6.to_plan() == lower(make_plan<v_half>(shape{stages - 1, 6, 2})));
}

TEST_CASE("V-shaped schedules refuse shapes naming the rule and the values",
          "[schedule][v][shape]") {
  CHECK_THROWS_WITH(make_plan<v_half>(shape{4, 8, 1}),
                    Catch::Contains("'v-half'") && Catch::Contains("shape.chunks must be 2") &&
                        Catch::Contains("stages=4, microbatches=8, chunks=1"));
  CHECK_THROWS_WITH(make_plan<v_min>(shape{4, 8, 3}),
                    Catch::Contains("'v-min'") && Catch::Contains("chunks=3"));
  CHECK_THROWS_WITH(make_plan<zb_v>(shape{0, 8, 2}),
                    Catch::Contains("'zb-v'") && Catch::Contains("shape.stages must be >= 1"));
  CHECK_THROWS_WITH(make_plan<dualpipe_v>(shape{4, 7, 2}),
                    Catch::Contains("'dualpipe-v'") &&
                        Catch::Contains("DualPipeV needs shape.microbatches >= 2 * shape.stages") &&
                        Catch::Contains("stages=4, microbatches=7, chunks=2"));
  CHECK_THROWS_WITH(make_plan<dualpipe_v>(shape{4, 8, 1}),
                    Catch::Contains("shape.chunks must be 2"));
  CHECK_THROWS_AS(make_plan<zb_v>(shape{4096, 4096, 2}), pipit::error);
  CHECK(make_plan<dualpipe_v>(shape{4, 8, 2}).rank_count() == 4);  // m = 2p is accepted
}
