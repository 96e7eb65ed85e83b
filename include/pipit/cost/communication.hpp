#pragma once
// Communication costs under the alpha–beta model (a message of n bytes over one link takes
// alpha + n·beta), for the point-to-point transfers between pipeline stages and for the ring
// collectives of vocabulary parallelism (Thakur, Rabenseifner, Gropp, "Optimization of Collective
// Communication Operations in MPICH", IJHPCA 2005: ring all-reduce 2(p−1)α + 2(p−1)/p·nβ,
// all-gather and reduce-scatter (p−1)α + (p−1)/p·nβ, pipelined broadcast about (p−1)α + nβ).

#include "pipit/core/error.hpp"
#include "pipit/cost/flops.hpp"
#include "pipit/cost/hardware.hpp"
#include "pipit/cost/transformer.hpp"
#include "pipit/cost/vocab_algorithm.hpp"

namespace pipit::cost {

constexpr double p2p_time(const channel& l, double bytes) noexcept {
  return l.time(bytes);
}

constexpr double all_reduce_time(const channel& l, int ranks, double bytes) noexcept {
  if (ranks <= 1) return 0;
  return 2.0 * (ranks - 1) * l.latency + 2.0 * (ranks - 1) / ranks * bytes / l.bandwidth;
}

constexpr double all_gather_time(const channel& l, int ranks, double bytes) noexcept {
  if (ranks <= 1) return 0;
  return (ranks - 1) * l.latency + double(ranks - 1) / ranks * bytes / l.bandwidth;
}

constexpr double reduce_scatter_time(const channel& l, int ranks, double bytes) noexcept {
  return all_gather_time(l, ranks, bytes);
}

constexpr double broadcast_time(const channel& l, int ranks, double bytes) noexcept {
  if (ranks <= 1) return 0;
  return (ranks - 1) * l.latency + bytes / l.bandwidth;
}

// The activation (or its gradient) one stage sends the next for one microbatch: n·h values.
constexpr double activation_message_bytes(const transformer& t) noexcept {
  return t.tokens() * t.hidden * t.bytes.activation;
}

// Communication of one microbatch under vocabulary parallelism over `ranks` ranks, seconds
// (reference notes, vocabulary_parallelism.md §4, §5, §7):
//   the last stage broadcasts X with the previous microbatch's loss gradient, n·(h + 1) fp32;
//   the softmax statistics (max, sum, target logit): three all-reduces of n fp32 values;
//   the input gradient ∇X (naive, Algorithm 1) or D (Algorithm 2): an all-reduce of n·h fp32;
//   the input embedding: an all-reduce of n·h activations forward, a broadcast of ∇emb backward.
// The algorithms move about the same bytes; they differ in where the barriers sit (and so in
// memory, vocab_algorithm.hpp), not in volume.
constexpr double vocab_parallel_comm_time(const transformer& t, int ranks, vocab_algorithm alg,
                                          const channel& l) noexcept {
  (void)alg;
  const double n = t.tokens(), h = t.hidden, fp32 = 4;
  const double x = activation_message_bytes(t);
  return broadcast_time(l, ranks, n * (h + 1) * fp32) + 3 * all_reduce_time(l, ranks, n * fp32) +
         all_reduce_time(l, ranks, n * h * fp32) + all_reduce_time(l, ranks, x) +
         broadcast_time(l, ranks, x);
}

}  // namespace pipit::cost
