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
//   - iteration time = the pipeline's makespan + the slowest rank's optimizer step (memory-bound);
//   - peak memory = states + the simulated peak of in-flight activations (+ the vocabulary
//     extras, cost/stage_costs.hpp) + the largest transient workspace; the caching allocator's
//     fragmentation, CUDA/NCCL/cuBLAS buffers and the CUDA context are not counted;
//   - MFU divides the model FLOPs (3 × the forward's, cost::model_flops_per_iteration) by
//     iteration time × ranks × peak, as the paper's artifact does.

#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/cost/communication.hpp"
#include "pipit/cost/flops.hpp"
#include "pipit/cost/hardware.hpp"
#include "pipit/cost/memory.hpp"
#include "pipit/cost/stage_costs.hpp"
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
  memory_breakdown memory{};  // at the peak
  double peak_memory_bytes = 0;
  std::string parts;  // the model parts it holds, e.g. "E t*4", or "t*2 | t*2 L" for chunks
};

struct prediction {
  double iteration_time = 0;     // pipeline_time + optimizer_time
  double pipeline_time = 0;      // the simulated plan's makespan
  double optimizer_time = 0;     // the slowest rank's optimizer step
  double tokens_per_second = 0;  // microbatches × microbatch_size × seq / iteration_time
  double model_flops = 0;        // per iteration (cost::model_flops_per_iteration)
  double mfu = 0;                // model_flops / (iteration_time × ranks × peak)
  double p2p_time = 0;           // one activation or gradient between neighbouring stages
  double vocab_comm_time = 0;    // vocabulary collectives per microbatch (vocab parallel)
  double max_peak_memory_bytes = 0;
  std::vector<rank_prediction> ranks;
  std::vector<stage_costs> stages;  // what the simulator was given, per virtual stage
  result sim;                       // the simulated plan
};

// Throws pipit::error when the plan, the partition and the model do not fit together.
inline prediction predict(const schedule::plan& plan, const partition::partition& part,
                          const cost::transformer& t, const cost::hardware& hw,
                          cost::vocab_algorithm alg = cost::vocab_algorithm::one_barrier) {
  cost::check(t);
  cost::check(hw);
  if (plan.shp.stages != part.pipe.ranks || plan.shp.chunks != part.pipe.chunks ||
      plan.place != part.pipe.place)
    fail("pipit: predict(): the plan (", plan.schedule, ": ranks ", plan.shp.stages, ", chunks ",
         plan.shp.chunks, ", ", schedule::name(plan.place), " placement) and the partition (ranks ",
         part.pipe.ranks, ", chunks ", part.pipe.chunks, ", ", schedule::name(part.pipe.place),
         " placement) differ");
  const cost::model_costs mc = cost::stage_costs(t, part, alg);
  const int p = part.pipe.ranks;
  prediction out;
  out.p2p_time = cost::p2p_time(hw.p2p, cost::activation_message_bytes(t));

  // Per-stage durations for the simulator.
  out.stages.resize(mc.stages.size());
  for (std::size_t s = 0; s < mc.stages.size(); ++s) {
    const cost::stage_cost& c = mc.stages[s];
    out.stages[s] = {cost::seconds(c.work.f, hw), cost::seconds(c.work.b, hw),
                     cost::seconds(c.work.w, hw), c.activation_bytes, c.free_at_b()};
  }
  // Vocabulary collectives overlap the rank's compute; what exceeds a microbatch's compute on the
  // rank is added to its forwards.
  if (mc.vocab_parallel) {
    out.vocab_comm_time = cost::vocab_parallel_comm_time(t, p, alg, hw.collective);
    for (int r = 0; r < p; ++r) {
      double compute = 0;
      const auto mine = part.stages_of(r);
      for (const int s : mine) {
        const auto& st = out.stages[static_cast<std::size_t>(s)];
        compute += st.f + st.b + st.w;
      }
      const double exposed = std::max(0.0, out.vocab_comm_time - compute);
      for (const int s : mine)
        out.stages[static_cast<std::size_t>(s)].f += exposed / static_cast<double>(mine.size());
    }
  }

  costs c;
  c.comm = out.p2p_time;
  c.stages = out.stages;
  out.sim = simulate(plan, c);
  out.pipeline_time = out.sim.makespan;

  out.ranks.resize(static_cast<std::size_t>(p));
  for (int r = 0; r < p; ++r) {
    const auto ru = static_cast<std::size_t>(r);
    const cost::rank_cost& rc = mc.ranks[ru];
    rank_prediction& rp = out.ranks[ru];
    rp.busy = out.sim.ranks[ru].busy;
    rp.idle = out.sim.ranks[ru].idle;
    const cost::state_bytes states = cost::states_of(t, rc.parameters);
    rp.memory = {states.parameters, states.gradients, states.optimizer,
                 out.sim.ranks[ru].peak_activation_bytes + rc.extra_activation_bytes,
                 rc.workspace_bytes};
    rp.peak_memory_bytes = rp.memory.total();
    rp.optimizer_step =
        cost::optimizer_step_bytes(t, rc.parameters) / (hw.memory_bandwidth * hw.memory_fraction);
    for (const int s : part.stages_of(r)) {
      if (!rp.parts.empty()) rp.parts += " | ";
      rp.parts += partition::describe(part.stages[static_cast<std::size_t>(s)]);
    }
    if (part.vocab_parallel) rp.parts += " + E/L shard";
    out.optimizer_time = std::max(out.optimizer_time, rp.optimizer_step);
    out.max_peak_memory_bytes = std::max(out.max_peak_memory_bytes, rp.peak_memory_bytes);
  }
  out.iteration_time = out.pipeline_time + out.optimizer_time;
  const int m = plan.shp.microbatches;
  out.model_flops = cost::model_flops_per_iteration(t, m);
  out.tokens_per_second = m * t.tokens() / out.iteration_time;
  out.mfu = out.model_flops / (out.iteration_time * p * hw.peak_flops);
  return out;
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
