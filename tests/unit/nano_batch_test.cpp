// Nano-batching (NanoFlow) on the host: the op graph, the nano_batch policy and its checks, the
// row-wise dependencies of a nano_program, the runner's dependency order and failure handling,
// the profiler and its agreement across ranks, the cost model's simulator against closed forms,
// the parameter search on synthetic profiles with known answers, and a tensor-parallel decode
// stack on comm::threads (tensor sizes 1, 2, 4) whose output is bitwise the same with and
// without nano-batching and matches a plain single-device double reference.
//
// Tolerances: the decode stack vs the reference, max |error| <= 1e-12 * max(1, max |ref|): the
// stack sums the same products in another order (shards, the all-reduce over ranks), sums of a
// few dozen O(1) terms, ~1e-15 expected. Everything else here is exact: the bitwise equalities
// (that is the property under test), the dependency order, and the simulator vs closed forms,
// which are sums of a handful of exactly representable binary fractions.

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "pipit/comm/threads.hpp"
#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/nano_search.hpp"
#include "pipit/nano/op_graph.hpp"
#include "pipit/nano/profiler.hpp"
#include "pipit/nano/tp_decode_stack.hpp"

namespace nano = pipit::nano;
using i64 = std::int64_t;
using nano::resource;
using pipit::comm::threads;

namespace {

// Catch2 v2 has no matcher for "message contains all of": check every fragment.
template <class F>
void require_error(F&& f, std::vector<std::string> fragments) {
  try {
    f();
  } catch (const pipit::error& e) {
    const std::string what = e.what();
    for (const auto& s : fragments) {
      INFO("message: " << what << "\nexpected fragment: " << s);
      CHECK(what.find(s) != std::string::npos);
    }
    return;
  }
  FAIL("no pipit::error thrown");
}

nano::op_graph chain(std::initializer_list<resource> kinds) {
  nano::op_graph g;
  int i = 0;
  for (resource k : kinds) {
    const int prev[1] = {i - 1};
    g.add("op" + std::to_string(i), k, std::span<const int>(prev, i ? 1 : 0));
    ++i;
  }
  return g;
}

}  // namespace

TEST_CASE("op_graph checks dependencies and stacks layers", "[nano]") {
  nano::op_graph g;
  const int a = g.add("a", resource::memory);
  const int b = g.add("b", resource::compute, {a});
  const int c = g.add("c", resource::network, {b});
  g.add("d", resource::memory, {c, a});
  CHECK(g.size() == 4);
  CHECK(g.sinks() == std::vector<int>{3});
  require_error([&] { g.add("e", resource::compute, {7}); }, {"op 4 (e)", "op 7"});
  require_error([&] { g.add("e", resource::compute, {1, 1}); }, {"dependency 1 twice"});

  const nano::op_graph s = g.repeated(3);
  REQUIRE(s.size() == 12);
  CHECK(s[4].name == "a.1");
  CHECK(s[4].deps == std::vector<int>{3});  // copy 1's source depends on copy 0's sink
  CHECK(s[7].deps == std::vector<int>{6, 4});
  CHECK(s[8].deps == std::vector<int>{7});
  CHECK(s[6].kind == resource::network);
  require_error([&] { (void)g.repeated(0); }, {"0 copies"});
}

TEST_CASE("nano_batch policies and their bad parameters", "[nano]") {
  const nano::op_graph g = chain({resource::compute, resource::network, resource::memory});
  const auto u = nano::nano_batch::uniform(g, 10, 3);
  CHECK(std::vector<i64>(u.sizes(1).begin(), u.sizes(1).end()) == std::vector<i64>{4, 3, 3});
  CHECK(nano::nano_batch::none(g, 10).count(2) == 1);
  CHECK(u.describe(g) == "op0: 4+3+3, op1: 4+3+3, op2: 4+3+3");

  require_error(
      [&] {
        (void)nano::nano_batch(g, 10, {{4, 3, 3}, {5, 4}, {10}});
      },
      {"op 1 (op1)", "5 + 4 = 9", "10 rows"});
  require_error(
      [&] {
        (void)nano::nano_batch(g, 10, {{4, 6}, {}, {10}});
      },
      {"op 1 (op1)", "zero nano-batches"});
  require_error([&] { (void)nano::nano_batch::uniform(g, 10, 0); }, {"0 nano-batches"});
  require_error([&] { (void)nano::nano_batch::uniform(g, 4, 5); },
                {"5 nano-batches for 4 rows", "more nano-batches than rows"});
  require_error(
      [&] {
        (void)nano::nano_batch(g, 3, {{1, 1, 1}, {1, 1, 1, 0}, {3}});
      },
      {"op 1 (op1)", "4 nano-batches for 3 rows"});
  require_error(
      [&] {
        (void)nano::nano_batch(g, 3, {{1, 2}, {3, 0}, {3}});
      },
      {"op 1 (op1) nano-batch 1 has 0 rows"});
  require_error([&] { (void)nano::nano_batch(g, 10, {{10}, {10}}); }, {"sizes for 2 ops", "3"});
  auto p = u;
  require_error([&] { p.set(g, 0, {6, 5}); }, {"op 0 (op0)", "6 + 5 = 11", "10 rows"});
  p.set(g, 0, {1, 9});
  CHECK(p.count(0) == 2);
}

