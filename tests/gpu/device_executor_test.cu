// cuda::device_executor against a host reference: a chain of element-wise layers
// y = tanh(a_s x + b_s), one per virtual stage, half squared error against a fixed target,
// trained one step through the device executor (device buffers, compute stream + NCCL stream);
// the gradients of every a_s, b_s must equal the host's double-precision sums to 1e-4
// (relative; float math on the device, and float atomics add the per-element terms in any
// order). One GPU runs the single-rank plans (every stage local); two or more GPUs also run a
// 2-rank pipeline through NCCL. Data parallelism: replicas of a 1-rank pipeline train the same
// batch, so the default average over them must reproduce the reference (a sum would not).
// Cases that need more GPUs than the machine has print the GPU main's "PIPIT_SKIP:" marker
// (CTest: Skipped); every NCCL communicator has a 15 s timeout, inside the GPU check's test phase.
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <span>
#include <vector>

#include "pipit/comm/threads.hpp"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/device_executor.cuh"
#include "pipit/cuda/nccl_communicator.cuh"
#include "pipit/schedule/gpipe.hpp"
#include "pipit/schedule/interleaved_one_f_one_b.hpp"
#include "pipit/schedule/one_f_one_b.hpp"
#include "pipit/schedule/v_half.hpp"
#include "pipit/schedule/zb_h1.hpp"
#include "pipit/schedule/zb_v.hpp"

namespace {

namespace ps = pipit::schedule;
namespace rt = pipit::runtime;

constexpr int width = 1000;  // elements per activation

__device__ __host__ inline float input_value(int mb, int i) {
  return 0.5f * __builtin_sinf(0.37f * static_cast<float>(i) + 1.3f * static_cast<float>(mb));
}
constexpr float target = 0.25f;

__global__ void load_kernel(int mb, float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = input_value(mb, i);
}
__global__ void forward_kernel(float a, float b, const float* x, float* y, float* saved_y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = tanhf(a * x[i] + b);
  if (y) y[i] = v;
  saved_y[i] = v;
}
// dz = dy (1 - y^2), dy from the next stage or, on the last, y - target; gin = a dz.
__global__ void backward_input_kernel(float a, const float* y, const float* gout, float* dz,
                                      float* gin, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float dy = gout ? gout[i] : y[i] - target;
  const float d = dy * (1.0f - y[i] * y[i]);
  dz[i] = d;
  if (gin) gin[i] = a * d;
}
__global__ void backward_weight_kernel(const float* x, const float* dz, float* ga, float* gb,
                                       int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  atomicAdd(ga, dz[i] * x[i]);
  atomicAdd(gb, dz[i]);
}

float a_of(int s) {
  return 0.6f + 0.1f * static_cast<float>(s);
}
float b_of(int s) {
  return 0.05f * static_cast<float>(s) - 0.1f;
}

// One rank's stages on the device; split backward.
class device_stage {
 public:
  using value_type = float;

  device_stage(const ps::plan& p, int rank, cudaStream_t s) : stream_(s), plan_(p) {
    stages_ = p.shp.virtual_stages();
    for (int c = 0; c < p.shp.chunks; ++c) owned_.push_back(ps::stage_of(p.place, p.shp, rank, c));
    PIPIT_CUDA_CHECK(cudaMalloc(&grads_, 2 * static_cast<std::size_t>(stages_) * sizeof(float)));
    PIPIT_CUDA_CHECK(cudaMemsetAsync(grads_, 0, 2 * stages_ * sizeof(float), stream_));
  }
  ~device_stage() { cudaFree(grads_); }

  std::size_t input_size(int) const { return width; }
  std::size_t output_size(int) const { return width; }
  std::size_t activation_size(int) const { return 2 * width; }  // y, dz

