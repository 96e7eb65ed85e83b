#pragma once
// parallel_attention<T>: causal (or full) multi-head self-attention split by heads, with grouped
// KV heads kept whole (Megatron-LM, Shoeybi et al., arXiv 1909.08053, figure 3b; grouped-query
// attention, Ainslie et al., arXiv 2305.13245). With H query heads, G KV heads (H/G query heads
// share one) and tensor size t, which must divide G, rank r holds the KV heads
// [r G/t, (r+1) G/t) and the H/t query heads that use them: rows of Wq, Wk, Wv (column-parallel)
// and the matching columns of Wo (row-parallel). Attention itself needs no communication; the
// only collectives are f on the input and g on the output, as in the MLP.
//
// Shapes: hidden h, head_dim d; Wq: H d x h, Wk and Wv: G d x h, Wo: h x H d; no biases (as
// Llama). Input rows are tokens ordered (sequence b, position s) -> b * seq + s; the softmax
// runs over the positions of one sequence (causal: keys at or before the query).
//
// Passes: forward; backward_input (writes dQ, dK, dV into `saved` for the weight pass);
// backward_weight; backward, in which the input-gradient reduction is in flight during the four
// weight-gradient GEMMs. Weight gradients accumulate (+=). Host only (Eigen, float or double).

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/core/math.hpp"
#include "pipit/tp/linear_options.hpp"
#include "pipit/tp/matrix.hpp"
#include "pipit/tp/ring_collective.hpp"
#include "pipit/tp/row_parallel_linear.hpp"

namespace pipit::tp {

struct attention_shape {
  std::int64_t hidden = 0;
  std::int64_t heads = 0;     // query heads H
  std::int64_t kv_heads = 0;  // KV heads G (G = H: multi-head; G = 1: multi-query)
  std::int64_t head_dim = 0;
  bool causal = true;
};

// The projections (or their gradients): q (H d x h), k and v (G d x h), o (h x H d).
template <class U>
struct attention_params {
  matrix_view<U> q, k, v, o;
  template <class V = U>
  requires(!std::is_const_v<V>) operator attention_params<const V>() const { return {q, k, v, o}; }
};

template <class T>
class parallel_attention {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "pipit::tp::parallel_attention: T must be float or double (host Eigen GEMMs)");
  static constexpr const char* layer = "parallel_attention";

 public:
  using value_type = T;

  parallel_attention(attention_shape shape, int tensor_size, int tensor_rank,
                     bool sequence_parallel = false)
      : s_(checked(shape, tensor_size, tensor_rank)),
        t_(tensor_size),
        r_(tensor_rank),
        sp_(sequence_parallel),
        out_(shape.heads * shape.head_dim, shape.hidden, tensor_size, tensor_rank,
             {.bias = false, .sequence_parallel = sequence_parallel}) {}

  const attention_shape& shape() const noexcept { return s_; }
  std::int64_t local_heads() const noexcept { return s_.heads / t_; }
  std::int64_t local_kv_heads() const noexcept { return s_.kv_heads / t_; }
  // The query heads and KV heads this rank owns.
  range<std::int64_t> head_range() const noexcept {
    return {r_ * local_heads(), (r_ + 1) * local_heads()};
  }
  range<std::int64_t> kv_head_range() const noexcept {
    return {r_ * local_kv_heads(), (r_ + 1) * local_kv_heads()};
  }
  std::int64_t local_rows(std::int64_t tokens) const noexcept {
    return sp_ ? row_block(tokens, t_, r_).size() : tokens;
  }
  // Elements of `saved`: the gathered input (sequence parallel), Q, K, V, the probabilities
  // (sequences x local heads x seq x seq), the attention output O, dQ, dK, dV, and the output
  // projection's gathered gradient (sequence parallel).
  std::size_t saved_size(std::int64_t sequences, std::int64_t seq) const noexcept {
    const std::int64_t n = sequences * seq, qf = local_heads() * s_.head_dim,
                       kf = local_kv_heads() * s_.head_dim;
    return static_cast<std::size_t>((sp_ ? n * s_.hidden : 0) + 3 * n * qf + 4 * n * kf +
                                    sequences * local_heads() * seq * seq) +
           out_.saved_size(n);
  }

  // This rank's shard of the full projections.
  template <class U>
  attention_params<U> shard(attention_params<U> full) const {
    const std::int64_t d = s_.head_dim;
    detail::check_view(layer, full.q, s_.heads * d, s_.hidden, "the full Wq");
    detail::check_view(layer, full.k, s_.kv_heads * d, s_.hidden, "the full Wk");
    detail::check_view(layer, full.v, s_.kv_heads * d, s_.hidden, "the full Wv");
    return {full.q.block_rows(head_range().begin * d, local_heads() * d),
            full.k.block_rows(kv_head_range().begin * d, local_kv_heads() * d),
            full.v.block_rows(kv_head_range().begin * d, local_kv_heads() * d),
            out_.weight_shard(full.o)};
  }

