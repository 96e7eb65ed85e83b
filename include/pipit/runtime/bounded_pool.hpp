#pragma once
// bounded_pool: a fixed-capacity memory arena that refuses to exceed its capacity: the host
// stand-in for a device's memory, so that the layer-offload policy (layer_offload.hpp) runs and is
// tested against a real limit on any machine. One mapped region of `capacity` bytes; first-fit
// allocation over an ordered free list with coalescing on free; every block aligned to
// `alignment`. allocate() throws pipit::error naming the request, the bytes in use, the largest
// free range and the capacity when the request does not fit. Thread-safe.

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <span>
#include <utility>

#include "pipit/core/error.hpp"
#include "pipit/runtime/mapped_buffer.hpp"

namespace pipit::runtime {

class bounded_pool;

// A block of a bounded_pool, returned to it on destruction. Move-only.
class pool_block {
 public:
  pool_block() noexcept = default;
  pool_block(pool_block&& o) noexcept
      : pool_(std::exchange(o.pool_, nullptr)),
        data_(std::exchange(o.data_, nullptr)),
        size_(std::exchange(o.size_, 0)),
        reserved_(std::exchange(o.reserved_, 0)) {}
  pool_block& operator=(pool_block&& o) noexcept {
    if (this != &o) {
      reset();
      pool_ = std::exchange(o.pool_, nullptr);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      reserved_ = std::exchange(o.reserved_, 0);
    }
    return *this;
  }
  pool_block(const pool_block&) = delete;
  pool_block& operator=(const pool_block&) = delete;
  ~pool_block() { reset(); }

  inline void reset() noexcept;

  std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return data_ == nullptr; }

  template <class T>
  std::span<T> as(std::size_t count) const {
    PIPIT_REQUIRE(count * sizeof(T) <= size_, "pool_block: ", count, " elements of ", sizeof(T),
                  " bytes exceed the block's ", size_, " bytes");
    return {reinterpret_cast<T*>(data_), count};
  }

 private:
  friend class bounded_pool;
  pool_block(bounded_pool* p, std::byte* d, std::size_t size, std::size_t reserved) noexcept
      : pool_(p), data_(d), size_(size), reserved_(reserved) {}

  bounded_pool* pool_ = nullptr;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;      // bytes asked for
  std::size_t reserved_ = 0;  // bytes taken from the arena (rounded to the alignment)
};

class bounded_pool {
 public:
  explicit bounded_pool(std::size_t capacity, std::size_t alignment = 256)
      : alignment_(checked_alignment(alignment)),
        capacity_(capacity / alignment_ * alignment_),
        arena_(capacity_) {
    if (capacity_ > 0) free_.emplace(0, capacity_);
  }
  bounded_pool(const bounded_pool&) = delete;
  bounded_pool& operator=(const bounded_pool&) = delete;
  ~bounded_pool() = default;  // blocks must not outlive the pool

  // `bytes` (> 0) zero-filled bytes, or pipit::error if no free range is large enough.
  pool_block allocate(std::size_t bytes) {
    PIPIT_REQUIRE(bytes > 0, "bounded_pool: allocation of 0 bytes");
    const std::size_t need = (bytes + alignment_ - 1) / alignment_ * alignment_;
    std::lock_guard lk(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < need) continue;
      const std::size_t off = it->first, len = it->second;
      free_.erase(it);
      if (len > need) free_.emplace(off + need, len - need);
      in_use_ += need;
      peak_ = std::max(peak_, in_use_);
      std::memset(arena_.data() + off, 0, need);
      return pool_block(this, arena_.data() + off, bytes, need);
    }
    fail("bounded_pool: cannot allocate ", bytes, " bytes (", need, " aligned): ", in_use_, " of ",
         capacity_, " bytes in use, largest free range ", largest_free_locked(), " bytes");
  }

  std::size_t capacity() const noexcept { return capacity_; }
  std::size_t alignment() const noexcept { return alignment_; }
  std::size_t in_use() const {
    std::lock_guard lk(mu_);
    return in_use_;
  }
  std::size_t peak_in_use() const {
    std::lock_guard lk(mu_);
    return peak_;
  }
  std::size_t largest_free() const {
    std::lock_guard lk(mu_);
    return largest_free_locked();
  }
  void reset_peak() {
    std::lock_guard lk(mu_);
    peak_ = in_use_;
  }
  // Bytes an allocation of `bytes` takes from the arena.
  std::size_t footprint(std::size_t bytes) const noexcept {
    return (bytes + alignment_ - 1) / alignment_ * alignment_;
  }

 private:
  friend class pool_block;

  static std::size_t checked_alignment(std::size_t a) {
    PIPIT_REQUIRE(
        a >= alignof(std::max_align_t) && (a & (a - 1)) == 0 && a <= mapped_buffer::page_size(),
        "bounded_pool: alignment ", a, " must be a power of two in [", alignof(std::max_align_t),
        ", ", mapped_buffer::page_size(), "]");
    return a;
  }

  std::size_t largest_free_locked() const {
    std::size_t m = 0;
    for (const auto& [off, len] : free_) m = std::max(m, len);
    return m;
  }

  void release(std::byte* p, std::size_t reserved) noexcept {
    std::lock_guard lk(mu_);
    std::size_t off = static_cast<std::size_t>(p - arena_.data()), len = reserved;
    auto next = free_.lower_bound(off);
    if (next != free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == off) {
        off = prev->first;
        len += prev->second;
        free_.erase(prev);
      }
    }
    if (next != free_.end() && off + len == next->first) {
      len += next->second;
      free_.erase(next);
    }
    free_.emplace(off, len);
    in_use_ -= reserved;
  }

  std::size_t alignment_;
  std::size_t capacity_;
  mapped_buffer arena_;
  mutable std::mutex mu_;
  std::map<std::size_t, std::size_t> free_;  // offset -> length, disjoint, never adjacent
  std::size_t in_use_ = 0;
  std::size_t peak_ = 0;
};

inline void pool_block::reset() noexcept {
  if (pool_ != nullptr && data_ != nullptr) pool_->release(data_, reserved_);
  pool_ = nullptr;
  data_ = nullptr;
  size_ = reserved_ = 0;
}

}  // namespace pipit::runtime
