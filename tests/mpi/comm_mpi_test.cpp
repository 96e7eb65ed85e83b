// comm::mpi under mpirun with 4 ranks: every rank runs the same Catch2 cases. Every case runs
// inside comm::mpi::run(), so a failed assertion on one rank fails the case on every rank
// instead of hanging the others. The failure cases check that every rank raises, naming the
// failed rank, and that MPI stays usable afterwards (the cases that follow still pass).
#include <catch2/catch.hpp>

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "pipit/comm/mpi_communicator.hpp"
#include "support/mpi_world.hpp"

using pipit::comm::all_reduce_algorithm;
using pipit::comm::mpi;
using pipit::comm::mpi_options;
using std::chrono::milliseconds;

namespace {

using pipit::testing::world_rank;
using pipit::testing::world_size;

mpi_options quick(std::optional<all_reduce_algorithm> a = {}) {
  mpi_options o;
  o.timeout = milliseconds(20000);  // generous: 4 ranks share 2 cores
  o.all_reduce = a;
  return o;
}

template <class F>
void run(F&& fn, mpi_options o = quick()) {
  mpi::run(MPI_COMM_WORLD, std::forward<F>(fn), o);
}

// Every rank's copy of `v`, gathered on every rank, compared byte for byte.
template <class T>
bool identical_on_every_rank(mpi& c, const std::vector<T>& v) {
  std::vector<T> all(v.size() * static_cast<std::size_t>(c.size()));
  c.all_gather(std::span<const T>(v), std::span<T>(all));
  for (int q = 0; q < c.size(); ++q)
    if (std::memcmp(all.data() + static_cast<std::size_t>(q) * v.size(), v.data(),
                    v.size() * sizeof(T)) != 0)
      return false;
  return true;
}

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

const std::optional<all_reduce_algorithm> all_modes[] = {std::nullopt, all_reduce_algorithm::ring,
                                                         all_reduce_algorithm::tree,
                                                         all_reduce_algorithm::star};

std::string mode_name(std::optional<all_reduce_algorithm> a) {
  return a ? std::string(name(*a)) : std::string("native");
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

static_assert(pipit::comm::communicator<mpi>);

TEST_CASE("point-to-point keeps per-pair, per-tag order", "[mpi][comm]") {
  REQUIRE(world_size() >= 2);
  run([](mpi& c) {
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
          CHECK(v[0] == i);
          CHECK(v[1] == -i);
        }
    }
  });
}

TEST_CASE("send never waits for the receiver, even for rendezvous-sized messages", "[mpi][comm]") {
  // Every rank sends 4 MiB to the next one and only then receives: with MPI_Send (rendezvous
  // above Open MPI's eager limit) this would deadlock.
  run([](mpi& c) {
    const int p = c.size(), next = (c.rank() + 1) % p, prev = (c.rank() + p - 1) % p;
    std::vector<std::int32_t> out(1 << 20), in(1 << 20);
    for (std::size_t i = 0; i < out.size(); ++i)
      out[i] = c.rank() * 1000003 + static_cast<std::int32_t>(i);
    c.send(std::span<const std::int32_t>(out), next, 5);
    std::fill(out.begin(), out.end(), -1);  // the buffer is ours again at once
    c.recv(std::span<std::int32_t>(in), prev, 5);
    bool ok = true;
    for (std::size_t i = 0; i < in.size(); ++i)
      ok = ok && in[i] == prev * 1000003 + static_cast<std::int32_t>(i);
    CHECK(ok);
    c.flush();
  });
}

TEST_CASE("isend, irecv and exchange move the data", "[mpi][comm]") {
  run([](mpi& c) {
    const int p = c.size(), next = (c.rank() + 1) % p, prev = (c.rank() + p - 1) % p;
    std::vector<double> out(7, c.rank()), in(7, -1), in2(7, -1), back(3, -1);
    const std::vector<double> out2(3, 10.0 + c.rank());
    // Both neighbours in one step, two tags.
    std::vector<pipit::comm::p2p_op> step{
        pipit::comm::send_op(std::span<const double>(out), next, 3),
        pipit::comm::recv_op(std::span<double>(in), prev, 3),
        pipit::comm::send_op(std::span<const double>(out2), prev, 4),
        pipit::comm::recv_op(std::span<double>(back), next, 4)};
    c.exchange(step);
    CHECK(in == std::vector<double>(7, prev));
    CHECK(back == std::vector<double>(3, 10.0 + next));
    auto r = c.irecv(std::span<double>(in2), prev, 6);
    auto s = c.isend(std::span<const double>(out), next, 6);
    c.wait(s);
    c.wait(r);
    CHECK(in2 == std::vector<double>(7, prev));
    pipit::comm::mpi::request none;
    c.wait(none);  // a default request is already complete
    std::vector<pipit::comm::p2p_op> nothing;
    c.exchange(nothing);
  });
}

