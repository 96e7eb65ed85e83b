// Executor overhead per action, with stages that do nothing.
//   overhead/<schedule>/<p>/<m>[/remat]: rank 1 of a p-rank pipeline whose communicator moves no
//     data (tests/support/null_communicator.hpp): the executor's own cost — the instruction
//     walk, pass_info and seed, the calls into the stage, handing each step's prebuilt
//     point-to-point group to the communicator — without any communication.
//   threads/<schedule>/<p>/<m>: all p ranks on comm::threads, each step timed on rank 0: the
//     same plus the in-process communication (a mailbox under a mutex, one copy per message).
// The counter per_action is seconds per action of the rank's lowered list (passes, sends and
// receives); docs/runtime.md has the figures and the command.
//   bench_runtime --benchmark_min_time=0.2
#include <benchmark/benchmark.h>

#include "register_main.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "../tests/support/null_communicator.hpp"
#include "pipit/comm/threads.hpp"
#include "pipit/runtime/executor.hpp"
#include "pipit/schedule/by_name.hpp"

namespace {

namespace ps = pipit::schedule;
namespace rt = pipit::runtime;

// Does nothing, through the full stage interface (16-float activations).
struct noop_stage {
  using value_type = float;
  std::size_t input_size(int) const { return 16; }
  std::size_t output_size(int) const { return 16; }
  std::size_t activation_size(int) const { return 16; }
  void load_input(const rt::pass_info&, std::span<float>) {}
  void forward(const rt::pass_info& i, std::span<const float>, std::span<float>, std::span<float>) {
    benchmark::DoNotOptimize(i.seed);
  }
  void backward_input(const rt::pass_info& i, std::span<const float>, std::span<float>,
                      std::span<const float>, std::span<float>) {
    benchmark::DoNotOptimize(i.seed);
  }
  void backward_weight(const rt::pass_info& i, std::span<const float>, std::span<const float>,
                       std::span<const float>) {
    benchmark::DoNotOptimize(i.seed);
  }
};

ps::shape shape_for(std::string_view name, int p, int m) {
  return {p, m, ps::default_chunks(name)};
}

std::size_t rank_actions(const ps::plan& lowered, int rank) {
  return lowered.for_rank(rank).size();
}

void overhead(benchmark::State& state, std::string name, int p, int m, bool remat) {
  const ps::plan plan = ps::lower(ps::make_plan_by_name(name, shape_for(name, p, m)));
  const int rank = p > 1 ? 1 : 0;
  pipit::testing::null_communicator comm(rank, p);
  noop_stage stage;
  rt::executor ex(comm, stage, plan, {.rematerialize = remat});
  for (auto _ : state) ex.run();
  const auto actions = static_cast<double>(rank_actions(plan, rank));
  state.counters["actions"] = actions;
  state.counters["per_action"] =
      benchmark::Counter(actions * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// A fixed number of steps on every rank (the other ranks cannot see the benchmark's loop).
constexpr int threads_steps = 100;

void on_threads(benchmark::State& state, std::string name, int p, int m) {
  const ps::plan plan = ps::lower(ps::make_plan_by_name(name, shape_for(name, p, m)));
  pipit::comm::threads::run(p, [&](pipit::comm::threads& comm) {
    noop_stage stage;
    rt::executor ex(comm, stage, plan);
    ex.run();  // warm-up
    comm.barrier();
    if (comm.rank() == 0) {
      for (auto _ : state) ex.run();
    } else {
      for (int i = 0; i < threads_steps; ++i) ex.run();
    }
  });
  const auto actions = static_cast<double>(rank_actions(plan, 0));
  state.counters["actions"] = actions;
  state.counters["per_action"] =
      benchmark::Counter(actions * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

}  // namespace

void pipit::bench::register_all() {
  for (const auto name : ps::all_policy_names) {
    const std::string n(name);
    for (const auto& [p, m] : {std::pair{4, 16}, std::pair{8, 64}}) {
      const std::string suffix = n + "/" + std::to_string(p) + "/" + std::to_string(m);
      benchmark::RegisterBenchmark(("overhead/" + suffix).c_str(), overhead, n, p, m, false)
          ->Unit(benchmark::kMicrosecond);
      if (p == 4)
        benchmark::RegisterBenchmark(("overhead/" + suffix + "/remat").c_str(), overhead, n, p, m,
                                     true)
            ->Unit(benchmark::kMicrosecond);
    }
    benchmark::RegisterBenchmark(("threads/" + n + "/4/16").c_str(), on_threads, n, 4, 16)
        ->Iterations(threads_steps)
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  }
}
