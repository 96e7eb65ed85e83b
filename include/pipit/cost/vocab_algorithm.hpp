#pragma once
// vocab_algorithm: how the output layer is computed when the vocabulary is sharded over all
// pipeline ranks (vocabulary parallelism: Yeung, Qi, Lin, Wan, "Balancing Pipeline Parallelism
// with Vocabulary Parallelism", MLSys 2025, arXiv 2411.05288; reference notes,
// vocabulary_parallelism.md §3–6). The algorithm decides how the work splits between the
// forward-statistics pass S and the gradient pass T, and how many communication barriers sit
// between the last stage's forward and its backward — each of which keeps one more microbatch of
// activations in flight on every rank under 1F1B (ibid. §9.1: p + 1 for one barrier, p + 2 for
// two).

#include <string>
#include <string_view>

#include "pipit/core/error.hpp"

namespace pipit::cost {

enum class vocab_algorithm {
  naive,        // Megatron-style sharded softmax: all-reduce max, all-reduce sum, all-reduce ∇X
  two_barrier,  // the paper's Algorithm 1 ("Vocab-1"): S = logits GEMM, T = ∇X and ∇W GEMMs
  one_barrier,  // the paper's Algorithm 2 ("Vocab-2", the code's default): the ∇X GEMM moves
                // into S (A = P·W), T is the ∇W GEMM alone
};

inline constexpr std::string_view vocab_algorithm_names[] = {"naive", "two-barrier", "one-barrier"};

constexpr std::string_view name(vocab_algorithm a) noexcept {
  return vocab_algorithm_names[static_cast<int>(a)];
}

// Communication barriers between the last stage's F and B for one microbatch.
constexpr int barriers(vocab_algorithm a) noexcept {
  switch (a) {
    case vocab_algorithm::naive:
      return 3;
    case vocab_algorithm::two_barrier:
      return 2;
    case vocab_algorithm::one_barrier:
      return 1;
  }
  return 0;
}

constexpr vocab_algorithm vocab_algorithm_by_name(std::string_view text) {
  for (int i = 0; i < 3; ++i)
    if (text == vocab_algorithm_names[i]) return static_cast<vocab_algorithm>(i);
  fail("pipit: unknown vocabulary algorithm '", text, "' (known: naive, two-barrier, one-barrier)");
}

}  // namespace pipit::cost
