#pragma once
// nano_stream_runner: NanoFlow's operation-level overlap on one GPU (Zhu et al., arXiv
// 2408.12757, section 4): the nano-operations of a nano::nano_program are issued on one CUDA
// stream per kind (compute, memory, network), each stream created with its own priority, so that
// nano-ops of different kinds run concurrently on the device while every row-wise dependency of
// the program still holds.
//
// Issue. run() enqueues every nano-op, from the calling thread, in the program's order (op id,
// nano index; a topological order): fn(op id, rows, stream) must enqueue the nano-op's device
// work on `stream` and return (no host synchronisation). A dependency across kinds becomes an
// event recorded after the producer and a cudaStreamWaitEvent before the consumer; one within a
// kind needs nothing, the stream is in order. nano::stream_plan derives which waits are needed
// (waits implied by earlier ones are dropped) and which events to record, once, at construction;
// the events are created there too, so a run allocates nothing. cudaStreamWaitEvent binds to the
// record made before it, so the same events serve every run.
//
// Dependencies. The plan orders what the op_graph states: a consumer after the rows it reads
// (read after write). Within one run it does not order a write after a read across kinds: a
// nano-op that overwrites a buffer another kind's earlier nano-op still reads, with no
// dependency edge between them, may run first. Avoiding that (a separate buffer, or an edge) is
// the caller's; between runs the runner orders everything (below).
//
// Between runs. A run starts after the previous run's work on every stream (each stream waits for
// the other streams' last events of the previous run): the nano-ops of consecutive runs typically
// reuse buffers, and a compute nano-op of run 2 must not overwrite what a network nano-op of run 1
// still reads. run(fn, caller) also forks from `caller` (the streams wait for the work enqueued on
// it so far) and joins back into it (work enqueued on it afterwards waits for the whole run);
// `caller` may be the legacy default stream 0. The runner's streams are non-blocking: without a
// caller they are not ordered after work on stream 0. Nothing blocks the host: use
// synchronize(), or the caller stream.
//
// CUDA graph. capture(fn) records one run (fork from and join into an internal origin stream)
// into an executable graph; launching it on a stream replays the nano-ops with the same
// dependencies and no per-op launch cost on the host. The graph is ordered after the work on the
// stream it is launched on and nothing else: to mix it with eager runs, give those runs the same
// caller stream. fn must not call CUDA functions that are illegal while capturing (synchronous
// allocation, synchronisation). The graph is instantiated with
// cudaGraphInstantiateFlagUseNodePriority: each kernel node keeps the priority of the stream it
// was captured from (capture copies it into the node), so a replay keeps the per-kind
// priorities instead of taking the launch stream's; other nodes (copies, memsets) have none.
//
// Errors are pipit::error (CUDA failures via PIPIT_CUDA_CHECK, bad priorities naming the value and
// the device's range). If fn throws, or a fork or wait fails, the streams already forked are
// still joined (and a capture ended) before the exception propagates; the work already enqueued
// stays enqueued.

#include <cuda_runtime.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/stream.cuh"
#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/op_graph.hpp"
#include "pipit/nano/stream_plan.hpp"

namespace pipit::cuda {

struct nano_stream_options {
  // CUDA priority of the stream of each kind (compute, memory, network); lower is more urgent
  // and must lie in the device's range. Empty: nano::default_stream_priorities (network highest,
  // then memory, compute lowest).
  std::optional<std::array<int, nano::resource_count>> priorities;
};

// An executable CUDA graph of one captured run.
class nano_graph {
 public:
  nano_graph() = default;
  explicit nano_graph(cudaGraphExec_t g) noexcept : g_(g) {}
  nano_graph(nano_graph&& o) noexcept : g_(std::exchange(o.g_, nullptr)) {}
  nano_graph& operator=(nano_graph&& o) noexcept {
    std::swap(g_, o.g_);
    return *this;
  }
  nano_graph(const nano_graph&) = delete;
  nano_graph& operator=(const nano_graph&) = delete;
  ~nano_graph() {
    if (g_) (void)cudaGraphExecDestroy(g_);
  }

  explicit operator bool() const noexcept { return g_ != nullptr; }
  cudaGraphExec_t get() const noexcept { return g_; }
  // Replays the run after the work enqueued on `s` so far; later work on `s` waits for it.
  void launch(cudaStream_t s) const {
    if (!g_) fail("pipit::cuda::nano_graph::launch: an empty graph");
    PIPIT_CUDA_CHECK(cudaGraphLaunch(g_, s));
  }

 private:
  cudaGraphExec_t g_ = nullptr;
};

class nano_stream_runner {
  static constexpr int kinds = nano::resource_count;

 public:
  explicit nano_stream_runner(nano::nano_program program, nano_stream_options options = {})
      : program_(std::move(program)),
        plan_(program_),
        priority_(checked_priorities(options)),
        streams_{stream(priority_[0]), stream(priority_[1]), stream(priority_[2])},
        events_(plan_) {}

  nano_stream_runner(const nano_stream_runner&) = delete;
  nano_stream_runner& operator=(const nano_stream_runner&) = delete;

  const nano::nano_program& program() const noexcept { return program_; }
  const nano::stream_plan& plan() const noexcept { return plan_; }
  cudaStream_t stream_of(nano::resource k) const noexcept {
    return streams_[static_cast<std::size_t>(k)].get();
  }
  // The priority the stream of kind k was created with.
  int priority(nano::resource k) const noexcept { return priority_[static_cast<std::size_t>(k)]; }

