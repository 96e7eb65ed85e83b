// Tensor parallelism on comm::mpi under mpirun with 4 ranks: the process grid's groups, the MLP
// and the grouped-query attention (plain and sequence parallel, split and overlapped backward)
// against the same layer on one rank (tensor size 1, which tp_test checks against the plain
// reference), and the stage scatter/gather. Double precision; tolerance 1e-12 of
// max(1, max |reference|), as in tp_test. Every rank checks what it holds.
#include <catch2/catch.hpp>

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "pipit/comm/mpi_communicator.hpp"
#include "pipit/comm/threads.hpp"
#include "pipit/tp/parallel_attention.hpp"
#include "pipit/tp/parallel_mlp.hpp"
#include "pipit/tp/process_grid.hpp"
#include "pipit/tp/stage_scatter_gather.hpp"
#include "support/mpi_world.hpp"

namespace {

namespace tp = pipit::tp;
using pipit::comm::mpi;
using i64 = std::int64_t;

pipit::comm::mpi_options quick() {
  pipit::comm::mpi_options o;
  o.timeout = std::chrono::milliseconds(30000);  // 4 ranks share 2 cores
  return o;
}

std::vector<double> random_vector(i64 n, unsigned seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<double> v(static_cast<std::size_t>(n));
  for (double& x : v) x = u(g);
  return v;
}

double rel_error(std::span<const double> a, std::span<const double> ref) {
  double err = 0, mag = 1;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::abs(a[i] - ref[i]));
    mag = std::max(mag, std::abs(ref[i]));
  }
  return err / mag;
}

// Rows [b.begin, b.end) of an n x cols buffer.
std::span<const double> rows_of(const std::vector<double>& v, pipit::range<i64> b, i64 cols) {
  return std::span<const double>(v).subspan(static_cast<std::size_t>(b.begin * cols),
                                            static_cast<std::size_t>(b.size() * cols));
}

struct mlp_case {
  i64 n = 6, h = 4, f = 8;
  std::vector<double> x = random_vector(n * h, 1), dy = random_vector(n * h, 2),
                      w1 = random_vector(f * h, 3), b1 = random_vector(f, 4),
                      w2 = random_vector(h * f, 5), b2 = random_vector(h, 6);
};

struct mlp_out {
  std::vector<double> y, dx, dx2, dw1, dw2, db1, db2;  // rank-local: shards and local rows
};

// Runs the MLP on the group `c` (any communicator) and returns this rank's results.
template <class C>
mlp_out run_mlp(C& c, const mlp_case& m, bool sp) {
  const int t = c.size(), r = c.rank();
  tp::parallel_mlp<double> mlp(m.h, m.f, t, r, {.bias = true, .sequence_parallel = sp});
  const auto ps = mlp.shard(tp::mlp_params<const double>{
      tp::make_view(m.w1.data(), m.f, m.h), std::span<const double>(m.b1),
      tp::make_view(m.w2.data(), m.h, m.f), std::span<const double>(m.b2)});
  const auto rb = sp ? tp::row_block(m.n, t, r) : pipit::range<i64>{0, m.n};
  const auto xl = tp::make_view(m.x.data() + rb.begin * m.h, rb.size(), m.h);
  const auto dyl = tp::make_view(m.dy.data() + rb.begin * m.h, rb.size(), m.h);
  mlp_out o;
  o.y.resize(static_cast<std::size_t>(rb.size() * m.h));
  o.dx.resize(o.y.size());
  o.dx2.resize(o.y.size());
  o.dw1.assign(static_cast<std::size_t>(mlp.local_ffn() * m.h), 0.0);
  o.dw2.assign(static_cast<std::size_t>(m.h * mlp.local_ffn()), 0.0);
  o.db1.assign(static_cast<std::size_t>(mlp.local_ffn()), 0.0);
  o.db2.assign(static_cast<std::size_t>(m.h), 0.0);
  std::vector<double> dw1b = o.dw1, dw2b = o.dw2, db1b = o.db1, db2b = o.db2;
  std::vector<double> saved(mlp.saved_size(m.n));
  mlp.forward(c, m.n, xl, ps, tp::make_view(o.y.data(), rb.size(), m.h), std::span<double>(saved));
  mlp.backward_input(c, m.n, dyl, ps, tp::make_view(o.dx.data(), rb.size(), m.h),
                     std::span<double>(saved));
  const tp::mlp_params<double> g{
      tp::make_view(o.dw1.data(), mlp.local_ffn(), m.h), std::span<double>(o.db1),
      tp::make_view(o.dw2.data(), m.h, mlp.local_ffn()), std::span<double>(o.db2)};
  mlp.backward_weight(m.n, xl, std::span<const double>(saved), dyl, g);
  const tp::mlp_params<double> g2{
      tp::make_view(dw1b.data(), mlp.local_ffn(), m.h), std::span<double>(db1b),
      tp::make_view(dw2b.data(), m.h, mlp.local_ffn()), std::span<double>(db2b)};
  mlp.backward(c, m.n, xl, dyl, ps, tp::make_view(o.dx2.data(), rb.size(), m.h), g2,
               std::span<double>(saved));
  CHECK(o.dx2 == o.dx);
  CHECK(rel_error(dw1b, o.dw1) <= 1e-12);
  CHECK(rel_error(dw2b, o.dw2) <= 1e-12);
  return o;
}

}  // namespace

