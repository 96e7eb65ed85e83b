#pragma once
// The profile NanoFlow's parameter search starts from (Zhu et al., arXiv 2408.12757, section
// 4.2; efeslab/Nanoflow, auto_search/profileAnalysis.py keeps a table of measured duration per
// (operation, batch size)): the measured duration of each operation of an op_graph at several
// batch sizes, with linear interpolation in between.
//
//   profile           the table, and duration(op, rows) by interpolation
//   measure_profile   runs fn(op, rows [0, size)) for every op in id order (so each op reads
//                     what its dependencies just wrote), `repeats` times per size, and keeps
//                     each op's median; collective ops are run by every rank in the same order
//   agree             makes the profile identical on every rank of a communicator (compute and
//                     memory ops: the slowest rank; network ops: the mean over ranks, see below),
//                     so that every rank's search picks the same nano-batches (their collectives
//                     match)
//
// Timing a collective: the ranks do not arrive at it together, and a rank that arrives early
// times its wait for the others. The collective overload of measure_profile puts a barrier
// before each network op and times `network_repeats` calls back to back (the collectives then
// keep the ranks in step; the mean per call is the sample), as MPI micro-benchmarks do. Left
// over is the barrier's exit skew, spread over the calls: a rank that leaves the barrier first
// over-counts by about as much as the last one under-counts, hence the mean over ranks. A
// network op is thus applied several times in a row while profiling (an all-reduce sums sums);
// only its timing matters there, and the caller recomputes from its inputs afterwards.
//   measure_dispatch  the runner's cost of handing one nano-op to another thread

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <span>
#include <utility>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/op_graph.hpp"

namespace pipit::nano {

class profile {
 public:
  // sizes: strictly increasing, >= 1.
  profile(int ops, std::vector<std::int64_t> sizes)
      : ops_(ops),
        sizes_(std::move(sizes)),
        seconds_(static_cast<std::size_t>(ops) * sizes_.size(), 0.0) {
    if (ops < 0) fail("pipit::nano::profile: ", ops, " ops");
    if (sizes_.empty()) fail("pipit::nano::profile: no batch sizes");
    for (std::size_t i = 0; i < sizes_.size(); ++i)
      if (sizes_[i] < 1 || (i > 0 && sizes_[i] <= sizes_[i - 1]))
        fail("pipit::nano::profile: batch sizes must be >= 1 and strictly increasing; size ", i,
             " is ", sizes_[i]);
  }

  int ops() const noexcept { return ops_; }
  std::span<const std::int64_t> sizes() const noexcept { return sizes_; }
  double& seconds(int op, std::size_t size_index) { return seconds_.at(index(op, size_index)); }
  double seconds(int op, std::size_t size_index) const {
    return seconds_.at(index(op, size_index));
  }
  std::span<double> all() noexcept { return seconds_; }

  // Duration of op on `rows` rows: linear between the measured sizes, and beyond them along the
  // nearest segment (a single size: proportional), never below zero.
  double duration(int op, std::int64_t rows) const {
    if (op < 0 || op >= ops_) fail("pipit::nano::profile: no op ", op, " (", ops_, " ops)");
    const std::size_t n = sizes_.size();
    if (n == 1) return seconds(op, 0) * static_cast<double>(rows) / static_cast<double>(sizes_[0]);
    std::size_t hi = 1;
    while (hi + 1 < n && sizes_[hi] < rows) ++hi;
    const double x0 = static_cast<double>(sizes_[hi - 1]), x1 = static_cast<double>(sizes_[hi]);
    const double y0 = seconds(op, hi - 1), y1 = seconds(op, hi);
    return std::max(0.0, y0 + (y1 - y0) * (static_cast<double>(rows) - x0) / (x1 - x0));
  }

 private:
  std::size_t index(int op, std::size_t s) const {
    if (op < 0 || op >= ops_ || s >= sizes_.size())
      fail("pipit::nano::profile: no entry (op ", op, ", size index ", s, ")");
    return static_cast<std::size_t>(op) * sizes_.size() + s;
  }

