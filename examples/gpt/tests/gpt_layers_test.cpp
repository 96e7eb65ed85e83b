// The GPT example's layers: every forward / input-backward / weight-backward against central
// finite differences in double, the causal mask, the output layer against a plain softmax
// cross-entropy, the split backward (B then W) against the combined one, and the stage's
// vocabulary-parallel mode against its own-head mode; tensor-parallel blocks (Megatron's split over
// 2 and 4 thread ranks) against the unsharded block.
//
// Finite differences: step h = 1e-5 on a scalar objective (sum of r .* y for a fixed random r, or
// the loss); the truncation error is O(h^2) ~ 1e-10 and the rounding error ~ 1e-16 / h ~ 1e-11,
// so an analytic gradient must agree within 1e-7 absolute + 1e-6 relative (measured: < 1e-9).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <vector>

#include "block.hpp"
#include "embedding.hpp"
#include "gpt_stage.hpp"
#include "layer_norm.hpp"
#include "linear.hpp"
#include "lm_head.hpp"
#include "mlp.hpp"
#include "pipit/comm/threads.hpp"
#include "pipit/partition/naive.hpp"
#include "pipit/partition/vocab_parallel.hpp"
#include "random.hpp"
#include "tensor_group.hpp"

namespace {

using mat = gpt::matrix<double>;
using vec = gpt::vector<double>;
using gpt::cmap;
using gpt::map;

mat random_matrix(Eigen::Index r, Eigen::Index c, std::uint64_t seed, double scale = 1.0) {
  mat m(r, c);
  for (Eigen::Index j = 0; j < c; ++j)
    for (Eigen::Index i = 0; i < r; ++i)
      m(i, j) =
          scale * (2 * gpt::unit01(gpt::hash_of({seed, std::uint64_t(i), std::uint64_t(j)})) - 1);
  return m;
}
cmap<double> cm(const mat& m) {
  return cmap<double>(m.data(), m.rows(), m.cols());
}
map<double> mp(mat& m) {
  return map<double>(m.data(), m.rows(), m.cols());
}

constexpr double h = 1e-5;
double worst = 0;  // the largest finite-difference deviation seen

// Checks analytic[i] against the central difference of f in x[i], for every i.
void check_gradient(double* x, std::size_t count, const double* analytic,
                    const std::function<double()>& f, const char* what) {
  INFO(what);
  for (std::size_t i = 0; i < count; ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double up = f();
    x[i] = keep - h;
    const double down = f();
    x[i] = keep;
    const double fd = (up - down) / (2 * h);
    INFO("element " << i << ": analytic " << analytic[i] << ", finite difference " << fd);
    worst = std::max(worst, std::abs(analytic[i] - fd));
    REQUIRE(std::abs(analytic[i] - fd) <= 1e-7 + 1e-6 * std::abs(fd));
  }
}

TEST_CASE("layer norm gradients match finite differences", "[gpt]") {
  const Eigen::Index d = 6, n = 5;
  gpt::layer_norm<double> ln(d);
  ln.gamma = random_matrix(d, 1, 1);
  ln.beta = random_matrix(d, 1, 2);
  mat x = random_matrix(d, n, 3, 2.0), r = random_matrix(d, n, 4);
  mat y(d, n), xhat(d, n), rstd(1, n), dx(d, n);
  const auto objective = [&] {
    ln.forward(cm(x), mp(y), mp(xhat), mp(rstd));
    return y.cwiseProduct(r).sum();
  };
  objective();
  ln.backward_input(cm(r), cm(xhat), cm(rstd), mp(dx));
  ln.backward_weight(cm(r), cm(xhat));
  check_gradient(x.data(), x.size(), dx.data(), objective, "dx");
  check_gradient(ln.gamma.data(), d, ln.d_gamma.data(), objective, "dgamma");
  check_gradient(ln.beta.data(), d, ln.d_beta.data(), objective, "dbeta");
}

TEST_CASE("linear gradients match finite differences", "[gpt]") {
  gpt::linear<double> lin(random_matrix(4, 3, 5));
  lin.b = random_matrix(4, 1, 6);
  mat x = random_matrix(3, 5, 7), r = random_matrix(4, 5, 8), y(4, 5), dx(3, 5);
  const auto objective = [&] {
    lin.forward(cm(x), mp(y));
    return y.cwiseProduct(r).sum();
  };
  objective();
  lin.backward_input(cm(r), mp(dx));
  lin.backward_weight(cm(x), cm(r));
  check_gradient(x.data(), x.size(), dx.data(), objective, "dx");
  check_gradient(lin.w.data(), lin.w.size(), lin.d_w.data(), objective, "dW");
  check_gradient(lin.b.data(), lin.b.size(), lin.d_b.data(), objective, "db");
}

gpt::attention<double> make_attention(Eigen::Index d, int heads, int batch, int seq) {
  gpt::attention<double> a;
  a.qkv = gpt::linear<double>(random_matrix(3 * d, d, 11, 0.8));
  a.qkv.b = random_matrix(3 * d, 1, 12, 0.3);
  a.proj = gpt::linear<double>(random_matrix(d, d, 13, 0.5));
  a.proj.b = random_matrix(d, 1, 14, 0.3);
  a.heads = heads;
  a.batch = batch;
  a.seq = seq;
  return a;
}

TEST_CASE("causal attention gradients match finite differences", "[gpt]") {
  const Eigen::Index d = 8, batch = 2, seq = 4, n = batch * seq;
  auto a = make_attention(d, 2, batch, seq);
  mat x = random_matrix(d, n, 15), r = random_matrix(d, n, 16), y(d, n), qkv(3 * d, n), ctx(d, n);
  mat dctx(d, n), dqkv(3 * d, n), dx(d, n);
  std::vector<double> probs(a.probs_size());
  const auto objective = [&] {
    a.forward(cm(x), mp(y), mp(qkv), probs, mp(ctx));
    return y.cwiseProduct(r).sum();
  };
  objective();
  a.backward_input(cm(r), cm(qkv), probs, mp(dctx), mp(dqkv), mp(dx));
  a.backward_weight(cm(x), cm(r), cm(ctx), cm(dqkv));
  check_gradient(x.data(), x.size(), dx.data(), objective, "dx");
  check_gradient(a.qkv.w.data(), a.qkv.w.size(), a.qkv.d_w.data(), objective, "dWqkv");
  check_gradient(a.qkv.b.data(), a.qkv.b.size(), a.qkv.d_b.data(), objective, "dbqkv");
  check_gradient(a.proj.w.data(), a.proj.w.size(), a.proj.d_w.data(), objective, "dWproj");
  check_gradient(a.proj.b.data(), a.proj.b.size(), a.proj.d_b.data(), objective, "dbproj");
}

TEST_CASE("attention is causal and each sequence sees only itself", "[gpt]") {
  const Eigen::Index d = 8, batch = 2, seq = 5, n = batch * seq;
  auto a = make_attention(d, 2, batch, seq);
  mat x = random_matrix(d, n, 17), y0(d, n), y1(d, n), qkv(3 * d, n), ctx(d, n);
  std::vector<double> probs(a.probs_size());
  a.forward(cm(x), mp(y0), mp(qkv), probs, mp(ctx));
  x.col(2) += random_matrix(d, 1, 18);  // token 2 of sequence 0
  a.forward(cm(x), mp(y1), mp(qkv), probs, mp(ctx));
  CHECK(y0.leftCols(2) == y1.leftCols(2));        // earlier tokens: unchanged
  CHECK((y0.col(2) - y1.col(2)).norm() > 1e-3);   // the token itself: changed
  CHECK((y0.col(4) - y1.col(4)).norm() > 1e-3);   // later tokens: changed
  CHECK(y0.rightCols(seq) == y1.rightCols(seq));  // the other sequence: unchanged
  for (int i = 0; i < seq; ++i) {                 // probabilities: a distribution on 0 .. i
    const cmap<double> pt(probs.data(), seq, seq);
    CHECK(std::abs(pt.col(i).head(i + 1).sum() - 1.0) < 1e-12);
    CHECK(pt.col(i).tail(seq - i - 1).isZero(0.0));
  }
}

TEST_CASE("MLP gradients match finite differences", "[gpt]") {
  gpt::mlp<double> f;
  f.fc1 = gpt::linear<double>(random_matrix(12, 4, 21));
  f.fc1.b = random_matrix(12, 1, 22);
  f.fc2 = gpt::linear<double>(random_matrix(4, 12, 23));
  f.fc2.b = random_matrix(4, 1, 24);
  mat x = random_matrix(4, 6, 25, 1.5), r = random_matrix(4, 6, 26), y(4, 6), u(12, 6), g(12, 6);
  mat du(12, 6), dx(4, 6);
  const auto objective = [&] {
    f.forward(cm(x), mp(y), mp(u), mp(g));
    return y.cwiseProduct(r).sum();
  };
  objective();
  f.backward_input(cm(r), cm(u), mp(du), mp(dx));
  f.backward_weight(cm(x), cm(r), cm(g), cm(du));
  check_gradient(x.data(), x.size(), dx.data(), objective, "dx");
  check_gradient(f.fc1.w.data(), f.fc1.w.size(), f.fc1.d_w.data(), objective, "dW1");
  check_gradient(f.fc1.b.data(), f.fc1.b.size(), f.fc1.d_b.data(), objective, "db1");
  check_gradient(f.fc2.w.data(), f.fc2.w.size(), f.fc2.d_w.data(), objective, "dW2");
  check_gradient(f.fc2.b.data(), f.fc2.b.size(), f.fc2.d_b.data(), objective, "db2");
}

gpt::model_config tiny() {
  gpt::model_config c;
  c.vocab = 11;
  c.seq = 3;
  c.hidden = 8;
  c.heads = 2;
  c.layers = 2;
  c.ffn_mult = 2;
  c.batch = 2;
  c.init_std = 0.3;  // large enough that every path carries gradient
  c.seed = 5;
  return c;
}

TEST_CASE("transformer block gradients match finite differences", "[gpt]") {
  const gpt::model_config c = tiny();
  gpt::block<double> b(c, 0);
  b.ln1.gamma = random_matrix(c.hidden, 1, 31, 1.0).array() + 1.0;
  b.ln2.beta = random_matrix(c.hidden, 1, 32, 0.5);
  const Eigen::Index d = c.hidden, n = c.tokens();
  mat x = random_matrix(d, n, 33, 1.5), r = random_matrix(d, n, 34), y(d, n), dx(d, n);
  std::vector<double> saved(b.layout().size);
  const auto objective = [&] {
    b.forward(cm(x), mp(y), saved);
    return y.cwiseProduct(r).sum();
  };
  objective();
  b.backward_input(cm(r), saved, mp(dx));
  b.backward_weight(cm(r), saved);
  check_gradient(x.data(), x.size(), dx.data(), objective, "dx");
  b.for_each_parameter([&](gpt::tensor_id id, auto& value, auto& grad, gpt::tensor_split) {
    INFO("tensor " << static_cast<int>(id));
    check_gradient(value.data(), static_cast<std::size_t>(value.size()), grad.data(), objective,
                   "block parameter");
  });
}

// The plain reference: logits W^T x in double, log-softmax, mean cross-entropy.
double plain_cross_entropy(const mat& w, const mat& x, const std::vector<std::int32_t>& y) {
  const mat z = w.transpose() * x;
  double total = 0;
  for (Eigen::Index t = 0; t < z.cols(); ++t) {
    const double m = z.col(t).maxCoeff();
    const double lse = m + std::log((z.col(t).array() - m).exp().sum());
    total += lse - z(y[static_cast<std::size_t>(t)], t);
  }
  return total / static_cast<double>(z.cols());
}

TEST_CASE(
    "output layer: loss equals a plain softmax cross-entropy, gradients match finite differences",
    "[gpt]") {
  gpt::model_config c = tiny();
  c.vocab = 37;
  gpt::lm_head<double> head(c, 1);
  head.norm.gamma = random_matrix(c.hidden, 1, 41).array() + 1.0;
  head.norm.beta = random_matrix(c.hidden, 1, 42, 0.5);
  const Eigen::Index d = c.hidden, n = c.tokens();
  mat x = random_matrix(d, n, 43, 2.0), dx(d, n);
  std::vector<std::int32_t> y(static_cast<std::size_t>(n));
  for (std::size_t t = 0; t < y.size(); ++t) y[t] = static_cast<std::int32_t>((7 * t + 3) % 37);
  std::vector<double> saved(head.layout().size);
  const double scale = 0.5;  // as with 2 microbatches
  const auto objective = [&] { return scale * head.forward(0, cm(x), y, saved, scale); };

  // The loss against the plain formula on the normalised input.
  const double loss = head.forward(0, cm(x), y, saved, scale);
  const gpt::lm_head_layout& L = head.layout();
  const mat xf = cmap<double>(saved.data() + L.xf, d, n);
  CHECK(std::abs(loss - plain_cross_entropy(head.w, xf, y)) < 1e-12);

  head.backward_input(0, saved, mp(dx));
  head.backward_weight(0, saved);
  check_gradient(x.data(), x.size(), dx.data(), objective, "dx");
  check_gradient(head.w.data(), head.w.size(), head.d_w.data(), objective, "dW");
  check_gradient(head.norm.gamma.data(), d, head.norm.d_gamma.data(), objective, "dgamma");
  check_gradient(head.norm.beta.data(), d, head.norm.d_beta.data(), objective, "dbeta");
}

// ---- the stage --------------------------------------------------------------------------------

gpt::data_source tiny_data(const gpt::model_config& c) {
  return gpt::data_source(gpt::synthetic_language(c.vocab, 3, 1.0, 9));
}

pipit::runtime::pass_info pass(int stage, int stages, int mb) {
  pipit::runtime::pass_info i;
  i.stage = stage;
  i.microbatch = mb;
  i.first = stage == 0;
  i.last = stage == stages - 1;
  return i;
}

std::map<std::uint64_t, std::vector<double>> grads_of(const gpt::gpt_stage<double>& s) {
  std::map<std::uint64_t, std::vector<double>> g;
  for (const auto& p : s.parameters()) g[p.key].assign(p.grad.begin(), p.grad.end());
  return g;
}

TEST_CASE("whole-model gradients of a one-stage GPT match finite differences", "[gpt]") {
  const gpt::model_config c = tiny();
  const gpt::data_source data = tiny_data(c);
  const auto part = pipit::partition::naive(c.layers, {1, 1});
  gpt::gpt_stage<double> st(c, part, 0, data, {.microbatches = 1});
  std::vector<double> saved(st.activation_size(0));
  const auto objective = [&] {
    st.forward(pass(0, 1, 0), {}, {}, saved);
    return st.take_loss();
  };
  objective();
  st.backward(pass(0, 1, 0), {}, saved, {}, {});
  // Three entries of every tensor (embeddings included: their used rows carry gradient).
  for (const auto& p : st.parameters()) {
    INFO("tensor key " << p.key);
    for (const std::size_t at : {std::size_t(0), p.value.size() / 2, p.value.size() - 1})
      check_gradient(p.value.data() + at, 1, p.grad.data() + at, objective, "model parameter");
  }
  // The token embedding gets gradient only in the rows of the tokens used.
  CHECK(worst < 1e-7);
}

TEST_CASE("split backward (B then W) equals the combined backward exactly", "[gpt]") {
  const gpt::model_config c = tiny();
  const gpt::data_source data = tiny_data(c);
  const auto part = pipit::partition::naive(c.layers, {2, 1});
  const std::size_t dn = static_cast<std::size_t>(c.hidden * c.tokens());
  for (int rank = 0; rank < 2; ++rank) {
    INFO("rank " << rank);
    gpt::gpt_stage<double> split(c, part, rank, data, {.microbatches = 2});
    gpt::gpt_stage<double> combined(c, part, rank, data, {.microbatches = 2});
    std::vector<double> in(split.input_size(0)), out(split.output_size(0));
    std::vector<double> gout(out.size()), gin_split(in.size()), gin_combined(in.size());
    for (std::size_t k = 0; k < in.size(); ++k) in[k] = std::sin(0.37 * double(k));
    for (std::size_t k = 0; k < gout.size(); ++k) gout[k] = 0.01 * std::cos(0.11 * double(k));
    CHECK(in.size() == (rank == 0 ? 0 : dn));
    CHECK(out.size() == (rank == 0 ? dn : 0));
    for (int mb = 0; mb < 2; ++mb) {
      std::vector<double> s1(split.activation_size(0)), s2(s1.size());
      split.forward(pass(rank, 2, mb), in, out, s1);
      combined.forward(pass(rank, 2, mb), in, out, s2);
      split.backward_input(pass(rank, 2, mb), in, s1, gout, gin_split);
      split.backward_weight(pass(rank, 2, mb), in, s1, gout);
      combined.backward(pass(rank, 2, mb), in, s2, gout, gin_combined);
      CHECK(gin_split == gin_combined);
    }
    CHECK(split.take_loss() == combined.take_loss());
    const auto a = grads_of(split), b = grads_of(combined);
    REQUIRE(a.size() == b.size());
    for (const auto& [key, g] : a) {
      INFO("tensor key " << key);
      CHECK(g == b.at(key));
      CHECK(std::any_of(g.begin(), g.end(), [](double v) { return v != 0; }));
    }
  }
}

TEST_CASE("the vocabulary-parallel mode of the stage computes the same model", "[gpt]") {
  // Own head: E and L on the stage. Vocabulary parallel: the caller applies E before and the LM
  // head + loss after (here by hand, as pipit's sharded layers will), the stage the rest.
  const gpt::model_config c = tiny();
  const gpt::data_source data = tiny_data(c);
  const Eigen::Index d = c.hidden, n = c.tokens();
  gpt::gpt_stage<double> own(c, pipit::partition::naive(c.layers, {1, 1}), 0, data,
                             {.microbatches = 1});
  gpt::gpt_stage<double> vp(c, pipit::partition::vocab_parallel(c.layers, {1, 1}), 0, data,
                            {.microbatches = 1});
  REQUIRE(vp.input_size(0) == static_cast<std::size_t>(d * n));
  REQUIRE(vp.output_size(0) == static_cast<std::size_t>(d * n));
  std::vector<double> s1(own.activation_size(0)), s2(vp.activation_size(0));
  own.forward(pass(0, 1, 0), {}, {}, s1);
  own.backward(pass(0, 1, 0), {}, s1, {}, {});
  const double own_loss = own.take_loss();

  std::vector<std::int32_t> toks(static_cast<std::size_t>(c.batch * (c.seq + 1)));
  data.microbatch(c, 1, 0, 0, 0, toks);
  std::vector<std::int32_t> ids, targets;
  for (int b = 0; b < c.batch; ++b)
    for (int t = 0; t < c.seq; ++t) {
      ids.push_back(toks[static_cast<std::size_t>(b * (c.seq + 1) + t)]);
      targets.push_back(toks[static_cast<std::size_t>(b * (c.seq + 1) + t + 1)]);
    }
  const gpt::token_embedding<double> emb(c);
  const gpt::lm_head<double> head(c, 1);  // for its initial W
  mat x0(d, n), hidden(d, n), dx0(d, n);
  emb.forward(ids, mp(x0));
  vp.forward(pass(0, 1, 0), std::span<const double>(x0.data(), x0.size()),
             std::span<double>(hidden.data(), hidden.size()), s2);
  // Softmax cross-entropy and its gradient in plain double.
  const mat z = head.w.transpose() * hidden;
  mat dz(z.rows(), z.cols());
  double loss = 0;
  for (Eigen::Index t = 0; t < n; ++t) {
    const double m = z.col(t).maxCoeff();
    const double lse = m + std::log((z.col(t).array() - m).exp().sum());
    loss += (lse - z(targets[static_cast<std::size_t>(t)], t)) / static_cast<double>(n);
    dz.col(t) = (z.col(t).array() - lse).exp() / static_cast<double>(n);
    dz(targets[static_cast<std::size_t>(t)], t) -= 1.0 / static_cast<double>(n);
  }
  CHECK(std::abs(loss - own_loss) < 1e-12);
  const mat dhidden = head.w * dz;
  vp.backward(pass(0, 1, 0), std::span<const double>(x0.data(), x0.size()), s2,
              std::span<const double>(dhidden.data(), dhidden.size()),
              std::span<double>(dx0.data(), dx0.size()));
  const auto a = grads_of(own), b = grads_of(vp);
  for (const auto& [key, g] : b) {  // every tensor of the vocabulary-parallel stage
    INFO("tensor key " << key);
    const auto& ref = a.at(key);
    for (std::size_t k = 0; k < g.size(); ++k) CHECK(std::abs(g[k] - ref[k]) < 1e-12);
  }
  CHECK(b.count(gpt::tensor_key(-1, gpt::tensor_id::token_embedding)) == 0);
  CHECK(b.count(gpt::tensor_key(-1, gpt::tensor_id::head_w)) == 0);
  // The embedding's gradient handed back by the stage, scattered, is the own-head stage's.
  mat de = mat::Zero(d, c.vocab);
  for (Eigen::Index t = 0; t < n; ++t) de.col(ids[static_cast<std::size_t>(t)]) += dx0.col(t);
  const auto& ref = a.at(gpt::tensor_key(-1, gpt::tensor_id::token_embedding));
  CHECK((de - cmap<double>(ref.data(), d, c.vocab)).cwiseAbs().maxCoeff() < 1e-12);
}

}  // namespace

