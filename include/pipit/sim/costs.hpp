#pragma once
// costs: the durations the simulator gives each pass, and how activation memory is freed.

#include <vector>

namespace pipit::sim {

// One virtual stage's own costs, for pipelines whose stages differ — a real model's partition,
// with the vocabulary layers on some stages (pipit/cost/stage_costs.hpp makes them,
// pipit/sim/predict.hpp passes them here).
struct stage_costs {
  double f = 0;                 // duration of one microbatch's forward through this stage
  double b = 0;                 // ... backward for the input gradient
  double w = 0;                 // ... backward for the weights (a combined BW takes b + w)
  double activation_bytes = 0;  // activation bytes its F stores for one microbatch
  double free_at_b = 0;         // fraction of them B frees when B and W are split (W the rest)
};

// Durations of one microbatch's passes through one rank's *whole* share of the model; with v
// chunks per rank each chunk's pass takes 1/v of it. A combined backward (BW) takes b + w.
struct costs {
  double f = 1.0;     // forward
  double b = 1.0;     // backward for the input gradient
  double w = 1.0;     // backward for the weights
  double comm = 0.0;  // latency of one point-to-point transfer between ranks, and of each
                      // collective a vocabulary pass waits for (schedule/vocab_passes.hpp)
  // Fraction of a pass's activations freed by B when B and W are split (the rest by W).
  double free_at_b = 0.0;
  // Optional per-virtual-stage multipliers on the pass durations (empty: all 1), for
  // unbalanced stages such as a last stage carrying the output layer.
  std::vector<double> stage_scale{};
  // Optional per-virtual-stage costs (empty: none). When given, one entry per virtual stage, and
  // a pass of stage s takes stages[s].f / .b / .w as they are — not divided by the chunks, still
  // multiplied by stage_scale when that is given — the activation units use stages[s].free_at_b
  // instead of free_at_b, and the result also reports peak activation bytes per rank.
  std::vector<stage_costs> stages{};
  // Vocabulary passes (plans with plan.vocab set), per rank and microbatch, not divided by the
  // chunks nor scaled by stage_scale: the output layer's S and T passes over the rank's vocabulary
  // shard, the input embedding's forward (IF) and backward (IB).
  double vocab_s = 0.0;
  double vocab_t = 0.0;
  double embed_f = 0.0;
  double embed_b = 0.0;
};

}  // namespace pipit::sim
