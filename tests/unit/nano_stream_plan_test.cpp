// nano::stream_plan, the host half of cuda::nano_stream_runner: which cross-stream waits and
// events a nano_program needs when each kind is one in-order stream. Checked on hand-worked
// programs and, on random graphs and splits, against a reachability closure of the
// happens-before graph the plan induces (stream order plus waits): every dependency of every
// nano-op must be reached (correct), and no wait may be implied by the others (minimal).
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/op_graph.hpp"
#include "pipit/nano/stream_plan.hpp"

namespace {

namespace nano = pipit::nano;
using nano::resource;

std::vector<int> waits_of(const nano::stream_plan& plan, int i) {
  const auto w = plan.waits(i);
  return {w.begin(), w.end()};
}

// reach[a][b]: nano-op a completes before nano-op b starts, by stream order and the plan's
// waits (reflexive). Edges only go from lower to higher program index, so one pass suffices.
std::vector<std::vector<char>> closure(const nano::nano_program& p, const nano::stream_plan& plan) {
  const int n = p.size();
  std::vector<std::vector<char>> reach(static_cast<std::size_t>(n),
                                       std::vector<char>(static_cast<std::size_t>(n), 0));
  std::vector<int> prev(static_cast<std::size_t>(n), -1);
  for (int k = 0; k < nano::resource_count; ++k) {
    const auto q = p.queue(static_cast<resource>(k));
    for (std::size_t j = 1; j < q.size(); ++j) prev[static_cast<std::size_t>(q[j])] = q[j - 1];
  }
  for (int b = 0; b < n; ++b) {
    auto& rb = reach[static_cast<std::size_t>(b)];
    rb[static_cast<std::size_t>(b)] = 1;
    std::vector<int> in = waits_of(plan, b);
    if (prev[static_cast<std::size_t>(b)] >= 0) in.push_back(prev[static_cast<std::size_t>(b)]);
    for (int a : in) {
      REQUIRE(a < b);
      for (int x = 0; x < n; ++x)  // whatever reaches a reaches b
        if (reach[static_cast<std::size_t>(a)][static_cast<std::size_t>(x)])
          rb[static_cast<std::size_t>(x)] = 1;
    }
  }
  // reach[b][x]: x reaches b; transpose to t[a][b]: a completes before b starts.
  std::vector<std::vector<char>> t(static_cast<std::size_t>(n),
                                   std::vector<char>(static_cast<std::size_t>(n), 0));
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b)
      t[static_cast<std::size_t>(a)][static_cast<std::size_t>(b)] =
          reach[static_cast<std::size_t>(b)][static_cast<std::size_t>(a)];
  return t;
}

void check_plan(const nano::nano_program& p) {
  const nano::stream_plan plan(p);
  const auto before = closure(p, plan);
  std::vector<int> prev(static_cast<std::size_t>(p.size()), -1);
  for (int k = 0; k < nano::resource_count; ++k) {
    const auto q = p.queue(static_cast<resource>(k));
    CHECK(plan.used(static_cast<resource>(k)) == !q.empty());
    for (std::size_t j = 0; j < q.size(); ++j) {
      CHECK(plan.position(q[j]) == static_cast<int>(j));
      if (j) prev[static_cast<std::size_t>(q[j])] = q[j - 1];
    }
  }
  int cross = 0;
  std::vector<int> slot_used(static_cast<std::size_t>(plan.events()), 0);
  for (int i = 0; i < p.size(); ++i) {
    for (int d : p.deps(i)) {
      CHECK(before[static_cast<std::size_t>(d)][static_cast<std::size_t>(i)]);  // correct
      if (p[d].kind != p[i].kind) ++cross;
    }
    const auto w = waits_of(plan, i);
    for (int d : w) {
      CHECK(p[d].kind != p[i].kind);  // a stream never waits for itself
      REQUIRE(plan.event(d) >= 0);
      REQUIRE(plan.event(d) < plan.events());
      slot_used[static_cast<std::size_t>(plan.event(d))] = 1;
      // Minimal: d is not already before i through i's stream predecessor or another wait.
      const int pr = prev[static_cast<std::size_t>(i)];
      bool implied = pr >= 0 && before[static_cast<std::size_t>(d)][static_cast<std::size_t>(pr)];
      for (int e : w)
        if (e != d && before[static_cast<std::size_t>(d)][static_cast<std::size_t>(e)])
          implied = true;
      CHECK_FALSE(implied);
    }
  }
  CHECK(plan.cross_dependencies() == cross);
  CHECK(plan.wait_count() <= cross);
  // Every event slot belongs to exactly one nano-op, and someone waits for it.
  std::vector<int> owners(static_cast<std::size_t>(plan.events()), 0);
  for (int i = 0; i < p.size(); ++i)
    if (plan.event(i) >= 0) ++owners[static_cast<std::size_t>(plan.event(i))];
  for (int s = 0; s < plan.events(); ++s) {
    CHECK(owners[static_cast<std::size_t>(s)] == 1);
    CHECK(slot_used[static_cast<std::size_t>(s)] == 1);
  }
}

}  // namespace

