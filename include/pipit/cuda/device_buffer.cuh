#pragma once
// device_buffer<T>: n elements of device memory, allocated and freed in stream order
// (cudaMallocAsync / cudaFreeAsync on the stream given at construction), so that per-microbatch
// workspaces come from the stream's memory pool without a device-wide synchronisation.

#include <cuda_runtime.h>

#include <cstddef>
#include <span>
#include <type_traits>
#include <utility>

#include "pipit/cuda/check.cuh"

namespace pipit::cuda {

template <class T>
class device_buffer {
  static_assert(std::is_trivially_copyable_v<T>,
                "pipit::cuda::device_buffer: elements must be trivially copyable");

 public:
  device_buffer() = default;
  device_buffer(std::size_t n, cudaStream_t s) : n_(n), s_(s) {
    if (n_ > 0) PIPIT_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&p_), bytes(), s_));
  }
  device_buffer(device_buffer&& o) noexcept { swap(o); }
  device_buffer& operator=(device_buffer&& o) noexcept {
    device_buffer t(std::move(o));
    swap(t);
    return *this;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() {
    if (p_) (void)cudaFreeAsync(p_, s_);
  }

  T* data() const noexcept { return p_; }
  std::size_t size() const noexcept { return n_; }
  std::size_t bytes() const noexcept { return n_ * sizeof(T); }
  std::span<T> span() const noexcept { return {p_, n_}; }
  // Sets every byte to zero, in stream order.
  void zero() {
    if (n_ > 0) PIPIT_CUDA_CHECK(cudaMemsetAsync(p_, 0, bytes(), s_));
  }

 private:
  void swap(device_buffer& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    std::swap(s_, o.s_);
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
  cudaStream_t s_ = nullptr;
};

}  // namespace pipit::cuda
