#pragma once
// tp_decode<T, C>: one decoding step (one new token per request, against each request's KV cache)
// of the example model's transformer blocks, tensor-parallel over a communicator, written as a
// pipit::nano::op_graph so that nano::nano_runner can split it into nano-batches of requests
// (NanoFlow, Zhu et al., arXiv 2408.12757). The blocks are the example model's own (block.hpp:
// pre-LayerNorm GPT-2 blocks with biases, causal multi-head attention, GELU MLP): the weights are
// cut from gpt::block objects, so this is the model pipit-gpt trains, decoding. Embeddings and
// the output layer are outside the blocks and not part of the step.
//
// Each layer is ten operations; rows are decode requests; rank r of t:
//
//   id  name         kind     what
//   0   ln1          memory   a = layernorm(x) * g1 + b1
//   1   qkv          compute  [q | k | v] = a Wqkv_r^T + bqkv_r     (heads r H/t .. (r+1) H/t)
//   2   attention    memory   append k, v at `position`; o = softmax(q K^T / sqrt(dh)) V
//   3   proj         compute  p = o Wproj_r^T                        (columns of r's heads)
//   4   attn_reduce  network  p = sum over ranks of p
//   5   ln2          memory   h = x + (p + bproj);  a2 = layernorm(h) * g2 + b2
//   6   fc1          compute  z = gelu(a2 W1_r^T + b1_r)             (rows r f/t .. (r+1) f/t)
//   7   fc2          compute  p2 = z W2_r^T                          (columns r f/t ..)
//   8   mlp_reduce   network  p2 = sum over ranks of p2
//   9   residual     memory   x' = h + (p2 + bfc2)
//
// Megatron's split (Shoeybi et al., arXiv 1909.08053): the QKV projection and fc1 by output
// (heads, MLP columns), proj and fc2 by input, one all-reduce after each; biases of the
// row-parallel layers are added once, after the sum. The GEMMs are nano::rowwise_gemm and the
// all-reduces nano::ordered_all_reduce, so any nano-batch split gives the same bits as none
// (see docs/nanoflow.md); against gpt::block's Eigen forward (other summation orders) it agrees
// to rounding. Every layer has its own activation buffers; every step writes cache position
// `position()`, so a step can be repeated (a benchmark) or followed by the next position.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "block.hpp"
#include "config.hpp"
#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/op_graph.hpp"
#include "pipit/nano/ordered_all_reduce.hpp"
#include "pipit/nano/row_kernels.hpp"

namespace gpt {

// The model's blocks, initialised as the example initialises them (block(cfg, layer)).
template <class T>
std::vector<block<T>> model_blocks(const model_config& cfg) {
  check(cfg);
  std::vector<block<T>> b;
  b.reserve(static_cast<std::size_t>(cfg.layers));
  for (int l = 0; l < cfg.layers; ++l) b.emplace_back(cfg, l);
  return b;
}

template <class T, pipit::comm::communicator C>
class tp_decode {
 public:
  enum layer_op : int {
    ln1,
    qkv,
    attention,
    proj,
    attn_reduce,
    ln2,
    fc1,
    fc2,
    mlp_reduce,
    residual,
    ops_per_layer
  };

  static pipit::nano::op_graph layer_graph() {
    using pipit::nano::resource;
    pipit::nano::op_graph g;
    g.add("ln1", resource::memory);
    g.add("qkv", resource::compute, {ln1});
    g.add("attention", resource::memory, {qkv});
    g.add("proj", resource::compute, {attention});
    g.add("attn_reduce", resource::network, {proj});
    g.add("ln2", resource::memory, {attn_reduce});
    g.add("fc1", resource::compute, {ln2});
    g.add("fc2", resource::compute, {fc1});
    g.add("mlp_reduce", resource::network, {fc2});
    g.add("residual", resource::memory, {mlp_reduce, ln2});
    return g;
  }

