// Vocabulary parallelism on the host: shards, the online-softmax merge, the sharded output layer
// (naive, two_barrier, one_barrier) and the sharded input embedding, against an unsharded
// double-precision reference written out plainly below.
//
// The n ranks of a group are simulated in one thread by running every rank's local passes and
// combining their partial results in rank order with the same operators (merge_op, max, plus):
// exactly what the communicator's all_reduce / reduce compute. The drivers themselves are run on
// comm::threads with 1 to 8 ranks at the end.
//
// Tolerances (max |error| over a tensor <= tol * max |reference|, the loss relative to
// max(1, |loss|)); the worst errors observed are printed by a build with
// -DPIPIT_VOCAB_TEST_REPORT:
//   double inputs: 1e-12 (the reference itself is double; chunking and the merge only reorder
//                  sums of at most a few hundred terms; observed <= 2e-15)
//   float, bfloat16 inputs (float accumulation; the reference uses the same rounded inputs in
//                  double): 5e-5. A logit is a float dot product of <= 32 terms (error up to
//                  ~32 * 6e-8 = 2e-6 of sum |x||w|), and sums of exp over <= 300 terms add up to
//                  ~300 * 6e-8 = 2e-5 in the worst case; observed <= 8e-7.
//   logits of magnitude 1e4: double 1e-12 * 1e4, since a logit itself is only known to
//                  ~1e4 * 1e-16 and p = exp(z - lse) inherits that absolute error (observed
//                  5e-16); float: the loss to 1e-6 relative, gradients 2e-3 (1e4 * 2^-24 = 6e-4
//                  of logit error; observed 2.5e-4).

#include <Eigen/Core>
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#ifdef PIPIT_VOCAB_TEST_REPORT
#include <cstdio>
#include <map>
#endif
#include <random>
#include <span>
#include <string>
#include <vector>

#include "pipit/vocab/algorithms.hpp"
#include "pipit/vocab/cross_entropy.hpp"
#include "pipit/vocab/embedding.hpp"
#include "pipit/vocab/loss.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/output_layer.hpp"
#include "pipit/vocab/output_layer_forward_backward.hpp"
#include "pipit/vocab/shards.hpp"
#include "pipit/vocab/softmax_stats.hpp"

#if __has_include("pipit/comm/threads.hpp")
#include "pipit/comm/threads.hpp"
#define PIPIT_VOCAB_TEST_THREADS 1
#else
#define PIPIT_VOCAB_TEST_THREADS 0
#endif

namespace v = pipit::vocab;
using bf16 = Eigen::bfloat16;
using i64 = std::int64_t;

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();

// ---- problem and unsharded reference --------------------------------------------------------

struct problem {
  i64 tokens = 0, hidden = 0, vocab = 0;
  int ranks = 1;
  i64 pad_multiple = 1;
  std::vector<double> x;        // tokens x hidden
  std::vector<double> w;        // vocab x hidden (unpadded)
  std::vector<i64> targets;     // ids or opt.ignore_index
  std::vector<double> weights;  // empty or one per token
  v::loss_options opt;
};

struct reference_result {
  double loss = 0, z_loss = 0, weight = 0;
  i64 tokens = 0;
  std::vector<double> dx;  // tokens x hidden
  std::vector<double> dw;  // vocab x hidden
};

// Full logits, log-softmax, cross-entropy (+ smoothing, z-loss), gradients: no sharding, no
// chunking, no online softmax.
reference_result reference(const problem& p) {
  const i64 T = p.tokens, H = p.hidden, V = p.vocab;
  const double eps = p.opt.label_smoothing, lambda = p.opt.z_loss;
  reference_result r;
  r.dx.assign(static_cast<std::size_t>(T * H), 0.0);
  r.dw.assign(static_cast<std::size_t>(V * H), 0.0);
  std::vector<double> z(static_cast<std::size_t>(V)), lse(static_cast<std::size_t>(T));
  std::vector<double> logz(static_cast<std::size_t>(T * V));
  double total = 0, ztotal = 0, wsum = 0;
  for (i64 t = 0; t < T; ++t) {
    for (i64 v = 0; v < V; ++v) {
      double s = 0;
      for (i64 j = 0; j < H; ++j) s += p.x[t * H + j] * p.w[v * H + j];
      logz[t * V + v] = s;
    }
    double m = -inf;
    for (i64 v = 0; v < V; ++v) m = std::max(m, logz[t * V + v]);
    double S = 0;
    for (i64 v = 0; v < V; ++v) S += std::exp(logz[t * V + v] - m);
    lse[t] = m + std::log(S);
    const double w = p.weights.empty() ? 1.0 : p.weights[t];
    const i64 y = p.targets[t];
    if (y == p.opt.ignore_index || w == 0.0) continue;
    double mean_logit = 0;
    for (i64 v = 0; v < V; ++v) mean_logit += logz[t * V + v];
    mean_logit /= static_cast<double>(V);
    // -sum_v q_v log p_v with q = (1 - eps) onehot + eps / V, plus lambda lse^2
    const double ce = (1 - eps) * (lse[t] - logz[t * V + y]) + eps * (lse[t] - mean_logit);
    total += w * (ce + lambda * lse[t] * lse[t]);
    ztotal += w * lambda * lse[t] * lse[t];
    wsum += w;
    ++r.tokens;
  }
  const double denom = p.opt.reduce == v::reduction::mean ? wsum : 1.0;
  const double scale = denom > 0 ? 1.0 / denom : 0.0;
  r.loss = total * scale;
  r.z_loss = ztotal * scale;
  r.weight = wsum;
  for (i64 t = 0; t < T; ++t) {
    const i64 y = p.targets[t];
    if (y == p.opt.ignore_index) continue;
    const double g = p.opt.grad_output * (p.weights.empty() ? 1.0 : p.weights[t]) * scale;
    if (g == 0) continue;
    for (i64 v = 0; v < V; ++v) {
      const double prob = std::exp(logz[t * V + v] - lse[t]);
      const double dz =
          g * ((1 + 2 * lambda * lse[t]) * prob - (1 - eps) * (v == y ? 1.0 : 0.0) - eps / V);
      for (i64 j = 0; j < H; ++j) {
        r.dx[t * H + j] += dz * p.w[v * H + j];
        r.dw[v * H + j] += dz * p.x[t * H + j];
      }
    }
  }
  return r;
}

