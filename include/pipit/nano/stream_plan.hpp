#pragma once
// stream_plan: how a nano_program is issued on one in-order queue per kind (CUDA streams in
// pipit::cuda::nano_stream_runner), derived on the host without touching a device.
//
// Every nano-op goes to the stream of its kind, in the program's order (op id, nano index): a
// topological order, so a producer is always enqueued before its consumers, and each stream
// receives its kind's queue in queue order. A dependency between nano-ops of the same kind needs
// nothing (a stream runs its work in order); one across kinds needs an event recorded after the
// producer and waited on by the consumer's stream before the consumer. Many of those waits are
// implied by others: a stream that waited for nano-op j of stream B has also seen everything
// before j on B and everything j's stream had waited for. The plan keeps, per stream, a vector
// clock (the last position of every stream known to be complete before its next nano-op; the
// classic happens-before bookkeeping of Lamport/Mattern clocks) and emits a wait only when neither
// that clock nor another producer the same nano-op waits for covers the producer: every wait
// left is necessary (the unit test checks this against a reachability closure). NanoFlow's executor
// records events only where a consumer is on another stream (efeslab/Nanoflow,
// nanoflow/core/executor.py); the clock also drops the waits that earlier waits imply.
//
// The default stream priorities live here too, as plain arithmetic on the device's range.

#include <algorithm>
#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/op_graph.hpp"

namespace pipit::nano {

class stream_plan {
 public:
  explicit stream_plan(const nano_program& p) {
    const int n = p.size();
    position_.resize(static_cast<std::size_t>(n));
    for (int k = 0; k < resource_count; ++k) {
      const auto q = p.queue(static_cast<resource>(k));
      for (std::size_t j = 0; j < q.size(); ++j)
        position_[static_cast<std::size_t>(q[j])] = static_cast<int>(j);
      used_[static_cast<std::size_t>(k)] = !q.empty();
    }
    // clock[k][m]: the last position of stream m known complete before stream k's next nano-op
    // (-1: none). after[i]: stream kind(i)'s clock just after nano-op i (it includes i itself).
    using clock = std::array<int, resource_count>;
    std::array<clock, resource_count> now;
    for (auto& c : now) c.fill(-1);
    std::vector<clock> after(static_cast<std::size_t>(n));
    event_.assign(static_cast<std::size_t>(n), -1);
    wait_first_.push_back(0);
    for (int i = 0; i < n; ++i) {
      const nano_op& c = p[i];
      const int k = static_cast<int>(c.kind);
      clock& mine = now[static_cast<std::size_t>(k)];
      // The latest producer on each other stream that this nano-op needs.
      std::array<int, resource_count> need;
      need.fill(-1);
      for (int d : p.deps(i)) {
        const int dk = static_cast<int>(p[d].kind);
        if (dk == k) continue;
        ++cross_;
        int& x = need[static_cast<std::size_t>(dk)];
        if (x < 0 ||
            position_[static_cast<std::size_t>(d)] > position_[static_cast<std::size_t>(x)])
          x = d;
      }
      // A producer is covered when this stream's clock already includes it, or when another
      // producer needed here comes after it (waiting for that one implies it).
      auto covered = [&](int m, int d) {
        const int pos = position_[static_cast<std::size_t>(d)];
        if (mine[static_cast<std::size_t>(m)] >= pos) return true;
        for (int o = 0; o < resource_count; ++o) {
          const int e = need[static_cast<std::size_t>(o)];
          if (o != m && e >= 0 &&
              after[static_cast<std::size_t>(e)][static_cast<std::size_t>(m)] >= pos)
            return true;
        }
        return false;
      };
      for (int m = 0; m < resource_count; ++m) {
        const int d = need[static_cast<std::size_t>(m)];
        if (d < 0 || covered(m, d)) continue;
        waits_.push_back(d);
        if (event_[static_cast<std::size_t>(d)] < 0)
          event_[static_cast<std::size_t>(d)] = events_++;
        const clock& theirs = after[static_cast<std::size_t>(d)];
        for (int q = 0; q < resource_count; ++q)
          mine[static_cast<std::size_t>(q)] =
              std::max(mine[static_cast<std::size_t>(q)], theirs[static_cast<std::size_t>(q)]);
      }
      wait_first_.push_back(static_cast<int>(waits_.size()));
      mine[static_cast<std::size_t>(k)] = position_[static_cast<std::size_t>(i)];
      after[static_cast<std::size_t>(i)] = mine;
    }
  }

  int size() const noexcept { return static_cast<int>(position_.size()); }
  // The nano-ops whose recorded events nano-op i's stream waits on, just before i.
  std::span<const int> waits(int i) const {
    check(i);
    const auto b = static_cast<std::size_t>(wait_first_[static_cast<std::size_t>(i)]);
    const auto e = static_cast<std::size_t>(wait_first_[static_cast<std::size_t>(i) + 1]);
    return std::span<const int>(waits_).subspan(b, e - b);
  }
  // The event slot recorded after nano-op i, or -1 when no other stream waits for i.
  int event(int i) const {
    check(i);
    return event_[static_cast<std::size_t>(i)];
  }
  // Event slots the plan needs (each recorded once per run).
  int events() const noexcept { return events_; }
  // nano-op i's place in its kind's queue (and on its stream).
  int position(int i) const {
    check(i);
    return position_[static_cast<std::size_t>(i)];
  }
  // Whether a kind has any nano-op (streams without one take no part in a run).
  bool used(resource k) const noexcept { return used_[static_cast<std::size_t>(k)]; }
  // Dependencies between nano-ops of different kinds, and the waits that express them.
  int cross_dependencies() const noexcept { return cross_; }
  int wait_count() const noexcept { return static_cast<int>(waits_.size()); }

 private:
  void check(int i) const {
    if (i < 0 || i >= size()) fail("pipit::nano::stream_plan: no nano-op ", i, " (", size(), ")");
  }
  std::vector<int> position_, event_, waits_, wait_first_;
  std::array<bool, resource_count> used_{};
  int events_ = 0, cross_ = 0;
};

// Default CUDA stream priorities per kind (compute, memory, network) on a device whose range is
// [greatest, least] (cudaDeviceGetStreamPriorityRange; lower is more urgent, e.g. -5 .. 0).
// Network highest, then memory, compute lowest. A stream's priority only decides which ready
// thread blocks the block scheduler starts first; NanoFlow (sec. 4.2, and its engine's launch
// geometry) gives collectives and the memory-bound decode GEMV small SM shares and lets the GEMMs
// take whatever is left, because a GEMM loses throughput roughly in proportion to the SMs it
// gives up while the others reach most of theirs with a few. A collective is also on every
// rank's critical path (the peers wait for it) and hides nothing if it queues behind a GEMM's
// blocks; attention is next, since the GEMMs of the following nano-batch wait for it. With only
// two levels, memory shares the network's.
inline std::array<int, resource_count> default_stream_priorities(int least, int greatest) {
  if (greatest > least)
    fail("pipit::nano::default_stream_priorities: greatest priority ", greatest,
         " is numerically above the least ", least, " (CUDA: lower is more urgent)");
  std::array<int, resource_count> p{};
  p[static_cast<std::size_t>(resource::compute)] = least;
  p[static_cast<std::size_t>(resource::memory)] = greatest + (least - greatest) / 2;
  p[static_cast<std::size_t>(resource::network)] = greatest;
  return p;
}

}  // namespace pipit::nano
