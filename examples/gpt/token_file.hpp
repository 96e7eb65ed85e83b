#pragma once
// token_file: a real corpus as a flat binary file of token ids, little-endian uint16 or uint32
// (the format of nanoGPT's train.bin and Megatron's .bin without the index). A sequence is a
// window at an offset drawn from a hash of its key, so every rank draws the same window for the
// same (step, microbatch, sequence) without coordination.

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include "pipit/core/error.hpp"
#include "random.hpp"

namespace gpt {

class token_file {
 public:
  // bytes_per_token: 2 (uint16) or 4 (uint32). Every id must be < vocab.
  token_file(const std::string& path, int bytes_per_token, int vocab, std::uint64_t seed = 0)
      : path_(path), seed_(seed), vocab_(vocab) {
    if (bytes_per_token != 2 && bytes_per_token != 4)
      pipit::fail("gpt::token_file: bytes per token must be 2 (uint16) or 4 (uint32), got ",
                  bytes_per_token);
    if (vocab < 1) pipit::fail("gpt::token_file: vocab must be >= 1 (got ", vocab, ")");
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) pipit::fail("gpt::token_file: cannot open '", path, "'");
    const std::streamoff size = in.tellg();
    if (size % bytes_per_token != 0)
      pipit::fail("gpt::token_file: '", path, "' has ", size, " bytes, not a multiple of ",
                  bytes_per_token, " bytes per token");
    in.seekg(0);
    std::vector<unsigned char> bytes(static_cast<std::size_t>(size));
    if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size))
      pipit::fail("gpt::token_file: cannot read '", path, "'");
    const std::size_t count = bytes.size() / static_cast<std::size_t>(bytes_per_token);
    tokens_.resize(count);
    for (std::size_t i = 0; i < count; ++i) {
      const unsigned char* b = bytes.data() + i * static_cast<std::size_t>(bytes_per_token);
      std::uint32_t v = static_cast<std::uint32_t>(b[0]) | static_cast<std::uint32_t>(b[1]) << 8;
      if (bytes_per_token == 4)
        v |= static_cast<std::uint32_t>(b[2]) << 16 | static_cast<std::uint32_t>(b[3]) << 24;
      if (v >= static_cast<std::uint32_t>(vocab))
        pipit::fail("gpt::token_file: '", path, "' token ", i, " is ", v,
                    ", outside the vocabulary [0, ", vocab, ")");
      tokens_[i] = static_cast<std::int32_t>(v);
    }
  }

  int vocab() const noexcept { return vocab_; }
  std::size_t size() const noexcept { return tokens_.size(); }
  std::span<const std::int32_t> tokens() const noexcept { return tokens_; }

  // out.size() consecutive tokens from an offset drawn from `key`.
  void sequence(std::uint64_t key, std::span<std::int32_t> out) const {
    if (out.size() > tokens_.size())
      pipit::fail("gpt::token_file: '", path_, "' has ", tokens_.size(),
                  " tokens, fewer than a sequence of ", out.size());
    const std::uint64_t starts = tokens_.size() - out.size() + 1;
    const std::size_t at = static_cast<std::size_t>(hash_of({seed_, key}) % starts);
    std::copy_n(tokens_.begin() + static_cast<std::ptrdiff_t>(at), out.size(), out.begin());
  }

  std::string describe() const {
    return pipit::detail::concat("token file '", path_, "': ", tokens_.size(),
                                 " tokens, V=", vocab_);
  }

 private:
  std::string path_;
  std::uint64_t seed_;
  int vocab_;
  std::vector<std::int32_t> tokens_;
};

}  // namespace gpt
