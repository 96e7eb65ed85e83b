#pragma once
// First-principles work of one microbatch's passes: a transformer layer, the input embedding,
// the output layer (final norm, LM head, softmax/cross-entropy, loss) and, under vocabulary
// parallelism, one rank's share of the sharded output layer and input embedding split into the
// S/T passes. Also the model FLOPs of an iteration that MFU divides by, and the closed forms they
// are checked against (tests/unit/cost_test.cpp).
//
// Notation: n = b·s tokens per microbatch, h hidden, a heads, s sequence, V vocabulary, f the FFN
// size, k the key/value width (kv heads × head dim; k = h without grouped-query attention).
// A GEMM of an (m × k) by a (k × n) matrix is 2mkn FLOPs.

#include "pipit/core/error.hpp"
#include "pipit/cost/transformer.hpp"
#include "pipit/cost/vocab_algorithm.hpp"
#include "pipit/cost/work.hpp"

namespace pipit::cost {

// GEMM FLOPs of one layer's forward: QKV 2nh(h + 2k), attention output projection 2nh²,
// MLP 2nh·f·(2 or 3 matrices). With k = h and f = 4h: 24nh² (Narayanan et al., "Efficient
// Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", SC'21, §5.1).
constexpr double layer_gemm_flops(const transformer& t) noexcept {
  const double n = t.tokens(), h = t.hidden;
  return 2 * n * h * (h + 2 * t.kv_width()) + 2 * n * h * h + 2 * n * h * t.mlp_in() +
         2 * n * t.ffn_size() * h;
}

// Attention scores Q·Kᵀ and their weighted sum with V: 2·n·s·h each, 4nsh (no causal halving,
// as in Megatron's and the vocabulary paper's FLOP counts).
constexpr double layer_attention_flops(const transformer& t) noexcept {
  return 4 * t.tokens() * t.seq * double(t.hidden);
}

// Bytes moved by one layer's memory-bound kernels per token, with Megatron's fusions (bias+GeLU,
// bias+dropout+residual-add); x = activation bytes:
//   forward : two layer norms 2·2xh, two bias-dropout-adds 2·(3xh + h mask bytes),
//             the MLP activation x(mlp_in + f)                       (38h for f = 4h, x = 2)
//   backward: the same kernels read their saved input and the gradient and write the gradient:
//             norms 2·3xh, dropout-adds 2·(3xh + h), activation x(2·mlp_in + f)     (50h)
//   weight  : bias gradients read each linear layer's output gradient once, x(3h + 2k + mlp_in)
// Without flash attention, the materialised scores add a scale-mask-softmax and dropout
// ((4x + 1) bytes per score forward, (5x + 1) backward; a·s scores per token).
constexpr pass_work layer_elementwise_bytes_per_token(const transformer& t) noexcept {
  const double h = t.hidden, x = t.bytes.activation, f = t.ffn_size(), mi = t.mlp_in();
  pass_work pw;
  pw.f.memory_bytes = 10 * x * h + 2 * h + x * (mi + f);
  pw.b.memory_bytes = 12 * x * h + 2 * h + x * (2 * mi + f);
  pw.w.memory_bytes = x * (3 * h + 2 * t.kv_width() + mi);
  if (!t.flash_attention) {
    const double scores = double(t.heads) * t.seq;
    pw.f.memory_bytes += (4 * x + 1) * scores;
    pw.b.memory_bytes += (5 * x + 1) * scores;
  }
  return pw;
}

// One transformer layer, one microbatch. F: the GEMMs, the attention core, the elementwise
// kernels. B (input gradient): every GEMM's data gradient (as many FLOPs as its forward), the
// attention core's whole backward (2 × its forward: it has no weights), the elementwise
// backward. W (weight gradient): every GEMM's weight gradient (as many FLOPs as its forward).
// F + B + W = 3 × F in FLOPs. With full recomputation B also re-runs F. Without flash attention
// the attention core runs as batched GEMMs.
constexpr pass_work layer_work(const transformer& t) noexcept {
  const double n = t.tokens();
  const double gemm = layer_gemm_flops(t), attn = layer_attention_flops(t);
  const pass_work bytes = layer_elementwise_bytes_per_token(t);
  pass_work pw;
  pw.f = {gemm, attn, n * bytes.f.memory_bytes};
  pw.b = {gemm, 2 * attn, n * bytes.b.memory_bytes};
  pw.w = {gemm, 0, n * bytes.w.memory_bytes};
  if (!t.flash_attention) {
    pw.f = {gemm + attn, 0, pw.f.memory_bytes};
    pw.b = {gemm + 2 * attn, 0, pw.b.memory_bytes};
  }
  if (t.recompute) pw.b += pw.f;
  return pw;
}

// Input embedding, one microbatch: a gather of n rows (read and write x·h bytes per token; with
// learned positions, an add of the position rows, 3xh more). No B (token ids have no gradient).
// W: the scatter-add of the output gradient into the embedding's gradient rows (read x·h, read
// and write the gradient rows), the same for the position table.
constexpr pass_work embedding_work(const transformer& t) noexcept {
  const double n = t.tokens(), h = t.hidden, x = t.bytes.activation, g = t.bytes.gradient;
  const double tables = t.learned_positions ? 2 : 1;
  pass_work pw;
  pw.f.memory_bytes = n * (2 * x * h + (t.learned_positions ? 3 * x * h : 0));
  pw.w.memory_bytes = tables * n * (x * h + 2 * g * h);
  return pw;
}

// Output layer, one microbatch: final layer norm, LM head GEMM 2nhV, softmax/cross-entropy
// (memory-bound: t.ce bytes per logit) and the loss. B: the ∇X GEMM 2nhV, the cross-entropy and
// norm backward. W: the ∇W GEMM 2nhV.
constexpr pass_work output_work(const transformer& t) noexcept {
  const double n = t.tokens(), h = t.hidden, x = t.bytes.activation, logits = n * t.vocab;
  const double gemm = 2 * n * h * t.vocab;
  pass_work pw;
  pw.f = {gemm, 0, n * 2 * x * h + logits * t.ce.forward_bytes};
  pw.b = {gemm, 0, n * 3 * x * h + logits * t.ce.backward_bytes};
  pw.w = {gemm, 0, 0};
  return pw;
}

// Vocabulary entries per rank when the vocabulary is sharded over `ranks` ranks: V padded up to a
// multiple of the ranks (the reference pads to make_vocab_size_divisible_by · tp · pp).
constexpr double vocab_shard(const transformer& t, int ranks) noexcept {
  return double((t.vocab + ranks - 1) / ranks);
}

// One rank's share of the vocabulary layers under vocabulary parallelism, one microbatch.
struct vocab_parallel_work {
  work s;        // output layer, forward statistics pass (on every rank)
  work t;        // output layer, gradient pass (on every rank)
  work t_input;  // ... the part of T that produces ∇X (two-barrier and naive: the ∇X GEMM)
  work input_f;  // input embedding forward IF (masked gather of the shard's rows)
  work input_b;  // input embedding backward IB (scatter-add of the shard's rows)
};

// The S/T split (reference notes §4–6): every algorithm runs the logits GEMM and the softmax
// forward in S and the ∇W GEMM in T. The ∇X GEMM sits in T for naive sharding and Algorithm 1;
// Algorithm 2 moves it into S as A = P·W (plus a row gather G of the targets' weights).
constexpr vocab_parallel_work vocab_work(const transformer& t, int ranks, vocab_algorithm alg) {
  if (ranks < 1) fail("pipit: vocab_work(): ranks must be >= 1 (got ", ranks, ")");
  const double n = t.tokens(), h = t.hidden, x = t.bytes.activation, g = t.bytes.gradient;
  const double shard = vocab_shard(t, ranks), logits = n * shard, gemm = 2 * n * h * shard;
  vocab_parallel_work v;
  v.s = {gemm, 0, logits * t.ce.forward_bytes};
  v.t = {gemm, 0, logits * t.ce.backward_bytes};
  if (alg == vocab_algorithm::one_barrier) {
    v.s += work{gemm, 0, n * x * h};  // A = P·W and the gather G
  } else {
    v.t_input = {gemm, 0, 0};
    v.t += v.t_input;
  }
  v.input_f.memory_bytes = n * 2 * x * h;
  // IB: every rank reads the broadcast gradient, scatter-adds its own tokens (1/ranks of them).
  v.input_b.memory_bytes = n * x * h + n / ranks * (x * h + 2 * g * h);
  return v;
}

// Model FLOPs of one iteration (m microbatches): 3 × the forward FLOPs of the layers and the LM
// head; no recomputation, no embedding, no elementwise work. This is what MFU divides by, as in
// the vocabulary paper's artifact: 3·(2BshV + L·(8Bsh² + 4Bs²h + 4Bsh·FH)), B = m·b sequences
// (reference notes, vocabulary_parallelism.md §1).
constexpr double model_flops_per_iteration(const transformer& t, int microbatches) noexcept {
  const double layer_f = layer_gemm_flops(t) + layer_attention_flops(t);
  const double head_f = 2 * t.tokens() * t.hidden * double(t.vocab);
  return 3.0 * microbatches * (t.layers * layer_f + head_f);
}

// The LM head's forward FLOPs in transformer-layer forwards: V / (12h + 2s) for an MHA layer with
// f = 4h (reference notes, vocabulary_parallelism.md §1). Here from the general counts.
constexpr double output_layer_in_layers(const transformer& t) noexcept {
  return 2 * t.tokens() * t.hidden * double(t.vocab) /
         (layer_gemm_flops(t) + layer_attention_flops(t));
}

}  // namespace pipit::cost
