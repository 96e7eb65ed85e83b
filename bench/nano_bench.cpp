// NanoFlow-style nano-batching on the host: tensor-parallel decoding of a stack of transformer
// layers (nano::tp_decode_stack, float) on comm::threads with an injected network latency per
// message, t = 2 ranks.
//
// For each latency: the protocol of nano_protocol.hpp (the stack's 40 ops profiled at 1, 2, 4,
// ... 64 rows, the search, then one decoding step timed four ways: no_overlap, runner_none,
// uniform2, searched; with the cost model's predictions and optimum). runner_none overlaps kinds
// only where the graph lets them, which in a decode layer is nowhere.
//
// Two cores: the two ranks' compute threads (and memory threads) share the machine's two cores,
// so compute and memory ops cannot overlap with each other here; the cost model says so
// (machine {0, 0, 1}: compute and memory share a machine, the network is its own). What can
// overlap is a rank's waiting for a latency-bound all-reduce with its compute, and that is what
// this benchmark measures: the injected latency makes the collectives latency-bound, as
// decoding over a slow link is (TPI-LLM's setting).
//
//   bench_nano
//   bench_nano --benchmark_filter='latency_us:1000'
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "nano_protocol.hpp"
#include "pipit/comm/threads.hpp"
#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/nano_search.hpp"
#include "pipit/nano/profiler.hpp"
#include "pipit/nano/tp_decode_stack.hpp"

namespace {

namespace nano = pipit::nano;
using pipit::comm::threads;
using clock_type = std::chrono::steady_clock;
using T = float;

constexpr int ranks = 2;
constexpr int steps = 9;

nano::decode_shape bench_shape() {
  return {.hidden = 256,
          .heads = 8,
          .kv_heads = 8,
          .head_dim = 32,
          .ffn = 1024,
          .layers = 4,
          .requests = 64,
          .context = 256};
}

std::vector<nano::decode_layer_weights<T>> make_weights(const nano::decode_shape& s) {
  std::mt19937 gen(5);
  auto fill = [&](std::int64_t n, double scale, double shift = 0) {
    std::uniform_real_distribution<double> u(-scale, scale);
    std::vector<T> v(static_cast<std::size_t>(n));
    for (T& x : v) x = static_cast<T>(shift + u(gen));
    return v;
  };
  const std::int64_t h = s.hidden, qd = s.heads * s.head_dim, kd = s.kv_heads * s.head_dim;
  std::vector<nano::decode_layer_weights<T>> w;
  for (int l = 0; l < s.layers; ++l)
    w.push_back({fill(qd * h, 1 / std::sqrt(double(h))), fill(kd * h, 1 / std::sqrt(double(h))),
                 fill(kd * h, 1 / std::sqrt(double(h))), fill(h * qd, 1 / std::sqrt(double(qd))),
                 fill(s.ffn * h, 1 / std::sqrt(double(h))), fill(s.ffn, 0.1),
                 fill(h * s.ffn, 1 / std::sqrt(double(s.ffn))), fill(h, 0.1), fill(h, 0.2, 1),
                 fill(h, 0.2, 1)});
  return w;
}

pipit::bench::nano_figures experiment(double latency) {
  const auto s = bench_shape();
  const auto w = make_weights(s);
  pipit::bench::nano_figures fig;
  pipit::comm::threads_options opt;
  opt.latency_seconds = latency;
  threads::run(
      ranks,
      [&](threads& comm) {
        nano::tp_decode_stack<T, threads> stack(comm, s, w);
        std::vector<T> x(static_cast<std::size_t>(s.requests * s.hidden));
        for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<T>(std::cos(0.1 * double(i)));
        stack.set_input(nano::make_view(static_cast<const T*>(x.data()), s.requests, s.hidden));
        for (int l = 0; l < s.layers; ++l)
          stack.fill_cache(l, [&](std::int64_t r, std::int64_t g, std::int64_t pos, std::int64_t e,
                                  bool v) {
            return static_cast<T>(std::sin(0.3 * l + 1.1 * r + 0.7 * g + 0.05 * pos + 0.2 * e + v));
          });
        pipit::bench::measure_nano_step(comm, stack, stack.graph(), decltype(stack)::layer_graph(),
                                        s.requests, 10, steps, latency, fig);
      },
      opt);
  return fig;
}

void bm_nano(benchmark::State& state) {
  const double latency = static_cast<double>(state.range(0)) * 1e-6;
  pipit::bench::nano_figures f;
  for (auto _ : state) {
    f = experiment(latency);
    state.SetIterationTime(f.searched);
  }
  pipit::bench::report(state, f);
}

BENCHMARK(bm_nano)
    ->ArgName("latency_us")
    ->Arg(0)
    ->Arg(250)
    ->Arg(1000)
    ->Arg(4000)
    ->Iterations(1)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
