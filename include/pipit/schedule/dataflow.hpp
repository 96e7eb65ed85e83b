#pragma once
// The data dependencies between passes and an eager, event-driven execution of a plan under
// them. Validation runs it with unit durations to prove a plan can execute; the simulator
// (pipit/sim) runs it with real costs to time it. Both read the plan; neither keeps a copy of
// any schedule's logic.

#include <algorithm>
#include <array>
#include <cstddef>
#include <vector>

#include "pipit/core/filled.hpp"
#include "pipit/schedule/plan.hpp"

namespace pipit::schedule {

// Values passes produce, one slot per (value kind, virtual stage, microbatch):
//   activation : the output of F(s, mb)
//   input_grad : the input gradient out of B(s, mb) or BW(s, mb)
//   weight_grad: the weight gradient of stage s for mb, out of W(s, mb) or BW(s, mb)
// and, in a plan with vocabulary passes, one *gathered* slot per (kind, microbatch), made when
// the pass of that kind has run on every rank (a collective over the pipeline group):
//   embedding  : every rank's IF(mb) — the embedding reduce that feeds F(0, mb)
//   statistics : every rank's S(mb) — the statistics barrier (Algorithm 2 also reduces the
//                input gradient here)
//   vocab_grad : every rank's T(mb) — the input-gradient barrier of Algorithm 1
enum class value_kind : int {
  activation = 0,
  input_grad = 1,
  weight_grad = 2,
  embedding = 3,
  statistics = 4,
  vocab_grad = 5
};

struct value_index {
  int virtual_stages = 1;
  int microbatches = 1;
  vocab_passes vocab = vocab_passes::none;

