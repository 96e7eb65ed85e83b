#pragma once
// Eigen aliases the GPT example computes with. Activations are column-major hidden x tokens
// matrices: one column per token, so their memory is the row-major tokens x hidden layout that
// pipit's executor and vocabulary layers exchange (pipit::vocab::matrix_view).

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <span>

namespace gpt {

template <class T>
using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <class T>
using vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
template <class T>
using map = Eigen::Map<matrix<T>>;
template <class T>
using cmap = Eigen::Map<const matrix<T>>;

// A rows x cols view of `count = rows * cols` elements of a span starting at `offset`.
template <class T>
map<T> view(std::span<T> s, std::size_t offset, Eigen::Index rows, Eigen::Index cols) {
  return map<T>(s.data() + offset, rows, cols);
}
template <class T>
cmap<T> cview(std::span<const T> s, std::size_t offset, Eigen::Index rows, Eigen::Index cols) {
  return cmap<T>(s.data() + offset, rows, cols);
}
template <class T>
cmap<T> cview(std::span<T> s, std::size_t offset, Eigen::Index rows, Eigen::Index cols) {
  return cmap<T>(s.data() + offset, rows, cols);
}
template <class T>
cmap<T> as_const(const map<T>& m) {
  return cmap<T>(m.data(), m.rows(), m.cols());
}

// A parameter tensor and its gradient, as the optimizer and the data-parallel reduction see them.
template <class T>
struct parameter {
  std::span<T> value;
  std::span<T> grad;
  std::uint64_t key = 0;   // which tensor (config.hpp: tensor_key)
  std::size_t offset = 0;  // where `value` starts in the whole tensor (vocabulary shards)
};

}  // namespace gpt
