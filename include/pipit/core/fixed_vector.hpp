#pragma once
// fixed_vector<T, Capacity>: a vector with its storage inline, usable in constant expressions
// and as the member of a constexpr variable (std::vector can only be used transiently there).
// Plans made at compile time are stored in these.

#include <array>
#include <cstddef>
#include <initializer_list>
#include <type_traits>

#include "pipit/core/error.hpp"

namespace pipit {

template <class T, std::size_t Capacity>
class fixed_vector {
  static_assert(Capacity > 0, "pipit::fixed_vector: Capacity must be at least 1");
  static_assert(std::is_default_constructible_v<T>,
                "pipit::fixed_vector: T must be default-constructible (storage is inline)");

 public:
  using value_type = T;
  using size_type = std::size_t;
  using iterator = T*;
  using const_iterator = const T*;

  constexpr fixed_vector() = default;
  constexpr fixed_vector(std::initializer_list<T> init) {
    for (const T& x : init) push_back(x);
  }

  static constexpr size_type capacity() noexcept { return Capacity; }
  constexpr size_type size() const noexcept { return size_; }
  constexpr bool empty() const noexcept { return size_ == 0; }

  constexpr void push_back(const T& x) {
    // Throwing is not a constant expression, so overflow at compile time is a compile error.
    if (size_ == Capacity) fail("pipit::fixed_vector: capacity ", Capacity, " exceeded");
    data_[size_++] = x;
  }
  constexpr void pop_back() {
    if (size_ == 0) fail("pipit::fixed_vector: pop_back on an empty vector");
    --size_;
  }
  constexpr void clear() noexcept { size_ = 0; }

  constexpr T& operator[](size_type i) noexcept { return data_[i]; }
  constexpr const T& operator[](size_type i) const noexcept { return data_[i]; }
  constexpr T& at(size_type i) {
    if (i >= size_) fail("pipit::fixed_vector: index ", i, " out of range (size ", size_, ")");
    return data_[i];
  }
  constexpr const T& at(size_type i) const {
    if (i >= size_) fail("pipit::fixed_vector: index ", i, " out of range (size ", size_, ")");
    return data_[i];
  }
  constexpr T& back() { return at(size_ - 1); }
  constexpr const T& back() const { return at(size_ - 1); }

  constexpr T* data() noexcept { return data_.data(); }
  constexpr const T* data() const noexcept { return data_.data(); }
  constexpr iterator begin() noexcept { return data_.data(); }
  constexpr iterator end() noexcept { return data_.data() + size_; }
  constexpr const_iterator begin() const noexcept { return data_.data(); }
  constexpr const_iterator end() const noexcept { return data_.data() + size_; }

  friend constexpr bool operator==(const fixed_vector& a, const fixed_vector& b) {
    if (a.size_ != b.size_) return false;
    for (size_type i = 0; i < a.size_; ++i)
      if (!(a.data_[i] == b.data_[i])) return false;
    return true;
  }

 private:
  std::array<T, Capacity> data_{};
  size_type size_ = 0;
};

}  // namespace pipit
