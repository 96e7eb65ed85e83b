#pragma once
// cuBLAS error checking: turns a failed cublasStatus_t into pipit::error with the call, the
// status's name and text, and where it happened.

#include <cublas_v2.h>

#include "pipit/core/error.hpp"

namespace pipit::cuda {

inline void cublas_check(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS)
    fail("pipit: cuBLAS call `", call, "` failed with ", cublasGetStatusName(status), " (",
         cublasGetStatusString(status), ") at ", file, ":", line);
}

}  // namespace pipit::cuda

#define PIPIT_CUBLAS_CHECK(call) ::pipit::cuda::cublas_check((call), #call, __FILE__, __LINE__)