// ---- random problems --------------------------------------------------------------------------

struct shape {
  i64 tokens, hidden, vocab;
  int ranks;
  i64 pad_multiple;
};

template <class T>
double rounded(double a) {
  return static_cast<double>(static_cast<T>(a));
}

// Inputs are rounded to T so that the reference sees exactly what the layer sees.
template <class T>
problem make_problem(std::mt19937_64& rng, shape s, double logit_scale = 3.0,
                     double ignore_fraction = 0.15, bool with_weights = false) {
  problem p;
  p.tokens = s.tokens;
  p.hidden = s.hidden;
  p.vocab = s.vocab;
  p.ranks = s.ranks;
  p.pad_multiple = s.pad_multiple;
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  const double xs = std::sqrt(logit_scale),
               ws = std::sqrt(logit_scale) / std::sqrt(double(s.hidden));
  for (i64 i = 0; i < s.tokens * s.hidden; ++i) p.x.push_back(rounded<T>(xs * u(rng)));
  for (i64 i = 0; i < s.vocab * s.hidden; ++i) p.w.push_back(rounded<T>(ws * u(rng)));
  std::uniform_int_distribution<i64> id(0, s.vocab - 1);
  std::uniform_real_distribution<double> f(0.0, 1.0);
  for (i64 t = 0; t < s.tokens; ++t)
    p.targets.push_back(f(rng) < ignore_fraction ? p.opt.ignore_index : id(rng));
  if (with_weights)
    for (i64 t = 0; t < s.tokens; ++t) p.weights.push_back(f(rng) < 0.2 ? 0.0 : 2 * f(rng));
  return p;
}

// ---- comparison -------------------------------------------------------------------------------

#ifdef PIPIT_VOCAB_TEST_REPORT
// Largest observed error / scale per tolerance, printed at exit (for documenting tolerances).
struct error_report {
  std::map<double, double> worst;
  ~error_report() {
    for (auto [tol, e] : worst) std::printf("tolerance %g: worst observed %g\n", tol, e);
  }
} report;
void report_error(double tol, double e) {
  report.worst[tol] = std::max(report.worst[tol], e);
}
#endif

double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::abs(x));
  return m;
}

template <class A>
void check_close(const std::vector<A>& got, const std::vector<double>& want, double tol,
                 const char* what) {
  REQUIRE(got.size() == want.size());
  double err = 0;
  bool finite = true;
  for (std::size_t i = 0; i < got.size(); ++i) {
    finite = finite && std::isfinite(static_cast<double>(got[i]));
    err = std::max(err, std::abs(static_cast<double>(got[i]) - want[i]));
  }
  const double scale = max_abs(want);
#ifdef PIPIT_VOCAB_TEST_REPORT
  if (scale > 0) report_error(tol, err / scale);
#endif
  INFO(what << ": max error " << err << ", max |reference| " << scale << ", tolerance " << tol);
  CHECK(finite);
  if (scale == 0)
    CHECK(err == 0);
  else
    CHECK(err <= tol * scale);
}

void check_loss(double got, double want, double tol, const char* what) {
#ifdef PIPIT_VOCAB_TEST_REPORT
  report_error(tol, std::abs(got - want) / std::max(1.0, std::abs(want)));
#endif
  INFO(what << ": got " << got << ", want " << want);
  CHECK(std::isfinite(got));
  CHECK(std::abs(got - want) <= tol * std::max(1.0, std::abs(want)));
}

// ---- the n ranks' local passes, combined in rank order ----------------------------------------

template <class A>
struct sharded_result {
  v::loss_result<A> loss{};
  std::vector<A> dx;  // tokens x hidden
  std::vector<A> dw;  // vocab x hidden (the real rows of every shard, in id order)
  bool padding_untouched = true;
  bool ranks_agree = true;  // every rank computed the same loss and g
};

template <class E, class Op>
void all_reduce_in_rank_order(std::vector<std::span<E>> parts, Op op) {
  std::vector<E> acc(parts[0].begin(), parts[0].end());
  for (std::size_t r = 1; r < parts.size(); ++r)
    for (std::size_t i = 0; i < acc.size(); ++i) acc[i] = op(acc[i], parts[r][i]);
  for (auto& part : parts) std::copy(acc.begin(), acc.end(), part.begin());
}

