#pragma once
// search: the 3D configuration planner. Given a transformer, a cluster (nodes × GPUs per node of
// one hardware profile) and a global batch, it enumerates the tensor × pipeline × data layouts,
// virtual stages, microbatch sizes and counts, schedules, partitions, vocabulary algorithms and
// re-materialization, predicts each one's throughput and peak memory per GPU with predict(), and
// returns the fastest that fit, with why the others were not returned.
//
// The rules (Narayanan et al., SC'21, arXiv 2104.04473, §3; reference notes, schedules.md §10):
//   - tensor size t divides the GPUs per node (tensor parallelism stays inside a node) and the
//     heads and key/value heads; pipeline size p and data size d fill the cluster, t·p·d = GPUs;
//   - the global batch B = d·b·m (b the microbatch size, m the microbatches per replica);
//   - the ranks are laid out tensor fastest, then data, then pipeline (cost/cluster.hpp): a group
//     that crosses a node boundary uses the inter-node link.
// Nothing in the search prefers a layout: the guidance (TP inside a node, PP across nodes, DP
// for the rest) has to come out of the cost model.
//
// How it stays fast: each candidate is first bounded without simulating it —
//   - memory from below: weights, gradients, optimizer states, workspace, the vocabulary extras
//     and one microbatch of the rank's largest stage's activations (any schedule holds at least
//     that); above the device's capacity, it does not fit;
//   - iteration time from below: a rank cannot start before microbatch 0 has gone through the
//     stages before its first one, must do all its own passes, and (schedules whose rank's last
//     pass is the combined backward of its first stage: gpipe, 1f1b, interleaved) cannot end
//     before that backward has gone back through the earlier stages; plus its gradient
//     synchronisation and optimizer step. For 1F1B on uniform stages this is the exact makespan.
// — then the candidates that may fit are simulated best bound first, until the top K found beat
// every remaining bound (branch and bound: the top K are the same as simulating everything, which
// `exhaustive` does and tests/unit/search_test.cpp checks).

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/cost/cluster.hpp"
#include "pipit/cost/data_parallel.hpp"
#include "pipit/cost/flops.hpp"
#include "pipit/cost/hardware.hpp"
#include "pipit/cost/memory.hpp"
#include "pipit/cost/tensor_parallel.hpp"
#include "pipit/cost/transformer.hpp"
#include "pipit/cost/vocab_algorithm.hpp"
#include "pipit/partition/balanced.hpp"
#include "pipit/partition/naive.hpp"
#include "pipit/partition/partition.hpp"
#include "pipit/partition/vocab_parallel.hpp"
#include "pipit/schedule/by_name.hpp"
#include "pipit/sim/predict.hpp"

