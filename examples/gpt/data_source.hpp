#pragma once
// data_source: where the training tokens come from — the embedded synthetic language or a token
// file — and how one microbatch is drawn: `batch` sequences of seq + 1 tokens (inputs and the
// targets shifted by one), each from a hash of (seed, step, replica, microbatch, sequence). The
// first pipeline stage (inputs) and the last (targets) draw the same microbatch independently.

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <variant>

#include "config.hpp"
#include "random.hpp"
#include "synthetic_language.hpp"
#include "token_file.hpp"

namespace gpt {

class data_source {
 public:
  explicit data_source(synthetic_language s) : v_(std::move(s)) {}
  explicit data_source(token_file f) : v_(std::move(f)) {}

  int vocab() const {
    return std::visit([](const auto& d) { return d.vocab(); }, v_);
  }
  // The loss floor in nats per token, when known (the synthetic language's entropy rate).
  std::optional<double> entropy_bound() const {
    if (const auto* s = std::get_if<synthetic_language>(&v_)) return s->entropy_rate();
    return std::nullopt;
  }
  std::string describe() const {
    return std::visit([](const auto& d) { return d.describe(); }, v_);
  }
  void sequence(std::uint64_t key, std::span<std::int32_t> out) const {
    std::visit([&](const auto& d) { d.sequence(key, out); }, v_);
  }

  // Microbatch `mb` of replica `replica` at `step`: batch x (seq + 1) tokens, sequence-major.
  void microbatch(const model_config& c, std::uint64_t seed, std::uint64_t step, int replica,
                  int mb, std::span<std::int32_t> out) const {
    const auto len = static_cast<std::size_t>(c.seq) + 1;
    if (out.size() != len * static_cast<std::size_t>(c.batch))
      pipit::fail("gpt::data_source: microbatch buffer of ", out.size(), " tokens, expected ",
                  len * static_cast<std::size_t>(c.batch));
    for (int b = 0; b < c.batch; ++b)
      sequence(hash_of({seed, step, static_cast<std::uint64_t>(replica),
                        static_cast<std::uint64_t>(mb), static_cast<std::uint64_t>(b)}),
               out.subspan(static_cast<std::size_t>(b) * len, len));
  }

 private:
  std::variant<synthetic_language, token_file> v_;
};

}  // namespace gpt
