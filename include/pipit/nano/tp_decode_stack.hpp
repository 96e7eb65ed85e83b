#pragma once
// tp_decode_stack<T, C>: one decoding step of a stack of tensor-parallel transformer layers
// (pre-norm, RMSNorm, grouped-query attention over a KV cache, GELU MLP), written as an
// op_graph so that nano_runner can split it into nano-batches of requests. Each layer is ten
// operations, as NanoFlow lays out a decode layer (Zhu et al., arXiv 2408.12757, figure 4):
//
//   id  name        kind     what (rows = decode requests; rank r of t)
//   0   norm1       memory   a = rmsnorm(x) * g1
//   1   qkv         compute  [q | k | v] = a [Wq_r; Wk_r; Wv_r]^T        (column-parallel)
//   2   attention   memory   append k, v at position `context`; o = softmax(q K^T / sqrt(d)) V
//   3   o_proj      compute  p = o Wo_r^T                                 (row-parallel partial)
//   4   attn_reduce network  p = sum over ranks of p                     (g)
//   5   norm2       memory   m = x + p;  a2 = rmsnorm(m) * g2
//   6   up          compute  z = gelu(a2 W1_r^T + b1_r)                  (column-parallel)
//   7   down        compute  p2 = z W2_r^T                               (row-parallel partial)
//   8   mlp_reduce  network  p2 = sum over ranks of p2                   (g)
//   9   residual    memory   x' = m + p2 + b2
//
// The weight shards are cut with the tensor-parallel layers' own geometry (tp::
// parallel_attention::shard, column_parallel_linear and row_parallel_linear weight_shard and
// bias_shard: the same heads, rows and columns as Megatron's split). The tp:: layers' forward
// passes cannot be used as they are: each runs its GEMM and its collective in one call, and a
// blocked Eigen GEMM's bits depend on the number of rows. Here the GEMMs are row_kernels'
// rowwise_gemm and the collectives ordered_all_reduce, so any nano-batch split gives the same
// bits as none.
//
// Every layer has its own activation buffers, so no nano-op overwrites rows another still has
// to read (the graph's row-wise dependencies are the only ordering there is). Every call of the
// functor writes the same position of the KV cache, so steps can be repeated (a benchmark).

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/nano/nano_batch.hpp"
#include "pipit/nano/op_graph.hpp"
#include "pipit/nano/ordered_all_reduce.hpp"
#include "pipit/nano/row_kernels.hpp"
#include "pipit/tp/column_parallel_linear.hpp"
#include "pipit/tp/parallel_attention.hpp"
#include "pipit/tp/row_parallel_linear.hpp"

namespace pipit::nano {

struct decode_shape {
  std::int64_t hidden = 0;
  std::int64_t heads = 0;     // query heads H
  std::int64_t kv_heads = 0;  // KV heads G (the tensor size must divide it)
  std::int64_t head_dim = 0;
  std::int64_t ffn = 0;  // MLP width (the tensor size must divide it)
  int layers = 0;
  std::int64_t requests = 0;  // batch rows: one new token per request
  std::int64_t context = 0;   // cached positions per request; the new token goes to this one
};

// The full (unsharded) weights of one layer, row-major, torch layout (out x in).
template <class T>
struct decode_layer_weights {
  std::vector<T> wq, wk, wv;  // H d x h, G d x h, G d x h
  std::vector<T> wo;          // h x H d
  std::vector<T> w1, b1;      // ffn x h, ffn
  std::vector<T> w2, b2;      // h x ffn, h
  std::vector<T> g1, g2;      // h, h (RMSNorm gains)
};

template <class T, comm::communicator C>
class tp_decode_stack {
 public:
  enum layer_op : int {
    norm1,
    qkv,
    attention,
    o_proj,
    attn_reduce,
    norm2,
    up,
    down,
    mlp_reduce,
    residual,
    ops_per_layer
  };

