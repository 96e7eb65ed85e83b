// cuda::device_executor running vocabulary plans with cuda::vocab_layers, against the host
// reference: the token-MLP model of tests/support/vocab_model.hpp (an embedding sharded over the
// vocabulary, L tanh layers applied to every token, a sharded output layer with softmax
// cross-entropy, some targets ignored and one microbatch all ignored) trained two steps (two
// batches, the same parameters: every state, slot and event is reused once) with 1F1B and V-Half
// and each of naive, two-barrier and one-barrier, on one GPU (a 1-rank pipeline: every
// collective is a real 1-rank NCCL call) and, with two or more GPUs, a 2-rank pipeline; plus
// data parallelism (1 replica everywhere; 2 replicas with 2 GPUs; 2 x 2 with 4). Cases that need
// more GPUs than the machine has print the GPU main's "PIPIT_SKIP:" marker (CTest: Skipped).
// Every NCCL communicator has a 15 s timeout (not the default 60 s): a hang fails the case
// within the GPU check's test phase.
//
// Every rank compares the objective, the valid-token count, its layers' weight and bias
// gradients and its shards' embedding and output-layer gradients with the double-precision
// reference (token_model_reference.cpp, from the same float parameters), and checks that
// padding rows got no gradient. Tolerance: 1e-4 relative to each tensor's largest magnitude
// (the loss: relative to max(1, |loss|)). Everything on the device is fp32 (cuBLAS GEMMs with
// CUBLAS_COMPUTE_32F, no TF32; fp32 statistics and accumulators): each value sums at most a few
// hundred terms (hidden 32, vocabulary 301, 24 tokens x 4 microbatches), so the expected error is
// ~1e-6; 1e-4 leaves two orders of margin for summation order (NCCL, cuBLAS, the merge of
// statistics) while a missing or doubled microbatch, shard or scale moves a gradient by >= 1/8.
//
// bfloat16 (one GPU): the layers in __nv_bfloat16 with a stage of no layers (each chunk the
// identity), so that the vocabulary passes alone carry the step: the 16-bit paths (the IF and T
// reduces as NCCL bf16 reduces, T's and one-barrier's fp32 accumulator with its event, the cast of
// the reduced dX into the bf16 arena, the bf16 broadcasts) against the double reference of the
// 0-layer model from the same bf16-rounded parameters. Tolerances as cuda_output_layer_test.cu's
// for bf16: the loss 1e-4 (fp32 statistics of inputs the reference sees exactly), gradients
// 1.5e-2 of each tensor's largest magnitude (dX is rounded to bf16 before the scatter-add: 2^-9
// per term). A missing microbatch or scale still moves them by >= 1/8.
#include <catch2/catch.hpp>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <iostream>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "pipit/comm/threads.hpp"
#include "pipit/core/math.hpp"
#include "pipit/cuda/blas_handle.cuh"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/device.cuh"
#include "pipit/cuda/device_buffer.cuh"
#include "pipit/cuda/device_executor.cuh"
#include "pipit/cuda/gemm.cuh"
#include "pipit/cuda/nccl_communicator.cuh"
#include "pipit/cuda/vocab_layers.cuh"
#include "pipit/schedule/v_half.hpp"
#include "pipit/schedule/vocab_passes.hpp"
#include "token_model_reference.hpp"

namespace {

namespace ps = pipit::schedule;
namespace rt = pipit::runtime;
namespace pc = pipit::cuda;
namespace v = pipit::vocab;
using pipit_test::token_model;

constexpr double tolerance = 1e-4;
constexpr double bf16_loss_tolerance = 1e-4, bf16_grad_tolerance = 1.5e-2;
using bf16 = __nv_bfloat16;

// Bounded well inside the GPU check's test phase (ctest --timeout 100).
const pc::nccl_options test_nccl{std::chrono::seconds(15)};

// Fewer GPUs than the case needs: the marker the GPU main's CTest rule reports as Skipped (never
// printed by a case that has already checked something, which the marker would hide).
bool skip_unless_gpus(int need, const char* what) {
  const int n = pc::device_count();
  if (n >= need) return false;
  std::cout << "PIPIT_SKIP: " << what << " needs " << need << " GPUs; this machine has " << n
            << "\n";
  return true;
}

template <class T>
pc::device_buffer<T> upload(const std::vector<T>& h, cudaStream_t s) {
  pc::device_buffer<T> d(h.size(), s);
  if (!h.empty())
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(d.data(), h.data(), d.bytes(), cudaMemcpyHostToDevice, s));
  PIPIT_CUDA_CHECK(cudaStreamSynchronize(s));
  return d;
}
template <class T>
std::vector<T> download(const T* d, std::size_t n, cudaStream_t s) {
  std::vector<T> h(n);
  if (n > 0)
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost, s));
  PIPIT_CUDA_CHECK(cudaStreamSynchronize(s));
  return h;
}

