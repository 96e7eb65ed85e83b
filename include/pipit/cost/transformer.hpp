#pragma once
// transformer: the description of a decoder-only transformer the cost model reads — its shape
// (layers, hidden size, heads, FFN size, vocabulary), one microbatch's size (sequence length,
// sequences), the storage sizes of its numbers, and the few implementation choices that change
// FLOPs or bytes (flash attention, full activation recomputation, the output layer's
// softmax/cross-entropy kernels). check() refuses a bad description with the offending values.

#include "pipit/core/error.hpp"

namespace pipit::cost {

// Bytes per stored number. The defaults are mixed-precision Adam as Megatron-LM trains: 16-bit
// weights, fp32 gradient accumulation (`main_grad`) and 12 bytes of optimizer state per parameter
// (fp32 master weight, Adam momentum and variance) — 18 bytes per parameter, the Megatron Core
// distributed-optimizer guide's "float16 param, fp32 grads" row. ZeRO's accounting (Rajbhandari et
// al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", SC'20, §3.1) keeps
// 16-bit gradients: gradient = 2, 16 bytes per parameter.
struct precision {
  int activation = 2;  // activations kept for the backward (fp16/bf16)
  int parameter = 2;   // the weights the kernels read
  int gradient = 4;    // weight gradients (fp32 accumulation)
  int optimizer = 12;  // optimizer state per parameter
};

// The output layer's softmax/cross-entropy is memory-bound: its cost is bytes moved per logit
// (one logit = one token × one vocabulary entry), not FLOPs. The defaults count Megatron's unfused
// fp32 cross-entropy (megatron/core/tensor_parallel/cross_entropy.py, step by step in the
// reference notes, vocabulary_parallelism.md §12.1) over 16-bit logits from the LM-head GEMM:
//   forward : cast to fp32 (read 2, write 4), row max (read 4), subtract the max in place (8),
//             exp in place (8), row sum (read 4), normalise in place (8)           = 38 bytes
//   backward: scale the saved softmax by the loss gradient in place (8), cast to 16 bits for the
//             two GEMMs (read 4, write 2)                                          = 14 bytes
//   saved   : the fp32 softmax, kept from the forward to the backward              =  4 bytes
//   workspace during the forward, beyond what is saved: the 16-bit logits and one more fp32 copy
//             ("an fp32 copy of [s, b, V/t] plus a saved softmax of the same size", ibid.) = 6
// A fused linear-cross-entropy kernel (Liger, Apple's CCE) has far smaller numbers.
struct cross_entropy {
  double forward_bytes = 38;   // moved per logit by the forward
  double backward_bytes = 14;  // moved per logit by the backward
  double saved_bytes = 4;      // kept per logit from forward to backward
  double workspace_bytes = 6;  // transient per logit during the forward, beyond saved_bytes
};

struct transformer {
  int layers = 0;                  // transformer layers L
  int hidden = 0;                  // hidden size h
  int heads = 0;                   // attention heads a
  int kv_heads = 0;                // key/value heads (grouped-query attention); 0: = heads
  int ffn = 0;                     // FFN inner size; 0: 4h
  int seq = 0;                     // sequence length s
  int vocab = 0;                   // vocabulary size V
  int microbatch_size = 1;         // sequences per microbatch b
  bool gated_mlp = false;          // SwiGLU-style MLP: three h×ffn matrices instead of two
  bool learned_positions = false;  // GPT-2/Megatron-GPT learned position embedding (s × h)
  bool flash_attention = true;     // attention scores are never stored (5as bytes/token saved)
  bool recompute = false;          // full activation recomputation: keep only each layer's input
  precision bytes{};
  cross_entropy ce{};

  constexpr int kv() const noexcept { return kv_heads > 0 ? kv_heads : heads; }
  constexpr int ffn_size() const noexcept { return ffn > 0 ? ffn : 4 * hidden; }
  constexpr int head_dim() const noexcept { return hidden / heads; }
  // Width of the key (or the value) projection: kv heads × head dimension.
  constexpr double kv_width() const noexcept { return double(kv()) * head_dim(); }
  // Output width of the first MLP matrix (two matrices side by side when gated).
  constexpr double mlp_in() const noexcept { return (gated_mlp ? 2.0 : 1.0) * ffn_size(); }
  // Tokens in one microbatch, n = b·s.
  constexpr double tokens() const noexcept { return double(microbatch_size) * seq; }
};

// Throws pipit::error naming the first broken rule and the values; returns the description.
constexpr const transformer& check(const transformer& t) {
  if (t.layers < 1) fail("pipit: transformer: layers must be >= 1 (got ", t.layers, ")");
  if (t.hidden < 1) fail("pipit: transformer: hidden must be >= 1 (got ", t.hidden, ")");
  if (t.heads < 1) fail("pipit: transformer: heads must be >= 1 (got ", t.heads, ")");
  if (t.hidden % t.heads != 0)
    fail("pipit: transformer: heads (", t.heads, ") must divide hidden (", t.hidden,
         "): ", t.hidden, " % ", t.heads, " = ", t.hidden % t.heads);
  if (t.kv_heads < 0 || (t.kv_heads > 0 && t.heads % t.kv_heads != 0))
    fail("pipit: transformer: kv_heads (", t.kv_heads, ") must divide heads (", t.heads,
         ") (0 means kv_heads = heads)");
  if (t.ffn < 0) fail("pipit: transformer: ffn must be >= 0 (got ", t.ffn, "; 0 means 4 * hidden)");
  if (t.seq < 1) fail("pipit: transformer: seq must be >= 1 (got ", t.seq, ")");
  if (t.vocab < 1) fail("pipit: transformer: vocab must be >= 1 (got ", t.vocab, ")");
  if (t.microbatch_size < 1)
    fail("pipit: transformer: microbatch_size must be >= 1 (got ", t.microbatch_size, ")");
  if (t.bytes.activation < 1 || t.bytes.parameter < 1 || t.bytes.gradient < 1 ||
      t.bytes.optimizer < 0)
    fail("pipit: transformer: byte sizes must be >= 1 (optimizer >= 0): activation=",
         t.bytes.activation, " parameter=", t.bytes.parameter, " gradient=", t.bytes.gradient,
         " optimizer=", t.bytes.optimizer);
  if (t.ce.forward_bytes < 0 || t.ce.backward_bytes < 0 || t.ce.saved_bytes < 0 ||
      t.ce.workspace_bytes < 0)
    fail("pipit: transformer: cross-entropy byte counts must be >= 0");
  return t;
}

}  // namespace pipit::cost
