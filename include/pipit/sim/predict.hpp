#pragma once
// predict: a real model's iteration on a real pipeline, before renting the cluster. A partition
// of a transformer (pipit/partition), the cost model and a hardware profile (pipit/cost) give
// every virtual stage's pass durations and activation bytes; the simulator runs the schedule's
// plan with them; the result is the iteration time, tokens per second, MFU, and per rank the
// compute and idle time and the peak memory by category (weights, gradients, optimizer states,
// activations in flight, transient workspace).
//
// What is modelled and what is not (docs/partitions_and_costs.md has the comparison with the
// vocabulary-parallelism paper's measurements):
//   - pass time = Σ work / (peak × achievable fraction) per kind of work, no per-configuration
//     factors; point-to-point transfers between stages as alpha–beta latency on the dependency;
//   - under vocabulary parallelism the vocabulary work is spread evenly over every rank's passes
//     (the plan has no S/T actions yet) and its collectives overlap compute — only the part of a
//     microbatch's collectives longer than the rank's compute for that microbatch is added;
//   - iteration time = the pipeline's makespan + the slowest rank's optimizer step (memory-bound)
//     and, with data parallelism, its gradient synchronisation (no overlap);
//   - tensor parallelism (the overload with a `parallelism`): split work, memory and parameters
//     per rank of a stage's group (cost/tensor_parallel.hpp), its collectives added to F and B;
//   - peak memory = states + the simulated peak of in-flight activations (+ the vocabulary
//     extras, cost/stage_costs.hpp) + the largest transient workspace; the caching allocator's
//     fragmentation, CUDA/NCCL/cuBLAS buffers and the CUDA context are not counted;
//   - MFU divides the model FLOPs (3 × the forward's, cost::model_flops_per_iteration) by
//     iteration time × GPUs × peak, as the paper's artifact does.

#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/cost/cluster.hpp"
#include "pipit/cost/communication.hpp"
#include "pipit/cost/data_parallel.hpp"
#include "pipit/cost/flops.hpp"
#include "pipit/cost/hardware.hpp"
#include "pipit/cost/memory.hpp"
#include "pipit/cost/stage_costs.hpp"
#include "pipit/cost/tensor_parallel.hpp"
#include "pipit/cost/transformer.hpp"
#include "pipit/cost/vocab_algorithm.hpp"
#include "pipit/partition/partition.hpp"
#include "pipit/schedule/by_name.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/sim/costs.hpp"
#include "pipit/sim/simulate.hpp"

namespace pipit::sim {

// Bytes of one rank's memory by category.
struct memory_breakdown {
  double parameters = 0;   // weights
  double gradients = 0;    // weight gradients
  double optimizer = 0;    // optimizer states
  double activations = 0;  // activations in flight at their peak
  double workspace = 0;    // the largest transient of any pass

