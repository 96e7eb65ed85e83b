#pragma once
// tensor_parallel: what one rank of a tensor-parallel group of t ranks does, stores and sends for
// one microbatch of one transformer layer (and of the output layer and the input embedding), in
// Megatron-LM's layout (Shoeybi et al., "Megatron-LM", arXiv 1909.08053; Narayanan et al., SC'21,
// arXiv 2104.04473, §2.3; reference notes, schedules.md §11):
//   - QKV and the MLP's first matrix are column-parallel (split by heads, grouped KV heads whole;
//     the MLP on its inner dimension), the attention projection and the MLP's second matrix
//     row-parallel: every GEMM and the attention core are split t ways;
//   - the layer norms, the bias-dropout-residual adds, the row-parallel biases and the inputs of
//     the column-parallel GEMMs are replicated on every rank, unless sequence parallelism splits
//     them along the sequence (Korthikanti et al., "Reducing Activation Recomputation in Large
//     Transformer Models", MLSys 2023, §4.2.2);
//   - communication per layer per microbatch: the f/g operator pairs of attention and MLP, two
//     all-reduces of n·h activations forward and two backward; with sequence parallelism an
//     all-gather and a reduce-scatter in place of each all-reduce (same volume);
//   - the LM head and the input embedding are split over the vocabulary (V/t rows each); the
//     output layer's cross-entropy merges its softmax statistics with three all-reduces of n fp32
//     values forward (max, target logit, sum), its input gradient with an all-reduce of n·h
//     backward; the embedding's output is all-reduced forward (n·h).
// Activation bytes per token (16-bit, flash attention off): 10h + 24h/t + 5as/t without sequence
// parallelism, 34h/t + 5as/t with it (Korthikanti et al., Table 2). With t = 1 every function
// here gives what its unsharded namesake in flops.hpp / memory.hpp gives.

#include <algorithm>

#include "pipit/core/error.hpp"
#include "pipit/cost/communication.hpp"
#include "pipit/cost/flops.hpp"
#include "pipit/cost/hardware.hpp"
#include "pipit/cost/memory.hpp"
#include "pipit/cost/transformer.hpp"
#include "pipit/cost/work.hpp"

namespace pipit::cost {

struct tensor_parallel {
  int size = 1;                    // t, ranks of the tensor-parallel group
  bool sequence_parallel = false;  // norms, dropouts and their activations split over the sequence

