#pragma once
// block: one pre-layer-norm transformer block (GPT-2):
//   h = x + attention(ln1(x)),   y = h + mlp(ln2(h))
// with its forward, input backward (B) and weight backward (W) written out, so that a pipeline
// schedule can run W long after B (zero-bubble and V schedules). B writes into the block's
// `saved` region the intermediate gradients W needs (as Megatron's WeightGradStore keeps them).
//
// Tensor parallelism (tensor_group, attention.hpp, mlp.hpp): a block made with a group of t ranks
// holds rank r's heads and MLP columns, cut from the same full matrices the unsharded block draws
// (init.hpp), so every t starts from the same model. The layer norms are replicated: every rank
// computes them on the same (all-reduced) values, so their gradients agree bit for bit.

#include <cstddef>
#include <cstdint>
#include <span>

#include "attention.hpp"
#include "config.hpp"
#include "init.hpp"
#include "layer_norm.hpp"
#include "matrix.hpp"
#include "mlp.hpp"
#include "tensor_group.hpp"

namespace gpt {

// Where one microbatch's values of a block live in its `saved` region (element offsets). The
// forward fills the first group, the input backward the second. With a tensor split of t, w and
// fl are this rank's shares of the attention width (d / t) and of the MLP width (f / t).
struct block_layout {
  Eigen::Index d = 0, f = 0, n = 0, w = 0;  // f: this rank's MLP width
  // forward
  std::size_t xhat1 = 0, rstd1 = 0, a1 = 0, qkv = 0, probs = 0, ctx = 0, xhat2 = 0, rstd2 = 0,
              a2 = 0, u = 0, g = 0;
  // input backward, for the weight backward
  std::size_t d_a1 = 0, d_qkv = 0, d_h1 = 0, d_a2 = 0, d_u = 0;
  std::size_t size = 0;

  block_layout() = default;
  block_layout(const model_config& c, int tensor = 1)
      : d(c.hidden), f(c.ffn() / tensor), n(c.tokens()), w(c.hidden / tensor) {
    const auto dn = static_cast<std::size_t>(d * n), fn = static_cast<std::size_t>(f * n),
               nn = static_cast<std::size_t>(n), wn = static_cast<std::size_t>(w * n);
    const std::size_t probs_size =
        static_cast<std::size_t>(c.batch) * static_cast<std::size_t>(c.heads / tensor) *
        static_cast<std::size_t>(c.seq) * static_cast<std::size_t>(c.seq);
    std::size_t at = 0;
    const auto take = [&at](std::size_t k) {
      const std::size_t o = at;
      at += k;
      return o;
    };
    xhat1 = take(dn), rstd1 = take(nn), a1 = take(dn), qkv = take(3 * wn), probs = take(probs_size);
    ctx = take(wn), xhat2 = take(dn), rstd2 = take(nn), a2 = take(dn), u = take(fn), g = take(fn);
    d_a1 = take(dn), d_qkv = take(3 * wn), d_h1 = take(dn), d_a2 = take(dn), d_u = take(fn);
    size = at;
  }
};

// Throws pipit::error unless the model splits over t tensor-parallel ranks: whole heads and
// whole MLP columns per rank.
inline void check_tensor_parallel(const model_config& c, int t) {
  check(c);
  if (t < 1) pipit::fail("gpt: the tensor-parallel size must be >= 1 (got ", t, ")");
  if (c.heads % t != 0)
    pipit::fail("gpt: tensor parallelism over ", t, " ranks needs heads (", c.heads,
                ") divisible by ", t);
  if (c.ffn() % t != 0)
    pipit::fail("gpt: tensor parallelism over ", t, " ranks needs the MLP width (", c.ffn(),
                ") divisible by ", t);
}

template <class T>
class block {
 public:
  layer_norm<T> ln1, ln2;
  attention<T> attn;
  mlp<T> ffn;

