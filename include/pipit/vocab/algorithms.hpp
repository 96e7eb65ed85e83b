#pragma once
// The output-layer algorithms of vocabulary parallelism, as policy types (Yeung et al.,
// "Balancing Pipeline Parallelism with Vocabulary Parallelism", arXiv 2411.05288).
//
//   naive        Megatron's vocabulary-parallel cross-entropy (megatron/core/tensor_parallel/
//                cross_entropy.py): separate all-reduces of the max, of the target logit and of
//                the sum of exp (the last depends on the first), and an all-reduce of the input
//                gradient in backward: three communication barriers.
//   two_barrier  the paper's Algorithm 1: one merged statistics reduction after the S pass,
//                the input gradient (computed in the T pass) reduced after it: two barriers.
//   one_barrier  the paper's Algorithm 2: the input-gradient GEMM moves into the S pass
//                (softmax-weighted sum of weight rows against the shard's local maximum) and is
//                corrected by a per-token scale right after the statistics merge, so the only
//                barrier is statistics merge + input-gradient reduction, and the T pass computes
//                the weight gradient alone.

#include <concepts>

namespace pipit::vocab {

struct naive {};
struct two_barrier {};
struct one_barrier {};

template <class A>
concept output_algorithm =
    std::same_as<A, naive> || std::same_as<A, two_barrier> || std::same_as<A, one_barrier>;

// Communication barriers of an algorithm per microbatch (what delays the last stage's backward).
template <output_algorithm A>
inline constexpr int barriers = std::same_as<A, naive>         ? 3
                                : std::same_as<A, two_barrier> ? 2
                                                               : 1;

}  // namespace pipit::vocab