  // Divisor of the parts that are replicated without sequence parallelism.
  constexpr double replicated_share() const noexcept { return sequence_parallel ? size : 1; }
  friend constexpr bool operator==(const tensor_parallel&, const tensor_parallel&) = default;
};

// Throws pipit::error naming the rule and the values unless t splits the model: t divides the
// heads and the key/value heads (a KV head is never split), the FFN size, and with sequence
// parallelism the sequence length.
constexpr const tensor_parallel& check(const tensor_parallel& tp, const transformer& t) {
  if (tp.size < 1) fail("pipit: tensor parallel size must be >= 1 (got ", tp.size, ")");
  if (t.heads % tp.size != 0 || t.kv() % tp.size != 0)
    fail("pipit: tensor parallel size ", tp.size, " must divide the heads (", t.heads,
         ") and the key/value heads (", t.kv(), ")");
  if (t.ffn_size() % tp.size != 0)
    fail("pipit: tensor parallel size ", tp.size, " must divide the FFN size (", t.ffn_size(), ")");
  if (tp.sequence_parallel && t.seq % tp.size != 0)
    fail("pipit: sequence parallelism: tensor parallel size ", tp.size,
         " must divide the sequence length (", t.seq, ")");
  return tp;
}

// One rank's work of one layer, one microbatch: the GEMMs and the attention core split t ways;
// the memory-bound kernels (flops.hpp, layer_elementwise_bytes_per_token) split where they act
// on split tensors — the MLP activation, the QKV and MLP-in bias gradients, the scores — and
// otherwise replicated (split with sequence parallelism).
constexpr pass_work layer_work(const transformer& t, const tensor_parallel& tp) noexcept {
  const double n = t.tokens(), h = t.hidden, x = t.bytes.activation, f = t.ffn_size(),
               mi = t.mlp_in(), k = t.kv_width(), ts = tp.size, rs = tp.replicated_share();
  const double gemm = layer_gemm_flops(t) / ts, attn = layer_attention_flops(t) / ts;
  pass_work pw;
  pw.f = {gemm, attn, n * ((10 * x * h + 2 * h) / rs + x * (mi + f) / ts)};
  pw.b = {gemm, 2 * attn, n * ((12 * x * h + 2 * h) / rs + x * (2 * mi + f) / ts)};
  pw.w = {gemm, 0, n * (x * (h + 2 * k + mi) / ts + x * 2 * h / rs)};
  if (!t.flash_attention) {
    const double scores = double(t.heads) * t.seq / ts;
    pw.f = {gemm + attn, 0, pw.f.memory_bytes + n * (4 * x + 1) * scores};
    pw.b = {gemm + 2 * attn, 0, pw.b.memory_bytes + n * (5 * x + 1) * scores};
  }
  if (t.recompute) pw.b += pw.f;
  return pw;
}

// Activation bytes one rank stores per token of one layer (memory.hpp's breakdown): replicated
// without sequence parallelism are the QKV input (xh), the attention dropout mask (h), the MLP
// input (xh), the MLP dropout mask (h) and the two norms' inputs (2xh) — 10h at x = 2; split are
// Q, K, V and the projection input (x(2h + 2k)), the MLP activation's input and output
// (x(mlp_in + f)) and the scores — 24h/t + 5as/t at x = 2.
constexpr double layer_activation_bytes_per_token(const transformer& t,
                                                  const tensor_parallel& tp) noexcept {
  const double h = t.hidden, x = t.bytes.activation, ts = tp.size, rs = tp.replicated_share();
  if (t.recompute) return x * h / rs;
  double split = x * (2 * h + 2 * t.kv_width()) + x * (t.mlp_in() + t.ffn_size());
  if (!t.flash_attention) split += (2 * x + 1) * double(t.heads) * t.seq;
  return (4 * x * h + 2 * h) / rs + split / ts;
}

// Of those, what the weight-gradient pass keeps: the linear layers' inputs (QKV xh and MLP xh
// replicated, projection xh and MLP-out x·f split) and their output gradients (QKV x(h + 2k) and
// MLP-in x·mlp_in split, projection xh and MLP-out xh replicated).
constexpr double layer_weight_grad_bytes_per_token(const transformer& t,
                                                   const tensor_parallel& tp) noexcept {
  if (t.recompute) return 0;
  const double h = t.hidden, x = t.bytes.activation, ts = tp.size, rs = tp.replicated_share();
  return x * (2 * h + 2 * h) / rs +
         x * (h + t.ffn_size() + (h + 2 * t.kv_width()) + t.mlp_in()) / ts;
}

constexpr double layer_activation_bytes(const transformer& t, const tensor_parallel& tp) noexcept {
  return t.tokens() * layer_activation_bytes_per_token(t, tp);
}
constexpr double layer_weight_grad_bytes(const transformer& t, const tensor_parallel& tp) noexcept {
  return t.tokens() * layer_weight_grad_bytes_per_token(t, tp);
}
// The MLP intermediate and its gradient (and the scores) are split.
constexpr double layer_workspace_bytes(const transformer& t, const tensor_parallel& tp) noexcept {
  return layer_workspace_bytes(t) / tp.size;
}

// One rank's parameters of one layer: the column-parallel weights and biases and the
// row-parallel weights split; the row-parallel biases (h each) and the norms (4h) replicated.
constexpr double layer_parameters(const transformer& t, const tensor_parallel& tp) noexcept {
  const double h = t.hidden, k = t.kv_width(), f = t.ffn_size(), mi = t.mlp_in(), ts = tp.size;
  return (h * (h + 2 * k) + (h + 2 * k) + h * h + h * mi + mi + f * h) / ts + h + h + 4 * h;
}

// Vocabulary entries one rank of the group holds (V padded up to a multiple of t).
constexpr double vocab_entries(const transformer& t, const tensor_parallel& tp) noexcept {
  return vocab_shard(t, tp.size);
}

// The output layer on one rank: the final norm (replicated) and V/t rows of the LM head with
// their cross-entropy.
constexpr pass_work output_work(const transformer& t, const tensor_parallel& tp) noexcept {
  const double n = t.tokens(), h = t.hidden, x = t.bytes.activation, rs = tp.replicated_share();
  const double rows = vocab_entries(t, tp), logits = n * rows, gemm = 2 * n * h * rows;
  pass_work pw;
  pw.f = {gemm, 0, n * 2 * x * h / rs + logits * t.ce.forward_bytes};
  pw.b = {gemm, 0, n * 3 * x * h / rs + logits * t.ce.backward_bytes};
  pw.w = {gemm, 0, 0};
  return pw;
}
constexpr double output_parameters(const transformer& t, const tensor_parallel& tp) noexcept {
  return 2.0 * t.hidden + vocab_entries(t, tp) * t.hidden;
}
// The input embedding: V/t rows; every rank gathers (masked) for all n tokens.
constexpr double embedding_parameters(const transformer& t, const tensor_parallel& tp) noexcept {
  return vocab_entries(t, tp) * t.hidden + (t.learned_positions ? double(t.seq) * t.hidden : 0.0);
}

// Seconds of one layer's tensor-parallel communication for one microbatch over `link`: forward
// and backward (the backward repeats the forward's collectives under full recomputation).
struct comm_seconds {
  double forward = 0;
  double backward = 0;
};

// One f/g collective: an all-reduce of the n·h activations, or with sequence parallelism the
// all-gather or reduce-scatter that replaces each half of it (comm_seconds counts both halves).
constexpr double tensor_collective_time(const transformer& t, const tensor_parallel& tp,
                                        const channel& link) noexcept {
  const double bytes = activation_message_bytes(t);
  return tp.sequence_parallel
             ? all_gather_time(link, tp.size, bytes) + reduce_scatter_time(link, tp.size, bytes)
             : all_reduce_time(link, tp.size, bytes);
}

// Attention and MLP each have one collective forward (g after the row-parallel GEMM) and one
// backward (f before the column-parallel GEMM): 2 + 2 per layer.
constexpr comm_seconds layer_comm_time(const transformer& t, const tensor_parallel& tp,
                                       const channel& link) noexcept {
  const double one = tensor_collective_time(t, tp, link);
  comm_seconds c{2 * one, 2 * one};
  if (t.recompute) c.backward += c.forward;
  return c;
}

// The output layer: the softmax statistics' three all-reduces of n fp32 values forward, the LM
// head input gradient's collective backward.
constexpr comm_seconds output_comm_time(const transformer& t, const tensor_parallel& tp,
                                        const channel& link) noexcept {
  return {3 * all_reduce_time(link, tp.size, 4.0 * t.tokens()),
          tensor_collective_time(t, tp, link)};
}

// The input embedding: its output's collective forward; nothing backward (no input gradient).
constexpr comm_seconds embedding_comm_time(const transformer& t, const tensor_parallel& tp,
                                           const channel& link) noexcept {
  return {tensor_collective_time(t, tp, link), 0};
}

// The activation one stage sends the next for one microbatch, between two tensor-parallel
// groups. Without sequence parallelism every rank of the group holds the same n·h output; with
// Megatron's scatter/gather optimisation (SC'21 §4.1) each sends a disjoint 1/t of it and the
// receivers all-gather it over the group's (intra-node) link. With sequence parallelism the
// output is already split.
constexpr double stage_transfer_time(const transformer& t, const tensor_parallel& tp,
                                     const channel& p2p, const channel& group_link,
                                     bool scatter_gather = true) noexcept {
  const double bytes = activation_message_bytes(t);
  if (tp.size == 1) return p2p_time(p2p, bytes);
  if (tp.sequence_parallel) return p2p_time(p2p, bytes / tp.size);
  if (!scatter_gather) return p2p_time(p2p, bytes);
  return p2p_time(p2p, bytes / tp.size) + all_gather_time(group_link, tp.size, bytes);
}

}  // namespace pipit::cost
