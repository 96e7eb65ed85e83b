#pragma once
// train<T>(comm, options, data, on_step): trains the GPT on the ranks of `comm` (comm::threads or
// comm::mpi: one pipeline, or a tensor x data x pipeline grid), each rank running its gpt_stage
// under pipit's executor and stepping its own parameters with Adam. Every rank returns the same
// summary: the loss of every step, each rank's busy, communication and wall time and memory;
// and the measured timeline of one step on its own pipeline.
//
// Two ways to hold the vocabulary layers:
//   - naive, balanced, layout:...: the token embedding on the first virtual stage and the LM head
//     with the loss on the last (gpt_stage holds them, replicated over the tensor ranks); the
//     loss is summed over the ranks (the others contribute 0);
//   - vocab-parallel: both tables sharded over every pipeline x tensor rank (vocab_tables) and
//     run by pipit::runtime::vocab_layers as the plan's S, T, IF and IB passes (Yeung et al.,
//     "Balancing Pipeline Parallelism with Vocabulary Parallelism", MLSys 2025), with the
//     output-layer algorithm options.vocab; every rank then knows the loss.
// Either way the step's loss is the mean over its microbatches of their mean cross-entropy, so
// both compute the same function of the same parameters (the tests hold them to 1e-10).
//
// 3D parallelism (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
// Clusters Using Megatron-LM", arXiv 2104.04473): options.tensor x options.data x pipeline ranks
// (comm.size() must be their product) form a pipit::tp::process_grid. Each rank runs its pipeline
// stage with the blocks split over its tensor group (block.hpp), the executor over its pipeline
// group with its data group averaging the gradients, and replica r draws the step's microbatches
// [r m, (r + 1) m): d replicas of m microbatches train exactly the model one process trains with
// d m microbatches. The step's loss counts each microbatch once (tensor rank 0 of each replica)
// and is the mean over the replicas. Between transformer stages each tensor rank sends only its
// 1 / t slice of the activation (and gradient), which the next stage all-gathers over its tensor
// group (options.scatter_gather, Megatron's scatter/gather: gpt_stage.hpp); rank_summary reports
// each rank's bytes sent per step.

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "adam.hpp"
#include "config.hpp"
#include "data_source.hpp"
#include "gpt_stage.hpp"
#include "model_builder.hpp"
#include "pipit/runtime/executor.hpp"
#include "pipit/runtime/vocab_layers.hpp"
#include "pipit/schedule/by_name.hpp"
#include "pipit/schedule/vocab_passes.hpp"
#include "pipit/sim/simulate.hpp"
#include "pipit/tp/grid_layout.hpp"
#include "pipit/tp/process_grid.hpp"
#include "pipit/vocab/algorithms.hpp"
#include "tensor_group.hpp"
#include "timeline.hpp"
#include "vocab_tables.hpp"

