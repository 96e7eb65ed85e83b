#pragma once
// The model's partition over the pipeline, from a name: "naive" (layers evenly, E on the first
// stage and L on the last), "balanced" (the exact min-max split of [E, layers, L] by their FLOPs),
// or "layout:<string>" (Megatron's layout language, partition/layout.hpp, e.g.
// "layout:E t*3 | t*3 | t*2 L"). The costs are the example's own arithmetic, per microbatch,
// forward + both backward passes.

#include <string>
#include <string_view>

#include "config.hpp"
#include "pipit/partition/balanced.hpp"
#include "pipit/partition/layout.hpp"
#include "pipit/partition/naive.hpp"
#include "pipit/partition/vocab_parallel.hpp"

namespace gpt {

struct model_costs {
  double embedding = 0, layer = 0, output = 0;  // FLOPs per microbatch, F + B + W
};

// A block's forward is 24 n d^2 FLOPs in its four linear layers (qkv 3d^2, proj d^2, the MLP
// 2 f d with f = 4d: 2 FLOPs per multiply-add) plus 4 n S d for K^T Q and V P^T (computed in
// full, masked afterwards); the two backward passes cost twice the forward. The output layer is
// four n d V GEMMs (logits and the softmax-weighted rows in the forward, the logits again and dW
// in the weight pass: pipit::vocab's one-barrier algorithm on one shard). The embedding is a
// gather and a scatter-add, 2 n d.
inline model_costs costs_of(const model_config& c) {
  const double n = c.tokens(), d = c.hidden, f = c.ffn(), s = c.seq, v = c.vocab;
  model_costs k;
  k.layer = 3 * (2 * n * d * (4 * d + 2 * f) + 4 * n * s * d);
  k.output = 4 * 2 * n * d * v;
  k.embedding = 2 * n * d;
  return k;
}

inline pipit::partition::partition make_partition(std::string_view spec, const model_config& c,
                                                  const pipit::partition::pipeline& pl) {
  namespace pp = pipit::partition;
  if (spec == "naive") return pp::naive(c.layers, pl);
  if (spec == "balanced") {
    const model_costs k = costs_of(c);
    return pp::balanced(c.layers, k.embedding, k.layer, k.output, pl);
  }
  if (spec == "vocab-parallel") return pp::vocab_parallel(c.layers, pl);
  if (spec.starts_with("layout:")) return pp::layout(spec.substr(7), pl, c.layers);
  pipit::fail("gpt: unknown partition '", spec,
              "' (known: naive, balanced, vocab-parallel, layout:<stages>)");
}

}  // namespace gpt