TEST_CASE("stream plan of a chain across kinds split in two", "[nano][stream]") {
  // norm (memory) -> gemm (compute) -> reduce (network) -> residual (memory, also reads norm)
  nano::op_graph g;
  const int norm = g.add("norm", resource::memory);
  const int gemm = g.add("gemm", resource::compute, {norm});
  const int red = g.add("reduce", resource::network, {gemm});
  g.add("residual", resource::memory, {red, norm});
  const nano::nano_program p(g, nano::nano_batch::uniform(g, 4, 2));
  // nano-ops: 0,1 norm; 2,3 gemm; 4,5 reduce; 6,7 residual
  const nano::stream_plan plan(p);
  CHECK(waits_of(plan, 0).empty());
  CHECK(waits_of(plan, 1).empty());
  CHECK(waits_of(plan, 2) == std::vector<int>{0});
  CHECK(waits_of(plan, 3) == std::vector<int>{1});
  CHECK(waits_of(plan, 4) == std::vector<int>{2});
  CHECK(waits_of(plan, 5) == std::vector<int>{3});
  CHECK(waits_of(plan, 6) == std::vector<int>{4});  // norm rows 0..1: same stream, no wait
  CHECK(waits_of(plan, 7) == std::vector<int>{5});
  CHECK(plan.cross_dependencies() == 6);
  CHECK(plan.wait_count() == 6);
  CHECK(plan.events() == 6);
  CHECK(plan.event(6) == -1);
  CHECK(plan.event(7) == -1);
  CHECK(plan.position(6) == 2);
  check_plan(p);
}

TEST_CASE("stream plan drops the waits that others imply", "[nano][stream]") {
  // out (memory) reads gemm (compute) and reduce (network); reduce itself waited for gemm, so
  // waiting for reduce is enough.
  nano::op_graph g;
  const int in = g.add("in", resource::memory);
  const int gemm = g.add("gemm", resource::compute, {in});
  const int red = g.add("reduce", resource::network, {gemm});
  g.add("out", resource::memory, {gemm, red});
  const nano::nano_program p(g, nano::nano_batch::none(g, 3));
  const nano::stream_plan plan(p);
  CHECK(waits_of(plan, 3) == std::vector<int>{2});
  CHECK(plan.cross_dependencies() == 4);
  CHECK(plan.wait_count() == 3);
  CHECK(plan.event(1) >= 0);   // reduce waits for gemm
  CHECK(plan.event(2) >= 0);   // out waits for reduce
  CHECK(plan.event(0) >= 0);   // gemm waits for in
  CHECK(plan.event(3) == -1);  // nobody waits for out
  check_plan(p);

  // A later nano-op on a stream covers the earlier ones of that stream: nano-op (out, 0) of a
  // split where out is unsplit needs both gemm halves but waits only for the second.
  nano::op_graph g2;
  const int a = g2.add("a", resource::compute);
  g2.add("b", resource::memory, {a});
  nano::nano_batch split = nano::nano_batch::none(g2, 6);
  split.set(g2, a, {2, 4});
  const nano::nano_program p2(g2, split);
  const nano::stream_plan plan2(p2);
  CHECK(waits_of(plan2, 2) == std::vector<int>{1});
  CHECK(plan2.event(0) == -1);
  CHECK(plan2.events() == 1);
  check_plan(p2);
}

