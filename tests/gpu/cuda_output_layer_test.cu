// cuda::output_layer (naive, two_barrier, one_barrier; float, bfloat16, half) against the host
// reference vocab::output_layer_forward_backward in double (vocab_reference.cpp), on the shapes
// and edge cases of tests/unit/vocab_test.cpp. The n ranks of a group run on one device, one
// layer each; their collectives are done on the host in rank order with the same operators
// (merge_op, max, plus), exactly what nccl_communicator computes (cuda_vocab_nccl_test.cu runs
// the real driver over NCCL).
//
// Tolerances (max |error| <= tol * max |reference| per tensor; the loss relative to
// max(1, |loss|)):
//   float inputs:       1e-4. Every GEMM is fp32 (no TF32); a logit is a float dot product of
//                       <= 64 terms and the sums of exp have <= 5000 terms, so the float
//                       rounding is ~1e-5 of the largest entry (the host float layer, checked at
//                       5e-5 on shapes 17x smaller, shows the same order).
//   bfloat16, half:     the loss 1e-4 (statistics come from fp32-accumulated logits of inputs
//                       the reference sees exactly); gradients 1.5e-2 (bf16) / 4e-3 (half):
//                       the softmax weights and dZ are rounded to the 16-bit type before their
//                       GEMMs, a relative error of 2^-9 (bf16) / 2^-12 (half) per term.
//   logits of +-1e4:    float loss 1e-5, gradients 3e-3 (a float logit of 1e4 is only known to
//                       6e-4 absolute, which p = exp(z - lse) inherits; the host allows 2e-3).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/cuda/blas_handle.cuh"
#include "pipit/cuda/output_layer.cuh"
#include "pipit/cuda/stream.cuh"
#include "vocab_reference.hpp"

namespace v = pipit::vocab;
namespace pc = pipit::cuda;
using i64 = std::int64_t;
using bf16 = __nv_bfloat16;
using pipit_test::algorithm;
using pipit_test::vocab_problem;
using pipit_test::vocab_shape;

namespace {

template <class T>
T to_t(double a) {
  if constexpr (std::is_same_v<T, float>)
    return static_cast<float>(a);
  else if constexpr (std::is_same_v<T, bf16>)
    return __float2bfloat16(static_cast<float>(a));
  else
    return __float2half(static_cast<float>(a));
}
template <class T>
double to_double(T a) {
  if constexpr (std::is_same_v<T, float>)
    return a;
  else if constexpr (std::is_same_v<T, bf16>)
    return __bfloat162float(a);
  else
    return __half2float(a);
}
template <class T>
double round_as(double a) {
  return to_double(to_t<T>(a));
}

// A device array with stream-ordered copies in and out.
template <class T>
class dvec {
 public:
  dvec(std::size_t n, cudaStream_t s) : buf_(n, s), s_(s) {}
  dvec(const std::vector<T>& h, cudaStream_t s) : dvec(h.size(), s) { upload(h); }
  void upload(const std::vector<T>& h) {
    REQUIRE(h.size() == buf_.size());
    if (!h.empty())
      PIPIT_CUDA_CHECK(
          cudaMemcpyAsync(buf_.data(), h.data(), buf_.bytes(), cudaMemcpyHostToDevice, s_));
    PIPIT_CUDA_CHECK(cudaStreamSynchronize(s_));
  }
  std::vector<T> download() const {
    std::vector<T> h(buf_.size());
    if (!h.empty())
      PIPIT_CUDA_CHECK(
          cudaMemcpyAsync(h.data(), buf_.data(), buf_.bytes(), cudaMemcpyDeviceToHost, s_));
    PIPIT_CUDA_CHECK(cudaStreamSynchronize(s_));
    return h;
  }
  T* data() const { return buf_.data(); }
  std::span<T> span() const { return buf_.span(); }