  // blocks: all cfg.layers blocks of the model, full; this rank keeps its shards (transposed for
  // rowwise_gemm). requests: batch rows; capacity: cache positions per request.
  tp_decode(C& tp, const model_config& cfg, std::span<const block<T>> blocks, std::int64_t requests,
            std::int64_t capacity)
      : cfg_(checked(cfg, tp.size(), requests, capacity)),
        requests_(requests),
        capacity_(capacity),
        reduce_(tp, requests * cfg.hidden) {
    if (static_cast<int>(blocks.size()) != cfg.layers)
      pipit::fail("gpt::tp_decode: ", blocks.size(), " blocks for a model of ", cfg.layers,
                  " layers");
    const int t = tp.size(), r = tp.rank();
    rank_ = r;
    const std::int64_t d = cfg.hidden, f = cfg.ffn(), n = requests;
    hl_ = cfg.heads / t;
    dl_ = d / t;  // hl_ heads of head_dim
    fl_ = f / t;
    layers_.resize(static_cast<std::size_t>(cfg.layers));
    for (int l = 0; l < cfg.layers; ++l) {
      const block<T>& b = blocks[static_cast<std::size_t>(l)];
      layer& L = layers_[static_cast<std::size_t>(l)];
      if (b.attn.qkv.w.rows() != 3 * d || b.attn.qkv.w.cols() != d || b.ffn.fc1.w.rows() != f ||
          b.ffn.fc1.w.cols() != d || b.attn.heads != cfg.heads)
        pipit::fail("gpt::tp_decode: block ", l, " has qkv ", b.attn.qkv.w.rows(), " x ",
                    b.attn.qkv.w.cols(), ", fc1 ", b.ffn.fc1.w.rows(), " x ", b.ffn.fc1.w.cols(),
                    ", ", b.attn.heads, " heads; the config needs ", 3 * d, " x ", d, ", ", f,
                    " x ", d, ", ", cfg.heads);
      // QKV: the rows of this rank's heads in each of the q, k and v thirds, transposed.
      L.wqkv_t.resize(static_cast<std::size_t>(d * 3 * dl_));
      L.bqkv.resize(static_cast<std::size_t>(3 * dl_));
      for (std::int64_t part = 0; part < 3; ++part)
        for (std::int64_t c = 0; c < dl_; ++c) {
          const std::int64_t row = part * d + r * dl_ + c, col = part * dl_ + c;
          for (std::int64_t k = 0; k < d; ++k)
            L.wqkv_t[idx(k, col, 3 * dl_)] = b.attn.qkv.w(row, k);
          L.bqkv[static_cast<std::size_t>(col)] = b.attn.qkv.b(row);
        }
      // proj: the input columns of this rank's heads.
      L.wproj_t.resize(static_cast<std::size_t>(dl_ * d));
      for (std::int64_t c = 0; c < dl_; ++c)
        for (std::int64_t j = 0; j < d; ++j)
          L.wproj_t[idx(c, j, d)] = b.attn.proj.w(j, r * dl_ + c);
      // fc1 by output rows, fc2 by input columns.
      L.w1_t.resize(static_cast<std::size_t>(d * fl_));
      L.b1.resize(static_cast<std::size_t>(fl_));
      for (std::int64_t c = 0; c < fl_; ++c) {
        for (std::int64_t k = 0; k < d; ++k) L.w1_t[idx(k, c, fl_)] = b.ffn.fc1.w(r * fl_ + c, k);
        L.b1[static_cast<std::size_t>(c)] = b.ffn.fc1.b(r * fl_ + c);
      }
      L.w2_t.resize(static_cast<std::size_t>(fl_ * d));
      for (std::int64_t c = 0; c < fl_; ++c)
        for (std::int64_t j = 0; j < d; ++j) L.w2_t[idx(c, j, d)] = b.ffn.fc2.w(j, r * fl_ + c);
      auto copy = [](const vector<T>& v) { return std::vector<T>(v.data(), v.data() + v.size()); };
      L.bproj = copy(b.attn.proj.b);
      L.bfc2 = copy(b.ffn.fc2.b);
      L.g1 = copy(b.ln1.gamma);
      L.beta1 = copy(b.ln1.beta);
      L.g2 = copy(b.ln2.gamma);
      L.beta2 = copy(b.ln2.beta);
      for (auto* v : {&L.x, &L.a, &L.p, &L.h, &L.a2, &L.p2})
        v->resize(static_cast<std::size_t>(n * d));
      L.qkv.resize(static_cast<std::size_t>(n * 3 * dl_));
      L.o.resize(static_cast<std::size_t>(n * dl_));
      L.z.resize(static_cast<std::size_t>(n * fl_));
      L.k_cache.resize(static_cast<std::size_t>(n * dl_ * capacity));
      L.v_cache.resize(L.k_cache.size());
    }
    out_.resize(static_cast<std::size_t>(n * d));
    scores_.resize(static_cast<std::size_t>(capacity));
  }

