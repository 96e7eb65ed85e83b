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
// again.

#include <algorithm>
#include <cstddef>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/core/filled.hpp"
#include "pipit/schedule/dataflow.hpp"
#include "pipit/schedule/plan.hpp"

namespace pipit::schedule {

constexpr plan lower(const plan& in) {
  if (in.lowered) return in;
  if (in.vocab != vocab_passes::none)
    fail("pipit: lower(): plan '", in.schedule, "' has vocabulary passes (", name(in.vocab),
         "); lowering their collectives is not supported: run the unlowered plan's S, T, IF, IB "
         "with the collectives their dependencies imply (see vocab_passes.hpp)");
  for (const auto& acts : in.ranks)
    for (const action& a : acts)
      if (is_communication(a.kind))
        fail("pipit: lower(): plan '", in.schedule, "' is not lowered but contains ", to_string(a));

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
  const int last_stage = in.shp.virtual_stages() - 1;
  for (const event& e : events) {
    const action& a = in.ranks[static_cast<std::size_t>(e.rank)][static_cast<std::size_t>(e.index)];
    auto& mine = out.ranks[static_cast<std::size_t>(e.rank)];
    if (e.kind == 1) {
      mine.push_back(a);
      continue;
    }
    // The activation of F(s) feeds F(s + 1); the input gradient of B/BW(s) feeds B(s - 1).
    if (a.kind == op::forward && a.stage < last_stage) {
      const int to = in.rank_of(a.stage + 1);
      if (to != e.rank) {
        mine.push_back(make_action(op::send_forward, a.stage, a.microbatch, to));
        out.ranks[static_cast<std::size_t>(to)].push_back(
            make_action(op::recv_forward, a.stage + 1, a.microbatch, e.rank));
      }
    } else if ((a.kind == op::backward_input || a.kind == op::backward) && a.stage > 0) {
      const int to = in.rank_of(a.stage - 1);
      if (to != e.rank) {
        mine.push_back(make_action(op::send_backward, a.stage, a.microbatch, to));
        out.ranks[static_cast<std::size_t>(to)].push_back(
            make_action(op::recv_backward, a.stage - 1, a.microbatch, e.rank));
      }
    }
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