 private:
  pc::device_buffer<T> buf_;
  cudaStream_t s_;
};

struct device_result {
  v::loss_result<float> loss{};
  std::vector<float> dx, dw;
  bool padding_untouched = true, ranks_agree = true;
};

template <class E, class Op>
void reduce_in_rank_order(std::vector<std::vector<E>>& parts, Op op) {
  std::vector<E> acc = parts[0];
  for (std::size_t r = 1; r < parts.size(); ++r)
    for (std::size_t i = 0; i < acc.size(); ++i) acc[i] = op(acc[i], parts[r][i]);
  for (auto& p : parts) p = acc;
}

// Every rank's layer on one device; the collectives on the host in rank order.
template <class Alg, class T, std::size_t Chunk>
device_result run_device(const vocab_problem& p) {
  using layer_t = pc::output_layer<Alg, T, Chunk>;
  constexpr bool one = std::is_same_v<Alg, v::one_barrier>;
  const v::vocab_shards shards(p.vocab, p.ranks, p.pad_multiple);
  const i64 H = p.hidden, Tn = p.tokens, S = shards.shard_size();
  const auto R = static_cast<std::size_t>(p.ranks);
  pc::stream s;
  pc::blas_handle blas;
  std::vector<T> xh;
  for (double a : p.x) xh.push_back(to_t<T>(a));
  dvec<T> x(xh, s);
  dvec<i64> targets(p.targets, s);
  std::vector<float> wh(p.weights.begin(), p.weights.end());
  dvec<float> weights(wh, s);
  std::vector<std::unique_ptr<dvec<T>>> w;
  std::vector<std::unique_ptr<dvec<float>>> acc, dw, g;
  std::vector<std::unique_ptr<layer_t>> layers;
  for (int r = 0; r < p.ranks; ++r) {
    std::vector<T> shard(static_cast<std::size_t>(S * H),
                         to_t<T>(std::numeric_limits<double>::quiet_NaN()));  // padding: NaN
    const auto range = shards.real_range_of(r);
    for (i64 i = range.begin * H; i < range.end * H; ++i)
      shard[i - range.begin * H] = to_t<T>(p.w[i]);
    w.push_back(std::make_unique<dvec<T>>(shard, s));
    acc.push_back(std::make_unique<dvec<float>>(
        std::vector<float>(static_cast<std::size_t>(Tn * H), 123.f), s));  // must be overwritten
    dw.push_back(
        std::make_unique<dvec<float>>(std::vector<float>(static_cast<std::size_t>(S * H), 0.f), s));
    g.push_back(std::make_unique<dvec<float>>(static_cast<std::size_t>(Tn), s));
    layers.push_back(std::make_unique<layer_t>(
        blas, s, shards, r, v::make_view<const T>(x.data(), Tn, H),
        v::make_view<const T>(w[r]->data(), S, H), std::span<const i64>(targets.span()), p.opt));
  }
  const auto acc_view = [&](int r) { return v::make_view(acc[r]->data(), Tn, H); };
  for (int r = 0; r < p.ranks; ++r) {
    if constexpr (one)
      layers[r]->s_pass(acc_view(r));
    else
      layers[r]->s_pass();
  }
  // Collectives through the host, in rank order.
  auto all_reduce = [&](auto get, auto op) {
    using span_t = decltype(get(0));
    using E = std::remove_const_t<typename span_t::element_type>;
    std::vector<span_t> spans;
    for (int r = 0; r < p.ranks; ++r) spans.push_back(get(r));  // get() may enqueue work
    PIPIT_CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<std::vector<E>> parts(R);
    for (std::size_t r = 0; r < R; ++r) {
      parts[r].resize(spans[r].size());
      PIPIT_CUDA_CHECK(cudaMemcpy(parts[r].data(), spans[r].data(), spans[r].size_bytes(),
                                  cudaMemcpyDeviceToHost));
    }
    reduce_in_rank_order(parts, op);
    for (std::size_t r = 0; r < R; ++r)
      PIPIT_CUDA_CHECK(cudaMemcpy(spans[r].data(), parts[r].data(), spans[r].size_bytes(),
                                  cudaMemcpyHostToDevice));
  };
  if constexpr (std::is_same_v<Alg, v::naive>) {
    all_reduce([&](int r) { return layers[r]->naive_max(); }, pipit::comm::max_op{});
    all_reduce([&](int r) { return layers[r]->naive_target_sums(); }, std::plus<>{});
    all_reduce([&](int r) { return layers[r]->naive_sum_exp(); }, std::plus<>{});
    for (auto& l : layers) l->naive_combine();
  } else {
    all_reduce([&](int r) { return layers[r]->stats(); }, v::merge_op{});
  }
  device_result out;
  std::vector<float> g0;
  for (int r = 0; r < p.ranks; ++r) {
    layers[r]->loss(g[r]->span(), p.weights.empty() ? std::span<const float>()
                                                    : std::span<const float>(weights.span()));
    const auto lr = layers[r]->fetch_loss();
    const auto gr = g[r]->download();
    if (r == 0) {
      out.loss = lr;
      g0 = gr;
    } else {
      out.ranks_agree = out.ranks_agree && lr.loss == out.loss.loss && gr == g0;
    }
  }
  for (int r = 0; r < p.ranks; ++r) {
    const auto dwv = v::make_view(dw[r]->data(), S, H);
    if constexpr (one) {
      layers[r]->input_grad_partial(acc_view(r));
      layers[r]->t_pass(g[r]->span(), dwv);
    } else {
      layers[r]->t_pass(g[r]->span(), dwv, acc_view(r));
    }
  }
  all_reduce([&](int r) { return acc[r]->span(); }, std::plus<>{});
  if constexpr (one) pc::scale_rows(acc_view(0), std::span<const float>(g[0]->span()), s);
  out.dx = acc[0]->download();
  for (int r = 0; r < p.ranks; ++r) {
    const auto d = dw[r]->download();
    const i64 real = shards.real_rows(r);
    for (i64 i = 0; i < S * H; ++i) {
      if (i / H < real)
        out.dw.push_back(d[i]);
      else
        out.padding_untouched = out.padding_untouched && d[i] == 0.f;
    }
  }
  return out;
}

double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::abs(x));
  return m;
}