TEST_CASE("all-reduce: MPI's own and every point-to-point algorithm, bit-identical on every rank",
          "[mpi][comm][collectives]") {
  for (const auto mode : all_modes)
    for (const std::size_t len : {std::size_t{1}, std::size_t{5}, std::size_t{33},
                                  std::size_t{4099}, std::size_t{100003}}) {
      INFO("mode " << mode_name(mode) << ", length " << len);
      run(
          [&](mpi& c) {
            const int p = c.size();
            std::vector<double> ints(len), noisy(len), maxes(len);
            std::vector<float> floats(len);
            std::vector<std::int64_t> wide(len);
            std::mt19937_64 rng(static_cast<unsigned>(c.rank()) * 7919u + len);
            std::uniform_real_distribution<double> u(-1, 1);
            for (std::size_t i = 0; i < len; ++i) {
              ints[i] = c.rank() * 100.0 + static_cast<double>(i);
              noisy[i] = u(rng) * std::pow(10.0, c.rank() % 5);
              floats[i] = static_cast<float>(u(rng));
              maxes[i] = u(rng);
              wide[i] = (std::int64_t{1} << 40) * c.rank() + static_cast<std::int64_t>(i);
            }
            c.all_reduce(std::span<double>(ints), std::plus<>{});
            bool exact = true;
            for (std::size_t i = 0; i < len; ++i)
              exact = exact && ints[i] == 100.0 * p * (p - 1) / 2 + p * static_cast<double>(i);
            CHECK(exact);
            c.all_reduce(std::span<std::int64_t>(wide), std::plus<std::int64_t>{});
            CHECK(wide[0] == (std::int64_t{1} << 40) * p * (p - 1) / 2);
            c.all_reduce(std::span<double>(noisy), std::plus<>{});
            c.all_reduce(std::span<float>(floats), std::plus<>{});
            std::vector<double> mine = maxes;
            c.all_reduce(std::span<double>(maxes), pipit::comm::max_op{});
            bool at_least = true;
            for (std::size_t i = 0; i < len; ++i) at_least = at_least && maxes[i] >= mine[i];
            CHECK(at_least);
            CHECK(identical_on_every_rank(c, noisy));
            CHECK(identical_on_every_rank(c, floats));
            CHECK(identical_on_every_rank(c, maxes));
          },
          quick(mode));
    }
}

TEST_CASE("a user merge operator reduces (max, sum-exp) pairs on every path",
          "[mpi][comm][collectives]") {
  const int n = world_size();
  std::vector<max_sum> local(static_cast<std::size_t>(n));
  for (int r = 0; r < n; ++r) local[static_cast<std::size_t>(r)] = {r % 3 * 50.0 - 40.0, 1.0 + r};
  max_sum serial = local[0];
  for (int r = 1; r < n; ++r) serial = merge_max_sum{}(serial, local[static_cast<std::size_t>(r)]);
  for (const auto mode : all_modes) {
    INFO("mode " << mode_name(mode));
    run(
        [&](mpi& c) {
          const std::size_t len = 1000;
          std::vector<max_sum> v(len);
          std::mt19937_64 rng(static_cast<unsigned>(c.rank()) + 17u);
          std::uniform_real_distribution<double> u(-30, 30);
          for (std::size_t i = 0; i < len; ++i) v[i] = {u(rng), 1.0 + u(rng) * u(rng)};
          v[0] = local[static_cast<std::size_t>(c.rank())];
          v[1] = {-1e300, 0.0};
          c.all_reduce(std::span<max_sum>(v), merge_max_sum{});
          CHECK(v[0].m == serial.m);
          CHECK(v[0].s == Approx(serial.s).epsilon(1e-14));
          CHECK(v[1].s == 0.0);
          CHECK(identical_on_every_rank(c, v));
          // An operator with state cannot be an MPI_Op: it takes the point-to-point ring.
          const double scale = 1.0;
          std::vector<double> w(5, c.rank() + 1.0);
          c.all_reduce(std::span<double>(w),
                       [scale](double a, double b) { return scale * a + scale * b; });
          CHECK(w == std::vector<double>(5, c.size() * (c.size() + 1) / 2.0));
          // Reduce with the merge, to each root.
          for (int root = 0; root < c.size(); ++root) {
            max_sum x[1] = {local[static_cast<std::size_t>(c.rank())]};
            c.reduce(std::span<max_sum>(x), merge_max_sum{}, root);
            if (c.rank() == root) {
              CHECK(x[0].m == serial.m);
              CHECK(x[0].s == Approx(serial.s).epsilon(1e-14));
            }
          }
        },
        quick(mode));
  }
}

