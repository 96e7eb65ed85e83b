#pragma once
// entry_check: kernels that meet an invalid entry (a token id outside the vocabulary, a negative
// loss weight) count it and remember its index, instead of reading out of bounds; the host later
// raises pipit::error naming the first such entry. Checking on the host before the launch would
// need the ids on the host, i.e. a copy and a synchronisation per microbatch; this way the only
// synchronisation is the caller's raise_if_bad (which output_layer::fetch_loss calls).

#include <cuda_runtime.h>

#include <cstdint>
#include <span>
#include <utility>

#include "pipit/core/config.hpp"
#include "pipit/core/error.hpp"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/device_buffer.cuh"

namespace pipit::cuda {

// What a kernel holds: two device counters.
struct entry_check_ref {
  unsigned long long* count = nullptr;  // number of invalid entries
  unsigned long long* first = nullptr;  // smallest invalid index (all ones: none)

  __device__ void report(std::int64_t index) const {
    atomicAdd(count, 1ull);
    atomicMin(first, static_cast<unsigned long long>(index));
  }
};

class entry_check {
 public:
  entry_check() = default;  // holds no device memory until assigned a constructed one
  explicit entry_check(cudaStream_t s) : s_(s), counters_(2, s) { reset(); }

  entry_check_ref ref() const noexcept { return {counters_.data(), counters_.data() + 1}; }
  cudaStream_t stream() const noexcept { return s_; }

  // Forgets earlier reports (in stream order).
  void reset() {
    if (counters_.size() == 0) fail("pipit::cuda::entry_check: used before construction");
    PIPIT_CUDA_CHECK(cudaMemsetAsync(counters_.data(), 0, sizeof(unsigned long long), s_));
    PIPIT_CUDA_CHECK(cudaMemsetAsync(counters_.data() + 1, 0xff, sizeof(unsigned long long), s_));
  }

  // Waits for the stream; returns {count, first index} (count 0: none).
  std::pair<std::uint64_t, std::int64_t> read() const {
    unsigned long long h[2] = {0, 0};
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(h, counters_.data(), sizeof h, cudaMemcpyDeviceToHost, s_));
    PIPIT_CUDA_CHECK(cudaStreamSynchronize(s_));
    return {h[0], static_cast<std::int64_t>(h[1])};
  }

  // Raises pipit::error for reported token ids: `ids` (device) are the ids the kernel checked
  // against the vocabulary [0, vocab_size). Waits for the stream.
  void raise_if_bad_ids(std::span<const std::int64_t> ids, std::int64_t vocab_size,
                        const char* what) const {
    const auto [count, first] = read();
    if (count == 0) return;
    std::int64_t id = 0;
    PIPIT_CUDA_CHECK(cudaMemcpy(&id, ids.data() + first, sizeof id, cudaMemcpyDeviceToHost));
    fail("pipit::cuda: ", count, " ", what, " outside the vocabulary; the first: token id ", id,
         " (entry ", first, ") is outside the vocabulary [0, ", vocab_size, ") (vocabulary size ",
         vocab_size, ")");
  }

  // Raises pipit::error for reported loss weights (device). Waits for the stream.
  void raise_if_bad_weights(std::span<const float> weights) const {
    const auto [count, first] = read();
    if (count == 0) return;
    float w = 0.f;
    PIPIT_CUDA_CHECK(cudaMemcpy(&w, weights.data() + first, sizeof w, cudaMemcpyDeviceToHost));
    fail("pipit::cuda: ", count, " invalid loss weights; the first: loss weight ", w, " of token ",
         first, " is not a finite non-negative number");
  }

 private:
  cudaStream_t s_ = nullptr;
  device_buffer<unsigned long long> counters_;
};

}  // namespace pipit::cuda
