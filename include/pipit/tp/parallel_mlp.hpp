#pragma once
// parallel_mlp<T>: the transformer MLP split on its inner dimension (Megatron-LM, Shoeybi et
// al., arXiv 1909.08053, section 3, figure 3a): Y = GELU(X W1^T + b1) W2^T + b2 with W1
// (ffn x hidden) column-parallel and W2 (hidden x ffn) row-parallel, so the only communication
// is f before and g after: one all-reduce forward, one backward (with sequence parallelism an
// all-gather and a reduce-scatter each way). GELU is the tanh form (Hendrycks and Gimpel,
// arXiv 1606.08415), elementwise on this rank's ffn / t features.
//
// Passes: forward, backward_input (writes dZ1 into `saved` for the weight pass), backward_weight,
// and backward, in which the input-gradient reduction of the first layer is in flight during the
// weight-gradient GEMMs of both layers. Weight gradients accumulate (+=). Host only (Eigen).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/tp/column_parallel_linear.hpp"
#include "pipit/tp/linear_options.hpp"
#include "pipit/tp/matrix.hpp"
#include "pipit/tp/row_parallel_linear.hpp"

namespace pipit::tp {

// The MLP's parameters (or their gradients): fc1 (ffn x hidden) and its bias (ffn), fc2
// (hidden x ffn) and its bias (hidden). A rank's shard: shard() of the full ones.
template <class U>
struct mlp_params {
  matrix_view<U> fc1;
  std::span<U> fc1_bias;
  matrix_view<U> fc2;
  std::span<U> fc2_bias;
  template <class V = U>
  requires(!std::is_const_v<V>) operator mlp_params<const V>() const {
    return {fc1, fc1_bias, fc2, fc2_bias};
  }
};

// GELU, tanh approximation, and its derivative.
template <class T>
T gelu(T z) {
  const T c = T(0.7978845608028654);  // sqrt(2 / pi)
  return T(0.5) * z * (T(1) + std::tanh(c * (z + T(0.044715) * z * z * z)));
}
template <class T>
T gelu_grad(T z) {
  const T c = T(0.7978845608028654);
  const T th = std::tanh(c * (z + T(0.044715) * z * z * z));
  return T(0.5) * (T(1) + th) +
         T(0.5) * z * (T(1) - th * th) * c * (T(1) + T(3 * 0.044715) * z * z);
}

template <class T>
class parallel_mlp {
  static constexpr const char* layer = "parallel_mlp";

 public:
  using value_type = T;

  parallel_mlp(std::int64_t hidden, std::int64_t ffn, int tensor_size, int tensor_rank,
               linear_options opt = {})
      : fc1_(hidden, ffn, tensor_size, tensor_rank, opt),
        fc2_(ffn, hidden, tensor_size, tensor_rank, opt) {}

  std::int64_t hidden() const noexcept { return fc1_.in_features(); }
  std::int64_t ffn() const noexcept { return fc1_.out_features(); }
  std::int64_t local_ffn() const noexcept { return fc1_.local_out(); }
  const column_parallel_linear<T>& fc1() const noexcept { return fc1_; }
  const row_parallel_linear<T>& fc2() const noexcept { return fc2_; }
  // Rows of this rank's input, output and their gradients (its row block with sequence
  // parallelism).
  std::int64_t local_rows(std::int64_t tokens) const noexcept { return fc1_.input_rows(tokens); }
  // Elements of `saved`: fc1's gathered input (sequence parallel), Z1, GELU(Z1), dZ1, fc2's
  // gathered output gradient (sequence parallel).
  std::size_t saved_size(std::int64_t tokens) const noexcept {
    return fc1_.saved_size(tokens) + 3 * static_cast<std::size_t>(tokens * local_ffn()) +
           fc2_.saved_size(tokens);
  }

  // This rank's shard of the full parameters; fc2_bias is replicated (the whole of it).
  template <class U>
  mlp_params<U> shard(mlp_params<U> full) const {
    return {fc1_.weight_shard(full.fc1),
            fc1_.options().bias ? fc1_.bias_shard(full.fc1_bias) : std::span<U>{},
            fc2_.weight_shard(full.fc2), full.fc2_bias};
  }