TEST_CASE("nano_program depends on the nano-ops whose rows intersect", "[nano]") {
  const nano::op_graph g = chain({resource::compute, resource::network});
  const nano::nano_program p(g, nano::nano_batch(g, 8, {{3, 5}, {4, 2, 2}}));
  REQUIRE(p.size() == 5);
  CHECK(p[2].rows == nano::rows_range{0, 4});
  CHECK(std::vector<int>(p.deps(2).begin(), p.deps(2).end()) == std::vector<int>{0, 1});
  CHECK(std::vector<int>(p.deps(3).begin(), p.deps(3).end()) == std::vector<int>{1});
  CHECK(std::vector<int>(p.deps(4).begin(), p.deps(4).end()) == std::vector<int>{1});
  CHECK(std::vector<int>(p.users(1).begin(), p.users(1).end()) == std::vector<int>{2, 3, 4});
  CHECK(std::vector<int>(p.queue(resource::network).begin(), p.queue(resource::network).end()) ==
        std::vector<int>{2, 3, 4});
  CHECK(p.queue(resource::memory).empty());
}

TEST_CASE("the runner keeps the dependency order and covers every row once", "[nano]") {
  std::mt19937 gen(7);
  nano::nano_runner runner;
  for (int trial = 0; trial < 20; ++trial) {
    // A random DAG over the three kinds with random splits of 13 rows.
    const i64 rows = 13;
    nano::op_graph g;
    const int n_ops = 12;
    for (int o = 0; o < n_ops; ++o) {
      std::vector<int> deps;
      for (int d = std::max(0, o - 4); d < o; ++d)
        if (gen() % 2) deps.push_back(d);
      g.add("op" + std::to_string(o), static_cast<resource>(gen() % 3), deps);
    }
    std::vector<std::vector<i64>> sizes;
    for (int o = 0; o < n_ops; ++o) {
      const int count = 1 + static_cast<int>(gen() % 5);
      std::vector<i64> s(static_cast<std::size_t>(count), 1);
      for (i64 extra = rows - count; extra > 0; --extra) ++s[gen() % s.size()];
      sizes.push_back(s);
    }
    const nano::nano_program p(g, nano::nano_batch(g, rows, sizes));
    std::atomic<int> clock{0};
    std::vector<int> started(static_cast<std::size_t>(p.size()), -1),
        ended(static_cast<std::size_t>(p.size()), -1);
    std::vector<std::vector<int>> covered(n_ops, std::vector<int>(rows, 0));
    std::mutex m;
    std::vector<std::thread::id> thread_of(3);
    std::vector<int> wrong_thread;
    runner.run(p, [&](int op, nano::rows_range r) {
      int idx = -1;
      for (int i = 0; i < p.size(); ++i)
        if (p[i].op == op && p[i].rows == r) idx = i;
      started[static_cast<std::size_t>(idx)] = clock++;
      if ((op + r.begin + trial) % 3 == 0)
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      {
        std::lock_guard lock(m);
        for (i64 x = r.begin; x < r.end; ++x)
          ++covered[static_cast<std::size_t>(op)][static_cast<std::size_t>(x)];
        const auto k = static_cast<std::size_t>(g[op].kind);
        if (thread_of[k] == std::thread::id{}) thread_of[k] = std::this_thread::get_id();
        if (thread_of[k] != std::this_thread::get_id()) wrong_thread.push_back(op);
      }
      ended[static_cast<std::size_t>(idx)] = clock++;
    });
    for (int i = 0; i < p.size(); ++i)
      for (int d : p.deps(i)) {
        INFO("trial " << trial << " nano-op " << i << " dep " << d);
        CHECK(ended[static_cast<std::size_t>(d)] < started[static_cast<std::size_t>(i)]);
      }
    for (const auto& c : covered)
      CHECK(std::all_of(c.begin(), c.end(), [](int v) { return v == 1; }));
    CHECK(wrong_thread.empty());  // one thread per kind
    CHECK(thread_of[static_cast<std::size_t>(resource::network)] == std::this_thread::get_id());
  }
}

