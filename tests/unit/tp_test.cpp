// Tensor parallelism on the host: the process grid, the row-blocked ring collectives, the f/g
// and sequence-parallel operators, column- and row-parallel linear layers, the MLP and the
// grouped-query attention split by heads, and the stage scatter/gather, on comm::threads with
// tensor sizes 1, 2, 3 and 4, against unsharded references written out plainly below (double
// loops, no Eigen). The references' own gradients are checked by central finite differences.
//
// Ranks run as threads; they write their results into shared buffers (each rank its own part,
// or its own copy for replicated results) and every assertion runs on the main thread after
// threads::run returns.
//
// Tolerances: max |error| over a tensor <= tol * max(1, max |reference|).
//   double: 1e-12. The layers only reorder sums of at most a few dozen products of O(1) values
//           (a GEMM's blocking, the ring's order over t partials): ~1e-15 expected.
//   float:  2e-5. Sums of <= 30 float products: ~30 * 6e-8 = 2e-6 of sum |terms|, and the
//           softmax's exp and division add a few ulps.
//   finite differences of the references: central, step 1e-6: truncation ~1e-12 * third
//           derivative, rounding ~1e-16 / 1e-6 = 1e-10; tolerance 1e-7.
// Exact (bitwise) equalities: every rank of a group receives the same reduced values; the
// combined backward (overlapped reduction) gives the same input gradient as backward_input; and
// sequence-parallel layers give the same bits as plain ones (the ring's reduce-scatter combines
// each element in the same order as its all-reduce).

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "pipit/comm/threads.hpp"
#include "pipit/tp/column_parallel_linear.hpp"
#include "pipit/tp/grid_layout.hpp"
#include "pipit/tp/mappings.hpp"
#include "pipit/tp/matrix.hpp"
#include "pipit/tp/parallel_attention.hpp"
#include "pipit/tp/parallel_mlp.hpp"
#include "pipit/tp/process_grid.hpp"
#include "pipit/tp/ring_collective.hpp"
#include "pipit/tp/row_parallel_linear.hpp"
#include "pipit/tp/stage_scatter_gather.hpp"

namespace tp = pipit::tp;
using pipit::comm::threads;
using i64 = std::int64_t;

namespace {

// ---- dense matrices and helpers ------------------------------------------------------------

template <class T>
struct matrix {
  i64 rows = 0, cols = 0;
  std::vector<T> v;
  matrix() = default;
  matrix(i64 r, i64 c, T fill = T(0))
      : rows(r), cols(c), v(static_cast<std::size_t>(r * c), fill) {}
  T& operator()(i64 i, i64 j) { return v[static_cast<std::size_t>(i * cols + j)]; }
  T operator()(i64 i, i64 j) const { return v[static_cast<std::size_t>(i * cols + j)]; }
  tp::matrix_view<T> view() { return {v.data(), rows, cols, 0}; }
  tp::matrix_view<const T> view() const { return {v.data(), rows, cols, 0}; }
  std::span<T> span() { return v; }
};
using dmat = matrix<double>;

dmat random_matrix(i64 r, i64 c, std::mt19937& g, double scale = 1.0) {
  std::uniform_real_distribution<double> u(-scale, scale);
  dmat m(r, c);
  for (double& x : m.v) x = u(g);
  return m;
}
std::vector<double> random_vector(i64 n, std::mt19937& g) {
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<double> v(static_cast<std::size_t>(n));
  for (double& x : v) x = u(g);
  return v;
}
template <class T>
matrix<T> cast(const dmat& m) {
  matrix<T> r(m.rows, m.cols);
  for (std::size_t i = 0; i < m.v.size(); ++i) r.v[i] = static_cast<T>(m.v[i]);
  return r;
}
template <class T>
std::vector<T> cast(const std::vector<double>& m) {
  return std::vector<T>(m.begin(), m.end());
}

// max |a - ref| / max(1, max |ref|)
template <class A>
double rel_error(const A& a, const std::vector<double>& ref) {
  REQUIRE(a.size() == ref.size());
  double err = 0, mag = 1;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::abs(static_cast<double>(a[i]) - ref[i]));
    mag = std::max(mag, std::abs(ref[i]));
  }
  return err / mag;
}

template <class T>
tp::matrix_view<const T> cv(tp::matrix_view<T> v) {
  return v;
}
template <class T>
std::span<const T> cs(std::span<T> s) {
  return s;
}

// ---- unsharded references (plain loops, double) -------------------------------------------

struct linear_ref {
  dmat y, dx, dw;
  std::vector<double> db;
};
// Y = X W^T + b; dX = dY W; dW = dY^T X; db = 1^T dY.
linear_ref reference_linear(const dmat& x, const dmat& w, const std::vector<double>& b,
                            const dmat& dy) {
  const i64 n = x.rows, in = x.cols, out = w.rows;
  linear_ref r{dmat(n, out), dmat(n, in), dmat(out, in),
               std::vector<double>(static_cast<std::size_t>(out))};
  for (i64 i = 0; i < n; ++i)
    for (i64 o = 0; o < out; ++o) {
      double s = b.empty() ? 0.0 : b[static_cast<std::size_t>(o)];
      for (i64 k = 0; k < in; ++k) s += x(i, k) * w(o, k);
      r.y(i, o) = s;
    }
  for (i64 i = 0; i < n; ++i)
    for (i64 k = 0; k < in; ++k) {
      double s = 0;
      for (i64 o = 0; o < out; ++o) s += dy(i, o) * w(o, k);
      r.dx(i, k) = s;
    }
  for (i64 o = 0; o < out; ++o) {
    for (i64 k = 0; k < in; ++k) {
      double s = 0;
      for (i64 i = 0; i < n; ++i) s += dy(i, o) * x(i, k);
      r.dw(o, k) = s;
    }
    double s = 0;
    for (i64 i = 0; i < n; ++i) s += dy(i, o);
    r.db[static_cast<std::size_t>(o)] = s;
  }
  return r;
}

struct mlp_full {
  dmat w1, w2;
  std::vector<double> b1, b2;
};
struct mlp_ref {
  dmat y, dx, dw1, dw2;
  std::vector<double> db1, db2;
};
mlp_ref reference_mlp(const dmat& x, const mlp_full& p, const dmat& dy) {
  const linear_ref l1 = reference_linear(x, p.w1, p.b1, dmat(x.rows, p.w1.rows));
  dmat a(l1.y.rows, l1.y.cols);
  for (std::size_t i = 0; i < a.v.size(); ++i) a.v[i] = tp::gelu(l1.y.v[i]);
  const linear_ref l2 = reference_linear(a, p.w2, p.b2, dy);
  dmat dz = l2.dx;
  for (std::size_t i = 0; i < dz.v.size(); ++i) dz.v[i] *= tp::gelu_grad(l1.y.v[i]);
  const linear_ref g1 = reference_linear(x, p.w1, p.b1, dz);
  return {l2.y, g1.dx, g1.dw, l2.dw, g1.db, l2.db};
}

