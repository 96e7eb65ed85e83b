#pragma once
// attention: causal multi-head self-attention (Vaswani et al. 2017, GPT's decoder mask) with its
// input projection to q, k, v (3d x d) and its output projection (d x d).
//
// Per sequence and head, with Q, K, V the head's dh x S blocks, the probabilities are kept
// transposed, P^T (S x S, column i = query i), so the softmax runs down contiguous columns:
//   P^T = softmax_columns(mask(K^T Q / sqrt(dh))),   ctx = V P^T
// Backward (input), with dctx the gradient of ctx:
//   dV = dctx P,   dP^T = V^T dctx,   dS^T = P^T .* (dP^T - 1 colsum(P^T .* dP^T))
//   dQ = K dS^T / sqrt(dh),   dK = Q dS / sqrt(dh)
// B writes d_qkv for W, which then forms the two projections' weight gradients.
//
// Tensor parallelism (Megatron-LM, Shoeybi et al., arXiv 1909.08053, section 3, figure 3b): rank r
// of a group of t holds heads [r H/t, (r+1) H/t): their rows of Q, K and V in qkv (column
// parallel) and their columns of proj (row parallel). The heads need no communication; proj's
// partial outputs are summed over the group (the g operator) before its bias, kept whole, is
// added once; in the backward, qkv's partial input gradients are summed (f's backward).

#include <cmath>
#include <cstddef>
#include <limits>
#include <span>

#include "linear.hpp"
#include "matrix.hpp"
#include "tensor_group.hpp"

namespace gpt {

template <class T>
struct attention {
  linear<T> qkv, proj;                // this rank's shards: 3 w x d and d x w
  int heads = 1, batch = 1, seq = 1;  // heads: this rank's
  tensor_group<T> tp;                 // t = 1: the whole layer, no communication

  Eigen::Index hidden() const noexcept { return proj.out(); }
  // This rank's share of the hidden size: heads * head_dim (= hidden() when t = 1).
  Eigen::Index width() const noexcept { return proj.in(); }
  Eigen::Index head_dim() const noexcept { return width() / heads; }
  // Elements of the saved probabilities: batch * heads * seq * seq.
  std::size_t probs_size() const noexcept {
    return static_cast<std::size_t>(batch) * static_cast<std::size_t>(heads) *
           static_cast<std::size_t>(seq) * static_cast<std::size_t>(seq);
  }

  // x, y: d x n; ctx: w x n; q_k_v: 3w x n; probs: probs_size() (all saved for the backward).
  void forward(cmap<T> x, map<T> y, map<T> q_k_v, std::span<T> probs, map<T> ctx) const {
    qkv.forward(x, q_k_v);
    const Eigen::Index d = width(), dh = head_dim(), s = seq;
    const T scale = T(1) / std::sqrt(static_cast<T>(dh));
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < heads; ++h) {
        const Eigen::Index c0 = b * s, r0 = h * dh;
        const auto q = q_k_v.block(r0, c0, dh, s);
        const auto k = q_k_v.block(d + r0, c0, dh, s);
        const auto v = q_k_v.block(2 * d + r0, c0, dh, s);
        map<T> pt(probs.data() + prob_offset(b, h), s, s);
        pt.noalias() = scale * (k.transpose() * q);
        for (Eigen::Index i = 0; i < s; ++i) {  // column i: query i attends to keys 0 .. i
          auto col = pt.col(i);
          const T m = col.head(i + 1).maxCoeff();
          col.head(i + 1) = (col.head(i + 1).array() - m).exp();
          col.head(i + 1) /= col.head(i + 1).sum();
          col.tail(s - i - 1).setZero();
        }
        ctx.block(r0, c0, dh, s).noalias() = v * pt;
      }
    proj.product(as_const(ctx), y);
    tp.all_reduce(std::span<T>(y.data(), static_cast<std::size_t>(y.size())));  // g
    proj.add_bias(y);
  }

  // dy: d x n; d_ctx: w x n scratch; d_qkv: 3w x n (kept for backward_weight); dx: d x n.
  void backward_input(cmap<T> dy, cmap<T> q_k_v, std::span<const T> probs, map<T> d_ctx,
                      map<T> d_qkv, map<T> dx) const {
    proj.backward_input(dy, d_ctx);
    const Eigen::Index d = width(), dh = head_dim(), s = seq;
    const T scale = T(1) / std::sqrt(static_cast<T>(dh));
    matrix<T> dst(s, s);
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < heads; ++h) {
        const Eigen::Index c0 = b * s, r0 = h * dh;
        const auto q = q_k_v.block(r0, c0, dh, s);
        const auto k = q_k_v.block(d + r0, c0, dh, s);
        const auto v = q_k_v.block(2 * d + r0, c0, dh, s);
        const cmap<T> pt(probs.data() + prob_offset(b, h), s, s);
        const auto dctx = d_ctx.block(r0, c0, dh, s);
        d_qkv.block(2 * d + r0, c0, dh, s).noalias() = dctx * pt.transpose();  // dV
        dst.noalias() = v.transpose() * dctx;                                  // dP^T
        for (Eigen::Index i = 0; i < s; ++i) {
          const T dot = pt.col(i).dot(dst.col(i));
          dst.col(i) = pt.col(i).cwiseProduct((dst.col(i).array() - dot).matrix());
        }
        d_qkv.block(r0, c0, dh, s).noalias() = scale * (k * dst);                  // dQ
        d_qkv.block(d + r0, c0, dh, s).noalias() = scale * (q * dst.transpose());  // dK
      }
    qkv.backward_input(as_const(d_qkv), dx);
    tp.all_reduce(std::span<T>(dx.data(), static_cast<std::size_t>(dx.size())));  // f's backward
  }

  void backward_weight(cmap<T> x, cmap<T> dy, cmap<T> ctx, cmap<T> d_qkv) {
    proj.backward_weight(ctx, dy);
    qkv.backward_weight(x, d_qkv);
  }

 private:
  std::size_t prob_offset(int b, int h) const noexcept {
    return (static_cast<std::size_t>(b) * static_cast<std::size_t>(heads) +
            static_cast<std::size_t>(h)) *
           static_cast<std::size_t>(seq) * static_cast<std::size_t>(seq);
  }
};

}  // namespace gpt