  // tokens: rows of the whole microbatch; x, y: local_rows(tokens) x hidden; p: this rank's
  // shard; saved: saved_size(tokens).
  template <comm::communicator C>
  void forward(C& tp, std::int64_t tokens, matrix_view<const T> x, mlp_params<const T> p,
               matrix_view<T> y, std::span<T> saved) {
    const parts<T> s = carve(saved, tokens);
    fc1_.forward(tp, x, p.fc1, p.fc1_bias, s.z1, s.fc1);
    for (std::int64_t i = 0; i < tokens; ++i)
      for (std::int64_t j = 0; j < local_ffn(); ++j) s.a1(i, j) = gelu(s.z1(i, j));
    fc2_.forward(tp, matrix_view<const T>(s.a1), p.fc2, p.fc2_bias, y);
  }

  // dy, dx: local_rows(tokens) x hidden; dx overwritten.
  template <comm::communicator C>
  void backward_input(C& tp, std::int64_t tokens, matrix_view<const T> dy, mlp_params<const T> p,
                      matrix_view<T> dx, std::span<T> saved) {
    const parts<T> s = dz1(tp, tokens, dy, p, saved);
    fc1_.backward_input(tp, matrix_view<const T>(s.dz1), p.fc1, dx);
  }

  // g += the parameter gradients (g: this rank's shard of the gradients). x as given to
  // forward, dy as given to backward_input, saved as they filled it.
  void backward_weight(std::int64_t tokens, matrix_view<const T> x, std::span<const T> saved,
                       matrix_view<const T> dy, mlp_params<T> g) const {
    const parts<const T> s = carve(saved, tokens);
    fc2_.backward_weight(s.a1, s.fc2, dy, g.fc2, g.fc2_bias);
    fc1_.backward_weight(x, s.fc1, s.dz1, g.fc1, g.fc1_bias);
  }

  // Both backward passes; fc1's input-gradient reduction overlaps both weight-gradient GEMMs.
  template <comm::communicator C>
  void backward(C& tp, std::int64_t tokens, matrix_view<const T> x, matrix_view<const T> dy,
                mlp_params<const T> p, matrix_view<T> dx, mlp_params<T> g, std::span<T> saved) {
    const parts<T> s = dz1(tp, tokens, dy, p, saved);
    const int pieces = std::max(1, fc1_.ring_steps(tp));
    fc1_.backward_input_overlapping(tp, matrix_view<const T>(s.dz1), p.fc1, dx, pieces, [&](int i) {
      fc2_.weight_piece(i, pieces, matrix_view<const T>(s.a1), s.fc2, dy, g.fc2, g.fc2_bias);
      fc1_.weight_piece(i, pieces, x, s.fc1, matrix_view<const T>(s.dz1), g.fc1, g.fc1_bias);
    });
  }

 private:
  template <class U>
  struct parts {
    std::span<U> fc1;
    matrix_view<U> z1, a1, dz1;
    std::span<U> fc2;
  };

  template <class U>
  parts<U> carve(std::span<U> saved, std::int64_t tokens) const {
    if (tokens < 0) fail("pipit::tp::parallel_mlp: ", tokens, " tokens");
    detail::check_span(layer, saved, static_cast<std::int64_t>(saved_size(tokens)),
                       "the saved buffer");
    detail::carve<U> c(saved);
    parts<U> s;
    s.fc1 = c.take(static_cast<std::int64_t>(fc1_.saved_size(tokens)));
    s.z1 = c.take(tokens, local_ffn());
    s.a1 = c.take(tokens, local_ffn());
    s.dz1 = c.take(tokens, local_ffn());
    s.fc2 = c.take(static_cast<std::int64_t>(fc2_.saved_size(tokens)));
    return s;
  }

  // dZ1 = (dY W2) * GELU'(Z1), into saved.
  template <comm::communicator C>
  parts<T> dz1(C& tp, std::int64_t tokens, matrix_view<const T> dy, mlp_params<const T> p,
               std::span<T> saved) {
    const parts<T> s = carve(saved, tokens);
    fc2_.backward_input(tp, dy, p.fc2, s.dz1, s.fc2);
    for (std::int64_t i = 0; i < tokens; ++i)
      for (std::int64_t j = 0; j < local_ffn(); ++j) s.dz1(i, j) *= gelu_grad(s.z1(i, j));
    return s;
  }

  column_parallel_linear<T> fc1_;
  row_parallel_linear<T> fc2_;
};

}  // namespace pipit::tp
