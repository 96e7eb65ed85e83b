#pragma once
// timeline_recorder: the executor's observer (runtime/executor.hpp, run(observer)) that measures
// where a rank's time goes — compute (the stage's passes and the vocabulary passes, which also
// wait inside their collectives) and point-to-point exchanges — and records one step's passes
// with real timestamps. gather_timeline() brings every rank's record to every rank as a
// pipit::sim::result in seconds, so pipit's renderers (render/svg.hpp, render/chrome_trace.hpp)
// draw the measured step exactly as they draw a simulated one.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <span>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/runtime/pass_info.hpp"
#include "pipit/runtime/program.hpp"
#include "pipit/schedule/action.hpp"
#include "pipit/sim/simulate.hpp"

namespace gpt {

// The plan's action an executed instruction runs (exchanges have none: communication).
constexpr pipit::schedule::op op_of(pipit::runtime::instruction_kind k) noexcept {
  using ik = pipit::runtime::instruction_kind;
  using pipit::schedule::op;
  switch (k) {
    case ik::forward:
      return op::forward;
    case ik::backward_input:
      return op::backward_input;
    case ik::backward_weight:
      return op::backward_weight;
    case ik::backward:
      return op::backward;
    case ik::embed_forward:
      return op::embed_forward;
    case ik::vocab_s:
      return op::vocab_s;
    case ik::vocab_t:
      return op::vocab_t;
    case ik::embed_backward:
      return op::embed_backward;
    default:
      return op::collective;
  }
}

class timeline_recorder {
 public:
  using clock = std::chrono::steady_clock;

  // Call right before run(): `record` keeps this step's passes (relative to now).
  void start_step(bool record) {
    origin_ = clock::now();
    recording_ = record;
    if (record) passes_.clear();
  }

  // ---- the observer ---------------------------------------------------------------------------
  void begin(const pipit::runtime::instruction&, const pipit::runtime::pass_info&) {
    begin_ = clock::now();
  }
  void end(const pipit::runtime::instruction& in, const pipit::runtime::pass_info&) {
    const clock::time_point now = clock::now();
    const double d = seconds(now - begin_);
    const pipit::schedule::op o = op_of(in.kind);
    if (!pipit::schedule::is_compute(o)) {
      comm_seconds_ += d;
      return;
    }
    busy_seconds_ += d;
    if (recording_)
      passes_.push_back({pipit::schedule::make_action(o, in.stage, in.microbatch),
                         seconds(begin_ - origin_), seconds(now - origin_)});
  }

  double busy_seconds() const noexcept { return busy_seconds_; }
  double comm_seconds() const noexcept { return comm_seconds_; }
  std::span<const pipit::sim::timed_action> passes() const noexcept { return passes_; }

 private:
  static double seconds(clock::duration d) { return std::chrono::duration<double>(d).count(); }

  clock::time_point origin_{}, begin_{};
  bool recording_ = false;
  double busy_seconds_ = 0, comm_seconds_ = 0;
  std::vector<pipit::sim::timed_action> passes_;
};

// Every rank's recorded passes, on every rank (collective), as a simulator result in seconds:
// timeline, makespan (the last pass's end), per-rank busy and idle within the step, and the
// bubble fraction. The ranks' clocks start at their own start_step(); the trainer calls it right
// after a collective, so they agree to within the collective's exit skew (microseconds on one
// machine).
template <class Comm>
pipit::sim::result gather_timeline(Comm& comm, std::span<const pipit::sim::timed_action> mine) {
  constexpr std::size_t fields = 5;
  const int ranks = comm.size();
  double count = static_cast<double>(mine.size());
  comm.all_reduce(std::span<double>(&count, 1), pipit::comm::max_op{});
  const auto most = static_cast<std::size_t>(count);
  std::vector<double> flat(most * fields, -1.0), all(flat.size() * static_cast<std::size_t>(ranks));
  for (std::size_t k = 0; k < mine.size(); ++k) {
    const pipit::sim::timed_action& t = mine[k];
    const double row[fields] = {static_cast<double>(t.act.kind), static_cast<double>(t.act.stage),
                                static_cast<double>(t.act.microbatch), t.start, t.end};
    std::copy_n(row, fields, flat.begin() + static_cast<std::ptrdiff_t>(k * fields));
  }
  comm.all_gather(std::span<const double>(flat), std::span<double>(all));

  pipit::sim::result r;
  r.timeline.resize(static_cast<std::size_t>(ranks));
  r.ranks.resize(static_cast<std::size_t>(ranks));
  for (int q = 0; q < ranks; ++q) {
    const double* f = all.data() + static_cast<std::size_t>(q) * most * fields;
    auto& line = r.timeline[static_cast<std::size_t>(q)];
    for (std::size_t k = 0; k < most; ++k, f += fields) {
      if (f[0] < 0) break;  // padding
      line.push_back({pipit::schedule::make_action(static_cast<pipit::schedule::op>(f[0]),
                                                   static_cast<int>(f[1]), static_cast<int>(f[2])),
                      f[3], f[4]});
      r.makespan = std::max(r.makespan, f[4]);
    }
  }
  double busy_total = 0;
  for (std::size_t q = 0; q < r.timeline.size(); ++q) {
    pipit::sim::rank_stats& s = r.ranks[q];
    for (const auto& t : r.timeline[q]) s.busy += t.end - t.start;
    if (!r.timeline[q].empty()) {
      s.first_start = r.timeline[q].front().start;
      s.last_end = r.timeline[q].back().end;
    }
    s.idle = r.makespan - s.busy;
    s.bubble_fraction = r.makespan > 0 ? s.idle / r.makespan : 0;
    busy_total += s.busy;
  }
  r.bubble_fraction = r.makespan > 0 ? 1 - busy_total / (ranks * r.makespan) : 0;
  return r;
}

}  // namespace gpt
