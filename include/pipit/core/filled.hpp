#pragma once
// filled(n, value): a std::vector of n copies of value that also works in constant expressions
// under clang with libstdc++ 12, whose sized constructor, resize and assign on trivial types
// fill uninitialized storage in a way clang's constant evaluator rejects ("assignment to object
// outside its lifetime"). At run time it is the ordinary sized constructor.

#include <cstddef>
#include <type_traits>
#include <vector>

namespace pipit {

template <class T>
constexpr std::vector<T> filled(std::size_t n, const T& value) {
  if (std::is_constant_evaluated()) {
    std::vector<T> v;
    v.reserve(n);
    for (std::size_t i = 0; i < n; ++i) v.push_back(value);
    return v;
  }
  return std::vector<T>(n, value);
}

}  // namespace pipit