  void load_input(const rt::pass_info& i, std::span<float> x) {
    load_kernel<<<blocks(), 256, 0, stream_>>>(i.microbatch, x.data(), width);
    PIPIT_CUDA_CHECK(cudaGetLastError());
  }
  void forward(const rt::pass_info& i, std::span<const float> x, std::span<float> y,
               std::span<float> saved) {
    forward_kernel<<<blocks(), 256, 0, stream_>>>(a_of(i.stage), b_of(i.stage), x.data(),
                                                  y.empty() ? nullptr : y.data(), saved.data(),
                                                  width);
    PIPIT_CUDA_CHECK(cudaGetLastError());
  }
  void backward_input(const rt::pass_info& i, std::span<const float>, std::span<float> saved,
                      std::span<const float> gout, std::span<float> gin) {
    backward_input_kernel<<<blocks(), 256, 0, stream_>>>(
        a_of(i.stage), saved.data(), gout.empty() ? nullptr : gout.data(), saved.data() + width,
        gin.empty() ? nullptr : gin.data(), width);
    PIPIT_CUDA_CHECK(cudaGetLastError());
  }
  void backward_weight(const rt::pass_info& i, std::span<const float> x,
                       std::span<const float> saved, std::span<const float>) {
    backward_weight_kernel<<<blocks(), 256, 0, stream_>>>(
        x.data(), saved.data() + width, grads_ + 2 * i.stage, grads_ + 2 * i.stage + 1, width);
    PIPIT_CUDA_CHECK(cudaGetLastError());
  }
  // (ga, gb) per virtual stage; zero for the stages another rank holds.
  std::vector<float> gradients_on_host() const {
    std::vector<float> h(2 * static_cast<std::size_t>(stages_));
    PIPIT_CUDA_CHECK(cudaStreamSynchronize(stream_));
    PIPIT_CUDA_CHECK(
        cudaMemcpy(h.data(), grads_, h.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
  }
  const std::vector<int>& owned() const { return owned_; }
  // The data-parallel reduction's view of the gradients (device memory).
  std::span<const std::span<float>> gradients() {
    grads_view_.assign(1, std::span<float>(grads_, 2 * static_cast<std::size_t>(stages_)));
    return grads_view_;
  }

 private:
  static int blocks() { return (width + 255) / 256; }
  cudaStream_t stream_;
  const ps::plan& plan_;
  int stages_ = 0;
  std::vector<int> owned_;
  float* grads_ = nullptr;
  std::vector<std::span<float>> grads_view_;
};

// The host reference in double: (ga, gb) per virtual stage summed over the microbatches.
std::vector<double> reference(int stages, int microbatches) {
  std::vector<double> g(2 * static_cast<std::size_t>(stages), 0.0);
  for (int mb = 0; mb < microbatches; ++mb)
    for (int i = 0; i < width; ++i) {
      std::vector<double> x(static_cast<std::size_t>(stages) + 1);
      x[0] = input_value(mb, i);
      for (int s = 0; s < stages; ++s) x[s + 1] = std::tanh(a_of(s) * x[s] + b_of(s));
      double dy = x[stages] - target;
      for (int s = stages - 1; s >= 0; --s) {
        const double dz = dy * (1 - x[s + 1] * x[s + 1]);
        g[2 * s] += dz * x[s];
        g[2 * s + 1] += dz;
        dy = a_of(s) * dz;
      }
    }
  return g;
}

const pipit::cuda::nccl_options test_nccl{std::chrono::seconds(15)};

// Fewer GPUs than the case needs: the marker the GPU main's CTest rule reports as Skipped.
bool skip_unless_gpus(int need, const char* what) {
  int n = 0;
  PIPIT_CUDA_CHECK(cudaGetDeviceCount(&n));
  if (n >= need) return false;
  std::cout << "PIPIT_SKIP: " << what << " needs " << need << " GPUs; this machine has " << n
            << "\n";
  return true;
}

// Trains one step of `plan` on `devices` GPUs (one thread per rank) and checks the gradients.
void check_plan(const ps::plan& plan, std::span<const int> devices, bool remat) {
  auto comms = pipit::cuda::nccl_communicator::init_all(devices, test_nccl);
  const auto want = reference(plan.shp.virtual_stages(), plan.shp.microbatches);
  pipit::comm::threads::run(static_cast<int>(devices.size()), [&](pipit::comm::threads& host) {
    PIPIT_CUDA_CHECK(cudaSetDevice(devices[static_cast<std::size_t>(host.rank())]));
    cudaStream_t compute = nullptr;
    PIPIT_CUDA_CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
    {
      device_stage stage(plan, host.rank(), compute);
      pipit::cuda::device_executor ex(host, comms[static_cast<std::size_t>(host.rank())], stage,
                                      plan, compute, {.rematerialize = remat});
      ex.run();
      ex.synchronize();
      const auto got = stage.gradients_on_host();
      for (const int s : stage.owned())
        for (int k = 0; k < 2; ++k) {
          const double w = want[static_cast<std::size_t>(2 * s + k)];
          const double g = got[static_cast<std::size_t>(2 * s + k)];
          if (std::abs(g - w) > 1e-4 * std::max(1.0, std::abs(w)))
            pipit::fail("stage ", s, (k == 0 ? " ga " : " gb "), g, " != reference ", w);
        }
    }
    PIPIT_CUDA_CHECK(cudaStreamDestroy(compute));
  });
}

// One step of a 1-rank plan on `replicas` GPUs as data-parallel replicas of the same batch: the
// executor's average over the replicas must equal the reference (a sum would multiply it).
void check_data_parallel(const ps::plan& plan, int replicas) {
  std::vector<int> devices(static_cast<std::size_t>(replicas));
  for (int d = 0; d < replicas; ++d) devices[static_cast<std::size_t>(d)] = d;
  auto group = pipit::cuda::nccl_communicator::init_all(devices, test_nccl);
  std::vector<std::vector<pipit::cuda::nccl_communicator>> pipelines;
  for (const int d : devices)
    pipelines.push_back(pipit::cuda::nccl_communicator::init_all(std::vector<int>{d}, test_nccl));
  const auto want = reference(plan.shp.virtual_stages(), plan.shp.microbatches);
  pipit::comm::threads::run(replicas, [&](pipit::comm::threads& all) {
    const auto d = static_cast<std::size_t>(all.rank());
    pipit::comm::threads host = all.split(all.rank(), 0);
    PIPIT_CUDA_CHECK(cudaSetDevice(devices[d]));
    cudaStream_t compute = nullptr;
    PIPIT_CUDA_CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
    {
      device_stage stage(plan, 0, compute);
      pipit::cuda::device_executor ex(host, pipelines[d][0], group[d], stage, plan, compute);
      ex.run();
      ex.synchronize();
      const auto got = stage.gradients_on_host();
      for (std::size_t i = 0; i < want.size(); ++i)
        if (std::abs(got[i] - want[i]) > 1e-4 * std::max(1.0, std::abs(want[i])))
          pipit::fail("replica ", d, " gradient ", i, ": ", got[i], " != reference ", want[i]);
    }
    PIPIT_CUDA_CHECK(cudaStreamDestroy(compute));
  });
}

}  // namespace

TEST_CASE("the device executor reduces over one data-parallel replica", "[gpu][cuda]") {
  check_data_parallel(ps::make_plan<ps::one_f_one_b>({1, 4, 1}), 1);
}

TEST_CASE("the device executor averages gradients over data-parallel replicas", "[gpu][cuda]") {
  if (skip_unless_gpus(2, "2 data-parallel replicas")) return;
  int n = 0;
  PIPIT_CUDA_CHECK(cudaGetDeviceCount(&n));
  check_data_parallel(ps::make_plan<ps::one_f_one_b>({1, 4, 1}), 2);
  check_data_parallel(ps::make_plan<ps::zb_v>({1, 4, 2}), std::min(n, 4));
}

TEST_CASE("the device executor trains single-rank plans like the host reference", "[gpu][cuda]") {
  const std::vector<int> one{0};
  check_plan(ps::make_plan<ps::one_f_one_b>({1, 4, 1}), one, false);
  check_plan(ps::make_plan<ps::interleaved_one_f_one_b>({1, 4, 3}), one, false);
  check_plan(ps::make_plan<ps::zb_v>({1, 4, 2}), one, true);
}

TEST_CASE("the device executor runs a 2-GPU pipeline through NCCL", "[gpu][cuda][nccl]") {
  if (skip_unless_gpus(2, "the 2-rank pipeline (NCCL refuses two ranks on one GPU)")) return;
  const std::vector<int> two{0, 1};
  check_plan(ps::make_plan<ps::gpipe>({2, 4, 1}), two, false);
  check_plan(ps::make_plan<ps::one_f_one_b>({2, 4, 1}), two, false);
  check_plan(ps::make_plan<ps::zb_h1>({2, 4, 1}), two, false);
  check_plan(ps::make_plan<ps::interleaved_one_f_one_b>({2, 4, 2}), two, false);
  check_plan(ps::make_plan<ps::zb_v>({2, 4, 2}), two, false);
  check_plan(ps::make_plan<ps::v_half>({2, 4, 2}), two, false);
  check_plan(ps::make_plan<ps::one_f_one_b>({2, 6, 1}), two, true);
}
