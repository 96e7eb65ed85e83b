// cuda::nano_stream_runner against the sequential run on one stream: a two-layer op graph of
// row-wise device kernels (one thread per output element, each element computed by the same
// arithmetic whatever rows a launch covers), issued on one stream per kind under several
// nano-batch policies, must give every buffer bitwise equal to the unsplit sequential run.
//
// Dependencies: before each run every output buffer is filled with NaN, and every kernel spins
// for a while before it computes (compute kernels longest, on the lowest-priority stream), so a
// consumer that started before its producer would read NaN or a stale row and change the bits.
// A control case enqueues the same nano-ops on the three streams with no events and checks that
// the comparison then does fail, so the check can see a missing wait. Consecutive runs without a
// caller stream are checked the same way: run 2's fast compute nano-ops overwrite a buffer that
// run 1's slow network nano-ops still read, and two independent runners (no ordering between
// them) are the control.
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "pipit/cuda/check.cuh"
#include "pipit/cuda/nano_stream_runner.cuh"
#include "pipit/cuda/stream.cuh"
#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/op_graph.hpp"

namespace {

namespace nano = pipit::nano;
using nano::resource;
using pipit::cuda::nano_stream_runner;

constexpr int cols = 64;
constexpr std::int64_t rows = 37;
constexpr int layers = 2;
constexpr int ops_per_layer = 5;

// One layer: scale (memory) -> gemm (compute) -> shift (network) -> mix (memory, also reads
// scale) -> gemm2 (compute).
nano::op_graph layer_graph() {
  nano::op_graph g;
  const int scale = g.add("scale", resource::memory);
  const int gemm = g.add("gemm", resource::compute, {scale});
  const int shift = g.add("shift", resource::network, {gemm});
  const int mix = g.add("mix", resource::memory, {shift, scale});
  g.add("gemm2", resource::compute, {mix});
  return g;
}

__device__ void spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

// Rows [first, first + n) of op `mode`; in2 only for mix.
__global__ void row_op(int mode, const double* in, const double* in2, const double* w, double* out,
                       std::int64_t first, std::int64_t n, long long delay) {
  spin(delay);
  const std::int64_t t = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n * cols) return;
  const std::int64_t r = first + t / cols;
  const int j = static_cast<int>(t % cols);
  const double* x = in + r * cols;
  double y = 0;
  switch (mode) {
    case 0:
      y = x[j] * 1.5 + 0.25;
      break;
    case 1:
      for (int k = 0; k < cols; ++k) y += x[k] * w[k * cols + j];
      break;
    case 2:
      y = x[j] - 0.5 * x[(j + 1) % cols];
      break;
    case 3:
      y = x[j] * in2[r * cols + j] + tanh(x[j]);
      break;
    default:
      for (int k = 0; k < cols; ++k) y += x[k] * w[j * cols + k];
      break;
  }
  out[r * cols + j] = y;
}

struct device_array {
  double* p = nullptr;
  explicit device_array(std::size_t n) { PIPIT_CUDA_CHECK(cudaMalloc(&p, n * sizeof(double))); }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  ~device_array() { (void)cudaFree(p); }
};

struct problem {
  nano::op_graph g = layer_graph().repeated(layers);
  device_array x{rows * cols}, w{cols * cols},
      outputs{std::size_t(layers) * ops_per_layer * rows * cols};
  std::vector<long long> delay;

  explicit problem(long long base_delay) {
    std::vector<double> hx(rows * cols), hw(cols * cols);
    for (std::size_t i = 0; i < hx.size(); ++i) hx[i] = std::sin(0.37 * double(i)) * 2;
    for (std::size_t i = 0; i < hw.size(); ++i) hw[i] = std::cos(0.11 * double(i)) / cols;
    PIPIT_CUDA_CHECK(
        cudaMemcpy(x.p, hx.data(), hx.size() * sizeof(double), cudaMemcpyHostToDevice));
    PIPIT_CUDA_CHECK(
        cudaMemcpy(w.p, hw.data(), hw.size() * sizeof(double), cudaMemcpyHostToDevice));
    for (int o = 0; o < g.size(); ++o) {
      const resource k = g[o].kind;
      delay.push_back(k == resource::compute   ? 4 * base_delay
                      : k == resource::network ? 2 * base_delay
                                               : base_delay);
    }
  }

