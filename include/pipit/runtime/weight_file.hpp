#pragma once
// pipit's weight-block file: the weights of one block (half a transformer layer, attention or
// MLP, as TPI-LLM streams them: Li et al., arXiv 2410.00531, §"sliding window memory
// scheduling") in one self-checking file. Format version 1, all integers little-endian:
//
//   offset      bytes  field
//   0           8      magic "PIPITWB\0"
//   8           4      version (1)
//   12          4      dtype: 1 = float32, 2 = float64
//   16          4      tensor count n (1 .. 4096)
//   20          4      reserved, 0
//   24          8      payload offset P (a multiple of 64, >= 32 + 48·n)
//   32          48·n   tensor table, one entry per tensor:
//                        4 rank r (1 .. 4), 4 reserved (0), 4 × 8 dims (unused ones 1),
//                        8 offset of the tensor's first element from P (a multiple of 64)
//   ...                zero padding up to P
//   P           S      payload: the tensors, row-major, each at its offset, zero padding between
//   P + S       8      checksum: FNV-1a 64 over bytes [0, P + S) taken as 64-bit little-endian
//                      words (P and S are multiples of 64, so the words are whole)
//
// S is the end of the last tensor rounded up to 64. The file is exactly P + S + 8 bytes: a
// shorter one is refused as truncated before anything is allocated. Readers check every field
// and the checksum and name the file and the values in pipit::error.

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <ios>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/runtime/mapped_buffer.hpp"

namespace pipit::runtime {

static_assert(std::endian::native == std::endian::little,
              "pipit's weight files are little-endian and read without byte swapping: a "
              "big-endian host needs a swapping reader");

inline constexpr std::array<char, 8> weight_file_magic{'P', 'I', 'P', 'I', 'T', 'W', 'B', '\0'};
inline constexpr std::uint32_t weight_file_version = 1;
inline constexpr std::size_t weight_file_alignment = 64;
inline constexpr std::uint32_t weight_file_max_tensors = 4096;
inline constexpr int weight_file_max_rank = 4;

enum class weight_dtype : std::uint32_t { f32 = 1, f64 = 2 };

constexpr std::size_t dtype_bytes(weight_dtype d) noexcept {
  return d == weight_dtype::f64 ? 8 : 4;
}

template <class T>
constexpr weight_dtype dtype_of() noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "weight files hold float (f32) or double (f64) tensors");
  return std::is_same_v<T, float> ? weight_dtype::f32 : weight_dtype::f64;
}

struct weight_tensor_info {
  int rank = 1;
  std::array<std::uint64_t, weight_file_max_rank> dims{1, 1, 1, 1};
  std::uint64_t offset = 0;  // bytes from the payload's start

  std::uint64_t elements() const noexcept {
    std::uint64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[static_cast<std::size_t>(i)];
    return n;
  }
};

struct weight_file_info {
  weight_dtype dtype = weight_dtype::f32;
  std::vector<weight_tensor_info> tensors;
  std::uint64_t payload_offset = 0;
  std::uint64_t payload_bytes = 0;

  std::uint64_t file_bytes() const noexcept { return payload_offset + payload_bytes + 8; }
};

namespace detail {

constexpr std::uint64_t fnv_offset = 14695981039346656037ull;
constexpr std::uint64_t fnv_prime = 1099511628211ull;

// FNV-1a over 64-bit words: one multiply per 8 bytes, so that checking a block costs little next
// to reading it. `bytes` must be a multiple of 8.
inline std::uint64_t fnv1a_words(std::uint64_t h, const std::byte* p, std::size_t bytes) noexcept {
  for (std::size_t i = 0; i < bytes; i += 8) {
    std::uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * fnv_prime;
  }
  return h;
}

constexpr std::uint64_t round_up(std::uint64_t x, std::uint64_t a) noexcept {
  return (x + a - 1) / a * a;
}

struct file_closer {
  void operator()(std::FILE* f) const noexcept { std::fclose(f); }
};
using file_handle = std::unique_ptr<std::FILE, file_closer>;

inline file_handle open_file(const std::filesystem::path& path, const char* mode) {
  file_handle f(std::fopen(path.string().c_str(), mode));
  if (!f) fail("weight file ", path, ": cannot open (mode ", mode, ")");
  return f;
}

template <class U>
U load_le(const std::byte* p) noexcept {
  U v;
  std::memcpy(&v, p, sizeof(U));
  return v;
}
template <class U>
void store_le(std::byte* p, U v) noexcept {
  std::memcpy(p, &v, sizeof(U));
}

constexpr std::size_t fixed_header_bytes = 32;
constexpr std::size_t table_entry_bytes = 48;

}  // namespace detail