TEST_CASE("reduce, broadcast, all-gather and barrier from every root", "[mpi][comm][collectives]") {
  run([](mpi& c) {
    const int n = c.size();
    for (int root = 0; root < n; ++root) {
      std::vector<long> v{c.rank() + 1L, 2L};
      c.reduce(std::span<long>(v), std::plus<>{}, root);
      if (c.rank() == root) CHECK(v == std::vector<long>{n * (n + 1L) / 2, 2L * n});
      std::vector<int> b(4, c.rank() == root ? 42 + root : -1);
      c.broadcast(std::span<int>(b), root);
      CHECK(b == std::vector<int>(4, 42 + root));
    }
    const int mine[2] = {c.rank(), c.rank() * c.rank()};
    std::vector<int> all(2 * static_cast<std::size_t>(n));
    c.all_gather(std::span<const int>(mine), std::span<int>(all));
    for (int r = 0; r < n; ++r) {
      CHECK(all[2 * static_cast<std::size_t>(r)] == r);
      CHECK(all[2 * static_cast<std::size_t>(r) + 1] == r * r);
    }
    c.barrier();
  });
}

TEST_CASE("split makes independent 2 x 2 groups", "[mpi][comm]") {
  REQUIRE(world_size() == 4);
  run([](mpi& c) {
    const int row = c.rank() / 2, col = c.rank() % 2;
    mpi rows = c.split(row, col);
    mpi cols = c.split(col, row);
    CHECK(rows.size() == 2);
    CHECK(rows.rank() == col);
    CHECK(cols.size() == 2);
    CHECK(cols.rank() == row);
    CHECK(rows.run_rank() == c.rank());
    int v = c.rank();
    rows.all_reduce(std::span<int>(&v, 1), std::plus<>{});
    CHECK(v == 4 * row + 1);  // 2row + (2row + 1)
    int w = c.rank();
    cols.all_reduce(std::span<int>(&w, 1), std::plus<>{});
    CHECK(w == 2 * col + 2);  // col + (col + 2)
    // Point-to-point inside a group uses group ranks; the same tag in the other group and in
    // the parent does not interfere.
    int got = -1;
    const int other = 1 - rows.rank();
    rows.send(std::span<const int>(&v, 1), other, 0);
    c.send(std::span<const int>(&w, 1), c.rank() ^ 1, 0);
    rows.recv(std::span<int>(&got, 1), other, 0);
    CHECK(got == v);
    c.recv(std::span<int>(&got, 1), c.rank() ^ 1, 0);
    CHECK(got == 2 * (1 - col) + 2);  // the neighbour's column sum
    // A group split further, by a key that reverses the order.
    mpi rev = rows.split(0, -rows.rank());
    CHECK(rev.rank() == 1 - col);
    CHECK_THROWS_WITH(c.split(-1, 0), Catch::Contains("color must be >= 0"));
  });
}

TEST_CASE("the point-to-point all-reduce algorithms run on split communicators too",
          "[mpi][comm]") {
  // Their tags (comm::collective_tag = 2^28 and up) must pass the MPI_TAG_UB check on a split
  // communicator, which carries no MPI_TAG_UB attribute of its own.
  REQUIRE(world_size() == 4);
  for (const auto algo :
       {all_reduce_algorithm::ring, all_reduce_algorithm::tree, all_reduce_algorithm::star})
    run(
        [](mpi& c) {
          mpi half = c.split(c.rank() / 2, c.rank());
          std::vector<double> v{double(c.rank()), 1.0};
          half.all_reduce(std::span<double>(v), std::plus<>{});
          const double want = c.rank() < 2 ? 0.0 + 1.0 : 2.0 + 3.0;
          CHECK(v[0] == want);
          CHECK(v[1] == 2.0);
        },
        quick(algo));
}

TEST_CASE("one rank's exception fails every rank with its name", "[mpi][comm][failure]") {
  REQUIRE(world_size() >= 3);
  const auto t0 = std::chrono::steady_clock::now();
  bool raised_inside = false;
  try {
    run([&](mpi& c) {
      double x = 1;
      c.all_reduce(std::span<double>(&x, 1), std::plus<>{});
      if (c.rank() == 2) throw std::runtime_error("boom on purpose");
      try {
        c.all_reduce(std::span<double>(&x, 1), std::plus<>{});  // rank 2 never joins
      } catch (const pipit::error& e) {
        raised_inside = true;
        CHECK_THAT(e.what(), Catch::Contains("rank 2 failed: boom on purpose") &&
                                 Catch::Contains("during all_reduce"));
        throw;
      }
    });
    FAIL("run() did not throw on rank " << world_rank());
  } catch (const pipit::error& e) {
    CHECK_THAT(e.what(), Catch::Contains("pipit: comm::mpi: rank 2 failed: boom on purpose"));
  }
  CHECK(raised_inside == (world_rank() != 2));
  CHECK(seconds_since(t0) < 10);  // notified, not timed out (the timeout is 20 s)
}