// y[t, j] = tanh(y[t, j] + b[j]).
__global__ void bias_tanh(float* y, const float* b, int rows, int cols) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < rows * cols) y[i] = tanhf(y[i] + b[i % cols]);
}
// dz = dy (1 - y^2).
__global__ void tanh_backward(const float* dy, const float* y, float* dz, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) dz[i] = dy[i] * (1.f - y[i] * y[i]);
}
// gb[j] += sum_t dz[t, j] (one thread per column: a fixed order).
__global__ void column_sums_add(const float* dz, float* gb, int rows, int cols) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  float s = 0.f;
  for (int t = 0; t < rows; ++t) s += dz[t * cols + j];
  gb[j] += s;
}

// One rank's layers on the device (split backward): chunk c holds the layers
// even_split(layers, virtual stages, its stage), Y = tanh(X W^T + b) per layer, saving Y, dZ and
// dX per layer as the host token_mlp_stage does.
class device_token_stage {
 public:
  using value_type = float;

  device_token_stage(const token_model& m, const ps::plan& p, int rank, const pc::blas_handle& blas,
                     cudaStream_t s)
      : m_(m), blas_(&blas), s_(s) {
    for (int c = 0; c < p.shp.chunks; ++c) {
      const int st = ps::stage_of(p.place, p.shp, rank, c);
      const auto r = pipit::even_split(m.layers, p.shp.virtual_stages(), st);
      chunks_.push_back({r.begin, r.end});
      for (int l = r.begin; l < r.end; ++l) {
        layer x;
        x.index = l;
        x.w = upload(pipit_test::token_layer_weight(m, l), s);
        x.b = upload(pipit_test::token_layer_bias(m, l), s);
        x.gw = pc::device_buffer<float>(x.w.size(), s);
        x.gb = pc::device_buffer<float>(x.b.size(), s);
        x.gw.zero();
        x.gb.zero();
        layers_.push_back(std::move(x));
      }
    }
    for (layer& x : layers_) {
      grads_.push_back(x.gw.span());
      grads_.push_back(x.gb.span());
    }
  }

  std::size_t input_size(int) const { return block(); }
  std::size_t output_size(int) const { return block(); }
  std::size_t activation_size(int c) const {
    const auto& ch = chunks_[static_cast<std::size_t>(c)];
    return 3 * block() * static_cast<std::size_t>(ch.l1 - ch.l0);
  }

  void forward(const rt::pass_info& i, std::span<const float> in, std::span<float> out,
               std::span<float> saved) {
    const chunk& ch = chunks_[static_cast<std::size_t>(i.chunk)];
    if (ch.l0 == ch.l1) {
      copy(in.data(), out.data());
      return;
    }
    for (int l = ch.l0; l < ch.l1; ++l) {
      float* y = slot(saved, ch, l, 0);
      pc::gemm_abt<float>(*blas_, s_, m_.tokens, m_.hidden, m_.hidden,
                          layer_input(in, saved, ch, l), m_.hidden, at(l).w.data(), m_.hidden, 0.f,
                          y, m_.hidden);
      bias_tanh<<<blocks(), 256, 0, s_>>>(y, at(l).b.data(), m_.tokens, m_.hidden);
      PIPIT_CUDA_CHECK(cudaGetLastError());
    }
    if (!out.empty()) copy(slot(saved, ch, ch.l1 - 1, 0), out.data());
  }

