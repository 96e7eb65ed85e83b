// Partitions: naive and vocabulary-parallel splits and where every part runs (looped and V
// placement), the layout language and its errors (with the column), and the balanced partition's
// optimality against brute force on every small case.
#include <catch2/catch.hpp>

#include <algorithm>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "pipit/partition/balanced.hpp"
#include "pipit/partition/layout.hpp"
#include "pipit/partition/naive.hpp"
#include "pipit/partition/partition.hpp"
#include "pipit/partition/vocab_parallel.hpp"

using namespace pipit::partition;
using pipit::schedule::placement;

namespace {

// Every way to cut `n` items into `parts` contiguous groups, each at least `min_size[k]` long.
void for_each_split(int n, const std::vector<int>& min_size,
                    const std::function<void(const std::vector<int>&)>& f) {
  std::vector<int> sizes(min_size.size());
  std::function<void(std::size_t, int)> rec = [&](std::size_t k, int left) {
    if (k + 1 == sizes.size()) {
      if (left < min_size[k]) return;
      sizes[k] = left;
      f(sizes);
      return;
    }
    for (int s = min_size[k]; s <= left; ++s) {
      sizes[k] = s;
      rec(k + 1, left - s);
    }
  };
  rec(0, n);
}

std::vector<double> group_sums(const std::vector<double>& w, const std::vector<int>& sizes) {
  std::vector<double> out;
  std::size_t i = 0;
  for (const int s : sizes) {
    double sum = 0;
    for (int k = 0; k < s; ++k) sum += w[i++];
    out.push_back(sum);
  }
  return out;
}

// Rank loads of a V split: rank r holds groups r and 2p − 1 − r.
std::vector<double> v_loads(const std::vector<double>& w, const std::vector<int>& sizes) {
  const auto g = group_sums(w, sizes);
  const std::size_t p = g.size() / 2;
  std::vector<double> out(p);
  for (std::size_t r = 0; r < p; ++r) out[r] = g[r] + g[2 * p - 1 - r];
  return out;
}

double max_of(const std::vector<double>& v) {
  return *std::max_element(v.begin(), v.end());
}
double squares_of(const std::vector<double>& v) {
  double s = 0;
  for (const double x : v) s += x * x;
  return s;
}

// Random weights: small integers (many ties) or reals.
std::vector<double> random_weights(std::mt19937& rng, int n, bool integers) {
  std::uniform_int_distribution<int> small(0, 4);
  std::uniform_real_distribution<double> real(0.0, 10.0);
  std::vector<double> w;
  for (int i = 0; i < n; ++i) w.push_back(integers ? small(rng) : real(rng));
  return w;
}

}  // namespace

TEST_CASE("naive splits layers evenly, embedding first, output last", "[partition]") {
  const partition p = naive(30, {.ranks = 8});
  REQUIRE(p.virtual_stages() == 8);
  CHECK(p.layer_count() == 30);
  // even_split: the first 30 % 8 = 6 stages get one more.
  CHECK(to_layout(p) == "E t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*3 | t*3 L");
  CHECK(p.embedding() == location{0, 0, 0});
  CHECK(p.output() == location{7, 0, 7});
  CHECK(p.layer(0) == location{0, 0, 0});
  CHECK(p.layer(4) == location{1, 0, 1});
  CHECK(p.layer(29) == location{7, 0, 7});
  CHECK_THROWS_WITH(p.layer(30), Catch::Contains("no layer 30"));
  // Looped interleaving: virtual stage s on rank s mod p.
  const partition il = naive(16, {.ranks = 4, .chunks = 2});
  CHECK(il.layer(15) == location{3, 1, 7});
  CHECK(il.layer(9) == location{0, 1, 4});
  // V placement: the first and the last stage both on rank 0.
  const partition v = naive(16, {.ranks = 4, .chunks = 2, .place = placement::v_shape});
  CHECK(v.embedding() == location{0, 0, 0});
  CHECK(v.output() == location{0, 1, 7});
  CHECK(v.layer(8) == location{3, 1, 4});  // the V's tip: stages 3 and 4 share rank 3
  CHECK(v.stages_of(0) == std::vector<int>{0, 7});
  CHECK(v.stages_of(3) == std::vector<int>{3, 4});
  // Constant expressions.
  STATIC_REQUIRE(naive(8, {.ranks = 4}).stages[3].output);
  STATIC_REQUIRE(naive(8, {.ranks = 2, .chunks = 2, .place = placement::v_shape}).output().rank ==
                 0);
}

TEST_CASE("vocabulary-parallel partitions hold no vocabulary layer", "[partition]") {
  const partition p = vocab_parallel(32, {.ranks = 8});
  CHECK(p.vocab_parallel);
  CHECK(to_layout(p) == "t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4");
  CHECK(p.embedding() == location{});
  CHECK(p.output() == location{});
  STATIC_REQUIRE(vocab_parallel(8, {.ranks = 4}).vocab_parallel);
}