struct attn_full {
  dmat q, k, v, o;
};
struct attn_ref {
  dmat y, dx, dq, dk, dv, dwo;
};
// Per sequence b and head h (KV head g = h / (H / G)): S = Q_h K_g^T / sqrt(d), masked softmax,
// O_h = P V_g, Y = O Wo^T; backward by the chain rule, element by element.
attn_ref reference_attention(const tp::attention_shape& s, i64 sequences, i64 seq, const dmat& x,
                             const attn_full& w, const dmat& dy) {
  const i64 n = sequences * seq, d = s.head_dim, H = s.heads, G = s.kv_heads, h = s.hidden;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const dmat zq(n, H * d), zk(n, G * d);
  const linear_ref lq = reference_linear(x, w.q, {}, zq), lk = reference_linear(x, w.k, {}, zk),
                   lv = reference_linear(x, w.v, {}, zk);
  const dmat &Q = lq.y, &K = lk.y, &V = lv.y;
  dmat O(n, H * d), dO(n, H * d), dQ(n, H * d), dK(n, G * d), dV(n, G * d);
  std::vector<std::vector<double>> probs(static_cast<std::size_t>(sequences * H));
  for (i64 b = 0; b < sequences; ++b)
    for (i64 hh = 0; hh < H; ++hh) {
      const i64 g = hh / (H / G);
      auto& P = probs[static_cast<std::size_t>(b * H + hh)];
      P.assign(static_cast<std::size_t>(seq * seq), 0.0);
      for (i64 qi = 0; qi < seq; ++qi) {
        const i64 last = s.causal ? qi + 1 : seq;
        double m = -1e300;
        for (i64 j = 0; j < last; ++j) {
          double z = 0;
          for (i64 e = 0; e < d; ++e) z += Q(b * seq + qi, hh * d + e) * K(b * seq + j, g * d + e);
          P[static_cast<std::size_t>(qi * seq + j)] = z * scale;
          m = std::max(m, z * scale);
        }
        double sum = 0;
        for (i64 j = 0; j < last; ++j)
          sum += std::exp(P[static_cast<std::size_t>(qi * seq + j)] - m);
        for (i64 j = 0; j < last; ++j) {
          double& pj = P[static_cast<std::size_t>(qi * seq + j)];
          pj = std::exp(pj - m) / sum;
        }
        for (i64 e = 0; e < d; ++e) {
          double o = 0;
          for (i64 j = 0; j < last; ++j)
            o += P[static_cast<std::size_t>(qi * seq + j)] * V(b * seq + j, g * d + e);
          O(b * seq + qi, hh * d + e) = o;
        }
      }
    }
  const linear_ref lo = reference_linear(O, w.o, {}, dy);
  dO = lo.dx;
  for (i64 b = 0; b < sequences; ++b)
    for (i64 hh = 0; hh < H; ++hh) {
      const i64 g = hh / (H / G);
      const auto& P = probs[static_cast<std::size_t>(b * H + hh)];
      for (i64 qi = 0; qi < seq; ++qi) {
        std::vector<double> dp(static_cast<std::size_t>(seq), 0.0);
        double dot = 0;
        for (i64 j = 0; j < seq; ++j) {
          for (i64 e = 0; e < d; ++e)
            dp[static_cast<std::size_t>(j)] +=
                dO(b * seq + qi, hh * d + e) * V(b * seq + j, g * d + e);
          dot += dp[static_cast<std::size_t>(j)] * P[static_cast<std::size_t>(qi * seq + j)];
        }
        for (i64 j = 0; j < seq; ++j) {
          const double pj = P[static_cast<std::size_t>(qi * seq + j)];
          const double ds = pj * (dp[static_cast<std::size_t>(j)] - dot) * scale;
          for (i64 e = 0; e < d; ++e) {
            dV(b * seq + j, g * d + e) += pj * dO(b * seq + qi, hh * d + e);
            dQ(b * seq + qi, hh * d + e) += ds * K(b * seq + j, g * d + e);
            dK(b * seq + j, g * d + e) += ds * Q(b * seq + qi, hh * d + e);
          }
        }
      }
    }
  const linear_ref gq = reference_linear(x, w.q, {}, dQ), gk = reference_linear(x, w.k, {}, dK),
                   gv = reference_linear(x, w.v, {}, dV);
  dmat dx(n, h);
  for (std::size_t i = 0; i < dx.v.size(); ++i) dx.v[i] = gq.dx.v[i] + gk.dx.v[i] + gv.dx.v[i];
  return {lo.y, dx, gq.dw, gk.dw, gv.dw, lo.dw};
}

// <dy, f(x)> by central differences in each element of `param`, against `analytic`.
template <class F>
double finite_difference_error(std::vector<double>& param, const std::vector<double>& analytic,
                               F&& loss) {
  double err = 0, mag = 1;
  const double h = 1e-6;
  for (std::size_t i = 0; i < param.size(); ++i) {
    const double keep = param[i];
    param[i] = keep + h;
    const double up = loss();
    param[i] = keep - h;
    const double down = loss();
    param[i] = keep;
    err = std::max(err, std::abs((up - down) / (2 * h) - analytic[i]));
    mag = std::max(mag, std::abs(analytic[i]));
  }
  return err / mag;
}
double dot(const dmat& a, const dmat& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.v.size(); ++i) s += a.v[i] * b.v[i];
  return s;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const pipit::error& e) {
    return e.what();
  }
  return {};
}

}  // namespace

// ---- the process grid -------------------------------------------------------------------------

