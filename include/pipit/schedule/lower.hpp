#pragma once
// Lowering: adds a send and its matching receive for every dependency that crosses ranks.
//
// The plan is executed eagerly with unit durations; its events are replayed in time order. When a
// pass that feeds another rank ends, its send is appended to its rank's list and the matching
// receive to the consumer's list *at the same moment* (the rule PyTorch's pipelining lowering
// follows: the sender places the receiver's receive). Every rank's list is therefore appended in
// one global order, and every send/receive pair sits at the same point of that order on both sides.
// With blocking point-to-point semantics — and with each step's run of consecutive communication
// actions posted as one group that completes when all its partners are posted — every pair
// completes by induction on that order: no order of arrival can deadlock. validate() checks this
// again. Plans with vocabulary passes keep them as collectives at one point of that order on
// every rank (detail_lower::lower_collective below).

#include <algorithm>
#include <cstddef>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/core/filled.hpp"
#include "pipit/schedule/dataflow.hpp"
#include "pipit/schedule/plan.hpp"

namespace pipit::schedule {

namespace detail_lower {

// The send of F(s)'s activation / B(s)'s input gradient to the next / previous stage's rank,
// and the matching receive, appended to both ranks' lists at once.
constexpr void add_transfer(plan& out, const plan& in, const action& a, int rank) {
  const int last_stage = in.shp.virtual_stages() - 1;
  if (a.kind == op::forward && a.stage < last_stage) {
    const int to = in.rank_of(a.stage + 1);
    if (to != rank) {
      out.ranks[static_cast<std::size_t>(rank)].push_back(
          make_action(op::send_forward, a.stage, a.microbatch, to));
      out.ranks[static_cast<std::size_t>(to)].push_back(
          make_action(op::recv_forward, a.stage + 1, a.microbatch, rank));
    }
  } else if ((a.kind == op::backward_input || a.kind == op::backward) && a.stage > 0) {
    const int to = in.rank_of(a.stage - 1);
    if (to != rank) {
      out.ranks[static_cast<std::size_t>(rank)].push_back(
          make_action(op::send_backward, a.stage, a.microbatch, to));
      out.ranks[static_cast<std::size_t>(to)].push_back(
          make_action(op::recv_backward, a.stage - 1, a.microbatch, rank));
    }
  }
}

// Lowering of a plan with vocabulary passes. Their collectives (the embedding reduce, the
// broadcast of X, the statistics and input-gradient reductions, the broadcast of the embedding
// gradient) are run by an executor inside the passes themselves, so a vocabulary pass (kind,
// microbatch) is ONE event for all ranks: it starts when every rank has reached it and its
// inputs are ready (a synchronous unit-time execution), and every rank's list gets it at the
// same point of the global order. Sends and receives go, as for plain plans, at the end of their
// producing pass, on both sides at once. Every rank's list is then a subsequence of one global
// order in which each collective and each send/receive pair is a single point, so blocking
// collectives and blocking grouped point-to-point complete by induction on that order.
constexpr plan lower_collective(const plan& in) {
  const value_index idx(in.shp, in.vocab);
  const int ranks = in.rank_count();
  const auto dur = [](const action& a) { return a.kind == op::backward ? 2.0 : 1.0; };
  std::vector<std::vector<double>> start(static_cast<std::size_t>(ranks)),
      end(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    start[static_cast<std::size_t>(r)] = filled(in.ranks[static_cast<std::size_t>(r)].size(), 0.0);
    end[static_cast<std::size_t>(r)] = start[static_cast<std::size_t>(r)];
  }
  std::vector<double> ready = filled(static_cast<std::size_t>(idx.size()), -1.0);
  std::vector<std::size_t> pos = filled<std::size_t>(static_cast<std::size_t>(ranks), 0);
  std::vector<double> free_at = filled(static_cast<std::size_t>(ranks), 0.0);
  const auto inputs_ready = [&](const action& a, double& t) {
    for (const int v : inputs_of(a, idx)) {
      if (v < 0) continue;
      const double rv = ready[static_cast<std::size_t>(v)];
      if (rv < 0) return false;
      t = std::max(t, rv);
    }
    return true;
  };
  std::size_t remaining = in.action_count();
  while (remaining > 0) {
    bool progress = false;
    for (int r = 0; r < ranks; ++r) {
      const auto ru = static_cast<std::size_t>(r);
      const auto& acts = in.ranks[ru];
      while (pos[ru] < acts.size()) {
        const action& a = acts[pos[ru]];
        double t = free_at[ru];
        if (!is_vocabulary(a.kind)) {
          if (!inputs_ready(a, t)) break;
          start[ru][pos[ru]] = t;
          end[ru][pos[ru]] = t + dur(a);
          free_at[ru] = t + dur(a);
          for (const int v : outputs_of(a, idx))
            if (v >= 0) ready[static_cast<std::size_t>(v)] = t + dur(a);
          ++pos[ru];
          --remaining;
          progress = true;
          continue;
        }
        // A collective: every rank must have it next.
        bool all_here = true;
        for (int q = 0; q < ranks && all_here; ++q) {
          const auto qu = static_cast<std::size_t>(q);
          all_here = pos[qu] < in.ranks[qu].size() && in.ranks[qu][pos[qu]].kind == a.kind &&
                     in.ranks[qu][pos[qu]].microbatch == a.microbatch;
          if (all_here) t = std::max(t, free_at[qu]);
        }
        if (!all_here) break;
        bool inputs = true;
        for (int q = 0; q < ranks && inputs; ++q) {
          const auto qu = static_cast<std::size_t>(q);
          inputs = inputs_ready(in.ranks[qu][pos[qu]], t);
        }
        if (!inputs) break;
        for (int q = 0; q < ranks; ++q) {
          const auto qu = static_cast<std::size_t>(q);
          start[qu][pos[qu]] = t;
          end[qu][pos[qu]] = t + 1;
          free_at[qu] = t + 1;
          ++pos[qu];
          --remaining;
        }
        for (const int v : outputs_of(a, idx))
          if (v >= 0) ready[static_cast<std::size_t>(v)] = t + 1;
        progress = true;
      }
    }
    if (!progress) {
      for (int r = 0; r < ranks; ++r) {
        const auto ru = static_cast<std::size_t>(r);
        if (pos[ru] < in.ranks[ru].size())
          fail("pipit: lower(): plan '", in.schedule,
               "' cannot execute with its vocabulary "
               "passes as collectives: rank ",
               r, " waits forever at action ", pos[ru], " (", to_string(in.ranks[ru][pos[ru]]),
               "); every rank must run the vocabulary passes in the same order, each after its "
               "inputs");
      }
    }
  }

  // Events: (time, 0 = sends/receives at the end of a pass | 1 = a pass at its start, rank,
  // index). A collective is one event with rank -1 (before any rank's pass at the same time:
  // no rank runs anything else at that moment) that goes to every rank.
  struct event {
    double time;
    int kind;
    int rank;
    int index;
  };
  std::vector<event> events;
  events.reserve(2 * in.action_count());
  for (int r = 0; r < ranks; ++r) {
    const auto ru = static_cast<std::size_t>(r);
    for (std::size_t i = 0; i < in.ranks[ru].size(); ++i) {
      const action& a = in.ranks[ru][i];
      if (is_vocabulary(a.kind)) {
        if (r == 0) events.push_back({start[ru][i], 1, -1, static_cast<int>(i)});
        continue;
      }
      events.push_back({start[ru][i], 1, r, static_cast<int>(i)});
      events.push_back({end[ru][i], 0, r, static_cast<int>(i)});
    }
  }
  std::sort(events.begin(), events.end(), [](const event& a, const event& b) {
    if (a.time != b.time) return a.time < b.time;
    if (a.kind != b.kind) return a.kind < b.kind;
    if (a.rank != b.rank) return a.rank < b.rank;
    return a.index < b.index;
  });
  plan out{in.schedule, in.shp, in.place, in.split_backward, true, {}, in.vocab};
  out.ranks.resize(in.ranks.size());
  for (std::size_t r = 0; r < in.ranks.size(); ++r) out.ranks[r].reserve(in.ranks[r].size() * 2);
  for (const event& e : events) {
    if (e.rank < 0) {
      const action& a = in.ranks[0][static_cast<std::size_t>(e.index)];
      for (int r = 0; r < ranks; ++r)
        out.ranks[static_cast<std::size_t>(r)].push_back(
            make_action(a.kind, stage_of(in.place, in.shp, r, 0), a.microbatch));
      continue;
    }
    const action& a = in.ranks[static_cast<std::size_t>(e.rank)][static_cast<std::size_t>(e.index)];
    if (e.kind == 1)
      out.ranks[static_cast<std::size_t>(e.rank)].push_back(a);
    else
      add_transfer(out, in, a, e.rank);
  }
  return out;
}

}  // namespace detail_lower

constexpr plan lower(const plan& in) {
  if (in.lowered) return in;
  for (const auto& acts : in.ranks)
    for (const action& a : acts)
      if (is_communication(a.kind))
        fail("pipit: lower(): plan '", in.schedule, "' is not lowered but contains ", to_string(a));
  if (in.vocab != vocab_passes::none) return detail_lower::lower_collective(in);

  const execution ex =
      execute(in, [](const action& a, int) { return a.kind == op::backward ? 2.0 : 1.0; });
  if (!ex.complete)
    fail("pipit: lower(): plan '", in.schedule, "' cannot execute: rank ", ex.stuck_rank,
         " waits forever at action ", ex.stuck_index, " (",
         to_string(in.ranks[static_cast<std::size_t>(ex.stuck_rank)]
                           [static_cast<std::size_t>(ex.stuck_index)]),
         "): a dependency cycle");

  // Events of the unit-time execution: a compute pass is placed at its start, its send (and
  // the matching receive) at its end. At equal times sends go first, so a pass starting exactly
  // when its input arrives finds the receive before it; receives thus sit as late as possible.
  // Each rank's events (start 0, end 0, start 1, ...) are already in that order, so a heap
  // merges the ranks' streams in O(actions log ranks).
  struct event {
    double time;
    int kind;  // 0: communication at the end of a pass, 1: the pass itself at its start
    int rank;
    int index;
  };
  const auto later = [](const event& a, const event& b) {  // heap order: earliest on top
    if (a.time != b.time) return a.time > b.time;
    if (a.kind != b.kind) return a.kind > b.kind;
    if (a.rank != b.rank) return a.rank > b.rank;
    return a.index > b.index;
  };
  const auto event_of = [&](int r, std::size_t k) {  // k-th event of rank r
    const auto ru = static_cast<std::size_t>(r);
    return k % 2 == 0 ? event{ex.start[ru][k / 2], 1, r, static_cast<int>(k / 2)}
                      : event{ex.end[ru][k / 2], 0, r, static_cast<int>(k / 2)};
  };
  std::vector<event> heap;
  std::vector<std::size_t> next = filled<std::size_t>(in.ranks.size(), 0);
  for (int r = 0; r < in.rank_count(); ++r)
    if (!in.ranks[static_cast<std::size_t>(r)].empty()) {
      heap.push_back(event_of(r, 0));
      std::push_heap(heap.begin(), heap.end(), later);
    }
  std::vector<event> events;
  events.reserve(2 * in.action_count());
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const event e = heap.back();
    heap.pop_back();
    events.push_back(e);
    const auto ru = static_cast<std::size_t>(e.rank);
    if (++next[ru] < 2 * in.ranks[ru].size()) {
      heap.push_back(event_of(e.rank, next[ru]));
      std::push_heap(heap.begin(), heap.end(), later);
    }
  }

