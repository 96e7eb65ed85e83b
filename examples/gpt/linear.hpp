#pragma once
// linear: y = W x + b for d_in x n inputs. The backward is split the zero-bubble way (Qi et al.,
// "Zero Bubble Pipeline Parallelism", ICLR 2024): B computes only dx = W^T dy, which the previous
// stage is waiting for; W computes dW += dy x^T, db += sum dy later, from the saved x and dy.

#include "matrix.hpp"

namespace gpt {

template <class T>
struct linear {
  matrix<T> w, d_w;  // d_out x d_in
  vector<T> b, d_b;  // d_out

  linear() = default;
  explicit linear(matrix<T> weight)
      : w(std::move(weight)),
        d_w(matrix<T>::Zero(w.rows(), w.cols())),
        b(vector<T>::Zero(w.rows())),
        d_b(vector<T>::Zero(w.rows())) {}

  Eigen::Index in() const noexcept { return w.cols(); }
  Eigen::Index out() const noexcept { return w.rows(); }

  void forward(cmap<T> x, map<T> y) const {
    product(x, y);
    add_bias(y);
  }
  // The two halves of forward, for a row-parallel layer (tensor parallelism): its partial
  // products are summed over the group before the (whole, replicated) bias is added once.
  void product(cmap<T> x, map<T> y) const { y.noalias() = w * x; }
  void add_bias(map<T> y) const { y.colwise() += b; }
  void backward_input(cmap<T> dy, map<T> dx) const { dx.noalias() = w.transpose() * dy; }
  void backward_weight(cmap<T> x, cmap<T> dy) {
    d_w.noalias() += dy * x.transpose();
    d_b += dy.rowwise().sum();
  }
};

}  // namespace gpt