  int ops_;
  std::vector<std::int64_t> sizes_;
  std::vector<double> seconds_;  // op-major
};

struct profiler_options {
  int warmup = 1;           // passes not timed
  int repeats = 5;          // timed passes; each op keeps its median
  int network_repeats = 4;  // back-to-back calls per sample of a network op (collective overload)
};

// 1, 2, 4, ... up to rows, and rows itself.
inline std::vector<std::int64_t> doubling_sizes(std::int64_t rows) {
  if (rows < 1) fail("pipit::nano::doubling_sizes: ", rows, " rows");
  std::vector<std::int64_t> s;
  for (std::int64_t r = 1; r < rows; r *= 2) s.push_back(r);
  s.push_back(rows);
  return s;
}

template <comm::communicator C>
void agree(C& comm, const op_graph& g, profile& prof);

// Before each network op, `sync()` is called and returns how many calls to time back to back.
template <class Fn, class Sync>
profile measure_profile(const op_graph& g, std::vector<std::int64_t> sizes, Fn&& fn,
                        profiler_options opt, Sync&& sync) {
  if (opt.repeats < 1 || opt.warmup < 0 || opt.network_repeats < 1)
    fail("pipit::nano::measure_profile: ", opt.repeats, " repeats, ", opt.warmup,
         " warm-up passes, ", opt.network_repeats,
         " network repeats (need repeats >= 1, warmup >= 0, network repeats >= 1)");
  profile prof(g.size(), std::move(sizes));
  using clock = std::chrono::steady_clock;
  const std::size_t n_sizes = prof.sizes().size(), reps = static_cast<std::size_t>(opt.repeats);
  std::vector<double> samples(static_cast<std::size_t>(g.size()) * n_sizes * reps);
  // Passes go over every size in turn, so that a burst of load from elsewhere on the machine
  // lands on one sample of several sizes rather than on every sample of one size.
  for (int pass = 0; pass < opt.warmup + opt.repeats; ++pass)
    for (std::size_t si = 0; si < n_sizes; ++si) {
      const rows_range rows{0, prof.sizes()[si]};
      for (int o = 0; o < g.size(); ++o) {
        int calls = 1;
        if (g[o].kind == resource::network) calls = sync();
        const auto t0 = clock::now();
        for (int c = 0; c < calls; ++c) fn(o, rows);
        const double dt = std::chrono::duration<double>(clock::now() - t0).count() / calls;
        if (pass >= opt.warmup)
          samples[(static_cast<std::size_t>(o) * n_sizes + si) * reps +
                  static_cast<std::size_t>(pass - opt.warmup)] = dt;
      }
    }
  for (int o = 0; o < g.size(); ++o)
    for (std::size_t si = 0; si < n_sizes; ++si) {
      const auto first = samples.begin() + static_cast<std::ptrdiff_t>(
                                               (static_cast<std::size_t>(o) * n_sizes + si) * reps);
      std::nth_element(first, first + opt.repeats / 2, first + opt.repeats);
      prof.seconds(o, si) = first[opt.repeats / 2];
    }
  return prof;
}

template <class Fn>
profile measure_profile(const op_graph& g, std::vector<std::int64_t> sizes, Fn&& fn,
                        profiler_options opt = {}) {
  return measure_profile(g, std::move(sizes), std::forward<Fn>(fn), opt, [] { return 1; });
}

// Collective over comm: every rank profiles, with a barrier and network_repeats back-to-back
// calls for each network op (see the file comment); then agree().
template <comm::communicator C, class Fn>
profile measure_profile(C& comm, const op_graph& g, std::vector<std::int64_t> sizes, Fn&& fn,
                        profiler_options opt = {}) {
  profile prof = measure_profile(g, std::move(sizes), std::forward<Fn>(fn), opt, [&] {
    comm.barrier();
    return opt.network_repeats;
  });
  agree(comm, g, prof);
  return prof;
}

// Collective over comm: afterwards every rank holds the same profile (see the file comment).
template <comm::communicator C>
void agree(C& comm, const op_graph& g, profile& prof) {
  if (prof.ops() != g.size())
    fail("pipit::nano::agree: a profile of ", prof.ops(), " ops for a graph of ", g.size());
  // Compute and memory: the slowest rank (max); network: the mean (a sum, then / size).
  const std::size_t k = prof.sizes().size();
  std::vector<double> slowest(prof.all().begin(), prof.all().end()), mean(slowest.size(), 0.0);
  for (int o = 0; o < g.size(); ++o)
    if (g[o].kind == resource::network)
      for (std::size_t s = 0; s < k; ++s) {
        mean[static_cast<std::size_t>(o) * k + s] = slowest[static_cast<std::size_t>(o) * k + s];
        slowest[static_cast<std::size_t>(o) * k + s] = 0;
      }
  comm.all_reduce(std::span<double>(slowest), comm::max_op{});
  comm.all_reduce(std::span<double>(mean), std::plus<>{});
  for (int o = 0; o < g.size(); ++o)
    for (std::size_t s = 0; s < k; ++s) {
      const std::size_t i = static_cast<std::size_t>(o) * k + s;
      prof.seconds(o, s) = g[o].kind == resource::network ? mean[i] / comm.size() : slowest[i];
    }
}

// Seconds the runner spends per nano-op on handing work between threads: a chain of `n` empty
// nano-ops alternating compute and memory, run `repeats` times; the median time over n.
inline double measure_dispatch(nano_runner& runner, int n = 200, int repeats = 5) {
  if (n < 2 || repeats < 1) fail("pipit::nano::measure_dispatch: n ", n, ", repeats ", repeats);
  op_graph g;
  for (int i = 0; i < n; ++i) {
    const int prev[1] = {i - 1};
    g.add("hop", i % 2 ? resource::memory : resource::compute,
          std::span<const int>(prev, i ? 1 : 0));
  }
  const nano_program p(g, nano_batch::none(g, 1));
  std::vector<double> t;
  for (int r = 0; r < repeats + 1; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    runner.run(p, [](int, rows_range) {});
    if (r)
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(t.begin(), t.begin() + repeats / 2, t.end());
  return t[static_cast<std::size_t>(repeats / 2)] / n;
}

}  // namespace pipit::nano