TEST_CASE("a rank that already finished still learns of a later failure", "[mpi][comm][failure]") {
  REQUIRE(world_size() >= 3);
  try {
    run([](mpi& c) {
      if (c.rank() == 1) {
        std::this_thread::sleep_for(milliseconds(200));
        throw std::logic_error("late failure");
      }
    });
    FAIL("run() did not throw on rank " << world_rank());
  } catch (const pipit::error& e) {
    CHECK_THAT(e.what(), Catch::Contains("rank 1 failed: late failure"));
    if (world_rank() != 1) CHECK_THAT(e.what(), Catch::Contains("at the end of run()"));
  }
}

TEST_CASE("a size mismatch fails every rank instead of corrupting memory", "[mpi][comm][failure]") {
  CHECK_THROWS_WITH(run([](mpi& c) {
                      double a[3] = {1, 2, 3};
                      if (c.rank() == 0) c.send(std::span<const double>(a), 1, 0);
                      if (c.rank() == 1) c.recv(std::span<double>(a), 0, 0);
                      if (c.rank() == 2) c.send(std::span<const double>(a, 2), 3, 0);
                      if (c.rank() == 3) c.recv(std::span<double>(a), 2, 0);
                      c.barrier();
                    }),
                    Catch::Contains("rank 3 recv from rank 2 tag 0: expected 24 bytes, got 16"));
  CHECK_THROWS_WITH(run([](mpi& c) {
                      int x = 0;
                      if (c.rank() == 0) c.recv(std::span<int>(&x, 1), 7, 0);
                      c.barrier();
                    }),
                    Catch::Contains("rank 0 failed: pipit: comm::mpi: rank 0 recv: bad peer 7"));
}

TEST_CASE("a silent rank: every other rank raises within the timeout", "[mpi][comm][failure]") {
  REQUIRE(world_size() == 4);
  // Rank 3 is stuck in its own code for 1.5 s. Rank 0 waits for its message and times out
  // after 500 ms; ranks 1 and 2 (in a barrier since 250 ms) learn of it from rank 0's notice.
  // Rank 3 raises at its next call. Nobody waits for rank 3 beyond the timeout.
  mpi_options o;
  o.timeout = milliseconds(500);
  o.acknowledge_timeout = milliseconds(10000);
  const auto t0 = std::chrono::steady_clock::now();
  double raised_after = -1;
  try {
    run(
        [&](mpi& c) {
          try {
            if (c.rank() == 3) {
              std::this_thread::sleep_for(milliseconds(1500));
              c.barrier();
            } else if (c.rank() == 0) {
              int x = 0;
              c.recv(std::span<int>(&x, 1), 3, 7);
            } else {
              std::this_thread::sleep_for(milliseconds(250));
              c.barrier();
            }
          } catch (const pipit::error&) {
            raised_after = seconds_since(t0);
            throw;
          }
        },
        o);
    FAIL("run() did not throw on rank " << world_rank());
  } catch (const pipit::error& e) {
    CHECK_THAT(e.what(),
               Catch::Contains("rank 0 timed out after 500 ms in recv waiting for rank 3 (tag 7)"));
  }
  INFO("rank " << world_rank() << " raised after " << raised_after << " s");
  if (world_rank() == 3) {
    CHECK(raised_after >= 1.5);
    CHECK(raised_after < 3.0);
  } else {
    CHECK(raised_after >= 0.45);
    CHECK(raised_after < 1.45);  // before rank 3 woke up
  }
}

TEST_CASE("a collective a rank never joins times out on the others", "[mpi][comm][failure]") {
  REQUIRE(world_size() == 4);
  for (const auto mode : all_modes) {
    INFO("mode " << mode_name(mode));
    mpi_options o = quick(mode);
    o.timeout = milliseconds(400);
    o.acknowledge_timeout = milliseconds(10000);
    try {
      run(
          [](mpi& c) {
            if (c.rank() == 1) {
              std::this_thread::sleep_for(milliseconds(1200));
              return;  // skips the all-reduce
            }
            double x = 1;
            c.all_reduce(std::span<double>(&x, 1), std::plus<>{});
          },
          o);
      FAIL("run() did not throw on rank " << world_rank());
    } catch (const pipit::error& e) {
      CHECK_THAT(e.what(), Catch::Contains("timed out after 400 ms in "));
      CHECK_THAT(e.what(), Catch::Contains("all_reduce"));
    }
  }
}