TEST_CASE("the runner rethrows a nano-op's exception and stays usable", "[nano]") {
  const nano::op_graph g =
      chain({resource::compute, resource::memory, resource::network, resource::compute});
  const nano::nano_program p(g, nano::nano_batch::uniform(g, 6, 3));
  nano::nano_runner runner;
  std::atomic<int> calls{0};
  CHECK_THROWS_WITH(runner.run(p,
                               [&](int op, nano::rows_range r) {
                                 ++calls;
                                 if (op == 1 && r.begin == 2) throw std::runtime_error("boom");
                               }),
                    "boom");
  CHECK(calls < p.size());
  calls = 0;
  runner.run(p, [&](int, nano::rows_range) { ++calls; });
  CHECK(calls == p.size());
}

TEST_CASE("the simulator matches the flow-shop closed form", "[nano]") {
  // compute (c * rows) then network (d * rows), plus a dispatch cost o per nano-op; split
  // uniformly into n (dividing B): a = o + c B / n, b = o + d B / n,
  // T = a + b + (n - 1) max(a, b).
  const nano::op_graph g = chain({resource::compute, resource::network});
  const i64 B = 64;
  const double c = 1.0 / 64, d = 0.5 / 64, o = 1.0 / 32;
  nano::profile prof(2, {1, B});
  prof.seconds(0, 0) = c;
  prof.seconds(0, 1) = c * B;
  prof.seconds(1, 0) = d;
  prof.seconds(1, 1) = d * B;
  const nano::cost_model model{{0, 1, 2}, o};
  for (int n : {1, 2, 4, 8, 16}) {
    const double a = o + c * B / n, b = o + d * B / n;
    const double expected = a + b + (n - 1) * std::max(a, b);
    const auto plan = nano::nano_batch::uniform(g, B, n);
    CHECK(nano::predict(g, plan, prof, model) == expected);
  }
  CHECK(nano::predict_sequential(g, nano::nano_batch::uniform(g, B, 4), prof) == (c + d) * B);
  CHECK(nano::resource_bound(g, B, prof, model) == Approx(c * B).epsilon(1e-12));
  // Compute and memory on one machine: a memory op after the compute op waits for it.
  const nano::op_graph h = chain({resource::compute, resource::memory});
  nano::profile p2(2, {1, B});
  for (int op = 0; op < 2; ++op) p2.seconds(op, 0) = c, p2.seconds(op, 1) = c * B;
  const double two = nano::predict(h, nano::nano_batch::uniform(h, B, 2), p2, {{0, 0, 1}, 0});
  CHECK(two == 2 * c * B);  // one machine: no overlap
  CHECK(nano::predict(h, nano::nano_batch::uniform(h, B, 2), p2, {{0, 1, 2}, 0}) == 1.5 * c * B);
}