TEST_CASE("grid layout: coordinates, ranks and groups for several shapes and orders", "[tp]") {
  // The default order, 2 x 2 x 2: tensor fastest, then data, then pipeline.
  constexpr tp::grid_layout g8({.tensor = 2, .data = 2, .pipeline = 2});
  static_assert(g8.coords_of(5) == tp::grid_coords{.tensor = 1, .data = 0, .pipeline = 1});
  static_assert(g8.rank_of({.tensor = 0, .data = 1, .pipeline = 1}) == 6);
  static_assert(g8.group_member(tp::axis::tensor, 6, 1) == 7);
  static_assert(g8.group_member(tp::axis::data, 5, 1) == 7);
  static_assert(g8.group_member(tp::axis::pipeline, 7, 0) == 3);
  const int expected[8][3] = {{0, 0, 0}, {1, 0, 0}, {0, 1, 0}, {1, 1, 0},
                              {0, 0, 1}, {1, 0, 1}, {0, 1, 1}, {1, 1, 1}};
  for (int r = 0; r < 8; ++r) {
    const auto c = g8.coords_of(r);
    CHECK(c.tensor == expected[r][0]);
    CHECK(c.data == expected[r][1]);
    CHECK(c.pipeline == expected[r][2]);
  }
  // Groups of rank 5 (t1 d0 p1): tensor {4, 5}, data {5, 7}, pipeline {1, 5}, vocab {0, 1, 4, 5}.
  CHECK(g8.group_member(tp::axis::tensor, 5, 0) == 4);
  CHECK(g8.group_member(tp::axis::data, 5, 0) == 5);
  CHECK(g8.group_member(tp::axis::data, 5, 1) == 7);
  CHECK(g8.group_member(tp::axis::pipeline, 5, 0) == 1);
  CHECK(g8.vocab_group_size() == 4);
  CHECK(g8.vocab_member(5, 0) == 0);
  CHECK(g8.vocab_member(5, 1) == 1);
  CHECK(g8.vocab_member(5, 2) == 4);
  CHECK(g8.vocab_member(5, 3) == 5);
  CHECK(g8.vocab_index(5) == 3);
  CHECK(g8.vocab_member(6, 0) == 2);  // the other replica

  // A user order (pipeline fastest) and uneven shapes: every group member differs from the rank
  // only along its axis, and rank_of inverts coords_of.
  for (const tp::grid_shape shape :
       {tp::grid_shape{2, 2, 2}, tp::grid_shape{2, 1, 4}, tp::grid_shape{4, 2, 1},
        tp::grid_shape{3, 2, 2}, tp::grid_shape{1, 3, 1}})
    for (const tp::axis_order order :
         {tp::default_order, tp::axis_order{tp::axis::pipeline, tp::axis::tensor, tp::axis::data},
          tp::axis_order{tp::axis::data, tp::axis::pipeline, tp::axis::tensor}}) {
      const tp::grid_layout g(shape, order);
      std::vector<int> seen(static_cast<std::size_t>(g.size()), 0);
      for (int r = 0; r < g.size(); ++r) {
        const auto c = g.coords_of(r);
        CHECK(g.rank_of(c) == r);
        ++seen[static_cast<std::size_t>(r)];
        // Consecutive ranks differ in the fastest axis first.
        if (shape[order[0]] > 1 && r + 1 < g.size() && c[order[0]] + 1 < shape[order[0]])
          CHECK(g.coords_of(r + 1)[order[0]] == c[order[0]] + 1);
        for (const tp::axis a : {tp::axis::tensor, tp::axis::data, tp::axis::pipeline})
          for (int i = 0; i < shape[a]; ++i) {
            auto m = g.coords_of(g.group_member(a, r, i));
            CHECK(m[a] == i);
            m[a] = c[a];
            CHECK(m == c);
          }
        for (int i = 0; i < g.vocab_group_size(); ++i) {
          const auto m = g.coords_of(g.vocab_member(r, i));
          CHECK(m.data == c.data);
          CHECK(m.tensor == i % shape.tensor);
          CHECK(m.pipeline == i / shape.tensor);
        }
      }
    }
  const tp::grid_layout p_fast({.tensor = 2, .data = 1, .pipeline = 4},
                               {tp::axis::pipeline, tp::axis::tensor, tp::axis::data});
  CHECK(p_fast.coords_of(1) == tp::grid_coords{.tensor = 0, .data = 0, .pipeline = 1});
  CHECK(p_fast.coords_of(4) == tp::grid_coords{.tensor = 1, .data = 0, .pipeline = 0});
}

TEST_CASE("process grid: sub-communicators hold the layout's groups on comm threads", "[tp]") {
  struct setup {
    tp::grid_shape shape;
    tp::axis_order order;
  };
  for (const setup st :
       {setup{{2, 2, 2}, tp::default_order},
        setup{{2, 1, 4}, {tp::axis::pipeline, tp::axis::tensor, tp::axis::data}},
        setup{{3, 2, 2}, {tp::axis::data, tp::axis::tensor, tp::axis::pipeline}}}) {
    const tp::grid_layout layout(st.shape, st.order);
    const int n = layout.size();
    // members[world rank][group] = the world ranks of that group, in group order.
    std::vector<std::vector<std::vector<int>>> members(static_cast<std::size_t>(n),
                                                       std::vector<std::vector<int>>(4));
    std::vector<std::vector<int>> ranks(static_cast<std::size_t>(n), std::vector<int>(4, -1));
    threads::run(n, [&](threads& world) {
      tp::process_grid<threads> grid(world, layout);
      threads* groups[4] = {&grid.tensor(), &grid.data(), &grid.pipeline(), &grid.vocab()};
      for (int k = 0; k < 4; ++k) {
        std::vector<int> all(static_cast<std::size_t>(groups[k]->size()));
        const int me = world.rank();
        groups[k]->all_gather(std::span<const int>(&me, 1), std::span<int>(all));
        members[static_cast<std::size_t>(me)][static_cast<std::size_t>(k)] = all;
        ranks[static_cast<std::size_t>(me)][static_cast<std::size_t>(k)] = groups[k]->rank();
      }
    });
    for (int r = 0; r < n; ++r) {
      const auto c = layout.coords_of(r);
      const tp::axis axes[3] = {tp::axis::tensor, tp::axis::data, tp::axis::pipeline};
      for (int k = 0; k < 3; ++k) {
        std::vector<int> want;
        for (int i = 0; i < st.shape[axes[k]]; ++i)
          want.push_back(layout.group_member(axes[k], r, i));
        CHECK(members[static_cast<std::size_t>(r)][static_cast<std::size_t>(k)] == want);
        CHECK(ranks[static_cast<std::size_t>(r)][static_cast<std::size_t>(k)] == c[axes[k]]);
      }
      std::vector<int> want;
      for (int i = 0; i < layout.vocab_group_size(); ++i) want.push_back(layout.vocab_member(r, i));
      CHECK(members[static_cast<std::size_t>(r)][3] == want);
      CHECK(ranks[static_cast<std::size_t>(r)][3] == layout.vocab_index(r));
    }
  }
}

TEST_CASE("grid errors name the bad values", "[tp]") {
  CHECK_THAT(error_of([] { tp::grid_layout({.tensor = 0, .data = 2, .pipeline = 2}); }),
             Catch::Contains("tensor 0, data 2, pipeline 2"));
  CHECK_THAT(error_of([] {
               tp::grid_layout({2, 2, 2}, {tp::axis::tensor, tp::axis::data, tp::axis::tensor});
             }),
             Catch::Contains("names tensor twice"));
  CHECK_THAT(error_of([] {
               tp::grid_layout({2, 2, 2}).coords_of(8);
             }),
             Catch::Contains("rank 8 is outside the grid [0, 8)"));
  CHECK_THAT(error_of([] {
               threads::run(6, [](threads& w) {
                 tp::process_grid<threads> g(w, tp::grid_layout({2, 2, 2}));
               });
             }),
             Catch::Contains("the communicator has 6 ranks but the grid tensor 2 x data 2 x "
                             "pipeline 2 needs 8"));
}

// ---- collectives and operators ------------------------------------------------------------