  double* buf(int op) const { return outputs.p + std::size_t(op) * rows * cols; }
  const double* input_of(int op) const {
    return op == 0 ? x.p : buf(op - 1);  // each op reads its predecessor (layer 1: layer 0's end)
  }

  // The functor: enqueues nano-op (op, rows) on s.
  void operator()(int op, nano::rows_range r, cudaStream_t s) const {
    const int mode = op % ops_per_layer;
    const double* in2 = mode == 3 ? buf(op - 3) : nullptr;  // mix also reads scale
    const std::int64_t n = r.size();
    const unsigned blocks = static_cast<unsigned>((n * cols + 127) / 128);
    row_op<<<blocks, 128, 0, s>>>(mode, input_of(op), in2, w.p, buf(op), r.begin, n,
                                  delay[static_cast<std::size_t>(op)]);
    PIPIT_CUDA_CHECK(cudaGetLastError());
  }

  // NaN in every output (all bytes 0xff), enqueued on s.
  void poison(cudaStream_t s) const {
    PIPIT_CUDA_CHECK(
        cudaMemsetAsync(outputs.p, 0xff, std::size_t(g.size()) * rows * cols * sizeof(double), s));
  }
  std::vector<double> download() const {
    std::vector<double> h(std::size_t(g.size()) * rows * cols);
    PIPIT_CUDA_CHECK(
        cudaMemcpy(h.data(), outputs.p, h.size() * sizeof(double), cudaMemcpyDeviceToHost));
    return h;
  }
};

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

std::vector<double> sequential(const problem& pb) {
  const pipit::cuda::stream s;
  pb.poison(s);
  nano_stream_runner::run_sequential(nano::nano_program(pb.g, nano::nano_batch::none(pb.g, rows)),
                                     pb, s.get());
  s.synchronize();
  return pb.download();
}

std::vector<nano::nano_batch> policies(const nano::op_graph& g) {
  std::vector<nano::nano_batch> p{
      nano::nano_batch::none(g, rows), nano::nano_batch::uniform(g, rows, 2),
      nano::nano_batch::uniform(g, rows, 3), nano::nano_batch::uniform(g, rows, 5)};
  // Per-op splits that differ between producers and consumers (rows of one nano-op come from
  // several nano-ops of its producer).
  nano::nano_batch mixed = nano::nano_batch::none(g, rows);
  for (int o = 0; o < g.size(); ++o) switch (o % 4) {
      case 0:
        mixed.set(g, o, {10, 27});
        break;
      case 1:
        mixed.set(g, o, nano::even_sizes(rows, 4));
        break;
      case 2:
        mixed.set(g, o, {30, 5, 2});
        break;
      default:
        break;
    }
  p.push_back(mixed);
  return p;
}

}  // namespace

TEST_CASE("nano_stream_runner equals the sequential run bitwise", "[gpu][cuda][nano]") {
  const problem pb(20000);
  const auto reference = sequential(pb);
  for (double v : reference) REQUIRE(std::isfinite(v));
  const pipit::cuda::stream caller;
  for (const nano::nano_batch& plan : policies(pb.g)) {
    INFO("policy " << plan.describe(pb.g));
    nano_stream_runner runner(nano::nano_program(pb.g, plan));
    // Forked from and joined into a caller stream, twice back to back (the second run starts
    // after the first everywhere: the poison between them is on the caller stream).
    for (int rep = 0; rep < 2; ++rep) {
      pb.poison(caller);
      runner.run(pb, caller.get());
    }
    caller.synchronize();
    CHECK(same_bits(pb.download(), reference));
    // Without a caller stream: the host orders the poison, the runner's streams the rest.
    pb.poison(caller);
    caller.synchronize();
    runner.run(pb);
    runner.synchronize();
    CHECK(same_bits(pb.download(), reference));
    // The legacy default stream as the caller.
    pb.poison(nullptr);
    runner.run(pb, cudaStream_t{});
    PIPIT_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    CHECK(same_bits(pb.download(), reference));
  }
}