TEST_CASE("the search finds known optima on synthetic profiles", "[nano]") {
  const nano::op_graph g = chain({resource::compute, resource::network});
  const i64 B = 64;
  auto linear = [&](double c0, double c1, double n0, double n1) {
    // op 0: c0 + c1 rows; op 1: n0 + n1 rows
    nano::profile p(2, {1, B});
    p.seconds(0, 0) = c0 + c1;
    p.seconds(0, 1) = c0 + c1 * B;
    p.seconds(1, 0) = n0 + n1;
    p.seconds(1, 1) = n0 + n1 * B;
    return p;
  };

  SECTION("a fixed cost per nano-op: the best uniform count is sqrt(c B / o) = 4") {
    // c = d, T(n) = (n + 1)(o + c B / n) with c B = 1, o = 1/16: minimum at n = 4.
    const auto prof = linear(0, 1.0 / 64, 0, 1.0 / 64);
    const nano::cost_model model{{0, 1, 2}, 1.0 / 16};
    auto T = [](int n) { return (n + 1) * (1.0 / 16 + 1.0 / n); };
    const auto r = nano::search(g, B, prof, model, {.max_count = 8});
    CHECK(r.baseline_predicted == T(1));
    CHECK(r.baseline == nano::nano_batch::none(g, B));
    CHECK(r.predicted <= T(4));
    for (int n = 1; n <= 8; ++n)
      if (n != 4) CHECK(T(4) < T(n));
    CHECK(r.predicted == nano::predict(g, r.chosen, prof, model));
    CHECK(r.predicted >= r.optimal);
    CHECK(r.optimal == Approx(1.0).epsilon(1e-12));
    // Without the descent phase the answer is exactly the uniform 4.
    const auto u = nano::search(g, B, prof, model, {.max_count = 8, .max_passes = 0});
    CHECK(u.chosen == nano::nano_batch::uniform(g, B, 4));
    CHECK(u.predicted == T(4));
  }

  SECTION("no fixed cost: more nano-batches is always better, down to the bound") {
    const auto prof = linear(0, 1.0 / 64, 0, 1.0 / 64);
    const auto r = nano::search(g, B, prof, {}, {.max_count = 8, .max_passes = 0});
    CHECK(r.chosen == nano::nano_batch::uniform(g, B, 8));
    CHECK(r.predicted == 1.0 + 1.0 / 8);  // (c + d) B / n + (n - 1) c B / n
    CHECK(r.predicted < r.baseline_predicted);
  }

  SECTION("a collective whose latency dwarfs the compute: do not split") {
    // Splitting the network op into k costs k * 10 alone, more than the whole unsplit step
    // (1 + 10 + 1); splitting only the compute op cannot start the collective earlier.
    const auto prof = linear(0, 1.0 / 64, 10, 1.0 / 64);
    const auto r = nano::search(g, B, prof, {});
    CHECK(r.chosen == nano::nano_batch::none(g, B));
    CHECK(r.predicted == r.baseline_predicted);
    CHECK(r.predicted == 12.0);
  }

  SECTION("per-layer groups: ops of every layer share a split") {
    const nano::op_graph s = g.repeated(3);
    nano::profile prof(6, {1, B});
    for (int o = 0; o < 6; ++o) {
      const double k = o % 2 ? 1.0 / 128 : 1.0 / 64;
      prof.seconds(o, 0) = k;
      prof.seconds(o, 1) = k * B;
    }
    const auto r = nano::search(s, B, prof, {{0, 1, 2}, 1.0 / 64}, {.period = 2});
    CHECK(r.predicted <= r.baseline_predicted);
    CHECK(r.predicted < r.baseline_predicted);
    for (int o = 2; o < 6; ++o)
      CHECK(std::equal(r.chosen.sizes(o).begin(), r.chosen.sizes(o).end(),
                       r.chosen.sizes(o % 2).begin(), r.chosen.sizes(o % 2).end()));
    require_error([&] { (void)nano::search(s, B, prof, {}, {.period = 4}); },
                  {"period 4", "6 ops"});
  }
}

TEST_CASE("the optimum counts an op's cheapest split when the profile makes splitting cheaper",
          "[nano]") {
  // A measured profile can be superadditive (cache effects, noise): here op 0 takes 1 s on 32
  // rows but 3 s on 64, so two nano-batches of 32 (or any split into pieces of <= 32) cost 2 s. The
  // bound must take that, or the search's predictions could fall below the "optimum".
  const nano::op_graph g = chain({resource::compute, resource::network});
  const i64 B = 64;
  nano::profile prof(2, {1, 32, B});  // measured from 1 row, as measure_profile's sizes are
  prof.seconds(0, 0) = 1.0 / 32;
  prof.seconds(0, 1) = 1.0;
  prof.seconds(0, 2) = 3.0;
  prof.seconds(1, 0) = 0.5 / 64;
  prof.seconds(1, 1) = 0.25;
  prof.seconds(1, 2) = 0.5;
  CHECK(nano::least_work(0, B, prof) == Approx(2.0).epsilon(1e-12));
  CHECK(nano::least_work(1, B, prof) == Approx(0.5).epsilon(1e-12));  // linear: the full batch
  CHECK(nano::least_work(0, 0, prof) == 0.0);
  const nano::cost_model model{{0, 1, 2}, 0.0};
  CHECK(nano::resource_bound(g, B, prof, model) == Approx(2.0).epsilon(1e-12));
  const auto r = nano::search(g, B, prof, model, {.max_count = 8});
  CHECK(r.optimal == Approx(2.0).epsilon(1e-12));
  CHECK(r.predicted >= r.optimal * (1 - 1e-12));
  CHECK(r.predicted < r.baseline_predicted);  // the split is found
  for (int n = 1; n <= 8; ++n)
    CHECK(nano::predict(g, nano::nano_batch::uniform(g, B, n), prof, model) >=
          r.optimal * (1 - 1e-12));
  CHECK_THROWS_WITH(nano::least_work(0, -1, prof), Catch::Contains("-1 rows"));
}