  block() = default;
  // Block `layer` of the model, initialised as GPT-2 does: N(0, 0.02^2) weights, the two
  // projections into the residual stream scaled by 1 / sqrt(2 layers), zero biases. With a group
  // of t > 1 ranks: rank tp.rank's shards of those matrices (heads % t == 0, ffn % t == 0).
  block(const model_config& c, int layer, tensor_group<T> tp = {})
      : ln1(c.hidden), ln2(c.hidden), layout_(c, checked_split(c, tp)) {
    const double s = c.init_std, s_out = c.init_std / std::sqrt(2.0 * c.layers);
    const Eigen::Index d = c.hidden, f = c.ffn(), t = tp.size, r = tp.rank;
    const Eigen::Index w = d / t, fl = f / t;
    matrix<T> qkv = normal_matrix<T>(c, tensor_key(layer, tensor_id::qkv_w), 3 * d, d, s);
    matrix<T> proj = normal_matrix<T>(c, tensor_key(layer, tensor_id::proj_w), d, d, s_out);
    matrix<T> fc1 = normal_matrix<T>(c, tensor_key(layer, tensor_id::fc1_w), f, d, s);
    matrix<T> fc2 = normal_matrix<T>(c, tensor_key(layer, tensor_id::fc2_w), d, f, s_out);
    if (t > 1) {
      matrix<T> mine(3 * w, d);  // this rank's heads' rows of Q, K and V
      for (Eigen::Index part = 0; part < 3; ++part)
        mine.middleRows(part * w, w) = qkv.middleRows(part * d + r * w, w);
      qkv = std::move(mine);
      proj = matrix<T>(proj.middleCols(r * w, w));
      fc1 = matrix<T>(fc1.middleRows(r * fl, fl));
      fc2 = matrix<T>(fc2.middleCols(r * fl, fl));
    }
    attn.qkv = linear<T>(std::move(qkv));
    attn.proj = linear<T>(std::move(proj));
    attn.heads = c.heads / tp.size;
    attn.batch = c.batch;
    attn.seq = c.seq;
    attn.tp = tp;
    ffn.fc1 = linear<T>(std::move(fc1));
    ffn.fc2 = linear<T>(std::move(fc2));
    ffn.tp = std::move(tp);
  }

  const block_layout& layout() const noexcept { return layout_; }
  const tensor_group<T>& tensor() const noexcept { return ffn.tp; }

  // x, y: d x n (y must not alias x); saved: layout().size elements.
  void forward(cmap<T> x, map<T> y, std::span<T> saved) {
    const block_layout& L = layout_;
    const Eigen::Index d = L.d, f = L.f, n = L.n, w = L.w;
    scratch_.resize(d, n);
    ln1.forward(x, view(saved, L.a1, d, n), view(saved, L.xhat1, d, n), view(saved, L.rstd1, 1, n));
    attn.forward(cview(saved, L.a1, d, n), map<T>(scratch_.data(), d, n),
                 view(saved, L.qkv, 3 * w, n), saved.subspan(L.probs, attn.probs_size()),
                 view(saved, L.ctx, w, n));
    y = x + scratch_;  // h
    ln2.forward(as_const(y), view(saved, L.a2, d, n), view(saved, L.xhat2, d, n),
                view(saved, L.rstd2, 1, n));
    ffn.forward(cview(saved, L.a2, d, n), map<T>(scratch_.data(), d, n), view(saved, L.u, f, n),
                view(saved, L.g, f, n));
    y += scratch_;
  }

