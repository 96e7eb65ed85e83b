#pragma once
// block: one pre-layer-norm transformer block (GPT-2):
//   h = x + attention(ln1(x)),   y = h + mlp(ln2(h))
// with its forward, input backward (B) and weight backward (W) written out, so that a pipeline
// schedule can run W long after B (zero-bubble and V schedules). B writes into the block's
// `saved` region the intermediate gradients W needs (as Megatron's WeightGradStore keeps them).

#include <cstddef>
#include <cstdint>
#include <span>

#include "attention.hpp"
#include "config.hpp"
#include "init.hpp"
#include "layer_norm.hpp"
#include "matrix.hpp"
#include "mlp.hpp"

namespace gpt {

// Where one microbatch's values of a block live in its `saved` region (element offsets). The
// forward fills the first group, the input backward the second.
struct block_layout {
  Eigen::Index d = 0, f = 0, n = 0;
  // forward
  std::size_t xhat1 = 0, rstd1 = 0, a1 = 0, qkv = 0, probs = 0, ctx = 0, xhat2 = 0, rstd2 = 0,
              a2 = 0, u = 0, g = 0;
  // input backward, for the weight backward
  std::size_t d_a1 = 0, d_qkv = 0, d_h1 = 0, d_a2 = 0, d_u = 0;
  std::size_t size = 0;

  block_layout() = default;
  block_layout(const model_config& c) : d(c.hidden), f(c.ffn()), n(c.tokens()) {
    const auto dn = static_cast<std::size_t>(d * n), fn = static_cast<std::size_t>(f * n),
               nn = static_cast<std::size_t>(n);
    const std::size_t probs_size =
        static_cast<std::size_t>(c.batch) * static_cast<std::size_t>(c.heads) *
        static_cast<std::size_t>(c.seq) * static_cast<std::size_t>(c.seq);
    std::size_t at = 0;
    const auto take = [&at](std::size_t k) {
      const std::size_t o = at;
      at += k;
      return o;
    };
    xhat1 = take(dn), rstd1 = take(nn), a1 = take(dn), qkv = take(3 * dn), probs = take(probs_size);
    ctx = take(dn), xhat2 = take(dn), rstd2 = take(nn), a2 = take(dn), u = take(fn), g = take(fn);
    d_a1 = take(dn), d_qkv = take(3 * dn), d_h1 = take(dn), d_a2 = take(dn), d_u = take(fn);
    size = at;
  }
};

template <class T>
class block {
 public:
  layer_norm<T> ln1, ln2;
  attention<T> attn;
  mlp<T> ffn;

  block() = default;
  // Block `layer` of the model, initialised as GPT-2 does: N(0, 0.02^2) weights, the two
  // projections into the residual stream scaled by 1 / sqrt(2 layers), zero biases.
  block(const model_config& c, int layer) : ln1(c.hidden), ln2(c.hidden), layout_(c) {
    const double s = c.init_std, s_out = c.init_std / std::sqrt(2.0 * c.layers);
    const Eigen::Index d = c.hidden, f = c.ffn();
    attn.qkv = linear<T>(normal_matrix<T>(c, tensor_key(layer, tensor_id::qkv_w), 3 * d, d, s));
    attn.proj = linear<T>(normal_matrix<T>(c, tensor_key(layer, tensor_id::proj_w), d, d, s_out));
    attn.heads = c.heads;
    attn.batch = c.batch;
    attn.seq = c.seq;
    ffn.fc1 = linear<T>(normal_matrix<T>(c, tensor_key(layer, tensor_id::fc1_w), f, d, s));
    ffn.fc2 = linear<T>(normal_matrix<T>(c, tensor_key(layer, tensor_id::fc2_w), d, f, s_out));
  }

  const block_layout& layout() const noexcept { return layout_; }