// One tensor to write: its shape and its values (row-major).
template <class T>
struct weight_tensor {
  std::vector<std::uint64_t> shape;
  std::span<const T> values;
};

// Writes one block file. Throws pipit::error on a bad shape or an I/O failure.
template <class T>
void write_weight_block(const std::filesystem::path& path,
                        std::span<const weight_tensor<T>> tensors) {
  PIPIT_REQUIRE(!tensors.empty() && tensors.size() <= weight_file_max_tensors, "weight file ", path,
                ": ", tensors.size(), " tensors, need 1 .. ", weight_file_max_tensors);
  const std::size_t n = tensors.size();
  const std::uint64_t payload_offset = detail::round_up(
      detail::fixed_header_bytes + detail::table_entry_bytes * n, weight_file_alignment);
  std::vector<weight_tensor_info> infos(n);
  std::uint64_t end = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const auto& t = tensors[i];
    PIPIT_REQUIRE(!t.shape.empty() && t.shape.size() <= std::size_t(weight_file_max_rank),
                  "weight file ", path, ": tensor ", i, " has rank ", t.shape.size(),
                  ", need 1 .. ", weight_file_max_rank);
    infos[i].rank = static_cast<int>(t.shape.size());
    std::copy(t.shape.begin(), t.shape.end(), infos[i].dims.begin());
    PIPIT_REQUIRE(infos[i].elements() == t.values.size(), "weight file ", path, ": tensor ", i,
                  " has shape of ", infos[i].elements(), " elements but ", t.values.size(),
                  " values");
    infos[i].offset = detail::round_up(end, weight_file_alignment);
    end = infos[i].offset + t.values.size_bytes();
  }
  const std::uint64_t payload_bytes = detail::round_up(end, weight_file_alignment);

  std::vector<std::byte> head(payload_offset, std::byte{0});
  std::memcpy(head.data(), weight_file_magic.data(), 8);
  detail::store_le<std::uint32_t>(head.data() + 8, weight_file_version);
  detail::store_le<std::uint32_t>(head.data() + 12, static_cast<std::uint32_t>(dtype_of<T>()));
  detail::store_le<std::uint32_t>(head.data() + 16, static_cast<std::uint32_t>(n));
  detail::store_le<std::uint64_t>(head.data() + 24, payload_offset);
  for (std::size_t i = 0; i < n; ++i) {
    std::byte* e = head.data() + detail::fixed_header_bytes + detail::table_entry_bytes * i;
    detail::store_le<std::uint32_t>(e, static_cast<std::uint32_t>(infos[i].rank));
    for (int d = 0; d < weight_file_max_rank; ++d)
      detail::store_le<std::uint64_t>(e + 8 + 8 * d, infos[i].dims[static_cast<std::size_t>(d)]);
    detail::store_le<std::uint64_t>(e + 40, infos[i].offset);
  }
  std::vector<std::byte> payload(payload_bytes, std::byte{0});
  for (std::size_t i = 0; i < n; ++i)
    if (!tensors[i].values.empty())
      std::memcpy(payload.data() + infos[i].offset, tensors[i].values.data(),
                  tensors[i].values.size_bytes());

  std::uint64_t h = detail::fnv_offset;
  h = detail::fnv1a_words(h, head.data(), head.size());
  h = detail::fnv1a_words(h, payload.data(), payload.size());
  std::byte tail[8];
  detail::store_le<std::uint64_t>(tail, h);

  auto f = detail::open_file(path, "wb");
  const bool ok = std::fwrite(head.data(), 1, head.size(), f.get()) == head.size() &&
                  std::fwrite(payload.data(), 1, payload.size(), f.get()) == payload.size() &&
                  std::fwrite(tail, 1, 8, f.get()) == 8 && std::fflush(f.get()) == 0;
  if (!ok) fail("weight file ", path, ": write failed");
}

template <class T>
void write_weight_block(const std::filesystem::path& path,
                        std::initializer_list<weight_tensor<T>> tensors) {
  write_weight_block<T>(path, std::span<const weight_tensor<T>>(tensors.begin(), tensors.size()));
}