TEST_CASE("nano_stream_runner orders runs that change the input", "[gpu][cuda][nano]") {
  problem pb(20000);
  const auto first = sequential(pb);
  // A second input: the first, negated.
  std::vector<double> hx(rows * cols);
  PIPIT_CUDA_CHECK(
      cudaMemcpy(hx.data(), pb.x.p, hx.size() * sizeof(double), cudaMemcpyDeviceToHost));
  std::vector<double> hx2(hx);
  for (double& v : hx2) v = -v;
  PIPIT_CUDA_CHECK(
      cudaMemcpy(pb.x.p, hx2.data(), hx.size() * sizeof(double), cudaMemcpyHostToDevice));
  const auto second = sequential(pb);
  REQUIRE_FALSE(same_bits(first, second));

  const device_array x1(rows * cols), x2(rows * cols), saved(first.size());
  PIPIT_CUDA_CHECK(cudaMemcpy(x1.p, hx.data(), hx.size() * sizeof(double), cudaMemcpyHostToDevice));
  PIPIT_CUDA_CHECK(
      cudaMemcpy(x2.p, hx2.data(), hx.size() * sizeof(double), cudaMemcpyHostToDevice));
  const pipit::cuda::stream caller;
  nano_stream_runner runner(nano::nano_program(pb.g, nano::nano_batch::uniform(pb.g, rows, 3)));
  const std::size_t in_bytes = hx.size() * sizeof(double),
                    out_bytes = first.size() * sizeof(double);
  // Input 1, run, keep the outputs, input 2 (only after run 1 has read input 1), run: all
  // enqueued before the host waits once.
  PIPIT_CUDA_CHECK(cudaMemcpyAsync(pb.x.p, x1.p, in_bytes, cudaMemcpyDeviceToDevice, caller));
  pb.poison(caller);
  runner.run(pb, caller.get());
  PIPIT_CUDA_CHECK(
      cudaMemcpyAsync(saved.p, pb.outputs.p, out_bytes, cudaMemcpyDeviceToDevice, caller));
  PIPIT_CUDA_CHECK(cudaMemcpyAsync(pb.x.p, x2.p, in_bytes, cudaMemcpyDeviceToDevice, caller));
  pb.poison(caller);
  runner.run(pb, caller.get());
  caller.synchronize();
  std::vector<double> got1(first.size());
  PIPIT_CUDA_CHECK(cudaMemcpy(got1.data(), saved.p, out_bytes, cudaMemcpyDeviceToHost));
  CHECK(same_bits(got1, first));
  CHECK(same_bits(pb.download(), second));
}

TEST_CASE("nano_stream_runner captures a run into a CUDA graph", "[gpu][cuda][nano]") {
  const problem pb(20000);
  const auto reference = sequential(pb);
  nano_stream_runner runner(nano::nano_program(pb.g, policies(pb.g).back()));
  const pipit::cuda::nano_graph graph = runner.capture(pb);
  REQUIRE(graph);
  const pipit::cuda::stream s;
  for (int rep = 0; rep < 2; ++rep) {
    pb.poison(s);
    graph.launch(s);
    s.synchronize();
    CHECK(same_bits(pb.download(), reference));
  }
}

TEST_CASE("nano_stream_runner stream priorities", "[gpu][cuda][nano]") {
  const problem pb(0);
  const nano::nano_program prog(pb.g, nano::nano_batch::uniform(pb.g, rows, 2));
  int least = 0, greatest = 0;
  PIPIT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  const nano_stream_runner runner(prog);
  for (int k = 0; k < nano::resource_count; ++k) {
    const auto r = static_cast<resource>(k);
    int p = 0;
    PIPIT_CUDA_CHECK(cudaStreamGetPriority(runner.stream_of(r), &p));
    CHECK(p == runner.priority(r));
    CHECK(p == nano::default_stream_priorities(least, greatest)[static_cast<std::size_t>(k)]);
  }
  CHECK(runner.priority(resource::network) <= runner.priority(resource::memory));
  CHECK(runner.priority(resource::memory) <= runner.priority(resource::compute));
  // Explicit priorities, e.g. all on the least urgent level.
  const nano_stream_runner flat(prog, {std::array<int, nano::resource_count>{least, least, least}});
  CHECK(flat.priority(resource::network) == least);
  CHECK_THROWS_WITH(
      nano_stream_runner(prog, {std::array<int, nano::resource_count>{least + 1, least, least}}),
      Catch::Contains("priority " + std::to_string(least + 1) +
                      " for the compute stream is outside "
                      "the device's range"));
}

