#pragma once
// mlp: fc2(gelu(fc1(x))), d -> f -> d, with GELU's tanh approximation as in GPT-2
// (Hendrycks & Gimpel 2016): gelu(u) = u/2 (1 + tanh(c (u + 0.044715 u^3))), c = sqrt(2/pi).
// Forward saves the pre-activation u and gelu(u); B writes du for W.

#include <cmath>

#include "linear.hpp"
#include "matrix.hpp"

namespace gpt {

template <class T>
struct mlp {
  linear<T> fc1, fc2;

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

  // x, y: d x n; u, a: f x n (saved).
  void forward(cmap<T> x, map<T> y, map<T> u, map<T> a) const {
    fc1.forward(x, u);
    a = u.unaryExpr([](T v) { return gelu(v); });
    fc2.forward(as_const(a), y);
  }
  // du: f x n (kept for backward_weight).
  void backward_input(cmap<T> dy, cmap<T> u, map<T> du, map<T> dx) const {
    fc2.backward_input(dy, du);
    du.array() *= u.unaryExpr([](T v) { return gelu_grad(v); }).array();
    fc1.backward_input(as_const(du), dx);
  }
  void backward_weight(cmap<T> x, cmap<T> dy, cmap<T> a, cmap<T> du) {
    fc2.backward_weight(a, dy);
    fc1.backward_weight(x, du);
  }
};

}  // namespace gpt
