#pragma once
// data_parallel: the d replicas of a pipeline (each stage's tensor-parallel group) that train on
// different microbatches and add up their weight gradients once per iteration.
//
// Overlap assumption: none. The gradients are reduced after the pipeline's flush, before the
// optimizer step, as in the implementation of Narayanan et al., SC'21 (arXiv 2104.04473, §3:
// "the optimizer step is synchronized across ... data-parallel replicas" at the end of the
// batch); Megatron's later --overlap-grad-reduce, which starts a bucket's all-reduce as soon as
// its last backward is done, would hide part of it. So the predicted time is an upper bound
// for implementations that overlap.
//
// Memory: every replica holds the whole of its stage's weights, gradients and optimizer states;
// with the distributed optimizer (ZeRO stage 1: Rajbhandari et al., SC'20; Megatron's
// --use-distributed-optimizer) the optimizer states and the optimizer step are split d ways, and
// the all-reduce becomes a reduce-scatter of the gradients and an all-gather of the 16-bit
// weights (the same ring volume when both are 16-bit).

#include "pipit/core/error.hpp"
#include "pipit/cost/communication.hpp"
#include "pipit/cost/hardware.hpp"
#include "pipit/cost/transformer.hpp"

namespace pipit::cost {

struct data_parallel {
  int size = 1;                        // d, replicas
  bool distributed_optimizer = false;  // optimizer states sharded over the replicas

  // Divisor of the optimizer states and of the optimizer step's work.
  constexpr double optimizer_share() const noexcept { return distributed_optimizer ? size : 1; }
  friend constexpr bool operator==(const data_parallel&, const data_parallel&) = default;
};

constexpr const data_parallel& check(const data_parallel& dp) {
  if (dp.size < 1) fail("pipit: data parallel size must be >= 1 (got ", dp.size, ")");
  return dp;
}

// Seconds to synchronise `parameters` weights' gradients over the replicas on a ring over
// `link` (ring all-reduce 2(d−1)α + 2(d−1)/d·Gβ, G = gradient bytes; with the distributed
// optimizer a reduce-scatter of G and an all-gather of the 16-bit weights).
constexpr double gradient_sync_time(const transformer& t, double parameters,
                                    const data_parallel& dp, const channel& link) noexcept {
  const double grads = parameters * t.bytes.gradient;
  if (!dp.distributed_optimizer) return all_reduce_time(link, dp.size, grads);
  return reduce_scatter_time(link, dp.size, grads) +
         all_gather_time(link, dp.size, parameters * t.bytes.parameter);
}

}  // namespace pipit::cost