TEST_CASE("stream plan of one kind needs no events", "[nano][stream]") {
  nano::op_graph g;
  const int a = g.add("a", resource::compute);
  const int b = g.add("b", resource::compute, {a});
  g.add("c", resource::compute, {a, b});
  const nano::nano_program p(g, nano::nano_batch::uniform(g, 7, 3));
  const nano::stream_plan plan(p);
  CHECK(plan.events() == 0);
  CHECK(plan.wait_count() == 0);
  CHECK(plan.cross_dependencies() == 0);
  CHECK(plan.used(resource::compute));
  CHECK_FALSE(plan.used(resource::memory));
  CHECK_FALSE(plan.used(resource::network));
  CHECK_THROWS_WITH(plan.waits(p.size()), "pipit::nano::stream_plan: no nano-op 9 (9)");
}

TEST_CASE("stream plan of random programs is correct and minimal", "[nano][stream]") {
  std::mt19937 gen(17);
  for (int trial = 0; trial < 40; ++trial) {
    nano::op_graph g;
    const int ops = 4 + trial % 9;
    for (int o = 0; o < ops; ++o) {
      std::vector<int> deps;
      for (int d = 0; d < o; ++d)
        if (std::uniform_int_distribution<int>(0, 2)(gen) == 0) deps.push_back(d);
      g.add("op" + std::to_string(o),
            static_cast<resource>(std::uniform_int_distribution<int>(0, 2)(gen)), deps);
    }
    const std::int64_t rows = 11;
    std::vector<std::vector<std::int64_t>> sizes;
    for (int o = 0; o < ops; ++o) {
      // a random composition of the rows into 1..4 parts
      const int parts = std::uniform_int_distribution<int>(1, 4)(gen);
      std::vector<std::int64_t> cut{0, rows};
      while (static_cast<int>(cut.size()) < parts + 1) {
        const std::int64_t c = std::uniform_int_distribution<std::int64_t>(1, rows - 1)(gen);
        if (std::find(cut.begin(), cut.end(), c) == cut.end()) cut.push_back(c);
      }
      std::sort(cut.begin(), cut.end());
      std::vector<std::int64_t> s;
      for (std::size_t j = 1; j < cut.size(); ++j) s.push_back(cut[j] - cut[j - 1]);
      sizes.push_back(s);
    }
    INFO("trial " << trial);
    check_plan(nano::nano_program(g, nano::nano_batch(g, rows, sizes)));
  }
}

TEST_CASE("default stream priorities put the network first and compute last", "[nano][stream]") {
  using A = std::array<int, nano::resource_count>;  // compute, memory, network
  CHECK(nano::default_stream_priorities(0, -5) == A{0, -3, -5});
  CHECK(nano::default_stream_priorities(0, -2) == A{0, -1, -2});
  CHECK(nano::default_stream_priorities(0, -1) == A{0, -1, -1});
  CHECK(nano::default_stream_priorities(0, 0) == A{0, 0, 0});
  CHECK_THROWS_WITH(nano::default_stream_priorities(-1, 0),
                    "pipit::nano::default_stream_priorities: greatest priority 0 is numerically "
                    "above the least -1 (CUDA: lower is more urgent)");
}
