// All-reduce algorithms (ring, recursive-doubling tree, star) over comm::threads with an injected
// network: every message takes latency + bytes / bandwidth (threads_options), bandwidth 1 GB/s,
// latency 0, 50 us or 1 ms, 4 and 8 ranks, 8 B .. 16 MiB of floats. The time reported is the
// measured wall time of one all-reduce (manual time: thread start-up is not counted): each of
// the 3 iterations starts the ranks, runs about 20 ms worth of all-reduces and reports their
// mean; predicted_us is the alpha-beta model's time for the injected alpha and beta.
//
//   bench_comm                                      # every configuration, Google Benchmark table
//   bench_comm --benchmark_filter='ranks:8/latency_us:50/'
//   bench_comm --compare_only                       # the model's pick vs the measured best
//   bench_comm --compare=quick ...                  # a small comparison after the benchmarks
//
// --compare prints, per (ranks, latency, bytes), each algorithm's measured time, the algorithm
// the alpha-beta model picks (choose_all_reduce) with the injected alpha and beta ("nominal")
// and with alpha and beta corrected by a calibration of comm::threads itself ("calibrated":
// a ping-pong without injected delays measures its own per-message and per-byte cost), the
// measured best, and whether they match.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "pipit/comm/collectives.hpp"
#include "pipit/comm/threads.hpp"

