#pragma once
// Device discovery that is safe on machines without a GPU or driver.

#include <cuda_runtime.h>

#include "pipit/cuda/check.cuh"

namespace pipit::cuda {

// Number of usable CUDA devices; 0 when there is no driver or no device. The runtime leaves its
// output untouched on failure (e.g. cudaErrorInsufficientDriver without a driver), so the status
// decides, not the count.
inline int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky error for later calls
    return 0;
  }
  return n;
}

inline bool has_device() noexcept {
  return device_count() > 0;
}

// Compute capability of `device` as major * 10 + minor (90 for Hopper).
inline int compute_capability(int device) {
  cudaDeviceProp prop{};
  PIPIT_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.major * 10 + prop.minor;
}

}  // namespace pipit::cuda
