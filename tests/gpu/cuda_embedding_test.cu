// cuda::embedding_forward_local / embedding_backward_local against the host passes of
// vocab/embedding.hpp on the same shards. The gather is a copy and the sorted scatter adds in the
// host's order, so both are compared exactly (bit for bit); the atomic scatter adds repeated
// tokens in any order, so it is compared to 1e-6 of the largest gradient entry (float rounding
// of at most ~40 terms).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "pipit/cuda/device_buffer.cuh"
#include "pipit/cuda/embedding.cuh"
#include "pipit/cuda/entry_check.cuh"
#include "pipit/cuda/stream.cuh"
#include "pipit/vocab/embedding.hpp"

namespace v = pipit::vocab;
namespace pc = pipit::cuda;
using i64 = std::int64_t;

namespace {

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

}  // namespace

TEST_CASE("cuda embedding gather and scatter-add match the host passes", "[gpu][cuda][vocab]") {
  std::mt19937_64 rng(31);
  std::uniform_real_distribution<float> u(-1, 1);
  pc::stream s;
  for (int trial = 0; trial < 40; ++trial) {
    const i64 T = 1 + static_cast<i64>(rng() % 300), H = 1 + static_cast<i64>(rng() % 70),
              V = 1 + static_cast<i64>(rng() % 200);
    const int n = 1 + static_cast<int>(rng() % 8);
    const v::vocab_shards shards(V, n, trial % 3 ? 1 : 4);
    const i64 S = shards.shard_size();
    INFO("trial " << trial << ": tokens " << T << " hidden " << H << " vocab " << V << " ranks "
                  << n);
    std::vector<i64> tokens(static_cast<std::size_t>(T));
    // Few distinct ids so that many tokens repeat (up to ~T / 4 times).
    const i64 distinct = std::max<i64>(1, std::min<i64>(V, 1 + static_cast<i64>(rng() % 8)));
    for (i64& t : tokens)
      t = static_cast<i64>(rng() % static_cast<std::uint64_t>(distinct)) * (V / distinct);
    std::vector<float> gout(static_cast<std::size_t>(T * H));
    for (float& a : gout) a = u(rng);
    auto d_tokens = upload(tokens, s);
    auto d_gout = upload(gout, s);
    const std::span<const i64> tok(d_tokens.data(), tokens.size());
    for (int r = 0; r < n; ++r) {
      std::vector<float> shard(static_cast<std::size_t>(S * H));
      for (float& a : shard) a = u(rng);
      auto d_shard = upload(shard, s);
      pc::entry_check check(s);
      // gather
      std::vector<float> want(static_cast<std::size_t>(T * H), -1.f);
      v::embedding_forward_local<float, float>(shards, r,
                                               v::make_view<const float>(shard.data(), S, H),
                                               tokens, v::make_view(want.data(), T, H));
      auto d_out = upload(std::vector<float>(want.size(), -1.f), s);
      pc::embedding_forward_local(shards, r, v::make_view<const float>(d_shard.data(), S, H), tok,
                                  v::make_view(d_out.data(), T, H), s, check);
      CHECK(download(d_out, s) == want);
      // scatter-add into a table gradient that already holds values
      std::vector<float> base(static_cast<std::size_t>(S * H));
      for (float& a : base) a = u(rng);
      std::vector<float> host_grad = base;
      v::embedding_backward_local<float, float>(shards, r, tokens,
                                                v::make_view<const float>(gout.data(), T, H),
                                                v::make_view(host_grad.data(), S, H));
      auto d_sorted = upload(base, s);
      pc::embedding_backward_local<pc::sorted_scatter>(
          shards, r, tok, v::make_view<const float>(d_gout.data(), T, H),
          v::make_view(d_sorted.data(), S, H), s, check);
      CHECK(download(d_sorted, s) == host_grad);  // same order of additions: bit-identical
      auto d_atomic = upload(base, s);
      pc::embedding_backward_local<pc::atomic_scatter>(
          shards, r, tok, v::make_view<const float>(d_gout.data(), T, H),
          v::make_view(d_atomic.data(), S, H), s, check);
      const auto atomic = download(d_atomic, s);
      double err = 0, scale = 0;
      for (std::size_t i = 0; i < atomic.size(); ++i) {
        err = std::max(err, std::abs(double(atomic[i]) - double(host_grad[i])));
        scale = std::max(scale, std::abs(double(host_grad[i])));
      }
      CHECK(err <= 1e-6 * scale);
      const auto range = shards.real_range_of(r);  // padding rows keep their values
      for (i64 i = range.size() * H; i < S * H; ++i) CHECK(atomic[i] == base[i]);
      CHECK_NOTHROW(check.raise_if_bad_ids(tok, V, "tokens"));
    }
  }
}

