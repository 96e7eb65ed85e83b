// The CUDA vocabulary-parallel output layer (pipit/cuda/output_layer.cuh) on one rank holding a
// V/p-row shard, bf16 inputs, one microbatch's S + T passes (no collectives: they are the
// communicator's business), against
//   unfused         the same math with the tokens x (V/p) logits materialised once (fp32) and
//                   the logit gradient held whole (bf16): three GEMMs, no recomputation, as a
//                   framework's LM head + cross-entropy runs when nothing is fused;
//   gemms_fused     the bare cuBLAS GEMMs the fused layer issues, chunk by chunk, with nothing
//                   between them (logits twice, dW, and dX or the accumulator): the floor of
//                   the fused implementation;
//   gemms_minimal   the three unchunked GEMMs any implementation needs (logits, dW, dX).
// Times are device times between CUDA events (manual time), after one warm-up run. Counters:
// extra_MiB = peak bytes of the stream-ordered pool above what inputs and outputs occupy
// (cudaMemPoolAttrUsedMemHigh); TFLOPs = useful GEMM work (6 T h V, the minimal three GEMMs) per
// second. Without a CUDA device the program says so and exits 0.
//
// Run: build/<dir>/bench/bench_cuda_vocab --benchmark_out=vocab.json --benchmark_out_format=json

#include <benchmark/benchmark.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "pipit/cuda/blas_handle.cuh"
#include "pipit/cuda/device.cuh"
#include "pipit/cuda/device_buffer.cuh"
#include "pipit/cuda/gemm.cuh"
#include "pipit/cuda/launch.cuh"
#include "pipit/cuda/output_layer.cuh"
#include "pipit/cuda/stream.cuh"

namespace {

namespace v = pipit::vocab;
namespace pc = pipit::cuda;
using i64 = std::int64_t;
using bf16 = __nv_bfloat16;

constexpr i64 tokens = 8192, hidden = 4096;
constexpr std::size_t chunk = pc::default_chunk;

__global__ void fill_random(bf16* p, std::size_t n, float scale, unsigned seed) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = __float2bfloat16(scale * (static_cast<float>(h & 0xffff) / 32768.f - 1.f));
  }
}

// Inputs and outputs of one rank, allocated once per shard size.
struct problem {
  i64 rows;
  pc::stream s;
  pc::blas_handle blas;
  pc::device_buffer<bf16> x, w;
  pc::device_buffer<i64> targets;
  pc::device_buffer<float> dx, dw, g;
  explicit problem(i64 r)
      : rows(r),
        x(static_cast<std::size_t>(tokens * hidden), s),
        w(static_cast<std::size_t>(r * hidden), s),
        targets(static_cast<std::size_t>(tokens), s),
        dx(static_cast<std::size_t>(tokens * hidden), s),
        dw(static_cast<std::size_t>(r * hidden), s),
        g(static_cast<std::size_t>(tokens), s) {
    fill_random<<<1024, 256, 0, s>>>(x.data(), x.size(), 1.f, 1u);
    fill_random<<<1024, 256, 0, s>>>(w.data(), w.size(), 0.03f, 2u);
    PIPIT_CUDA_CHECK(cudaGetLastError());
    std::vector<i64> t(static_cast<std::size_t>(tokens));
    std::mt19937_64 rng(3);
    for (i64& y : t) y = static_cast<i64>(rng() % static_cast<std::uint64_t>(r));
    PIPIT_CUDA_CHECK(
        cudaMemcpyAsync(targets.data(), t.data(), targets.bytes(), cudaMemcpyHostToDevice, s));
    dw.zero();
    s.synchronize();
  }
  v::vocab_shards shards() const { return v::vocab_shards(rows, 1); }
  v::matrix_view<const bf16> xv() const {
    return v::make_view<const bf16>(x.data(), tokens, hidden);
  }
  v::matrix_view<const bf16> wv() const { return v::make_view<const bf16>(w.data(), rows, hidden); }
};

problem& problem_for(i64 rows) {
  static std::unique_ptr<problem> p;
  if (!p || p->rows != rows) {
    p.reset();
    p = std::make_unique<problem>(rows);
  }
  return *p;
}