  // dy: the gradient of y; dx: of x (d x n, may not alias dy). Writes d_a1, d_qkv, d_h1, d_a2
  // and d_u into `saved` for backward_weight.
  void backward_input(cmap<T> dy, std::span<T> saved, map<T> dx) {
    const block_layout& L = layout_;
    const Eigen::Index d = L.d, f = L.f, n = L.n, w = L.w;
    scratch_.resize(d, n);
    d_ctx_.resize(w, n);
    map<T> d_h1 = view(saved, L.d_h1, d, n);
    ffn.backward_input(dy, cview(saved, L.u, f, n), view(saved, L.d_u, f, n),
                       view(saved, L.d_a2, d, n));
    ln2.backward_input(cview(saved, L.d_a2, d, n), cview(saved, L.xhat2, d, n),
                       cview(saved, L.rstd2, 1, n), map<T>(scratch_.data(), d, n));
    d_h1 = dy + scratch_;
    attn.backward_input(as_const(d_h1), cview(saved, L.qkv, 3 * w, n),
                        std::span<const T>(saved.subspan(L.probs, attn.probs_size())),
                        map<T>(d_ctx_.data(), w, n), view(saved, L.d_qkv, 3 * w, n),
                        view(saved, L.d_a1, d, n));
    ln1.backward_input(cview(saved, L.d_a1, d, n), cview(saved, L.xhat1, d, n),
                       cview(saved, L.rstd1, 1, n), map<T>(scratch_.data(), d, n));
    dx = d_h1 + scratch_;
  }

  // Accumulates the weight gradients from the forward's values and backward_input's gradients.
  void backward_weight(cmap<T> dy, std::span<const T> saved) {
    const block_layout& L = layout_;
    const Eigen::Index d = L.d, f = L.f, n = L.n, w = L.w;
    ffn.backward_weight(cview(saved, L.a2, d, n), dy, cview(saved, L.g, f, n),
                        cview(saved, L.d_u, f, n));
    ln2.backward_weight(cview(saved, L.d_a2, d, n), cview(saved, L.xhat2, d, n));
    attn.backward_weight(cview(saved, L.a1, d, n), cview(saved, L.d_h1, d, n),
                         cview(saved, L.ctx, w, n), cview(saved, L.d_qkv, 3 * w, n));
    ln1.backward_weight(cview(saved, L.d_a1, d, n), cview(saved, L.xhat1, d, n));
  }

  // f(tensor_id, value, gradient, tensor_split) for every parameter, in a fixed order.
  template <class F>
  void for_each_parameter(F&& f) {
    using id = tensor_id;
    using ts = tensor_split;
    f(id::ln1_gamma, ln1.gamma, ln1.d_gamma, ts::replicated);
    f(id::ln1_beta, ln1.beta, ln1.d_beta, ts::replicated);
    f(id::qkv_w, attn.qkv.w, attn.qkv.d_w, ts::q_k_v_rows);
    f(id::qkv_b, attn.qkv.b, attn.qkv.d_b, ts::q_k_v_rows);
    f(id::proj_w, attn.proj.w, attn.proj.d_w, ts::cols);
    f(id::proj_b, attn.proj.b, attn.proj.d_b, ts::replicated);
    f(id::ln2_gamma, ln2.gamma, ln2.d_gamma, ts::replicated);
    f(id::ln2_beta, ln2.beta, ln2.d_beta, ts::replicated);
    f(id::fc1_w, ffn.fc1.w, ffn.fc1.d_w, ts::rows);
    f(id::fc1_b, ffn.fc1.b, ffn.fc1.d_b, ts::rows);
    f(id::fc2_w, ffn.fc2.w, ffn.fc2.d_w, ts::cols);
    f(id::fc2_b, ffn.fc2.b, ffn.fc2.d_b, ts::replicated);
  }

 private:
  static int checked_split(const model_config& c, const tensor_group<T>& tp) {
    check_tensor_parallel(c, tp.size);
    check_tensor_split(tp.size, tp.rank);
    if (tp.size > 1 && !tp.sum)
      pipit::fail("gpt: a tensor group of ", tp.size, " ranks needs its all-reduce");
    return tp.size;
  }

  block_layout layout_;
  matrix<T> scratch_, d_ctx_;  // per-pass temporaries (not kept between passes)
};

}  // namespace gpt
