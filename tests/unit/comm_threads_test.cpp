// comm::threads and the point-to-point collectives, on 1..8 thread ranks.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "pipit/comm/threads.hpp"
#include "support/thread_checks.hpp"

using pipit::comm::all_reduce_algorithm;
using pipit::comm::threads;
using pipit::comm::threads_options;

namespace {
constexpr all_reduce_algorithm all_algorithms[] = {
    all_reduce_algorithm::ring, all_reduce_algorithm::tree, all_reduce_algorithm::star};

// The vocabulary layers' kind of merge: (running max, sum of exp relative to it).
struct max_sum {
  double m, s;
};
struct merge_max_sum {
  max_sum operator()(const max_sum& a, const max_sum& b) const {
    const double m = std::max(a.m, b.m);
    return {m, a.s * std::exp(a.m - m) + b.s * std::exp(b.m - m)};
  }
};
}  // namespace

TEST_CASE("point-to-point keeps per-pair, per-tag order", "[comm][threads]") {
  threads::run(3, [](threads& c) {
    if (c.rank() == 0) {
      for (int i = 0; i < 50; ++i) {
        const int v[2] = {i, -i};
        c.send(std::span<const int>(v), 1, i % 2);  // two tags interleaved
      }
    } else if (c.rank() == 1) {
      for (int tag : {1, 0})  // drain tag 1 first: tags are independent queues
        for (int i = tag; i < 50; i += 2) {
          int v[2] = {};
          c.recv(std::span<int>(v), 0, tag);
          PIPIT_TREQUIRE(v[0] == i);
          PIPIT_TREQUIRE(v[1] == -i);
        }
    }
  });
}

TEST_CASE("isend, irecv and exchange move the data", "[comm][threads]") {
  for (int n : {1, 2, 5}) {
    threads::run(n, [n](threads& c) {
      if (n == 1) return;
      const int next = (c.rank() + 1) % n, prev = (c.rank() + n - 1) % n;
      std::vector<double> out(7, c.rank()), in(7, -1), in2(7, -1);
      std::vector<pipit::comm::p2p_op> step{
          pipit::comm::send_op(std::span<const double>(out), next, 3),
          pipit::comm::recv_op(std::span<double>(in), prev, 3)};
      c.exchange(step);
      PIPIT_TCHECK(in == std::vector<double>(7, prev));
      auto r = c.irecv(std::span<double>(in2), prev, 4);
      auto s = c.isend(std::span<const double>(out), next, 4);
      c.wait(s);
      c.wait(r);
      PIPIT_TCHECK(in2 == std::vector<double>(7, prev));
    });
  }
}

TEST_CASE("all-reduce algorithms agree with the serial sum, bit-identically on every rank",
          "[comm][threads][collectives]") {
  for (const auto algo : all_algorithms)
    for (int n = 1; n <= 8; ++n)
      for (const std::size_t len :
           {std::size_t{0}, std::size_t{1}, std::size_t{5}, std::size_t{33}}) {
        std::vector<std::vector<double>> results(static_cast<std::size_t>(n));
        std::vector<double> expect_int(len, 0.0);
        for (int r = 0; r < n; ++r)
          for (std::size_t i = 0; i < len; ++i) expect_int[i] += r * 100.0 + static_cast<double>(i);
        threads::run(n, [&](threads& c) {
          std::vector<double> ints(len), noisy(len);
          std::mt19937_64 rng(static_cast<unsigned>(c.rank()) * 7919u + len);
          std::uniform_real_distribution<double> u(-1, 1);
          for (std::size_t i = 0; i < len; ++i) {
            ints[i] = c.rank() * 100.0 + static_cast<double>(i);
            noisy[i] = u(rng) * std::pow(10.0, c.rank() % 5);
          }
          c.all_reduce(std::span<double>(ints), std::plus<>{}, algo);
          PIPIT_TCHECK(ints == expect_int);  // exact for integers
          c.all_reduce(std::span<double>(noisy), std::plus<>{}, algo);
          results[static_cast<std::size_t>(c.rank())] = noisy;
        });
        for (int r = 1; r < n; ++r) CHECK(results[static_cast<std::size_t>(r)] == results[0]);
        INFO("algorithm " << name(algo) << " ranks " << n << " length " << len);
      }
}