TEST_CASE("the profiler times every op in order and ranks agree", "[nano]") {
  const nano::op_graph g = chain({resource::compute, resource::network, resource::memory});
  std::vector<std::pair<int, i64>> calls;
  const auto prof = nano::measure_profile(
      g, {1, 4},
      [&](int op, nano::rows_range r) {
        calls.emplace_back(op, r.size());
        std::this_thread::sleep_for(std::chrono::microseconds(300 * r.size()));
      },
      {.warmup = 1, .repeats = 3});
  REQUIRE(calls.size() == 2 * 4 * 3);  // (1 warm-up + 3) passes x 2 sizes x 3 ops
  CHECK(calls[0] == std::pair<int, i64>{0, 1});
  CHECK(calls[1] == std::pair<int, i64>{1, 1});
  CHECK(calls[3] == std::pair<int, i64>{0, 4});  // a pass goes over every size in turn
  for (int o = 0; o < 3; ++o) {
    CHECK(prof.seconds(o, 0) >= 300e-6);
    CHECK(prof.seconds(o, 1) >= 1200e-6);
  }
  require_error([] { (void)nano::profile(2, {4, 4}); }, {"strictly increasing", "is 4"});
  nano::profile lin(1, {2, 4});
  lin.seconds(0, 0) = 2;
  lin.seconds(0, 1) = 3;
  CHECK(lin.duration(0, 3) == 2.5);
  CHECK(lin.duration(0, 8) == 5);
  CHECK(lin.duration(0, 1) == 1.5);

  std::vector<nano::profile> out(3, nano::profile(3, {1, 2}));
  threads::run(3, [&](threads& comm) {
    nano::profile p(3, {1, 2});
    for (int o = 0; o < 3; ++o)
      for (std::size_t s = 0; s < 2; ++s) p.seconds(o, s) = 1 + comm.rank() + 10 * o + s;
    nano::agree(comm, g, p);
    out[static_cast<std::size_t>(comm.rank())] = p;
  });
  // The collective overload: every rank ends with the same table, network ops timed over
  // network_repeats back-to-back calls.
  std::vector<int> net_calls(2, 0);
  std::vector<nano::profile> coll(2, nano::profile(3, {1, 2}));
  threads::run(2, [&](threads& comm) {
    coll[static_cast<std::size_t>(comm.rank())] =
        nano::measure_profile(comm, g, {1, 2},
                              [&](int op, nano::rows_range r) {
                                if (op == 1) {
                                  std::vector<double> v(static_cast<std::size_t>(r.size()), 1.0);
                                  comm.all_reduce(std::span<double>(v), std::plus<>{});
                                  ++net_calls[static_cast<std::size_t>(comm.rank())];
                                }
                              },
                              {.warmup = 0, .repeats = 3, .network_repeats = 4});
  });
  CHECK(net_calls == std::vector<int>{2 * 3 * 4, 2 * 3 * 4});
  CHECK(coll[0].all()[0] == coll[1].all()[0]);
  CHECK(std::equal(coll[0].all().begin(), coll[0].all().end(), coll[1].all().begin()));
  for (int rank = 0; rank < 3; ++rank) {
    CHECK(out[static_cast<std::size_t>(rank)].seconds(0, 1) == 1 + 2 + 0 + 1);   // compute: slowest
    CHECK(out[static_cast<std::size_t>(rank)].seconds(1, 0) == 1 + 1 + 10);      // network: mean
    CHECK(out[static_cast<std::size_t>(rank)].seconds(2, 1) == 1 + 2 + 20 + 1);  // memory: slowest
  }
}