  // x, y: d x n (y must not alias x); saved: layout().size elements.
  void forward(cmap<T> x, map<T> y, std::span<T> saved) {
    const block_layout& L = layout_;
    const Eigen::Index d = L.d, f = L.f, n = L.n;
    scratch_.resize(d, n);
    ln1.forward(x, view(saved, L.a1, d, n), view(saved, L.xhat1, d, n), view(saved, L.rstd1, 1, n));
    attn.forward(cview(saved, L.a1, d, n), map<T>(scratch_.data(), d, n),
                 view(saved, L.qkv, 3 * d, n), saved.subspan(L.probs, attn.probs_size()),
                 view(saved, L.ctx, d, n));
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
    const Eigen::Index d = L.d, f = L.f, n = L.n;
    scratch_.resize(d, n);
    d_ctx_.resize(d, n);
    map<T> d_h1 = view(saved, L.d_h1, d, n);
    ffn.backward_input(dy, cview(saved, L.u, f, n), view(saved, L.d_u, f, n),
                       view(saved, L.d_a2, d, n));
    ln2.backward_input(cview(saved, L.d_a2, d, n), cview(saved, L.xhat2, d, n),
                       cview(saved, L.rstd2, 1, n), map<T>(scratch_.data(), d, n));
    d_h1 = dy + scratch_;
    attn.backward_input(as_const(d_h1), cview(saved, L.qkv, 3 * d, n),
                        std::span<const T>(saved.subspan(L.probs, attn.probs_size())),
                        map<T>(d_ctx_.data(), d, n), view(saved, L.d_qkv, 3 * d, n),
                        view(saved, L.d_a1, d, n));
    ln1.backward_input(cview(saved, L.d_a1, d, n), cview(saved, L.xhat1, d, n),
                       cview(saved, L.rstd1, 1, n), map<T>(scratch_.data(), d, n));
    dx = d_h1 + scratch_;
  }

  // Accumulates the weight gradients from the forward's values and backward_input's gradients.
  void backward_weight(cmap<T> dy, std::span<const T> saved) {
    const block_layout& L = layout_;
    const Eigen::Index d = L.d, f = L.f, n = L.n;
    ffn.backward_weight(cview(saved, L.a2, d, n), dy, cview(saved, L.g, f, n),
                        cview(saved, L.d_u, f, n));
    ln2.backward_weight(cview(saved, L.d_a2, d, n), cview(saved, L.xhat2, d, n));
    attn.backward_weight(cview(saved, L.a1, d, n), cview(saved, L.d_h1, d, n),
                         cview(saved, L.ctx, d, n), cview(saved, L.d_qkv, 3 * d, n));
    ln1.backward_weight(cview(saved, L.d_a1, d, n), cview(saved, L.xhat1, d, n));
  }

  // f(tensor_id, value, gradient) for every parameter, in a fixed order.
  template <class F>
  void for_each_parameter(F&& f) {
    using id = tensor_id;
    f(id::ln1_gamma, ln1.gamma, ln1.d_gamma), f(id::ln1_beta, ln1.beta, ln1.d_beta);
    f(id::qkv_w, attn.qkv.w, attn.qkv.d_w), f(id::qkv_b, attn.qkv.b, attn.qkv.d_b);
    f(id::proj_w, attn.proj.w, attn.proj.d_w), f(id::proj_b, attn.proj.b, attn.proj.d_b);
    f(id::ln2_gamma, ln2.gamma, ln2.d_gamma), f(id::ln2_beta, ln2.beta, ln2.d_beta);
    f(id::fc1_w, ffn.fc1.w, ffn.fc1.d_w), f(id::fc1_b, ffn.fc1.b, ffn.fc1.d_b);
    f(id::fc2_w, ffn.fc2.w, ffn.fc2.d_w), f(id::fc2_b, ffn.fc2.b, ffn.fc2.d_b);
  }

 private:
  block_layout layout_;
  matrix<T> scratch_, d_ctx_;  // per-pass temporaries (not kept between passes)
};

}  // namespace gpt