  constexpr explicit value_index(const shape& s, vocab_passes v = vocab_passes::none) noexcept
      : virtual_stages(s.virtual_stages()), microbatches(s.microbatches), vocab(v) {}
  constexpr int per_stage_size() const noexcept { return 3 * virtual_stages * microbatches; }
  constexpr int size() const noexcept {
    return per_stage_size() + (vocab != vocab_passes::none ? 3 * microbatches : 0);
  }
  constexpr int operator()(value_kind k, int stage, int microbatch) const noexcept {
    return (static_cast<int>(k) * virtual_stages + stage) * microbatches + microbatch;
  }
  // A gathered value (embedding, statistics, vocab_grad) of one microbatch.
  constexpr int gathered(value_kind k, int microbatch) const noexcept {
    return per_stage_size() + (static_cast<int>(k) - 3) * microbatches + microbatch;
  }
  constexpr bool is_gathered(int v) const noexcept { return v >= per_stage_size(); }
};

// The (at most two) values a compute pass needs before it can start; unused entries are -1.
// F(s) needs F(s-1)'s activation; B/BW(s) needs its own F(s) and, below the last stage,
// B(s+1)'s input gradient (the last stage's backward starts from the loss); W(s) needs B(s).
// With vocabulary passes: F(0) needs every rank's IF; the last stage's B/BW needs every rank's S
// (one barrier) or T (two barriers, naive); S needs the last stage's F (X is broadcast from it); T
// needs every rank's S; IB needs the input gradient of virtual stage 0; IF needs nothing.
constexpr std::array<int, 2> inputs_of(const action& a, const value_index& idx) noexcept {
  const int s = a.stage, mb = a.microbatch;
  const int last = idx.virtual_stages - 1;
  switch (a.kind) {
    case op::forward:
      return {s > 0                             ? idx(value_kind::activation, s - 1, mb)
              : idx.vocab != vocab_passes::none ? idx.gathered(value_kind::embedding, mb)
                                                : -1,
              -1};
    case op::backward_input:
    case op::backward:
      return {idx(value_kind::activation, s, mb),
              s < last                                 ? idx(value_kind::input_grad, s + 1, mb)
              : idx.vocab == vocab_passes::one_barrier ? idx.gathered(value_kind::statistics, mb)
              : idx.vocab != vocab_passes::none        ? idx.gathered(value_kind::vocab_grad, mb)
                                                       : -1};
    case op::backward_weight:
      return {idx(value_kind::input_grad, s, mb), -1};
    case op::vocab_s:
      return {idx(value_kind::activation, last, mb), -1};
    case op::vocab_t:
      return {idx.gathered(value_kind::statistics, mb), -1};
    case op::embed_backward:
      return {idx(value_kind::input_grad, 0, mb), -1};
    default:
      return {-1, -1};
  }
}

// The (at most two) values a compute pass produces; unused entries are -1. A gathered value
// exists once every rank has run its pass (execute() counts them).
constexpr std::array<int, 2> outputs_of(const action& a, const value_index& idx) noexcept {
  const int s = a.stage, mb = a.microbatch;
  switch (a.kind) {
    case op::forward:
      return {idx(value_kind::activation, s, mb), -1};
    case op::backward_input:
      return {idx(value_kind::input_grad, s, mb), -1};
    case op::backward_weight:
      return {idx(value_kind::weight_grad, s, mb), -1};
    case op::backward:
      return {idx(value_kind::input_grad, s, mb), idx(value_kind::weight_grad, s, mb)};
    case op::vocab_s:
      return {idx.gathered(value_kind::statistics, mb), -1};
    case op::vocab_t:
      return {idx.gathered(value_kind::vocab_grad, mb), -1};
    case op::embed_forward:
      return {idx.gathered(value_kind::embedding, mb), -1};
    default:
      return {-1, -1};
  }
}

// The result of an eager execution: every action starts as soon as its rank is free and its
// inputs are ready (plus `latency` when an input comes from another rank).
struct execution {
  bool complete = true;  // false: some rank waits forever (the plan has a dependency cycle)
  int stuck_rank = -1;   // when incomplete: a rank that cannot proceed ...
  int stuck_index = -1;  // ... and the index of its blocked action
  std::vector<std::vector<double>> start, end;  // per rank, per action (communication: zero length)
};

// Duration: callable (const action&, int rank) -> double, for compute actions.
// Communication actions of a lowered plan are zero-length markers: the dependencies they carry
// are already modelled by the data dependencies (with `latency` across ranks).
// A gathered value (vocabulary plans) is ready when the last rank's pass that feeds it ends, and
// every consumer pays `latency` for it once when the plan has more than one rank (a collective).
// Timed = false only decides whether the plan can run to the end (validation): no times are
// kept, which makes it several times faster on large plans.
template <bool Timed = true, class Duration>
constexpr execution execute(const plan& p, Duration&& duration, double latency = 0.0) {
  const value_index idx(p.shp, p.vocab);
  const int ranks = p.rank_count();
  execution ex;
  if constexpr (Timed) {
    ex.start.resize(static_cast<std::size_t>(ranks));
    ex.end.resize(static_cast<std::size_t>(ranks));
    for (int r = 0; r < ranks; ++r) {
      ex.start[static_cast<std::size_t>(r)] =
          filled(p.ranks[static_cast<std::size_t>(r)].size(), 0.0);
      ex.end[static_cast<std::size_t>(r)] =
          filled(p.ranks[static_cast<std::size_t>(r)].size(), 0.0);
    }
  }
  // produced[v]: the value exists; ready[v], producer_rank[v]: when and where (Timed only).
  std::vector<unsigned char> produced =
      filled<unsigned char>(static_cast<std::size_t>(idx.size()), 0);
  std::vector<double> ready;
  std::vector<int> producer_rank;
  // arrived[v - per_stage_size()]: how many ranks have run the pass feeding gathered value v.
  std::vector<int> arrived = filled(static_cast<std::size_t>(idx.size() - idx.per_stage_size()), 0);
  if constexpr (Timed) {
    ready = filled(static_cast<std::size_t>(idx.size()), 0.0);
    producer_rank = filled(static_cast<std::size_t>(idx.size()), -1);
  }
  // Ranks blocked on a value wait in a per-value list (a rank waits on one value at a time).
  std::vector<int> waiters = filled(static_cast<std::size_t>(idx.size()), -1);
  std::vector<int> next_waiter = filled(static_cast<std::size_t>(ranks), -1);
  std::vector<std::size_t> pos = filled<std::size_t>(static_cast<std::size_t>(ranks), 0);
  std::vector<double> free_at = filled(static_cast<std::size_t>(ranks), 0.0);
  std::vector<int> work;
  work.reserve(static_cast<std::size_t>(ranks));
  for (int r = ranks - 1; r >= 0; --r) work.push_back(r);

  while (!work.empty()) {
    const int r = work.back();
    work.pop_back();
    const auto ru = static_cast<std::size_t>(r);
    const auto& acts = p.ranks[ru];
    while (pos[ru] < acts.size()) {
      const action& a = acts[pos[ru]];
      double t = free_at[ru];
      if (is_compute(a.kind)) {
        int blocked_on = -1;
        for (const int v : inputs_of(a, idx)) {
          if (v < 0) continue;
          const auto vu = static_cast<std::size_t>(v);
          if (!produced[vu]) {
            blocked_on = v;
            break;
          }
          if constexpr (Timed)
            t = std::max(t, ready[vu] + (producer_rank[vu] != r ? latency : 0.0));
        }
        if (blocked_on >= 0) {
          next_waiter[ru] = waiters[static_cast<std::size_t>(blocked_on)];
          waiters[static_cast<std::size_t>(blocked_on)] = r;
          break;
        }
        double e = t;
        if constexpr (Timed) {
          e = t + duration(a, r);
          ex.start[ru][pos[ru]] = t;
          ex.end[ru][pos[ru]] = e;
          free_at[ru] = e;
        }
        for (const int v : outputs_of(a, idx)) {
          if (v < 0) continue;
          const auto vu = static_cast<std::size_t>(v);
          if (idx.is_gathered(v)) {
            if constexpr (Timed) ready[vu] = std::max(ready[vu], e);
            if (++arrived[static_cast<std::size_t>(v - idx.per_stage_size())] < ranks) continue;
            if constexpr (Timed) producer_rank[vu] = ranks > 1 ? -1 : r;
          } else if constexpr (Timed) {
            ready[vu] = e;
            producer_rank[vu] = r;
          }
          produced[vu] = 1;
          for (int w = waiters[vu]; w >= 0; w = next_waiter[static_cast<std::size_t>(w)])
            work.push_back(w);
          waiters[vu] = -1;
        }
      } else if constexpr (Timed) {
        ex.start[ru][pos[ru]] = t;
        ex.end[ru][pos[ru]] = t;
      }
      ++pos[ru];
    }
  }
  for (int r = 0; r < ranks; ++r)
    if (pos[static_cast<std::size_t>(r)] < p.ranks[static_cast<std::size_t>(r)].size()) {
      ex.complete = false;
      ex.stuck_rank = r;
      ex.stuck_index = static_cast<int>(pos[static_cast<std::size_t>(r)]);
      break;
    }
  return ex;
}

}  // namespace pipit::schedule