namespace {

// ---- tensor parallelism ------------------------------------------------------------------------

gpt::model_config tp_model() {
  gpt::model_config c;
  c.vocab = 11;
  c.seq = 4;
  c.hidden = 16;
  c.heads = 4;  // splits over 2 and 4 ranks
  c.layers = 2;
  c.ffn_mult = 2;
  c.batch = 2;
  c.init_std = 0.3;
  c.seed = 5;
  return c;
}

// Whole tensors (or their gradients) rebuilt from every rank's shards.
using tensors = std::map<gpt::tensor_id, std::vector<double>>;

struct tp_rank_result {
  mat y, dx;
  tensors values, grads;     // this rank's shards, placed into zero tensors of the whole size
  tensors replicated_grads;  // the replicated parameters' gradients, as held
};

double relative(const double* a, const double* b, std::size_t n) {
  double diff = 0, scale = 0;
  for (std::size_t k = 0; k < n; ++k) {
    diff = std::max(diff, std::abs(a[k] - b[k]));
    scale = std::max(scale, std::abs(b[k]));
  }
  return diff / std::max(scale, 1e-300);
}

// Megatron's split of a block (heads for attention, inner columns for the MLP) over t thread
// ranks against the unsharded block, in double. Non-zero biases and layer-norm parameters, so
// that every sliced and every replicated tensor matters. Tolerance 1e-12 relative: the sharded
// block sums each linear layer's partial products over the ranks (a ring all-reduce) instead of
// in one GEMM, a reordering of d + f = 48 double products (error ~ 48 u ~ 1e-14 relative, 100x
// margin); everything else is computed by the same code on the same values.
TEST_CASE("tensor-parallel blocks (t = 2 and 4) equal the unsharded block in double", "[gpt]") {
  const gpt::model_config c = tp_model();
  const Eigen::Index d = c.hidden, f = c.ffn(), n = c.tokens();
  gpt::block<double> full(c, 1);
  const mat qkv_b = random_matrix(3 * d, 1, 61, 0.5), fc1_b = random_matrix(f, 1, 62, 0.5);
  const mat proj_b = random_matrix(d, 1, 63, 0.5), fc2_b = random_matrix(d, 1, 64, 0.5);
  const mat g1 = random_matrix(d, 1, 65).array() + 1.0, b1 = random_matrix(d, 1, 66, 0.5);
  const mat g2 = random_matrix(d, 1, 67).array() + 1.0, b2 = random_matrix(d, 1, 68, 0.5);
  const auto set_replicated = [&](gpt::block<double>& b) {
    b.attn.proj.b = proj_b, b.ffn.fc2.b = fc2_b;
    b.ln1.gamma = g1, b.ln1.beta = b1, b.ln2.gamma = g2, b.ln2.beta = b2;
  };
  set_replicated(full);
  full.attn.qkv.b = qkv_b;
  full.ffn.fc1.b = fc1_b;
  const mat x = random_matrix(d, n, 69, 1.5), dy = random_matrix(d, n, 70);
  mat y_ref(d, n), dx_ref(d, n);
  std::vector<double> saved(full.layout().size);
  full.forward(cm(x), mp(y_ref), saved);
  full.backward_input(cm(dy), saved, mp(dx_ref));
  full.backward_weight(cm(dy), saved);
  tensors ref_values, ref_grads;
  full.for_each_parameter([&](gpt::tensor_id id, auto& value, auto& grad, gpt::tensor_split) {
    ref_values[id].assign(value.data(), value.data() + value.size());
    ref_grads[id].assign(grad.data(), grad.data() + grad.size());
  });

  for (const int t : {2, 4}) {
    std::vector<tp_rank_result> got(static_cast<std::size_t>(t));
    pipit::comm::threads::run(t, [&](pipit::comm::threads& comm) {
      const int r = comm.rank();
      const Eigen::Index w = d / t, fl = f / t;
      gpt::block<double> b(c, 1, gpt::make_tensor_group<double>(comm));
      REQUIRE(b.attn.heads == c.heads / t);
      set_replicated(b);
      for (Eigen::Index part = 0; part < 3; ++part)  // this rank's heads' rows of Q, K, V
        b.attn.qkv.b.segment(part * w, w) = qkv_b.col(0).segment(part * d + r * w, w);
      b.ffn.fc1.b = fc1_b.col(0).segment(r * fl, fl);
      tp_rank_result& out = got[static_cast<std::size_t>(r)];
      out.y.resize(d, n);
      out.dx.resize(d, n);
      std::vector<double> s(b.layout().size);
      b.forward(cm(x), mp(out.y), s);
      b.backward_input(cm(dy), s, mp(out.dx));
      b.backward_weight(cm(dy), s);
      b.for_each_parameter([&](gpt::tensor_id id, auto& value, auto& grad, gpt::tensor_split sp) {
        const auto shard = [&](auto& m) {
          return gpt::parameter<double>{std::span<double>(m.data(), std::size_t(m.size())),
                                        {},
                                        0,
                                        0,
                                        sp,
                                        static_cast<std::int64_t>(m.rows()),
                                        r,
                                        t};
        };
        const std::size_t whole = ref_values.at(id).size();
        out.values[id].assign(whole, 0.0);
        out.grads[id].assign(whole, 0.0);
        if (sp == gpt::tensor_split::replicated)
          out.replicated_grads[id].assign(grad.data(), grad.data() + grad.size());
        else
          REQUIRE(gpt::whole_size(shard(value)) == whole);
        gpt::place_shard(shard(value), std::span<double>(out.values[id]));
        gpt::place_shard(shard(grad), std::span<double>(out.grads[id]));
      });
    });
    INFO(t << " tensor ranks");
    for (int r = 0; r < t; ++r) {
      const tp_rank_result& g = got[static_cast<std::size_t>(r)];
      CHECK(relative(g.y.data(), y_ref.data(), y_ref.size()) <= 1e-12);
      CHECK(relative(g.dx.data(), dx_ref.data(), dx_ref.size()) <= 1e-12);
      // Outputs, input gradients and replicated gradients are bit-identical on every rank.
      CHECK(g.y == got[0].y);
      CHECK(g.dx == got[0].dx);
      CHECK(g.replicated_grads == got[0].replicated_grads);
    }
    CHECK(got[0].replicated_grads.size() == 6u);  // 2 layer norms x 2, proj and fc2 biases
    for (const auto& [id, ref] : ref_grads) {
      INFO("tensor " << static_cast<int>(id));
      std::vector<double> value(ref.size(), 0.0), grad(ref.size(), 0.0);
      for (const auto& g : got) {  // a split tensor is the sum of its zero-padded shards
        const bool split = !g.replicated_grads.contains(id);
        for (std::size_t k = 0; k < ref.size(); ++k) {
          value[k] = split ? value[k] + g.values.at(id)[k] : g.values.at(id)[k];
          grad[k] = split ? grad[k] + g.grads.at(id)[k] : g.grads.at(id)[k];
        }
      }
      CHECK(value == ref_values.at(id));  // cut from the same matrices: exact
      CHECK(relative(grad.data(), ref.data(), ref.size()) <= 1e-12);
    }
  }
}

TEST_CASE("a block refuses a tensor split that does not divide its heads", "[gpt]") {
  const gpt::model_config c = tp_model();  // 4 heads, MLP width 32
  gpt::tensor_group<double> g{3, 0, [](std::span<double>) {}};
  CHECK_THROWS_WITH(
      gpt::block<double>(c, 0, g),
      Catch::Contains("tensor parallelism over 3 ranks needs heads (4) divisible by 3"));
  g.size = 4;  // whole heads and whole MLP columns per rank (heads | t implies hidden and MLP | t)
  CHECK_NOTHROW(gpt::block<double>(c, 0, g));
  g.rank = 4;
  CHECK_THROWS_WITH(gpt::block<double>(c, 0, g),
                    Catch::Contains("tensor rank 4 is outside [0, 4)"));
  g.rank = 0;
  g.sum = nullptr;
  CHECK_THROWS_WITH(gpt::block<double>(c, 0, g), Catch::Contains("needs its all-reduce"));
}

}  // namespace