// Per-rank weight shards in T with NaN padding rows (a padding row that were read would poison
// everything).
template <class T>
std::vector<std::vector<T>> shard_weights(const problem& p, const v::vocab_shards& shards) {
  std::vector<std::vector<T>> out(static_cast<std::size_t>(p.ranks));
  for (int r = 0; r < p.ranks; ++r) {
    auto& s = out[r];
    s.assign(static_cast<std::size_t>(shards.shard_size() * p.hidden),
             static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
    const auto range = shards.real_range_of(r);
    for (i64 v = range.begin; v < range.end; ++v)
      for (i64 j = 0; j < p.hidden; ++j)
        s[(v - range.begin) * p.hidden + j] = static_cast<T>(p.w[v * p.hidden + j]);
  }
  return out;
}

template <class Alg, std::size_t Chunk, class T>
sharded_result<v::accum_t<T>> run_local_passes(const problem& p) {
  using A = v::accum_t<T>;
  using layer_t = v::output_layer<Alg, T, Chunk>;
  const v::vocab_shards shards(p.vocab, p.ranks, p.pad_multiple);
  const i64 T_ = p.tokens, H = p.hidden;
  std::vector<T> x;
  for (double a : p.x) x.push_back(static_cast<T>(a));
  const auto w = shard_weights<T>(p, shards);
  std::vector<A> weights(p.weights.begin(), p.weights.end());
  std::vector<layer_t> layers;
  for (int r = 0; r < p.ranks; ++r)
    layers.emplace_back(shards, r, v::make_view<const T>(x.data(), T_, H),
                        v::make_view<const T>(w[r].data(), shards.shard_size(), H), p.targets,
                        p.opt);
  const auto tn = static_cast<std::size_t>(T_ * H);
  std::vector<std::vector<A>> acc(static_cast<std::size_t>(p.ranks), std::vector<A>(tn));
  // S pass on every rank.
  for (int r = 0; r < p.ranks; ++r) {
    if constexpr (std::is_same_v<Alg, v::one_barrier>)
      layers[r].s_pass(v::make_view(acc[r].data(), T_, H));
    else
      layers[r].s_pass();
  }
  // Statistics merge.
  if constexpr (std::is_same_v<Alg, v::naive>) {
    std::vector<std::span<A>> m, ts, se;
    for (auto& l : layers) m.push_back(l.naive_max());
    all_reduce_in_rank_order(m, pipit::comm::max_op{});
    for (auto& l : layers) ts.push_back(l.naive_target_sums());
    all_reduce_in_rank_order(ts, std::plus<>{});
    for (auto& l : layers) se.push_back(l.naive_sum_exp());
    all_reduce_in_rank_order(se, std::plus<>{});
    for (auto& l : layers) l.naive_combine();
  } else {
    std::vector<std::span<v::token_stats<A>>> st;
    for (auto& l : layers) st.push_back(l.stats());
    all_reduce_in_rank_order(st, v::merge_op{});
  }
  sharded_result<A> out;
  // Loss and g on every rank (they must agree).
  std::vector<std::vector<A>> g(static_cast<std::size_t>(p.ranks),
                                std::vector<A>(p.targets.size()));
  for (int r = 0; r < p.ranks; ++r) {
    const auto lr = layers[r].loss(g[r], weights);
    if (r == 0)
      out.loss = lr;
    else
      out.ranks_agree = out.ranks_agree && lr.loss == out.loss.loss && g[r] == g[0];
  }
  // Input gradient.
  std::vector<std::span<A>> parts;
  std::vector<std::vector<A>> dw(static_cast<std::size_t>(p.ranks),
                                 std::vector<A>(static_cast<std::size_t>(shards.shard_size() * H)));
  for (int r = 0; r < p.ranks; ++r) {
    const auto dwv = v::make_view(dw[r].data(), shards.shard_size(), H);
    if constexpr (std::is_same_v<Alg, v::one_barrier>) {
      layers[r].input_grad_partial(v::make_view(acc[r].data(), T_, H));
      layers[r].t_pass(g[r], dwv);
    } else {
      layers[r].t_pass(g[r], dwv, v::make_view(acc[r].data(), T_, H));
    }
    parts.push_back(acc[r]);
  }
  all_reduce_in_rank_order(parts, std::plus<>{});
  if constexpr (std::is_same_v<Alg, v::one_barrier>)
    v::scale_rows(v::make_view(acc[0].data(), T_, H), std::span<const A>(g[0]));
  out.dx = acc[0];
  for (int r = 0; r < p.ranks; ++r) {
    const auto range = shards.real_range_of(r);
    for (i64 i = 0; i < shards.shard_size() * H; ++i) {
      if (i / H < range.size())
        out.dw.push_back(dw[r][i]);
      else
        out.padding_untouched = out.padding_untouched && dw[r][i] == A(0);
    }
  }
  return out;
}

template <class Alg, std::size_t Chunk, class T>
void check_against_reference(const problem& p, const reference_result& ref, double tol) {
  const auto got = run_local_passes<Alg, Chunk, T>(p);
  CHECK(got.ranks_agree);
  CHECK(got.padding_untouched);
  check_loss(got.loss.loss, ref.loss, tol, "loss");
  check_loss(got.loss.z_loss, ref.z_loss, tol, "z-loss");
  CHECK(got.loss.tokens == ref.tokens);
  check_close(got.dx, ref.dx, tol, "input gradient");
  check_close(got.dw, ref.dw, tol, "weight gradient");
}

template <class T>
void check_every_algorithm(const problem& p, double tol) {
  const reference_result ref = reference(p);
  {
    INFO("naive");
    check_against_reference<v::naive, 7, T>(p, ref, tol);
  }
  {
    INFO("two_barrier");
    check_against_reference<v::two_barrier, 7, T>(p, ref, tol);
    check_against_reference<v::two_barrier, v::default_chunk, T>(p, ref, tol);
  }
  {
    INFO("one_barrier");
    check_against_reference<v::one_barrier, 7, T>(p, ref, tol);
    check_against_reference<v::one_barrier, 1, T>(p, ref, tol);
    check_against_reference<v::one_barrier, v::default_chunk, T>(p, ref, tol);
  }
}

shape random_shape(std::mt19937_64& rng) {
  std::uniform_int_distribution<i64> tokens(1, 40), hidden(1, 24), vocab(1, 300);
  std::uniform_int_distribution<int> ranks(1, 8);
  const i64 multiples[] = {1, 1, 4, 16};
  return {tokens(rng), hidden(rng), vocab(rng), ranks(rng), multiples[rng() % 4]};
}

}  // namespace

