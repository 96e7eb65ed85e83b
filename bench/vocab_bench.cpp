// The fused, chunked vocabulary-parallel output layer (pipit/vocab/output_layer.hpp) on one rank
// against (a) the same algorithm with the tokens x (V/p) logits materialised between the S and
// the T pass (as the reference implementation keeps its softmax), and (b) the bare GEMMs: the
// ones the fused layer runs, chunk by chunk, with nothing between them ("gemms_fused"), and the
// three unchunked GEMMs any implementation needs ("gemms_minimal": logits, logits x W, logits^T
// x X). float, one rank holding a V/p-row shard (collectives are no-ops at one rank).
//
// Counters: extra_MiB is the peak of the buffers each variant allocates besides inputs and
// outputs (logits chunk or full logits, statistics, per-token coefficients), counted byte by
// byte; vs_gemms_fused, vs_gemms_minimal and vs_materialised (on the fused rows) and
// mem_vs_materialised are ratios to the baselines measured earlier in the same run (they are
// registered first). Times are the thread's CPU time (Eigen is single-threaded here), so that a
// busy shared machine inflates them less than wall time would.
// Run: build/release/bench/bench_vocab --benchmark_filter=/tokens:2048/

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cstdint>
#include <ctime>
#include <map>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "pipit/vocab/algorithms.hpp"
#include "pipit/vocab/cross_entropy.hpp"
#include "pipit/vocab/loss.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/output_layer.hpp"
#include "pipit/vocab/shards.hpp"
#include "pipit/vocab/softmax_stats.hpp"