  void backward_input(const rt::pass_info& i, std::span<const float>, std::span<float> saved,
                      std::span<const float> gout, std::span<float> gin) {
    const chunk& ch = chunks_[static_cast<std::size_t>(i.chunk)];
    if (ch.l0 == ch.l1) {
      if (!gin.empty()) copy(gout.data(), gin.data());
      return;
    }
    for (int l = ch.l1 - 1; l >= ch.l0; --l) {
      const float* dy = l == ch.l1 - 1 ? gout.data() : slot(saved, ch, l + 1, 2);
      float* dz = slot(saved, ch, l, 1);
      tanh_backward<<<blocks(), 256, 0, s_>>>(dy, slot(saved, ch, l, 0), dz,
                                              static_cast<int>(block()));
      PIPIT_CUDA_CHECK(cudaGetLastError());
      float* dx = slot(saved, ch, l, 2);
      pc::gemm_ab<float>(*blas_, s_, m_.tokens, m_.hidden, m_.hidden, dz, m_.hidden, at(l).w.data(),
                         m_.hidden, 0.f, dx, m_.hidden);
      if (l == ch.l0 && !gin.empty()) copy(dx, gin.data());
    }
  }

  void backward_weight(const rt::pass_info& i, std::span<const float> in,
                       std::span<const float> saved, std::span<const float>) {
    const chunk& ch = chunks_[static_cast<std::size_t>(i.chunk)];
    const std::span<float> s(const_cast<float*>(saved.data()), saved.size());
    for (int l = ch.l0; l < ch.l1; ++l) {
      const float* dz = slot(s, ch, l, 1);
      pc::gemm_atb<float>(*blas_, s_, m_.hidden, m_.hidden, m_.tokens, dz, m_.hidden,
                          layer_input(in, s, ch, l), m_.hidden, 1.f, at(l).gw.data(), m_.hidden);
      column_sums_add<<<(m_.hidden + 127) / 128, 128, 0, s_>>>(dz, at(l).gb.data(), m_.tokens,
                                                               m_.hidden);
      PIPIT_CUDA_CHECK(cudaGetLastError());
    }
  }

  // Device spans of every held layer's weight and bias gradients (the data-parallel reduce).
  std::span<const std::span<float>> gradients() { return grads_; }

  void zero_gradients() {
    for (layer& x : layers_) {
      x.gw.zero();
      x.gb.zero();
    }
  }
  // (layer, weight gradient, bias gradient) of every held layer, after a synchronisation.
  struct host_grads {
    int layer;
    std::vector<float> gw, gb;
  };
  std::vector<host_grads> gradients_on_host() const {
    std::vector<host_grads> out;
    for (const layer& x : layers_)
      out.push_back({x.index, download(x.gw.data(), x.gw.size(), s_),
                     download(x.gb.data(), x.gb.size(), s_)});
    return out;
  }

 private:
  struct chunk {
    int l0, l1;
  };
  struct layer {
    int index = 0;
    pc::device_buffer<float> w, b, gw, gb;
  };
  std::size_t block() const {
    return static_cast<std::size_t>(m_.tokens) * static_cast<std::size_t>(m_.hidden);
  }
  unsigned blocks() const { return static_cast<unsigned>((block() + 255) / 256); }
  layer& at(int l) {
    for (layer& x : layers_)
      if (x.index == l) return x;
    pipit::fail("layer ", l, " is not on this rank");
  }
  float* slot(std::span<float> saved, const chunk& ch, int l, int k) const {
    return saved.data() +
           (3 * static_cast<std::size_t>(l - ch.l0) + static_cast<std::size_t>(k)) * block();
  }
  const float* layer_input(std::span<const float> in, std::span<float> saved, const chunk& ch,
                           int l) const {
    return l == ch.l0 ? in.data() : slot(saved, ch, l - 1, 0);
  }
  void copy(const float* from, float* to) {
    PIPIT_CUDA_CHECK(
        cudaMemcpyAsync(to, from, block() * sizeof(float), cudaMemcpyDeviceToDevice, s_));
  }

  token_model m_;
  const pc::blas_handle* blas_;
  cudaStream_t s_;
  std::vector<chunk> chunks_;
  std::vector<layer> layers_;
  std::vector<std::span<float>> grads_;
};