// ---- shards ----------------------------------------------------------------------------------

TEST_CASE("vocab_shards: contiguous padded ranges, owners and real rows", "[vocab]") {
  constexpr v::vocab_shards gpt2(50257, 8, 128);
  STATIC_REQUIRE(gpt2.padded_size() == 51200);  // a multiple of 8 * 128
  STATIC_REQUIRE(gpt2.shard_size() == 6400);
  STATIC_REQUIRE(gpt2.owner(50256) == 7);
  STATIC_REQUIRE(gpt2.real_rows(7) == 50257 - 7 * 6400);

  for (i64 V = 1; V < 70; ++V)
    for (int n = 1; n <= 9; ++n)
      for (i64 mult : {1, 2, 8}) {
        const v::vocab_shards s(V, n, mult);
        INFO("V " << V << " n " << n << " multiple " << mult);
        CHECK(s.padded_size() % (n * mult) == 0);
        CHECK(s.padded_size() >= V);
        CHECK(s.padded_size() - V < n * mult);
        CHECK(s.shard_size() % mult == 0);
        i64 next = 0, real = 0;
        for (int r = 0; r < n; ++r) {
          CHECK(s.range_of(r).begin == next);
          CHECK(s.range_of(r).size() == s.shard_size());
          next = s.range_of(r).end;
          CHECK(s.real_range_of(r).begin == std::min(s.range_of(r).begin, V));
          real += s.real_rows(r);
        }
        CHECK(next == s.padded_size());
        CHECK(real == V);
        for (i64 id = 0; id < V; ++id) {
          const int o = s.owner(id);
          CHECK(s.real_range_of(o).begin <= id);
          CHECK(id < s.real_range_of(o).end);
        }
      }
}

TEST_CASE("vocab_shards: out-of-range ids and bad arguments raise errors naming the values",
          "[vocab]") {
  const v::vocab_shards s(1000, 4, 16);
  for (i64 bad : {i64(-1), i64(1000), i64(1023), i64(-100), i64(1) << 40}) {
    try {
      (void)s.owner(bad);
      FAIL("owner(" << bad << ") did not throw");
    } catch (const pipit::error& e) {
      const std::string what = e.what();
      CHECK(what.find(std::to_string(bad)) != std::string::npos);
      CHECK(what.find("1000") != std::string::npos);
    }
  }
  CHECK_THROWS_AS(v::vocab_shards(0, 4), pipit::error);
  CHECK_THROWS_AS(v::vocab_shards(10, 0), pipit::error);
  CHECK_THROWS_AS(v::vocab_shards(10, 2, 0), pipit::error);
  CHECK_THROWS_AS(s.range_of(4), pipit::error);
}

// ---- softmax statistics ----------------------------------------------------------------------