// Peak pool bytes above the current use while fn runs (fn's own allocations).
template <class F>
std::size_t extra_bytes(cudaStream_t s, F&& fn) {
  int dev = 0;
  PIPIT_CUDA_CHECK(cudaGetDevice(&dev));
  cudaMemPool_t pool = nullptr;
  PIPIT_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
  PIPIT_CUDA_CHECK(cudaStreamSynchronize(s));
  std::uint64_t used = 0, zero = 0, high = 0;
  PIPIT_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &used));
  PIPIT_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero));
  fn();
  PIPIT_CUDA_CHECK(cudaStreamSynchronize(s));
  PIPIT_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high));
  return high > used ? static_cast<std::size_t>(high - used) : 0;
}

// Times fn (device time between events) for every iteration after one warm-up run.
template <class F>
void run_timed(benchmark::State& state, problem& p, F&& fn) {
  const std::size_t extra = extra_bytes(p.s, fn);  // the warm-up run
  pc::event start(true), stop(true);
  for (auto _ : state) {
    start.record(p.s);
    fn();
    stop.record(p.s);
    stop.synchronize();
    state.SetIterationTime(static_cast<double>(stop.elapsed_since(start)) / 1e3);
  }
  const double flops = 6.0 * double(tokens) * double(hidden) * double(p.rows);
  state.counters["extra_MiB"] = static_cast<double>(extra) / (1024.0 * 1024.0);
  state.counters["TFLOPs"] =
      benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["V_per_p"] = static_cast<double>(p.rows);
}

template <class Alg>
void bm_fused(benchmark::State& state) {
  problem& p = problem_for(state.range(0));
  run_timed(state, p, [&] {
    pc::output_layer<Alg, bf16, chunk> layer(p.blas, p.s, p.shards(), 0, p.xv(), p.wv(),
                                             std::span<const i64>(p.targets.span()));
    const auto dx = v::make_view(p.dx.data(), tokens, hidden);
    const auto dw = v::make_view(p.dw.data(), p.rows, hidden);
    if constexpr (std::is_same_v<Alg, v::one_barrier>) {
      layer.s_pass(dx);
      layer.input_grad_partial(dx);
      layer.loss(p.g.span());
      pc::scale_rows(dx, std::span<const float>(p.g.span()), p.s);
      layer.t_pass(p.g.span(), dw);
    } else {
      layer.s_pass();
      layer.loss(p.g.span());
      layer.t_pass(p.g.span(), dw, dx);
    }
  });
}

// The same numerics with the logits materialised: one GEMM for all logits, the statistics over
// whole rows, the gradient epilogue into a whole bf16 dZ, two GEMMs.
void bm_unfused(benchmark::State& state) {
  problem& p = problem_for(state.range(0));
  namespace d = pc::detail_vocab;
  const i64 V = p.rows;
  run_timed(state, p, [&] {
    const auto n = static_cast<std::size_t>(tokens);
    pc::device_buffer<float> z(n * static_cast<std::size_t>(V), p.s);
    pc::device_buffer<bf16> dz(n * static_cast<std::size_t>(V), p.s);
    pc::device_buffer<i64> lt(n, p.s);
    pc::device_buffer<d::stats_t> stats(n, p.s);
    pc::device_buffer<d::coeffs_t> coeffs(n, p.s);
    pc::device_buffer<double> out(4, p.s);
    pc::entry_check check(p.s);
    const v::loss_options opt{};
    const auto params = opt.params<float>(V);
    d::prepare_targets<<<pc::stride_blocks<256>(tokens), 256, 0, p.s>>>(
        p.targets.data(), tokens, opt.ignore_index, V, 0, V, lt.data(), stats.data(), check.ref());
    pc::gemm_abt<bf16>(p.blas, p.s, tokens, V, hidden, p.x.data(), hidden, p.w.data(), hidden, 0.f,
                       z.data(), V);
    d::chunk_stats<256><<<tokens, 256, 0, p.s>>>(z.data(), V, 0, lt.data(), stats.data());
    d::loss_kernel<256><<<1, 256, 0, p.s>>>(stats.data(), p.targets.data(), nullptr, tokens, V,
                                            opt.ignore_index, params, true, 1.0, p.g.data(),
                                            out.data(), check.ref());
    d::grad_coeffs_kernel<<<pc::stride_blocks<256>(tokens), 256, 0, p.s>>>(
        stats.data(), p.g.data(), tokens, params, coeffs.data());
    d::grad_epilogue<256, bf16>
        <<<tokens, 256, 0, p.s>>>(z.data(), V, 0, lt.data(), coeffs.data(), dz.data());
    PIPIT_CUDA_CHECK(cudaGetLastError());
    pc::gemm_atb<bf16>(p.blas, p.s, V, hidden, tokens, dz.data(), V, p.x.data(), hidden, 1.f,
                       p.dw.data(), hidden);
    pc::gemm_ab<bf16>(p.blas, p.s, tokens, hidden, V, dz.data(), V, p.w.data(), hidden, 0.f,
                      p.dx.data(), hidden);
  });
}