namespace {

// ---- the decode stack against a plain double reference ---------------------------------------

nano::decode_shape test_shape() {
  return {.hidden = 16,
          .heads = 8,
          .kv_heads = 4,
          .head_dim = 4,
          .ffn = 24,
          .layers = 2,
          .requests = 7,
          .context = 5};
}

std::vector<nano::decode_layer_weights<double>> make_weights(const nano::decode_shape& s) {
  std::mt19937 gen(11);
  auto fill = [&](i64 n, double scale) {
    std::uniform_real_distribution<double> u(-scale, scale);
    std::vector<double> v(static_cast<std::size_t>(n));
    for (double& x : v) x = u(gen);
    return v;
  };
  const i64 h = s.hidden, qd = s.heads * s.head_dim, kd = s.kv_heads * s.head_dim;
  std::vector<nano::decode_layer_weights<double>> w;
  for (int l = 0; l < s.layers; ++l) {
    nano::decode_layer_weights<double> x;
    x.wq = fill(qd * h, 1 / std::sqrt(double(h)));
    x.wk = fill(kd * h, 1 / std::sqrt(double(h)));
    x.wv = fill(kd * h, 1 / std::sqrt(double(h)));
    x.wo = fill(h * qd, 1 / std::sqrt(double(qd)));
    x.w1 = fill(s.ffn * h, 1 / std::sqrt(double(h)));
    x.b1 = fill(s.ffn, 0.1);
    x.w2 = fill(h * s.ffn, 1 / std::sqrt(double(s.ffn)));
    x.b2 = fill(h, 0.1);
    x.g1 = fill(h, 0.5);
    x.g2 = fill(h, 0.5);
    for (double& v : x.g1) v += 1;
    for (double& v : x.g2) v += 1;
    w.push_back(std::move(x));
  }
  return w;
}

double cache_value(int layer, i64 request, i64 kv_head, i64 pos, i64 e, bool value) {
  return std::sin(0.37 * layer + 1.3 * request + 0.71 * kv_head + 0.23 * pos + 0.11 * e +
                  (value ? 0.5 : 0.0));
}

std::vector<double> make_input(const nano::decode_shape& s) {
  std::vector<double> x(static_cast<std::size_t>(s.requests * s.hidden));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.3 * static_cast<double>(i));
  return x;
}

// The whole stack on one device, unsharded, written out plainly.
std::vector<double> reference(const nano::decode_shape& s,
                              const std::vector<nano::decode_layer_weights<double>>& w) {
  const i64 h = s.hidden, d = s.head_dim, H = s.heads, G = s.kv_heads, n = s.requests, f = s.ffn;
  std::vector<double> x = make_input(s);
  auto matvec = [](const std::vector<double>& W, const double* in, i64 out, i64 k) {
    std::vector<double> y(static_cast<std::size_t>(out), 0.0);
    for (i64 o = 0; o < out; ++o)
      for (i64 j = 0; j < k; ++j)
        y[static_cast<std::size_t>(o)] += W[static_cast<std::size_t>(o * k + j)] * in[j];
    return y;
  };
  auto norm = [&](const double* in, const std::vector<double>& gain) {
    double ss = 0;
    for (i64 j = 0; j < h; ++j) ss += in[j] * in[j];
    const double inv = 1 / std::sqrt(ss / h + 1e-6);
    std::vector<double> y(static_cast<std::size_t>(h));
    for (i64 j = 0; j < h; ++j)
      y[static_cast<std::size_t>(j)] = in[j] * inv * gain[static_cast<std::size_t>(j)];
    return y;
  };
  for (int l = 0; l < s.layers; ++l) {
    const auto& W = w[static_cast<std::size_t>(l)];
    std::vector<double> next(x.size());
    for (i64 r = 0; r < n; ++r) {
      const double* xr = x.data() + r * h;
      const auto a = norm(xr, W.g1);
      const auto q = matvec(W.wq, a.data(), H * d, h), k = matvec(W.wk, a.data(), G * d, h),
                 v = matvec(W.wv, a.data(), G * d, h);
      std::vector<double> att(static_cast<std::size_t>(H * d), 0.0);
      for (i64 hh = 0; hh < H; ++hh) {
        const i64 g = hh / (H / G);
        auto key = [&](i64 pos, i64 e) {
          return pos < s.context ? cache_value(l, r, g, pos, e, false)
                                 : k[static_cast<std::size_t>(g * d + e)];
        };
        auto val = [&](i64 pos, i64 e) {
          return pos < s.context ? cache_value(l, r, g, pos, e, true)
                                 : v[static_cast<std::size_t>(g * d + e)];
        };
        std::vector<double> sc(static_cast<std::size_t>(s.context + 1));
        double m = -INFINITY, sum = 0;
        for (i64 pos = 0; pos <= s.context; ++pos) {
          double dot = 0;
          for (i64 e = 0; e < d; ++e) dot += q[static_cast<std::size_t>(hh * d + e)] * key(pos, e);
          sc[static_cast<std::size_t>(pos)] = dot / std::sqrt(double(d));
          m = std::max(m, sc[static_cast<std::size_t>(pos)]);
        }
        for (auto& z : sc) sum += (z = std::exp(z - m));
        for (i64 pos = 0; pos <= s.context; ++pos)
          for (i64 e = 0; e < d; ++e)
            att[static_cast<std::size_t>(hh * d + e)] +=
                sc[static_cast<std::size_t>(pos)] / sum * val(pos, e);
      }
      const auto o = matvec(W.wo, att.data(), h, H * d);
      std::vector<double> mid(static_cast<std::size_t>(h));
      for (i64 j = 0; j < h; ++j)
        mid[static_cast<std::size_t>(j)] = xr[j] + o[static_cast<std::size_t>(j)];
      const auto a2 = norm(mid.data(), W.g2);
      auto z = matvec(W.w1, a2.data(), f, h);
      for (i64 j = 0; j < f; ++j) {
        const double u = z[static_cast<std::size_t>(j)] + W.b1[static_cast<std::size_t>(j)];
        z[static_cast<std::size_t>(j)] =
            0.5 * u * (1 + std::tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)));
      }
      const auto y = matvec(W.w2, z.data(), h, f);
      for (i64 j = 0; j < h; ++j)
        next[static_cast<std::size_t>(r * h + j)] = mid[static_cast<std::size_t>(j)] +
                                                    y[static_cast<std::size_t>(j)] +
                                                    W.b2[static_cast<std::size_t>(j)];
    }
    x = std::move(next);
  }
  return x;
}

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](double x, double y) {
           return std::memcmp(&x, &y, sizeof x) == 0;
         });
}

}  // namespace

