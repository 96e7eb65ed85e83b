#pragma once
// The nano-batch parameter search (NanoFlow, Zhu et al., arXiv 2408.12757, section 4.2): from a
// measured profile and a cost model, choose for every operation the number and sizes of its
// nano-batches that minimise the predicted iteration time.
//
// Cost model. Each kind of operation runs on a serial machine (the runner's thread for that
// kind); cost_model::machine maps kinds to machines, so kinds that share a processor can share a
// machine (on a host with one core per rank, compute and memory ops compete for it: {0, 0, 1}).
// A nano-op takes profile.duration(op, rows) plus cost_model::dispatch_seconds. predict()
// simulates the runner: each kind's queue in issue order, a nano-op starting when its machine is
// free and its row-wise dependencies have ended (a shared machine takes whichever queue head
// can start first). The prediction is the makespan.
//
// The optimum (NanoFlow's "optimal throughput", section 3: an iteration cannot be faster than
// its busiest resource): resource_bound() = max over machines of the least work its ops can
// take, i.e. perfect overlap with no dispatch cost. An op's least work is the cheapest way to
// cover its rows with nano-batches of any sizes under the profile (usually the full batch; a
// measured profile can make some split cheaper in sum, and then the bound takes that split, so
// that no prediction of any split can fall below it).
//
// Search. NanoFlow solves two MILPs (Gurobi; auto_search/search.py): nano-op order without
// interference, then SM shares with interference. The host has no SM shares and the issue
// order is fixed by the runner, so what is left is the split; pipit searches it directly: first
// the best uniform count for all ops (1..max_count), then coordinate descent over groups of ops
// (ops i, i + period, i + 2 period, ...: the same op in every layer of a stack), each group
// trying every even split of 1..max_count nano-batches and the two-way uneven splits
// (rows * q / uneven_steps, rest), keeping a change only when it lowers the prediction. The
// result's prediction is therefore never above that of no nano-batching.

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/op_graph.hpp"
#include "pipit/nano/profiler.hpp"

