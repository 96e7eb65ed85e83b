// Memory-bounded execution on the host, measured against the cost model's prediction.
//
// stream/...: TPI-LLM's sliding window (runtime/weight_window.hpp). 8 layers = 16 block files
//   (attention halves 1 MiB: x += tanh(W x + b), d = 512; MLP halves 4 MiB: x += W2 tanh(W1 x),
//   f = 1024; float), one token per iteration. After each block's compute the block is released
//   and a simulated all-reduce (a sleep of comm_us = 2 ms, the ms-scale link latency TPI-LLM
//   measures on edge networks) follows, during which the loader reads ahead. disk_MBps: the
//   simulated disk (reads paced to bytes / bandwidth; 0 = the page cache, unpaced). k = 16 holds
//   the whole model. Counters: predicted_ms (cost::estimate_weight_streaming from the measured
//   per-block compute, the measured sleep and each block's read time), stall_ms (measured time
//   acquire() waited, per token) and pred_stall_ms, stall_free and window_cond (the recurrence's
//   verdict and TPI-LLM's closed form), peak_MiB (the window's accounting of resident weights).
//
// offload/...: Superpipeline's layer offload (runtime/layer_offload.hpp): 8 layers y = tanh(W x +
//   b), d = 512, 32 rows, float (1 MiB each), a bounded_pool as the device, copies paced to
//   link_MBps. One pass per iteration, each from an empty device (invalidate()), so the
//   prediction (cost::estimate_layer_offload) applies; training = forward + backward (gradients
//   copied out and accumulated on the host). Counters: peak_MiB (the pool's peak: weights, and
//   in training their gradients), predicted_ms (inference), h2d (copies per pass).
//   offload/resident: the same layers computed from host memory, no offload (the floor).
//
//   bench_weight_stream
//   bench_weight_stream --benchmark_filter='offload'
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "pipit/cost/weight_streaming.hpp"
#include "pipit/runtime/bounded_pool.hpp"
#include "pipit/runtime/layer_offload.hpp"
#include "pipit/runtime/weight_file.hpp"
#include "pipit/runtime/weight_window.hpp"

namespace {

namespace fs = std::filesystem;
namespace rt = pipit::runtime;
namespace cost = pipit::cost;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

std::vector<float> random_floats(std::size_t n, unsigned seed, double scale) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(u(gen));
  return v;
}

// ---- streaming ----------------------------------------------------------------------------------

constexpr std::size_t layers = 8, d = 512, f = 1024;
constexpr std::size_t blocks = 2 * layers;

void apply_block(std::size_t b, std::span<const float> t0, std::span<const float> t1,
                 std::vector<float>& x) {
  if (b % 2 == 0) {
    std::vector<float> y(d);
    for (std::size_t i = 0; i < d; ++i) {
      float acc = t1[i];
      for (std::size_t j = 0; j < d; ++j) acc += t0[i * d + j] * x[j];
      y[i] = std::tanh(acc);
    }
    for (std::size_t i = 0; i < d; ++i) x[i] += y[i];
  } else {
    std::vector<float> h(f);
    for (std::size_t i = 0; i < f; ++i) {
      float acc = 0;
      for (std::size_t j = 0; j < d; ++j) acc += t0[i * d + j] * x[j];
      h[i] = std::tanh(acc);
    }
    for (std::size_t i = 0; i < d; ++i) {
      float acc = 0;
      for (std::size_t j = 0; j < f; ++j) acc += t1[i * f + j] * h[j];
      x[i] += 0.1f * acc;
    }
  }
}