TEST_CASE("merge_op: online-softmax merge is exact on empty sets and matches direct sums",
          "[vocab]") {
  using S = v::softmax_stats<double>;
  const S e = S::empty();
  const S ee = v::merge(e, e);
  CHECK(ee.max == -inf);
  CHECK(ee.sum == 0);
  const S a{2.5, 3.0};
  CHECK(v::merge(a, e).max == a.max);
  CHECK(v::merge(a, e).sum == a.sum);
  CHECK(v::merge(e, a).sum == a.sum);
  // Extreme maxima: no overflow, the smaller side underflows to 0.
  const S big{1e4, 1.0}, small{-1e4, 5.0};
  CHECK(v::merge(big, small).max == 1e4);
  CHECK(v::merge(big, small).sum == 1.0);
  CHECK(std::isfinite(v::merge(small, big).sum));

  std::mt19937_64 rng(7);
  std::normal_distribution<double> z(0.0, 20.0);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<double> xs(1 + rng() % 60);
    for (double& x : xs) x = z(rng);
    // Split into 4 (possibly empty) parts; merge in two different bracketings.
    std::vector<std::size_t> cut = {0, rng() % (xs.size() + 1), rng() % (xs.size() + 1),
                                    rng() % (xs.size() + 1), xs.size()};
    std::sort(cut.begin(), cut.end());
    std::vector<S> parts;
    for (int k = 0; k < 4; ++k)
      parts.push_back(v::row_stats(xs.data() + cut[k], cut[k + 1] - cut[k]));
    const S left = v::merge(v::merge(v::merge(parts[0], parts[1]), parts[2]), parts[3]);
    const S right = v::merge(parts[0], v::merge(parts[1], v::merge(parts[2], parts[3])));
    const S swapped = v::merge(parts[1], parts[0]);
    const S direct = v::row_stats(xs.data(), static_cast<i64>(xs.size()));
    CHECK(left.max == direct.max);
    CHECK(right.max == direct.max);
    CHECK(std::abs(left.sum - direct.sum) <= 1e-14 * direct.sum * 4);
    CHECK(std::abs(right.sum - direct.sum) <= 1e-14 * direct.sum * 4);
    CHECK(swapped.sum == v::merge(parts[0], parts[1]).sum);  // exactly commutative
    // Element by element and the chunked streaming form agree with the two-pass statistics.
    S one = S::empty(), streamed = S::empty();
    for (double x : xs) v::accumulate(one, x);
    std::vector<double> copy = xs;
    for (std::size_t b = 0; b < copy.size(); b += 5)
      v::online_softmax_chunk(copy.data() + b, std::min<i64>(5, copy.size() - b), streamed);
    CHECK(one.max == direct.max);
    CHECK(streamed.max == direct.max);
    CHECK(std::abs(one.sum - direct.sum) <= 1e-13 * direct.sum);
    CHECK(std::abs(streamed.sum - direct.sum) <= 1e-13 * direct.sum);
  }
  // token_stats: the softmax part merges, target and logit sums add; merge_op takes both.
  const v::token_stats<float> t1{1.f, 2.f, 0.5f, 3.f},
      t2{-std::numeric_limits<float>::infinity(), 0.f, 0.f, 0.f};
  const auto t12 = v::merge_op{}(t1, t2);
  CHECK(t12.max == 1.f);
  CHECK(t12.sum == 2.f);
  CHECK(t12.target == 0.5f);
  CHECK(t12.logit_sum == 3.f);
  v::softmax_stats<double> acc = S::empty();
  v::accumulate(acc, -inf);  // a masked logit changes nothing
  CHECK(acc.max == -inf);
  CHECK(acc.sum == 0);
}

// ---- output layer: local passes against the reference ---------------------------------------

TEST_CASE("output layer local passes match the double reference for every algorithm", "[vocab]") {
  STATIC_REQUIRE(v::barriers<v::naive> == 3);
  STATIC_REQUIRE(v::barriers<v::two_barrier> == 2);
  STATIC_REQUIRE(v::barriers<v::one_barrier> == 1);
  STATIC_REQUIRE(!v::output_algorithm<int>);
  std::mt19937_64 rng(2024);
  for (int trial = 0; trial < 120; ++trial) {
    const shape s = random_shape(rng);
    problem p = make_problem<double>(rng, s, 3.0, 0.15, trial % 3 == 0);
    p.opt.reduce = trial % 2 ? v::reduction::sum : v::reduction::mean;
    INFO("trial " << trial << ": tokens " << s.tokens << " hidden " << s.hidden << " vocab "
                  << s.vocab << " ranks " << s.ranks << " multiple " << s.pad_multiple);
    check_every_algorithm<double>(p, 1e-12);
  }
}

TEST_CASE("output layer: a vocabulary not divisible by the ranks, with empty shards", "[vocab]") {
  std::mt19937_64 rng(11);
  // 13 ids over 4 ranks padded to 4 * 8: rank 0 holds 8 real rows, rank 1 five, ranks 2-3 none.
  for (const shape s : {shape{9, 5, 13, 4, 8}, shape{6, 3, 5, 8, 1}, shape{17, 4, 1, 3, 1},
                        shape{12, 6, 101, 7, 2}}) {
    INFO("vocab " << s.vocab << " ranks " << s.ranks);
    const problem p = make_problem<double>(rng, s);
    check_every_algorithm<double>(p, 1e-12);
  }
}

TEST_CASE("output layer: float and bfloat16 inputs with float accumulation", "[vocab]") {
  std::mt19937_64 rng(99);
  for (int trial = 0; trial < 40; ++trial) {
    const shape s = random_shape(rng);
    INFO("trial " << trial << ": tokens " << s.tokens << " hidden " << s.hidden << " vocab "
                  << s.vocab << " ranks " << s.ranks);
    {
      INFO("float");
      problem p = make_problem<float>(rng, s);
      p.opt.label_smoothing = trial % 3 == 0 ? 0.1 : 0.0;
      check_every_algorithm<float>(p, 5e-5);
    }
    {
      INFO("bfloat16");
      problem p = make_problem<bf16>(rng, s);
      p.opt.z_loss = trial % 3 == 1 ? 1e-3 : 0.0;
      check_every_algorithm<bf16>(p, 5e-5);
    }
  }
}

