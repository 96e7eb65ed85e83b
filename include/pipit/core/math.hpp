#pragma once
// Integer helpers used on the host and inside kernels (vocabulary padding, chunking, grids).

#include <concepts>

#include "pipit/core/config.hpp"

namespace pipit {

// ceil(a / b) for a >= 0, b > 0.
template <std::integral T>
PIPIT_HOST_DEVICE constexpr T ceil_div(T a, T b) noexcept {
  return (a + b - 1) / b;
}

// The smallest multiple of b that is >= a, for a >= 0, b > 0.
template <std::integral T>
PIPIT_HOST_DEVICE constexpr T round_up(T a, T b) noexcept {
  return ceil_div(a, b) * b;
}

// [begin, end) of part `i` when `n` items are split into `parts` contiguous ranges whose sizes
// differ by at most one (the first n % parts ranges get the extra item).
template <std::integral T>
struct range {
  T begin;
  T end;
  PIPIT_HOST_DEVICE constexpr T size() const noexcept { return end - begin; }
  friend constexpr bool operator==(const range&, const range&) = default;
};

template <std::integral T>
PIPIT_HOST_DEVICE constexpr range<T> even_split(T n, T parts, T i) noexcept {
  const T base = n / parts;
  const T extra = n % parts;
  const T begin = i * base + (i < extra ? i : extra);
  return {begin, begin + base + (i < extra ? T(1) : T(0))};
}

}  // namespace pipit
