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

// How a parameter tensor is cut over a tensor-parallel group (tensor_group.hpp: place_shard).
//   replicated: every rank holds the whole tensor (layer norms, row-parallel biases, embeddings)
//   rows:       rank r holds row block r (fc1's weight and bias)
//   q_k_v_rows: rank r holds row block r of each of the three stacked thirds (qkv: its heads'
//               rows of Q, K and V)
//   cols:       rank r holds column block r (proj's and fc2's weights)
enum class tensor_split { replicated, rows, q_k_v_rows, cols };

// A parameter tensor and its gradient, as the optimizer and the data-parallel reduction see them.
template <class T>
struct parameter {
  std::span<T> value;
  std::span<T> grad;
  std::uint64_t key = 0;   // which tensor (config.hpp: tensor_key)
  std::size_t offset = 0;  // where `value` starts in the whole tensor (vocabulary shards)
  tensor_split split = tensor_split::replicated;
  std::int64_t rows = 0;  // rows of `value` as a column-major matrix (split tensors)
  int tensor_rank = 0, tensor_size = 1;
};

}  // namespace gpt
