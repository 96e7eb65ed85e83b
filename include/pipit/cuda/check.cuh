#pragma once
// CUDA runtime error checking: turns a failed cudaError_t into pipit::error with the call, the
// error's name and text, and where it happened.

#include <cuda_runtime.h>

#include "pipit/core/error.hpp"

namespace pipit::cuda {

inline void check(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess)
    fail("pipit: CUDA call `", call, "` failed with ", cudaGetErrorName(status), " (",
         cudaGetErrorString(status), ") at ", file, ":", line);
}

}  // namespace pipit::cuda

#define PIPIT_CUDA_CHECK(call) ::pipit::cuda::check((call), #call, __FILE__, __LINE__)
