#pragma once
// NCCL error checking and version query.

#include <nccl.h>

#include "pipit/core/error.hpp"

namespace pipit::cuda {

inline void nccl_check(ncclResult_t status, const char* call, const char* file, int line) {
  if (status != ncclSuccess)
    fail("pipit: NCCL call `", call, "` failed with ", ncclGetErrorString(status), " (",
         static_cast<int>(status), ") at ", file, ":", line);
}

// The version of the NCCL library loaded at run time (NCCL_VERSION_CODE form, e.g. 22809).
// It may differ from the header's NCCL_VERSION_CODE when another libnccl.so is found first.
inline int nccl_runtime_version() {
  int v = 0;
  nccl_check(ncclGetVersion(&v), "ncclGetVersion", __FILE__, __LINE__);
  return v;
}

}  // namespace pipit::cuda

#define PIPIT_NCCL_CHECK(call) ::pipit::cuda::nccl_check((call), #call, __FILE__, __LINE__)