// The model's block files, written once per process into a temporary directory.
struct model_files {
  fs::path dir;
  std::vector<fs::path> paths;
  model_files() {
    dir = fs::temp_directory_path() / ("pipit_bench_weight_stream_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    for (std::size_t b = 0; b < blocks; ++b) {
      paths.push_back(dir / ("block_" + std::to_string(b) + ".pwb"));
      if (b % 2 == 0) {
        const auto w = random_floats(d * d, unsigned(b), 1 / std::sqrt(double(d)));
        const auto bias = random_floats(d, unsigned(b + 100), 0.1);
        rt::write_weight_block<float>(paths.back(), {{{d, d}, w}, {{d}, bias}});
      } else {
        const auto w1 = random_floats(f * d, unsigned(b), 1 / std::sqrt(double(d)));
        const auto w2 = random_floats(d * f, unsigned(b + 100), 1 / std::sqrt(double(f)));
        rt::write_weight_block<float>(paths.back(), {{{f, d}, w1}, {{d, f}, w2}});
      }
    }
  }
  ~model_files() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

const model_files& files() {
  static const model_files m;
  return m;
}

// Per block: the unpaced read time (page cache: open, read, checksum, fresh pages) and bytes.
struct stream_profile {
  std::vector<double> read, bytes;
};

const stream_profile& profile() {
  static const stream_profile p = [] {
    stream_profile r;
    const auto& m = files();
    constexpr int reps = 5;
    for (std::size_t b = 0; b < blocks; ++b) {
      const auto t0 = clock_type::now();
      rt::weight_block blk;
      for (int i = 0; i < reps; ++i) blk = rt::read_weight_block(m.paths[b]);
      r.read.push_back(seconds_since(t0) / reps);
      r.bytes.push_back(double(blk.info().payload_bytes));
    }
    return r;
  }();
  return p;
}

void bm_stream(benchmark::State& st, int k, double disk_bw, double comm) {
  const auto& m = files();
  const auto& prof = profile();
  rt::weight_window win(m.paths, {.window = k, .disk_bandwidth = disk_bw});
  std::vector<float> x(d);
  // Per block, summed over the timed tokens: compute and communication as they happened in this
  // run (on a shared machine they drift from the profile), which the prediction then uses.
  std::vector<double> compute(blocks, 0.0), communicate(blocks, 0.0);
  bool timing = false;
  auto token = [&] {
    std::fill(x.begin(), x.end(), 0.01f);
    for (std::size_t b = 0; b < blocks; ++b) {
      const auto& w = win.acquire(b);
      const auto t0 = clock_type::now();
      apply_block(b, w.tensor<float>(0), w.tensor<float>(1), x);
      const auto t1 = clock_type::now();
      win.release(b);
      if (comm > 0) std::this_thread::sleep_for(std::chrono::duration<double>(comm));
      if (timing) {
        compute[b] += std::chrono::duration<double>(t1 - t0).count();
        communicate[b] += seconds_since(t1);
      }
    }
    benchmark::DoNotOptimize(x.data());
  };
  token();  // cold start: the first window's reads
  const double stall0 = win.stats().stall_seconds;
  std::int64_t tokens = 0;
  timing = true;
  for (auto _ : st) {
    const auto t0 = clock_type::now();
    token();
    st.SetIterationTime(seconds_since(t0));
    ++tokens;
  }
  const double nt = double(std::max<std::int64_t>(1, tokens));
  std::vector<cost::streamed_block> model;
  for (std::size_t b = 0; b < blocks; ++b) {
    const double paced = disk_bw > 0 ? prof.bytes[b] / disk_bw : 0;
    model.push_back({.load = std::max(prof.read[b], paced),
                     .compute = compute[b] / nt,
                     .communicate = communicate[b] / nt});
  }
  const auto e = cost::estimate_weight_streaming(model, k);
  const auto s = win.stats();
  st.counters["predicted_ms"] = e.pass_time * 1e3;
  st.counters["stall_ms"] = (s.stall_seconds - stall0) * 1e3 / nt;
  st.counters["pred_stall_ms"] = e.stall_time * 1e3;
  st.counters["stall_free"] = e.stall_free ? 1 : 0;
  st.counters["window_cond"] = e.window_condition ? 1 : 0;
  st.counters["peak_MiB"] = double(s.peak_resident_bytes) / double(1 << 20);
  st.counters["read_ms"] = s.loads > 0 ? s.load_seconds * 1e3 / double(s.loads) : 0;
}

// ---- offload ------------------------------------------------------------------------------------

constexpr std::size_t off_layers = 8, off_d = 512, off_rows = 32;

void off_forward(std::span<const float> w, std::span<const float> x, std::span<float> y) {
  for (std::size_t r = 0; r < off_rows; ++r)
    for (std::size_t i = 0; i < off_d; ++i) {
      float acc = w[off_d * off_d + i];
      for (std::size_t j = 0; j < off_d; ++j) acc += w[i * off_d + j] * x[r * off_d + j];
      y[r * off_d + i] = std::tanh(acc);
    }
}

void off_backward(std::span<const float> w, std::span<const float> x, std::span<const float> y,
                  std::span<const float> dy, std::span<float> dx, std::span<float> g) {
  std::vector<float> dz(off_rows * off_d);
  for (std::size_t i = 0; i < dz.size(); ++i) dz[i] = dy[i] * (1 - y[i] * y[i]);
  for (std::size_t r = 0; r < off_rows; ++r)
    for (std::size_t i = 0; i < off_d; ++i) {
      for (std::size_t j = 0; j < off_d; ++j)
        g[i * off_d + j] += dz[r * off_d + i] * x[r * off_d + j];
      g[off_d * off_d + i] += dz[r * off_d + i];
    }
  for (std::size_t r = 0; r < off_rows; ++r)
    for (std::size_t j = 0; j < off_d; ++j) {
      float acc = 0;
      for (std::size_t i = 0; i < off_d; ++i) acc += dz[r * off_d + i] * w[i * off_d + j];
      dx[r * off_d + j] = acc;
    }
}

struct offload_model {
  std::vector<std::vector<float>> w, g;
  std::vector<std::vector<float>> acts;
  offload_model() {
    for (std::size_t l = 0; l < off_layers; ++l) {
      w.push_back(random_floats(off_d * off_d + off_d, unsigned(l), 1 / std::sqrt(double(off_d))));
      g.emplace_back(w.back().size(), 0.0f);
    }
    acts.assign(off_layers + 1, random_floats(off_rows * off_d, 77, 1.0));
  }
};

void bm_offload(benchmark::State& st, int k, int kp, double link_bw, bool train) {
  offload_model m;
  const std::size_t layer_bytes = m.w[0].size() * sizeof(float);
  rt::bounded_pool pool(std::size_t(64) << 20);
  std::vector<std::span<const float>> host(m.w.begin(), m.w.end());
  std::vector<std::span<float>> grads(m.g.begin(), m.g.end());
  rt::layer_offload<float> off(host, pool, {.resident = k, .swap = kp, .link_bandwidth = link_bw});
  std::vector<float> dy(off_rows * off_d), dx(dy.size());
  std::vector<double> compute(off_layers, 0.0);
  auto pass = [&] {
    off.invalidate();
    off.forward([&](int l, std::span<const float> w) {
      const auto t0 = clock_type::now();
      off_forward(w, m.acts[std::size_t(l)], m.acts[std::size_t(l) + 1]);
      compute[std::size_t(l)] = seconds_since(t0);
    });
    if (train) {
      std::copy(m.acts.back().begin(), m.acts.back().end(), dy.begin());
      off.backward(std::span<const std::span<float>>(grads),
                   [&](int l, std::span<const float> w, std::span<float> g) {
                     off_backward(w, m.acts[std::size_t(l)], m.acts[std::size_t(l) + 1], dy, dx, g);
                     std::swap(dy, dx);
                   });
    }
    benchmark::DoNotOptimize(m.acts.back().data());
  };
  pass();
  const auto h0 = off.stats().h2d_transfers;
  std::int64_t passes = 0;
  for (auto _ : st) {
    const auto t0 = clock_type::now();
    pass();
    st.SetIterationTime(seconds_since(t0));
    ++passes;
  }
  st.counters["peak_MiB"] = double(pool.peak_in_use()) / double(1 << 20);
  st.counters["h2d"] =
      double(off.stats().h2d_transfers - h0) / double(std::max<std::int64_t>(1, passes));
  if (!train) {
    std::vector<cost::streamed_block> model;
    for (std::size_t l = 0; l < off_layers; ++l)
      model.push_back(
          {.load = double(layer_bytes) / link_bw, .compute = compute[l], .communicate = 0});
    const auto e = cost::estimate_layer_offload(model, k, kp);
    st.counters["predicted_ms"] = e.pass_time * 1e3;
    st.counters["window_cond"] = e.window_condition ? 1 : 0;
  }
}

void bm_resident(benchmark::State& st) {
  offload_model m;
  for (auto _ : st) {
    const auto t0 = clock_type::now();
    for (std::size_t l = 0; l < off_layers; ++l) off_forward(m.w[l], m.acts[l], m.acts[l + 1]);
    benchmark::DoNotOptimize(m.acts.back().data());
    st.SetIterationTime(seconds_since(t0));
  }
  st.counters["peak_MiB"] = double(off_layers * m.w[0].size() * sizeof(float)) / double(1 << 20);
}

void register_all() {
  for (const double disk : {0.0, 4000e6, 1000e6})
    for (const int k : {1, 2, 4, 16}) {
      const double comm = 2e-3;
      const std::string label = "stream/k:" + std::to_string(k) +
                                "/disk_MBps:" + std::to_string(int(disk / 1e6)) + "/comm_us:2000";
      benchmark::RegisterBenchmark(label.c_str(),
                                   [=](benchmark::State& st) { bm_stream(st, k, disk, comm); })
          ->UseManualTime()
          ->Iterations(8)
          ->Unit(benchmark::kMillisecond);
    }
  const double link = 200e6;
  for (const bool train : {false, true})
    for (const auto& [k, kp] : {std::pair{1, 1}, {2, 1}, {2, 2}, {4, 1}, {4, 2}, {4, 4}, {8, 1}}) {
      const std::string label = std::string("offload/") + (train ? "training" : "inference") +
                                "/k:" + std::to_string(k) + "/kp:" + std::to_string(kp) +
                                "/link_MBps:" + std::to_string(int(link / 1e6));
      benchmark::RegisterBenchmark(
          label.c_str(), [=](benchmark::State& st) { bm_offload(st, k, kp, link, train); })
          ->UseManualTime()
          ->Iterations(5)
          ->Unit(benchmark::kMillisecond);
    }
  benchmark::RegisterBenchmark("offload/resident", bm_resident)
      ->UseManualTime()
      ->Iterations(5)
      ->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