namespace {

namespace v = pipit::vocab;
using i64 = std::int64_t;
using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using map = Eigen::Map<mat>;
using cmap = Eigen::Map<const mat>;

constexpr std::size_t chunk = v::default_chunk;

struct inputs {
  i64 tokens, hidden, rows;
  std::vector<float> x, w;
  std::vector<i64> targets;
  std::vector<float> dx, dw;
  inputs(i64 t, i64 h, i64 r) : tokens(t), hidden(h), rows(r) {
    std::mt19937 rng(1);
    std::normal_distribution<float> n(0.f, 1.f);
    x.resize(static_cast<std::size_t>(t * h));
    w.resize(static_cast<std::size_t>(r * h));
    for (float& a : x) a = n(rng);
    for (float& a : w) a = 0.05f * n(rng);
    std::uniform_int_distribution<i64> id(0, r - 1);
    for (i64 i = 0; i < t; ++i) targets.push_back(id(rng));
    dx.assign(x.size(), 0.f);
    dw.assign(w.size(), 0.f);
  }
};

// Mean seconds per iteration of each (variant, algorithm, shape) measured so far, and its bytes.
struct measurement {
  double seconds = 0;
  double bytes = 0;
};
std::map<std::tuple<std::string, std::string, i64, i64, i64>, measurement>& results() {
  static std::map<std::tuple<std::string, std::string, i64, i64, i64>, measurement> r;
  return r;
}

template <class Alg>
const char* alg_name() {
  if constexpr (std::is_same_v<Alg, v::naive>) return "naive";
  if constexpr (std::is_same_v<Alg, v::two_barrier>) return "two_barrier";
  return "one_barrier";
}

// CPU time of this thread: Eigen runs single-threaded here, and unlike wall time it does not
// count the time other processes on a shared machine take the core away.
double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Runs `body` (returning the bytes it allocated) under the benchmark loop and records the time
// (thread CPU time, reported as the benchmark's manual time).
template <class Body>
void measure(benchmark::State& state, const std::string& variant, const std::string& alg,
             Body&& body) {
  const i64 t = state.range(0), h = state.range(1), r = state.range(2);
  inputs in(t, h, r);
  double bytes = 0, seconds = 0;
  for (auto _ : state) {
    const double start = thread_seconds();
    bytes = static_cast<double>(body(in));
    const double took = thread_seconds() - start;
    seconds += took;
    state.SetIterationTime(took);
    benchmark::DoNotOptimize(in.dw.data());
    benchmark::ClobberMemory();
  }
  const double per_iter = seconds / static_cast<double>(state.iterations());
  results()[{variant, alg, t, h, r}] = {per_iter, bytes};
  state.counters["extra_MiB"] = bytes / (1024.0 * 1024.0);
  state.counters["GFLOP/s"] = benchmark::Counter(
      6.0 * static_cast<double>(t) * static_cast<double>(h) * static_cast<double>(r) * 1e-9 *
          static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate);  // the three necessary GEMMs (gemms_minimal)
  if (variant == "fused") {
    const auto ratio = [&](const std::string& base, const std::string& base_alg, const char* name,
                           bool memory) {
      const auto it = results().find({base, base_alg, t, h, r});
      if (it == results().end()) return;
      state.counters[name] = memory ? bytes / it->second.bytes : per_iter / it->second.seconds;
    };
    ratio("gemms_fused", alg, "vs_gemms_fused", false);
    ratio("gemms_minimal", "any", "vs_gemms_minimal", false);
    ratio("materialised", alg, "vs_materialised", false);
    ratio("materialised", alg, "mem_vs_materialised", true);
  }
}

// ---- (b) bare GEMMs ----------------------------------------------------------------------------

void bm_gemms_minimal(benchmark::State& state) {
  measure(state, "gemms_minimal", "any", [](inputs& in) {
    std::vector<float> z(static_cast<std::size_t>(in.tokens * in.rows));
    const cmap x(in.x.data(), in.tokens, in.hidden), w(in.w.data(), in.rows, in.hidden);
    map zm(z.data(), in.tokens, in.rows), dx(in.dx.data(), in.tokens, in.hidden),
        dw(in.dw.data(), in.rows, in.hidden);
    zm.noalias() = x * w.transpose();
    dx.noalias() = zm * w;
    dw.noalias() += zm.transpose() * x;
    return z.size() * sizeof(float);
  });
}

template <class Alg>
void bm_gemms_fused(benchmark::State& state) {
  measure(state, "gemms_fused", alg_name<Alg>(), [](inputs& in) {
    std::vector<float> z(static_cast<std::size_t>(in.tokens) * chunk);
    const cmap x(in.x.data(), in.tokens, in.hidden);
    map dx(in.dx.data(), in.tokens, in.hidden);
    const i64 c = static_cast<i64>(chunk);
    for (i64 r0 = 0; r0 < in.rows; r0 += c) {  // S pass
      const i64 n = std::min(c, in.rows - r0);
      const cmap wc(in.w.data() + r0 * in.hidden, n, in.hidden);
      map zm(z.data(), in.tokens, n);
      zm.noalias() = x * wc.transpose();
      if constexpr (std::is_same_v<Alg, v::one_barrier>) dx.noalias() += zm * wc;
    }
    for (i64 r0 = 0; r0 < in.rows; r0 += c) {  // T pass
      const i64 n = std::min(c, in.rows - r0);
      const cmap wc(in.w.data() + r0 * in.hidden, n, in.hidden);
      map zm(z.data(), in.tokens, n), dwc(in.dw.data() + r0 * in.hidden, n, in.hidden);
      zm.noalias() = x * wc.transpose();
      dwc.noalias() += zm.transpose() * x;
      if constexpr (!std::is_same_v<Alg, v::one_barrier>) dx.noalias() += zm * wc;
    }
    return z.size() * sizeof(float);
  });
}

// ---- (a) materialised logits --------------------------------------------------------------------

template <class Alg>
void bm_materialised(benchmark::State& state) {
  measure(state, "materialised", alg_name<Alg>(), [](inputs& in) {
    const i64 T = in.tokens, H = in.hidden, R = in.rows;
    const v::loss_options opt;
    const v::ce_params<float> p = opt.params<float>(R);
    std::vector<float> z(static_cast<std::size_t>(T * R)), g(static_cast<std::size_t>(T)),
        local_max(static_cast<std::size_t>(T));
    std::vector<v::token_stats<float>> st(static_cast<std::size_t>(T),
                                          v::token_stats<float>::empty());
    std::vector<v::grad_coeffs<float>> c(static_cast<std::size_t>(T));
    const cmap x(in.x.data(), T, H), w(in.w.data(), R, H);
    map zm(z.data(), T, R), dx(in.dx.data(), T, H), dw(in.dw.data(), R, H);
    zm.noalias() = x * w.transpose();  // S pass: logits kept until the T pass
    for (i64 t = 0; t < T; ++t) {
      auto& s = st[static_cast<std::size_t>(t)];
      float* row = &zm(t, 0);
      s.target = v::gather_target(row, 0, R, in.targets[static_cast<std::size_t>(t)]);
      for (i64 j = 0; j < R; ++j) s.logit_sum += row[j];
      v::softmax_stats<float> run = v::softmax_stats<float>::empty();
      if constexpr (std::is_same_v<Alg, v::one_barrier>)
        v::online_softmax_chunk(row, R, run);  // row <- exp(z - m)
      else
        run = v::row_stats(row, R);
      s.max = local_max[static_cast<std::size_t>(t)] = run.max;
      s.sum = run.sum;
    }
    if constexpr (std::is_same_v<Alg, v::one_barrier>) dx.noalias() = zm * w;
    // (one rank: the statistics are already global)
    (void)v::loss_forward<float>(st, in.targets, R, opt, {}, g);
    for (std::size_t t = 0; t < c.size(); ++t) c[t] = v::token_grad_coeffs(st[t], g[t], p);
    if constexpr (std::is_same_v<Alg, v::one_barrier>) {
      for (i64 t = 0; t < T; ++t) {  // correction, then the T pass from the kept exp(z - m)
        const auto ti = static_cast<std::size_t>(t);
        const auto c1 = v::token_grad_coeffs(st[ti], 1.f, p);
        dx.row(t) = g[ti] * (v::local_softmax_weight(local_max[ti], c1) * dx.row(t) -
                             c1.target_scale * w.row(in.targets[ti]));
        const float f = v::local_softmax_weight(local_max[ti], c[ti]);
        float* row = &zm(t, 0);
        for (i64 j = 0; j < R; ++j) row[j] = f * row[j] - c[ti].uniform;
        row[in.targets[ti]] -= c[ti].target_scale;
      }
      dw.noalias() += zm.transpose() * x;
    } else {
      for (i64 t = 0; t < T; ++t)
        v::grad_epilogue_row(&zm(t, 0), 0, R, in.targets[static_cast<std::size_t>(t)],
                             c[static_cast<std::size_t>(t)]);
      dx.noalias() = zm * w;
      dw.noalias() += zm.transpose() * x;
    }
    return z.size() * sizeof(float) + st.size() * sizeof(st[0]) + c.size() * sizeof(c[0]) +
           (g.size() + local_max.size()) * sizeof(float);
  });
}

// ---- the fused, chunked layer ------------------------------------------------------------------

template <class Alg>
void bm_fused(benchmark::State& state) {
  measure(state, "fused", alg_name<Alg>(), [](inputs& in) {
    const i64 T = in.tokens, H = in.hidden, R = in.rows;
    const v::vocab_shards shards(R, 1);
    v::output_layer<Alg, float, chunk> layer(
        shards, 0, v::make_view<const float>(in.x.data(), T, H),
        v::make_view<const float>(in.w.data(), R, H), in.targets);
    std::vector<float> g(static_cast<std::size_t>(T));
    const auto dx = v::make_view(in.dx.data(), T, H);
    const auto dw = v::make_view(in.dw.data(), R, H);
    if constexpr (std::is_same_v<Alg, v::one_barrier>) {
      layer.s_pass(dx);
      (void)layer.loss(g);
      layer.input_grad_partial(dx);
      v::scale_rows(dx, std::span<const float>(g));
      layer.t_pass(g, dw);
    } else {
      layer.s_pass();
      if constexpr (std::is_same_v<Alg, v::naive>) {
        (void)layer.naive_max();
        (void)layer.naive_target_sums();
        (void)layer.naive_sum_exp();
        layer.naive_combine();
      }
      (void)layer.loss(g);
      layer.t_pass(g, dw, dx);
    }
    return layer.workspace_bytes() + g.size() * sizeof(float);
  });
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tokens", "hidden", "rows"});
  b->Args({256, 128, 2048});  // small: the CI smoke run
  b->Args({2048, 1024, 16384});
  b->Args({2048, 1024, 32768});
  b->Unit(benchmark::kMillisecond)->UseManualTime();
}

}  // namespace

// Baselines first: the fused rows compare against what was measured before them.
BENCHMARK(bm_gemms_minimal)->Apply(shapes);
BENCHMARK_TEMPLATE(bm_gemms_fused, v::two_barrier)->Apply(shapes);
BENCHMARK_TEMPLATE(bm_gemms_fused, v::one_barrier)->Apply(shapes);
BENCHMARK_TEMPLATE(bm_materialised, v::two_barrier)->Apply(shapes);
BENCHMARK_TEMPLATE(bm_materialised, v::one_barrier)->Apply(shapes);
BENCHMARK_TEMPLATE(bm_fused, v::naive)->Apply(shapes);
BENCHMARK_TEMPLATE(bm_fused, v::two_barrier)->Apply(shapes);
BENCHMARK_TEMPLATE(bm_fused, v::one_barrier)->Apply(shapes);
BENCHMARK_MAIN();
