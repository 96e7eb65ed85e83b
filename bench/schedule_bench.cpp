// Plan generation, lowering + validation, and simulation time per schedule, for
// p in {8, 32, 128} and m in {p, 4p, 16p} (chunks: 2 for interleaved and V schedules), plus the
// headline target: generating and validating a p = 64, m = 512 plan.
//   bench_schedule --benchmark_filter='generate_validate/.*/64/512'
#include <benchmark/benchmark.h>

#include "register_main.hpp"

#include <cstdint>
#include <string>

#include "pipit/schedule/by_name.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/validate.hpp"
#include "pipit/sim/simulate.hpp"

namespace {

namespace ps = pipit::schedule;

ps::shape shape_for(std::string_view name, int p, int m) {
  return {p, m, ps::default_chunks(name)};
}

bool accepts(std::string_view name, const ps::shape& s) {
  return ps::visit_policy(
      name, [&]<class S>() { return S::check(s) == ps::shape_rule::ok; }, ps::all_policies{});
}

// items/s = actions per second, so runs of different sizes compare per action.
void set_counters(benchmark::State& state, const ps::plan& p) {
  state.counters["actions"] = static_cast<double>(p.action_count());
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(p.action_count()));
}

}  // namespace

void pipit::bench::register_all() {
  for (const auto name : ps::all_policy_names) {
    const std::string n(name);
    for (const int p : {8, 32, 128})
      for (const int factor : {1, 4, 16}) {
        const ps::shape s = shape_for(n, p, p * factor);
        if (!accepts(n, s)) continue;
        const std::string suffix = n + "/" + std::to_string(p) + "/" + std::to_string(p * factor);
        benchmark::RegisterBenchmark(("generate/" + suffix).c_str(), [n, s](benchmark::State& st) {
          ps::plan plan;
          for (auto _ : st) {
            plan = ps::make_plan_by_name(n, s);
            benchmark::DoNotOptimize(plan.ranks.data());
          }
          set_counters(st, plan);
        })->Unit(benchmark::kMicrosecond);
        const ps::plan base = ps::make_plan_by_name(n, s);
        benchmark::RegisterBenchmark(("lower_validate/" + suffix).c_str(),
                                     [base](benchmark::State& st) {
                                       ps::plan lowered;
                                       for (auto _ : st) {
                                         lowered = ps::lower(base);
                                         if (!ps::validate(lowered).ok) st.SkipWithError("invalid");
                                       }
                                       set_counters(st, lowered);
                                     })
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark(("simulate/" + suffix).c_str(), [base](benchmark::State& st) {
          const pipit::sim::costs c{.f = 1, .b = 1, .w = 1, .comm = 0.05};
          for (auto _ : st) benchmark::DoNotOptimize(pipit::sim::simulate(base, c).makespan);
          set_counters(st, base);
        })->Unit(benchmark::kMicrosecond);
      }
    const ps::shape target = shape_for(n, 64, 512);
    if (accepts(n, target))
      benchmark::RegisterBenchmark(("generate_validate/" + n + "/64/512").c_str(),
                                   [n, target](benchmark::State& st) {
                                     for (auto _ : st) {
                                       const ps::plan plan = ps::make_plan_by_name(n, target);
                                       if (!ps::validate(plan).ok) st.SkipWithError("invalid");
                                       benchmark::DoNotOptimize(plan.ranks.data());
                                     }
                                   })
          ->Unit(benchmark::kMicrosecond);
  }
}