TEST_CASE("partitions needing a layer per stage refuse too few layers", "[partition]") {
  CHECK_THROWS_WITH(naive(3, {.ranks = 4}),
                    Catch::Contains("naive partition needs at least one transformer layer per "
                                    "stage: layers (3) < stages (4 = ranks 4 x chunks 1)"));
  CHECK_THROWS_WITH(vocab_parallel(7, {.ranks = 4, .chunks = 2}),
                    Catch::Contains("layers (7) < stages (8 = ranks 4 x chunks 2)"));
  CHECK_THROWS_WITH(naive(0, {.ranks = 1}), Catch::Contains("layers (0) < stages (1"));
  CHECK_THROWS_WITH(naive(8, {.ranks = 0}), Catch::Contains("ranks must be >= 1 (got 0)"));
  CHECK_THROWS_WITH(naive(8, {.ranks = 4, .chunks = 3, .place = placement::v_shape}),
                    Catch::Contains("V-shaped placement needs exactly 2 chunks per rank (got 3)"));
  // balanced counts E and L as items: 2 layers + E + L fill 4 stages, not 5.
  CHECK_NOTHROW(balanced(2, 0.1, 1, 1, {.ranks = 4}));
  CHECK_THROWS_WITH(balanced(2, 0.1, 1, 1, {.ranks = 5}),
                    Catch::Contains("2 layers + the embedding + the output layer = 4 items < "
                                    "stages (5"));
}

TEST_CASE("layouts parse, repeat and round-trip", "[partition]") {
  const partition a = layout("E t t t | t t t t | t t t t | t t L", {.ranks = 4}, 13);
  CHECK(to_layout(a) == "E t*3 | t*4 | t*4 | t*2 L");
  CHECK(layout("E t*3 | t*4 | t*4 | t*2 L", {.ranks = 4}) == a);
  CHECK(layout("E,t*3|t*4,|t *4|t* 2,L", {.ranks = 4}) == a);
  CHECK(layout(to_layout(a), {.ranks = 4}) == a);
  // A parenthesised group repeated, bars inside.
  const partition g = layout("E t*2 | (t*3 |)*2 t L", {.ranks = 4});
  CHECK(to_layout(g) == "E t*2 | t*3 | t*3 | t L");
  CHECK(layout("E (t t)*2 | ((t)*2 |)*2 L", {.ranks = 4}).layer_count() == 8);
  // Empty stages are allowed; a layout without E and L is vocabulary parallel.
  CHECK(to_layout(layout("E | t*4 | t*4 | L", {.ranks = 4})) == "E | t*4 | t*4 | L");
  const partition vp = layout("t*4 | t*4", {.ranks = 2});
  CHECK(vp.vocab_parallel);
  // V placement: stages in pipeline order, the ends on rank 0.
  const partition v =
      layout("E t | t*2 | t*2 | t L", {.ranks = 2, .chunks = 2, .place = placement::v_shape});
  CHECK(v.output().rank == 0);
  CHECK(v.layer(3) == location{1, 1, 2});
  STATIC_REQUIRE(layout("E t | t*3 L", {.ranks = 2}).stages[1].layers == 3);
}

TEST_CASE("layout errors point at the column", "[partition]") {
  const pipeline p4{.ranks = 4};
  CHECK_THROWS_WITH(layout("E t t x | t L", p4),
                    Catch::Contains("unexpected 'x'") && Catch::Contains("at column 7") &&
                        Catch::Contains("\n  E t t x | t L\n        ^"));
  CHECK_THROWS_WITH(layout("E t* | t L", p4),
                    Catch::Contains("expected a repetition count after '*' at column 6"));
  CHECK_THROWS_WITH(layout("E t*0 | t L", p4),
                    Catch::Contains("repetition count must be >= 1 at column 5"));
  CHECK_THROWS_WITH(layout("*2 E t | t L", p4),
                    Catch::Contains("'*' must follow E, t, L or a ')' at column 1"));
  CHECK_THROWS_WITH(layout("E t |*3 t L", p4),
                    Catch::Contains("'*' must follow E, t, L or a ')' at column 6"));
  CHECK_THROWS_WITH(layout("E (t | t L", p4), Catch::Contains("unclosed '(' at column 3"));
  CHECK_THROWS_WITH(layout("E t) | t L", p4),
                    Catch::Contains("unexpected ')' without a matching '(' at column 4"));
  CHECK_THROWS_WITH(layout("t E | t L", p4),
                    Catch::Contains("E must be the first item of the first stage at column 3"));
  CHECK_THROWS_WITH(layout("E t | t L | t", p4),
                    Catch::Contains("L must be the last item of the last stage at column 9"));
  CHECK_THROWS_WITH(layout("E t | t L t", p4),
                    Catch::Contains("L must be the last item of the last stage at column 9"));
  CHECK_THROWS_WITH(layout("E E t | t L", p4), Catch::Contains("a second E at column 3"));
  CHECK_THROWS_WITH(layout("E t | t", p4), Catch::Contains("E without L"));
  CHECK_THROWS_WITH(layout("t | t L", p4),
                    Catch::Contains("L without E") && Catch::Contains("at column 1"));
  CHECK_THROWS_WITH(layout("E t*3 | t*4 | t*4 L", p4),
                    Catch::Contains("has 3 stages but the pipeline has 4 (ranks 4 x chunks 1)"));
  CHECK_THROWS_WITH(layout("E t*3 | t*4 | t*4 | t*4 L", p4, 14),
                    Catch::Contains("has 15 transformer layers (t) but the model has 14"));
}

