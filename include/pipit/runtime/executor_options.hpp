#pragma once
// executor_options: how an executor runs a plan (runtime::executor on the host,
// cuda::device_executor on a GPU).

#include <cstdint>

namespace pipit::runtime {

// What the data-parallel all-reduce leaves in each gradient: the sum over the replicas, or
// their average.
enum class gradient_reduction { sum, average };

struct executor_options {
  bool rematerialize = false;    // keep only chunk inputs; recompute the forward before B/BW
  std::uint64_t seed = 0;        // folded into every pass_info::seed
  std::uint64_t first_step = 0;  // pass_info::step of the first run()
  gradient_reduction data_parallel = gradient_reduction::average;
  bool validate = true;  // validate the (lowered) plan at construction
};

}  // namespace pipit::runtime
