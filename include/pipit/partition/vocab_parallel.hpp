#pragma once
// vocab_parallel: the transformer layers split evenly over the virtual stages, the input
// embedding and the output layer sharded over all ranks (vocabulary parallelism: Yeung, Qi, Lin,
// Wan, "Balancing Pipeline Parallelism with Vocabulary Parallelism", MLSys 2025). Every rank then
// holds V/p rows of both vocabulary tables and does 1/p of their work (cost/stage_costs.hpp).

#include "pipit/partition/naive.hpp"
#include "pipit/partition/partition.hpp"

namespace pipit::partition {

constexpr partition vocab_parallel(int layers, const pipeline& pl) {
  partition p = impl::even_layers("vocab_parallel", layers, pl);
  p.vocab_parallel = true;
  check(p);
  return p;
}

}  // namespace pipit::partition