namespace pipit::sim {

inline constexpr std::string_view search_partition_names[] = {"naive", "balanced",
                                                              "vocab-parallel"};

struct search_options {
  int global_batch = 0;  // sequences per iteration, B = d·b·m
  int top = 5;           // configurations returned
  // Schedules tried (pipit::schedule names). gpipe is left out by default: it has 1F1B's time
  // and more memory; dualpipe-v has its own parameter layout.
  std::vector<std::string> schedules = {"1f1b", "interleaved", "zb-h1", "zb-h2",
                                        "zb-v", "v-half",      "v-min"};
  std::vector<std::string> partitions = {"naive", "balanced", "vocab-parallel"};
  std::vector<cost::vocab_algorithm> vocab_algorithms = {cost::vocab_algorithm::naive,
                                                         cost::vocab_algorithm::two_barrier,
                                                         cost::vocab_algorithm::one_barrier};
  std::vector<bool> recompute = {false, true};
  int max_microbatch_size = 8;  // b runs over the divisors of B/d up to this
  int max_chunks = 4;           // interleaved: v = 2 .. max_chunks
  // 0: searched; otherwise the size is fixed (to compare with a published configuration).
  int tensor = 0, pipeline = 0, data = 0;
  bool sequence_parallel = false;      // with t > 1 (Korthikanti et al.)
  bool distributed_optimizer = false;  // optimizer states split over the replicas
  bool exhaustive = false;             // simulate every candidate that may fit (no time bound)
};

// One configuration.
struct search_config {
  int tensor = 1, pipeline = 1, data = 1, chunks = 1, microbatch_size = 1, microbatches = 1;
  std::string schedule;
  std::string partition;                                 // naive, balanced, vocab-parallel
  std::optional<cost::vocab_algorithm> vocab_algorithm;  // vocab-parallel only
  bool recompute = false;
  bool sequence_parallel = false;
};

inline std::string describe(const search_config& c) {
  return detail::concat(
      "t=", c.tensor, " p=", c.pipeline, " d=", c.data, " v=", c.chunks, " b=", c.microbatch_size,
      " m=", c.microbatches, " ", c.schedule, " ", c.partition,
      c.vocab_algorithm ? detail::concat("/", cost::name(*c.vocab_algorithm)) : std::string(),
      c.recompute ? " recompute" : "", c.sequence_parallel ? " sp" : "");
}

struct search_entry {
  search_config config;
  double tokens_per_second = 0;  // predicted; for an unsimulated entry, an upper bound
  double peak_memory_bytes = 0;  // predicted; for an unsimulated entry, a lower bound
  bool simulated = false;
  double iteration_time = 0;      // simulated entries
  double mfu = 0;                 // simulated entries
  double bubble_fraction = 0;     // simulated entries
  double gradient_sync_time = 0;  // simulated entries
  double upper_bound = 0;         // the bound it was ranked by (tokens/s)
  std::string layout;             // the partition in layout language
};

struct search_result {
  std::vector<search_entry> configs;  // the fastest that fit, best first
  cost::cluster cluster{};
  int global_batch = 0;
  long long candidates = 0;  // configurations enumerated (not_applicable included)
  long long simulated = 0;   // configurations predicted in full