TEST_CASE("tp on mpi: process grid groups, MLP and attention equal one rank, stage gather",
          "[tp][mpi]") {
  REQUIRE(pipit::testing::world_size() == 4);
  const mlp_case m;
  mlp_out ref;  // tensor size 1, on a one-rank comm::threads
  pipit::comm::threads::run(1, [&](pipit::comm::threads& one) { ref = run_mlp(one, m, false); });

  const tp::attention_shape as{.hidden = 8, .heads = 8, .kv_heads = 4, .head_dim = 2};
  const i64 sequences = 2, seq = 3, n = sequences * seq;
  const auto ax = random_vector(n * as.hidden, 7), ady = random_vector(n * as.hidden, 8),
             wq = random_vector(as.heads * as.head_dim * as.hidden, 9),
             wk = random_vector(as.kv_heads * as.head_dim * as.hidden, 10),
             wv = random_vector(as.kv_heads * as.head_dim * as.hidden, 11),
             wo = random_vector(as.hidden * as.heads * as.head_dim, 12);
  const tp::attention_params<const double> aw{
      tp::make_view(wq.data(), as.heads * as.head_dim, as.hidden),
      tp::make_view(wk.data(), as.kv_heads * as.head_dim, as.hidden),
      tp::make_view(wv.data(), as.kv_heads * as.head_dim, as.hidden),
      tp::make_view(wo.data(), as.hidden, as.heads * as.head_dim)};
  auto run_attention = [&](auto& c, bool sp, std::vector<double>& y, std::vector<double>& dx,
                           std::vector<double>& dx2) {
    const int t = c.size(), r = c.rank();
    tp::parallel_attention<double> a(as, t, r, sp);
    const auto ps = a.shard(aw);
    const auto rb = sp ? tp::row_block(n, t, r) : pipit::range<i64>{0, n};
    const auto xl = tp::make_view(ax.data() + rb.begin * as.hidden, rb.size(), as.hidden);
    const auto dyl = tp::make_view(ady.data() + rb.begin * as.hidden, rb.size(), as.hidden);
    y.assign(static_cast<std::size_t>(rb.size() * as.hidden), 0.0);
    dx = y;
    dx2 = y;
    std::vector<double> saved(a.saved_size(sequences, seq));
    std::vector<double> gq(static_cast<std::size_t>(ps.q.rows * ps.q.cols)),
        gk(static_cast<std::size_t>(ps.k.rows * ps.k.cols)), gv(gk.size()),
        go(static_cast<std::size_t>(ps.o.rows * ps.o.cols));
    const tp::attention_params<double> g{tp::make_view(gq.data(), ps.q.rows, ps.q.cols),
                                         tp::make_view(gk.data(), ps.k.rows, ps.k.cols),
                                         tp::make_view(gv.data(), ps.v.rows, ps.v.cols),
                                         tp::make_view(go.data(), ps.o.rows, ps.o.cols)};
    a.forward(c, sequences, seq, xl, ps, tp::make_view(y.data(), rb.size(), as.hidden),
              std::span<double>(saved));
    a.backward(c, sequences, seq, xl, dyl, ps, tp::make_view(dx2.data(), rb.size(), as.hidden), g,
               std::span<double>(saved));
    a.backward_input(c, sequences, seq, dyl, ps, tp::make_view(dx.data(), rb.size(), as.hidden),
                     std::span<double>(saved));
  };
  std::vector<double> ay_ref, adx_ref, adx2_ref;
  pipit::comm::threads::run(
      1, [&](pipit::comm::threads& one) { run_attention(one, false, ay_ref, adx_ref, adx2_ref); });

  mpi::run(
      MPI_COMM_WORLD,
      [&](mpi& world) {
        const tp::grid_layout layout({.tensor = 2, .data = 1, .pipeline = 2});
        tp::process_grid<mpi> grid(world, layout);
        const int me = world.rank();
        CHECK(grid.coords() == layout.coords_of(me));
        std::vector<int> tensor_members(2);
        grid.tensor().all_gather(std::span<const int>(&me, 1), std::span<int>(tensor_members));
        CHECK(tensor_members == std::vector<int>{layout.group_member(tp::axis::tensor, me, 0),
                                                 layout.group_member(tp::axis::tensor, me, 1)});
        CHECK(grid.vocab().size() == 4);
        CHECK(grid.vocab().rank() == layout.vocab_index(me));

        // The MLP on the tensor group (t = 2) and on the world (t = 4), plain and sequence
        // parallel.
        for (mpi* group : {&grid.tensor(), &world})
          for (const bool sp : {false, true}) {
            INFO("t " << group->size() << " sp " << sp);
            const mlp_out o = run_mlp(*group, m, sp);
            const int t = group->size(), r = group->rank();
            const auto rb = sp ? tp::row_block(m.n, t, r) : pipit::range<i64>{0, m.n};
            CHECK(rel_error(o.y, rows_of(ref.y, rb, m.h)) <= 1e-12);
            CHECK(rel_error(o.dx, rows_of(ref.dx, rb, m.h)) <= 1e-12);
            const i64 lf = m.f / t;
            CHECK(rel_error(o.dw1, rows_of(ref.dw1, {r * lf, (r + 1) * lf}, m.h)) <= 1e-12);
            CHECK(rel_error(o.db2, ref.db2) <= 1e-12);
          }

        // Attention with sequence parallelism over the world (t = 4: one KV head each).
        std::vector<double> y, dx, dx2;
        run_attention(world, true, y, dx, dx2);
        const auto rb = tp::row_block(n, 4, me);
        CHECK(rel_error(y, rows_of(ay_ref, rb, as.hidden)) <= 1e-12);
        CHECK(rel_error(dx, rows_of(adx_ref, rb, as.hidden)) <= 1e-12);
        CHECK(dx2 == dx);

        // Stage scatter/gather from pipeline stage 0 to stage 1.
        const auto act = random_vector(9, 13);
        if (grid.coords().pipeline == 0) {
          tp::send_scattered(grid.pipeline(), std::span<const double>(act), 2, grid.coords().tensor,
                             1, 5);
        } else {
          std::vector<double> got(act.size(), 0.0);
          tp::recv_gathered(grid.pipeline(), grid.tensor(), std::span<double>(got), 0, 5);
          CHECK(got == act);
        }
      },
      quick());
}
