// The same PIPIT_HOST_DEVICE functions run on the device and on the host, then compared
// (the pattern every later CUDA test follows: the host is the reference).
#include <catch2/catch.hpp>

#include <vector>

#include "pipit/core/math.hpp"
#include "pipit/cuda/device.cuh"

namespace {
__global__ void eval_math(int n, int* ceil_out, int* round_out, int* split_begin) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int a = i, b = 1 + i % 17;
  ceil_out[i] = pipit::ceil_div(a, b);
  round_out[i] = pipit::round_up(a, b);
  split_begin[i] = pipit::even_split(a, b, i % b).begin;
}
}  // namespace

TEST_CASE("core math gives the same results on the device as on the host", "[gpu][cuda]") {
  const int n = 4096;
  int *d_ceil = nullptr, *d_round = nullptr, *d_split = nullptr;
  PIPIT_CUDA_CHECK(cudaMalloc(&d_ceil, n * sizeof(int)));
  PIPIT_CUDA_CHECK(cudaMalloc(&d_round, n * sizeof(int)));
  PIPIT_CUDA_CHECK(cudaMalloc(&d_split, n * sizeof(int)));
  eval_math<<<(n + 255) / 256, 256>>>(n, d_ceil, d_round, d_split);
  PIPIT_CUDA_CHECK(cudaGetLastError());
  std::vector<int> ceil_out(n), round_out(n), split_out(n);
  PIPIT_CUDA_CHECK(cudaMemcpy(ceil_out.data(), d_ceil, n * sizeof(int), cudaMemcpyDeviceToHost));
  PIPIT_CUDA_CHECK(cudaMemcpy(round_out.data(), d_round, n * sizeof(int), cudaMemcpyDeviceToHost));
  PIPIT_CUDA_CHECK(cudaMemcpy(split_out.data(), d_split, n * sizeof(int), cudaMemcpyDeviceToHost));
  cudaFree(d_ceil);
  cudaFree(d_round);
  cudaFree(d_split);
  for (int i = 0; i < n; ++i) {
    const int a = i, b = 1 + i % 17;
    REQUIRE(ceil_out[i] == pipit::ceil_div(a, b));
    REQUIRE(round_out[i] == pipit::round_up(a, b));
    REQUIRE(split_out[i] == pipit::even_split(a, b, i % b).begin);
  }
}