  constexpr double total() const noexcept {
    return parameters + gradients + optimizer + activations + workspace;
  }
};

struct rank_prediction {
  double busy = 0;            // seconds of compute per iteration
  double idle = 0;            // pipeline time − busy
  double optimizer_step = 0;  // seconds of its optimizer step
  double gradient_sync = 0;   // seconds of its data-parallel gradient synchronisation
  memory_breakdown memory{};  // at the peak
  double peak_memory_bytes = 0;
  std::string parts;  // the model parts it holds, e.g. "E t*4", or "t*2 | t*2 L" for chunks
};

struct prediction {
  double iteration_time = 0;  // pipeline_time + the slowest rank's gradient sync + optimizer step
  double pipeline_time = 0;   // the simulated plan's makespan
  double optimizer_time = 0;  // the slowest rank's optimizer step
  double gradient_sync_time = 0;  // the slowest rank's data-parallel gradient synchronisation
  double tokens_per_second = 0;   // replicas × microbatches × microbatch_size × seq / iteration
  double model_flops = 0;         // per iteration, all replicas (cost::model_flops_per_iteration)
  double mfu = 0;                 // model_flops / (iteration_time × GPUs × peak)
  double p2p_time = 0;            // one activation or gradient between neighbouring stages
  double vocab_comm_time = 0;     // vocabulary collectives per microbatch (vocab parallel)
  double max_peak_memory_bytes = 0;
  std::vector<rank_prediction> ranks;
  std::vector<stage_costs> stages;  // what the simulator was given, per virtual stage
  result sim;                       // the simulated plan
};

// The 3D layout an iteration runs on: each virtual stage split over a tensor-parallel group,
// the pipeline replicated over data-parallel groups, and the links each group uses
// (cost::links_of picks them from a cluster). The default is one pipeline on the hardware's own
// links: predict(plan, part, t, hw, alg) uses parallelism_of(hw).
struct parallelism {
  cost::tensor_parallel tensor{};
  cost::data_parallel data{};
  cost::group_links links{};
  bool scatter_gather = true;  // Megatron's scatter/gather of stage outputs (cost/tensor_parallel)
};

inline parallelism parallelism_of(const cost::hardware& hw) {
  parallelism par;
  par.links.tensor = par.links.data = par.links.vocab = hw.collective;
  par.links.pipeline = hw.p2p;
  return par;
}

// What the simulator is given for one partition on one 3D layout: every virtual stage's pass
// durations (the tensor-parallel collectives added to F and B; the exposed part of the
// vocabulary collectives to F) and activation bytes, the stage-to-stage transfer time, and the
// cost model's per-stage and per-rank costs they come from. predict() simulates them; the planner
// (sim/search.hpp) also bounds a configuration with them before simulating it.
struct pipeline_inputs {
  cost::model_costs model;
  std::vector<stage_costs> stages;
  double p2p_time = 0;
  double vocab_comm_time = 0;
};

inline pipeline_inputs pipeline_inputs_of(const partition::partition& part,
                                          const cost::transformer& t, const cost::hardware& hw,
                                          cost::vocab_algorithm alg, const parallelism& par) {
  const cost::tensor_parallel& tp = par.tensor;
  pipeline_inputs in;
  in.model = cost::stage_costs(t, part, alg, tp);
  const cost::model_costs& mc = in.model;
  const int p = part.pipe.ranks;
  in.p2p_time =
      cost::stage_transfer_time(t, tp, par.links.pipeline, par.links.tensor, par.scatter_gather);
  const cost::comm_seconds layer_comm = cost::layer_comm_time(t, tp, par.links.tensor);
  const cost::comm_seconds output_comm = cost::output_comm_time(t, tp, par.links.tensor);
  const cost::comm_seconds embedding_comm = cost::embedding_comm_time(t, tp, par.links.tensor);
  in.stages.resize(mc.stages.size());
  for (std::size_t s = 0; s < mc.stages.size(); ++s) {
    const cost::stage_cost& c = mc.stages[s];
    in.stages[s] = {cost::seconds(c.work.f, hw), cost::seconds(c.work.b, hw),
                    cost::seconds(c.work.w, hw), c.activation_bytes, c.free_at_b()};
    if (tp.size > 1) {
      const auto& st = part.stages[s];
      in.stages[s].f += st.layers * layer_comm.forward + (st.output ? output_comm.forward : 0) +
                        (st.embedding ? embedding_comm.forward : 0);
      in.stages[s].b += st.layers * layer_comm.backward + (st.output ? output_comm.backward : 0);
    }
  }
  // Vocabulary collectives overlap the rank's compute; what exceeds a microbatch's compute on the
  // rank is added to its forwards.
  if (mc.vocab_parallel) {
    in.vocab_comm_time = cost::vocab_parallel_comm_time(t, p * tp.size, alg, par.links.vocab);
    for (int r = 0; r < p; ++r) {
      double compute = 0;
      const auto mine = part.stages_of(r);
      for (const int s : mine) {
        const auto& st = in.stages[static_cast<std::size_t>(s)];
        compute += st.f + st.b + st.w;
      }
      const double exposed = std::max(0.0, in.vocab_comm_time - compute);
      for (const int s : mine)
        in.stages[static_cast<std::size_t>(s)].f += exposed / static_cast<double>(mine.size());
    }
  }
  return in;
}

// What a rank does after the pipeline: its optimizer step (memory-bound; split over the replicas
// with the distributed optimizer) and its gradient synchronisation.
struct rank_tail {
  double optimizer_step = 0;
  double gradient_sync = 0;
};
inline rank_tail rank_tail_of(const cost::transformer& t, const cost::hardware& hw,
                              const parallelism& par, double parameters) {
  return {cost::optimizer_step_bytes(t, parameters) / par.data.optimizer_share() /
              (hw.memory_bandwidth * hw.memory_fraction),
          cost::gradient_sync_time(t, parameters, par.data, par.links.data)};
}

// Throws pipit::error when the plan, the partition and the model do not fit together.
//
// With tensor parallelism, every rank of a stage's group does the stage's split work
// (cost::stage_costs with the tensor_parallel) and waits for its collectives: they are added to
// the F and B passes (none overlaps compute; cost/tensor_parallel.hpp). With data parallelism,
// tokens/s counts all replicas, and the iteration adds the slowest rank's gradient
// synchronisation to its optimizer step (cost/data_parallel.hpp: after the flush, no overlap).
inline prediction predict(const schedule::plan& plan, const partition::partition& part,
                          const cost::transformer& t, const cost::hardware& hw,
                          cost::vocab_algorithm alg, const parallelism& par) {
  cost::check(t);
  cost::check(hw);
  cost::check(par.data);
  if (plan.shp.stages != part.pipe.ranks || plan.shp.chunks != part.pipe.chunks ||
      plan.place != part.pipe.place)
    fail("pipit: predict(): the plan (", plan.schedule, ": ranks ", plan.shp.stages, ", chunks ",
         plan.shp.chunks, ", ", schedule::name(plan.place), " placement) and the partition (ranks ",
         part.pipe.ranks, ", chunks ", part.pipe.chunks, ", ", schedule::name(part.pipe.place),
         " placement) differ");
  const cost::tensor_parallel& tp = par.tensor;
  const pipeline_inputs in = pipeline_inputs_of(part, t, hw, alg, par);
  const cost::model_costs& mc = in.model;
  const int p = part.pipe.ranks;
  prediction out;
  out.p2p_time = in.p2p_time;
  out.vocab_comm_time = in.vocab_comm_time;
  out.stages = in.stages;

  costs c;
  c.comm = out.p2p_time;
  c.stages = out.stages;
  out.sim = simulate(plan, c);
  out.pipeline_time = out.sim.makespan;

  const double optimizer_share = par.data.optimizer_share();
  double tail = 0;  // the slowest rank's gradient synchronisation + optimizer step
  out.ranks.resize(static_cast<std::size_t>(p));
  for (int r = 0; r < p; ++r) {
    const auto ru = static_cast<std::size_t>(r);
    const cost::rank_cost& rc = mc.ranks[ru];
    rank_prediction& rp = out.ranks[ru];
    rp.busy = out.sim.ranks[ru].busy;
    rp.idle = out.sim.ranks[ru].idle;
    const cost::state_bytes states = cost::states_of(t, rc.parameters);
    rp.memory = {states.parameters, states.gradients, states.optimizer / optimizer_share,
                 out.sim.ranks[ru].peak_activation_bytes + rc.extra_activation_bytes,
                 rc.workspace_bytes};
    rp.peak_memory_bytes = rp.memory.total();
    const rank_tail tail_r = rank_tail_of(t, hw, par, rc.parameters);
    rp.optimizer_step = tail_r.optimizer_step;
    rp.gradient_sync = tail_r.gradient_sync;
    for (const int s : part.stages_of(r)) {
      if (!rp.parts.empty()) rp.parts += " | ";
      rp.parts += partition::describe(part.stages[static_cast<std::size_t>(s)]);
    }
    if (part.vocab_parallel) rp.parts += " + E/L shard";
    out.optimizer_time = std::max(out.optimizer_time, rp.optimizer_step);
    out.gradient_sync_time = std::max(out.gradient_sync_time, rp.gradient_sync);
    tail = std::max(tail, rp.gradient_sync + rp.optimizer_step);
    out.max_peak_memory_bytes = std::max(out.max_peak_memory_bytes, rp.peak_memory_bytes);
  }
  out.iteration_time = out.pipeline_time + tail;
  const int m = plan.shp.microbatches, d = par.data.size;
  out.model_flops = d * cost::model_flops_per_iteration(t, m);
  out.tokens_per_second = d * (m * t.tokens()) / out.iteration_time;
  out.mfu = out.model_flops / (out.iteration_time * (double(p) * tp.size * d) * hw.peak_flops);
  return out;
}

inline prediction predict(const schedule::plan& plan, const partition::partition& part,
                          const cost::transformer& t, const cost::hardware& hw,
                          cost::vocab_algorithm alg = cost::vocab_algorithm::one_barrier) {
  return predict(plan, part, t, hw, alg, parallelism_of(hw));
}

// The same, making the plan of the schedule named `schedule` (pipit::schedule::by_name) for the
// partition's pipeline and `microbatches`.
inline prediction predict(std::string_view schedule, int microbatches,
                          const partition::partition& part, const cost::transformer& t,
                          const cost::hardware& hw,
                          cost::vocab_algorithm alg = cost::vocab_algorithm::one_barrier) {
  const schedule::plan plan =
      schedule::make_plan_by_name(schedule, {part.pipe.ranks, microbatches, part.pipe.chunks});
  if (plan.place != part.pipe.place)
    fail("pipit: predict(): schedule '", schedule, "' uses ", schedule::name(plan.place),
         " placement but the partition is made for ", schedule::name(part.pipe.place));
  return predict(plan, part, t, hw, alg);
}

}  // namespace pipit::sim