  // Why the others were not returned.
  struct does_not_fit_t {
    long long count = 0;
    long long bounded = 0;                // of them, refused on the memory lower bound
    std::optional<search_entry> fastest;  // the fastest simulated one that does not fit
    std::optional<search_entry> closest;  // the one that misses by the least
  } does_not_fit;
  struct worse_t {
    long long count = 0;
    long long bounded = 0;             // of them, never simulated: their bound is below the K-th's
    std::optional<search_entry> best;  // the fastest simulated one not in the top K
    std::optional<search_entry> best_bounded;  // the highest bound among the unsimulated
  } worse;
  struct not_applicable_t {
    long long count = 0;
    std::vector<std::string> examples;  // one message per distinct reason, at most 8
  } not_applicable;
  std::vector<std::string> notes;  // sizes excluded before enumeration, and why
  double seconds = 0;              // wall time of the search
};

namespace detail_search {

inline std::vector<int> divisors(int n) {
  std::vector<int> out;
  for (int k = 1; k <= n; ++k)
    if (n % k == 0) out.push_back(k);
  return out;
}

// Counts a refused configuration; keeps the first message of each kind (`kind`), at most 8.
inline void note_not_applicable(search_result& r, std::vector<std::string>& kinds,
                                const std::string& kind, const std::string& why) {
  ++r.not_applicable.count;
  if (std::find(kinds.begin(), kinds.end(), kind) != kinds.end()) return;
  kinds.push_back(kind);
  if (r.not_applicable.examples.size() < 8) r.not_applicable.examples.push_back(why);
}

struct candidate {
  search_config config;
  partition::partition part;
  double upper_bound = 0;   // tokens/s
  double memory_bound = 0;  // bytes
};

// Ranking: tokens/s, then less memory, then the simpler configuration (fewer ranks across
// nodes first: smaller t, then p; fewer chunks; larger microbatches; no recomputation).
inline bool better(const search_entry& a, const search_entry& b) {
  if (a.tokens_per_second != b.tokens_per_second) return a.tokens_per_second > b.tokens_per_second;
  if (a.peak_memory_bytes != b.peak_memory_bytes) return a.peak_memory_bytes < b.peak_memory_bytes;
  const auto key = [](const search_config& c) {
    return std::make_tuple(c.tensor, c.pipeline, c.chunks, -c.microbatch_size, c.recompute,
                           c.schedule, c.partition,
                           c.vocab_algorithm ? static_cast<int>(*c.vocab_algorithm) : -1);
  };
  return key(a.config) < key(b.config);
}

}  // namespace detail_search

// The layout of a configuration on a cluster.
inline parallelism parallelism_of(const search_config& c, const cost::cluster& cl,
                                  bool distributed_optimizer) {
  parallelism par;
  par.tensor = {c.tensor, c.sequence_parallel};
  par.data = {c.data, distributed_optimizer};
  par.links = cost::links_of(cl, c.tensor, c.data, c.pipeline);
  return par;
}

// The model as a configuration runs it: its microbatch size and recomputation.
inline cost::transformer model_of(const cost::transformer& t, const search_config& c) {
  cost::transformer m = t;
  m.microbatch_size = c.microbatch_size;
  m.recompute = c.recompute;
  return m;
}

// The partition of a configuration: `balanced` balances the per-rank costs of the tensor-parallel
// layers (seconds of F + B + W per microbatch, without communication).
inline partition::partition partition_of(const search_config& c, const cost::transformer& t,
                                         const cost::hardware& hw) {
  const schedule::placement place = schedule::placement_of(c.schedule);
  const partition::pipeline pl{c.pipeline, c.chunks, place};
  if (c.partition == "naive") return partition::naive(t.layers, pl);
  if (c.partition == "vocab-parallel") return partition::vocab_parallel(t.layers, pl);
  if (c.partition == "balanced") {
    const cost::transformer m = model_of(t, c);
    const cost::tensor_parallel tp{c.tensor, c.sequence_parallel};
    return partition::balanced(t.layers, cost::seconds(cost::embedding_work(m).total(), hw),
                               cost::seconds(cost::layer_work(m, tp).total(), hw),
                               cost::seconds(cost::output_work(m, tp).total(), hw), pl);
  }
  fail("pipit: search: unknown partition '", c.partition,
       "' (known: naive, balanced, vocab-parallel)");
}

// predict() for a configuration on a cluster.
inline prediction predict(const search_config& c, const cost::transformer& t,
                          const cost::cluster& cl, bool distributed_optimizer = false) {
  const cost::transformer m = model_of(t, c);
  const partition::partition part = partition_of(c, t, cl.device);
  const schedule::plan plan =
      schedule::make_plan_by_name(c.schedule, {c.pipeline, c.microbatches, c.chunks});
  return predict(plan, part, m, cl.device,
                 c.vocab_algorithm.value_or(cost::vocab_algorithm::one_barrier),
                 parallelism_of(c, cl, distributed_optimizer));
}

// Throws pipit::error naming the values when the inputs cannot be searched: no GPUs, a global
// batch below 1, fixed sizes that do not fill the cluster or do not divide what they must.
inline search_result search(const cost::transformer& model, const cost::cluster& cl,
                            const search_options& o) {
  using namespace detail_search;
  const auto t0 = std::chrono::steady_clock::now();
  cost::check(model);
  cost::check(cl);
  const int gpus = cl.gpus(), g = cl.gpus_per_node, B = o.global_batch;
  if (B < 1) fail("pipit: search: the global batch must be >= 1 sequence (got ", B, ")");
  if (o.top < 1) fail("pipit: search: top must be >= 1 (got ", o.top, ")");
  if (o.max_microbatch_size < 1 || o.max_chunks < 1)
    fail("pipit: search: max_microbatch_size (", o.max_microbatch_size, ") and max_chunks (",
         o.max_chunks, ") must be >= 1");
  for (const auto& s : o.schedules) (void)schedule::placement_of(s);  // unknown names throw
  for (const auto& s : o.partitions)
    if (std::find(std::begin(search_partition_names), std::end(search_partition_names), s) ==
        std::end(search_partition_names))
      fail("pipit: search: unknown partition '", s, "' (known: naive, balanced, vocab-parallel)");
  if (o.tensor < 0 || o.pipeline < 0 || o.data < 0)
    fail("pipit: search: fixed sizes must be >= 1, or 0 to search (tensor ", o.tensor,
         ", pipeline ", o.pipeline, ", data ", o.data, ")");
  const int fixed = std::max(o.tensor, 1) * std::max(o.pipeline, 1) * std::max(o.data, 1);
  if (gpus % fixed != 0)
    fail("pipit: search: the fixed sizes (tensor ", o.tensor, ", pipeline ", o.pipeline, ", data ",
         o.data, ") do not divide the cluster's ", gpus, " GPUs (", cl.nodes, " nodes x ", g, ")");
  if (o.tensor > 0 && g % o.tensor != 0)
    fail("pipit: search: tensor size ", o.tensor, " must divide the GPUs per node (", g,
         "): tensor parallelism stays inside a node");
  if (o.data > 0 && B % o.data != 0)
    fail("pipit: search: the global batch (", B, ") is not divisible by the data parallel size (",
         o.data, ")");

  search_result r;
  r.cluster = cl;
  r.global_batch = B;
  const double capacity = cl.device.memory_capacity;

  // ---- enumerate and bound -----------------------------------------------------------------
  std::vector<candidate> open;  // may fit, not yet simulated
  // Partitions by (kind, t, sp, p, v, schedule, recompute): every pass's work is proportional to
  // the tokens of a microbatch, so the balanced partition does not depend on b.
  std::map<std::string, partition::partition> partitions;
  std::vector<std::string> refusal_kinds;
  for (const int t : divisors(g)) {
    if (o.tensor > 0 && t != o.tensor) continue;
    const cost::tensor_parallel tp{t, o.sequence_parallel && t > 1};
    try {
      cost::check(tp, model);
    } catch (const error& e) {
      r.notes.push_back(detail::concat("tensor ", t, ": ", e.what()));
      continue;
    }
    for (const int p : divisors(gpus / t)) {
      if (o.pipeline > 0 && p != o.pipeline) continue;
      if (p > model.layers) break;
      const int d = gpus / (t * p);
      if (o.data > 0 && d != o.data) continue;
      if (B % d != 0) {
        r.notes.push_back(detail::concat("tensor ", t, ", pipeline ", p, ": the global batch (", B,
                                         ") is not divisible by the data parallel size (", d, ")"));
        continue;
      }
      for (const int b : divisors(B / d)) {
        if (b > o.max_microbatch_size) break;
        const int m = B / d / b;
        for (const auto& sched : o.schedules) {
          std::vector<int> chunk_counts{schedule::default_chunks(sched)};
          if (sched == "interleaved") {
            chunk_counts.clear();
            for (int v = 2; v <= o.max_chunks; ++v) chunk_counts.push_back(v);
          }
          for (const int v : chunk_counts) {
            const schedule::shape shp{p, m, v};
            const auto rule = schedule::visit_policy(
                sched, [&]<class S>() { return S::check(shp); }, schedule::all_policies{});
            for (const auto& part_name : o.partitions) {
              std::vector<std::optional<cost::vocab_algorithm>> algs{std::nullopt};
              if (part_name == "vocab-parallel")
                algs.assign(o.vocab_algorithms.begin(), o.vocab_algorithms.end());
              for (const auto& alg : algs)
                for (const bool rc : o.recompute) {
                  ++r.candidates;
                  search_config c{
                      t, p, d, v, b, m, sched, part_name, alg, rc, tp.sequence_parallel};
                  if (rule != schedule::shape_rule::ok) {
                    note_not_applicable(
                        r, refusal_kinds,
                        detail::concat(sched, "/", schedule::shape_rule_text(rule)),
                        detail::concat("schedule '", sched, "' refuses ", schedule::to_string(shp),
                                       ": ", schedule::shape_rule_text(rule)));
                    continue;
                  }
                  const std::string key =
                      detail::concat(part_name, "/", t, "/", tp.sequence_parallel, "/", p, "/", v,
                                     "/", sched, "/", rc);
                  auto it = partitions.find(key);
                  if (it == partitions.end()) {
                    try {
                      it = partitions.emplace(key, partition_of(c, model, cl.device)).first;
                    } catch (const error& e) {
                      note_not_applicable(r, refusal_kinds, part_name, e.what());
                      continue;
                    }
                  }
                  // A balanced partition that is the naive one is the same configuration.
                  if (part_name == "balanced" && model.layers >= it->second.pipe.virtual_stages() &&
                      it->second.stages == partition::naive(model.layers, it->second.pipe).stages) {
                    note_not_applicable(r, refusal_kinds, "balanced=naive",
                                        "balanced: the same layout as naive, counted once");
                    continue;
                  }
                  const cost::transformer mt = model_of(model, c);
                  const parallelism par = parallelism_of(c, cl, o.distributed_optimizer);
                  const pipeline_inputs in =
                      pipeline_inputs_of(it->second, mt, cl.device,
                                         alg.value_or(cost::vocab_algorithm::one_barrier), par);
                  // Bounds (see the top of this file).
                  const auto& stages = in.stages;
                  const int vs = static_cast<int>(stages.size());
                  std::vector<double> before(static_cast<std::size_t>(vs) + 1, 0.0),
                      back(static_cast<std::size_t>(vs) + 1, 0.0);
                  for (int s = 0; s < vs; ++s) {
                    const auto& st = stages[static_cast<std::size_t>(s)];
                    before[static_cast<std::size_t>(s) + 1] =
                        before[static_cast<std::size_t>(s)] + st.f + (p > 1 ? in.p2p_time : 0);
                    back[static_cast<std::size_t>(s) + 1] =
                        back[static_cast<std::size_t>(s)] + st.b + st.w + (p > 1 ? in.p2p_time : 0);
                  }
                  const bool ends_with_first_stage =
                      sched == "1f1b" || sched == "interleaved" || sched == "gpipe";
                  double time_bound = 0, tail_bound = 0, memory_bound = 0;
                  for (int rank = 0; rank < p; ++rank) {
                    double busy = 0, largest = 0;
                    int first = vs;
                    for (const int s : it->second.stages_of(rank)) {
                      const auto& st = stages[static_cast<std::size_t>(s)];
                      busy += m * (st.f + st.b + st.w);
                      largest = std::max(largest, st.activation_bytes);
                      first = std::min(first, s);
                    }
                    const double end =
                        ends_with_first_stage ? back[static_cast<std::size_t>(first)] : 0.0;
                    time_bound =
                        std::max(time_bound, before[static_cast<std::size_t>(first)] + busy + end);
                    const cost::rank_cost& rcost = in.model.ranks[static_cast<std::size_t>(rank)];
                    const rank_tail tail = rank_tail_of(mt, cl.device, par, rcost.parameters);
                    tail_bound = std::max(tail_bound, tail.optimizer_step + tail.gradient_sync);
                    const cost::state_bytes states = cost::states_of(mt, rcost.parameters);
                    memory_bound =
                        std::max(memory_bound, states.parameters + states.gradients +
                                                   states.optimizer / par.data.optimizer_share() +
                                                   rcost.extra_activation_bytes +
                                                   rcost.workspace_bytes + largest);
                  }
                  const double upper = d * m * mt.tokens() / (time_bound + tail_bound);
                  if (memory_bound > capacity) {
                    ++r.does_not_fit.count;
                    ++r.does_not_fit.bounded;
                    search_entry e{c, upper, memory_bound, false, 0, 0, 0, 0, upper, {}};
                    e.upper_bound = upper;
                    e.layout = partition::to_layout(it->second);
                    if (!r.does_not_fit.closest ||
                        e.peak_memory_bytes < r.does_not_fit.closest->peak_memory_bytes)
                      r.does_not_fit.closest = e;
                    continue;
                  }
                  open.push_back({c, it->second, upper, memory_bound});
                }
            }
          }
        }
      }
    }
  }

  // ---- simulate, best bound first ----------------------------------------------------------
  std::stable_sort(open.begin(), open.end(), [](const candidate& a, const candidate& b) {
    return a.upper_bound > b.upper_bound;
  });
  std::vector<search_entry> fits;
  // Plans by (schedule, p, m, v): many candidates share one; a few are kept (they can be large).
  std::map<std::tuple<std::string, int, int, int>, schedule::plan> plans;
  for (std::size_t i = 0; i < open.size(); ++i) {
    const candidate& c = open[i];
    if (!o.exhaustive && static_cast<int>(fits.size()) >= o.top &&
        c.upper_bound < fits[static_cast<std::size_t>(o.top) - 1].tokens_per_second) {
      // Every remaining bound is lower: none can enter the top K.
      r.worse.bounded = static_cast<long long>(open.size() - i);
      r.worse.count += r.worse.bounded;
      search_entry e{c.config, c.upper_bound, c.memory_bound, false, 0, 0, 0, 0, c.upper_bound, {}};
      e.upper_bound = c.upper_bound;
      e.layout = partition::to_layout(c.part);
      r.worse.best_bounded = e;
      break;
    }
    const cost::transformer mt = model_of(model, c.config);
    const auto key = std::make_tuple(c.config.schedule, c.config.pipeline, c.config.microbatches,
                                     c.config.chunks);
    auto pit = plans.find(key);
    if (pit == plans.end()) {
      if (plans.size() >= 16) plans.clear();
      pit = plans
                .emplace(key, schedule::make_plan_by_name(
                                  c.config.schedule,
                                  {c.config.pipeline, c.config.microbatches, c.config.chunks}))
                .first;
    }
    const schedule::plan& plan = pit->second;
    const prediction pr =
        predict(plan, c.part, mt, cl.device,
                c.config.vocab_algorithm.value_or(cost::vocab_algorithm::one_barrier),
                parallelism_of(c.config, cl, o.distributed_optimizer));
    ++r.simulated;
    search_entry e{c.config, pr.tokens_per_second, pr.max_peak_memory_bytes, true, 0, 0, 0, 0, 0,
                   {}};
    e.iteration_time = pr.iteration_time;
    e.mfu = pr.mfu;
    e.bubble_fraction = pr.sim.bubble_fraction;
    e.gradient_sync_time = pr.gradient_sync_time;
    e.upper_bound = c.upper_bound;
    e.layout = partition::to_layout(c.part);
    if (e.peak_memory_bytes > capacity) {
      ++r.does_not_fit.count;
      if (!r.does_not_fit.fastest || better(e, *r.does_not_fit.fastest)) r.does_not_fit.fastest = e;
      if (!r.does_not_fit.closest ||
          e.peak_memory_bytes < r.does_not_fit.closest->peak_memory_bytes)
        r.does_not_fit.closest = e;
      continue;
    }
    fits.insert(std::upper_bound(fits.begin(), fits.end(), e, better), e);
  }
  const std::size_t keep = std::min(fits.size(), static_cast<std::size_t>(o.top));
  r.configs.assign(fits.begin(), fits.begin() + static_cast<std::ptrdiff_t>(keep));
  if (fits.size() > keep) {
    r.worse.count += static_cast<long long>(fits.size() - keep);
    r.worse.best = fits[keep];
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace pipit::sim
