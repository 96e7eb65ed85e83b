#pragma once
// matrix_view<T>: a non-owning row-major matrix (pointer, rows, cols, row stride) in which the
// vocabulary layers take activations, weights and gradients. T may be const. A row stride
// larger than cols lets a view address a column block of a wider buffer, e.g. the [n, h + 1]
// broadcast buffer of vocabulary parallelism that carries X with g appended as a last column.

#include <cstdint>
#include <type_traits>

#include "pipit/core/config.hpp"

namespace pipit::vocab {

template <class T>
struct matrix_view {
  T* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t stride = 0;  // elements from one row to the next; 0 means cols

  PIPIT_HOST_DEVICE constexpr std::int64_t ld() const noexcept { return stride ? stride : cols; }
  PIPIT_HOST_DEVICE constexpr T* row(std::int64_t i) const noexcept { return data + i * ld(); }
  PIPIT_HOST_DEVICE constexpr T& operator()(std::int64_t i, std::int64_t j) const noexcept {
    return data[i * ld() + j];
  }
  // Rows [first, first + count) as a view.
  PIPIT_HOST_DEVICE constexpr matrix_view block_rows(std::int64_t first,
                                                     std::int64_t count) const noexcept {
    return {row(first), count, cols, ld()};
  }
  // A view of mutable elements converts to a view of const ones.
  template <class U = T>
  requires(!std::is_const_v<U>) PIPIT_HOST_DEVICE constexpr operator matrix_view<const U>()
      const noexcept {
    return {data, rows, cols, stride};
  }
};

// make_view(ptr, rows, cols[, stride]) deduces the element type (const-ness included).
template <class T>
PIPIT_HOST_DEVICE constexpr matrix_view<T> make_view(T* data, std::int64_t rows, std::int64_t cols,
                                                     std::int64_t stride = 0) noexcept {
  return {data, rows, cols, stride};
}

// The accumulation type of an input element type: double for double, float otherwise (float,
// bfloat16, half). Gradients and statistics are held in it.
template <class T>
using accum_t = std::conditional_t<std::is_same_v<std::remove_cv_t<T>, double>, double, float>;

}  // namespace pipit::vocab