TEST_CASE("a user merge operator reduces (max, sum-exp) pairs", "[comm][threads][collectives]") {
  const int n = 6;
  for (const auto algo : all_algorithms) {
    std::vector<max_sum> local(n);
    for (int r = 0; r < n; ++r) local[static_cast<std::size_t>(r)] = {r % 3 * 50.0 - 40.0, 1.0 + r};
    max_sum serial = local[0];
    for (int r = 1; r < n; ++r)
      serial = merge_max_sum{}(serial, local[static_cast<std::size_t>(r)]);
    threads::run(n, [&](threads& c) {
      max_sum v[3] = {local[static_cast<std::size_t>(c.rank())],
                      local[static_cast<std::size_t>(c.rank())],
                      {-1e300, 0.0}};
      c.all_reduce(std::span<max_sum>(v), merge_max_sum{}, algo);
      PIPIT_TCHECK(v[0].m == serial.m);
      PIPIT_TCHECK(v[0].s == Approx(serial.s).epsilon(1e-14));
      PIPIT_TCHECK(v[2].s == 0.0);
    });
  }
}

TEST_CASE("reduce, broadcast, all-gather and barrier from every root",
          "[comm][threads][collectives]") {
  for (int n = 1; n <= 7; ++n)
    threads::run(n, [n](threads& c) {
      for (int root = 0; root < n; ++root) {
        std::vector<long> v{c.rank() + 1L, 2L};
        c.reduce(std::span<long>(v), std::plus<>{}, root);
        if (c.rank() == root) PIPIT_TCHECK(v == std::vector<long>{n * (n + 1L) / 2, 2L * n});
        std::vector<int> b(4, c.rank() == root ? 42 + root : -1);
        c.broadcast(std::span<int>(b), root);
        PIPIT_TCHECK(b == std::vector<int>(4, 42 + root));
      }
      const int mine[2] = {c.rank(), c.rank() * c.rank()};
      std::vector<int> all(2 * static_cast<std::size_t>(n));
      c.all_gather(std::span<const int>(mine), std::span<int>(all));
      for (int r = 0; r < n; ++r) {
        PIPIT_TCHECK(all[2 * static_cast<std::size_t>(r)] == r);
        PIPIT_TCHECK(all[2 * static_cast<std::size_t>(r) + 1] == r * r);
      }
      c.barrier();
    });
}

TEST_CASE("split makes independent groups", "[comm][threads]") {
  // 6 ranks as a 2 (data) x 3 (pipeline) grid: pipeline groups by data index, data groups by
  // pipeline index; reductions inside each must not mix.
  threads::run(6, [](threads& c) {
    const int dp = c.rank() / 3, pp = c.rank() % 3;
    threads pipe = c.split(dp, pp);
    threads data = c.split(pp, dp);
    PIPIT_TCHECK(pipe.size() == 3);
    PIPIT_TCHECK(pipe.rank() == pp);
    PIPIT_TCHECK(data.size() == 2);
    PIPIT_TCHECK(data.rank() == dp);
    int v = c.rank();
    pipe.all_reduce(std::span<int>(&v, 1), std::plus<>{});
    PIPIT_TCHECK(v == 3 * dp * 3 + 3);  // sum of 3dp, 3dp+1, 3dp+2
    int w = c.rank();
    data.all_reduce(std::span<int>(&w, 1), std::plus<>{});
    PIPIT_TCHECK(w == 2 * pp + 3);  // pp + (pp + 3)
    // A group split further by a key that reverses the order.
    threads rev = pipe.split(0, -pipe.rank());
    PIPIT_TCHECK(rev.rank() == 2 - pp);
  });
}

TEST_CASE("one rank's exception fails every rank with its name", "[comm][threads][failure]") {
  std::atomic<int> raised{0};
  try {
    threads::run(4, [&](threads& c) {
      if (c.rank() == 2) throw std::runtime_error("boom in forward");
      try {
        double x = 1;
        c.all_reduce(std::span<double>(&x, 1), std::plus<>{});  // rank 2 never joins
      } catch (const pipit::error& e) {
        if (std::string(e.what()).find("rank 2 failed: boom in forward") != std::string::npos)
          ++raised;
        throw;
      }
    });
    FAIL("run() did not throw");
  } catch (const pipit::error& e) {
    CHECK_THAT(e.what(), Catch::Contains("rank 2 failed: boom in forward"));
  }
  CHECK(raised == 3);  // every other rank raised, naming rank 2
}