void check_close(const std::vector<float>& got, const std::vector<double>& want, double tol,
                 const char* what) {
  REQUIRE(got.size() == want.size());
  double err = 0;
  bool finite = true;
  for (std::size_t i = 0; i < got.size(); ++i) {
    finite = finite && std::isfinite(got[i]);
    err = std::max(err, std::abs(static_cast<double>(got[i]) - want[i]));
  }
  const double scale = max_abs(want);
  INFO(what << ": max error " << err << ", max |reference| " << scale << ", tolerance " << tol);
  CHECK(finite);
  if (scale == 0)
    CHECK(err == 0);
  else
    CHECK(err <= tol * scale);
}

void check_loss(double got, double want, double tol, const char* what) {
  INFO(what << ": got " << got << ", want " << want);
  CHECK(std::isfinite(got));
  CHECK(std::abs(got - want) <= tol * std::max(1.0, std::abs(want)));
}

struct tolerance {
  double loss, grad;
};
template <class T>
constexpr tolerance default_tol = std::is_same_v<T, float>  ? tolerance{1e-4, 1e-4}
                                  : std::is_same_v<T, bf16> ? tolerance{1e-4, 1.5e-2}
                                                            : tolerance{1e-4, 4e-3};

template <class Alg>
constexpr algorithm alg_id = std::is_same_v<Alg, v::naive>         ? algorithm::naive
                             : std::is_same_v<Alg, v::two_barrier> ? algorithm::two_barrier
                                                                   : algorithm::one_barrier;

template <class Alg, class T, std::size_t Chunk>
void check_device(const vocab_problem& p, tolerance tol) {
  const auto ref = pipit_test::host_reference(p, alg_id<Alg>);
  const auto got = run_device<Alg, T, Chunk>(p);
  CHECK(got.ranks_agree);
  CHECK(got.padding_untouched);
  check_loss(got.loss.loss, ref.loss.loss, tol.loss, "loss");
  check_loss(got.loss.z_loss, ref.loss.z_loss, tol.loss, "z-loss");
  CHECK(got.loss.tokens == ref.loss.tokens);
  check_loss(got.loss.weight, ref.loss.weight, 1e-6, "weight");
  check_close(got.dx, ref.dx, tol.grad, "input gradient");
  check_close(got.dw, ref.dw, tol.grad, "weight gradient");
}

template <class T>
void check_every_algorithm(const vocab_problem& p, tolerance tol = default_tol<T>) {
  {
    INFO("naive, chunk 7");
    check_device<v::naive, T, 7>(p, tol);
  }
  {
    INFO("two_barrier, chunks 7 and 1024");
    check_device<v::two_barrier, T, 7>(p, tol);
    check_device<v::two_barrier, T, 1024>(p, tol);
  }
  {
    INFO("one_barrier, chunks 7, 1 and 1024");
    check_device<v::one_barrier, T, 7>(p, tol);
    check_device<v::one_barrier, T, 1>(p, tol);
    check_device<v::one_barrier, T, 1024>(p, tol);
  }
}

template <class T>
vocab_problem problem_for(std::mt19937_64& rng, vocab_shape s, double scale = 3.0,
                          double ignore = 0.15, bool weights = false) {
  return pipit_test::make_vocab_problem(rng, s, round_as<T>, scale, ignore, weights);
}

}  // namespace