TEST_CASE("output layer: ignore index, loss mask and an all-ignored microbatch", "[vocab]") {
  std::mt19937_64 rng(5);
  const shape s{16, 8, 50, 3, 4};
  SECTION("ignore index and weights") {
    problem p = make_problem<double>(rng, s, 3.0, 0.4, true);
    check_every_algorithm<double>(p, 1e-12);
  }
  SECTION("a custom ignore index inside the vocabulary") {
    problem p = make_problem<double>(rng, s, 3.0, 0.0);
    p.opt.ignore_index = 7;
    for (i64 t = 0; t < s.tokens; t += 3) p.targets[t] = 7;
    check_every_algorithm<double>(p, 1e-12);
  }
  SECTION("every token ignored: loss 0, gradients exactly 0, no NaN") {
    for (const auto red : {v::reduction::mean, v::reduction::sum}) {
      problem p = make_problem<double>(rng, s, 3.0, 1.0);
      p.opt.reduce = red;
      const reference_result ref = reference(p);
      CHECK(ref.loss == 0);
      const auto n = run_local_passes<v::naive, 7, double>(p);
      const auto t = run_local_passes<v::two_barrier, 7, double>(p);
      const auto o = run_local_passes<v::one_barrier, 7, double>(p);
      const auto f =
          run_local_passes<v::one_barrier, 7, float>(make_problem<float>(rng, s, 3.0, 1.0));
      for (const auto* r : {&n, &t, &o}) {
        CHECK(r->loss.loss == 0);
        CHECK(r->loss.tokens == 0);
        CHECK(max_abs(r->dx) == 0);
        CHECK(max_abs(r->dw) == 0);
      }
      CHECK(f.loss.loss == 0);
      for (float a : f.dx) CHECK(a == 0.f);
    }
  }
  SECTION("all weights zero") {
    problem p = make_problem<double>(rng, s, 3.0, 0.0, true);
    std::fill(p.weights.begin(), p.weights.end(), 0.0);
    const auto o = run_local_passes<v::one_barrier, 7, double>(p);
    CHECK(o.loss.loss == 0);
    CHECK(o.loss.weight == 0);
    CHECK(max_abs(o.dx) == 0);
  }
}

TEST_CASE("output layer: extreme logits of magnitude 1e4 neither overflow nor give NaN",
          "[vocab]") {
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 6; ++trial) {
    const shape s{10, 4, 40 + 7 * trial, 1 + trial, 2};
    INFO("trial " << trial);
    problem p = make_problem<double>(rng, s, 1.0, 0.1);
    // Scale every logit to +-1e4: x is 100 * a unit-ish vector, w rows 100 * +-unit.
    for (double& a : p.x) a = a > 0 ? 100.0 : -100.0;
    for (i64 vv = 0; vv < s.vocab; ++vv)
      for (i64 j = 0; j < s.hidden; ++j)
        p.w[vv * s.hidden + j] = (j == vv % s.hidden) ? ((vv % 3) ? 100.0 : -100.0) : 0.0;
    p.opt.z_loss = trial % 2 ? 1e-4 : 0.0;
    p.opt.label_smoothing = trial % 3 ? 0.1 : 0.0;
    check_every_algorithm<double>(p, 1e-12 * 1e4);
    // float: finite everywhere; the loss to ~float epsilon relative to 1e4. A float logit of
    // magnitude 1e4 is only known to 1e4 * 2^-24 = 6e-4 absolute, which p = exp(z - lse)
    // inherits as a relative error: gradients to 2e-3 of their largest entry (observed 3e-4).
    problem pf = p;
    const auto f = run_local_passes<v::one_barrier, 7, float>(pf);
    const auto f2 = run_local_passes<v::two_barrier, 7, float>(pf);
    const reference_result ref = reference(p);
    check_loss(f.loss.loss, ref.loss, 1e-6, "float loss, one_barrier");
    check_loss(f2.loss.loss, ref.loss, 1e-6, "float loss, two_barrier");
    check_close(f.dx, ref.dx, 2e-3, "float input gradient");
    check_close(f2.dw, ref.dw, 2e-3, "float weight gradient");
  }
}

TEST_CASE("output layer: label smoothing and z-loss", "[vocab]") {
  std::mt19937_64 rng(77);
  for (int trial = 0; trial < 16; ++trial) {
    const shape s = random_shape(rng);
    problem p = make_problem<double>(rng, s, 5.0, 0.2, trial % 2 == 0);
    p.opt.label_smoothing = (trial % 4) * 0.1;
    p.opt.z_loss = (trial % 3) * 1e-3;
    p.opt.grad_output = 0.5 + trial;
    p.opt.reduce = trial % 5 == 0 ? v::reduction::sum : v::reduction::mean;
    INFO("trial " << trial << " eps " << p.opt.label_smoothing << " lambda " << p.opt.z_loss);
    check_every_algorithm<double>(p, 1e-12);
  }
  // eps = 1: the target drops out entirely.
  problem p = make_problem<double>(rng, {8, 4, 30, 3, 1});
  p.opt.label_smoothing = 1.0;
  check_every_algorithm<double>(p, 1e-12);
}

