#pragma once
// layer_norm: y = gamma * (x - mean) / sqrt(var + eps) + beta over the hidden dimension of each
// token (Ba, Kiros, Hinton 2016). Forward saves the normalised input xhat and 1 / sigma per token,
// which is all the two backward passes need:
//   input:  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = gamma * dy
//   weight: dgamma += sum_tokens dy * xhat,  dbeta += sum_tokens dy

#include <cmath>

#include "matrix.hpp"

namespace gpt {

template <class T>
struct layer_norm {
  static constexpr double eps = 1e-5;
  vector<T> gamma, beta, d_gamma, d_beta;

  explicit layer_norm(Eigen::Index d = 0)
      : gamma(vector<T>::Ones(d)),
        beta(vector<T>::Zero(d)),
        d_gamma(vector<T>::Zero(d)),
        d_beta(vector<T>::Zero(d)) {}

  // x, y, xhat: d x n; rstd: 1 x n.
  void forward(cmap<T> x, map<T> y, map<T> xhat, map<T> rstd) const {
    const auto d = static_cast<T>(x.rows());
    for (Eigen::Index t = 0; t < x.cols(); ++t) {
      const T mean = x.col(t).sum() / d;
      const T var = (x.col(t).array() - mean).square().sum() / d;
      const T r = T(1) / std::sqrt(var + static_cast<T>(eps));
      rstd(0, t) = r;
      xhat.col(t) = (x.col(t).array() - mean) * r;
      y.col(t) = xhat.col(t).cwiseProduct(gamma) + beta;
    }
  }

  void backward_input(cmap<T> dy, cmap<T> xhat, cmap<T> rstd, map<T> dx) const {
    const auto d = static_cast<T>(dy.rows());
    for (Eigen::Index t = 0; t < dy.cols(); ++t) {
      const auto g = dy.col(t).cwiseProduct(gamma);  // dxhat
      const T mean_g = g.sum() / d;
      const T mean_gx = g.dot(xhat.col(t)) / d;
      dx.col(t) = rstd(0, t) * (g.array() - mean_g - xhat.col(t).array() * mean_gx).matrix();
    }
  }

  void backward_weight(cmap<T> dy, cmap<T> xhat) {
    d_gamma += dy.cwiseProduct(xhat).rowwise().sum();
    d_beta += dy.rowwise().sum();
  }
};

}  // namespace gpt
