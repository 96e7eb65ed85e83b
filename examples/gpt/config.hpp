#pragma once
// model_config: the size of the decoder-only transformer (GPT-2 shape: pre-layer-norm blocks,
// learned positions, GELU MLP of width 4h, untied output layer) and of one microbatch.

#include <cstdint>

#include "pipit/core/error.hpp"

namespace gpt {

struct model_config {
  int vocab = 256;         // V: token ids 0 .. V - 1
  int seq = 32;            // S: tokens per sequence (the context length)
  int hidden = 64;         // d
  int heads = 4;           // attention heads; d % heads == 0
  int layers = 4;          // transformer blocks
  int ffn_mult = 4;        // MLP width = ffn_mult * d
  int batch = 4;           // sequences per microbatch
  std::uint64_t seed = 1;  // parameter initialisation
  double init_std = 0.02;  // GPT-2's initialisation scale

  int ffn() const noexcept { return ffn_mult * hidden; }
  int head_dim() const noexcept { return hidden / heads; }
  int tokens() const noexcept { return batch * seq; }  // tokens per microbatch
};

// Throws pipit::error naming the first bad value.
inline const model_config& check(const model_config& c) {
  if (c.vocab < 2) pipit::fail("gpt: vocab must be >= 2 (got ", c.vocab, ")");
  if (c.seq < 1) pipit::fail("gpt: seq must be >= 1 (got ", c.seq, ")");
  if (c.hidden < 1) pipit::fail("gpt: hidden must be >= 1 (got ", c.hidden, ")");
  if (c.heads < 1 || c.hidden % c.heads != 0)
    pipit::fail("gpt: heads (", c.heads, ") must be >= 1 and divide hidden (", c.hidden, ")");
  if (c.layers < 1) pipit::fail("gpt: layers must be >= 1 (got ", c.layers, ")");
  if (c.ffn_mult < 1) pipit::fail("gpt: ffn_mult must be >= 1 (got ", c.ffn_mult, ")");
  if (c.batch < 1) pipit::fail("gpt: batch must be >= 1 (got ", c.batch, ")");
  if (!(c.init_std > 0)) pipit::fail("gpt: init_std must be > 0 (got ", c.init_std, ")");
  return c;
}

// Parameter tensors are numbered so that their initial values do not depend on where they live.
enum class tensor_id : std::uint64_t {
  ln1_gamma,
  ln1_beta,
  qkv_w,
  qkv_b,
  proj_w,
  proj_b,
  ln2_gamma,
  ln2_beta,
  fc1_w,
  fc1_b,
  fc2_w,
  fc2_b,
  token_embedding = 100,
  position_embedding,
  final_gamma,
  final_beta,
  head_w
};

// The key of a tensor of transformer block `layer` (layer -1: tensors outside the blocks).
inline std::uint64_t tensor_key(int layer, tensor_id t) {
  return (static_cast<std::uint64_t>(layer + 1) << 8) | static_cast<std::uint64_t>(t);
}

}  // namespace gpt
