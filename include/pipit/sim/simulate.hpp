#pragma once
// Timed simulation of a plan: every action's start and end under the data dependencies and each
// rank's order, then makespan, per-rank busy/idle time, bubble fraction and peak in-flight
// activations. Works on unlowered and lowered plans alike (communication is modelled by the
// latency on cross-rank dependencies).

#include <algorithm>
#include <cstddef>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/schedule/dataflow.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/validate.hpp"
#include "pipit/sim/costs.hpp"

namespace pipit::sim {

struct timed_action {
  schedule::action act;
  double start = 0;
  double end = 0;
};

struct rank_stats {
  double busy = 0;              // time spent in compute passes
  double idle = 0;              // makespan - busy
  double bubble_fraction = 0;   // idle / makespan
  double peak_activations = 0;  // max running sum of in-flight activations (see activation units)
  double peak_activation_bytes = 0;  // the same in bytes, with costs.stages (0 without)
  double first_start = 0;            // start of the rank's first compute pass
  double last_end = 0;               // end of its last compute pass
};

// Activation units: one microbatch's activations through one 1/stages slice of the model; a
// chunk of a rank holding v chunks counts 1/v. F adds its share, BW frees it, B frees
// costs.free_at_b of it (costs.stages[s].free_at_b when per-stage costs are given) and W the rest.
// Activation bytes (with costs.stages only): the same running sum, F of stage s adding
// costs.stages[s].activation_bytes.
struct result {
  double makespan = 0;
  double bubble_fraction = 0;  // 1 - total busy / (ranks * makespan)
  std::vector<rank_stats> ranks;
  std::vector<std::vector<timed_action>> timeline;  // per rank, compute actions only, in order
};

constexpr double duration(const schedule::action& a, const schedule::shape& s, const costs& c) {
  using schedule::op;
  double d = 0;
  switch (a.kind) {
    case op::forward:
      d = c.f;
      break;
    case op::backward_input:
      d = c.b;
      break;
    case op::backward_weight:
      d = c.w;
      break;
    case op::backward:
      d = c.b + c.w;
      break;
    case op::vocab_s:
      return c.vocab_s;
    case op::vocab_t:
      return c.vocab_t;
    case op::embed_forward:
      return c.embed_f;
    case op::embed_backward:
      return c.embed_b;
    default:
      return 0;
  }
  if (c.stages.empty()) {
    d /= s.chunks;
  } else {
    const stage_costs& st = c.stages[static_cast<std::size_t>(a.stage)];
    d = a.kind == op::forward           ? st.f
        : a.kind == op::backward_input  ? st.b
        : a.kind == op::backward_weight ? st.w
                                        : st.b + st.w;
  }
  if (!c.stage_scale.empty()) d *= c.stage_scale[static_cast<std::size_t>(a.stage)];
  return d;
}

constexpr result simulate(const schedule::plan& p, const costs& c) {
  if (const auto v = schedule::validate(p); !v.ok)
    fail("pipit: simulate(): ", schedule::to_string(v));
  if (!c.stage_scale.empty() && static_cast<int>(c.stage_scale.size()) != p.shp.virtual_stages())
    fail("pipit: simulate(): costs.stage_scale has ", c.stage_scale.size(),
         " entries but the plan has ", p.shp.virtual_stages(), " virtual stages");
  if (!c.stages.empty() && static_cast<int>(c.stages.size()) != p.shp.virtual_stages())
    fail("pipit: simulate(): costs.stages has ", c.stages.size(), " entries but the plan has ",
         p.shp.virtual_stages(), " virtual stages");
  for (std::size_t s = 0; s < c.stages.size(); ++s) {
    const stage_costs& st = c.stages[s];
    if (!(st.f >= 0 && st.b >= 0 && st.w >= 0 && st.activation_bytes >= 0 && st.free_at_b >= 0 &&
          st.free_at_b <= 1))
      fail("pipit: simulate(): costs.stages[", s,
           "] must be >= 0 and free_at_b in [0, 1] (f=", st.f, " b=", st.b, " w=", st.w,
           " activation_bytes=", st.activation_bytes, " free_at_b=", st.free_at_b, ")");
  }
  if (c.f < 0 || c.b < 0 || c.w < 0 || c.comm < 0 || c.free_at_b < 0 || c.free_at_b > 1 ||
      c.vocab_s < 0 || c.vocab_t < 0 || c.embed_f < 0 || c.embed_b < 0)
    fail("pipit: simulate(): costs must be >= 0 and free_at_b in [0, 1] (f=", c.f, " b=", c.b,
         " w=", c.w, " comm=", c.comm, " free_at_b=", c.free_at_b, " vocab_s=", c.vocab_s,
         " vocab_t=", c.vocab_t, " embed_f=", c.embed_f, " embed_b=", c.embed_b, ")");

  const auto ex = schedule::execute(
      p, [&](const schedule::action& a, int) { return duration(a, p.shp, c); }, c.comm);
  result out;
  out.ranks.resize(static_cast<std::size_t>(p.rank_count()));
  out.timeline.resize(static_cast<std::size_t>(p.rank_count()));
  const double share = 1.0 / p.shp.chunks;
  double total_busy = 0;
  for (int r = 0; r < p.rank_count(); ++r) {
    const auto ru = static_cast<std::size_t>(r);
    const auto acts = p.for_rank(r);
    rank_stats& st = out.ranks[ru];
    double live = 0, live_bytes = 0;
    bool first = true;
    out.timeline[ru].reserve(acts.size());
    for (std::size_t i = 0; i < acts.size(); ++i) {
      const auto& a = acts[i];
      if (!schedule::is_compute(a.kind)) continue;
      const double s0 = ex.start[ru][i], e0 = ex.end[ru][i];
      out.timeline[ru].push_back({a, s0, e0});
      st.busy += e0 - s0;
      if (first) st.first_start = s0;
      first = false;
      st.last_end = std::max(st.last_end, e0);
      const bool per_stage = !c.stages.empty();
      const double at_b =
          per_stage ? c.stages[static_cast<std::size_t>(a.stage)].free_at_b : c.free_at_b;
      const double bytes =
          per_stage ? c.stages[static_cast<std::size_t>(a.stage)].activation_bytes : 0.0;
      switch (a.kind) {
        case schedule::op::forward:
          live += share;
          live_bytes += bytes;
          break;
        case schedule::op::backward:
          live -= share;
          live_bytes -= bytes;
          break;
        case schedule::op::backward_input:
          live -= share * at_b;
          live_bytes -= bytes * at_b;
          break;
        case schedule::op::backward_weight:
          live -= share * (1 - at_b);
          live_bytes -= bytes * (1 - at_b);
          break;
        default:
          break;
      }
      st.peak_activations = std::max(st.peak_activations, live);
      st.peak_activation_bytes = std::max(st.peak_activation_bytes, live_bytes);
    }
    out.makespan = std::max(out.makespan, st.last_end);
    total_busy += st.busy;
  }
  for (auto& st : out.ranks) {
    st.idle = out.makespan - st.busy;
    st.bubble_fraction = out.makespan > 0 ? st.idle / out.makespan : 0;
  }
  out.bubble_fraction = out.makespan > 0 ? 1 - total_busy / (p.rank_count() * out.makespan) : 0;
  return out;
}

}  // namespace pipit::sim