TEST_CASE("cuda output layer matches the host reference on random shapes", "[gpu][cuda][vocab]") {
  std::mt19937_64 rng(2024);
  for (int trial = 0; trial < 24; ++trial) {
    const vocab_shape s = pipit_test::random_vocab_shape(rng);
    INFO("trial " << trial << ": tokens " << s.tokens << " hidden " << s.hidden << " vocab "
                  << s.vocab << " ranks " << s.ranks << " multiple " << s.pad_multiple);
    vocab_problem p = problem_for<float>(rng, s, 3.0, 0.15, trial % 3 == 0);
    p.opt.reduce = trial % 2 ? v::reduction::sum : v::reduction::mean;
    check_every_algorithm<float>(p);
  }
}

TEST_CASE("cuda output layer: a vocabulary not divisible by the ranks, with empty shards",
          "[gpu][cuda][vocab]") {
  std::mt19937_64 rng(11);
  for (const vocab_shape s : {vocab_shape{9, 5, 13, 4, 8}, vocab_shape{6, 3, 5, 8, 1},
                              vocab_shape{17, 4, 1, 3, 1}, vocab_shape{12, 6, 101, 7, 2}}) {
    INFO("vocab " << s.vocab << " ranks " << s.ranks);
    check_every_algorithm<float>(problem_for<float>(rng, s));
  }
}

TEST_CASE("cuda output layer: bfloat16 and half inputs with float accumulation",
          "[gpu][cuda][vocab]") {
  std::mt19937_64 rng(99);
  for (int trial = 0; trial < 12; ++trial) {
    const vocab_shape s = pipit_test::random_vocab_shape(rng);
    INFO("trial " << trial << ": tokens " << s.tokens << " hidden " << s.hidden << " vocab "
                  << s.vocab << " ranks " << s.ranks);
    {
      INFO("bfloat16");
      vocab_problem p = problem_for<bf16>(rng, s);
      p.opt.z_loss = trial % 3 == 1 ? 1e-3 : 0.0;
      p.opt.label_smoothing = trial % 3 == 2 ? 0.1 : 0.0;
      check_every_algorithm<bf16>(p);
    }
    {
      INFO("half");
      vocab_problem p = problem_for<__half>(rng, s);
      p.opt.label_smoothing = trial % 3 == 0 ? 0.1 : 0.0;
      check_every_algorithm<__half>(p);
    }
  }
}

TEST_CASE("cuda output layer: several full chunks on tensor cores", "[gpu][cuda][vocab]") {
  std::mt19937_64 rng(5150);
  const vocab_shape s{300, 64, 5000, 2, 128};  // 2560-row shards: chunks of 1024, 1024, 512
  for (int k = 0; k < 2; ++k) {
    vocab_problem pf = problem_for<float>(rng, s, 4.0, 0.1, k == 1);
    pf.opt.label_smoothing = 0.1 * k;
    pf.opt.z_loss = 1e-3 * k;
    check_device<v::naive, float, 1024>(pf, default_tol<float>);
    check_device<v::two_barrier, float, 1024>(pf, default_tol<float>);
    check_device<v::one_barrier, float, 1024>(pf, default_tol<float>);
    vocab_problem pb = problem_for<bf16>(rng, s, 4.0, 0.1, k == 1);
    pb.opt.label_smoothing = 0.1 * k;
    check_device<v::two_barrier, bf16, 1024>(pb, default_tol<bf16>);
    check_device<v::one_barrier, bf16, 1024>(pb, default_tol<bf16>);
    check_device<v::one_barrier, bf16, 256>(pb, default_tol<bf16>);
  }
}

TEST_CASE("cuda output layer: ignore index, loss mask and an all-ignored microbatch",
          "[gpu][cuda][vocab]") {
  std::mt19937_64 rng(5);
  const vocab_shape s{16, 8, 50, 3, 4};
  SECTION("ignore index and weights") {
    check_every_algorithm<float>(problem_for<float>(rng, s, 3.0, 0.4, true));
  }
  SECTION("a custom ignore index inside the vocabulary") {
    vocab_problem p = problem_for<float>(rng, s, 3.0, 0.0);
    p.opt.ignore_index = 7;
    for (i64 t = 0; t < s.tokens; t += 3) p.targets[t] = 7;
    check_every_algorithm<float>(p);
  }
  SECTION("every token ignored: loss 0, gradients exactly 0, no NaN") {
    for (const auto red : {v::reduction::mean, v::reduction::sum}) {
      vocab_problem p = problem_for<float>(rng, s, 3.0, 1.0);
      p.opt.reduce = red;
      const auto n = run_device<v::naive, float, 7>(p);
      const auto t = run_device<v::two_barrier, float, 7>(p);
      const auto o = run_device<v::one_barrier, float, 7>(p);
      const auto b = run_device<v::one_barrier, bf16, 7>(problem_for<bf16>(rng, s, 3.0, 1.0));
      for (const auto* r : {&n, &t, &o, &b}) {
        CHECK(r->loss.loss == 0.f);
        CHECK(r->loss.tokens == 0);
        for (float a : r->dx) CHECK(a == 0.f);
        for (float a : r->dw) CHECK(a == 0.f);
      }
    }
  }
  SECTION("all weights zero") {
    vocab_problem p = problem_for<float>(rng, s, 3.0, 0.0, true);
    std::fill(p.weights.begin(), p.weights.end(), 0.0);
    const auto o = run_device<v::one_barrier, float, 7>(p);
    CHECK(o.loss.loss == 0.f);
    CHECK(o.loss.weight == 0.f);
    for (float a : o.dx) CHECK(a == 0.f);
  }
}