TEST_CASE("a peer that never answers times out on every rank", "[comm][threads][failure]") {
  threads_options o;
  o.timeout = std::chrono::milliseconds(200);
  std::atomic<int> raised{0};
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(threads::run(
                        3,
                        [&](threads& c) {
                          if (c.rank() == 1) {  // silent: waits for a message nobody sends
                            int x = 0;
                            try {
                              c.recv(std::span<int>(&x, 1), 2, 99);
                            } catch (const pipit::error&) {
                              ++raised;
                              throw;
                            }
                            return;
                          }
                          int x = 0;
                          try {
                            c.recv(std::span<int>(&x, 1), 1, 7);  // rank 1 never sends
                          } catch (const pipit::error& e) {
                            if (std::string(e.what()).find("timed out") != std::string::npos)
                              ++raised;
                            throw;
                          }
                        },
                        o),
                    Catch::Contains("timed out after 200 ms"));
  CHECK(raised == 3);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
}

TEST_CASE("a size mismatch fails loudly instead of corrupting memory", "[comm][threads][failure]") {
  CHECK_THROWS_WITH(threads::run(2,
                                 [](threads& c) {
                                   double a[3] = {1, 2, 3};
                                   if (c.rank() == 0)
                                     c.send(std::span<const double>(a), 1, 0);
                                   else
                                     c.recv(std::span<double>(a, 2), 0, 0);
                                 }),
                    Catch::Contains("expected 16 bytes, got 24"));
  CHECK_THROWS_WITH(threads::run(2,
                                 [](threads& c) {
                                   int x = 0;
                                   c.recv(std::span<int>(&x, 1), 5, 0);
                                 }),
                    Catch::Contains("bad peer 5"));
}

TEST_CASE("injected latency delays every message", "[comm][threads][latency]") {
  threads_options o;
  o.latency_seconds = 0.002;
  const auto t0 = std::chrono::steady_clock::now();
  threads::run(
      2,
      [](threads& c) {
        int x = 0;
        for (int i = 0; i < 10; ++i) {  // 10 round trips = 20 one-way latencies
          if (c.rank() == 0) {
            c.send(std::span<const int>(&x, 1), 1, 0);
            c.recv(std::span<int>(&x, 1), 1, 0);
          } else {
            c.recv(std::span<int>(&x, 1), 0, 0);
            ++x;
            c.send(std::span<const int>(&x, 1), 0, 0);
          }
        }
        if (c.rank() == 0) PIPIT_TCHECK(x == 10);
      },
      o);
  CHECK(std::chrono::steady_clock::now() - t0 >= std::chrono::milliseconds(40));
}

TEST_CASE("the alpha-beta model prefers star when latency-bound and ring when bandwidth-bound",
          "[comm][collectives]") {
  using pipit::comm::choose_all_reduce;
  CHECK(choose_all_reduce(8, 64, 1e-3, 1e-9) == all_reduce_algorithm::star);
  CHECK(choose_all_reduce(8, 256e6, 1e-5, 1e-9) == all_reduce_algorithm::ring);
  CHECK(choose_all_reduce(1, 1e6, 1, 1) == all_reduce_algorithm::ring);  // nothing to do: any
  STATIC_REQUIRE(pipit::comm::predicted_all_reduce_time(all_reduce_algorithm::star, 4, 10, 1, 0) ==
                 2);
  STATIC_REQUIRE(pipit::comm::predicted_all_reduce_time(all_reduce_algorithm::ring, 4, 0, 1, 0) ==
                 6);
  STATIC_REQUIRE(pipit::comm::predicted_all_reduce_time(all_reduce_algorithm::tree, 8, 0, 1, 0) ==
                 3);
  STATIC_REQUIRE(pipit::comm::predicted_all_reduce_time(all_reduce_algorithm::tree, 6, 0, 1, 0) ==
                 4);
}