// The fused layer's GEMMs alone (two_barrier's: logits in S, logits + dW + dX in T), chunked.
void bm_gemms_fused(benchmark::State& state) {
  problem& p = problem_for(state.range(0));
  const i64 V = p.rows, c = static_cast<i64>(chunk);
  run_timed(state, p, [&] {
    pc::device_buffer<float> z(static_cast<std::size_t>(tokens * c), p.s);
    pc::device_buffer<bf16> op(static_cast<std::size_t>(tokens * c), p.s);
    for (int pass = 0; pass < 2; ++pass)
      for (i64 r0 = 0; r0 < V; r0 += c) {
        const i64 n = std::min(c, V - r0);
        pc::gemm_abt<bf16>(p.blas, p.s, tokens, n, hidden, p.x.data(), hidden,
                           p.w.data() + r0 * hidden, hidden, 0.f, z.data(), n);
        if (pass == 0) continue;
        pc::gemm_atb<bf16>(p.blas, p.s, n, hidden, tokens, op.data(), n, p.x.data(), hidden, 1.f,
                           p.dw.data() + r0 * hidden, hidden);
        pc::gemm_ab<bf16>(p.blas, p.s, tokens, hidden, n, op.data(), n, p.w.data() + r0 * hidden,
                          hidden, r0 == 0 ? 0.f : 1.f, p.dx.data(), hidden);
      }
  });
}

// The three unchunked GEMMs of the output layer.
void bm_gemms_minimal(benchmark::State& state) {
  problem& p = problem_for(state.range(0));
  const i64 V = p.rows;
  run_timed(state, p, [&] {
    pc::device_buffer<float> z(static_cast<std::size_t>(tokens * V), p.s);
    pc::device_buffer<bf16> dz(static_cast<std::size_t>(tokens * V), p.s);
    pc::gemm_abt<bf16>(p.blas, p.s, tokens, V, hidden, p.x.data(), hidden, p.w.data(), hidden, 0.f,
                       z.data(), V);
    pc::gemm_atb<bf16>(p.blas, p.s, V, hidden, tokens, dz.data(), V, p.x.data(), hidden, 1.f,
                       p.dw.data(), hidden);
    pc::gemm_ab<bf16>(p.blas, p.s, tokens, hidden, V, dz.data(), V, p.w.data(), hidden, 0.f,
                      p.dx.data(), hidden);
  });
}

void shard_sizes(benchmark::internal::Benchmark* b) {
  b->ArgName("V_per_p")->Arg(16384)->Arg(32768)->Arg(65536);
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
}

}  // namespace

int main(int argc, char** argv) {
  if (!pc::has_device()) {
    std::printf("bench_cuda_vocab: no usable CUDA device; nothing was measured\n");
    return 0;
  }
  benchmark::RegisterBenchmark("gemms_minimal", bm_gemms_minimal)->Apply(shard_sizes);
  benchmark::RegisterBenchmark("gemms_fused", bm_gemms_fused)->Apply(shard_sizes);
  benchmark::RegisterBenchmark("unfused", bm_unfused)->Apply(shard_sizes);
  benchmark::RegisterBenchmark("fused/two_barrier", bm_fused<v::two_barrier>)->Apply(shard_sizes);
  benchmark::RegisterBenchmark("fused/one_barrier", bm_fused<v::one_barrier>)->Apply(shard_sizes);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