// max |got - want| / max |want| over the elements.
double rel_error(std::span<const float> got, std::span<const double> want) {
  double scale = 1e-300, worst = 0;
  for (const double w : want) scale = std::max(scale, std::abs(w));
  for (std::size_t i = 0; i < want.size(); ++i)
    worst = std::max(worst, std::abs(static_cast<double>(got[i]) - want[i]));
  return worst / scale;
}

// The reference one replica's step should match: the average over the data-parallel replicas'
// batches of their gradients (the executor's default gradient_reduction::average); the loss
// and count are the replica's own.
pipit_test::token_step expected(const token_model& m, int microbatches, int replicas, int replica,
                                int step) {
  const auto index = [&](int d) { return static_cast<std::uint64_t>(100 * d + step); };
  pipit_test::token_step out = pipit_test::token_reference(m, microbatches, index(0));
  for (int d = 1; d < replicas; ++d) {
    const auto r = pipit_test::token_reference(m, microbatches, index(d));
    for (std::size_t i = 0; i < out.ge.size(); ++i) out.ge[i] += r.ge[i];
    for (std::size_t i = 0; i < out.gh.size(); ++i) out.gh[i] += r.gh[i];
    for (std::size_t l = 0; l < out.gw.size(); ++l) {
      for (std::size_t i = 0; i < out.gw[l].size(); ++i) out.gw[l][i] += r.gw[l][i];
      for (std::size_t i = 0; i < out.gb[l].size(); ++i) out.gb[l][i] += r.gb[l][i];
    }
  }
  const auto avg = [&](std::vector<double>& x) {
    for (double& e : x) e /= replicas;
  };
  avg(out.ge);
  avg(out.gh);
  for (auto& x : out.gw) avg(x);
  for (auto& x : out.gb) avg(x);
  const auto own = pipit_test::token_reference(m, microbatches, index(replica));
  out.loss = own.loss;
  out.valid = own.valid;
  return out;
}

// One rank (pipeline rank r of replica d) trains two steps and returns its largest error
// (1 for a wrong count or a gradient in a padding row).
template <class Alg>
double train_rank(pipit::comm::threads& host, pc::nccl_communicator& pipeline,
                  pc::nccl_communicator* data_parallel, const ps::plan& plan, const token_model& m,
                  int replicas, int replica) {
  const int r = host.rank();
  PIPIT_CUDA_CHECK(cudaSetDevice(pipeline.device()));
  cudaStream_t compute = nullptr;
  PIPIT_CUDA_CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
  double worst = 0;
  {
    const pc::blas_handle blas;
    device_token_stage stage(m, plan, r, blas, compute);
    const v::vocab_shards shards(m.vocab, plan.rank_count());
    const auto real = shards.real_range_of(r);
    const std::int64_t rows = shards.shard_size(), n = real.size(), h = m.hidden;
    const auto shard_of = [&](const std::vector<float>& full) {
      std::vector<float> s(static_cast<std::size_t>(rows * h), 0.f);  // padding rows: zero
      std::copy(full.begin() + real.begin * h, full.begin() + (real.begin + n) * h, s.begin());
      return s;
    };
    const auto e = upload(shard_of(pipit_test::token_embedding(m)), compute);
    const auto w = upload(shard_of(pipit_test::token_head(m)), compute);
    pc::device_buffer<float> ge(e.size(), compute), gh(w.size(), compute);
    ge.zero();
    gh.zero();
    pc::vocab_layers<Alg, float, 64> vocab(blas, compute, shards, r, m.tokens, {e.data(), rows, h},
                                           {ge.data(), rows, h}, {w.data(), rows, h},
                                           {gh.data(), rows, h});
    const auto run = [&](auto& ex) {
      for (int step = 0; step < 2; ++step) {
        const auto batch = pipit_test::token_batch(
            m, plan.shp.microbatches, static_cast<std::uint64_t>(100 * replica + step));
        vocab.set_batch(batch.tokens, batch.targets);
        ex.run();
        ex.synchronize();  // NCCL errors and timeouts surface here, on every rank
        const v::loss_result<float> loss = vocab.loss();
        const auto want = expected(m, plan.shp.microbatches, replicas, replica, step);
        worst = std::max(worst, std::abs(static_cast<double>(loss.loss) - want.loss) /
                                    std::max(1.0, std::abs(want.loss)));
        if (loss.tokens != want.valid) worst = std::max(worst, 1.0);
        for (const auto& g : stage.gradients_on_host()) {
          const auto l = static_cast<std::size_t>(g.layer);
          worst = std::max({worst, rel_error(g.gw, want.gw[l]), rel_error(g.gb, want.gb[l])});
        }
        const auto hge = download(ge.data(), ge.size(), compute);
        const auto hgh = download(gh.data(), gh.size(), compute);
        const auto scale = [](const std::vector<double>& x) {
          double s = 1e-300;
          for (const double a : x) s = std::max(s, std::abs(a));
          return s;
        };
        const double se = scale(want.ge), sh = scale(want.gh);
        for (std::int64_t i = 0; i < rows * h; ++i) {
          const auto iu = static_cast<std::size_t>(i);
          if (i < n * h) {
            const auto g = static_cast<std::size_t>(real.begin * h + i);
            worst = std::max(
                {worst, std::abs(hge[iu] - want.ge[g]) / se, std::abs(hgh[iu] - want.gh[g]) / sh});
          } else if (hge[iu] != 0.f || hgh[iu] != 0.f) {
            worst = std::max(worst, 1.0);
          }
        }
        stage.zero_gradients();
        ge.zero();
        gh.zero();
      }
    };
    if (data_parallel) {
      pc::device_executor ex(host, pipeline, *data_parallel, stage, vocab, plan, compute);
      run(ex);
    } else {
      pc::device_executor ex(host, pipeline, stage, vocab, plan, compute);
      run(ex);
    }
    PIPIT_CUDA_CHECK(cudaStreamSynchronize(compute));
  }
  PIPIT_CUDA_CHECK(cudaStreamDestroy(compute));
  return worst;
}