TEST_CASE("ring collectives equal plain sums and concatenations, bit-identical on every rank",
          "[tp]") {
  for (int t = 1; t <= 5; ++t)
    for (const i64 rows : {i64{7}, i64{2}}) {
      const i64 cols = 3;
      std::mt19937 gen(static_cast<unsigned>(10 * t + rows));
      std::vector<dmat> parts;
      for (int r = 0; r < t; ++r) parts.push_back(random_matrix(rows, cols, gen));
      std::vector<double> sum(static_cast<std::size_t>(rows * cols), 0.0);
      for (const auto& p : parts)
        for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += p.v[i];
      std::vector<dmat> reduced(static_cast<std::size_t>(t)),
          scattered(static_cast<std::size_t>(t)), gathered(static_cast<std::size_t>(t));
      threads::run(t, [&](threads& c) {
        const auto r = static_cast<std::size_t>(c.rank());
        reduced[r] = parts[r];
        tp::ring_all_reduce_rows(c, reduced[r].span(), rows, cols);
        scattered[r] = parts[r];
        tp::ring_reduce_scatter_rows(c, scattered[r].span(), rows, cols);
        gathered[r] = dmat(rows, cols, -1.0);
        const auto mine = tp::row_block(rows, t, c.rank());
        for (i64 i = mine.begin; i < mine.end; ++i)
          for (i64 j = 0; j < cols; ++j) gathered[r](i, j) = parts[0](i, j);
        tp::ring_all_gather_rows(c, gathered[r].span(), rows, cols);
      });
      for (int r = 0; r < t; ++r) {
        const auto ri = static_cast<std::size_t>(r);
        CHECK(rel_error(reduced[ri].v, sum) <= 1e-15);
        CHECK(reduced[ri].v == reduced[0].v);
        const auto mine = tp::row_block(rows, t, r);
        for (i64 i = mine.begin; i < mine.end; ++i)
          for (i64 j = 0; j < cols; ++j) CHECK(scattered[ri](i, j) == reduced[0](i, j));
        CHECK(gathered[ri].v == parts[0].v);
      }
    }
}

TEST_CASE("f, g and the sequence-parallel operators do what their unsharded meaning says", "[tp]") {
  const i64 rows = 5, cols = 2;
  for (int t : {1, 2, 3, 4}) {
    std::mt19937 gen(static_cast<unsigned>(t));
    std::vector<dmat> parts;
    for (int r = 0; r < t; ++r) parts.push_back(random_matrix(rows, cols, gen));
    dmat sum(rows, cols);
    for (const auto& p : parts)
      for (std::size_t i = 0; i < sum.v.size(); ++i) sum.v[i] += p.v[i];
    std::vector<dmat> f_back(static_cast<std::size_t>(t)), g_fwd(static_cast<std::size_t>(t)),
        gather_fwd(static_cast<std::size_t>(t)), rs_fwd(static_cast<std::size_t>(t)),
        scatter_fwd(static_cast<std::size_t>(t)), scatter_back(static_cast<std::size_t>(t));
    threads::run(t, [&](threads& c) {
      const auto r = static_cast<std::size_t>(c.rank());
      const auto mine = tp::row_block(rows, t, c.rank());
      f_back[r] = parts[r];
      tp::copy_to_tensor_region::forward(c, f_back[r].span(), rows, cols);  // identity
      tp::copy_to_tensor_region::backward(c, f_back[r].span(), rows, cols);
      g_fwd[r] = parts[r];
      tp::reduce_from_tensor_region::forward(c, g_fwd[r].span(), rows, cols);
      tp::reduce_from_tensor_region::backward(c, g_fwd[r].span(), rows, cols);  // identity
      // gather: local rows of `sum` in, all of `sum` out.
      std::vector<double> local(sum.v.begin() + mine.begin * cols, sum.v.begin() + mine.end * cols);
      gather_fwd[r] = dmat(rows, cols);
      tp::gather_from_sequence_region::forward(c, std::span<const double>(local),
                                               gather_fwd[r].span(), rows, cols);
      // reduce-scatter: partials in, this rank's rows of the sum out.
      dmat scratch = parts[r];
      rs_fwd[r] = dmat(mine.size(), cols);
      tp::reduce_scatter_to_sequence_region::forward(c, scratch.span(), rs_fwd[r].span(), rows,
                                                     cols);
      scatter_fwd[r] = dmat(mine.size(), cols);
      tp::scatter_to_sequence_region::forward(c, std::span<const double>(sum.v),
                                              scatter_fwd[r].span(), rows, cols);
      scatter_back[r] = dmat(rows, cols);
      tp::scatter_to_sequence_region::backward(c, std::span<const double>(scatter_fwd[r].v),
                                               scatter_back[r].span(), rows, cols);
    });
    for (int r = 0; r < t; ++r) {
      const auto ri = static_cast<std::size_t>(r);
      const auto mine = tp::row_block(rows, t, r);
      CHECK(rel_error(f_back[ri].v, sum.v) <= 1e-15);
      CHECK(rel_error(g_fwd[ri].v, sum.v) <= 1e-15);
      CHECK(gather_fwd[ri].v == sum.v);
      const std::vector<double> my_sum(sum.v.begin() + mine.begin * cols,
                                       sum.v.begin() + mine.end * cols);
      CHECK(rel_error(rs_fwd[ri].v, my_sum) <= 1e-15);
      CHECK(scatter_fwd[ri].v == my_sum);
      CHECK(scatter_back[ri].v == sum.v);
    }
  }
}

// ---- layers: running them on t ranks ------------------------------------------------------