TEST_CASE("output layer: bad inputs raise errors naming the values", "[vocab]") {
  const v::vocab_shards shards(100, 2, 1);
  std::vector<float> x(4 * 3, 0.1f), w(50 * 3, 0.1f);
  std::vector<i64> targets = {0, 5, 100, -100};
  using layer_t = v::output_layer<v::two_barrier, float>;
  try {
    layer_t l(shards, 0, v::make_view<const float>(x.data(), 4, 3),
              v::make_view<const float>(w.data(), 50, 3), targets);
    FAIL("a target of 100 with a vocabulary of 100 was accepted");
  } catch (const pipit::error& e) {
    const std::string what = e.what();
    CHECK(what.find("100") != std::string::npos);
    CHECK(what.find("vocabulary") != std::string::npos);
  }
  targets[2] = 99;
  CHECK_NOTHROW(layer_t(shards, 1, v::make_view<const float>(x.data(), 4, 3),
                        v::make_view<const float>(w.data(), 50, 3), targets));
  CHECK_THROWS_AS(layer_t(shards, 0, v::make_view<const float>(x.data(), 4, 3),
                          v::make_view<const float>(w.data(), 49, 3), targets),
                  pipit::error);  // shard has 50 rows
  CHECK_THROWS_AS(layer_t(shards, 2, v::make_view<const float>(x.data(), 4, 3),
                          v::make_view<const float>(w.data(), 50, 3), targets),
                  pipit::error);  // no rank 2
  v::loss_options bad;
  bad.label_smoothing = 1.5;
  CHECK_THROWS_AS(layer_t(shards, 0, v::make_view<const float>(x.data(), 4, 3),
                          v::make_view<const float>(w.data(), 50, 3), targets, bad),
                  pipit::error);
  layer_t l(shards, 0, v::make_view<const float>(x.data(), 4, 3),
            v::make_view<const float>(w.data(), 50, 3), targets);
  std::vector<float> g(4), dw(50 * 3), dx(4 * 3);
  CHECK_THROWS_AS(l.t_pass(g, v::make_view(dw.data(), 50, 3), v::make_view(dx.data(), 4, 3)),
                  pipit::error);  // before the S pass
  l.s_pass();
  std::vector<float> neg = {1.f, -1.f, 1.f, 1.f};
  CHECK_THROWS_AS(l.loss(g, neg), pipit::error);
}

// ---- input embedding -------------------------------------------------------------------------

TEST_CASE("sharded input embedding forward and backward match the unsharded reference", "[vocab]") {
  std::mt19937_64 rng(31);
  std::uniform_real_distribution<double> u(-1, 1);
  for (int trial = 0; trial < 60; ++trial) {
    const shape s = random_shape(rng);
    const v::vocab_shards shards(s.vocab, s.ranks, s.pad_multiple);
    const i64 H = s.hidden, T = s.tokens;
    std::vector<double> table(static_cast<std::size_t>(s.vocab * H)), gout(T * H);
    for (double& a : table) a = u(rng);
    for (double& a : gout) a = u(rng);
    std::vector<i64> tokens(static_cast<std::size_t>(T));
    for (i64& t : tokens) t = static_cast<i64>(rng() % static_cast<std::uint64_t>(s.vocab));
    if (T > 2) tokens[1] = tokens[0];  // a repeated token accumulates
    // reference
    std::vector<double> ref_out(T * H), ref_grad(table.size(), 0.0);
    for (i64 t = 0; t < T; ++t)
      for (i64 j = 0; j < H; ++j) {
        ref_out[t * H + j] = table[tokens[t] * H + j];
        ref_grad[tokens[t] * H + j] += gout[t * H + j];
      }
    // sharded
    std::vector<double> out(T * H, 0.0), grad;
    for (int r = 0; r < s.ranks; ++r) {
      std::vector<double> shard(static_cast<std::size_t>(shards.shard_size() * H),
                                std::numeric_limits<double>::quiet_NaN());
      const auto range = shards.real_range_of(r);
      std::copy(table.begin() + range.begin * H, table.begin() + range.end * H, shard.begin());
      std::vector<double> part(T * H, -1.0), shard_grad(shard.size(), 0.0);
      v::embedding_forward_local<double, double>(
          shards, r, v::make_view<const double>(shard.data(), shards.shard_size(), H), tokens,
          v::make_view(part.data(), T, H));
      for (std::size_t i = 0; i < out.size(); ++i) out[i] += part[i];
      v::embedding_backward_local<double, double>(
          shards, r, tokens, v::make_view<const double>(gout.data(), T, H),
          v::make_view(shard_grad.data(), shards.shard_size(), H));
      for (i64 i = 0; i < shards.shard_size() * H; ++i) {
        if (i / H < range.size())
          grad.push_back(shard_grad[i]);
        else
          CHECK(shard_grad[i] == 0.0);  // padding rows never receive gradient
      }
    }
    CHECK(out == ref_out);  // exactly one rank contributes each row: exact
    check_close(grad, ref_grad, 1e-15, "embedding gradient");
  }
  const v::vocab_shards shards(10, 2);
  std::vector<float> table(5 * 2), out(2 * 2);
  std::vector<i64> bad = {3, 10};
  try {
    v::embedding_forward_local<float, float>(shards, 0,
                                             v::make_view<const float>(table.data(), 5, 2), bad,
                                             v::make_view(out.data(), 2, 2));
    FAIL("token 10 of a 10-id vocabulary was accepted");
  } catch (const pipit::error& e) {
    CHECK(std::string(e.what()).find("10") != std::string::npos);
  }
}

// ---- the drivers on real thread ranks ---------------------------------------------------------