  const model_config& config() const noexcept { return cfg_; }
  std::int64_t requests() const noexcept { return requests_; }
  std::int64_t capacity() const noexcept { return capacity_; }
  std::int64_t local_heads() const noexcept { return hl_; }
  pipit::nano::op_graph graph() const { return layer_graph().repeated(cfg_.layers); }

  // The position the next step writes into the cache and attends up to (inclusive).
  std::int64_t position() const noexcept { return position_; }
  void set_position(std::int64_t pos) {
    if (pos < 0 || pos >= capacity_)
      pipit::fail("gpt::tp_decode: position ", pos, " outside the cache's 0..", capacity_ - 1);
    position_ = pos;
  }

  // The new tokens' hidden states (requests x hidden, row-major), copied into layer 0's input.
  void set_input(pipit::nano::matrix_view<const T> x) {
    if (x.rows != requests_ || x.cols != cfg_.hidden)
      pipit::fail("gpt::tp_decode: input ", x.rows, " x ", x.cols, ", expected ", requests_, " x ",
                  cfg_.hidden);
    for (std::int64_t i = 0; i < x.rows; ++i)
      std::copy_n(x.row(i), x.cols, layers_[0].x.data() + i * x.cols);
  }
  // Fills every cache position of layer l: value(request, global head, position, element,
  // is_value) for this rank's heads (a benchmark's context without decoding it first).
  template <class F>
  void fill_cache(int l, F&& value) {
    layer& L = at(l);
    const auto c = cache(L);
    const std::int64_t first = hl_ * rank_;
    for (std::int64_t q = 0; q < requests_; ++q)
      for (std::int64_t g = 0; g < hl_; ++g)
        for (std::int64_t pos = 0; pos < capacity_; ++pos)
          for (std::int64_t e = 0; e < c.head_dim; ++e) {
            c.key(q, g, pos)[e] = value(q, first + g, pos, e, false);
            c.value(q, g, pos)[e] = value(q, first + g, pos, e, true);
          }
  }
  // The last block's output (requests x hidden), identical on every rank.
  pipit::nano::matrix_view<const T> output() const {
    return pipit::nano::make_view(out_.data(), requests_, static_cast<std::int64_t>(cfg_.hidden));
  }