  static op_graph layer_graph() {
    op_graph g;
    g.add("norm1", resource::memory);
    g.add("qkv", resource::compute, {norm1});
    g.add("attention", resource::memory, {qkv});
    g.add("o_proj", resource::compute, {attention});
    g.add("attn_reduce", resource::network, {o_proj});
    g.add("norm2", resource::memory, {attn_reduce});
    g.add("up", resource::compute, {norm2});
    g.add("down", resource::compute, {up});
    g.add("mlp_reduce", resource::network, {down});
    g.add("residual", resource::memory, {mlp_reduce, norm2});
    return g;
  }

  // weights: one per layer, full; this rank keeps its shards (transposed for rowwise_gemm).
  tp_decode_stack(C& tp, decode_shape s, std::span<const decode_layer_weights<T>> weights,
                  T eps = T(1e-6))
      : tp_(&tp), s_(checked(s)), eps_(eps), reduce_(tp, s.requests * s.hidden) {
    const int t = tp.size(), r = tp.rank();
    if (static_cast<std::int64_t>(weights.size()) != s.layers)
      fail("pipit::nano::tp_decode_stack: weights for ", weights.size(), " layers, the shape has ",
           s.layers);
    const tp::parallel_attention<T> attn({s.hidden, s.heads, s.kv_heads, s.head_dim, false}, t, r);
    const tp::column_parallel_linear<T> w1(s.hidden, s.ffn, t, r);
    const tp::row_parallel_linear<T> w2(s.ffn, s.hidden, t, r);
    hl_ = attn.local_heads();
    gl_ = attn.local_kv_heads();
    fl_ = w1.local_out();
    const std::int64_t h = s.hidden, d = s.head_dim, n = s.requests, qkv_cols = (hl_ + 2 * gl_) * d;
    layers_.resize(static_cast<std::size_t>(s.layers));
    for (int l = 0; l < s.layers; ++l) {
      const decode_layer_weights<T>& w = weights[static_cast<std::size_t>(l)];
      layer& L = layers_[static_cast<std::size_t>(l)];
      check(w.wq, s.heads * d * h, "wq", l);
      check(w.wk, s.kv_heads * d * h, "wk", l);
      check(w.wv, s.kv_heads * d * h, "wv", l);
      check(w.wo, h * s.heads * d, "wo", l);
      check(w.w1, s.ffn * h, "w1", l);
      check(w.b1, s.ffn, "b1", l);
      check(w.w2, h * s.ffn, "w2", l);
      check(w.b2, h, "b2", l);
      check(w.g1, h, "g1", l);
      check(w.g2, h, "g2", l);
      const auto p = attn.shard(tp::attention_params<const T>{
          make_view(w.wq.data(), s.heads * d, h), make_view(w.wk.data(), s.kv_heads * d, h),
          make_view(w.wv.data(), s.kv_heads * d, h), make_view(w.wo.data(), h, s.heads * d)});
      // [Wq_r; Wk_r; Wv_r]^T: h x (Hl + 2 Gl) d
      L.wqkv_t.resize(static_cast<std::size_t>(h * qkv_cols));
      const auto wqkv_t = make_view(L.wqkv_t.data(), h, qkv_cols);
      transpose_into(p.q, wqkv_t, 0);
      transpose_into(p.k, wqkv_t, hl_ * d);
      transpose_into(p.v, wqkv_t, (hl_ + gl_) * d);
      L.wo_t = transposed(p.o);
      L.w1_t = transposed(w1.weight_shard(make_view(w.w1.data(), s.ffn, h)));
      const auto b1 = w1.bias_shard(std::span<const T>(w.b1));
      L.b1.assign(b1.begin(), b1.end());
      L.w2_t = transposed(w2.weight_shard(make_view(w.w2.data(), h, s.ffn)));
      L.b2 = w.b2;
      L.g1 = w.g1;
      L.g2 = w.g2;
      L.x.resize(static_cast<std::size_t>(n * h));
      L.a.resize(static_cast<std::size_t>(n * h));
      L.qkv.resize(static_cast<std::size_t>(n * qkv_cols));
      L.o.resize(static_cast<std::size_t>(n * hl_ * d));
      L.p.resize(static_cast<std::size_t>(n * h));
      L.m.resize(static_cast<std::size_t>(n * h));
      L.a2.resize(static_cast<std::size_t>(n * h));
      L.z.resize(static_cast<std::size_t>(n * fl_));
      L.p2.resize(static_cast<std::size_t>(n * h));
      L.k_cache.resize(static_cast<std::size_t>(n * gl_ * (s.context + 1) * d));
      L.v_cache.resize(L.k_cache.size());
    }
    out_.resize(static_cast<std::size_t>(n * h));
    scores_.resize(static_cast<std::size_t>(s.context + 1));
  }

