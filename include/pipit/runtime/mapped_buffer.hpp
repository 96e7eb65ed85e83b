#pragma once
// mapped_buffer: an owning, page-aligned byte buffer whose memory goes back to the operating
// system when it is destroyed. The weight window and the bounded pool hold their weights in
// these, so that "resident weight memory" means what the process's RSS says: glibc's malloc keeps
// freed large chunks in its heap once its dynamic mmap threshold has grown, and a freed block
// would then still count. On POSIX systems the buffer is an anonymous private mapping (munmap on
// release); elsewhere it falls back to aligned operator new, which makes no such promise.

#include <cstddef>
#include <cstring>
#include <new>
#include <utility>

#include "pipit/core/error.hpp"

#if __has_include(<sys/mman.h>) && __has_include(<unistd.h>)
#include <sys/mman.h>
#include <unistd.h>
#define PIPIT_MAPPED_BUFFER_MMAP 1
#else
#define PIPIT_MAPPED_BUFFER_MMAP 0
#endif

namespace pipit::runtime {

class mapped_buffer {
 public:
  static constexpr std::size_t fallback_alignment = 4096;

  mapped_buffer() noexcept = default;

  // At least `bytes` bytes (rounded up to whole pages), zero-filled.
  explicit mapped_buffer(std::size_t bytes) {
    if (bytes == 0) return;
    const std::size_t page = page_size();
    capacity_ = (bytes + page - 1) / page * page;
#if PIPIT_MAPPED_BUFFER_MMAP
    void* p =
        ::mmap(nullptr, capacity_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      capacity_ = 0;
      fail("mapped_buffer: mmap of ", bytes, " bytes failed");
    }
    data_ = static_cast<std::byte*>(p);
#else
    data_ =
        static_cast<std::byte*>(::operator new (capacity_, std::align_val_t{fallback_alignment}));
    std::memset(data_, 0, capacity_);
#endif
    size_ = bytes;
  }

  mapped_buffer(mapped_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)),
        size_(std::exchange(o.size_, 0)),
        capacity_(std::exchange(o.capacity_, 0)) {}
  mapped_buffer& operator=(mapped_buffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      capacity_ = std::exchange(o.capacity_, 0);
    }
    return *this;
  }
  mapped_buffer(const mapped_buffer&) = delete;
  mapped_buffer& operator=(const mapped_buffer&) = delete;
  ~mapped_buffer() {
    reset();
  }

  void reset() noexcept {
    if (data_ == nullptr) return;
#if PIPIT_MAPPED_BUFFER_MMAP
    ::munmap(data_, capacity_);
#else
    ::operator delete (data_, std::align_val_t{fallback_alignment});
#endif
    data_ = nullptr;
    size_ = capacity_ = 0;
  }

  std::byte* data() noexcept {
    return data_;
  }
  const std::byte* data() const noexcept {
    return data_;
  }
  std::size_t size() const noexcept {
    return size_;
  }  // bytes asked for
  std::size_t capacity() const noexcept {
    return capacity_;
  }  // bytes mapped (whole pages)
  bool empty() const noexcept {
    return data_ == nullptr;
  }

  static std::size_t page_size() noexcept {
#if PIPIT_MAPPED_BUFFER_MMAP
    const long p = ::sysconf(_SC_PAGESIZE);
    return p > 0 ? static_cast<std::size_t>(p) : fallback_alignment;
#else
    return fallback_alignment;
#endif
  }

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

}  // namespace pipit::runtime