namespace {

// Activations of t ranks: each rank writes its own full-size buffer (sequence parallel: only its
// row block). assemble() gives the whole: the row blocks of their owners, or, when replicated,
// rank 0's after checking that every rank holds the same bits.
template <class T>
struct rank_buffers {
  int t;
  bool sp;
  i64 rows, cols;
  std::vector<matrix<T>> m;
  rank_buffers(int t_, bool sp_, i64 r, i64 c)
      : t(t_), sp(sp_), rows(r), cols(c), m(static_cast<std::size_t>(t_), matrix<T>(r, c)) {}
  tp::matrix_view<T> view(int r) {
    auto v = m[static_cast<std::size_t>(r)].view();
    if (!sp) return v;
    const auto b = tp::row_block(rows, t, r);
    return v.block_rows(b.begin, b.size());
  }
  dmat assemble() const {
    dmat out(rows, cols);
    for (i64 i = 0; i < rows; ++i) {
      int owner = 0;
      if (sp)
        while (i >= tp::row_block(rows, t, owner).end) ++owner;
      for (i64 j = 0; j < cols; ++j)
        out(i, j) = static_cast<double>(m[static_cast<std::size_t>(owner)](i, j));
    }
    if (!sp)
      for (const auto& x : m) CHECK(x.v == m[0].v);
    return out;
  }
};

template <class T>
tp::matrix_view<const T> local_rows(const matrix<T>& full, bool sp, int t, int r) {
  if (!sp) return full.view();
  const auto b = tp::row_block(full.rows, t, r);
  return full.view().block_rows(b.begin, b.size());
}

struct layer_result {
  dmat y, dx, dx_combined;
  std::vector<dmat> dw, dw_combined;  // one per weight
  std::vector<std::vector<double>> db, db_combined;
};

std::vector<double> to_double(const auto& v) {
  return std::vector<double>(v.begin(), v.end());
}

template <class T>
layer_result run_column(int t, tp::linear_options opt, const dmat& x, const dmat& w,
                        const std::vector<double>& b, const dmat& dy) {
  const i64 n = x.rows, in = w.cols, out = w.rows;
  const matrix<T> xt = cast<T>(x), wt = cast<T>(w), dyt = cast<T>(dy);
  const std::vector<T> bt = cast<T>(b);
  matrix<T> y(n, out), dw(out, in), dw2(out, in);
  std::vector<T> db(static_cast<std::size_t>(out)), db2(static_cast<std::size_t>(out));
  rank_buffers<T> dx(t, opt.sequence_parallel, n, in), dx2(t, opt.sequence_parallel, n, in);
  threads::run(t, [&](threads& c) {
    const int r = c.rank();
    tp::column_parallel_linear<T> L(in, out, t, r, opt);
    const auto xl = local_rows(xt, opt.sequence_parallel, t, r);
    const auto ws = L.weight_shard(wt.view());
    const std::span<const T> bs =
        opt.bias ? L.bias_shard(std::span<const T>(bt)) : std::span<const T>{};
    const auto yl = tp::column_block(y.view(), L.out_range().begin, L.local_out());
    std::vector<T> saved(L.saved_size(n));
    L.forward(c, xl, ws, bs, yl, std::span<T>(saved));
    const auto dyl = tp::column_block(dyt.view(), L.out_range().begin, L.local_out());
    const std::span<T> dbs = opt.bias ? L.bias_shard(std::span<T>(db)) : std::span<T>{};
    const std::span<T> dbs2 = opt.bias ? L.bias_shard(std::span<T>(db2)) : std::span<T>{};
    L.backward_input(c, dyl, ws, dx.view(r));
    L.backward_weight(xl, cs(std::span<T>(saved)), dyl, L.weight_shard(dw.view()), dbs);
    L.backward(c, xl, cs(std::span<T>(saved)), dyl, ws, dx2.view(r), L.weight_shard(dw2.view()),
               dbs2);
  });
  layer_result res;
  res.y = dmat(n, out);
  for (std::size_t i = 0; i < y.v.size(); ++i) res.y.v[i] = y.v[i];
  res.dx = dx.assemble();
  res.dx_combined = dx2.assemble();
  dmat a(out, in), a2(out, in);
  for (std::size_t i = 0; i < a.v.size(); ++i) a.v[i] = dw.v[i], a2.v[i] = dw2.v[i];
  res.dw = {a};
  res.dw_combined = {a2};
  res.db = {to_double(db)};
  res.db_combined = {to_double(db2)};
  return res;
}

template <class T>
layer_result run_row(int t, tp::linear_options opt, const dmat& x, const dmat& w,
                     const std::vector<double>& b, const dmat& dy) {
  const i64 n = x.rows, in = w.cols, out = w.rows;
  const matrix<T> xt = cast<T>(x), wt = cast<T>(w), dyt = cast<T>(dy);
  const std::vector<T> bt = cast<T>(b);
  matrix<T> dx(n, in), dw(out, in);
  rank_buffers<T> y(t, opt.sequence_parallel, n, out);
  std::vector<std::vector<T>> db(static_cast<std::size_t>(t),
                                 std::vector<T>(opt.bias ? static_cast<std::size_t>(out) : 0));
  threads::run(t, [&](threads& c) {
    const int r = c.rank();
    tp::row_parallel_linear<T> L(in, out, t, r, opt);
    const auto xl = tp::column_block(xt.view(), L.in_range().begin, L.local_in());
    const auto ws = L.weight_shard(wt.view());
    L.forward(c, xl, ws, std::span<const T>(bt), y.view(r));
    const auto dyl = local_rows(dyt, opt.sequence_parallel, t, r);
    std::vector<T> saved(L.saved_size(n));
    L.backward_input(c, dyl, ws, tp::column_block(dx.view(), L.in_range().begin, L.local_in()),
                     std::span<T>(saved));
    L.backward_weight(xl, cs(std::span<T>(saved)), dyl, L.weight_shard(dw.view()),
                      std::span<T>(db[static_cast<std::size_t>(r)]));
  });
  layer_result res;
  res.y = y.assemble();
  res.dx = dmat(n, in);
  for (std::size_t i = 0; i < dx.v.size(); ++i) res.dx.v[i] = dx.v[i];
  dmat a(out, in);
  for (std::size_t i = 0; i < a.v.size(); ++i) a.v[i] = dw.v[i];
  res.dw = {a};
  for (const auto& d : db) {
    CHECK(d == db[0]);
    res.db.push_back(to_double(d));
  }
  return res;
}

}  // namespace

TEST_CASE("column-parallel linear equals the unsharded layer, forward and backward", "[tp]") {
  const i64 n = 7, in = 5, out = 12;
  std::mt19937 gen(1);
  const dmat x = random_matrix(n, in, gen), w = random_matrix(out, in, gen),
             dy = random_matrix(n, out, gen);
  const std::vector<double> b = random_vector(out, gen);
  for (const bool bias : {true, false}) {
    const linear_ref ref = reference_linear(x, w, bias ? b : std::vector<double>{}, dy);
    std::vector<dmat> dx_plain;
    for (const bool sp : {false, true})
      for (int t : {1, 2, 3, 4}) {
        INFO("t " << t << " bias " << bias << " sequence parallel " << sp);
        const layer_result r =
            run_column<double>(t, {.bias = bias, .sequence_parallel = sp}, x, w, b, dy);
        CHECK(rel_error(r.y.v, ref.y.v) <= 1e-12);
        CHECK(rel_error(r.dx.v, ref.dx.v) <= 1e-12);
        CHECK(rel_error(r.dw[0].v, ref.dw.v) <= 1e-12);
        if (bias) CHECK(rel_error(r.db[0], ref.db) <= 1e-12);
        // The overlapped backward: the same input gradient bits, the same weight gradient.
        CHECK(r.dx_combined.v == r.dx.v);
        CHECK(rel_error(r.dw_combined[0].v, ref.dw.v) <= 1e-12);
        if (bias) CHECK(r.db_combined[0] == r.db[0]);
        // Sequence parallelism: the same bits as without it.
        if (!sp)
          dx_plain.push_back(r.dx);
        else
          CHECK(r.dx.v == dx_plain[static_cast<std::size_t>(t - 1)].v);
      }
  }
}

TEST_CASE("row-parallel linear equals the unsharded layer, forward and backward", "[tp]") {
  const i64 n = 7, in = 12, out = 5;
  std::mt19937 gen(2);
  const dmat x = random_matrix(n, in, gen), w = random_matrix(out, in, gen),
             dy = random_matrix(n, out, gen);
  const std::vector<double> b = random_vector(out, gen);
  for (const bool bias : {true, false}) {
    const linear_ref ref = reference_linear(x, w, bias ? b : std::vector<double>{}, dy);
    std::vector<dmat> y_plain;
    for (const bool sp : {false, true})
      for (int t : {1, 2, 3, 4}) {
        INFO("t " << t << " bias " << bias << " sequence parallel " << sp);
        const layer_result r = run_row<double>(t, {.bias = bias, .sequence_parallel = sp}, x, w,
                                               bias ? b : std::vector<double>{}, dy);
        CHECK(rel_error(r.y.v, ref.y.v) <= 1e-12);
        CHECK(rel_error(r.dx.v, ref.dx.v) <= 1e-12);
        CHECK(rel_error(r.dw[0].v, ref.dw.v) <= 1e-12);
        if (bias) CHECK(rel_error(r.db[0], ref.db) <= 1e-12);
        if (!sp)
          y_plain.push_back(r.y);
        else
          CHECK(r.y.v == y_plain[static_cast<std::size_t>(t - 1)].v);
      }
  }
}

