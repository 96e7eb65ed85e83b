// fixed_vector (inline storage, usable in constexpr plans) against std::vector for the
// append-then-scan pattern that plan generation uses.
#include <benchmark/benchmark.h>

#include <vector>

#include "pipit/core/fixed_vector.hpp"

namespace {

void bm_fixed_vector_fill(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  for (auto _ : state) {
    pipit::fixed_vector<int, 4096> v;
    for (int i = 0; i < n; ++i) v.push_back(i);
    long sum = 0;
    for (int x : v) sum += x;
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(state.iterations() * n);
}

void bm_std_vector_fill(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  for (auto _ : state) {
    std::vector<int> v;
    for (int i = 0; i < n; ++i) v.push_back(i);
    long sum = 0;
    for (int x : v) sum += x;
    benchmark::DoNotOptimize(sum);
  }
  state.SetItemsProcessed(state.iterations() * n);
}

}  // namespace

BENCHMARK(bm_fixed_vector_fill)->Arg(64)->Arg(4096);
BENCHMARK(bm_std_vector_fill)->Arg(64)->Arg(4096);
BENCHMARK_MAIN();
