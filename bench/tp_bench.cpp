// Overlap of the input-gradient reduction with the weight-gradient GEMM in the tensor-parallel
// column-parallel linear layer, on comm::threads with an injected network (threads_options:
// every message takes latency + bytes / bandwidth).
//
//   serial:  backward_input (dX partial GEMM, blocking ring all-reduce) then backward_weight
//   overlap: backward: the same GEMMs, with the ring's steps posted before and completed after
//            pieces of the weight-gradient GEMM, so that messages travel while it computes
//
// Shape: tokens x in -> out, double, t ranks (threads). The time reported is the manual time
// of one backward (the slowest rank's, after a barrier), averaged over `reps` backwards per
// iteration. serial_us / overlap_us below come from the same run; `gemm_us` is the weight-
// gradient GEMM alone and `ring_us` the all-reduce alone, measured in the same configuration.
//
//   bench_tp
//   bench_tp --benchmark_filter='latency_us:1000'
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "pipit/comm/threads.hpp"
#include "pipit/tp/column_parallel_linear.hpp"
#include "pipit/tp/ring_collective.hpp"

namespace {

namespace tp = pipit::tp;
using pipit::comm::threads;
using pipit::comm::threads_options;
using clock_type = std::chrono::steady_clock;

enum class mode { serial, overlap, gemm_only, ring_only };

struct config {
  mode m;
  int ranks;
  std::int64_t tokens, in, out;
  double latency;    // seconds per message
  double bandwidth;  // bytes per second, 0: unlimited
};

double measure(const config& c, int reps) {
  threads_options o;
  o.latency_seconds = c.latency;
  o.bandwidth_bytes_per_s = c.bandwidth;
  std::vector<double> elapsed(static_cast<std::size_t>(c.ranks));
  threads::run(
      c.ranks,
      [&](threads& comm) {
        tp::column_parallel_linear<double> layer(c.in, c.out, c.ranks, comm.rank(),
                                                 {.bias = false, .sequence_parallel = false});
        std::mt19937 gen(static_cast<unsigned>(comm.rank()));
        std::uniform_real_distribution<double> u(-1, 1);
        auto fill = [&](std::int64_t n) {
          std::vector<double> v(static_cast<std::size_t>(n));
          for (double& x : v) x = u(gen);
          return v;
        };
        const auto x = fill(c.tokens * c.in), w = fill(layer.local_out() * c.in),
                   dy = fill(c.tokens * layer.local_out());
        std::vector<double> dx(static_cast<std::size_t>(c.tokens * c.in)),
            dw(static_cast<std::size_t>(layer.local_out() * c.in)), ring(dx.size());
        const auto xv = tp::make_view(x.data(), c.tokens, c.in);
        const auto wv = tp::make_view(w.data(), layer.local_out(), c.in);
        const auto dyv = tp::make_view(dy.data(), c.tokens, layer.local_out());
        const auto dxv = tp::make_view(dx.data(), c.tokens, c.in);
        const auto dwv = tp::make_view(dw.data(), layer.local_out(), c.in);
        auto once = [&] {
          switch (c.m) {
            case mode::serial:
              layer.backward_input(comm, dyv, wv, dxv);
              layer.backward_weight(xv, {}, dyv, dwv, {});
              break;
            case mode::overlap:
              layer.backward(comm, xv, {}, dyv, wv, dxv, dwv, {});
              break;
            case mode::gemm_only:
              layer.backward_weight(xv, {}, dyv, dwv, {});
              break;
            case mode::ring_only:
              tp::ring_all_reduce_rows(comm, std::span<double>(ring), c.tokens, c.in);
              break;
          }
          benchmark::DoNotOptimize(dw.data());
        };
        comm.barrier();
        once();  // warm-up, and lines the ranks up
        comm.barrier();
        const auto t0 = clock_type::now();
        for (int i = 0; i < reps; ++i) once();
        comm.barrier();
        elapsed[static_cast<std::size_t>(comm.rank())] =
            std::chrono::duration<double>(clock_type::now() - t0).count();
      },
      o);
  return *std::max_element(elapsed.begin(), elapsed.end()) / reps;
}

const char* name(mode m) {
  return m == mode::serial      ? "serial"
         : m == mode::overlap   ? "overlap"
         : m == mode::gemm_only ? "gemm_only"
                                : "ring_only";
}

void register_all() {
  for (const int ranks : {2, 4})
    for (const double latency : {0.0, 1e-3, 4e-3})
      for (const mode m : {mode::serial, mode::overlap, mode::gemm_only, mode::ring_only}) {
        const config c{m, ranks, 256, 256, 1024, latency, 10e9};
        const std::string label =
            std::string("column_backward/") + name(m) + "/ranks:" + std::to_string(ranks) +
            "/latency_us:" + std::to_string(static_cast<int>(latency * 1e6 + 0.5));
        benchmark::RegisterBenchmark(label.c_str(),
                                     [c](benchmark::State& st) {
                                       for (auto _ : st) st.SetIterationTime(measure(c, 5));
                                     })
            ->UseManualTime()
            ->Iterations(3)
            ->Unit(benchmark::kMicrosecond);
      }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