TEST_CASE("float linear layers equal the double reference within float tolerance", "[tp]") {
  const i64 n = 6, in = 8, out = 12;
  std::mt19937 gen(3);
  const dmat x = random_matrix(n, in, gen), w = random_matrix(out, in, gen),
             dy = random_matrix(n, out, gen);
  const std::vector<double> b = random_vector(out, gen);
  const linear_ref ref = reference_linear(x, w, b, dy);
  for (int t : {1, 2, 3, 4}) {
    const layer_result r =
        run_column<float>(t, {.bias = true, .sequence_parallel = t % 2 == 0}, x, w, b, dy);
    CHECK(rel_error(r.y.v, ref.y.v) <= 2e-5);
    CHECK(rel_error(r.dx.v, ref.dx.v) <= 2e-5);
    CHECK(rel_error(r.dw[0].v, ref.dw.v) <= 2e-5);
    CHECK(rel_error(r.db[0], ref.db) <= 2e-5);
  }
}

// ---- MLP ---------------------------------------------------------------------------------

namespace {

template <class T>
layer_result run_mlp(int t, tp::linear_options opt, const dmat& x, const mlp_full& p,
                     const dmat& dy, pipit::comm::threads_options topt = {}) {
  const i64 n = x.rows, h = x.cols, f = p.w1.rows;
  const matrix<T> xt = cast<T>(x), dyt = cast<T>(dy), w1 = cast<T>(p.w1), w2 = cast<T>(p.w2);
  const std::vector<T> b1 = cast<T>(p.b1), b2 = cast<T>(p.b2);
  rank_buffers<T> y(t, opt.sequence_parallel, n, h), dx(t, opt.sequence_parallel, n, h),
      dx2(t, opt.sequence_parallel, n, h);
  matrix<T> dw1(f, h), dw2(h, f), dw1c(f, h), dw2c(h, f);
  std::vector<T> db1(static_cast<std::size_t>(f)), db1c(static_cast<std::size_t>(f));
  std::vector<std::vector<T>> db2(static_cast<std::size_t>(2 * t),
                                  std::vector<T>(static_cast<std::size_t>(h)));
  threads::run(
      t,
      [&](threads& c) {
        const int r = c.rank();
        tp::parallel_mlp<T> mlp(h, f, t, r, opt);
        const tp::mlp_params<const T> full{w1.view(), std::span<const T>(b1), w2.view(),
                                           std::span<const T>(b2)};
        const auto ps = mlp.shard(full);
        auto grads = [&](matrix<T>& g1, std::vector<T>& gb1, matrix<T>& g2, std::vector<T>& gb2) {
          auto s = mlp.shard(
              tp::mlp_params<T>{g1.view(), std::span<T>(gb1), g2.view(), std::span<T>(gb2)});
          s.fc2_bias = std::span<T>(gb2);  // replicated: this rank's own copy
          return s;
        };
        const auto xl = local_rows(xt, opt.sequence_parallel, t, r);
        const auto dyl = local_rows(dyt, opt.sequence_parallel, t, r);
        std::vector<T> saved(mlp.saved_size(n));
        mlp.forward(c, n, xl, ps, y.view(r), std::span<T>(saved));
        mlp.backward_input(c, n, dyl, ps, dx.view(r), std::span<T>(saved));
        mlp.backward_weight(n, xl, cs(std::span<T>(saved)), dyl,
                            grads(dw1, db1, dw2, db2[static_cast<std::size_t>(r)]));
        mlp.backward(c, n, xl, dyl, ps, dx2.view(r),
                     grads(dw1c, db1c, dw2c, db2[static_cast<std::size_t>(t + r)]),
                     std::span<T>(saved));
      },
      topt);
  layer_result res;
  res.y = y.assemble();
  res.dx = dx.assemble();
  res.dx_combined = dx2.assemble();
  auto d = [](const matrix<T>& m) {
    dmat o(m.rows, m.cols);
    for (std::size_t i = 0; i < m.v.size(); ++i) o.v[i] = m.v[i];
    return o;
  };
  res.dw = {d(dw1), d(dw2)};
  res.dw_combined = {d(dw1c), d(dw2c)};
  res.db = {to_double(db1), to_double(db2[0])};
  res.db_combined = {to_double(db1c), to_double(db2[static_cast<std::size_t>(t)])};
  for (int r = 0; r < t; ++r) {
    CHECK(db2[static_cast<std::size_t>(r)] == db2[0]);
    CHECK(db2[static_cast<std::size_t>(t + r)] == db2[static_cast<std::size_t>(t)]);
  }
  return res;
}

mlp_full random_mlp(i64 h, i64 f, std::mt19937& gen) {
  return {random_matrix(f, h, gen), random_matrix(h, f, gen, 0.5), random_vector(f, gen),
          random_vector(h, gen)};
}

}  // namespace

TEST_CASE("the MLP reference's gradients match finite differences", "[tp]") {
  std::mt19937 gen(4);
  const i64 n = 3, h = 4, f = 6;
  dmat x = random_matrix(n, h, gen);
  mlp_full p = random_mlp(h, f, gen);
  const dmat dy = random_matrix(n, h, gen);
  const mlp_ref ref = reference_mlp(x, p, dy);
  auto loss = [&] { return dot(dy, reference_mlp(x, p, dy).y); };
  CHECK(finite_difference_error(x.v, ref.dx.v, loss) <= 1e-7);
  CHECK(finite_difference_error(p.w1.v, ref.dw1.v, loss) <= 1e-7);
  CHECK(finite_difference_error(p.w2.v, ref.dw2.v, loss) <= 1e-7);
  CHECK(finite_difference_error(p.b1, ref.db1, loss) <= 1e-7);
  CHECK(finite_difference_error(p.b2, ref.db2, loss) <= 1e-7);
}

TEST_CASE("the MLP split on its inner dimension equals the unsharded MLP", "[tp]") {
  const i64 n = 7, h = 6, f = 24;
  std::mt19937 gen(5);
  const dmat x = random_matrix(n, h, gen), dy = random_matrix(n, h, gen);
  const mlp_full p = random_mlp(h, f, gen);
  const mlp_ref ref = reference_mlp(x, p, dy);
  std::vector<layer_result> plain;
  for (const bool sp : {false, true})
    for (int t : {1, 2, 3, 4}) {
      INFO("t " << t << " sequence parallel " << sp);
      const layer_result r = run_mlp<double>(t, {.bias = true, .sequence_parallel = sp}, x, p, dy);
      CHECK(rel_error(r.y.v, ref.y.v) <= 1e-12);
      CHECK(rel_error(r.dx.v, ref.dx.v) <= 1e-12);
      CHECK(rel_error(r.dw[0].v, ref.dw1.v) <= 1e-12);
      CHECK(rel_error(r.dw[1].v, ref.dw2.v) <= 1e-12);
      CHECK(rel_error(r.db[0], ref.db1) <= 1e-12);
      CHECK(rel_error(r.db[1], ref.db2) <= 1e-12);
      CHECK(r.dx_combined.v == r.dx.v);
      CHECK(rel_error(r.dw_combined[0].v, ref.dw1.v) <= 1e-12);
      CHECK(rel_error(r.dw_combined[1].v, ref.dw2.v) <= 1e-12);
      CHECK(r.db_combined[0] == r.db[0]);
      CHECK(rel_error(r.db_combined[1], ref.db2) <= 1e-12);  // summed in pieces: other order
      if (!sp) {
        plain.push_back(r);
      } else {
        const auto& q = plain[static_cast<std::size_t>(t - 1)];
        CHECK(r.y.v == q.y.v);
        CHECK(r.dx.v == q.dx.v);
      }
    }
}

