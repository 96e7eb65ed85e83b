#include <pipit/core/math.hpp>
#include <pipit/cuda/device.cuh>

#include <cstdio>

static_assert(__cplusplus >= 202002L, "nvcc must compile consumers as C++20");

__global__ void padded(int v, int* out) {
  *out = pipit::round_up(v, 128);
}

int main() {
  if (!pipit::cuda::has_device()) {  // a build machine: the compile and link are the test
    std::printf("pipit CUDA consumer built; no device to run on\n");
    return 0;
  }
  int* d = nullptr;
  PIPIT_CUDA_CHECK(cudaMalloc(&d, sizeof(int)));
  padded<<<1, 1>>>(50257, d);
  int h = 0;
  PIPIT_CUDA_CHECK(cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost));
  cudaFree(d);
  std::printf("round_up on the device: %d\n", h);
  return h == 50304 ? 0 : 1;
}
