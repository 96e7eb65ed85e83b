#pragma once
// mlp: fc2(gelu(fc1(x))), d -> f -> d, with GELU's tanh approximation as in GPT-2
// (Hendrycks & Gimpel 2016): gelu(u) = u/2 (1 + tanh(c (u + 0.044715 u^3))), c = sqrt(2/pi).
// Forward saves the pre-activation u and gelu(u); B writes du for W.
//
// Tensor parallelism (Megatron-LM, Shoeybi et al., arXiv 1909.08053, section 3, figure 3a): rank r
// of a group of t holds row block r of fc1 (and of its bias: column parallel, so GELU applies to
// its own columns of the inner activation with no communication) and column block r of fc2 (row
// parallel): fc2's partial outputs are summed over the group (g) before its whole bias is added
// once; fc1's partial input gradients are summed in the backward (f's backward).

#include <cmath>
#include <cstddef>
#include <span>

#include "linear.hpp"
#include "matrix.hpp"
#include "tensor_group.hpp"

namespace gpt {

template <class T>
struct mlp {
  linear<T> fc1, fc2;  // this rank's shards: f/t x d and d x f/t
  tensor_group<T> tp;  // t = 1: the whole layer, no communication

  static T gelu(T u) {
    const T c = static_cast<T>(0.7978845608028654);  // sqrt(2 / pi)
    return T(0.5) * u * (T(1) + std::tanh(c * (u + T(0.044715) * u * u * u)));
  }
  static T gelu_grad(T u) {
    const T c = static_cast<T>(0.7978845608028654);
    const T t = std::tanh(c * (u + T(0.044715) * u * u * u));
    return T(0.5) * (T(1) + t) +
           T(0.5) * u * (T(1) - t * t) * c * (T(1) + T(3) * T(0.044715) * u * u);
  }

  // x, y: d x n; u, a: f/t x n (saved).
  void forward(cmap<T> x, map<T> y, map<T> u, map<T> a) const {
    fc1.forward(x, u);
    a = u.unaryExpr([](T v) { return gelu(v); });
    fc2.product(as_const(a), y);
    tp.all_reduce(std::span<T>(y.data(), static_cast<std::size_t>(y.size())));  // g
    fc2.add_bias(y);
  }
  // du: f/t x n (kept for backward_weight).
  void backward_input(cmap<T> dy, cmap<T> u, map<T> du, map<T> dx) const {
    fc2.backward_input(dy, du);
    du.array() *= u.unaryExpr([](T v) { return gelu_grad(v); }).array();
    fc1.backward_input(as_const(du), dx);
    tp.all_reduce(std::span<T>(dx.data(), static_cast<std::size_t>(dx.size())));  // f's backward
  }
  void backward_weight(cmap<T> x, cmap<T> dy, cmap<T> a, cmap<T> du) {
    fc2.backward_weight(a, dy);
    fc1.backward_weight(x, du);
  }
};

}  // namespace gpt