  // x, y: local_rows(sequences * seq) x hidden; p: this rank's shard; saved: saved_size().
  template <comm::communicator C>
  void forward(C& tp, std::int64_t sequences, std::int64_t seq, matrix_view<const T> x,
               attention_params<const T> p, matrix_view<T> y, std::span<T> saved) {
    detail::check_group(layer, tp, t_, r_);
    const std::int64_t n = sequences * seq;
    check_params(p);
    detail::check_view(layer, x, local_rows(n), s_.hidden, "the input");
    const parts<T> s = carve(saved, sequences, seq);
    matrix_view<const T> xf = x;
    if (sp_) {
      const auto mine = row_block(n, t_, r_);
      detail::as_eigen(s.x).middleRows(mine.begin, mine.size()) = detail::as_eigen(x);
      ring_all_gather_rows(tp, std::span<T>(s.x.data, static_cast<std::size_t>(n * s_.hidden)), n,
                           s_.hidden);
      xf = s.x;
    }
    const auto X = detail::as_eigen(xf);
    detail::as_eigen(s.q).noalias() = X * detail::as_eigen(p.q).transpose();
    detail::as_eigen(s.k).noalias() = X * detail::as_eigen(p.k).transpose();
    detail::as_eigen(s.v).noalias() = X * detail::as_eigen(p.v).transpose();
    attend(sequences, seq, s);
    out_.forward(tp, matrix_view<const T>(s.o), p.o, {}, y);
  }

  // dy, dx: local_rows(sequences * seq) x hidden; dx overwritten.
  template <comm::communicator C>
  void backward_input(C& tp, std::int64_t sequences, std::int64_t seq, matrix_view<const T> dy,
                      attention_params<const T> p, matrix_view<T> dx, std::span<T> saved) {
    backward_input_overlapping(tp, sequences, seq, dy, p, dx, saved, 0, [](int) {});
  }

  // g += the gradients of this rank's shard. x as given to forward, dy as given to
  // backward_input, saved as they filled it.
  void backward_weight(std::int64_t sequences, std::int64_t seq, matrix_view<const T> x,
                       std::span<const T> saved, matrix_view<const T> dy,
                       attention_params<T> g) const {
    const parts<const T> s = carve(saved, sequences, seq);
    for (int k = 0; k < 4; ++k) weight_piece(k, 0, 1, sequences, seq, x, s, dy, g);
  }

  // Both backward passes, the input-gradient reduction overlapping the weight-gradient GEMMs.
  template <comm::communicator C>
  void backward(C& tp, std::int64_t sequences, std::int64_t seq, matrix_view<const T> x,
                matrix_view<const T> dy, attention_params<const T> p, matrix_view<T> dx,
                attention_params<T> g, std::span<T> saved) {
    const int p2 = tp.size();
    const int pieces = std::max(1, p2 == 1 ? 0 : (sp_ ? p2 - 1 : 2 * (p2 - 1)));
    backward_input_overlapping(tp, sequences, seq, dy, p, dx, saved, pieces, [&](int i) {
      const parts<const T> s = carve(std::span<const T>(saved), sequences, seq);
      for (int k = 0; k < 4; ++k) weight_piece(k, i, pieces, sequences, seq, x, s, dy, g);
    });
  }

 private:
  template <class U>
  struct parts {
    matrix_view<U> x;           // n x hidden, sequence parallel only
    matrix_view<U> q, k, v, o;  // n x (local heads or local KV heads) d
    std::span<U> probs;         // sequences x local heads x seq x seq
    matrix_view<U> dq, dk, dv;
    std::span<U> out;  // the output projection's saved buffer
  };

  static attention_shape checked(attention_shape s, int t, int r) {
    detail::check_tensor_rank(layer, t, r);
    if (s.hidden < 1 || s.heads < 1 || s.kv_heads < 1 || s.head_dim < 1)
      fail("pipit::tp::parallel_attention: hidden ", s.hidden, ", heads ", s.heads, ", kv_heads ",
           s.kv_heads, " and head_dim ", s.head_dim, " must all be at least 1");
    if (s.heads % s.kv_heads != 0)
      fail("pipit::tp::parallel_attention: ", s.heads, " query heads are not a multiple of ",
           s.kv_heads, " KV heads");
    if (s.kv_heads % t != 0)
      fail("pipit::tp::parallel_attention: the tensor size ", t, " does not divide the ",
           s.kv_heads, " KV heads (KV groups are kept whole: each rank needs KV heads / tensor ",
           "size of them; ", s.heads, " query heads)");
    return s;
  }