// Trains `plan` on replicas x plan.rank_count() GPUs (devices 0, 1, ...; replica d's pipeline
// rank r on device d * ranks + r), one host thread per rank; returns the largest error.
template <class Alg>
double train(const ps::plan& plan, int replicas, bool with_data_parallel) {
  const int p = plan.rank_count(), world = p * replicas;
  const token_model m;
  std::vector<std::vector<pc::nccl_communicator>> pipelines, groups;
  for (int d = 0; d < replicas; ++d) {
    std::vector<int> devs;
    for (int r = 0; r < p; ++r) devs.push_back(d * p + r);
    pipelines.push_back(pc::nccl_communicator::init_all(devs, test_nccl));
  }
  if (with_data_parallel)
    for (int r = 0; r < p; ++r) {
      std::vector<int> devs;
      for (int d = 0; d < replicas; ++d) devs.push_back(d * p + r);
      groups.push_back(pc::nccl_communicator::init_all(devs, test_nccl));
    }
  std::vector<double> worst(static_cast<std::size_t>(world), 0.0);
  pipit::comm::threads::run(world, [&](pipit::comm::threads& all) {
    const int d = all.rank() / p, r = all.rank() % p;
    pipit::comm::threads host = all.split(d, r);
    pc::nccl_communicator* dp =
        with_data_parallel ? &groups[static_cast<std::size_t>(r)][static_cast<std::size_t>(d)]
                           : nullptr;
    worst[static_cast<std::size_t>(all.rank())] =
        train_rank<Alg>(host, pipelines[static_cast<std::size_t>(d)][static_cast<std::size_t>(r)],
                        dp, plan, m, replicas, d);
  });
  return *std::max_element(worst.begin(), worst.end());
}

template <class Alg>
void every_schedule(int ranks) {
  for (const char* schedule : {"1f1b", "v-half"}) {
    const bool v = std::string_view(schedule) == "v-half";
    const ps::shape s{ranks, 4, v ? 2 : 1};
    if (v) REQUIRE(ps::v_half::check(s) == ps::shape_rule::ok);
    const ps::plan plan = ps::make_vocab_plan(schedule, s, pc::vocab_passes_of<Alg>);
    INFO(schedule << " on " << ranks << " rank(s), " << ps::name(plan.vocab));
    CHECK(train<Alg>(plan, 1, false) <= tolerance);
  }
}

