#pragma once
// Matrices of the tensor-parallel layers: the vocabulary layers' matrix_view (row-major pointer,
// rows, cols, row stride), with the Eigen maps, shape checks, shard views and the carving of a
// stage's `saved` span that the layers share.

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

#include "pipit/core/error.hpp"
#include "pipit/core/math.hpp"
#include "pipit/vocab/matrix_view.hpp"

namespace pipit::tp {

using vocab::make_view;
using vocab::matrix_view;

// Columns [first, first + count) of m as a view (a row-parallel weight shard of a full weight).
template <class T>
constexpr matrix_view<T> column_block(matrix_view<T> m, std::int64_t first,
                                      std::int64_t count) noexcept {
  return {m.data + first, m.rows, count, m.ld()};
}

namespace detail {

template <class T>
using row_major =
    Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using eigen_map =
    Eigen::Map<std::conditional_t<std::is_const_v<T>, const row_major<T>, row_major<T>>,
               Eigen::Unaligned, Eigen::OuterStride<>>;

template <class T>
eigen_map<T> as_eigen(matrix_view<T> v) {
  return eigen_map<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.ld()));
}
template <class T>
eigen_map<T> as_eigen(std::span<T> s, std::int64_t rows, std::int64_t cols) {
  return eigen_map<T>(s.data(), rows, cols, Eigen::OuterStride<>(cols));
}
template <class T>
Eigen::Map<std::conditional_t<std::is_const_v<T>,
                              const Eigen::Matrix<std::remove_const_t<T>, 1, Eigen::Dynamic>,
                              Eigen::Matrix<std::remove_const_t<T>, 1, Eigen::Dynamic>>>
as_row(std::span<T> s) {
  return {s.data(), static_cast<Eigen::Index>(s.size())};
}

template <class T>
void check_view(const char* layer, const matrix_view<T>& v, std::int64_t rows, std::int64_t cols,
                const char* what) {
  if (v.rows != rows || v.cols != cols)
    fail("pipit::tp::", layer, ": ", what, " is ", v.rows, " x ", v.cols, ", expected ", rows,
         " x ", cols);
  if (v.ld() < v.cols)
    fail("pipit::tp::", layer, ": ", what, " has row stride ", v.ld(), " < ", v.cols);
  if (v.data == nullptr && rows * cols > 0) fail("pipit::tp::", layer, ": ", what, " has no data");
}
template <class T>
void check_span(const char* layer, std::span<T> s, std::int64_t size, const char* what) {
  if (static_cast<std::int64_t>(s.size()) != size)
    fail("pipit::tp::", layer, ": ", what, " has ", s.size(), " elements, expected ", size);
}

// dw[rows of piece i] += dy[:, those columns]^T x: piece i of `pieces` of a weight-gradient GEMM
// (dw: n x k, dy: m x n, x: m x k), split by the rows of dw (row_block) so that the pieces of
// one GEMM can run between the steps of a ring.
template <class T>
void add_weight_grad_piece(matrix_view<T> dw, matrix_view<const T> dy, matrix_view<const T> x,
                           int i, int pieces) {
  const auto rows = even_split<std::int64_t>(dw.rows, pieces, i);
  if (rows.size() == 0) return;
  as_eigen(dw).middleRows(rows.begin, rows.size()).noalias() +=
      as_eigen(dy).middleCols(rows.begin, rows.size()).transpose() * as_eigen(x);
}

// Hands out consecutive pieces of a stage's `saved` span, in the order a layer lays them out.
template <class T>
class carve {
 public:
  explicit carve(std::span<T> all) : all_(all) {}
  std::span<T> take(std::int64_t n) {
    const auto k = static_cast<std::size_t>(n);
    if (used_ + k > all_.size())
      fail("pipit::tp: the saved buffer has ", all_.size(), " elements, too few for this layer");
    const std::span<T> s = all_.subspan(used_, k);
    used_ += k;
    return s;
  }
  matrix_view<T> take(std::int64_t rows, std::int64_t cols) {
    return make_view(take(rows * cols).data(), rows, cols);
  }

 private:
  std::span<T> all_;
  std::size_t used_ = 0;
};

}  // namespace detail
}  // namespace pipit::tp