  // Enqueues one run: fn(op id, rows, stream) for every nano-op, on its kind's stream, after the
  // previous run. Returns without waiting for the device.
  template <class Fn>
  void run(Fn&& fn) {
    enqueue(fn, false, nullptr, events_, true);
  }
  // The same, forked from `caller` and joined back into it.
  template <class Fn>
  void run(Fn&& fn, cudaStream_t caller) {
    enqueue(fn, true, caller, events_, true);
  }

  // Captures one run into an executable graph (see the file comment). Enqueues no device work.
  template <class Fn>
  nano_graph capture(Fn&& fn) {
    const stream origin;  // capture needs a stream of its own to fork from and join into
    event_set ev(plan_);  // records made while capturing become graph edges, not events
    PIPIT_CUDA_CHECK(cudaStreamBeginCapture(origin.get(), cudaStreamCaptureModeThreadLocal));
    cudaGraph_t graph = nullptr;
    try {
      enqueue(fn, true, origin.get(), ev, false);
    } catch (...) {
      if (cudaStreamEndCapture(origin.get(), &graph) == cudaSuccess && graph)
        (void)cudaGraphDestroy(graph);
      (void)cudaGetLastError();
      throw;
    }
    PIPIT_CUDA_CHECK(cudaStreamEndCapture(origin.get(), &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t st =
        cudaGraphInstantiate(&exec, graph, cudaGraphInstantiateFlagUseNodePriority);
    (void)cudaGraphDestroy(graph);
    PIPIT_CUDA_CHECK(st);
    return nano_graph(exec);
  }

  // Blocks the host until every stream has finished its work.
  void synchronize() const {
    for (const stream& s : streams_) s.synchronize();
  }

  // The no-overlap baseline: every nano-op in program order on the one stream `s`.
  template <class Fn>
  static void run_sequential(const nano::nano_program& p, Fn&& fn, cudaStream_t s) {
    for (const nano::nano_op& n : p.ops()) fn(n.op, n.rows, s);
  }

 private:
  struct event_set {
    std::vector<event> after;       // plan slot -> event recorded after that nano-op
    std::array<event, kinds> last;  // each stream's end of a run
    event fork;
    explicit event_set(const nano::stream_plan& plan)
        : after(static_cast<std::size_t>(plan.events())) {}
  };

  std::array<int, kinds> checked_priorities(const nano_stream_options& o) const {
    int least = 0, greatest = 0;
    PIPIT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    const auto p = o.priorities ? *o.priorities : nano::default_stream_priorities(least, greatest);
    for (int k = 0; k < kinds; ++k) {
      const int v = p[static_cast<std::size_t>(k)];
      if (v < greatest || v > least)
        fail("pipit::cuda::nano_stream_runner: priority ", v, " for the ",
             nano::to_string(static_cast<nano::resource>(k)),
             " stream is outside the device's range [", greatest, ", ", least,
             "] (lower is more urgent)");
    }
    return p;
  }

  bool used(int k) const noexcept { return plan_.used(static_cast<nano::resource>(k)); }
  cudaStream_t s(int k) const noexcept { return streams_[static_cast<std::size_t>(k)].get(); }

  template <class Fn>
  void enqueue(Fn& fn, bool join, cudaStream_t origin, event_set& ev, bool after_previous) {
    // The streams that are part of this run: all used ones without a fork; with one, those whose
    // wait on the fork event succeeded. Only these are joined on failure: while capturing, a
    // stream that never waited on the fork is not in the capture, and joining it would be an
    // error of its own; one that waited must be joined or the capture cannot end.
    std::array<bool, kinds> in_run{};
    for (int k = 0; k < kinds; ++k) in_run[static_cast<std::size_t>(k)] = !join && used(k);
    try {
      if (join) {
        ev.fork.record(origin);
        for (int k = 0; k < kinds; ++k)
          if (used(k)) {
            ev.fork.wait_on(s(k));
            in_run[static_cast<std::size_t>(k)] = true;
          }
      }
      if (after_previous && ran_)
        for (int k = 0; k < kinds; ++k)
          for (int m = 0; m < kinds; ++m)
            if (m != k && used(k) && used(m)) ev.last[static_cast<std::size_t>(m)].wait_on(s(k));
      for (int i = 0; i < program_.size(); ++i) {
        const nano::nano_op& n = program_[i];
        const cudaStream_t on = s(static_cast<int>(n.kind));
        for (int d : plan_.waits(i)) ev.after[static_cast<std::size_t>(plan_.event(d))].wait_on(on);
        fn(n.op, n.rows, on);
        if (const int e = plan_.event(i); e >= 0) ev.after[static_cast<std::size_t>(e)].record(on);
      }
    } catch (...) {
      // Join anyway, without throwing over the first error, so that the next run (or the end of
      // the capture) still finds every stream joined.
      for (int k = 0; k < kinds; ++k)
        if (in_run[static_cast<std::size_t>(k)]) {
          const cudaEvent_t e = ev.last[static_cast<std::size_t>(k)].get();
          if (cudaEventRecord(e, s(k)) == cudaSuccess && join)
            (void)cudaStreamWaitEvent(origin, e, 0);
        }
      (void)cudaGetLastError();
      if (after_previous) ran_ = true;
      throw;
    }
    for (int k = 0; k < kinds; ++k)
      if (used(k)) {
        ev.last[static_cast<std::size_t>(k)].record(s(k));
        if (join) ev.last[static_cast<std::size_t>(k)].wait_on(origin);
      }
    if (after_previous) ran_ = true;
  }

  nano::nano_program program_;
  nano::stream_plan plan_;
  std::array<int, kinds> priority_;
  std::array<stream, kinds> streams_;
  event_set events_;
  bool ran_ = false;  // a previous run's `last` events exist
};

}  // namespace pipit::cuda