  void check_params(const attention_params<const T>& p) const {
    const std::int64_t d = s_.head_dim;
    detail::check_view(layer, p.q, local_heads() * d, s_.hidden, "the Wq shard");
    detail::check_view(layer, p.k, local_kv_heads() * d, s_.hidden, "the Wk shard");
    detail::check_view(layer, p.v, local_kv_heads() * d, s_.hidden, "the Wv shard");
    detail::check_view(layer, p.o, s_.hidden, local_heads() * d, "the Wo shard");
  }

  template <class U>
  parts<U> carve(std::span<U> saved, std::int64_t sequences, std::int64_t seq) const {
    if (sequences < 0 || seq < 0)
      fail("pipit::tp::parallel_attention: ", sequences, " sequences of ", seq, " tokens");
    detail::check_span(layer, saved, static_cast<std::int64_t>(saved_size(sequences, seq)),
                       "the saved buffer");
    const std::int64_t n = sequences * seq, qf = local_heads() * s_.head_dim,
                       kf = local_kv_heads() * s_.head_dim;
    detail::carve<U> c(saved);
    parts<U> s;
    s.x = c.take(sp_ ? n : 0, s_.hidden);
    s.q = c.take(n, qf);
    s.k = c.take(n, kf);
    s.v = c.take(n, kf);
    s.probs = c.take(sequences * local_heads() * seq * seq);
    s.o = c.take(n, qf);
    s.dq = c.take(n, qf);
    s.dk = c.take(n, kf);
    s.dv = c.take(n, kf);
    s.out = c.take(static_cast<std::int64_t>(out_.saved_size(n)));
    return s;
  }

  using mat = detail::row_major<T>;

  // P = softmax(Q_i K_g^T / sqrt(d)) (masked), O_i = P V_g, per sequence and local head.
  void attend(std::int64_t sequences, std::int64_t seq, const parts<T>& s) const {
    const std::int64_t d = s_.head_dim, per_kv = local_heads() / local_kv_heads();
    const T scale = T(1) / std::sqrt(static_cast<T>(d));
    auto Q = detail::as_eigen(s.q), K = detail::as_eigen(s.k), V = detail::as_eigen(s.v),
         O = detail::as_eigen(s.o);
    for (std::int64_t b = 0; b < sequences; ++b)
      for (std::int64_t i = 0; i < local_heads(); ++i) {
        const std::int64_t g = i / per_kv;
        auto P = probs(s, b, i, seq);
        P.noalias() =
            (Q.block(b * seq, i * d, seq, d) * K.block(b * seq, g * d, seq, d).transpose()) * scale;
        for (std::int64_t q = 0; q < seq; ++q) {
          const std::int64_t last = s_.causal ? q + 1 : seq;  // keys [0, last) are visible
          T m = -std::numeric_limits<T>::infinity();
          for (std::int64_t j = 0; j < last; ++j) m = std::max(m, P(q, j));
          T sum = 0;
          for (std::int64_t j = 0; j < last; ++j) sum += (P(q, j) = std::exp(P(q, j) - m));
          for (std::int64_t j = 0; j < last; ++j) P(q, j) /= sum;
          for (std::int64_t j = last; j < seq; ++j) P(q, j) = T(0);
        }
        O.block(b * seq, i * d, seq, d).noalias() = P * V.block(b * seq, g * d, seq, d);
      }
  }

  template <class U>
  static auto probs(const parts<U>& s, std::int64_t b, std::int64_t i, std::int64_t seq,
                    std::int64_t heads) {
    return detail::as_eigen(s.probs.subspan(static_cast<std::size_t>((b * heads + i) * seq * seq),
                                            static_cast<std::size_t>(seq * seq)),
                            seq, seq);
  }
  template <class U>
  auto probs(const parts<U>& s, std::int64_t b, std::int64_t i, std::int64_t seq) const {
    return probs(s, b, i, seq, local_heads());
  }

