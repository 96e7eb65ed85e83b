#pragma once
// costs: the durations the simulator gives each pass, and how activation memory is freed.

#include <vector>

namespace pipit::sim {

// Durations of one microbatch's passes through one rank's *whole* share of the model; with v
// chunks per rank each chunk's pass takes 1/v of it. A combined backward (BW) takes b + w.
struct costs {
  double f = 1.0;     // forward
  double b = 1.0;     // backward for the input gradient
  double w = 1.0;     // backward for the weights
  double comm = 0.0;  // latency of one point-to-point transfer between ranks
  // Fraction of a pass's activations freed by B when B and W are split (the rest by W).
  double free_at_b = 0.0;
  // Optional per-virtual-stage multipliers on the pass durations (empty: all 1), for
  // unbalanced stages such as a last stage carrying the output layer.
  std::vector<double> stage_scale{};
};

}  // namespace pipit::sim