TEST_CASE("rowwise_gemm gives a row the same bits whatever rows it is computed with", "[nano]") {
  // 37 x 300 times 300 x 129: large enough that a blocked GEMM (Eigen's) would pick other
  // blocking and kernels for one row than for 37 (measured: all 37 rows differ in bits there).
  const i64 m = 37, k = 300, n = 129;
  std::mt19937 gen(2);
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<double> x(static_cast<std::size_t>(m * k)), wt(static_cast<std::size_t>(k * n)),
      bias(static_cast<std::size_t>(n)), full(static_cast<std::size_t>(m * n)), part(full.size());
  for (double& v : x) v = u(gen);
  for (double& v : wt) v = u(gen);
  for (double& v : bias) v = u(gen);
  auto run = [&](std::vector<double>& y, i64 first, i64 rows) {
    nano::rowwise_gemm<double>(
        nano::make_view(static_cast<const double*>(x.data()) + first * k, rows, k),
        nano::make_view(static_cast<const double*>(wt.data()), k, n), bias,
        nano::make_view(y.data() + first * n, rows, n));
  };
  run(full, 0, m);
  double err = 0;
  for (i64 i = 0; i < m; ++i)
    for (i64 j = 0; j < n; ++j) {
      double ref = bias[static_cast<std::size_t>(j)];
      for (i64 e = 0; e < k; ++e)
        ref += x[static_cast<std::size_t>(i * k + e)] * wt[static_cast<std::size_t>(e * n + j)];
      err = std::max(err, std::abs(full[static_cast<std::size_t>(i * n + j)] - ref));
    }
  CHECK(err <= 1e-12 * 300);  // |terms| <= 1: sums of 300 products
  for (const std::vector<i64>& split : {std::vector<i64>{1, 36}, {5, 3, 29}, {7, 7, 7, 7, 9}}) {
    std::fill(part.begin(), part.end(), 0.0);
    i64 first = 0;
    for (i64 rows : split) run(part, first, rows), first += rows;
    CHECK(same_bits(part, full));
  }
  std::vector<double> one(full.size());
  for (i64 i = 0; i < m; ++i) run(one, i, 1);
  CHECK(same_bits(one, full));
}