// Reads and checks the header (magic, version, dtype, table, file size). Reads no payload.
inline weight_file_info read_weight_file_info(const std::filesystem::path& path) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) fail("weight file ", path, ": cannot stat (", ec.message(), ")");
  auto f = detail::open_file(path, "rb");
  std::byte fixed[detail::fixed_header_bytes];
  if (size < detail::fixed_header_bytes ||
      std::fread(fixed, 1, sizeof fixed, f.get()) != sizeof fixed)
    fail("weight file ", path, ": truncated: ", size, " bytes, shorter than the ",
         detail::fixed_header_bytes, "-byte header");
  if (std::memcmp(fixed, weight_file_magic.data(), 8) != 0)
    fail("weight file ", path, ": bad magic (not a pipit weight-block file)");
  const auto version = detail::load_le<std::uint32_t>(fixed + 8);
  if (version != weight_file_version)
    fail("weight file ", path, ": version ", version, ", this reader knows version ",
         weight_file_version);
  const auto dtype = detail::load_le<std::uint32_t>(fixed + 12);
  if (dtype != 1 && dtype != 2)
    fail("weight file ", path, ": dtype code ", dtype, ", need 1 (f32) or 2 (f64)");
  const auto n = detail::load_le<std::uint32_t>(fixed + 16);
  if (n == 0 || n > weight_file_max_tensors)
    fail("weight file ", path, ": tensor count ", n, ", need 1 .. ", weight_file_max_tensors);
  weight_file_info info;
  info.dtype = static_cast<weight_dtype>(dtype);
  info.payload_offset = detail::load_le<std::uint64_t>(fixed + 24);
  const std::uint64_t table_end = detail::fixed_header_bytes + detail::table_entry_bytes * n;
  if (info.payload_offset < table_end || info.payload_offset % weight_file_alignment != 0)
    fail("weight file ", path, ": payload offset ", info.payload_offset, " must be a multiple of ",
         weight_file_alignment, " and >= ", table_end);
  if (size < table_end)
    fail("weight file ", path, ": truncated: ", size, " bytes, the tensor table ends at ",
         table_end);
  if (info.payload_offset > size)
    fail("weight file ", path, ": payload offset ", info.payload_offset, " is beyond the file's ",
         size, " bytes");
  std::vector<std::byte> table(detail::table_entry_bytes * n);
  if (std::fread(table.data(), 1, table.size(), f.get()) != table.size())
    fail("weight file ", path, ": read of the tensor table failed");
  const std::size_t esize = dtype_bytes(info.dtype);
  std::uint64_t end = 0;
  info.tensors.resize(n);
  for (std::uint32_t i = 0; i < n; ++i) {
    const std::byte* e = table.data() + detail::table_entry_bytes * i;
    auto& t = info.tensors[i];
    const auto rank = detail::load_le<std::uint32_t>(e);
    if (rank < 1 || rank > std::uint32_t(weight_file_max_rank))
      fail("weight file ", path, ": tensor ", i, " has rank ", rank, ", need 1 .. ",
           weight_file_max_rank);
    t.rank = static_cast<int>(rank);
    for (int d = 0; d < weight_file_max_rank; ++d) {
      t.dims[static_cast<std::size_t>(d)] = detail::load_le<std::uint64_t>(e + 8 + 8 * d);
      if (t.dims[static_cast<std::size_t>(d)] > (std::uint64_t(1) << 40))
        fail("weight file ", path, ": tensor ", i, " dimension ", d, " is ",
             t.dims[static_cast<std::size_t>(d)], " (corrupt table)");
    }
    t.offset = detail::load_le<std::uint64_t>(e + 40);
    if (t.offset % weight_file_alignment != 0 || t.offset < end || t.offset > size)
      fail("weight file ", path, ": tensor ", i, " offset ", t.offset, " is not a multiple of ",
           weight_file_alignment, " at or after the previous tensor's end ", end,
           " and inside the file's ", size, " bytes");
    // The element count, checked as it is multiplied: a corrupt table must not wrap around.
    constexpr std::uint64_t max_elements = std::uint64_t(1) << 44;
    std::uint64_t elems = 1;
    for (int d = 0; d < t.rank; ++d) {
      const std::uint64_t dim = t.dims[static_cast<std::size_t>(d)];
      if (dim != 0 && elems > max_elements / dim)
        fail("weight file ", path, ": tensor ", i, " has more than ", max_elements,
             " elements (corrupt table)");
      elems *= dim;
    }
    end = t.offset + elems * esize;  // offset <= size < 2^63, elems * esize <= 2^47
  }
  info.payload_bytes = detail::round_up(end, weight_file_alignment);
  if (size != info.file_bytes())
    fail("weight file ", path, ": ", size < info.file_bytes() ? "truncated" : "size mismatch", ": ",
         size, " bytes, the header says ", info.file_bytes());
  return info;
}

// A block's weights, resident in memory: the checked header and the payload.
class weight_block {
 public:
  weight_block() = default;
  weight_block(weight_file_info info, mapped_buffer payload)
      : info_(std::move(info)), payload_(std::move(payload)) {}