namespace gpt {

struct train_options {
  model_config model;
  std::string schedule = "1f1b";
  int microbatches = 4;
  int chunks = 0;  // model chunks per rank; 0: the schedule's own (2 for interleaved and V)
  std::string partition = "naive";
  std::string vocab = "one-barrier";  // the output-layer algorithm under vocab-parallel
  int steps = 100;
  adam_options adam;
  std::uint64_t data_seed = 1;
  bool rematerialize = false;
  int trace_step = 0;  // the step whose passes are recorded (from 1; 0: the last)
  // The 3D grid: tensor x data x pipeline ranks. microbatches is per replica.
  int tensor = 1;    // tensor-parallel ranks per stage (Megatron's t)
  int data = 1;      // data-parallel replicas (d)
  int pipeline = 0;  // pipeline stages (p); 0: comm.size() / (tensor * data)
  // Megatron's scatter/gather between pipeline stages (gpt_stage.hpp): with tensor > 1, a
  // boundary between transformer chunks carries each tensor rank's 1 / t slice of the
  // activation (and of its gradient), rebuilt by an all-gather over the receiving tensor group.
  bool scatter_gather = true;
};

// The grid train() runs on `world` ranks; throws pipit::error naming the sizes that do not fit.
inline pipit::tp::grid_shape grid_of(const train_options& o, int world) {
  if (o.tensor < 1 || o.data < 1 || o.pipeline < 0)
    pipit::fail(
        "gpt: the grid needs tensor >= 1, data >= 1 and pipeline >= 0 (0: the rest), got "
        "tensor ",
        o.tensor, ", data ", o.data, ", pipeline ", o.pipeline);
  const int p = o.pipeline > 0 ? o.pipeline : world / (o.tensor * o.data);
  if (p < 1 || o.tensor * o.data * p != world)
    pipit::fail("gpt: the grid tensor ", o.tensor, " x data ", o.data, " x pipeline ",
                o.pipeline > 0 ? std::to_string(o.pipeline) : std::string("(the rest)"),
                " does not fit ", world, " ranks",
                o.pipeline > 0
                    ? " (it needs " + std::to_string(o.tensor * o.data * o.pipeline) + ")"
                    : std::string());
  check_tensor_parallel(o.model, o.tensor);
  return {o.tensor, o.data, p};
}

inline constexpr std::string_view vocab_algorithm_names[] = {"one-barrier", "two-barrier", "naive"};

struct step_report {
  int step = 0, steps = 0;       // step counts from 1
  double loss = 0;               // this step's mean cross-entropy
  double elapsed_seconds = 0;    // since the first step began
  double tokens_per_second = 0;  // over the steps so far
  double eta_seconds = 0;
};

struct rank_summary {
  std::string holds;  // e.g. "E t*2" (partition::describe per chunk), "+ E/L shard"
  int tensor = 0;     // the rank's coordinates on the grid
  int data = 0;
  int pipeline = 0;
  double busy_seconds = 0;     // inside compute instructions (stage and vocabulary passes)
  double comm_seconds = 0;     // inside the executor's point-to-point exchanges
  double wall_seconds = 0;     // from the first step to the last, on this rank
  double parameter_bytes = 0;  // parameters and their gradients (vocabulary shards included)
  double optimizer_bytes = 0;  // Adam's two moments
  double stash_bytes = 0;      // the executor's activation and gradient buffers
  double workspace_bytes = 0;  // the output layer's workspace (see train.hpp: memory)
  // Bytes this rank sends to other pipeline stages per step (activations and their gradients:
  // the executor's compiled sends); about 1 / t of it with scatter/gather.
  double sent_bytes_per_step = 0;
  double peak_bytes() const {
    return parameter_bytes + optimizer_bytes + stash_bytes + workspace_bytes;
  }
};

struct train_summary {
  std::vector<double> losses;            // per step
  std::vector<double> step_end_seconds;  // rank 0's clock at the end of each step
  std::vector<rank_summary> ranks;
  std::string layout;           // the partition, in the layout language
  pipit::tp::grid_shape grid;   // tensor x data x pipeline
  pipit::schedule::plan plan;   // the plan the executor ran (with its vocabulary passes)
  pipit::sim::result timeline;  // the recorded step's passes on this rank's pipeline, seconds
  int traced_step = 0;
  double seconds = 0;  // wall time of all steps (the slowest rank)
  long long tokens_per_step = 0;
  double tokens_per_second() const {
    return seconds > 0
               ? static_cast<double>(tokens_per_step) * static_cast<double>(losses.size()) / seconds
               : 0.0;
  }
  // Tokens/s after the first step (which allocates the executor's lazy state and warms caches);
  // the whole run's when there is one step.
  double steady_tokens_per_second() const {
    const std::size_t n = step_end_seconds.size();
    if (n < 2) return tokens_per_second();
    const double t = step_end_seconds.back() - step_end_seconds.front();
    return t > 0 ? static_cast<double>(tokens_per_step) * static_cast<double>(n - 1) / t : 0.0;
  }
};

// The plan the trainer runs: `schedule` on `ranks` pipeline stages.
inline pipit::schedule::shape shape_of(const train_options& o, int ranks) {
  const int chunks = o.chunks > 0 ? o.chunks : pipit::schedule::default_chunks(o.schedule);
  return {ranks, o.microbatches, chunks};
}

inline pipit::partition::partition partition_of(const train_options& o, int ranks) {
  const pipit::schedule::shape shp = shape_of(o, ranks);
  const pipit::partition::pipeline pl{ranks, shp.chunks, pipit::schedule::placement_of(o.schedule)};
  return make_partition(o.partition, o.model, pl);
}

inline pipit::schedule::vocab_passes vocab_passes_of(std::string_view algorithm) {
  using vp = pipit::schedule::vocab_passes;
  if (algorithm == "one-barrier") return vp::one_barrier;
  if (algorithm == "two-barrier") return vp::two_barrier;
  if (algorithm == "naive") return vp::naive;
  pipit::fail("gpt: unknown vocabulary algorithm '", algorithm,
              "' (known: one-barrier, two-barrier, naive)");
}

// f(std::type_identity<Algorithm>{}) for the output-layer algorithm named `algorithm`.
template <class F>
decltype(auto) with_vocab_algorithm(std::string_view algorithm, F&& f) {
  switch (vocab_passes_of(algorithm)) {
    case pipit::schedule::vocab_passes::two_barrier:
      return f(std::type_identity<pipit::vocab::two_barrier>{});
    case pipit::schedule::vocab_passes::naive:
      return f(std::type_identity<pipit::vocab::naive>{});
    default:
      return f(std::type_identity<pipit::vocab::one_barrier>{});
  }
}

inline pipit::schedule::plan plan_of(const train_options& o, int ranks) {
  if (!partition_of(o, ranks).vocab_parallel)
    return pipit::schedule::make_plan_by_name(o.schedule, shape_of(o, ranks));
  if (!pipit::schedule::supports_vocab_passes(o.schedule))
    pipit::fail("gpt: schedule '", o.schedule,
                "' has no vocabulary-parallel variant (vocab-parallel runs 1f1b, interleaved and "
                "v-half)");
  return pipit::schedule::make_vocab_plan(o.schedule, shape_of(o, ranks), vocab_passes_of(o.vocab));
}

namespace detail_train {

// The bytes pipit::runtime::vocab_layers allocates (vocab_layers.hpp): per S-to-T state the
// microbatch's X and its per-token loss-gradient scale, and its output layer's logits chunk of
// tokens x min(Chunk, shard rows) values; one scratch and one accumulator of tokens x hidden. The
// output layer's per-token statistics (a few values per token) are not counted.
template <class T>
double vocab_layers_bytes(const model_config& c, const pipit::vocab::vocab_shards& shards, int rank,
                          int slots) {
  const double n = c.tokens(), d = c.hidden;
  const double chunk_rows = static_cast<double>(std::min<std::int64_t>(
      static_cast<std::int64_t>(pipit::vocab::default_chunk), shards.real_rows(rank)));
  return slots * (n * d * sizeof(T) + n * sizeof(T) + n * chunk_rows * sizeof(T)) +
         n * d * 2 * sizeof(T);
}

// The bytes the compiled program sends to other pipeline ranks in one step: every send of its
// exchanges (one per activation or gradient crossing a stage boundary, each run once a step).
template <class T>
double sent_bytes(const pipit::runtime::program& p) {
  double bytes = 0;
  for (const auto& t : p.transfers)
    if (t.send) bytes += static_cast<double>(t.buffer.size * sizeof(T));
  return bytes;
}

// The training loop every rank runs once the executor exists. before_run(step) gives a
// vocabulary plan its batch; loss_of() is this rank's contribution to the step's loss.
template <class T, class Comm, class Exec, class BeforeRun, class LossOf, class OnStep>
void loop(Comm& comm, const train_options& o, Exec& ex, std::span<const parameter<T>> params,
          BeforeRun&& before_run, LossOf&& loss_of, OnStep& on_step, timeline_recorder& rec,
          adam<T>& opt, train_summary& out, double& wall) {
  using clock = std::chrono::steady_clock;
  const int traced = o.trace_step > 0 ? std::min(o.trace_step, o.steps) : o.steps;
  comm.barrier();
  const auto start = clock::now();
  for (int step = 1; step <= o.steps; ++step) {
    before_run(ex.step());
    rec.start_step(step == traced);
    ex.run(rec);
    double loss = loss_of();
    // Also a barrier: every rank starts the next step (and its clock) together.
    comm.all_reduce(std::span<double>(&loss, 1), std::plus<>{});
    opt.step(params);
    out.losses.push_back(loss);
    const double elapsed = std::chrono::duration<double>(clock::now() - start).count();
    out.step_end_seconds.push_back(elapsed);
    if (comm.rank() == 0) {
      step_report r;
      r.step = step;
      r.steps = o.steps;
      r.loss = loss;
      r.elapsed_seconds = elapsed;
      r.tokens_per_second = static_cast<double>(out.tokens_per_step) * step / r.elapsed_seconds;
      r.eta_seconds = r.elapsed_seconds / step * (o.steps - step);
      on_step(r);
    }
  }
  wall = std::chrono::duration<double>(clock::now() - start).count();
  out.traced_step = traced;
}

}  // namespace detail_train

// on_step(step_report) runs on rank 0 after every step; on_end(parameters) on every rank after
// the last, with every parameter this rank holds (vocabulary shards too: parameter::offset says
// where a shard starts in its tensor), to inspect the trained model.
//
// Memory (rank_summary): parameters with their gradients, Adam's moments, the executor's stash
// (every activation, gradient and `saved` buffer of the compiled plan) and the output layer's
// workspace: lm_head's peak over the run, or vocab_layers' states (detail_train). Not counted:
// the per-pass temporaries inside the layers, the communicator's buffers, the process itself.
template <class T, class Comm, class OnStep, class OnEnd>
train_summary train(Comm& comm, const train_options& o, const data_source& data, OnStep&& on_step,
                    OnEnd&& on_end) {
  if (o.steps < 1) pipit::fail("gpt: steps must be >= 1 (got ", o.steps, ")");
  if (o.trace_step < 0) pipit::fail("gpt: trace_step must be >= 0 (got ", o.trace_step, ")");
  const pipit::tp::grid_shape shape = grid_of(o, comm.size());
  const int ranks = shape.pipeline;
  const pipit::partition::partition part = partition_of(o, ranks);
  train_summary out;
  out.grid = shape;
  out.plan = plan_of(o, ranks);
  out.layout = pipit::partition::to_layout(part);
  out.tokens_per_step = static_cast<long long>(o.model.tokens()) * o.microbatches * shape.data;
  // Collective over comm: every rank splits it into its tensor, data and pipeline groups.
  pipit::tp::process_grid grid(comm, pipit::tp::grid_layout(shape));
  const pipit::tp::grid_coords at = grid.coords();
  gpt_stage<T> stage(o.model, part, at.pipeline, data,
                     {.microbatches = o.microbatches,
                      .data_seed = o.data_seed,
                      .replica = at.data,
                      .scatter_gather = o.scatter_gather},
                     shape.tensor > 1 ? make_tensor_group<T>(grid.tensor()) : tensor_group<T>{});
  const pipit::runtime::executor_options xo{.rematerialize = o.rematerialize, .seed = o.data_seed};
  timeline_recorder rec;
  double wall = 0, param_bytes = 0, workspace = 0, optimizer_bytes = 0, stash = 0, sent = 0;
  std::vector<parameter<T>> params(stage.parameters().begin(), stage.parameters().end());
  std::optional<vocab_tables<T>> tables;  // outlives the loop: on_end reads the parameters
  const double replicas = shape.data;

  if (!part.vocab_parallel) {
    // Over this rank's pipeline group, averaging the gradients over its data group (skipped
    // with one replica).
    pipit::runtime::executor ex(grid.groups(), stage, out.plan, xo);
    adam<T> opt(params, o.adam);
    // The last stage's tensor rank 0 of each replica counts its microbatches once.
    const auto loss_of = [&] {
      const double l = stage.take_loss();
      return at.tensor == 0 ? l / replicas : 0.0;
    };
    detail_train::loop<T>(
        comm, o, ex, std::span<const parameter<T>>(params), [](std::uint64_t) {}, loss_of, on_step,
        rec, opt, out, wall);
    param_bytes = static_cast<double>(2 * stage.parameter_count() * sizeof(T));
    optimizer_bytes = static_cast<double>(opt.state_bytes());
    stash = static_cast<double>(ex.stash_bytes());
    sent = detail_train::sent_bytes<T>(ex.compiled());
    workspace = static_cast<double>(stage.peak_workspace_bytes());
  } else {
    static_assert(std::is_same_v<pipit::vocab::accum_t<T>, T>,
                  "gpt::train: the vocabulary shards' gradients are kept in T, so T must be its "
                  "own accumulation type (float or double)");
    // One shard per pipeline x tensor rank of the replica (with t = 1: per pipeline rank).
    const pipit::vocab::vocab_shards shards(o.model.vocab, ranks * shape.tensor);
    const int shard = grid.vocab().rank();
    tables.emplace(o.model, shards, shard);
    params.insert(params.end(), tables->parameters().begin(), tables->parameters().end());
    with_vocab_algorithm(o.vocab, [&]<class A>(std::type_identity<A>) {
      pipit::runtime::vocab_layers<A, T> vocab(shards, shard, o.model.tokens(), tables->embedding(),
                                               tables->embedding_grad(), tables->head(),
                                               tables->head_grad());
      // Vocabulary collectives over the replica's pipeline x tensor ranks (grid.vocab()).
      pipit::runtime::executor ex(grid.groups(), stage, vocab, out.plan, xo);
      adam<T> opt(params, o.adam);
      // The step's ids and targets, the same on every rank of the replica, drawn as gpt_stage
      // draws them: the replica's microbatches [r m, (r + 1) m) of the step.
      const auto n = static_cast<std::size_t>(o.model.tokens());
      const auto s = static_cast<std::size_t>(o.model.seq);
      std::vector<std::int64_t> ids(n * static_cast<std::size_t>(o.microbatches)),
          targets(ids.size());
      std::vector<std::int32_t> raw(static_cast<std::size_t>(o.model.batch) * (s + 1));
      const auto before_run = [&](std::uint64_t step) {
        for (int mb = 0; mb < o.microbatches; ++mb) {
          data.microbatch(o.model, o.data_seed, step, 0, at.data * o.microbatches + mb, raw);
          const std::size_t first = static_cast<std::size_t>(mb) * n;
          for (std::size_t b = 0; b < static_cast<std::size_t>(o.model.batch); ++b)
            for (std::size_t t = 0; t < s; ++t) {
              ids[first + b * s + t] = raw[b * (s + 1) + t];
              targets[first + b * s + t] = raw[b * (s + 1) + t + 1];
            }
        }
        vocab.set_batch(ids, targets);
      };
      // Every rank of a replica knows its loss after the S passes; one rank of it contributes.
      const auto loss_of = [&] {
        return at.pipeline == 0 && at.tensor == 0
                   ? static_cast<double>(vocab.loss().loss) / replicas
                   : 0.0;
      };
      detail_train::loop<T>(comm, o, ex, std::span<const parameter<T>>(params), before_run, loss_of,
                            on_step, rec, opt, out, wall);
      param_bytes = static_cast<double>(2 * stage.parameter_count() * sizeof(T) + tables->bytes());
      optimizer_bytes = static_cast<double>(opt.state_bytes());
      stash = static_cast<double>(ex.stash_bytes());
      sent = detail_train::sent_bytes<T>(ex.compiled());
      workspace = detail_train::vocab_layers_bytes<T>(o.model, shards, shard,
                                                      std::max(ex.compiled().vocab_slots, 1));
    });
  }
  on_end(std::span<const parameter<T>>(params));
  out.timeline = gather_timeline(grid.pipeline(), rec.passes());

  // Every rank's numbers to every rank.
  constexpr std::size_t fields = 8;
  const int world = comm.size();
  const std::array<double, fields> mine{rec.busy_seconds(),
                                        rec.comm_seconds(),
                                        wall,
                                        param_bytes,
                                        optimizer_bytes,
                                        stash,
                                        workspace,
                                        sent};
  std::vector<double> all(fields * static_cast<std::size_t>(world));
  comm.all_gather(std::span<const double>(mine), std::span<double>(all));
  for (int r = 0; r < world; ++r) {
    const double* f = all.data() + fields * static_cast<std::size_t>(r);
    const pipit::tp::grid_coords c = grid.layout().coords_of(r);
    rank_summary s;
    s.tensor = c.tensor;
    s.data = c.data;
    s.pipeline = c.pipeline;
    for (const int v : part.stages_of(c.pipeline))
      s.holds += (s.holds.empty() ? "" : " | ") +
                 pipit::partition::describe(part.stages[static_cast<std::size_t>(v)]);
    if (part.vocab_parallel) s.holds += " + E/L shard";
    if (shape.tensor > 1)
      s.holds += " (tp " + std::to_string(c.tensor) + "/" + std::to_string(shape.tensor) + ")";
    s.busy_seconds = f[0];
    s.comm_seconds = f[1];
    s.wall_seconds = f[2];
    s.parameter_bytes = f[3];
    s.optimizer_bytes = f[4];
    s.stash_bytes = f[5];
    s.workspace_bytes = f[6];
    s.sent_bytes_per_step = f[7];
    out.seconds = std::max(out.seconds, f[2]);
    out.ranks.push_back(s);
  }
  return out;
}

template <class T, class Comm, class OnStep>
train_summary train(Comm& comm, const train_options& o, const data_source& data, OnStep&& on_step) {
  return train<T>(comm, o, data, on_step, [](std::span<const parameter<T>>) {});
}

}  // namespace gpt
