// The GPT example's data: the synthetic language's exact entropy rate against two empirical
// estimates from sampled text, its determinism and its refusals; the token-file reader.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "data_source.hpp"
#include "synthetic_language.hpp"
#include "token_file.hpp"

namespace {

TEST_CASE(
    "synthetic language: the entropy rate matches the empirical per-token loss of the true model",
    "[gpt]") {
  const gpt::synthetic_language lang(64, 5, 1.1, 3);
  // H = -sum p_k ln p_k for p_k proportional to k^-1.1, k = 1..5, computed here independently.
  double z = 0, h = 0;
  for (int k = 1; k <= 5; ++k) z += std::pow(k, -1.1);
  for (int k = 1; k <= 5; ++k) h -= std::pow(k, -1.1) / z * std::log(std::pow(k, -1.1) / z);
  CHECK(std::abs(lang.entropy_rate() - h) < 1e-14);

  // -log P(x_{t+1} | x_t) over sampled text: the successor ranks are drawn independently of the
  // past, so these terms are i.i.d. and their mean has standard error sd / sqrt(N).
  std::vector<std::int32_t> seq(4001);
  double sum = 0, sum_sq = 0;
  long count = 0;
  std::map<std::pair<int, int>, long> pairs;
  std::map<int, long> from;
  for (std::uint64_t key = 0; key < 50; ++key) {
    lang.sequence(key, seq);
    for (std::size_t t = 0; t + 1 < seq.size(); ++t) {
      const double p = lang.probability(seq[t], seq[t + 1]);
      REQUIRE(p > 0);
      sum += -std::log(p);
      sum_sq += std::log(p) * std::log(p);
      ++count;
      ++pairs[{seq[t], seq[t + 1]}];
      ++from[seq[t]];
    }
  }
  const double mean = sum / count, sd = std::sqrt(sum_sq / count - mean * mean);
  const double se = sd / std::sqrt(static_cast<double>(count));
  INFO("entropy rate " << lang.entropy_rate() << ", estimate " << mean << " +- " << se);
  CHECK(std::abs(mean - lang.entropy_rate()) < 5 * se);

  // The plug-in estimate from transition counts alone, sum_s n_s/N H(empirical row s): it does
  // not use the model's probabilities. Its bias is about -(K - 1) / (2 n_s) per state, < 1e-3.
  double plug_in = 0;
  for (const auto& [pair, n] : pairs) {
    const double ns = static_cast<double>(from[pair.first]);
    plug_in -= static_cast<double>(n) / count * std::log(static_cast<double>(n) / ns);
  }
  INFO("plug-in estimate " << plug_in);
  CHECK(std::abs(plug_in - lang.entropy_rate()) < 0.01);
  // No state has more than K successors, and the frequent ones show all K.
  std::map<int, std::set<int>> successors;
  for (const auto& [pair, n] : pairs) successors[pair.first].insert(pair.second);
  for (const auto& [s, set] : successors) {
    CHECK(set.size() <= 5u);
    if (from[s] > 2000) CHECK(set.size() == 5u);
  }
}

TEST_CASE("synthetic language: rows are distinct successors, sequences are deterministic",
          "[gpt]") {
  const gpt::synthetic_language lang(1000, 16, 1.0, 7);
  for (int s = 0; s < 1000; ++s) {
    const auto row = lang.successors_of(s);
    const std::set<std::int32_t> distinct(row.begin(), row.end());
    REQUIRE(distinct.size() == 16u);
    for (const auto id : row) REQUIRE((id >= 0 && id < 1000));
  }
  std::vector<std::int32_t> a(100), b(100), c(100);
  lang.sequence(42, a);
  lang.sequence(42, b);
  lang.sequence(43, c);
  CHECK(a == b);
  CHECK(a != c);
  // The successors are log-uniform over the ids: low ids are much more frequent than high ones.
  long low = 0, high = 0;
  for (int s = 0; s < 1000; ++s)
    for (const auto id : lang.successors_of(s)) {
      if (id < 100) ++low;
      if (id >= 900) ++high;
    }
  CHECK(low > 10 * high);
}

TEST_CASE("synthetic language refuses bad parameters with their values", "[gpt]") {
  CHECK_THROWS_WITH(gpt::synthetic_language(64, 40, 1.0, 1),
                    Catch::Contains("successors must be in [2, vocab / 2 = 32] (got 40)"));
  CHECK_THROWS_WITH(gpt::synthetic_language(2, 1, 1.0, 1),
                    Catch::Contains("vocab must be >= 4 (got 2)"));
  CHECK_THROWS_WITH(gpt::synthetic_language(64, 4, -1.0, 1),
                    Catch::Contains("alpha must be finite and >= 0 (got -1)"));
}

std::string temp_file(const std::string& name, const std::vector<unsigned char>& bytes) {
  const std::string path = std::string(P_tmpdir) + "/pipit_gpt_" + name;
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  return path;
}

TEST_CASE("token file: uint16 and uint32 little-endian ids, windows of the file", "[gpt]") {
  std::vector<unsigned char> b16, b32;
  std::vector<std::int32_t> ids;
  for (int i = 0; i < 50; ++i) {
    const std::uint32_t v = static_cast<std::uint32_t>((i * 977) % 60000);
    ids.push_back(static_cast<std::int32_t>(v));
    b16.push_back(static_cast<unsigned char>(v & 0xff));
    b16.push_back(static_cast<unsigned char>(v >> 8));
    const std::uint32_t w = v + 70000u;
    for (int k = 0; k < 4; ++k) b32.push_back(static_cast<unsigned char>(w >> (8 * k)));
  }
  const gpt::token_file f16(temp_file("u16.bin", b16), 2, 60000, 5);
  REQUIRE(f16.size() == 50u);
  CHECK(std::vector<std::int32_t>(f16.tokens().begin(), f16.tokens().end()) == ids);
  const gpt::token_file f32(temp_file("u32.bin", b32), 4, 130000, 5);
  REQUIRE(f32.size() == 50u);
  CHECK(f32.tokens()[3] == ids[3] + 70000);
  // A window is a run of consecutive tokens of the file.
  std::vector<std::int32_t> w(9);
  for (std::uint64_t key = 0; key < 20; ++key) {
    f16.sequence(key, w);
    const auto at = std::search(ids.begin(), ids.end(), w.begin(), w.end());
    CHECK(at != ids.end());
  }
  // As a data source: batch sequences of seq + 1 tokens.
  const gpt::data_source src{gpt::token_file(temp_file("u16.bin", b16), 2, 60000, 5)};
  CHECK(!src.entropy_bound());
  gpt::model_config c;
  c.vocab = 60000, c.seq = 4, c.batch = 3;
  std::vector<std::int32_t> mb(15);
  src.microbatch(c, 1, 0, 0, 0, mb);
  CHECK_THROWS_WITH(src.microbatch(c, 1, 0, 0, 0, w),
                    Catch::Contains("microbatch buffer of 9 tokens, expected 15"));
}

TEST_CASE("token file refuses bad files with the offending values", "[gpt]") {
  CHECK_THROWS_WITH(gpt::token_file(temp_file("odd.bin", {1, 2, 3}), 2, 100),
                    Catch::Contains("has 3 bytes, not a multiple of 2"));
  CHECK_THROWS_WITH(gpt::token_file(temp_file("big.bin", {1, 0, 200, 0}), 2, 100),
                    Catch::Contains("token 1 is 200, outside the vocabulary [0, 100)"));
  CHECK_THROWS_WITH(gpt::token_file("/nonexistent/pipit.bin", 2, 100),
                    Catch::Contains("cannot open"));
  CHECK_THROWS_WITH(gpt::token_file(temp_file("x.bin", {1, 0}), 3, 100),
                    Catch::Contains("must be 2 (uint16) or 4 (uint32), got 3"));
  const gpt::token_file tiny(temp_file("short.bin", {1, 0, 2, 0}), 2, 100);
  std::vector<std::int32_t> w(3);
  CHECK_THROWS_WITH(tiny.sequence(0, w),
                    Catch::Contains("has 2 tokens, fewer than a sequence of 3"));
}

}  // namespace