// A stage of no layers in T: every chunk passes its input on and its output gradient back.
template <class T>
class device_identity_stage {
 public:
  using value_type = T;

  device_identity_stage(std::size_t block, cudaStream_t s) : block_(block), s_(s) {}

  std::size_t input_size(int) const { return block_; }
  std::size_t output_size(int) const { return block_; }
  std::size_t activation_size(int) const { return 0; }

  void forward(const rt::pass_info&, std::span<const T> in, std::span<T> out, std::span<T>) {
    copy(in, out);
  }
  void backward_input(const rt::pass_info&, std::span<const T>, std::span<T>,
                      std::span<const T> gout, std::span<T> gin) {
    copy(gout, gin);
  }
  void backward_weight(const rt::pass_info&, std::span<const T>, std::span<const T>,
                       std::span<const T>) {}

 private:
  void copy(std::span<const T> from, std::span<T> to) {
    if (to.empty()) return;
    if (from.size() != to.size())
      pipit::fail("identity stage: ", from.size(), " elements in, ", to.size(), " out");
    PIPIT_CUDA_CHECK(
        cudaMemcpyAsync(to.data(), from.data(), to.size_bytes(), cudaMemcpyDeviceToDevice, s_));
  }

  std::size_t block_;
  cudaStream_t s_;
};

struct errors {
  double loss = 0, grad = 0;
};

// Trains a 1-rank vocabulary plan two steps with bfloat16 layers and the identity stage on GPU 0;
// returns the largest loss and gradient errors (1 for a wrong count, a gradient in a padding row
// or microbatch losses whose mean is not the objective).
template <class Alg>
errors train_bf16(const ps::plan& plan) {
  token_model m;
  m.layers = 0;
  m.bf16_parameters = true;
  auto comms = pc::nccl_communicator::init_all(std::vector<int>{0}, test_nccl);
  errors worst;
  pipit::comm::threads::run(1, [&](pipit::comm::threads& host) {
    PIPIT_CUDA_CHECK(cudaSetDevice(0));
    cudaStream_t compute = nullptr;
    PIPIT_CUDA_CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
    {
      const pc::blas_handle blas;
      const std::int64_t h = m.hidden;
      device_identity_stage<bf16> stage(static_cast<std::size_t>(m.tokens * h), compute);
      const v::vocab_shards shards(m.vocab, 1);
      const std::int64_t rows = shards.shard_size();
      const auto held = [&](const std::vector<float>& full) {  // exact: already bf16 values
        std::vector<bf16> out(static_cast<std::size_t>(rows * h), __float2bfloat16(0.f));
        for (std::size_t i = 0; i < full.size(); ++i) out[i] = __float2bfloat16(full[i]);
        return out;
      };
      const auto e = upload(held(pipit_test::token_embedding(m)), compute);
      const auto w = upload(held(pipit_test::token_head(m)), compute);
      pc::device_buffer<float> ge(e.size(), compute), gh(w.size(), compute);
      ge.zero();
      gh.zero();
      pc::vocab_layers<Alg, bf16, 64> vocab(blas, compute, shards, 0, m.tokens, {e.data(), rows, h},
                                            {ge.data(), rows, h}, {w.data(), rows, h},
                                            {gh.data(), rows, h});
      pc::device_executor ex(host, comms[0], stage, vocab, plan, compute);
      for (int step = 0; step < 2; ++step) {
        const auto batch =
            pipit_test::token_batch(m, plan.shp.microbatches, static_cast<std::uint64_t>(step));
        vocab.set_batch(batch.tokens, batch.targets);
        ex.run();
        ex.synchronize();
        const v::loss_result<float> loss = vocab.loss();
        const auto want =
            pipit_test::token_reference(m, plan.shp.microbatches, static_cast<std::uint64_t>(step));
        worst.loss = std::max(worst.loss, std::abs(static_cast<double>(loss.loss) - want.loss) /
                                              std::max(1.0, std::abs(want.loss)));
        if (loss.tokens != want.valid) worst.grad = std::max(worst.grad, 1.0);
        const std::vector<double> per = vocab.microbatch_losses();
        double mean = 0;
        for (const double x : per) mean += x / static_cast<double>(per.size());
        if (static_cast<int>(per.size()) != plan.shp.microbatches ||
            std::abs(mean - loss.loss) > 1e-6 * std::max(1.0, std::abs(want.loss)))
          worst.loss = std::max(worst.loss, 1.0);
        const auto hge = download(ge.data(), ge.size(), compute);
        const auto hgh = download(gh.data(), gh.size(), compute);
        std::vector<float> real_ge(want.ge.size()), real_gh(want.gh.size());
        for (std::size_t i = 0; i < hge.size(); ++i) {
          if (i < want.ge.size()) {
            real_ge[i] = hge[i];
            real_gh[i] = hgh[i];
          } else if (hge[i] != 0.f || hgh[i] != 0.f) {
            worst.grad = std::max(worst.grad, 1.0);  // a padding row got a gradient
          }
        }
        worst.grad =
            std::max({worst.grad, rel_error(real_ge, want.ge), rel_error(real_gh, want.gh)});
        ge.zero();
        gh.zero();
      }
    }
    PIPIT_CUDA_CHECK(cudaStreamSynchronize(compute));
    PIPIT_CUDA_CHECK(cudaStreamDestroy(compute));
  });
  return worst;
}

