// The vocabulary drivers over cuda::nccl_communicator on every device of the machine (one rank
// per device, one host thread per rank; one rank on a one-GPU machine): output-layer forward +
// backward for the three algorithms and the embedding's collectives, compared with the host
// reference vocab::output_layer_forward_backward in double (vocab_reference.cpp) on the same
// number of ranks. Tolerances as in cuda_output_layer_test.cu (float 1e-4; bfloat16 loss 1e-4,
// gradients 1.5e-2).
#include <cuda_bf16.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <exception>
#include <random>
#include <span>
#include <thread>
#include <type_traits>
#include <vector>

#include "pipit/cuda/blas_handle.cuh"
#include "pipit/cuda/device.cuh"
#include "pipit/cuda/device_buffer.cuh"
#include "pipit/cuda/embedding_forward_backward.cuh"
#include "pipit/cuda/nccl_communicator.cuh"
#include "pipit/cuda/output_layer_forward_backward.cuh"
#include "pipit/cuda/stream.cuh"
#include "vocab_reference.hpp"

namespace v = pipit::vocab;
namespace pc = pipit::cuda;
using i64 = std::int64_t;
using bf16 = __nv_bfloat16;
using pipit_test::algorithm;

namespace {

template <class T>
T to_t(double a) {
  if constexpr (std::is_same_v<T, float>)
    return static_cast<float>(a);
  else
    return __float2bfloat16(static_cast<float>(a));
}
template <class T>
double round_as(double a) {
  if constexpr (std::is_same_v<T, float>)
    return static_cast<float>(a);
  else
    return __bfloat162float(__float2bfloat16(static_cast<float>(a)));
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
std::vector<T> download(const pc::device_buffer<T>& d, cudaStream_t s) {
  std::vector<T> h(d.size());
  if (!h.empty())
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(h.data(), d.data(), d.bytes(), cudaMemcpyDeviceToHost, s));
  PIPIT_CUDA_CHECK(cudaStreamSynchronize(s));
  return h;
}

std::vector<int> all_devices() {
  std::vector<int> d(static_cast<std::size_t>(pc::device_count()));
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<int>(i);
  return d;
}

template <class F>
void on_every_rank(std::vector<pc::nccl_communicator>& comms, F fn) {
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(comms.size());
  for (std::size_t i = 0; i < comms.size(); ++i)
    pool.emplace_back([&, i] {
      try {
        PIPIT_CUDA_CHECK(cudaSetDevice(comms[i].device()));
        fn(comms[i]);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

void check_close(const std::vector<float>& got, const std::vector<double>& want, double tol,
                 const char* what) {
  REQUIRE(got.size() == want.size());
  double err = 0, scale = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    err = std::max(err, std::abs(double(got[i]) - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  INFO(what << ": max error " << err << ", max |reference| " << scale << ", tolerance " << tol);
  CHECK(err <= tol * scale);
}

template <class Alg, class T>
void check_driver(std::vector<pc::nccl_communicator>& comms, const pipit_test::vocab_problem& p,
                  algorithm id, double tol_grad, int root) {
  const auto ref = pipit_test::host_reference(p, id);
  const v::vocab_shards shards(p.vocab, p.ranks, p.pad_multiple);
  const i64 H = p.hidden, Tn = p.tokens, S = shards.shard_size();
  std::vector<std::vector<float>> dx(comms.size()), dw(comms.size());
  std::vector<v::loss_result<float>> res(comms.size());
  on_every_rank(comms, [&](pc::nccl_communicator& comm) {
    const int r = comm.rank();
    pc::stream s;
    pc::blas_handle blas;
    std::vector<T> xh, wh(static_cast<std::size_t>(S * H), to_t<T>(0.0));
    for (double a : p.x) xh.push_back(to_t<T>(a));
    const auto range = shards.real_range_of(r);
    for (i64 i = range.begin * H; i < range.end * H; ++i) wh[i - range.begin * H] = to_t<T>(p.w[i]);
    auto x = upload(xh, s);
    auto w = upload(wh, s);
    auto targets = upload(p.targets, s);
    auto weights = upload(std::vector<float>(p.weights.begin(), p.weights.end()), s);
    auto gx = upload(std::vector<float>(static_cast<std::size_t>(Tn * H), 0.f), s);
    auto gw = upload(std::vector<float>(static_cast<std::size_t>(S * H), 0.f), s);
    res[r] = pc::output_layer_forward_backward<Alg, 64>(
        comm, blas, s, shards, v::make_view<const T>(x.data(), Tn, H),
        v::make_view<const T>(w.data(), S, H), std::span<const i64>(targets.span()),
        v::make_view(gx.data(), Tn, H), v::make_view(gw.data(), S, H), p.opt,
        std::span<const float>(weights.span()), root);
    dx[r] = download(gx, s);
    dw[r] = download(gw, s);
  });
  std::vector<float> dw_all;
  for (int r = 0; r < p.ranks; ++r) {
    CHECK(std::abs(res[r].loss - ref.loss.loss) <= 1e-4 * std::max(1.0, std::abs(ref.loss.loss)));
    if (root == pc::all_ranks || root == r) check_close(dx[r], ref.dx, tol_grad, "input gradient");
    for (i64 i = 0; i < shards.real_rows(r) * H; ++i) dw_all.push_back(dw[r][i]);
    for (i64 i = shards.real_rows(r) * H; i < S * H; ++i) CHECK(dw[r][i] == 0.f);
  }
  check_close(dw_all, ref.dw, tol_grad, "weight gradient");
}

}  // namespace

TEST_CASE("cuda output_layer_forward_backward over NCCL matches the host reference",
          "[gpu][nccl][vocab]") {
  const auto devices = all_devices();
  auto comms = pc::nccl_communicator::init_all(devices);
  const int n = static_cast<int>(devices.size());
  std::mt19937_64 rng(8);
  for (int trial = 0; trial < 3; ++trial) {
    const pipit_test::vocab_shape s{100 + 50 * trial, 32, 700 + 311 * trial, n, trial == 1 ? 8 : 1};
    auto pf = pipit_test::make_vocab_problem(rng, s, round_as<float>, 3.0, 0.2, trial == 2);
    pf.opt.label_smoothing = trial == 1 ? 0.1 : 0.0;
    pf.opt.z_loss = trial == 2 ? 1e-3 : 0.0;
    const int root = trial == 0 ? pc::all_ranks : n - 1;
    INFO("trial " << trial << " ranks " << n);
    check_driver<v::naive, float>(comms, pf, algorithm::naive, 1e-4, root);
    check_driver<v::two_barrier, float>(comms, pf, algorithm::two_barrier, 1e-4, root);
    check_driver<v::one_barrier, float>(comms, pf, algorithm::one_barrier, 1e-4, root);
    auto pb = pipit_test::make_vocab_problem(rng, s, round_as<bf16>, 3.0, 0.2, trial == 2);
    check_driver<v::one_barrier, bf16>(comms, pb, algorithm::one_barrier, 1.5e-2, root);
    check_driver<v::two_barrier, bf16>(comms, pb, algorithm::two_barrier, 1.5e-2, root);
  }
}

TEST_CASE("cuda embedding_forward and embedding_backward over NCCL", "[gpu][nccl][vocab]") {
  const auto devices = all_devices();
  auto comms = pc::nccl_communicator::init_all(devices);
  const int n = static_cast<int>(devices.size());
  const i64 V = 301, H = 40, T = 257;
  const v::vocab_shards shards(V, n, 4);
  const i64 S = shards.shard_size();
  std::mt19937_64 rng(9);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> table(static_cast<std::size_t>(V * H)), gout(static_cast<std::size_t>(T * H));
  for (float& a : table) a = u(rng);
  for (float& a : gout) a = u(rng);
  std::vector<i64> tokens(static_cast<std::size_t>(T));
  for (i64& t : tokens) t = static_cast<i64>(rng() % 50) * 6;  // repeated ids
  std::vector<std::vector<float>> out(devices.size()), grad(devices.size());
  on_every_rank(comms, [&](pc::nccl_communicator& comm) {
    const int r = comm.rank();
    pc::stream s;
    const auto range = shards.real_range_of(r);
    std::vector<float> shard(static_cast<std::size_t>(S * H), 0.f);
    std::copy(table.begin() + range.begin * H, table.begin() + range.end * H, shard.begin());
    auto d_shard = upload(shard, s);
    auto d_tokens = upload(tokens, s);
    auto d_out = upload(std::vector<float>(static_cast<std::size_t>(T * H), -1.f), s);
    auto d_g = upload(r == 0 ? gout : std::vector<float>(gout.size(), 0.f), s);
    auto d_grad = upload(std::vector<float>(shard.size(), 0.f), s);
    pc::entry_check check(s);
    const std::span<const i64> tok(d_tokens.data(), tokens.size());
    pc::embedding_forward(comm, s, shards, v::make_view<const float>(d_shard.data(), S, H), tok,
                          v::make_view(d_out.data(), T, H), check, -1);
    pc::embedding_backward(comm, s, shards, tok, v::make_view(d_g.data(), T, H),
                           v::make_view(d_grad.data(), S, H), check, 0);
    check.raise_if_bad_ids(tok, V, "tokens");
    out[r] = download(d_out, s);
    grad[r] = download(d_grad, s);
  });
  for (int r = 0; r < n; ++r) {
    for (i64 t = 0; t < T; ++t)
      for (i64 j = 0; j < H; ++j) CHECK(out[r][t * H + j] == table[tokens[t] * H + j]);
    const auto range = shards.real_range_of(r);
    for (i64 row = 0; row < S; ++row)
      for (i64 j = 0; j < H; ++j) {
        float want = 0.f;  // the host's order: token by token
        for (i64 t = 0; t < T; ++t)
          if (row < range.size() && tokens[t] == range.begin + row) want += gout[t * H + j];
        CHECK(grad[r][row * H + j] == want);
      }
  }
}
