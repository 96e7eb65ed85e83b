// cuda::layer_offload against an all-resident run on the same device: a stack of layers
// y = tanh(W x + b) (W d×d, b d, B rows; one thread per output or weight element, fixed
// summation order, so every run computes the same bits), loss 0.5·Σ y², trained over two
// microbatches. The offloaded outputs and the host-accumulated gradients must equal the
// resident run's bitwise for several (k, k'), which also exercises the copy stream's ordering
// (a slot is overwritten only after the kernels that read it, gradients leave before the slot is
// reused). Host-side parameter checks run without a device.
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "pipit/cuda/check.cuh"
#include "pipit/cuda/layer_offload.cuh"

namespace {

constexpr int d = 48, rows = 8, layers = 6;
constexpr std::size_t params = std::size_t(d) * d + d;

__global__ void forward_kernel(const float* w, const float* x, float* y) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= rows * d) return;
  const int r = t / d, i = t % d;
  float acc = w[d * d + i];
  for (int j = 0; j < d; ++j) acc += w[i * d + j] * x[r * d + j];
  y[t] = tanhf(acc);
}

// dz = dy·(1 − y²); dW[i][j] += Σ_r dz[r][i]·x[r][j]; db[i] += Σ_r dz[r][i]; dx = dz·W.
__global__ void weight_grad_kernel(const float* x, const float* y, const float* dy, float* g) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= d * d + d) return;
  float acc = 0;
  if (t < d * d) {
    const int i = t / d, j = t % d;
    for (int r = 0; r < rows; ++r)
      acc += dy[r * d + i] * (1 - y[r * d + i] * y[r * d + i]) * x[r * d + j];
  } else {
    const int i = t - d * d;
    for (int r = 0; r < rows; ++r) acc += dy[r * d + i] * (1 - y[r * d + i] * y[r * d + i]);
  }
  g[t] += acc;
}

__global__ void input_grad_kernel(const float* w, const float* y, const float* dy, float* dx) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= rows * d) return;
  const int r = t / d, j = t % d;
  float acc = 0;
  for (int i = 0; i < d; ++i)
    acc += dy[r * d + i] * (1 - y[r * d + i] * y[r * d + i]) * w[i * d + j];
  dx[t] = acc;
}

int blocks_for(int n) {
  return (n + 127) / 128;
}

std::vector<std::vector<float>> make_weights() {
  std::mt19937 gen(3);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<std::vector<float>> w(layers, std::vector<float>(params));
  for (auto& l : w)
    for (auto& v : l) v = u(gen) * 1.5f / std::sqrt(float(d));
  return w;
}

struct result {
  std::vector<float> outputs;
  std::vector<std::vector<float>> grads;
};

// Activations live on the device for the whole step; weights come from `weights_of(l)`.
template <class RunForward, class RunBackward>
result train(RunForward&& run_forward, RunBackward&& run_backward, cudaStream_t s) {
  result res;
  res.grads.assign(layers, std::vector<float>(params, 0.f));
  float* acts = nullptr;
  float *dy = nullptr, *dx = nullptr;
  PIPIT_CUDA_CHECK(cudaMalloc(&acts, sizeof(float) * rows * d * (layers + 1)));
  PIPIT_CUDA_CHECK(cudaMalloc(&dy, sizeof(float) * rows * d));
  PIPIT_CUDA_CHECK(cudaMalloc(&dx, sizeof(float) * rows * d));
  auto act = [&](int l) { return acts + std::size_t(l) * rows * d; };
  for (int mb = 0; mb < 2; ++mb) {
    std::mt19937 gen(10 + mb);
    std::uniform_real_distribution<float> u(-1, 1);
    std::vector<float> in(rows * d);
    for (auto& v : in) v = u(gen);
    PIPIT_CUDA_CHECK(
        cudaMemcpyAsync(act(0), in.data(), in.size() * sizeof(float), cudaMemcpyHostToDevice, s));
    run_forward([&](int l, const float* w, cudaStream_t st) {
      forward_kernel<<<blocks_for(rows * d), 128, 0, st>>>(w, act(l), act(l + 1));
    });
    std::vector<float> out(rows * d);
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(out.data(), act(layers), out.size() * sizeof(float),
                                     cudaMemcpyDeviceToHost, s));
    PIPIT_CUDA_CHECK(cudaStreamSynchronize(s));
    res.outputs.insert(res.outputs.end(), out.begin(), out.end());
    PIPIT_CUDA_CHECK(
        cudaMemcpyAsync(dy, act(layers), out.size() * sizeof(float), cudaMemcpyDeviceToDevice, s));
    run_backward(res.grads, [&](int l, const float* w, float* g, cudaStream_t st) {
      weight_grad_kernel<<<blocks_for(int(params)), 128, 0, st>>>(act(l), act(l + 1), dy, g);
      input_grad_kernel<<<blocks_for(rows * d), 128, 0, st>>>(w, act(l + 1), dy, dx);
      std::swap(dy, dx);
    });
  }
  PIPIT_CUDA_CHECK(cudaStreamSynchronize(s));
  cudaFree(acts);
  cudaFree(dy);
  cudaFree(dx);
  return res;
}

}  // namespace

