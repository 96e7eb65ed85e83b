#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "pipit/pipit.hpp"

TEST_CASE("ceil_div and round_up", "[core][math]") {
  STATIC_REQUIRE(pipit::ceil_div(0, 4) == 0);
  STATIC_REQUIRE(pipit::ceil_div(7, 4) == 2);
  STATIC_REQUIRE(pipit::ceil_div(8, 4) == 2);
  STATIC_REQUIRE(pipit::round_up(50257, 128) == 50304);  // GPT-2's padded vocabulary
  for (long a = 0; a < 200; ++a)
    for (long b = 1; b < 20; ++b) {
      CHECK(pipit::ceil_div(a, b) == (a + b - 1) / b);
      CHECK(pipit::round_up(a, b) % b == 0);
      CHECK(pipit::round_up(a, b) - a < b);
      CHECK(pipit::round_up(a, b) >= a);
    }
}

TEST_CASE("even_split covers 0..n with parts differing by at most one", "[core][math]") {
  for (int n = 0; n < 60; ++n)
    for (int parts = 1; parts < 12; ++parts) {
      int expect_begin = 0;
      int smallest = n, largest = 0;
      for (int i = 0; i < parts; ++i) {
        const auto r = pipit::even_split(n, parts, i);
        CHECK(r.begin == expect_begin);
        expect_begin = r.end;
        smallest = std::min(smallest, r.size());
        largest = std::max(largest, r.size());
        if (i > 0) CHECK(pipit::even_split(n, parts, i - 1).size() >= r.size());
      }
      CHECK(expect_begin == n);
      CHECK(largest - smallest <= 1);
    }
}

TEST_CASE("pipit::error carries the message and PIPIT_REQUIRE names condition and values",
          "[core][error]") {
  const int stages = 3, microbatches = 2;
  try {
    PIPIT_REQUIRE(microbatches >= stages, "microbatches ", microbatches, " < stages ", stages);
    FAIL("PIPIT_REQUIRE did not throw");
  } catch (const pipit::error& e) {
    const std::string what = e.what();
    CHECK(what.find("microbatches >= stages") != std::string::npos);
    CHECK(what.find("microbatches 2 < stages 3") != std::string::npos);
  }
  CHECK_NOTHROW([&] { PIPIT_REQUIRE(stages > 0, "unused"); }());
  CHECK_THROWS_AS(pipit::fail("x"), std::runtime_error);  // catchable as the standard base
}

namespace {
constexpr pipit::fixed_vector<int, 8> squares(int n) {
  pipit::fixed_vector<int, 8> v;
  for (int i = 0; i < n; ++i) v.push_back(i * i);
  return v;
}
}  // namespace

TEST_CASE("fixed_vector works in constant expressions and at run time alike",
          "[core][fixed_vector]") {
  constexpr auto at_compile_time = squares(5);
  STATIC_REQUIRE(at_compile_time.size() == 5);
  STATIC_REQUIRE(at_compile_time[4] == 16);
  const int n = static_cast<int>(std::string("12345").size());  // not a constant
  const auto at_run_time = squares(n);
  CHECK(at_run_time == at_compile_time);
  CHECK(std::vector<int>(at_run_time.begin(), at_run_time.end()) ==
        std::vector<int>{0, 1, 4, 9, 16});

  auto v = at_run_time;
  v.pop_back();
  CHECK(v.size() == 4);
  CHECK_FALSE(v == at_run_time);
  CHECK(v.back() == 9);
  CHECK_THROWS_WITH(v.at(4), Catch::Contains("index 4 out of range (size 4)"));
  CHECK_THROWS_WITH(squares(9), Catch::Contains("capacity 8 exceeded"));
  v.clear();
  CHECK(v.empty());
  CHECK_THROWS_AS(v.pop_back(), pipit::error);
  pipit::fixed_vector<int, 3> init{1, 2, 3};
  CHECK(init.size() == 3);
}

TEST_CASE("version macros agree with the constants", "[core][version]") {
  STATIC_REQUIRE(PIPIT_VERSION ==
                 pipit::version_major * 10000 + pipit::version_minor * 100 + pipit::version_patch);
}
