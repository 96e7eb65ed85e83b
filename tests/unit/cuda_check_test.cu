// Host-side CUDA helpers; these run (and must pass) with or without a device.
#include <catch2/catch.hpp>

#include <string>

#include "pipit/cuda/device.cuh"

TEST_CASE("PIPIT_CUDA_CHECK turns a failed call into pipit::error naming it", "[cuda]") {
  // Device 4096 exists nowhere; without a driver the call fails too (differently).
  try {
    PIPIT_CUDA_CHECK(cudaSetDevice(4096));
    FAIL("no error was raised");
  } catch (const pipit::error& e) {
    const std::string what = e.what();
    CHECK(what.find("cudaSetDevice(4096)") != std::string::npos);
    CHECK(what.find("cudaError") != std::string::npos);
    CHECK(what.find("cuda_check_test.cu") != std::string::npos);
  }
  CHECK_NOTHROW(PIPIT_CUDA_CHECK(cudaSuccess));
}

TEST_CASE("device_count agrees with the runtime's status", "[cuda]") {
  int n = -1;
  const cudaError_t status = cudaGetDeviceCount(&n);
  (void)cudaGetLastError();
  if (status == cudaSuccess)
    CHECK(pipit::cuda::device_count() == n);
  else
    CHECK(pipit::cuda::device_count() == 0);  // and never the runtime's untouched -1
  CHECK(pipit::cuda::has_device() == (pipit::cuda::device_count() > 0));
}
