#pragma once
// The protocol bench_nano and bench_gpt_nano share (NanoFlow, Zhu et al., arXiv 2408.12757: how
// close a searched nano-batch split gets to the cost model's optimum). On every rank of a
// comm::threads group whose decoder implements a nano::op_graph: profile its ops at 1, 2, 4, ...
// `requests` rows (collective, agreed across ranks), measure the runner's hand-off cost, run
// nano::search (one split per op of a layer: `period` ops; compute and memory share a machine,
// {0, 0, 1}, because the ranks' threads share the cores here), then time one decoding step —
// started at the same instant on every rank (threads share a clock), the slowest rank's time,
// median of `steps` after one warm-up round, the four modes taking turns so that load from
// elsewhere falls on all of them:
//
//   no_overlap   every op on one thread, unsplit (nano_runner::run_sequential)
//   runner_none  the runner (one thread per kind), unsplit
//   uniform2     the runner, every op in 2 nano-batches (NanoFlow's default split)
//   searched     the runner with the searched split (the reported time)
//
// report() writes the figures as counters: the measured times, the cost model's predictions
// (pred_*), its optimum (optimal_ms: nano::resource_bound, the busiest machine's unsplit work),
// pct_of_optimal = optimal / searched (NanoFlow's measure) and pred_pct_of_optimal =
// optimal / pred_searched; the label is the searched split of one layer.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "pipit/comm/threads.hpp"
#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/nano_search.hpp"
#include "pipit/nano/profiler.hpp"

namespace pipit::bench {

struct nano_figures {
  double no_overlap = 0, runner_none = 0, uniform2 = 0, searched = 0;
  double pred_sequential = 0, pred_none = 0, pred_uniform2 = 0, pred_searched = 0, optimal = 0;
  double dispatch = 0;
  std::string split;
};

// Runs on every rank of `comm`; the figures are filled on rank 0. `layer`: one layer's graph
// (for the label); the decoder's graph `g` repeats it every `period` ops.
template <class Decoder>
void measure_nano_step(comm::threads& comm, Decoder& dec, const nano::op_graph& g,
                       const nano::op_graph& layer, std::int64_t requests, int period, int steps,
                       double latency, nano_figures& fig) {
  using clock_type = std::chrono::steady_clock;
  nano::nano_runner runner;
  const nano::profile prof = nano::measure_profile(comm, g, nano::doubling_sizes(requests), dec,
                                                   {.warmup = 1, .repeats = 5});
  double dispatch = nano::measure_dispatch(runner);
  comm.all_reduce(std::span<double>(&dispatch, 1), comm::max_op{});
  const nano::cost_model model{{0, 0, 1}, dispatch};
  const auto found = nano::search(g, requests, prof, model, {.max_count = 8, .period = period});
  const auto uniform2 = nano::nano_batch::uniform(g, requests, 2);

  const nano::nano_program progs[4] = {
      nano::nano_program(g, found.baseline), nano::nano_program(g, found.baseline),
      nano::nano_program(g, uniform2), nano::nano_program(g, found.chosen)};
  std::vector<double> t[4];
  for (int i = 0; i < steps + 1; ++i)
    for (int m = 0; m < 4; ++m) {
      // Every rank starts at one instant, after the broadcast that carries it has arrived.
      double start = std::chrono::duration<double>(
                         (clock_type::now() + std::chrono::milliseconds(2)).time_since_epoch())
                         .count() +
                     2 * latency;
      comm.broadcast(std::span<double>(&start, 1), 0);
      const clock_type::time_point t0{
          std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(start))};
      std::this_thread::sleep_until(t0);
      if (m == 0)
        nano::nano_runner::run_sequential(progs[m], dec);
      else
        runner.run(progs[m], dec);
      double dt = std::chrono::duration<double>(clock_type::now() - t0).count();
      comm.all_reduce(std::span<double>(&dt, 1), comm::max_op{});
      if (i) t[m].push_back(dt);  // the first round is a warm-up
    }
  const auto median = [](std::vector<double>& v) {
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
    return v[v.size() / 2];
  };
  const double no_overlap = median(t[0]), runner_none = median(t[1]), u2 = median(t[2]),
               searched = median(t[3]);
  if (comm.rank() != 0) return;
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
  for (int o = 0; o < layer.size(); ++o) {
    if (o) fig.split.append(" ");
    fig.split.append(layer[o].name).append(":");
    for (std::size_t j = 0; j < found.chosen.sizes(o).size(); ++j) {
      if (j) fig.split.append("+");
      fig.split.append(std::to_string(found.chosen.sizes(o)[j]));
    }
  }
}

inline void report(benchmark::State& state, const nano_figures& f) {
  const auto ms = [](double s) { return benchmark::Counter(s * 1e3); };
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

}  // namespace pipit::bench
