#pragma once
// Owning CUDA streams and events, and the one ordering primitive the vocabulary passes and the
// communicators use: "work enqueued later on `waiter` starts after everything enqueued so far on
// `producer`" (an event recorded on the producer, waited on by the waiter: no host round trip).

#include <cuda_runtime.h>

#include <utility>

#include "pipit/cuda/check.cuh"

namespace pipit::cuda {

// A non-blocking stream (it does not synchronise with the legacy default stream).
class stream {
 public:
  stream() { PIPIT_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  // priority: lower is more urgent (cudaDeviceGetStreamPriorityRange); a communication stream
  // is usually given the highest so that collectives are not queued behind GEMMs.
  explicit stream(int priority) {
    PIPIT_CUDA_CHECK(cudaStreamCreateWithPriority(&s_, cudaStreamNonBlocking, priority));
  }
  stream(stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  stream& operator=(stream&& o) noexcept {
    std::swap(s_, o.s_);
    return *this;
  }
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;
  ~stream() {
    if (s_) (void)cudaStreamDestroy(s_);
  }

  cudaStream_t get() const noexcept { return s_; }
  operator cudaStream_t() const noexcept { return s_; }
  void synchronize() const { PIPIT_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

// An event; without timing by default (cheaper to record and wait on).
class event {
 public:
  explicit event(bool timing = false) {
    PIPIT_CUDA_CHECK(
        cudaEventCreateWithFlags(&e_, timing ? cudaEventDefault : cudaEventDisableTiming));
  }
  event(event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  event& operator=(event&& o) noexcept {
    std::swap(e_, o.e_);
    return *this;
  }
  event(const event&) = delete;
  event& operator=(const event&) = delete;
  ~event() {
    if (e_) (void)cudaEventDestroy(e_);
  }

  cudaEvent_t get() const noexcept { return e_; }
  void record(cudaStream_t s) { PIPIT_CUDA_CHECK(cudaEventRecord(e_, s)); }
  // Makes `s` wait (on the device) for the work captured by the last record().
  void wait_on(cudaStream_t s) const { PIPIT_CUDA_CHECK(cudaStreamWaitEvent(s, e_, 0)); }
  void synchronize() const { PIPIT_CUDA_CHECK(cudaEventSynchronize(e_)); }
  // Milliseconds between `start` and this event (both recorded with timing).
  float elapsed_since(const event& start) const {
    float ms = 0.f;
    PIPIT_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e_, e_));
    return ms;
  }

 private:
  cudaEvent_t e_ = nullptr;
};

// Work enqueued on `waiter` after this call starts after the work enqueued on `producer` before
// it. `e` is only a carrier: cudaStreamWaitEvent binds to the record made here, so one event can
// order any number of pairs one after another.
inline void stream_wait(cudaStream_t waiter, cudaStream_t producer, event& e) {
  if (waiter == producer) return;
  e.record(producer);
  e.wait_on(waiter);
}

}  // namespace pipit::cuda