TEST_CASE("the overlapped MLP backward is exact under an injected network latency", "[tp]") {
  const i64 n = 8, h = 6, f = 12;
  std::mt19937 gen(6);
  const dmat x = random_matrix(n, h, gen), dy = random_matrix(n, h, gen);
  const mlp_full p = random_mlp(h, f, gen);
  const mlp_ref ref = reference_mlp(x, p, dy);
  pipit::comm::threads_options slow;
  slow.latency_seconds = 2e-3;
  for (int t : {2, 3}) {
    const layer_result r =
        run_mlp<double>(t, {.bias = true, .sequence_parallel = t == 3}, x, p, dy, slow);
    CHECK(r.dx_combined.v == r.dx.v);
    CHECK(rel_error(r.dx.v, ref.dx.v) <= 1e-12);
    CHECK(rel_error(r.dw_combined[0].v, ref.dw1.v) <= 1e-12);
  }
}

// ---- attention ----------------------------------------------------------------------------

namespace {

template <class T>
layer_result run_attention(int t, bool sp, const tp::attention_shape& s, i64 sequences, i64 seq,
                           const dmat& x, const attn_full& w, const dmat& dy) {
  const i64 n = sequences * seq, h = s.hidden;
  const matrix<T> xt = cast<T>(x), dyt = cast<T>(dy), wq = cast<T>(w.q), wk = cast<T>(w.k),
                  wv = cast<T>(w.v), wo = cast<T>(w.o);
  rank_buffers<T> y(t, sp, n, h), dx(t, sp, n, h), dx2(t, sp, n, h);
  matrix<T> g[2][4] = {{matrix<T>(w.q.rows, h), matrix<T>(w.k.rows, h), matrix<T>(w.v.rows, h),
                        matrix<T>(h, w.o.cols)},
                       {matrix<T>(w.q.rows, h), matrix<T>(w.k.rows, h), matrix<T>(w.v.rows, h),
                        matrix<T>(h, w.o.cols)}};
  threads::run(t, [&](threads& c) {
    const int r = c.rank();
    tp::parallel_attention<T> a(s, t, r, sp);
    const auto ps =
        a.shard(tp::attention_params<const T>{wq.view(), wk.view(), wv.view(), wo.view()});
    const auto xl = local_rows(xt, sp, t, r);
    const auto dyl = local_rows(dyt, sp, t, r);
    std::vector<T> saved(a.saved_size(sequences, seq));
    a.forward(c, sequences, seq, xl, ps, y.view(r), std::span<T>(saved));
    a.backward_input(c, sequences, seq, dyl, ps, dx.view(r), std::span<T>(saved));
    a.backward_weight(sequences, seq, xl, cs(std::span<T>(saved)), dyl,
                      a.shard(tp::attention_params<T>{g[0][0].view(), g[0][1].view(),
                                                      g[0][2].view(), g[0][3].view()}));
    a.backward(c, sequences, seq, xl, dyl, ps, dx2.view(r),
               a.shard(tp::attention_params<T>{g[1][0].view(), g[1][1].view(), g[1][2].view(),
                                               g[1][3].view()}),
               std::span<T>(saved));
  });
  layer_result res;
  res.y = y.assemble();
  res.dx = dx.assemble();
  res.dx_combined = dx2.assemble();
  for (int k = 0; k < 4; ++k) {
    for (int which = 0; which < 2; ++which) {
      const matrix<T>& m = g[which][k];
      dmat o(m.rows, m.cols);
      for (std::size_t i = 0; i < m.v.size(); ++i) o.v[i] = m.v[i];
      (which == 0 ? res.dw : res.dw_combined).push_back(o);
    }
  }
  return res;
}

attn_full random_attention(const tp::attention_shape& s, std::mt19937& gen) {
  const i64 d = s.head_dim;
  return {random_matrix(s.heads * d, s.hidden, gen), random_matrix(s.kv_heads * d, s.hidden, gen),
          random_matrix(s.kv_heads * d, s.hidden, gen), random_matrix(s.hidden, s.heads * d, gen)};
}

}  // namespace

TEST_CASE("the attention reference's gradients match finite differences", "[tp]") {
  std::mt19937 gen(7);
  for (const bool causal : {true, false}) {
    const tp::attention_shape s{
        .hidden = 4, .heads = 4, .kv_heads = 2, .head_dim = 2, .causal = causal};
    const i64 sequences = 2, seq = 3;
    dmat x = random_matrix(sequences * seq, s.hidden, gen);
    attn_full w = random_attention(s, gen);
    const dmat dy = random_matrix(sequences * seq, s.hidden, gen);
    const attn_ref ref = reference_attention(s, sequences, seq, x, w, dy);
    auto loss = [&] { return dot(dy, reference_attention(s, sequences, seq, x, w, dy).y); };
    CHECK(finite_difference_error(x.v, ref.dx.v, loss) <= 1e-7);
    CHECK(finite_difference_error(w.q.v, ref.dq.v, loss) <= 1e-7);
    CHECK(finite_difference_error(w.k.v, ref.dk.v, loss) <= 1e-7);
    CHECK(finite_difference_error(w.v.v, ref.dv.v, loss) <= 1e-7);
    CHECK(finite_difference_error(w.o.v, ref.dwo.v, loss) <= 1e-7);
  }
}

