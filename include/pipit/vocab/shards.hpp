#pragma once
// vocab_shards: the vocabulary split into contiguous, equally sized ranges over the n ranks of a
// vocabulary-parallel group (Yeung et al., "Balancing Pipeline Parallelism with Vocabulary
// Parallelism", arXiv 2411.05288, section 3: shard r owns ids [r*V'/n, (r+1)*V'/n)).
//
// The vocabulary V is padded to V' = round_up(V, n * pad_multiple), so every shard has
// V'/n rows and that count is a multiple of pad_multiple (an alignment such as 128, as
// Megatron's make_vocab_size_divisible_by). Ids in [V, V') are padding: the layers never read
// their weight rows, they never win the softmax and they never receive gradient. A token id
// outside [0, V) is an error.

#include <cstdint>

#include "pipit/core/config.hpp"
#include "pipit/core/error.hpp"
#include "pipit/core/math.hpp"

namespace pipit::vocab {

// The row of `token` inside the shard [begin, end), or -1 when another shard owns it.
PIPIT_HOST_DEVICE constexpr std::int64_t owned_row(std::int64_t token, std::int64_t begin,
                                                   std::int64_t end) noexcept {
  return (token >= begin && token < end) ? token - begin : -1;
}

class vocab_shards {
 public:
  // vocab_size: the real vocabulary V (> 0); ranks: the group size n (> 0); pad_multiple: the
  // alignment of every shard's row count (> 0; 1 pads only to a multiple of n).
  constexpr vocab_shards(std::int64_t vocab_size, int ranks, std::int64_t pad_multiple = 1)
      : vocab_(vocab_size), ranks_(ranks), multiple_(pad_multiple) {
    if (vocab_size <= 0) fail("pipit::vocab::vocab_shards: vocabulary size ", vocab_size, " <= 0");
    if (ranks <= 0) fail("pipit::vocab::vocab_shards: rank count ", ranks, " <= 0");
    if (pad_multiple <= 0) fail("pipit::vocab::vocab_shards: pad multiple ", pad_multiple, " <= 0");
    padded_ = round_up(vocab_size, static_cast<std::int64_t>(ranks) * pad_multiple);
  }

  constexpr std::int64_t vocab_size() const noexcept { return vocab_; }
  constexpr std::int64_t padded_size() const noexcept { return padded_; }
  constexpr std::int64_t padding() const noexcept { return padded_ - vocab_; }
  constexpr std::int64_t pad_multiple() const noexcept { return multiple_; }
  constexpr int ranks() const noexcept { return ranks_; }
  // Rows of every shard, padding included: padded_size() / ranks().
  constexpr std::int64_t shard_size() const noexcept { return padded_ / ranks_; }

  // The ids rank r owns, padding included: [r * shard_size(), (r + 1) * shard_size()).
  constexpr range<std::int64_t> range_of(int r) const {
    check_rank(r);
    const std::int64_t b = static_cast<std::int64_t>(r) * shard_size();
    return {b, b + shard_size()};
  }
  // The real (unpadded) ids rank r owns: range_of(r) clipped to [0, V); may be empty.
  constexpr range<std::int64_t> real_range_of(int r) const {
    const auto full = range_of(r);
    const std::int64_t b = full.begin < vocab_ ? full.begin : vocab_;
    const std::int64_t e = full.end < vocab_ ? full.end : vocab_;
    return {b, e};
  }
  // Real rows of rank r's shard (its first real_rows(r) rows are real, the rest padding).
  constexpr std::int64_t real_rows(int r) const { return real_range_of(r).size(); }

  // The rank that owns `token`; throws pipit::error for an id outside [0, vocab_size()).
  constexpr int owner(std::int64_t token) const {
    check_token(token);
    return static_cast<int>(token / shard_size());
  }

  constexpr void check_token(std::int64_t token) const {
    if (token < 0 || token >= vocab_)
      fail("pipit::vocab: token id ", token, " is outside the vocabulary [0, ", vocab_,
           ") (vocabulary size ", vocab_, ")");
  }
  constexpr void check_rank(int r) const {
    if (r < 0 || r >= ranks_)
      fail("pipit::vocab::vocab_shards: rank ", r, " is outside [0, ", ranks_, ")");
  }

  friend constexpr bool operator==(const vocab_shards&, const vocab_shards&) = default;

 private:
  std::int64_t vocab_;
  int ranks_;
  std::int64_t multiple_;
  std::int64_t padded_ = 0;
};

}  // namespace pipit::vocab
