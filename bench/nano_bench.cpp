// NanoFlow-style nano-batching on the host: tensor-parallel decoding of a stack of transformer
// layers (nano::tp_decode_stack, float) on comm::threads with an injected network latency per
// message, t = 2 ranks.
//
// For each latency, every rank profiles the stack's 40 operations at 1, 2, 4, ... 64 rows (64
// decode requests) (nano::measure_profile, agreed across ranks), measures the runner's hand-off
// cost, and runs the parameter search (nano::search, one split per op of a layer). Then it times
// one decoding step (the slowest rank's, median of `steps`) in four ways:
//
//   no_overlap   every op on one thread, unsplit (nano_runner::run_sequential)
//   runner_none  the runner (one thread per kind), unsplit: kinds overlap only where the graph
//                lets them, which in a decode layer is nowhere
//   uniform2     the runner, every op in 2 nano-batches (NanoFlow's default split)
//   searched     the runner with the searched split (the benchmark's reported time)
//
// and reports the cost model's predictions and its optimum (nano::resource_bound: the busiest
// machine's unsplit work; NanoFlow reports reaching 59-72% of its optimum; pct_of_optimal is
// optimal / searched).
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

struct figures {
  double no_overlap = 0, runner_none = 0, uniform2 = 0, searched = 0;
  double pred_sequential = 0, pred_none = 0, pred_uniform2 = 0, pred_searched = 0, optimal = 0;
  double dispatch = 0;
  std::string split;
};

figures experiment(double latency) {
  const auto s = bench_shape();
  const auto w = make_weights(s);
  figures fig;
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
        const nano::op_graph g = stack.graph();
        nano::nano_runner runner;

        const nano::profile prof = nano::measure_profile(comm, g, nano::doubling_sizes(s.requests),
                                                         stack, {.warmup = 1, .repeats = 5});
        double dispatch = nano::measure_dispatch(runner);
        comm.all_reduce(std::span<double>(&dispatch, 1), pipit::comm::max_op{});
        const nano::cost_model model{{0, 0, 1}, dispatch};
        const auto found = nano::search(g, s.requests, prof, model, {.max_count = 8, .period = 10});
        const auto uniform2 = nano::nano_batch::uniform(g, s.requests, 2);

        // One step, started at the same instant on every rank (the ranks share a clock: they
        // are threads), timed to its end on the slowest rank. The four modes take turns, so that
        // load from elsewhere on the machine falls on all of them; each keeps its median.
        const nano::nano_program progs[4] = {
            nano::nano_program(g, found.baseline), nano::nano_program(g, found.baseline),
            nano::nano_program(g, uniform2), nano::nano_program(g, found.chosen)};
        std::vector<double> t[4];
        for (int i = 0; i < steps + 1; ++i)
          for (int m = 0; m < 4; ++m) {
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
              nano::nano_runner::run_sequential(progs[m], stack);
            else
              runner.run(progs[m], stack);
            double dt = std::chrono::duration<double>(clock_type::now() - t0).count();
            comm.all_reduce(std::span<double>(&dt, 1), pipit::comm::max_op{});
            if (i) t[m].push_back(dt);  // the first round is a warm-up
          }
        auto median = [](std::vector<double>& v) {
          std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2),
                           v.end());
          return v[v.size() / 2];
        };
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
          const nano::op_graph layer = decltype(stack)::layer_graph();
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

void bm_nano(benchmark::State& state) {
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
  state.counters["dispatch_us"] = benchmark::Counter(f.dispatch * 1e6);
  state.SetLabel(f.split);
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
