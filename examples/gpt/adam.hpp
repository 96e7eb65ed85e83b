#pragma once
// adam: Adam with decoupled weight decay (Kingma & Ba, ICLR 2015; Loshchilov & Hutter, ICLR 2019)
// over the parameters a stage holds. Each rank steps its own parameters; with the same gradients
// every partition of the model takes the same step.

#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include "matrix.hpp"
#include "pipit/core/error.hpp"

namespace gpt {

struct adam_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.0;  // decoupled: p -= lr * wd * p
};

template <class T>
class adam {
 public:
  adam(std::span<const parameter<T>> params, adam_options o) : o_(o) {
    if (!(o.lr > 0)) pipit::fail("gpt::adam: lr must be > 0 (got ", o.lr, ")");
    if (!(o.beta1 >= 0 && o.beta1 < 1) || !(o.beta2 >= 0 && o.beta2 < 1))
      pipit::fail("gpt::adam: betas must be in [0, 1) (got ", o.beta1, ", ", o.beta2, ")");
    if (!(o.eps > 0)) pipit::fail("gpt::adam: eps must be > 0 (got ", o.eps, ")");
    for (const auto& p : params) {
      m_.emplace_back(p.value.size(), T(0));
      v_.emplace_back(p.value.size(), T(0));
    }
  }

  // One update from the accumulated gradients, which it then zeroes.
  void step(std::span<const parameter<T>> params) {
    if (params.size() != m_.size())
      pipit::fail("gpt::adam: ", params.size(), " parameters, the optimizer was made for ",
                  m_.size());
    ++t_;
    const double c1 = 1 - std::pow(o_.beta1, static_cast<double>(t_));
    const double c2 = 1 - std::pow(o_.beta2, static_cast<double>(t_));
    const T b1 = static_cast<T>(o_.beta1), b2 = static_cast<T>(o_.beta2);
    const T step = static_cast<T>(o_.lr / c1), decay = static_cast<T>(o_.lr * o_.weight_decay);
    const T inv_c2 = static_cast<T>(1 / c2), eps = static_cast<T>(o_.eps);
    for (std::size_t i = 0; i < params.size(); ++i) {
      T* p = params[i].value.data();
      T* g = params[i].grad.data();
      T* m = m_[i].data();
      T* v = v_[i].data();
      for (std::size_t j = 0; j < m_[i].size(); ++j) {
        m[j] = b1 * m[j] + (T(1) - b1) * g[j];
        v[j] = b2 * v[j] + (T(1) - b2) * g[j] * g[j];
        p[j] -= step * m[j] / (std::sqrt(v[j] * inv_c2) + eps) + decay * p[j];
        g[j] = T(0);
      }
    }
  }

  std::size_t state_bytes() const {
    std::size_t b = 0;
    for (const auto& m : m_) b += 2 * m.size() * sizeof(T);
    return b;
  }

 private:
  adam_options o_;
  std::size_t t_ = 0;
  std::vector<std::vector<T>> m_, v_;
};

}  // namespace gpt