  const decode_shape& shape() const noexcept { return s_; }
  std::int64_t local_heads() const noexcept { return hl_; }
  std::int64_t local_kv_heads() const noexcept { return gl_; }
  // The KV heads of this rank (global ids [first, first + local_kv_heads())).
  std::int64_t first_kv_head() const noexcept { return tp_->rank() * gl_; }

  op_graph graph() const { return layer_graph().repeated(s_.layers); }

  // The input hidden states (requests x hidden), copied into layer 0's buffer.
  void set_input(matrix_view<const T> x) {
    if (x.rows != s_.requests || x.cols != s_.hidden)
      fail("pipit::nano::tp_decode_stack: input ", x.rows, " x ", x.cols, ", expected ",
           s_.requests, " x ", s_.hidden);
    for (std::int64_t i = 0; i < x.rows; ++i)
      std::copy_n(x.row(i), x.cols, layers_[0].x.data() + i * x.cols);
  }
  // Fills the cached positions [0, context) of layer l: value(request, global KV head,
  // position, element, is_value) for this rank's KV heads.
  template <class F>
  void fill_cache(int l, F&& value) {
    layer& L = at(l);
    const auto c = cache(L);
    for (std::int64_t q = 0; q < s_.requests; ++q)
      for (std::int64_t g = 0; g < gl_; ++g)
        for (std::int64_t pos = 0; pos < s_.context; ++pos)
          for (std::int64_t e = 0; e < s_.head_dim; ++e) {
            c.key(q, g, pos)[e] = value(q, first_kv_head() + g, pos, e, false);
            c.value(q, g, pos)[e] = value(q, first_kv_head() + g, pos, e, true);
          }
  }
  // The last layer's output (requests x hidden), identical on every rank.
  matrix_view<const T> output() const { return make_view(out_.data(), s_.requests, s_.hidden); }

  // Runs op `op` (of graph()) on rows [rows.begin, rows.end): the functor for nano_runner.
  void operator()(int op, rows_range rows) {
    const int l = op / ops_per_layer;
    layer& L = at(l);
    const std::int64_t b = rows.begin, n = rows.size(), h = s_.hidden, d = s_.head_dim,
                       qkv_cols = (hl_ + 2 * gl_) * d;
    auto act = [&](std::vector<T>& v, std::int64_t cols) {
      return make_view(v.data() + b * cols, n, cols);
    };
    auto cst = [](matrix_view<T> v) { return matrix_view<const T>(v); };
    auto vec = [](const std::vector<T>& v) { return std::span<const T>(v); };
    T* next = l + 1 < s_.layers ? layers_[static_cast<std::size_t>(l) + 1].x.data() : out_.data();
    switch (static_cast<layer_op>(op % ops_per_layer)) {
      case norm1:
        rms_norm(cst(act(L.x, h)), vec(L.g1), eps_, act(L.a, h));
        break;
      case qkv:
        rowwise_gemm(cst(act(L.a, h)),
                     make_view(static_cast<const T*>(L.wqkv_t.data()), h, qkv_cols),
                     std::span<const T>{}, act(L.qkv, qkv_cols));
        break;
      case attention: {
        const auto all = act(L.qkv, qkv_cols);
        const matrix_view<const T> q{all.data, n, hl_ * d, qkv_cols},
            k{all.data + hl_ * d, n, gl_ * d, qkv_cols},
            v{all.data + (hl_ + gl_) * d, n, gl_ * d, qkv_cols};
        decode_attention(b, hl_, q, k, v, cache(L), s_.context, std::span<T>(scores_),
                         act(L.o, hl_ * d));
        break;
      }
      case o_proj:
        rowwise_gemm(cst(act(L.o, hl_ * d)),
                     make_view(static_cast<const T*>(L.wo_t.data()), hl_ * d, h),
                     std::span<const T>{}, act(L.p, h));
        break;
      case attn_reduce:
        reduce_(std::span<T>(L.p.data() + b * h, static_cast<std::size_t>(n * h)));
        break;
      case norm2: {
        const auto x = act(L.x, h), p = act(L.p, h), m = act(L.m, h);
        for (std::int64_t i = 0; i < n; ++i)
          for (std::int64_t j = 0; j < h; ++j) m(i, j) = x(i, j) + p(i, j);
        rms_norm(cst(m), vec(L.g2), eps_, act(L.a2, h));
        break;
      }
      case up: {
        const auto z = act(L.z, fl_);
        rowwise_gemm(cst(act(L.a2, h)), make_view(static_cast<const T*>(L.w1_t.data()), h, fl_),
                     vec(L.b1), z);
        gelu_in_place(z);
        break;
      }
      case down:
        rowwise_gemm(cst(act(L.z, fl_)), make_view(static_cast<const T*>(L.w2_t.data()), fl_, h),
                     std::span<const T>{}, act(L.p2, h));
        break;
      case mlp_reduce:
        reduce_(std::span<T>(L.p2.data() + b * h, static_cast<std::size_t>(n * h)));
        break;
      case residual: {
        const auto m = act(L.m, h), p2 = act(L.p2, h);
        T* y = next + b * h;
        for (std::int64_t i = 0; i < n; ++i)
          for (std::int64_t j = 0; j < h; ++j)
            y[i * h + j] = m(i, j) + p2(i, j) + L.b2[static_cast<std::size_t>(j)];
        break;
      }
      default:
        fail("pipit::nano::tp_decode_stack: no op ", op);
    }
  }

