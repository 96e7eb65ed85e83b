// NanoFlow-style nano-batching on the example model: tensor-parallel decoding of the GPT
// example's blocks (examples/gpt/gpt_decode.hpp: gpt::tp_decode, float, weights from
// gpt::block(cfg, layer)) on comm::threads, t = 2 ranks, with an injected network latency per
// message.
//
// Model: hidden 128, 4 heads of 32, MLP 512, 4 blocks (40 nano-ops per step unsplit); 32 decode
// requests, each attending over 128 cached positions plus its new token.
//
// For each latency: the protocol of nano_protocol.hpp (profile, search, then one decoding step
// timed four ways: no_overlap, runner_none, uniform2, searched; with the cost model's predictions
// and optimum, pct_of_optimal = optimal / searched, NanoFlow's measure: it reports 59-72%).
//
//   bench_gpt_nano
//   bench_gpt_nano --benchmark_filter='latency_us:250/'
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "gpt_decode.hpp"
#include "nano_protocol.hpp"
#include "pipit/comm/threads.hpp"
#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/nano_search.hpp"
#include "pipit/nano/profiler.hpp"

namespace {

namespace nano = pipit::nano;
using pipit::comm::threads;
using clock_type = std::chrono::steady_clock;
using T = float;
using decoder = gpt::tp_decode<T, threads>;

constexpr int ranks = 2;
constexpr int steps = 21;
constexpr std::int64_t requests = 32;
constexpr std::int64_t context = 128;

gpt::model_config bench_config() {
  gpt::model_config c;
  c.hidden = 128;
  c.heads = 4;
  c.layers = 4;
  c.ffn_mult = 4;
  c.seq = static_cast<int>(context) + 1;
  c.batch = 1;  // only the blocks' training layout depends on it
  return c;
}

pipit::bench::nano_figures experiment(double latency) {
  const gpt::model_config cfg = bench_config();
  const auto blocks = gpt::model_blocks<T>(cfg);
  pipit::bench::nano_figures fig;
  pipit::comm::threads_options opt;
  opt.latency_seconds = latency;
  threads::run(
      ranks,
      [&](threads& comm) {
        decoder dec(comm, cfg, std::span<const gpt::block<T>>(blocks), requests, context + 1);
        std::vector<T> x(static_cast<std::size_t>(requests * cfg.hidden));
        for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<T>(std::cos(0.1 * double(i)));
        dec.set_input(nano::make_view(static_cast<const T*>(x.data()), requests,
                                      static_cast<std::int64_t>(cfg.hidden)));
        for (int l = 0; l < cfg.layers; ++l)
          dec.fill_cache(l, [&](std::int64_t r, std::int64_t h, std::int64_t pos, std::int64_t e,
                                bool v) {
            return static_cast<T>(std::sin(0.3 * l + 1.1 * r + 0.7 * h + 0.05 * pos + 0.2 * e + v));
          });
        dec.set_position(context);
        pipit::bench::measure_nano_step(comm, dec, dec.graph(), decoder::layer_graph(), requests,
                                        decoder::ops_per_layer, steps, latency, fig);
      },
      opt);
  return fig;
}

void bm_gpt_nano(benchmark::State& state) {
  const double latency = static_cast<double>(state.range(0)) * 1e-6;
  pipit::bench::nano_figures f;
  for (auto _ : state) {
    f = experiment(latency);
    state.SetIterationTime(f.searched);
  }
  pipit::bench::report(state, f);
}

BENCHMARK(bm_gpt_nano)
    ->ArgName("latency_us")
    ->Arg(0)
    ->Arg(100)
    ->Arg(250)
    ->Arg(1000)
    ->Iterations(1)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
