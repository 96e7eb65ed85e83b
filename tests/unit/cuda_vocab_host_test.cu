// The host side of the CUDA vocabulary layers, which needs no device: launch-configuration
// arithmetic, workspace sizes, and the shape / option errors raised before any device call.
#include <catch2/catch.hpp>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "pipit/cuda/blas_handle.cuh"
#include "pipit/cuda/embedding.cuh"
#include "pipit/cuda/launch.cuh"
#include "pipit/cuda/output_layer.cuh"

namespace v = pipit::vocab;
namespace pc = pipit::cuda;
using i64 = std::int64_t;

TEST_CASE("cuda launch arithmetic: row and grid-stride blocks", "[cuda]") {
  STATIC_REQUIRE(pc::valid_block_size<256>);
  STATIC_REQUIRE(!pc::valid_block_size<100>);
  STATIC_REQUIRE(!pc::valid_block_size<2048>);
  STATIC_REQUIRE(pc::stride_blocks<256>(0) == 0);
  STATIC_REQUIRE(pc::stride_blocks<256>(1) == 1);
  STATIC_REQUIRE(pc::stride_blocks<256>(256) == 1);
  STATIC_REQUIRE(pc::stride_blocks<256>(257) == 2);
  STATIC_REQUIRE(pc::stride_blocks<128>(i64(1) << 40) == pc::max_blocks);
  STATIC_REQUIRE(pc::row_blocks(8192) == 8192u);
  try {
    (void)pc::row_blocks(i64(1) << 32);
    FAIL("2^32 rows were accepted");
  } catch (const pipit::error& e) {
    CHECK(std::string(e.what()).find("4294967296") != std::string::npos);
  }
  CHECK_THROWS_AS(pc::stride_blocks<256>(-1), pipit::error);
}

TEST_CASE("cuda output layer workspace: chunked, at least 8x below materialised logits", "[cuda]") {
  using bf16_layer = pc::output_layer<v::one_barrier, __nv_bfloat16>;
  using f32_layer = pc::output_layer<v::two_barrier, float, 7>;
  // 8192 tokens, chunks of 1024: logits in fp32 + the bf16 operand = 6 bytes per entry.
  constexpr i64 tokens = 8192, hidden = 4096;
  for (const i64 rows : {i64(16384), i64(32768), i64(65536)}) {
    const std::size_t fused = bf16_layer::workspace_bytes(tokens, hidden, rows, false);
    const std::size_t materialised = std::size_t(tokens) * std::size_t(rows) * (4 + 2);
    INFO("rows " << rows << ": fused " << fused << " B, materialised " << materialised << " B");
    CHECK(fused >= std::size_t(tokens) * 1024 * 6);
    CHECK(materialised >= 8 * fused);
  }
  // A shard smaller than a chunk holds only its rows; float needs no separate operand.
  CHECK(f32_layer::workspace_bytes(10, 3, 5, false) < f32_layer::workspace_bytes(10, 3, 7, false));
  CHECK(f32_layer::workspace_bytes(10, 3, 7, false) ==
        f32_layer::workspace_bytes(10, 3, 70, false));
}

TEST_CASE("cuda output layer: bad shapes and options raise before any device call", "[cuda]") {
  // No handle, no stream, no device memory is needed to reach the checks.
  const pc::blas_handle none = pc::blas_handle::borrow(nullptr);
  const v::vocab_shards shards(100, 2, 1);
  const float* fake = reinterpret_cast<const float*>(std::uintptr_t(256));
  const i64* ids = reinterpret_cast<const i64*>(std::uintptr_t(256));
  const std::span<const i64> targets(ids, 4);
  using layer_t = pc::output_layer<v::two_barrier, float>;
  auto make = [&](int rank, i64 x_rows, i64 w_rows, i64 w_cols, v::loss_options opt = {}) {
    layer_t l(none, nullptr, shards, rank, v::make_view(fake, x_rows, 3),
              v::make_view(fake, w_rows, w_cols), targets, opt);
  };
  try {
    make(0, 4, 49, 3);
    FAIL("a 49-row shard was accepted");
  } catch (const pipit::error& e) {
    const std::string what = e.what();
    CHECK(what.find("49 x 3") != std::string::npos);
    CHECK(what.find("50 x 3") != std::string::npos);
  }
  CHECK_THROWS_WITH(make(0, 5, 50, 3), Catch::Contains("5 x 3") && Catch::Contains("4 x 3"));
  CHECK_THROWS_WITH(make(0, 4, 50, 4), Catch::Contains("50 x 4"));
  CHECK_THROWS_WITH(make(2, 4, 50, 3), Catch::Contains("rank 2"));
  v::loss_options bad;
  bad.label_smoothing = 1.5;
  CHECK_THROWS_WITH(make(0, 4, 50, 3, bad), Catch::Contains("1.5"));
  bad = {};
  bad.z_loss = -1;
  CHECK_THROWS_WITH(make(0, 4, 50, 3, bad), Catch::Contains("z-loss"));
}

TEST_CASE("cuda embedding: bad shapes raise before any device call", "[cuda]") {
  const v::vocab_shards shards(10, 2);
  const float* fake = reinterpret_cast<const float*>(std::uintptr_t(256));
  float* out = reinterpret_cast<float*>(std::uintptr_t(256));
  const std::span<const i64> tokens(reinterpret_cast<const i64*>(std::uintptr_t(256)), 3);
  pc::entry_check unused;
  CHECK_THROWS_WITH(pc::embedding_forward_local(shards, 0, v::make_view(fake, 4, 2), tokens,
                                                v::make_view(out, 3, 2), nullptr, unused),
                    Catch::Contains("4 x 2") && Catch::Contains("5 x 2"));
  CHECK_THROWS_WITH(pc::embedding_forward_local(shards, 0, v::make_view(fake, 5, 2), tokens,
                                                v::make_view(out, 2, 2), nullptr, unused),
                    Catch::Contains("2 x 2") && Catch::Contains("3 x 2"));
  CHECK_THROWS_WITH(pc::embedding_backward_local(shards, 3, tokens, v::make_view(fake, 3, 2),
                                                 v::make_view(out, 5, 2), nullptr, unused),
                    Catch::Contains("rank 3"));
}