 private:
  // The shape, checked before the members sized from it are allocated.
  static decode_shape checked(const decode_shape& s) {
    if (s.hidden < 1 || s.head_dim < 1 || s.layers < 1 || s.requests < 1 || s.context < 0)
      fail("pipit::nano::tp_decode_stack: hidden ", s.hidden, ", head_dim ", s.head_dim,
           ", layers ", s.layers, ", requests ", s.requests, ", context ", s.context,
           " (need >= 1, >= 1, >= 1, >= 1, >= 0)");
    return s;
  }
  struct layer {
    std::vector<T> wqkv_t, wo_t, w1_t, b1, w2_t, b2, g1, g2;
    std::vector<T> x, a, qkv, o, p, m, a2, z, p2, k_cache, v_cache;
  };

  layer& at(int l) {
    if (l < 0 || l >= s_.layers) fail("pipit::nano::tp_decode_stack: layer ", l, " of ", s_.layers);
    return layers_[static_cast<std::size_t>(l)];
  }
  kv_cache_view<T> cache(layer& L) const {
    return {L.k_cache.data(), L.v_cache.data(), s_.requests, gl_, s_.context + 1, s_.head_dim};
  }
  static void check(const std::vector<T>& v, std::int64_t n, const char* what, int l) {
    if (static_cast<std::int64_t>(v.size()) != n)
      fail("pipit::nano::tp_decode_stack: layer ", l, " ", what, " has ", v.size(),
           " elements, expected ", n);
  }
  // dst[:, first + i] = src[i, :]
  static void transpose_into(matrix_view<const T> src, matrix_view<T> dst, std::int64_t first) {
    for (std::int64_t i = 0; i < src.rows; ++i)
      for (std::int64_t j = 0; j < src.cols; ++j) dst(j, first + i) = src(i, j);
  }
  static std::vector<T> transposed(matrix_view<const T> src) {
    std::vector<T> v(static_cast<std::size_t>(src.rows * src.cols));
    transpose_into(src, make_view(v.data(), src.cols, src.rows), 0);
    return v;
  }

  C* tp_;
  decode_shape s_;
  T eps_;
  std::int64_t hl_ = 0, gl_ = 0, fl_ = 0;
  std::vector<layer> layers_;
  std::vector<T> out_;
  std::vector<T> scores_;  // decode attention scratch: only the memory thread uses it
  ordered_all_reduce<C, T> reduce_;
};

}  // namespace pipit::nano