#if PIPIT_VOCAB_TEST_THREADS
namespace {

template <class Alg, class T>
void check_driver_on_threads(const problem& p, double tol, int grad_x_root) {
  using A = v::accum_t<T>;
  const v::vocab_shards shards(p.vocab, p.ranks, p.pad_multiple);
  const reference_result ref = reference(p);
  std::vector<T> x;
  for (double a : p.x) x.push_back(static_cast<T>(a));
  const auto w = shard_weights<T>(p, shards);
  const std::vector<A> weights(p.weights.begin(), p.weights.end());
  const i64 H = p.hidden, Tn = p.tokens;
  std::vector<std::vector<A>> dx(p.ranks), dw(p.ranks);
  std::vector<v::loss_result<A>> res(p.ranks);
  pipit::comm::threads::run(p.ranks, [&](pipit::comm::threads& comm) {
    const int r = comm.rank();
    dx[r].assign(static_cast<std::size_t>(Tn * H), A(0));
    dw[r].assign(static_cast<std::size_t>(shards.shard_size() * H), A(0));
    res[r] = v::output_layer_forward_backward<Alg, 7>(
        comm, shards, v::make_view<const T>(x.data(), Tn, H),
        v::make_view<const T>(w[r].data(), shards.shard_size(), H), p.targets,
        v::make_view(dx[r].data(), Tn, H), v::make_view(dw[r].data(), shards.shard_size(), H),
        p.opt, weights, grad_x_root);
  });
  std::vector<A> dw_all;
  for (int r = 0; r < p.ranks; ++r) {
    check_loss(res[r].loss, ref.loss, tol, "loss");
    if (grad_x_root == v::all_ranks || grad_x_root == r)
      check_close(dx[r], ref.dx, tol, "input gradient");
    const auto range = shards.real_range_of(r);
    for (i64 i = 0; i < shards.shard_size() * H; ++i)
      if (i / H < range.size())
        dw_all.push_back(dw[r][i]);
      else
        CHECK(dw[r][i] == A(0));
  }
  check_close(dw_all, ref.dw, tol, "weight gradient");
}

}  // namespace

TEST_CASE("output_layer_forward_backward on 1 to 8 comm::threads ranks", "[vocab][threads]") {
  std::mt19937_64 rng(8);
  for (int n = 1; n <= 8; ++n) {
    std::uniform_int_distribution<i64> vocab(1, 120);
    shape s{1 + static_cast<i64>(rng() % 24), 1 + static_cast<i64>(rng() % 12), vocab(rng), n,
            n % 2 ? 1 : 4};
    problem p = make_problem<double>(rng, s, 3.0, 0.2, n % 3 == 0);
    p.opt.label_smoothing = n % 2 ? 0.05 : 0.0;
    p.opt.z_loss = n % 4 == 0 ? 1e-3 : 0.0;
    INFO("ranks " << n << " tokens " << s.tokens << " vocab " << s.vocab);
    const int root = n % 2 ? v::all_ranks : n - 1;
    check_driver_on_threads<v::naive, double>(p, 1e-12, root);
    check_driver_on_threads<v::two_barrier, double>(p, 1e-12, root);
    check_driver_on_threads<v::one_barrier, double>(p, 1e-12, root);
    problem pf = make_problem<float>(rng, s);
    check_driver_on_threads<v::one_barrier, float>(pf, 5e-5, v::all_ranks);
    check_driver_on_threads<v::two_barrier, float>(pf, 5e-5, 0);
  }
}

TEST_CASE("embedding_forward and embedding_backward on 1 to 8 comm::threads ranks",
          "[vocab][threads]") {
  std::mt19937_64 rng(9);
  std::uniform_real_distribution<float> u(-1, 1);
  for (int n = 1; n <= 8; ++n) {
    const i64 V = 1 + static_cast<i64>(rng() % 90), H = 5, T = 13;
    const v::vocab_shards shards(V, n, 2);
    std::vector<float> table(V * H), gout(T * H);
    for (float& a : table) a = u(rng);
    for (float& a : gout) a = u(rng);
    std::vector<i64> tokens(T);
    for (i64& t : tokens) t = static_cast<i64>(rng() % static_cast<std::uint64_t>(V));
    const int root = n % 2 ? v::all_ranks : 0;
    std::vector<std::vector<float>> out(n), grad(n);
    pipit::comm::threads::run(n, [&](pipit::comm::threads& comm) {
      const int r = comm.rank();
      const auto range = shards.real_range_of(r);
      std::vector<float> shard(static_cast<std::size_t>(shards.shard_size() * H), 0.f);
      std::copy(table.begin() + range.begin * H, table.begin() + range.end * H, shard.begin());
      out[r].assign(T * H, 0.f);
      v::embedding_forward(comm, shards,
                           v::make_view<const float>(shard.data(), shards.shard_size(), H), tokens,
                           v::make_view(out[r].data(), T, H), root);
      std::vector<float> g = r == 0 ? gout : std::vector<float>(T * H, 0.f);  // only stage 0 has it
      grad[r].assign(shard.size(), 0.f);
      v::embedding_backward(comm, shards, tokens, v::make_view(g.data(), T, H),
                            v::make_view(grad[r].data(), shards.shard_size(), H), 0);
    });
    for (int r = 0; r < n; ++r) {
      if (root == v::all_ranks || r == root)
        for (i64 t = 0; t < T; ++t)
          for (i64 j = 0; j < H; ++j) CHECK(out[r][t * H + j] == table[tokens[t] * H + j]);
      const auto range = shards.real_range_of(r);
      for (i64 row = 0; row < shards.shard_size(); ++row)
        for (i64 j = 0; j < H; ++j) {
          double want = 0;
          for (i64 t = 0; t < T; ++t)
            if (row < range.size() && tokens[t] == range.begin + row) want += gout[t * H + j];
          CHECK(std::abs(grad[r][row * H + j] - want) <= 1e-6);
        }
    }
  }
}
#endif
