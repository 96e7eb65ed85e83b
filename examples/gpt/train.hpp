#pragma once
// train<T>(comm, options, data, on_step): trains the GPT on the ranks of `comm` (one pipeline;
// comm::threads or comm::mpi), each rank running its gpt_stage under pipit's executor and
// stepping its own parameters with Adam. Every rank returns the same summary: the loss of every
// step and each rank's busy time, wall time and memory.
//
// The per-step loss is the mean cross-entropy over the step's microbatches, computed on the rank
// that holds the output layer and summed over the pipeline (the others contribute 0).

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "adam.hpp"
#include "config.hpp"
#include "data_source.hpp"
#include "gpt_stage.hpp"
#include "model_builder.hpp"
#include "pipit/runtime/executor.hpp"
#include "pipit/schedule/by_name.hpp"

namespace gpt {

struct train_options {
  model_config model;
  std::string schedule = "1f1b";
  int microbatches = 4;
  int chunks = 0;  // model chunks per rank; 0: the schedule's own (2 for interleaved and V)
  std::string partition = "naive";
  int steps = 100;
  adam_options adam;
  std::uint64_t data_seed = 1;
  bool rematerialize = false;
};

struct step_report {
  int step = 0, steps = 0;       // step counts from 1
  double loss = 0;               // this step's mean cross-entropy
  double elapsed_seconds = 0;    // since the first step began
  double tokens_per_second = 0;  // over the steps so far
  double eta_seconds = 0;
};

struct rank_summary {
  std::string holds;           // e.g. "E t*2" (partition::describe per chunk)
  double busy_seconds = 0;     // inside the stage's passes
  double wall_seconds = 0;     // from the first step to the last, on this rank
  double parameter_bytes = 0;  // parameters and their gradients
  double optimizer_bytes = 0;  // Adam's two moments
  double stash_bytes = 0;      // the executor's activation and gradient buffers
  double workspace_bytes = 0;  // the output layer's peak workspace
  double peak_bytes() const {
    return parameter_bytes + optimizer_bytes + stash_bytes + workspace_bytes;
  }
};

struct train_summary {
  std::vector<double> losses;  // per step
  std::vector<rank_summary> ranks;
  std::string layout;  // the partition, in the layout language
  double seconds = 0;  // wall time of all steps (the slowest rank)
  long long tokens_per_step = 0;
  double tokens_per_second() const {
    return seconds > 0
               ? static_cast<double>(tokens_per_step) * static_cast<double>(losses.size()) / seconds
               : 0.0;
  }
};

// The plan the trainer runs: `schedule` on comm.size() ranks.
inline pipit::schedule::shape shape_of(const train_options& o, int ranks) {
  const int chunks = o.chunks > 0 ? o.chunks : pipit::schedule::default_chunks(o.schedule);
  return {ranks, o.microbatches, chunks};
}

inline pipit::partition::partition partition_of(const train_options& o, int ranks) {
  const pipit::schedule::shape shp = shape_of(o, ranks);
  const pipit::partition::pipeline pl{ranks, shp.chunks, pipit::schedule::placement_of(o.schedule)};
  return make_partition(o.partition, o.model, pl);
}

// on_step(step_report) runs on rank 0 after every step; on_end(stage) on every rank after the
// last (to inspect the trained parameters).
template <class T, class Comm, class OnStep, class OnEnd>
train_summary train(Comm& comm, const train_options& o, const data_source& data, OnStep&& on_step,
                    OnEnd&& on_end) {
  using clock = std::chrono::steady_clock;
  if (o.steps < 1) pipit::fail("gpt: steps must be >= 1 (got ", o.steps, ")");
  const int ranks = comm.size();
  const pipit::partition::partition part = partition_of(o, ranks);
  if (part.vocab_parallel)
    pipit::fail("gpt: partition '", o.partition,
                "' shards the embedding and the output layer over the ranks; this trainer runs "
                "them on the first and the last stage only (use naive, balanced or a layout "
                "with E and L)");
  const pipit::schedule::plan plan =
      pipit::schedule::make_plan_by_name(o.schedule, shape_of(o, ranks));
  gpt_stage<T> stage(o.model, part, comm.rank(), data,
                     {.microbatches = o.microbatches, .data_seed = o.data_seed, .replica = 0});
  pipit::runtime::executor ex(comm, stage, plan,
                              {.rematerialize = o.rematerialize, .seed = o.data_seed});
  adam<T> opt(stage.parameters(), o.adam);

  train_summary out;
  out.layout = pipit::partition::to_layout(part);
  out.tokens_per_step = static_cast<long long>(o.model.tokens()) * o.microbatches;
  const auto start = clock::now();
  for (int step = 1; step <= o.steps; ++step) {
    ex.run();
    double loss = stage.take_loss();
    comm.all_reduce(std::span<double>(&loss, 1), std::plus<>{});
    opt.step(stage.parameters());
    out.losses.push_back(loss);
    if (comm.rank() == 0) {
      step_report r;
      r.step = step;
      r.steps = o.steps;
      r.loss = loss;
      r.elapsed_seconds = std::chrono::duration<double>(clock::now() - start).count();
      r.tokens_per_second = static_cast<double>(out.tokens_per_step) * step / r.elapsed_seconds;
      r.eta_seconds = r.elapsed_seconds / step * (o.steps - step);
      on_step(r);
    }
  }
  const double wall = std::chrono::duration<double>(clock::now() - start).count();
  on_end(std::as_const(stage));

  // Every rank's numbers to every rank.
  constexpr std::size_t fields = 6;
  const std::array<double, fields> mine{
      stage.busy_seconds(),
      wall,
      static_cast<double>(2 * stage.parameter_count() * sizeof(T)),
      static_cast<double>(opt.state_bytes()),
      static_cast<double>(ex.stash_bytes()),
      static_cast<double>(stage.peak_workspace_bytes())};
  std::vector<double> all(fields * static_cast<std::size_t>(ranks));
  comm.all_gather(std::span<const double>(mine), std::span<double>(all));
  for (int r = 0; r < ranks; ++r) {
    const double* f = all.data() + fields * static_cast<std::size_t>(r);
    rank_summary s;
    for (const int v : part.stages_of(r))
      s.holds += (s.holds.empty() ? "" : " | ") +
                 pipit::partition::describe(part.stages[static_cast<std::size_t>(v)]);
    s.busy_seconds = f[0];
    s.wall_seconds = f[1];
    s.parameter_bytes = f[2];
    s.optimizer_bytes = f[3];
    s.stash_bytes = f[4];
    s.workspace_bytes = f[5];
    out.seconds = std::max(out.seconds, f[1]);
    out.ranks.push_back(s);
  }
  return out;
}

template <class T, class Comm, class OnStep>
train_summary train(Comm& comm, const train_options& o, const data_source& data, OnStep&& on_step) {
  return train<T>(comm, o, data, on_step, [](const gpt_stage<T>&) {});
}

}  // namespace gpt
