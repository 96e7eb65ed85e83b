#pragma once
// Bytes of one microbatch's activations (what a forward stores for its backward, what the
// input-gradient pass B and the weight-gradient pass W free), transient working memory, and
// parameter counts per transformer layer and per vocabulary layer, with the bytes of weights,
// gradients and optimizer states they bring.

#include "pipit/cost/flops.hpp"
#include "pipit/cost/transformer.hpp"

namespace pipit::cost {

// Activation bytes one layer's forward stores per token (Korthikanti et al., "Reducing
// Activation Recomputation in Large Transformer Models", MLSys 2023, §4.1: 34h + 5as for 16-bit
// activations, the model the zero-bubble schedulers use: reference notes, schedules.md §2).
// With x bytes per activation and k the key/value width:
//   attention: the QKV input xh, Q xh and K xk, V xk, the projection input xh, dropout mask h
//              = x(3h + 2k) + h                                          (11h)
//   MLP      : the first matrix's input xh, the activation's input x·mlp_in, the second matrix's
//              input x·f, dropout mask h = x(h + mlp_in + f) + h         (19h)
//   norms    : 2xh                                                       (4h)
//   scores   : without flash attention the softmax output (x), its dropout mask (1) and output (x)
//              for a·s scores: (2x + 1)·a·s                              (5as)
// With full recomputation only the layer's input (xh) is kept.
constexpr double layer_activation_bytes_per_token(const transformer& t) noexcept {
  const double h = t.hidden, x = t.bytes.activation;
  if (t.recompute) return x * h;
  double bytes =
      x * (3 * h + 2 * t.kv_width()) + h + x * (h + t.mlp_in() + t.ffn_size()) + h + 2 * x * h;
  if (!t.flash_attention) bytes += (2 * x + 1) * double(t.heads) * t.seq;
  return bytes;
}

// Of those, the bytes the weight-gradient pass still needs after B (Qi et al., "Zero Bubble
// Pipeline Parallelism", ICLR 2024: W frees 32h per token): each linear layer's input
// (QKV xh, projection xh, MLP xh and x·f) and the output gradient B computed for it
// (x(h + 2k), xh, x·mlp_in, xh). B frees the rest. With recomputation W's inputs are
// re-materialised inside B, which this model does not count (B frees everything).
constexpr double layer_weight_grad_bytes_per_token(const transformer& t) noexcept {
  if (t.recompute) return 0;
  const double h = t.hidden, x = t.bytes.activation;
  const double inputs = x * (3 * h + t.ffn_size());
  const double output_grads = x * ((h + 2 * t.kv_width()) + h + t.mlp_in() + h);
  return inputs + output_grads;
}

// One layer, one microbatch.
constexpr double layer_activation_bytes(const transformer& t) noexcept {
  return t.tokens() * layer_activation_bytes_per_token(t);
}
constexpr double layer_weight_grad_bytes(const transformer& t) noexcept {
  return t.tokens() * layer_weight_grad_bytes_per_token(t);
}
// Transient memory while a layer's passes run: the MLP's intermediate and its gradient, live
// together during the backward (x·(mlp_in + f) per token); without flash attention the scores.
constexpr double layer_workspace_bytes(const transformer& t) noexcept {
  const double x = t.bytes.activation;
  double per_token = x * (t.mlp_in() + t.ffn_size());
  if (!t.flash_attention) per_token += x * double(t.heads) * t.seq;
  return t.tokens() * per_token;
}

// Output layer, one microbatch: the final norm's input and the LM head's input (x·h each per
// token) and the cross-entropy's saved bytes per logit (fp32 softmax by default).
constexpr double output_activation_bytes(const transformer& t, double vocab_entries) noexcept {
  return t.tokens() * (2.0 * t.bytes.activation * t.hidden + t.ce.saved_bytes * vocab_entries);
}
constexpr double output_activation_bytes(const transformer& t) noexcept {
  return output_activation_bytes(t, t.vocab);
}
// Kept for W: the LM head's input and the logits' gradient (x bytes per logit), which B writes
// where the softmax was.
constexpr double output_weight_grad_bytes(const transformer& t, double vocab_entries) noexcept {
  return t.tokens() * t.bytes.activation * (t.hidden + vocab_entries);
}
constexpr double output_weight_grad_bytes(const transformer& t) noexcept {
  return output_weight_grad_bytes(t, t.vocab);
}
// Transient memory of the output layer's passes: t.ce.workspace_bytes per logit.
constexpr double output_workspace_bytes(const transformer& t, double vocab_entries) noexcept {
  return t.tokens() * vocab_entries * t.ce.workspace_bytes;
}
constexpr double output_workspace_bytes(const transformer& t) noexcept {
  return output_workspace_bytes(t, t.vocab);
}

// Parameters of one layer: QKV h(h + 2k) + (h + 2k), projection h² + h, MLP h·mlp_in + mlp_in
// and f·h + h, two norms 4h. For k = h, f = 4h: 12h² + 13h (Narayanan et al., SC'21, §5.1).
constexpr double layer_parameters(const transformer& t) noexcept {
  const double h = t.hidden, k = t.kv_width(), f = t.ffn_size(), mi = t.mlp_in();
  return h * (h + 2 * k) + (h + 2 * k) + h * h + h + h * mi + mi + f * h + h + 4 * h;
}
// Input embedding: the V × h table (and the s × h position table when learned).
constexpr double embedding_parameters(const transformer& t) noexcept {
  return double(t.vocab) * t.hidden + (t.learned_positions ? double(t.seq) * t.hidden : 0.0);
}
// Output layer: the final norm (2h) and the untied V × h LM head.
constexpr double output_parameters(const transformer& t) noexcept {
  return 2.0 * t.hidden + double(t.vocab) * t.hidden;
}

// Bytes per parameter for the weights, their gradients and the optimizer states.
struct state_bytes {
  double parameters = 0;
  double gradients = 0;
  double optimizer = 0;
  constexpr double total() const noexcept { return parameters + gradients + optimizer; }
};
constexpr state_bytes states_of(const transformer& t, double parameter_count) noexcept {
  return {parameter_count * t.bytes.parameter, parameter_count * t.bytes.gradient,
          parameter_count * t.bytes.optimizer};
}

// Bytes an Adam step moves per parameter (memory-bound): read the gradient and the optimizer
// state, write the state back and the 16-bit weights.
constexpr double optimizer_step_bytes(const transformer& t, double parameter_count) noexcept {
  return parameter_count * (t.bytes.gradient + 2.0 * t.bytes.optimizer + double(t.bytes.parameter));
}

}  // namespace pipit::cost
