#include <pipit/cuda/nccl_check.cuh>

#include <cstdio>

int main() {
  const int v = pipit::cuda::nccl_runtime_version();
  std::printf("NCCL %d (headers %d)\n", v, NCCL_VERSION_CODE);
  return v == NCCL_VERSION_CODE ? 0 : 1;
}