TEST_CASE("cuda output layer: extreme logits of magnitude 1e4 neither overflow nor give NaN",
          "[gpu][cuda][vocab]") {
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 6; ++trial) {
    const vocab_shape s{10, 4, 40 + 7 * trial, 1 + trial, 2};
    INFO("trial " << trial);
    vocab_problem p = problem_for<float>(rng, s, 1.0, 0.1);
    for (double& a : p.x) a = a > 0 ? 100.0 : -100.0;
    for (i64 vv = 0; vv < s.vocab; ++vv)
      for (i64 j = 0; j < s.hidden; ++j)
        p.w[vv * s.hidden + j] = (j == vv % s.hidden) ? ((vv % 3) ? 100.0 : -100.0) : 0.0;
    p.opt.z_loss = trial % 2 ? 1e-4 : 0.0;
    p.opt.label_smoothing = trial % 3 ? 0.1 : 0.0;
    check_every_algorithm<float>(p, {1e-5, 3e-3});
  }
}

TEST_CASE("cuda output layer: label smoothing and z-loss", "[gpu][cuda][vocab]") {
  std::mt19937_64 rng(77);
  for (int trial = 0; trial < 10; ++trial) {
    const vocab_shape s = pipit_test::random_vocab_shape(rng);
    vocab_problem p = problem_for<float>(rng, s, 5.0, 0.2, trial % 2 == 0);
    p.opt.label_smoothing = (trial % 4) * 0.1;
    p.opt.z_loss = (trial % 3) * 1e-3;
    p.opt.grad_output = 0.5 + trial;
    p.opt.reduce = trial % 5 == 0 ? v::reduction::sum : v::reduction::mean;
    INFO("trial " << trial << " eps " << p.opt.label_smoothing << " lambda " << p.opt.z_loss);
    check_every_algorithm<float>(p);
  }
  vocab_problem p = problem_for<float>(rng, {8, 4, 30, 3, 1});
  p.opt.label_smoothing = 1.0;  // the target drops out entirely
  check_every_algorithm<float>(p);
}

TEST_CASE("cuda output layer: results are bit-identical from run to run", "[gpu][cuda][vocab]") {
  std::mt19937_64 rng(404);
  const vocab_problem p = problem_for<bf16>(rng, {200, 48, 3000, 2, 8}, 3.0, 0.1, true);
  const auto a = run_device<v::one_barrier, bf16, 512>(p);
  const auto b = run_device<v::one_barrier, bf16, 512>(p);
  CHECK(a.loss.loss == b.loss.loss);
  CHECK(a.dx == b.dx);
  CHECK(a.dw == b.dw);
}

TEST_CASE("cuda output layer: invalid targets and loss weights raise errors naming them",
          "[gpu][cuda][vocab]") {
  std::mt19937_64 rng(8);
  vocab_problem p = problem_for<float>(rng, {6, 4, 20, 1, 1}, 3.0, 0.0);
  p.targets[3] = 20;  // == V
  try {
    (void)run_device<v::two_barrier, float, 7>(p);
    FAIL("a target of 20 with a vocabulary of 20 was accepted");
  } catch (const pipit::error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.find("token id 20") != std::string::npos);
    CHECK(what.find("entry 3") != std::string::npos);
  }
  p.targets[3] = 2;
  p.weights = {1, 1, -0.5, 1, 1, 1};
  try {
    (void)run_device<v::one_barrier, float, 7>(p);
    FAIL("a negative loss weight was accepted");
  } catch (const pipit::error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(what.find("-0.5") != std::string::npos);
    CHECK(what.find("token 2") != std::string::npos);
  }
}
