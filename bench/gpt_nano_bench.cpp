// NanoFlow-style nano-batching on the example model: tensor-parallel decoding of the GPT
// example's blocks (examples/gpt/gpt_decode.hpp: gpt::tp_decode, float, weights from
// gpt::block(cfg, layer)) on comm::threads, t = 2 ranks, with an injected network latency per
// message.
//
// Model: hidden 128, 4 heads of 32, MLP 512, 4 blocks (40 nano-ops per step unsplit); 32 decode
// requests, each attending over 128 cached positions plus its new token.
//
// For each latency, every rank profiles the 40 ops at 1, 2, 4, ... 32 rows (collective profile,
// agreed across ranks), measures the runner's hand-off cost, and runs the parameter search
// (nano::search, one split per op of a block, compute and memory sharing one machine: {0, 0, 1},
// the two ranks' threads share the machine's 2 cores). Then it times one decoding step (started
// at the same instant on both ranks, the slowest rank's time, median of `steps`, the modes
// taking turns):
//
//   no_overlap   every op on one thread, unsplit (nano_runner::run_sequential)
//   runner_none  the runner (one thread per kind), unsplit
//   uniform2     the runner, every op in 2 nano-batches (NanoFlow's default split)
//   searched     the runner with the searched split (the reported time)
//
// and the cost model's predictions (pred_*) and optimum (optimal_ms: nano::resource_bound, the
// busiest machine's unsplit work). pct_of_optimal = optimal / searched, NanoFlow's measure (it
// reports 59-72% of its optimum); pred_pct_of_optimal = optimal / pred_searched.
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

struct figures {
  double no_overlap = 0, runner_none = 0, uniform2 = 0, searched = 0;
  double pred_sequential = 0, pred_none = 0, pred_uniform2 = 0, pred_searched = 0, optimal = 0;
  double dispatch = 0;
  std::string split;
};

double median(std::vector<double>& v) {
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

figures experiment(double latency) {
  const gpt::model_config cfg = bench_config();
  const auto blocks = gpt::model_blocks<T>(cfg);
  figures fig;
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
        const nano::op_graph g = dec.graph();
        nano::nano_runner runner;

        const nano::profile prof = nano::measure_profile(comm, g, nano::doubling_sizes(requests),
                                                         dec, {.warmup = 1, .repeats = 5});
        double dispatch = nano::measure_dispatch(runner);
        comm.all_reduce(std::span<double>(&dispatch, 1), pipit::comm::max_op{});
        const nano::cost_model model{{0, 0, 1}, dispatch};
        const auto found = nano::search(g, requests, prof, model,
                                        {.max_count = 8, .period = decoder::ops_per_layer});
        const auto uniform2 = nano::nano_batch::uniform(g, requests, 2);

        const nano::nano_program progs[4] = {
            nano::nano_program(g, found.baseline), nano::nano_program(g, found.baseline),
            nano::nano_program(g, uniform2), nano::nano_program(g, found.chosen)};
        std::vector<double> t[4];
        for (int i = 0; i < steps + 1; ++i)
          for (int m = 0; m < 4; ++m) {
            // Both ranks start at one instant (threads share a clock), after the broadcast that
            // carries it has arrived.
            double start =
                std::chrono::duration<double>(
                    (clock_type::now() + std::chrono::milliseconds(2)).time_since_epoch())
                    .count() +
                2 * latency;
            comm.broadcast(std::span<double>(&start, 1), 0);
            const clock_type::time_point t0{std::chrono::duration_cast<clock_type::duration>(
                std::chrono::duration<double>(start))};
            std::this_thread::sleep_until(t0);
            if (m == 0)
              nano::nano_runner::run_sequential(progs[m], dec);
            else
              runner.run(progs[m], dec);
            double dt = std::chrono::duration<double>(clock_type::now() - t0).count();
            comm.all_reduce(std::span<double>(&dt, 1), pipit::comm::max_op{});
            if (i) t[m].push_back(dt);  // the first round is a warm-up
          }
        const double no_overlap = median(t[0]), runner_none = median(t[1]), u2 = median(t[2]),
                     searched = median(t[3]);
        if (comm.rank() == 0) {
          fig = {no_overlap,
                 runner_none,
                 u2,
                 searched,
                 nano::predict_sequential(g, found.baseline, prof),
                 found.baseline_predicted,
                 nano::predict(g, uniform2, prof, model),
                 found.predicted,
                 found.optimal,
                 dispatch,
                 {}};
          const nano::op_graph layer = decoder::layer_graph();
          for (int o = 0; o < layer.size(); ++o) {
            if (o) fig.split.append(" ");
            fig.split.append(layer[o].name).append(":");
            for (std::size_t j = 0; j < found.chosen.sizes(o).size(); ++j) {
              if (j) fig.split.append("+");
              fig.split.append(std::to_string(found.chosen.sizes(o)[j]));
            }
          }
        }
      },
      opt);
  return fig;
}

void bm_gpt_nano(benchmark::State& state) {
  const double latency = static_cast<double>(state.range(0)) * 1e-6;
  figures f;
  for (auto _ : state) {
    f = experiment(latency);
    state.SetIterationTime(f.searched);
  }
  auto ms = [](double s) { return benchmark::Counter(s * 1e3); };
  state.counters["no_overlap_ms"] = ms(f.no_overlap);
  state.counters["runner_none_ms"] = ms(f.runner_none);
  state.counters["uniform2_ms"] = ms(f.uniform2);
  state.counters["searched_ms"] = ms(f.searched);
  state.counters["pred_seq_ms"] = ms(f.pred_sequential);
  state.counters["pred_none_ms"] = ms(f.pred_none);
  state.counters["pred_u2_ms"] = ms(f.pred_uniform2);
  state.counters["pred_searched_ms"] = ms(f.pred_searched);
  state.counters["optimal_ms"] = ms(f.optimal);
  state.counters["pct_of_optimal"] = benchmark::Counter(100 * f.optimal / f.searched);
  state.counters["pred_pct_of_optimal"] = benchmark::Counter(100 * f.optimal / f.pred_searched);
  state.counters["dispatch_us"] = benchmark::Counter(f.dispatch * 1e6);
  state.SetLabel(f.split);
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