TEST_CASE(
    "cuda embedding: bfloat16 table into a float output, and the sorted scatter is "
    "repeatable",
    "[gpu][cuda][vocab]") {
  pc::stream s;
  const v::vocab_shards shards(1000, 2, 8);
  const i64 S = shards.shard_size(), H = 96, T = 4096;
  std::mt19937_64 rng(3);
  std::vector<__nv_bfloat16> table(static_cast<std::size_t>(S * H));
  for (std::size_t i = 0; i < table.size(); ++i)
    table[i] = __float2bfloat16(0.001f * float(i % 977));
  std::vector<i64> tokens(T);
  for (i64& t : tokens) t = static_cast<i64>(rng() % 1000);
  auto d_table = upload(table, s);
  auto d_tokens = upload(tokens, s);
  const std::span<const i64> tok(d_tokens.data(), tokens.size());
  pc::entry_check check(s);
  pc::device_buffer<float> out(static_cast<std::size_t>(T * H), s);
  pc::embedding_forward_local(shards, 1, v::make_view<const __nv_bfloat16>(d_table.data(), S, H),
                              tok, v::make_view(out.data(), T, H), s, check);
  const auto o = download(out, s);
  for (i64 t = 0; t < T; ++t)
    for (i64 j = 0; j < H; j += 17) {
      const i64 x = tokens[t];
      const float want = x >= S ? __bfloat162float(table[(x - S) * H + j]) : 0.f;
      CHECK(o[t * H + j] == want);
    }
  std::vector<float> g(static_cast<std::size_t>(T * H));
  std::uniform_real_distribution<float> u(-1, 1);
  for (float& a : g) a = u(rng);
  auto d_g = upload(g, s);
  std::vector<float> first;
  for (int rep = 0; rep < 3; ++rep) {
    auto grad = upload(std::vector<float>(static_cast<std::size_t>(S * H), 0.f), s);
    pc::embedding_backward_local(shards, 0, tok, v::make_view<const float>(d_g.data(), T, H),
                                 v::make_view(grad.data(), S, H), s, check);
    const auto h = download(grad, s);
    if (rep == 0)
      first = h;
    else
      CHECK(h == first);
  }
}

TEST_CASE("cuda embedding: ids outside the vocabulary are reported, not read",
          "[gpu][cuda][vocab]") {
  pc::stream s;
  const v::vocab_shards shards(10, 2);
  std::vector<float> table(5 * 2, 1.f);
  auto d_table = upload(table, s);
  auto d_tokens = upload(std::vector<i64>{3, 10, -1, 4}, s);
  const std::span<const i64> tok(d_tokens.data(), 4);
  pc::device_buffer<float> out(4 * 2, s);
  pc::entry_check check(s);
  pc::embedding_forward_local(shards, 0, v::make_view<const float>(d_table.data(), 5, 2), tok,
                              v::make_view(out.data(), 4, 2), s, check);
  try {
    check.raise_if_bad_ids(tok, 10, "tokens");
    FAIL("token 10 of a 10-id vocabulary was accepted");
  } catch (const pipit::error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.find("2 tokens") != std::string::npos);
    CHECK(what.find("token id 10") != std::string::npos);
  }
  const auto o = download(out, s);
  CHECK(o[2] == 0.f);  // the bad rows are zeros
  CHECK(o[4] == 0.f);
}