  const weight_file_info& info() const noexcept { return info_; }
  std::size_t tensors() const noexcept { return info_.tensors.size(); }
  // Bytes this block holds in memory (the payload, whole pages).
  std::size_t resident_bytes() const noexcept { return payload_.capacity(); }

  template <class T>
  std::span<const T> tensor(std::size_t i) const {
    PIPIT_REQUIRE(i < info_.tensors.size(), "tensor ", i, " of a block with ",
                  info_.tensors.size());
    PIPIT_REQUIRE(dtype_of<T>() == info_.dtype, "tensor ", i, " is stored as dtype ",
                  static_cast<int>(info_.dtype), ", read as dtype ",
                  static_cast<int>(dtype_of<T>()));
    const auto& t = info_.tensors[i];
    return {reinterpret_cast<const T*>(payload_.data() + t.offset),
            static_cast<std::size_t>(t.elements())};
  }
  const weight_tensor_info& shape(std::size_t i) const { return info_.tensors.at(i); }

 private:
  weight_file_info info_;
  mapped_buffer payload_;
};

// How a block is read. bandwidth/latency simulate a slower disk (TPI-LLM's edge devices): each
// read is paced so that it takes at least latency + bytes / bandwidth.
struct weight_read_options {
  double disk_bandwidth = 0;  // bytes per second; 0: as fast as the file system
  double disk_latency = 0;    // seconds per block
  bool verify_checksum = true;
  std::size_t chunk_bytes = std::size_t(1) << 20;
  const std::atomic<bool>* cancel = nullptr;  // checked between chunks; set: the read stops
};

// Thrown (and caught by the window) when a read is cancelled.
struct weight_read_cancelled {};

// Reads one block with a known header (from read_weight_file_info) into a fresh mapped buffer,
// checking the size again and the checksum.
inline weight_block read_weight_block(const std::filesystem::path& path, weight_file_info info,
                                      const weight_read_options& o = {}) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  auto f = detail::open_file(path, "rb");
  std::vector<std::byte> head(info.payload_offset);
  if (std::fread(head.data(), 1, head.size(), f.get()) != head.size())
    fail("weight file ", path, ": truncated while reading the header");
  mapped_buffer payload(info.payload_bytes);
  std::uint64_t h = detail::fnv1a_words(detail::fnv_offset, head.data(), head.size());
  const std::size_t chunk = std::max<std::size_t>(
      detail::round_up(std::max<std::size_t>(o.chunk_bytes, 8), 8), weight_file_alignment);
  for (std::uint64_t done = 0; done < info.payload_bytes;) {
    if (o.cancel != nullptr && o.cancel->load(std::memory_order_relaxed))
      throw weight_read_cancelled{};
    const std::size_t n =
        static_cast<std::size_t>(std::min<std::uint64_t>(chunk, info.payload_bytes - done));
    if (std::fread(payload.data() + done, 1, n, f.get()) != n)
      fail("weight file ", path, ": truncated: payload ends before byte ", done + n, " of ",
           info.payload_bytes);
    if (o.verify_checksum) h = detail::fnv1a_words(h, payload.data() + done, n);
    done += n;
    if (o.disk_bandwidth > 0 || o.disk_latency > 0) {
      // Paced in short sleeps so that a cancel is seen within a few milliseconds.
      const double due =
          o.disk_latency + (o.disk_bandwidth > 0 ? double(done) / o.disk_bandwidth : 0);
      const auto until =
          start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(due));
      for (auto now = clock::now(); now < until; now = clock::now()) {
        if (o.cancel != nullptr && o.cancel->load(std::memory_order_relaxed))
          throw weight_read_cancelled{};
        std::this_thread::sleep_for(
            std::min<clock::duration>(until - now, std::chrono::milliseconds(5)));
      }
    }
  }
  std::byte tail[8];
  if (std::fread(tail, 1, 8, f.get()) != 8)
    fail("weight file ", path, ": truncated: the checksum is missing");
  if (o.verify_checksum) {
    const auto stored = detail::load_le<std::uint64_t>(tail);
    if (stored != h)
      fail("weight file ", path, ": checksum mismatch: stored 0x", std::hex, stored,
           ", computed 0x", h, " (corrupt file)");
  }
  return weight_block(std::move(info), std::move(payload));
}

inline weight_block read_weight_block(const std::filesystem::path& path,
                                      const weight_read_options& o = {}) {
  return read_weight_block(path, read_weight_file_info(path), o);
}

}  // namespace pipit::runtime
