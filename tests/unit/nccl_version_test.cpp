// Runs without a GPU: ncclGetVersion needs no device.
#include <catch2/catch.hpp>

#include "pipit/cuda/nccl_check.cuh"

TEST_CASE("the NCCL library loaded at run time is the one the headers describe", "[nccl]") {
  const int v = pipit::cuda::nccl_runtime_version();
  CHECK(v == NCCL_VERSION_CODE);
  CHECK(v >= 21800);  // pipit needs NCCL >= 2.18 (grouped point-to-point on streams)
}

TEST_CASE("PIPIT_NCCL_CHECK raises pipit::error with NCCL's message", "[nccl]") {
  CHECK_THROWS_WITH(PIPIT_NCCL_CHECK(ncclInvalidArgument), Catch::Contains("invalid argument"));
  CHECK_NOTHROW(PIPIT_NCCL_CHECK(ncclSuccess));
}
