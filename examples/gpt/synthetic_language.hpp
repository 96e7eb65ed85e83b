#pragma once
// synthetic_language: an embedded training corpus that needs no download and whose best
// achievable loss is known exactly. A first-order Markov chain over V token ids: every state s
// has K distinct successors, and the k-th most likely (k = 1 .. K) follows s with probability
// p_k = k^-alpha / sum_j j^-alpha (Zipf's law). The successors are drawn once from a hash of
// (seed, s, k), log-uniformly over the ids (id ~ floor((V + 1)^u) - 1), so the unigram frequencies
// are heavy-tailed too, as in natural text.
//
// Entropy rate. Every row of the transition matrix is a permutation of the same Zipf vector, so
// every state's next-token entropy is H = -sum_k p_k ln p_k, and the entropy rate of the chain,
// H(X_{t+1} | X_t, X_{t-1}, ...) = H(X_{t+1} | X_t) = sum_s pi(s) H = H, whatever the stationary
// distribution pi and the initial state. A model that sees the context can do no better than H
// nats per token on average, and the exact predictor P(. | x_t) reaches it: H is the loss floor.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "pipit/core/error.hpp"
#include "random.hpp"

namespace gpt {

class synthetic_language {
 public:
  // V ids, K successors per state (2 <= K <= V / 2), Zipf exponent alpha >= 0.
  synthetic_language(int vocab, int successors, double alpha, std::uint64_t seed)
      : vocab_(vocab), k_(successors), alpha_(alpha), seed_(seed) {
    if (vocab < 4) pipit::fail("gpt::synthetic_language: vocab must be >= 4 (got ", vocab, ")");
    if (successors < 2 || successors > vocab / 2)
      pipit::fail("gpt::synthetic_language: successors must be in [2, vocab / 2 = ", vocab / 2,
                  "] (got ", successors, ")");
    if (!(alpha >= 0) || !std::isfinite(alpha))
      pipit::fail("gpt::synthetic_language: alpha must be finite and >= 0 (got ", alpha, ")");
    double z = 0;
    for (int k = 1; k <= k_; ++k) z += std::pow(static_cast<double>(k), -alpha_);
    probs_.resize(static_cast<std::size_t>(k_));
    cumulative_.resize(probs_.size());
    double c = 0;
    for (int k = 0; k < k_; ++k) {
      const double p = std::pow(static_cast<double>(k + 1), -alpha_) / z;
      probs_[static_cast<std::size_t>(k)] = p;
      c += p;
      cumulative_[static_cast<std::size_t>(k)] = c;
      if (p > 0) entropy_ -= p * std::log(p);
    }
    cumulative_.back() = 1.0;
    build_successors();
  }

  int vocab() const noexcept { return vocab_; }
  int successors() const noexcept { return k_; }
  double alpha() const noexcept { return alpha_; }
  // H in nats per token: the exact entropy rate, the loss floor.
  double entropy_rate() const noexcept { return entropy_; }
  // p_k of the k-th successor (k = 0 .. K - 1).
  std::span<const double> probabilities() const noexcept { return probs_; }
  // The K successors of state s, most likely first.
  std::span<const std::int32_t> successors_of(int s) const {
    return std::span<const std::int32_t>(table_).subspan(
        static_cast<std::size_t>(s) * static_cast<std::size_t>(k_), static_cast<std::size_t>(k_));
  }
  // P(next | s): 0 when next is not a successor of s.
  double probability(int s, int next) const {
    const auto succ = successors_of(s);
    for (int k = 0; k < k_; ++k)
      if (succ[static_cast<std::size_t>(k)] == next) return probs_[static_cast<std::size_t>(k)];
    return 0.0;
  }

  // A sequence of out.size() tokens from a hash of `key`: the first uniform over the ids, then
  // the chain.
  void sequence(std::uint64_t key, std::span<std::int32_t> out) const {
    splitmix rng{hash_of({seed_, key})};
    if (out.empty()) return;
    std::int32_t s = static_cast<std::int32_t>(rng.next() % static_cast<std::uint64_t>(vocab_));
    out[0] = s;
    for (std::size_t t = 1; t < out.size(); ++t) {
      const double u = rng.uniform();
      const auto k = static_cast<std::size_t>(
          std::upper_bound(cumulative_.begin(), cumulative_.end(), u) - cumulative_.begin());
      s = successors_of(s)[std::min(k, static_cast<std::size_t>(k_ - 1))];
      out[t] = s;
    }
  }

  std::string describe() const {
    return pipit::detail::concat("synthetic Zipf-Markov language: V=", vocab_, ", ", k_,
                                 " successors per token, alpha=", alpha_, ", seed=", seed_);
  }

 private:
  void build_successors() {
    table_.resize(static_cast<std::size_t>(vocab_) * static_cast<std::size_t>(k_));
    const double log_span = std::log(static_cast<double>(vocab_) + 1.0);
    for (int s = 0; s < vocab_; ++s) {
      std::int32_t* row =
          table_.data() + static_cast<std::size_t>(s) * static_cast<std::size_t>(k_);
      for (int k = 0; k < k_; ++k) {
        std::int32_t id = 0;
        bool fresh = false;
        // Log-uniform candidates, redrawn on a repeat; after 64 tries, the next free id.
        for (std::uint64_t attempt = 0; !fresh; ++attempt) {
          if (attempt < 64) {
            const double u = unit01(hash_of({seed_, 0x5eed, static_cast<std::uint64_t>(s),
                                             static_cast<std::uint64_t>(k), attempt}));
            id = static_cast<std::int32_t>(
                std::min<double>(std::floor(std::exp(u * log_span)) - 1.0, vocab_ - 1));
          } else {
            id = (id + 1) % vocab_;
          }
          fresh = std::find(row, row + k, id) == row + k;
        }
        row[k] = id;
      }
    }
  }

  int vocab_, k_;
  double alpha_;
  std::uint64_t seed_;
  double entropy_ = 0;
  std::vector<double> probs_, cumulative_;
  std::vector<std::int32_t> table_;  // V x K successors
};

}  // namespace gpt