TEST_CASE("attention split by heads with whole KV groups equals the unsharded attention", "[tp]") {
  struct config {
    tp::attention_shape shape;
    std::vector<int> tensor_sizes;
  };
  const std::vector<config> configs{
      {{.hidden = 8, .heads = 8, .kv_heads = 4, .head_dim = 2, .causal = true}, {1, 2, 4}},
      {{.hidden = 6, .heads = 6, .kv_heads = 3, .head_dim = 3, .causal = true}, {1, 3}},
      {{.hidden = 5, .heads = 4, .kv_heads = 4, .head_dim = 2, .causal = false}, {1, 2, 4}},
      {{.hidden = 4, .heads = 4, .kv_heads = 1, .head_dim = 3, .causal = true}, {1}},
      {{.hidden = 6, .heads = 6, .kv_heads = 2, .head_dim = 2, .causal = false}, {1, 2}}};
  const i64 sequences = 2, seq = 5;
  std::mt19937 gen(8);
  for (const auto& cfg : configs) {
    const auto& s = cfg.shape;
    const dmat x = random_matrix(sequences * seq, s.hidden, gen),
               dy = random_matrix(sequences * seq, s.hidden, gen);
    const attn_full w = random_attention(s, gen);
    const attn_ref ref = reference_attention(s, sequences, seq, x, w, dy);
    const std::vector<double>* refs[4] = {&ref.dq.v, &ref.dk.v, &ref.dv.v, &ref.dwo.v};
    for (const bool sp : {false, true})
      for (const int t : cfg.tensor_sizes) {
        INFO("heads " << s.heads << " kv " << s.kv_heads << " t " << t << " sp " << sp);
        const layer_result r = run_attention<double>(t, sp, s, sequences, seq, x, w, dy);
        CHECK(rel_error(r.y.v, ref.y.v) <= 1e-12);
        CHECK(rel_error(r.dx.v, ref.dx.v) <= 1e-12);
        CHECK(r.dx_combined.v == r.dx.v);
        for (int k = 0; k < 4; ++k) {
          CHECK(rel_error(r.dw[static_cast<std::size_t>(k)].v, *refs[k]) <= 1e-12);
          CHECK(rel_error(r.dw_combined[static_cast<std::size_t>(k)].v, *refs[k]) <= 1e-12);
        }
      }
  }
  // float
  const tp::attention_shape s{.hidden = 8, .heads = 8, .kv_heads = 4, .head_dim = 2};
  const dmat x = random_matrix(sequences * seq, s.hidden, gen),
             dy = random_matrix(sequences * seq, s.hidden, gen);
  const attn_full w = random_attention(s, gen);
  const attn_ref ref = reference_attention(s, sequences, seq, x, w, dy);
  for (const int t : {2, 4}) {
    const layer_result r = run_attention<float>(t, t == 4, s, sequences, seq, x, w, dy);
    CHECK(rel_error(r.y.v, ref.y.v) <= 2e-5);
    CHECK(rel_error(r.dx.v, ref.dx.v) <= 2e-5);
    CHECK(rel_error(r.dw[0].v, ref.dq.v) <= 2e-5);
  }
}

// ---- stage scatter/gather -------------------------------------------------------------------

TEST_CASE("stage scatter/gather: each tensor rank sends a slice, the next stage all-gathers",
          "[tp]") {
  for (const int t : {1, 2, 3}) {
    const tp::grid_layout layout({.tensor = t, .data = 1, .pipeline = 2});
    const i64 n = 11;
    std::mt19937 gen(static_cast<unsigned>(t));
    const std::vector<double> act = random_vector(n, gen);
    std::vector<std::vector<double>> got(static_cast<std::size_t>(2 * t)), got_step(got.size());
    std::vector<std::size_t> sent(got.size(), 0);
    threads::run(2 * t, [&](threads& world) {
      tp::process_grid<threads> grid(world, layout);
      const auto c = grid.coords();
      const auto me = static_cast<std::size_t>(world.rank());
      if (c.pipeline == 0) {
        tp::send_scattered(grid.pipeline(), std::span<const double>(act), t, c.tensor, 1, 3);
        sent[me] = tp::slice_of(std::span<const double>(act), t, c.tensor).size();
        std::vector<pipit::comm::p2p_op> ops{
            tp::scattered_send_op(std::span<const double>(act), t, c.tensor, 1, 4)};
        grid.pipeline().exchange(ops);
      } else {
        got[me].assign(static_cast<std::size_t>(n), 0.0);
        tp::recv_gathered(grid.pipeline(), grid.tensor(), std::span<double>(got[me]), 0, 3);
        got_step[me].assign(static_cast<std::size_t>(n), 0.0);
        std::vector<pipit::comm::p2p_op> ops{
            tp::scattered_recv_op(std::span<double>(got_step[me]), t, c.tensor, 0, 4)};
        grid.pipeline().exchange(ops);
        tp::gather_slices(grid.tensor(), std::span<double>(got_step[me]));
      }
    });
    std::size_t total = 0;
    for (int r = 0; r < 2 * t; ++r) {
      const auto c = layout.coords_of(r);
      if (c.pipeline == 0) {
        CHECK(sent[static_cast<std::size_t>(r)] <= static_cast<std::size_t>((n + t - 1) / t));
        total += sent[static_cast<std::size_t>(r)];
      } else {
        CHECK(got[static_cast<std::size_t>(r)] == act);
        CHECK(got_step[static_cast<std::size_t>(r)] == act);
      }
    }
    CHECK(total == static_cast<std::size_t>(n));  // the stage sends the activation once in all
  }
}

// ---- bad input ------------------------------------------------------------------------------

TEST_CASE("tensor-parallel layers reject bad shapes with errors naming the values", "[tp]") {
  CHECK_THAT(error_of([] {
               tp::parallel_attention<double>(
                   {.hidden = 8, .heads = 8, .kv_heads = 4, .head_dim = 2}, 3, 0);
             }),
             Catch::Contains("the tensor size 3 does not divide the 4 KV heads"));
  CHECK_THAT(error_of([] {
               tp::parallel_attention<double>(
                   {.hidden = 8, .heads = 6, .kv_heads = 4, .head_dim = 2}, 1, 0);
             }),
             Catch::Contains("6 query heads are not a multiple of 4 KV heads"));
  CHECK_THAT(error_of([] { tp::column_parallel_linear<double>(4, 10, 4, 0); }),
             Catch::Contains("the tensor size 4 does not divide out_features 10"));
  CHECK_THAT(error_of([] { tp::row_parallel_linear<double>(9, 4, 2, 1); }),
             Catch::Contains("the tensor size 2 does not divide in_features 9"));
  CHECK_THAT(error_of([] { tp::column_parallel_linear<double>(4, 8, 2, 2); }),
             Catch::Contains("tensor rank 2 of 2"));
  // A wrong view shape, and a layer called on the wrong group.
  CHECK_THAT(error_of([] {
               threads::run(2, [](threads& c) {
                 tp::column_parallel_linear<double> L(3, 4, 2, c.rank());
                 dmat x(5, 3), w(2, 3), y(5, 3);
                 std::vector<double> b(2);
                 L.forward(c, x.view(), w.view(), std::span<const double>(b), y.view(), {});
               });
             }),
             Catch::Contains("the output is 5 x 3, expected 5 x 2"));
  CHECK_THAT(error_of([] {
               threads::run(2, [](threads& c) {
                 tp::row_parallel_linear<double> L(4, 3, 4, c.rank());
                 dmat x(5, 1), w(3, 1), y(5, 3);
                 L.forward(c, x.view(), w.view(), std::span<const double>(), y.view());
               });
             }),
             Catch::Contains("of 4 but called on rank") &&
                 Catch::Contains("of a group of 2"));  // whichever rank fails first
  CHECK_THAT(error_of([] {
               threads::run(2, [](threads& c) {
                 std::vector<double> v(5);
                 tp::ring_all_reduce_rows(c, std::span<double>(v), 2, 3);
               });
             }),
             Catch::Contains("5 elements for a 2 x 3 matrix"));
}