TEST_CASE("min_max_split is optimal: brute force over every split of up to 10 items",
          "[partition][brute]") {
  std::mt19937 rng(20250101);
  int cases = 0;
  for (int n = 1; n <= 10; ++n)
    for (int parts = 1; parts <= n; ++parts)
      for (int trial = 0; trial < 6; ++trial) {
        const auto w = random_weights(rng, n, trial % 2 == 0);
        const std::vector<int> sizes = min_max_split(w, parts);
        REQUIRE(static_cast<int>(sizes.size()) == parts);
        for (const int s : sizes) REQUIRE(s >= 1);
        const auto mine = group_sums(w, sizes);
        double best = 1e300, best_squares = 1e300;
        for_each_split(n, std::vector<int>(static_cast<std::size_t>(parts), 1),
                       [&](const std::vector<int>& sz) {
                         const auto g = group_sums(w, sz);
                         best = std::min(best, max_of(g));
                       });
        for_each_split(n, std::vector<int>(static_cast<std::size_t>(parts), 1),
                       [&](const std::vector<int>& sz) {
                         const auto g = group_sums(w, sz);
                         if (max_of(g) <= best + 1e-9)
                           best_squares = std::min(best_squares, squares_of(g));
                       });
        INFO("n=" << n << " parts=" << parts << " trial=" << trial);
        CHECK(max_of(mine) == Approx(best).margin(1e-9));              // optimal
        CHECK(squares_of(mine) == Approx(best_squares).margin(1e-9));  // and the most even
        ++cases;
      }
  CHECK(cases == 330);
}

TEST_CASE("min_max_v_split is optimal per rank: brute force over every V split",
          "[partition][brute]") {
  std::mt19937 rng(7);
  for (int ranks = 1; ranks <= 3; ++ranks)
    for (int n = 2; n <= 8; ++n)
      for (int trial = 0; trial < 5; ++trial) {
        const auto w = random_weights(rng, n, trial % 2 == 0);
        const std::vector<int> sizes = min_max_v_split(w, ranks);
        REQUIRE(static_cast<int>(sizes.size()) == 2 * ranks);
        REQUIRE(sizes.front() >= 1);
        REQUIRE(sizes.back() >= 1);
        int total = 0;
        for (const int s : sizes) total += s;
        REQUIRE(total == n);
        std::vector<int> min_size(static_cast<std::size_t>(2 * ranks), 0);
        min_size.front() = min_size.back() = 1;
        double best = 1e300, best_squares = 1e300;
        for_each_split(n, min_size, [&](const std::vector<int>& sz) {
          best = std::min(best, max_of(v_loads(w, sz)));
        });
        for_each_split(n, min_size, [&](const std::vector<int>& sz) {
          const auto l = v_loads(w, sz);
          if (max_of(l) <= best + 1e-9) best_squares = std::min(best_squares, squares_of(l));
        });
        INFO("ranks=" << ranks << " n=" << n << " trial=" << trial);
        const auto mine = v_loads(w, sizes);
        CHECK(max_of(mine) == Approx(best).margin(1e-9));
        CHECK(squares_of(mine) == Approx(best_squares).margin(1e-6));
      }
}

TEST_CASE("balanced places E, the layers and L by cost", "[partition]") {
  // E = 0, eight layers of 1, L = 3 over 4 stages: the bound 11/4 rounds up to 3; the most even
  // split puts the lighter stage first.
  const partition p = balanced(8, 0.0, 1.0, 3.0, {.ranks = 4});
  CHECK(to_layout(p) == "E t*2 | t*3 | t*3 | L");
  // A cheap output layer changes nothing: the even split.
  CHECK(to_layout(balanced(8, 0.0, 1.0, 0.5, {.ranks = 4})) == "E t*2 | t*2 | t*2 | t*2 L");
  // Per-layer costs: the heavy layer gets a stage of its own.
  const std::vector<double> costs{1, 1, 6, 1, 1, 1};
  CHECK(to_layout(balanced(costs, 0.0, 1.0, {.ranks = 3})) == "E t*2 | t | t*3 L");
  // V placement: rank 0 holds E and L, so it takes fewer layers: loads 6 and 5 (or 5 and 6)
  // are the best two ranks can do with 11.
  const partition v =
      balanced(8, 0.0, 1.0, 3.0, {.ranks = 2, .chunks = 2, .place = placement::v_shape});
  CHECK(v.output().rank == 0);
  double rank0 = 3, rank1 = 0;
  for (int s = 0; s < 4; ++s) (v.rank_of(s) == 0 ? rank0 : rank1) += v.stages[s].layers;
  CHECK(std::max(rank0, rank1) == 6);
  STATIC_REQUIRE(balanced(4, 0.0, 1.0, 2.0, {.ranks = 3}).stages[2].layers == 0);
}