  plan out{in.schedule, in.shp, in.place, in.split_backward, true, {}};
  out.ranks.resize(in.ranks.size());
  for (std::size_t r = 0; r < in.ranks.size(); ++r) out.ranks[r].reserve(in.ranks[r].size() * 2);
  for (const event& e : events) {
    const action& a = in.ranks[static_cast<std::size_t>(e.rank)][static_cast<std::size_t>(e.index)];
    if (e.kind == 1)
      out.ranks[static_cast<std::size_t>(e.rank)].push_back(a);
    else
      detail_lower::add_transfer(out, in, a, e.rank);
  }
  return out;
}

// A rank's list cut into steps: a step is a compute action, or a maximal run of consecutive
// communication actions, which an executor posts together (one NCCL group, one MPI Waitall).
struct step {
  std::size_t begin;
  std::size_t end;
  bool communication;
};

constexpr std::vector<step> steps_of(std::span<const action> acts) {
  std::vector<step> out;
  std::size_t i = 0;
  while (i < acts.size()) {
    std::size_t j = i + 1;
    const bool comm = is_communication(acts[i].kind);
    if (comm)
      while (j < acts.size() && is_communication(acts[j].kind)) ++j;
    out.push_back({i, j, comm});
    i = j;
  }
  return out;
}

}  // namespace pipit::schedule