TEST_CASE("decode stack: nano-batching is bitwise neutral on threads, t = 1, 2, 4", "[nano]") {
  const auto s = test_shape();
  const auto w = make_weights(s);
  const auto ref = reference(s, w);
  double ref_max = 1;
  for (double v : ref) ref_max = std::max(ref_max, std::abs(v));

  for (const int t : {1, 2, 4}) {
    for (const double latency : {0.0, 2e-4}) {
      // Per rank: [plan][element] outputs; plan 0 is the sequential unsplit baseline.
      constexpr int plans = 7;
      std::vector<std::vector<std::vector<double>>> out(static_cast<std::size_t>(t),
                                                        std::vector<std::vector<double>>(plans));
      pipit::comm::threads_options opt;
      opt.latency_seconds = latency;
      threads::run(
          t,
          [&](threads& comm) {
            nano::tp_decode_stack<double, threads> stack(comm, s, w);
            const auto x = make_input(s);
            stack.set_input(nano::make_view(x.data(), s.requests, s.hidden));
            for (int l = 0; l < s.layers; ++l)
              stack.fill_cache(l, [&](i64 r, i64 g, i64 pos, i64 e, bool v) {
                return cache_value(l, r, g, pos, e, v);
              });
            const nano::op_graph g = stack.graph();
            std::mt19937 gen(3);  // the same on every rank: the same plans
            std::vector<std::vector<i64>> mixed;
            for (int o = 0; o < g.size(); ++o) {
              const int count = 1 + static_cast<int>(gen() % 4);
              std::vector<i64> sz(static_cast<std::size_t>(count), 1);
              for (i64 extra = s.requests - count; extra > 0; --extra) ++sz[gen() % sz.size()];
              mixed.push_back(sz);
            }
            const std::vector<nano::nano_batch> policies{
                nano::nano_batch::none(g, s.requests),
                nano::nano_batch::none(g, s.requests),
                nano::nano_batch::uniform(g, s.requests, 2),
                nano::nano_batch::uniform(g, s.requests, 3),
                nano::nano_batch::uniform(g, s.requests, 7),
                nano::nano_batch(g, s.requests, mixed),
                nano::nano_batch::uniform(g, s.requests, 2)};
            nano::nano_runner runner;
            for (int k = 0; k < plans; ++k) {
              const nano::nano_program p(g, policies[static_cast<std::size_t>(k)]);
              if (k == 0 || k == plans - 1)
                nano::nano_runner::run_sequential(p, stack);  // plans - 1: split, no overlap
              else
                runner.run(p, stack);
              const auto y = stack.output();
              out[static_cast<std::size_t>(comm.rank())][static_cast<std::size_t>(k)].assign(
                  y.data, y.data + y.rows * y.cols);
            }
          },
          opt);
      INFO("t = " << t << ", latency " << latency);
      const auto& base = out[0][0];
      double err = 0;
      for (std::size_t i = 0; i < ref.size(); ++i) err = std::max(err, std::abs(base[i] - ref[i]));
      CHECK(err <= 1e-12 * ref_max);
      for (int rank = 0; rank < t; ++rank)
        for (int k = 0; k < plans; ++k) {
          INFO("rank " << rank << ", plan " << k);
          CHECK(same_bits(out[static_cast<std::size_t>(rank)][static_cast<std::size_t>(k)], base));
        }
    }
  }
}

TEST_CASE("decode stack: bad shapes name the values", "[nano]") {
  auto s = test_shape();
  const auto w = make_weights(s);
  // Catch2 v2 assertions are not thread-safe: ranks record the messages, the main thread checks.
  std::vector<std::string> msgs(3);
  auto record = [](std::string& into, auto&& f) {
    try {
      f();
    } catch (const pipit::error& e) {
      into = e.what();
    }
  };
  threads::run(3, [&](threads& comm) {
    record(msgs[static_cast<std::size_t>(comm.rank())],
           [&] { nano::tp_decode_stack<double, threads> st(comm, s, w); });
  });
  for (const auto& m : msgs) {
    INFO(m);
    CHECK(m.find("tensor size 3") != std::string::npos);
    CHECK(m.find("4 KV heads") != std::string::npos);
  }
  threads::run(1, [&](threads& comm) {
    auto bad = w;
    bad[1].b1.pop_back();
    record(msgs[0], [&] { nano::tp_decode_stack<double, threads> st(comm, s, bad); });
    nano::tp_decode_stack<double, threads> st(comm, s, w);
    std::vector<double> x(10);
    record(msgs[1],
           [&] { st.set_input(nano::make_view(static_cast<const double*>(x.data()), 2, 5)); });
  });
  CHECK(msgs[0].find("layer 1 b1 has 23 elements, expected 24") != std::string::npos);
  CHECK(msgs[1].find("input 2 x 5") != std::string::npos);
  CHECK(msgs[1].find("7 x 16") != std::string::npos);
}