  // dO = dY Wo_r (the output projection's backward), then the attention backward per sequence
  // and head: dP = dO_i V_g^T, dV_g += P^T dO_i, dS = P * (dP - rowsum(dP * P)),
  // dQ_i = dS K_g / sqrt(d), dK_g += dS^T Q_i / sqrt(d); then dX = dQ Wq + dK Wk + dV Wv reduced
  // over the group while work(i) runs.
  template <comm::communicator C, class Work>
  void backward_input_overlapping(C& tp, std::int64_t sequences, std::int64_t seq,
                                  matrix_view<const T> dy, attention_params<const T> p,
                                  matrix_view<T> dx, std::span<T> saved, int pieces, Work&& work) {
    detail::check_group(layer, tp, t_, r_);
    const std::int64_t n = sequences * seq, d = s_.head_dim,
                       per_kv = local_heads() / local_kv_heads();
    check_params(p);
    detail::check_view(layer, dy, local_rows(n), s_.hidden, "the output gradient");
    detail::check_view(layer, dx, local_rows(n), s_.hidden, "the input gradient");
    const parts<T> s = carve(saved, sequences, seq);
    d_o_.resize(static_cast<std::size_t>(n * local_heads() * d));
    const matrix_view<T> d_o = make_view(d_o_.data(), n, local_heads() * d);
    out_.backward_input(tp, dy, p.o, d_o, s.out);

    const T scale = T(1) / std::sqrt(static_cast<T>(d));
    auto Q = detail::as_eigen(s.q), K = detail::as_eigen(s.k), V = detail::as_eigen(s.v);
    auto dQ = detail::as_eigen(s.dq), dK = detail::as_eigen(s.dk), dV = detail::as_eigen(s.dv);
    const auto dO = detail::as_eigen(d_o);
    dK.setZero();
    dV.setZero();
    mat dP(seq, seq);
    for (std::int64_t b = 0; b < sequences; ++b)
      for (std::int64_t i = 0; i < local_heads(); ++i) {
        const std::int64_t g = i / per_kv;
        const auto P = probs(s, b, i, seq);
        const auto dOi = dO.block(b * seq, i * d, seq, d);
        dP.noalias() = dOi * V.block(b * seq, g * d, seq, d).transpose();
        dV.block(b * seq, g * d, seq, d).noalias() += P.transpose() * dOi;
        for (std::int64_t q = 0; q < seq; ++q) {
          T dot = 0;
          for (std::int64_t j = 0; j < seq; ++j) dot += dP(q, j) * P(q, j);
          for (std::int64_t j = 0; j < seq; ++j) dP(q, j) = P(q, j) * (dP(q, j) - dot) * scale;
        }
        dQ.block(b * seq, i * d, seq, d).noalias() = dP * K.block(b * seq, g * d, seq, d);
        dK.block(b * seq, g * d, seq, d).noalias() +=
            dP.transpose() * Q.block(b * seq, i * d, seq, d);
      }

    partial_.resize(static_cast<std::size_t>(n * s_.hidden));
    const std::span<T> part(partial_);
    auto DX = detail::as_eigen(part, n, s_.hidden);
    DX.noalias() = dQ * detail::as_eigen(p.q);
    DX.noalias() += dK * detail::as_eigen(p.k);
    DX.noalias() += dV * detail::as_eigen(p.v);
    ring_collective<C, T> ring(tp, part, n, s_.hidden,
                               sp_ ? ring_mode::reduce_scatter : ring_mode::all_reduce);
    overlap_with(ring, pieces, std::forward<Work>(work));
    const std::int64_t first = sp_ ? row_block(n, t_, r_).begin : 0;
    detail::as_eigen(dx) = DX.middleRows(first, dx.rows);
  }

  // Piece i of `pieces` of weight-gradient GEMM k (0: Wq, 1: Wk, 2: Wv, 3: Wo).
  void weight_piece(int k, int i, int pieces, std::int64_t sequences, std::int64_t seq,
                    matrix_view<const T> x, const parts<const T>& s, matrix_view<const T> dy,
                    const attention_params<T>& g) const {
    const std::int64_t n = sequences * seq, d = s_.head_dim;
    detail::check_view(layer, g.q, local_heads() * d, s_.hidden, "the Wq gradient");
    detail::check_view(layer, g.k, local_kv_heads() * d, s_.hidden, "the Wk gradient");
    detail::check_view(layer, g.v, local_kv_heads() * d, s_.hidden, "the Wv gradient");
    const matrix_view<const T> xf = sp_ ? s.x : x;
    if (!sp_) detail::check_view(layer, x, n, s_.hidden, "the input");
    switch (k) {
      case 0:
        return detail::add_weight_grad_piece(g.q, s.dq, xf, i, pieces);
      case 1:
        return detail::add_weight_grad_piece(g.k, s.dk, xf, i, pieces);
      case 2:
        return detail::add_weight_grad_piece(g.v, s.dv, xf, i, pieces);
      default:
        out_.weight_piece(i, pieces, s.o, s.out, dy, g.o, {});
    }
  }

  attention_shape s_;
  int t_, r_;
  bool sp_;
  row_parallel_linear<T> out_;
  std::vector<T> d_o_;      // n x local heads d: the output projection's input gradient
  std::vector<T> partial_;  // n x hidden: this rank's dX partial, reduced in place
};

}  // namespace pipit::tp