TEST_CASE("cuda layer_offload training equals the all-resident run bitwise", "[gpu][cuda]") {
  auto weights = make_weights();
  pipit::cuda::stream s;

  // Reference: every layer resident; per layer a zeroed gradient, added into the host total.
  std::vector<float*> dev_w(layers), dev_g(layers);
  for (int l = 0; l < layers; ++l) {
    PIPIT_CUDA_CHECK(cudaMalloc(&dev_w[l], params * sizeof(float)));
    PIPIT_CUDA_CHECK(cudaMalloc(&dev_g[l], params * sizeof(float)));
    PIPIT_CUDA_CHECK(
        cudaMemcpy(dev_w[l], weights[l].data(), params * sizeof(float), cudaMemcpyHostToDevice));
  }
  const result ref = train(
      [&](auto&& f) {
        for (int l = 0; l < layers; ++l) f(l, dev_w[l], s.get());
      },
      [&](std::vector<std::vector<float>>& grads, auto&& g) {
        for (int l = layers - 1; l >= 0; --l) {
          PIPIT_CUDA_CHECK(cudaMemsetAsync(dev_g[l], 0, params * sizeof(float), s.get()));
          g(l, dev_w[l], dev_g[l], s.get());
          std::vector<float> tmp(params);
          PIPIT_CUDA_CHECK(cudaMemcpyAsync(tmp.data(), dev_g[l], params * sizeof(float),
                                           cudaMemcpyDeviceToHost, s.get()));
          PIPIT_CUDA_CHECK(cudaStreamSynchronize(s.get()));
          for (std::size_t i = 0; i < params; ++i) grads[l][i] += tmp[i];
        }
      },
      s.get());
  for (int l = 0; l < layers; ++l) {
    cudaFree(dev_w[l]);
    cudaFree(dev_g[l]);
  }

  const std::pair<int, int> cases[] = {{1, 1}, {2, 1}, {2, 2}, {3, 2}, {4, 1}, {6, 3}};
  for (auto [k, kp] : cases) {
    INFO("k = " << k << ", k' = " << kp);
    std::vector<std::span<const float>> host(weights.begin(), weights.end());
    pipit::cuda::layer_offload<float> off(host, {.resident = k, .swap = kp});
    const result got = train(
        [&](auto&& f) {
          off.forward(s.get(),
                      [&](int l, const float* w, std::size_t, cudaStream_t st) { f(l, w, st); });
        },
        [&](std::vector<std::vector<float>>& grads, auto&& g) {
          std::vector<std::span<float>> gs(grads.begin(), grads.end());
          off.backward(s.get(), std::span<const std::span<float>>(gs),
                       [&](int l, const float* w, float* gr, std::size_t, cudaStream_t st) {
                         g(l, w, gr, st);
                       });
        },
        s.get());
    REQUIRE(got.outputs.size() == ref.outputs.size());
    CHECK(std::memcmp(got.outputs.data(), ref.outputs.data(), ref.outputs.size() * sizeof(float)) ==
          0);
    for (int l = 0; l < layers; ++l) {
      INFO("layer " << l);
      CHECK(std::memcmp(got.grads[l].data(), ref.grads[l].data(), params * sizeof(float)) == 0);
    }
    const std::size_t ke = std::size_t(std::min(k, layers));
    CHECK(off.d2h_transfers() == 2 * std::size_t(layers));
    CHECK(off.h2d_transfers() == 2 * (2 * std::size_t(layers) - ke));
  }
}

TEST_CASE("cuda layer_offload refuses bad k, k' and a capacity too small", "[cuda]") {
  std::vector<float> w(params);
  std::vector<std::span<const float>> host(3, std::span<const float>(w));
  using off = pipit::cuda::layer_offload<float>;
  CHECK_THROWS_WITH(off(host, {.resident = 0, .swap = 1}), Catch::Contains("k = 0"));
  CHECK_THROWS_WITH(off(host, {.resident = 2, .swap = 3}),
                    Catch::Contains("k' = 3 > resident layers k = 2"));
  CHECK_THROWS_WITH(off(host, {.resident = 2, .swap = 1}, params * sizeof(float)),
                    Catch::Contains("capacity too small") && Catch::Contains("k = 2"));
}