namespace pipit::nano {

struct cost_model {
  std::array<int, resource_count> machine{0, 1, 2};  // machine of compute, memory, network
  double dispatch_seconds = 0;                       // added to every nano-op
};

struct interval {
  double start = 0, end = 0;
};

// The simulated timeline of a program: start and end of every nano-op.
inline std::vector<interval> simulate(const nano_program& p, const profile& prof,
                                      const cost_model& model) {
  if (prof.ops() != p.graph_ops())
    fail("pipit::nano::simulate: a profile of ", prof.ops(), " ops for a program of ",
         p.graph_ops());
  for (int m : model.machine)
    if (m < 0 || m >= resource_count)
      fail("pipit::nano::cost_model: machine ", m, " (need 0..", resource_count - 1, ")");
  constexpr double inf = std::numeric_limits<double>::infinity();
  std::vector<interval> t(static_cast<std::size_t>(p.size()));
  std::vector<char> done(static_cast<std::size_t>(p.size()), 0);
  std::array<std::size_t, resource_count> head{};
  std::array<double, resource_count> machine_free{};
  for (int scheduled = 0; scheduled < p.size(); ++scheduled) {
    int pick = -1, pick_kind = -1;
    double pick_start = inf;
    for (int k = 0; k < resource_count; ++k) {
      const auto q = p.queue(static_cast<resource>(k));
      if (head[static_cast<std::size_t>(k)] == q.size()) continue;
      const int i = q[head[static_cast<std::size_t>(k)]];
      double ready = 0;
      bool ok = true;
      for (int d : p.deps(i)) {
        if (!done[static_cast<std::size_t>(d)]) {
          ok = false;
          break;
        }
        ready = std::max(ready, t[static_cast<std::size_t>(d)].end);
      }
      if (!ok) continue;
      const double start = std::max(
          ready,
          machine_free[static_cast<std::size_t>(model.machine[static_cast<std::size_t>(k)])]);
      if (start < pick_start || (start == pick_start && i < pick)) {
        pick = i;
        pick_kind = k;
        pick_start = start;
      }
    }
    if (pick < 0)
      fail("pipit::nano::simulate: no nano-op can start (the issue order is not topological)");
    const nano_op& n = p[pick];
    const double end = pick_start + model.dispatch_seconds + prof.duration(n.op, n.rows.size());
    t[static_cast<std::size_t>(pick)] = {pick_start, end};
    done[static_cast<std::size_t>(pick)] = 1;
    ++head[static_cast<std::size_t>(pick_kind)];
    machine_free[static_cast<std::size_t>(model.machine[static_cast<std::size_t>(pick_kind)])] =
        end;
  }
  return t;
}

// Predicted iteration time of the runner (makespan of simulate()).
inline double predict(const nano_program& p, const profile& prof, const cost_model& model) {
  double end = 0;
  for (const interval& i : simulate(p, prof, model)) end = std::max(end, i.end);
  return end;
}
inline double predict(const op_graph& g, const nano_batch& plan, const profile& prof,
                      const cost_model& model) {
  return predict(nano_program(g, plan), prof, model);
}

// Predicted time of nano_runner::run_sequential (no overlap at all): the sum of the durations.
inline double predict_sequential(const op_graph& g, const nano_batch& plan, const profile& prof) {
  double s = 0;
  const nano_program p(g, plan);
  for (const nano_op& n : p.ops()) s += prof.duration(n.op, n.rows.size());
  return s;
}

// The least time op `op` can take on `rows` rows under the profile, over every split into
// nano-batches (no dispatch cost): least(r) = min over s in [1, r] of duration(s) + least(r - s).
inline double least_work(int op, std::int64_t rows, const profile& prof) {
  if (rows < 0) fail("pipit::nano::least_work: ", rows, " rows");
  std::vector<double> least(static_cast<std::size_t>(rows) + 1, 0.0);
  for (std::int64_t r = 1; r <= rows; ++r) {
    double best = prof.duration(op, r);  // one nano-batch: also the exact value when it wins
    for (std::int64_t s = 1; s < r; ++s)
      best = std::min(best, prof.duration(op, s) + least[static_cast<std::size_t>(r - s)]);
    least[static_cast<std::size_t>(r)] = best;
  }
  return least[static_cast<std::size_t>(rows)];
}

// The resource-bound optimum: max over machines of the summed least work of their ops.
inline double resource_bound(const op_graph& g, std::int64_t rows, const profile& prof,
                             const cost_model& model) {
  std::array<double, resource_count> busy{};
  for (int o = 0; o < g.size(); ++o)
    busy[static_cast<std::size_t>(model.machine[static_cast<std::size_t>(g[o].kind)])] +=
        least_work(o, rows, prof);
  return *std::max_element(busy.begin(), busy.end());
}

struct search_options {
  int max_count = 8;     // most nano-batches per op (and at most the batch's rows)
  int period = 0;        // ops i, i + period, ... share one split; 0: each op its own
  int uneven_steps = 8;  // two-way uneven splits tried: (rows * q / uneven_steps, rest)
  int max_passes = 4;    // coordinate-descent passes over the groups
};

struct search_result {
  nano_batch chosen;
  double predicted = 0;           // the chosen split's predicted time
  nano_batch baseline;            // no nano-batching (one nano-batch per op)
  double baseline_predicted = 0;  // its predicted time on the same runner
  double optimal = 0;             // resource_bound()
  int evaluated = 0;              // predictions made
};

inline search_result search(const op_graph& g, std::int64_t rows, const profile& prof,
                            const cost_model& model, search_options opt = {}) {
  if (g.empty()) fail("pipit::nano::search: an empty graph");
  if (opt.max_count < 1 || opt.uneven_steps < 1 || opt.max_passes < 0)
    fail("pipit::nano::search: max_count ", opt.max_count, ", uneven_steps ", opt.uneven_steps,
         ", max_passes ", opt.max_passes, " (need >= 1, >= 1, >= 0)");
  const int period = opt.period ? opt.period : g.size();
  if (period < 1 || g.size() % period != 0)
    fail("pipit::nano::search: period ", period, " does not divide the graph's ", g.size(), " ops");
  const int cap = static_cast<int>(std::min<std::int64_t>(opt.max_count, rows));

  search_result r{nano_batch::none(g, rows),
                  0,
                  nano_batch::none(g, rows),
                  0,
                  resource_bound(g, rows, prof, model),
                  0};
  auto eval = [&](const nano_batch& plan) {
    ++r.evaluated;
    return predict(g, plan, prof, model);
  };
  r.baseline_predicted = r.predicted = eval(r.baseline);
  auto better = [](double a, double b) { return a < b * (1 - 1e-9); };

  for (int c = 2; c <= cap; ++c) {
    nano_batch plan = nano_batch::uniform(g, rows, c);
    const double t = eval(plan);
    if (better(t, r.predicted)) {
      r.chosen = std::move(plan);
      r.predicted = t;
    }
  }

  std::vector<std::vector<std::int64_t>> candidates;
  for (int c = 1; c <= cap; ++c) candidates.push_back(even_sizes(rows, c));
  for (int q = 1; q < opt.uneven_steps; ++q) {
    const std::int64_t a = rows * q / opt.uneven_steps;
    if (a < 1 || a >= rows) continue;
    std::vector<std::int64_t> s{a, rows - a};
    if (std::find(candidates.begin(), candidates.end(), s) == candidates.end())
      candidates.push_back(std::move(s));
  }
  auto with_group = [&](nano_batch plan, int grp, const std::vector<std::int64_t>& s) {
    for (int o = grp; o < g.size(); o += period) plan.set(g, o, s);
    return plan;
  };
  for (int pass = 0; pass < opt.max_passes; ++pass) {
    bool improved = false;
    for (int grp = 0; grp < period; ++grp) {
      const auto current = r.chosen.sizes(grp);
      const std::vector<std::int64_t>* best = nullptr;
      double best_t = r.predicted;
      for (const auto& s : candidates) {
        if (std::equal(s.begin(), s.end(), current.begin(), current.end())) continue;
        const double t = eval(with_group(r.chosen, grp, s));
        if (better(t, best_t)) {
          best = &s;
          best_t = t;
        }
      }
      if (best) {
        r.chosen = with_group(r.chosen, grp, *best);
        r.predicted = best_t;
        improved = true;
      }
    }
    if (!improved) break;
  }
  return r;
}

}  // namespace pipit::nano