namespace {

using pipit::comm::all_reduce_algorithm;
using pipit::comm::threads;
using pipit::comm::threads_options;
using clock_type = std::chrono::steady_clock;

constexpr double bandwidth = 1e9;  // bytes per second, for every message
constexpr std::array<all_reduce_algorithm, 3> algorithms{
    all_reduce_algorithm::ring, all_reduce_algorithm::tree, all_reduce_algorithm::star};
constexpr std::array<int, 2> rank_counts{4, 8};
constexpr std::array<double, 3> latencies{0.0, 50e-6, 1e-3};
constexpr std::array<std::size_t, 8> sizes{
    8, 64, 512, 4096, 32 * 1024, 256 * 1024, 2 * 1024 * 1024, 16 * 1024 * 1024};

struct config {
  all_reduce_algorithm algorithm;
  int ranks;
  double latency;
  std::size_t bytes;
};

// Enough repetitions for about 20 ms of predicted work per measurement (at least 2, at most 50).
int repetitions(const config& c) {
  const double t =
      pipit::comm::predicted_all_reduce_time(c.algorithm, c.ranks, static_cast<double>(c.bytes),
                                             c.latency, 1.0 / bandwidth) +
      20e-6;
  return std::clamp(static_cast<int>(0.02 / t), 2, 50);
}

// Seconds per all-reduce: after a barrier and one warm-up all-reduce (which lines the ranks
// up), `reps` all-reduces; the slowest rank's time, divided by reps.
double measure(const config& c, int reps, const threads_options& base) {
  std::vector<double> elapsed(static_cast<std::size_t>(c.ranks));
  threads_options o = base;
  o.all_reduce = c.algorithm;
  threads::run(
      c.ranks,
      [&](threads& comm) {
        std::vector<float> data(std::max<std::size_t>(c.bytes / sizeof(float), 1),
                                1.0f + static_cast<float>(comm.rank()));
        comm.barrier();
        comm.all_reduce(std::span<float>(data), std::plus<>{}, c.algorithm);
        const auto t0 = clock_type::now();
        for (int i = 0; i < reps; ++i) {
          comm.all_reduce(std::span<float>(data), std::plus<>{}, c.algorithm);
          benchmark::DoNotOptimize(data.data());
        }
        elapsed[static_cast<std::size_t>(comm.rank())] =
            std::chrono::duration<double>(clock_type::now() - t0).count();
      },
      o);
  return *std::max_element(elapsed.begin(), elapsed.end()) / reps;
}

threads_options injected(double latency) {
  threads_options o;
  o.latency_seconds = latency;
  o.bandwidth_bytes_per_s = bandwidth;
  return o;
}

std::string label(const config& c) {
  return std::string(name(c.algorithm)) + "/ranks:" + std::to_string(c.ranks) +
         "/latency_us:" + std::to_string(static_cast<int>(c.latency * 1e6 + 0.5)) +
         "/bytes:" + std::to_string(c.bytes);
}

void register_all() {
  for (const int p : rank_counts)
    for (const double lat : latencies)
      for (const std::size_t bytes : sizes)
        for (const auto a : algorithms) {
          const config c{a, p, lat, bytes};
          benchmark::RegisterBenchmark(
              ("all_reduce/" + label(c)).c_str(),
              [c](benchmark::State& st) {
                const int reps = repetitions(c);
                for (auto _ : st) st.SetIterationTime(measure(c, reps, injected(c.latency)));
                st.counters["predicted_us"] =
                    1e6 * pipit::comm::predicted_all_reduce_time(c.algorithm, c.ranks,
                                                                 static_cast<double>(c.bytes),
                                                                 c.latency, 1.0 / bandwidth);
                st.SetBytesProcessed(st.iterations() * static_cast<std::int64_t>(c.bytes));
              })
              ->UseManualTime()
              ->Iterations(3)  // each iteration already averages `repetitions` all-reduces
              ->Unit(benchmark::kMicrosecond);
        }
}

// ---- model vs measurement ----------------------------------------------------------------------

// comm::threads' own cost per message and per byte with p ranks (threads) at once, without
// injected delays: every rank sends to the next and receives from the previous one, the step
// the model assumes (messages of one step overlap), for 8 bytes and for 4 MiB.
struct calibration {
  double alpha, beta;
};

calibration calibrate(int p) {
  const auto step_time = [p](std::size_t bytes) {
    double best = 1e9;
    for (int trial = 0; trial < 3; ++trial) {
      std::vector<double> t(static_cast<std::size_t>(p));
      threads::run(p, [&](threads& comm) {
        std::vector<std::byte> out(bytes), in(bytes);
        const int steps = bytes > 65536 ? 8 : 100;
        const int next = (comm.rank() + 1) % p, prev = (comm.rank() + p - 1) % p;
        comm.barrier();
        const auto t0 = clock_type::now();
        for (int i = 0; i < steps; ++i) {
          comm.send(std::span<const std::byte>(out), next, 0);
          comm.recv(std::span<std::byte>(in), prev, 0);
        }
        t[static_cast<std::size_t>(comm.rank())] =
            std::chrono::duration<double>(clock_type::now() - t0).count() / steps;
      });
      best = std::min(best, *std::max_element(t.begin(), t.end()));
    }
    return best;
  };
  const double small = step_time(8), large = step_time(4u << 20);
  return {small, std::max(large - small, 0.0) / static_cast<double>(4u << 20)};
}

int compare(bool quick) {
  std::printf(
      "injected: latency as listed, bandwidth %.1f GB/s; times in us per all-reduce "
      "(median of %d)\n\n",
      bandwidth / 1e9, quick ? 1 : 3);
  std::printf(
      "| ranks | latency | bytes | ring | tree | star | measured best | model (nominal) "
      "| match | model (calibrated) | match |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  const std::vector<int> ps =
      quick ? std::vector<int>{4} : std::vector<int>(rank_counts.begin(), rank_counts.end());
  const std::vector<double> lats =
      quick ? std::vector<double>{50e-6} : std::vector<double>(latencies.begin(), latencies.end());
  const std::vector<std::size_t> bs = quick ? std::vector<std::size_t>{8, 32768}
                                            : std::vector<std::size_t>(sizes.begin(), sizes.end());
  int total = 0, nominal_hits = 0, calibrated_hits = 0;
  std::vector<std::string> notes;
  for (const int p : ps) {
    const calibration cal = calibrate(p);
    char note[160];
    std::snprintf(
        note, sizeof note,
        "%d ranks: alpha_sw = %.1f us per message, beta_sw = %.3f ns per byte (%.2f GB/s)", p,
        cal.alpha * 1e6, cal.beta * 1e9, cal.beta > 0 ? 1e-9 / cal.beta : 0.0);
    notes.emplace_back(note);
    for (const double lat : lats)
      for (const std::size_t bytes : bs) {
        std::array<double, 3> t{};
        for (std::size_t k = 0; k < algorithms.size(); ++k) {
          const config c{algorithms[k], p, lat, bytes};
          std::vector<double> samples;
          for (int s = 0; s < (quick ? 1 : 3); ++s)
            samples.push_back(measure(c, quick ? 2 : repetitions(c), injected(lat)));
          std::sort(samples.begin(), samples.end());
          t[k] = samples[samples.size() / 2];
        }
        const auto best =
            algorithms[static_cast<std::size_t>(std::min_element(t.begin(), t.end()) - t.begin())];
        const auto nominal =
            pipit::comm::choose_all_reduce(p, static_cast<double>(bytes), lat, 1.0 / bandwidth);
        const auto calibrated = pipit::comm::choose_all_reduce(
            p, static_cast<double>(bytes), lat + cal.alpha, 1.0 / bandwidth + cal.beta);
        const auto time_of = [&](all_reduce_algorithm a) {
          return t[static_cast<std::size_t>(std::find(algorithms.begin(), algorithms.end(), a) -
                                            algorithms.begin())];
        };
        const auto verdict = [&](all_reduce_algorithm a) {
          if (a == best) return std::string("yes");
          char buf[48];
          std::snprintf(buf, sizeof buf, "no (%.2fx)", time_of(a) / time_of(best));
          return std::string(buf);
        };
        ++total;
        nominal_hits += nominal == best;
        calibrated_hits += calibrated == best;
        std::printf("| %d | %g us | %zu | %.1f | %.1f | %.1f | %s | %s | %s | %s | %s |\n", p,
                    lat * 1e6, bytes, t[0] * 1e6, t[1] * 1e6, t[2] * 1e6,
                    std::string(name(best)).c_str(), std::string(name(nominal)).c_str(),
                    verdict(nominal).c_str(), std::string(name(calibrated)).c_str(),
                    verdict(calibrated).c_str());
        std::fflush(stdout);
      }
  }
  std::printf(
      "\ncalibration of comm::threads itself (no injected delay; the calibrated model adds "
      "these to the injected alpha and beta):\n");
  for (const auto& n : notes) std::printf("- %s\n", n.c_str());
  std::printf(
      "\nthe nominal model picked the measured best in %d of %d configurations; the "
      "calibrated model in %d of %d\n",
      nominal_hits, total, calibrated_hits, total);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Our flags first; the rest goes to Google Benchmark.
  std::string compare_mode;
  bool compare_only = false;
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--compare")
      compare_mode = "full";
    else if (a == "--compare=quick")
      compare_mode = "quick";
    else if (a == "--compare_only")
      compare_only = true;
    else
      rest.push_back(argv[i]);
  }
  if (compare_only) return compare(compare_mode == "quick");
  int n = static_cast<int>(rest.size());
  benchmark::Initialize(&n, rest.data());
  if (benchmark::ReportUnrecognizedArguments(n, rest.data())) return 1;
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (!compare_mode.empty()) return compare(compare_mode == "quick");
  return 0;
}