  // Runs op `op` of graph() on rows [rows.begin, rows.end): the functor for nano_runner.
  void operator()(int op, pipit::nano::rows_range rows) {
    namespace nano = pipit::nano;
    const int l = op / ops_per_layer;
    layer& L = at(l);
    const std::int64_t b = rows.begin, n = rows.size(), d = cfg_.hidden, qc = 3 * dl_;
    auto act = [&](std::vector<T>& v, std::int64_t cols) {
      return nano::make_view(v.data() + b * cols, n, cols);
    };
    auto cst = [](nano::matrix_view<T> v) { return nano::matrix_view<const T>(v); };
    auto vec = [](const std::vector<T>& v) { return std::span<const T>(v); };
    auto weights = [](const std::vector<T>& v, std::int64_t r, std::int64_t c) {
      return nano::make_view(v.data(), r, c);
    };
    const T eps = static_cast<T>(layer_norm<T>::eps);
    switch (static_cast<layer_op>(op % ops_per_layer)) {
      case ln1:
        nano::layer_norm(cst(act(L.x, d)), vec(L.g1), vec(L.beta1), eps, act(L.a, d));
        break;
      case qkv:
        nano::rowwise_gemm(cst(act(L.a, d)), weights(L.wqkv_t, d, qc), vec(L.bqkv), act(L.qkv, qc));
        break;
      case attention: {
        const auto all = act(L.qkv, qc);
        const nano::matrix_view<const T> q{all.data, n, dl_, qc}, k{all.data + dl_, n, dl_, qc},
            v{all.data + 2 * dl_, n, dl_, qc};
        nano::decode_attention(b, hl_, q, k, v, cache(L), position_, std::span<T>(scores_),
                               act(L.o, dl_));
        break;
      }
      case proj:
        nano::rowwise_gemm(cst(act(L.o, dl_)), weights(L.wproj_t, dl_, d), std::span<const T>{},
                           act(L.p, d));
        break;
      case attn_reduce:
        reduce_(std::span<T>(L.p.data() + b * d, static_cast<std::size_t>(n * d)));
        break;
      case ln2: {
        const auto x = act(L.x, d), p = act(L.p, d), h = act(L.h, d);
        for (std::int64_t i = 0; i < n; ++i)
          for (std::int64_t j = 0; j < d; ++j)
            h(i, j) = x(i, j) + (p(i, j) + L.bproj[static_cast<std::size_t>(j)]);
        nano::layer_norm(cst(h), vec(L.g2), vec(L.beta2), eps, act(L.a2, d));
        break;
      }
      case fc1: {
        const auto z = act(L.z, fl_);
        nano::rowwise_gemm(cst(act(L.a2, d)), weights(L.w1_t, d, fl_), vec(L.b1), z);
        nano::gelu_in_place(z);
        break;
      }
      case fc2:
        nano::rowwise_gemm(cst(act(L.z, fl_)), weights(L.w2_t, fl_, d), std::span<const T>{},
                           act(L.p2, d));
        break;
      case mlp_reduce:
        reduce_(std::span<T>(L.p2.data() + b * d, static_cast<std::size_t>(n * d)));
        break;
      case residual: {
        const auto h = act(L.h, d), p2 = act(L.p2, d);
        T* y = (l + 1 < cfg_.layers ? layers_[static_cast<std::size_t>(l) + 1].x.data()
                                    : out_.data()) +
               b * d;
        for (std::int64_t i = 0; i < n; ++i)
          for (std::int64_t j = 0; j < d; ++j)
            y[i * d + j] = h(i, j) + (p2(i, j) + L.bfc2[static_cast<std::size_t>(j)]);
        break;
      }
      default:
        pipit::fail("gpt::tp_decode: no op ", op);
    }
  }

 private:
  struct layer {
    std::vector<T> wqkv_t, bqkv, wproj_t, bproj, w1_t, b1, w2_t, bfc2, g1, beta1, g2, beta2;
    std::vector<T> x, a, qkv, o, p, h, a2, z, p2, k_cache, v_cache;
  };

  // Checked before anything is sized from it.
  static const model_config& checked(const model_config& c, int t, std::int64_t requests,
                                     std::int64_t capacity) {
    check(c);
    if (c.heads % t != 0 || c.ffn() % t != 0)
      pipit::fail("gpt::tp_decode: ", t, " ranks must divide the heads (", c.heads,
                  ") and the MLP width (", c.ffn(), ")");
    if (requests < 1 || capacity < 1)
      pipit::fail("gpt::tp_decode: ", requests, " requests, ", capacity,
                  " cache positions (need >= 1 each)");
    return c;
  }
  static std::size_t idx(std::int64_t i, std::int64_t j, std::int64_t cols) {
    return static_cast<std::size_t>(i * cols + j);
  }
  layer& at(int l) {
    if (l < 0 || l >= cfg_.layers) pipit::fail("gpt::tp_decode: layer ", l, " of ", cfg_.layers);
    return layers_[static_cast<std::size_t>(l)];
  }
  pipit::nano::kv_cache_view<T> cache(layer& L) const {
    return {L.k_cache.data(), L.v_cache.data(),
            requests_,        hl_,
            capacity_,        static_cast<std::int64_t>(cfg_.head_dim())};
  }

  model_config cfg_;
  std::int64_t requests_, capacity_;
  std::int64_t hl_ = 0, dl_ = 0, fl_ = 0, position_ = 0;
  int rank_ = 0;
  std::vector<layer> layers_;
  std::vector<T> out_;
  std::vector<T> scores_;  // decode attention scratch: only the memory thread uses it
  pipit::nano::ordered_all_reduce<C, T> reduce_;
};

}  // namespace gpt