template <class Alg>
void every_schedule_bf16() {
  for (const char* schedule : {"1f1b", "v-half"}) {
    const bool v = std::string_view(schedule) == "v-half";
    const ps::plan plan =
        ps::make_vocab_plan(schedule, {1, 4, v ? 2 : 1}, pc::vocab_passes_of<Alg>);
    INFO(schedule << " on 1 rank, bfloat16, " << ps::name(plan.vocab));
    const errors e = train_bf16<Alg>(plan);
    CHECK(e.loss <= bf16_loss_tolerance);
    CHECK(e.grad <= bf16_grad_tolerance);
  }
}

}  // namespace

TEST_CASE("the device executor runs vocabulary plans on one GPU like the host reference",
          "[gpu][cuda][nccl][vocab]") {
  every_schedule<v::naive>(1);
  every_schedule<v::two_barrier>(1);
  every_schedule<v::one_barrier>(1);
}

TEST_CASE("the device executor runs bfloat16 vocabulary layers on one GPU like the host reference",
          "[gpu][cuda][nccl][vocab]") {
  every_schedule_bf16<v::naive>();
  every_schedule_bf16<v::two_barrier>();
  every_schedule_bf16<v::one_barrier>();
}

TEST_CASE("the device executor runs vocabulary plans on a 2-GPU pipeline like the host reference",
          "[gpu][cuda][nccl][vocab]") {
  if (skip_unless_gpus(2, "the 2-rank pipeline (NCCL refuses two ranks on one GPU)")) return;
  every_schedule<v::naive>(2);
  every_schedule<v::two_barrier>(2);
  every_schedule<v::one_barrier>(2);
}

TEST_CASE("the device executor reduces over one data-parallel replica without changing a gradient",
          "[gpu][cuda][nccl][vocab]") {
  // The reduction runs (a 1-rank NCCL all-reduce; the average's scaling is skipped for n = 1).
  CHECK(train<v::two_barrier>(ps::make_vocab_plan("1f1b", {1, 4, 1}, ps::vocab_passes::two_barrier),
                              1, true) <= tolerance);
}

TEST_CASE("the device executor averages gradients over 2 data-parallel replicas",
          "[gpu][cuda][nccl][vocab]") {
  if (skip_unless_gpus(2, "2 data-parallel replicas")) return;
  CHECK(train<v::one_barrier>(ps::make_vocab_plan("1f1b", {1, 4, 1}, ps::vocab_passes::one_barrier),
                              2, true) <= tolerance);
}

TEST_CASE("the device executor runs 2 x 2 pipeline and data parallelism",
          "[gpu][cuda][nccl][vocab]") {
  if (skip_unless_gpus(4, "2 x 2 (pipeline x data parallel)")) return;
  CHECK(train<v::two_barrier>(
            ps::make_vocab_plan("v-half", {2, 4, 2}, ps::vocab_passes::two_barrier), 2, true) <=
        tolerance);
}