TEST_CASE("without the runner's events the comparison fails", "[gpu][cuda][nano]") {
  // Control: the same nano-ops on the runner's three streams (one per kind, with its default
  // priority), no waits at all, the compute nano-ops spinning ~10 ms. Consumers on the other
  // streams then read NaN.
  const problem pb(2'500'000);
  const auto reference = sequential(pb);
  const nano::nano_program prog(pb.g, nano::nano_batch::uniform(pb.g, rows, 2));
  const nano_stream_runner runner(prog);
  const pipit::cuda::stream caller;
  pb.poison(caller);
  caller.synchronize();
  for (const nano::nano_op& n : prog.ops()) pb(n.op, n.rows, runner.stream_of(n.kind));
  runner.synchronize();
  CHECK_FALSE(same_bits(pb.download(), reference));
}

namespace {

// Two ops: `write` (compute, fast) fills the shared buffer `mid` from the run's input; `read`
// (network, spinning first) reads `mid` into the run's own output. Both runs use the same `mid`,
// so run 2's write must wait until run 1's read has finished.
struct overwrite_problem {
  nano::op_graph g;
  device_array x{2 * rows * cols}, mid{rows * cols}, out{2 * rows * cols};
  long long read_delay;
  int run = 0;  // which run the next enqueue belongs to (read on the host while enqueueing)

  explicit overwrite_problem(long long delay) : read_delay(delay) {
    const int write = g.add("write", resource::compute);
    g.add("read", resource::network, {write});
    std::vector<double> hx(2 * rows * cols);
    for (std::size_t i = 0; i < hx.size(); ++i) hx[i] = std::sin(0.29 * double(i)) + 0.5;
    PIPIT_CUDA_CHECK(
        cudaMemcpy(x.p, hx.data(), hx.size() * sizeof(double), cudaMemcpyHostToDevice));
  }

  void operator()(int op, nano::rows_range r, cudaStream_t s) const {
    const std::int64_t n = r.size();
    const unsigned blocks = static_cast<unsigned>((n * cols + 127) / 128);
    const std::size_t at = std::size_t(run) * rows * cols;
    if (op == 0)
      row_op<<<blocks, 128, 0, s>>>(0, x.p + at, nullptr, nullptr, mid.p, r.begin, n, 0);
    else
      row_op<<<blocks, 128, 0, s>>>(2, mid.p, nullptr, nullptr, out.p + at, r.begin, n, read_delay);
    PIPIT_CUDA_CHECK(cudaGetLastError());
  }

  void poison(cudaStream_t s) const {
    PIPIT_CUDA_CHECK(cudaMemsetAsync(out.p, 0xff, 2 * rows * cols * sizeof(double), s));
  }
  std::vector<double> download() const {
    std::vector<double> h(2 * rows * cols);
    PIPIT_CUDA_CHECK(
        cudaMemcpy(h.data(), out.p, h.size() * sizeof(double), cudaMemcpyDeviceToHost));
    return h;
  }
};

}  // namespace

TEST_CASE("nano_stream_runner orders consecutive runs without a caller stream",
          "[gpu][cuda][nano]") {
  overwrite_problem pb(5'000'000);  // the read spins a few ms before it reads `mid`
  const nano::nano_program prog(pb.g, nano::nano_batch::uniform(pb.g, rows, 2));
  // The reference: both runs, one after the other, on one stream.
  std::vector<double> reference;
  {
    const pipit::cuda::stream s;
    pb.poison(s);
    for (pb.run = 0; pb.run < 2; ++pb.run) nano_stream_runner::run_sequential(prog, pb, s.get());
    s.synchronize();
    reference = pb.download();
  }
  for (double v : reference) REQUIRE(std::isfinite(v));
  const pipit::cuda::stream host_ordered;
  {
    nano_stream_runner runner(prog);
    pb.poison(host_ordered);
    host_ordered.synchronize();  // the runner's streams do not wait for other streams
    pb.run = 0;
    runner.run(pb);
    pb.run = 1;
    runner.run(pb);  // enqueued while run 1's reads still spin
    runner.synchronize();
    CHECK(same_bits(pb.download(), reference));
  }
  {
    // Control: run 2 on another runner, not ordered after the first: its write overwrites `mid`
    // while run 1's reads spin, so run 1's output changes.
    nano_stream_runner first(prog), second(prog);
    pb.poison(host_ordered);
    host_ordered.synchronize();
    pb.run = 0;
    first.run(pb);
    pb.run = 1;
    second.run(pb);
    first.synchronize();
    second.synchronize();
    CHECK_FALSE(same_bits(pb.download(), reference));
  }
}
