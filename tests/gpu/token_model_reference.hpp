#pragma once
// The token-MLP model of tests/support/vocab_model.hpp (an embedding, L tanh layers per token,
// an output layer with softmax cross-entropy), exposed without Eigen for the CUDA tests:
// parameters as float, the batch, and one step's double-precision objective and gradients.
// Compiled by the host compiler (token_model_reference.cpp).

#include <cstdint>
#include <vector>

namespace pipit_test {

struct token_model {
  std::int64_t vocab = 301;
  int hidden = 32;
  int layers = 4;
  int tokens = 24;  // per microbatch
  std::uint64_t seed = 11;
  // Every parameter rounded to the nearest bfloat16 (ties to even), in float: a bfloat16 device
  // copy then holds exactly what the reference computes with (the 16-bit tests).
  bool bf16_parameters = false;
};

// Row-major parameters, identical on every rank and in the reference.
std::vector<float> token_embedding(const token_model& m);                // vocab x hidden
std::vector<float> token_head(const token_model& m);                     // vocab x hidden
std::vector<float> token_layer_weight(const token_model& m, int layer);  // hidden x hidden
std::vector<float> token_layer_bias(const token_model& m, int layer);    // hidden

struct token_batch_data {
  std::vector<std::int64_t> tokens, targets;  // microbatches x tokens; some targets ignored
};
token_batch_data token_batch(const token_model& m, int microbatches, std::uint64_t index);

// One step on batch `index` in double, from the float parameters above (converted exactly;
// rounded to bfloat16 first when m.bf16_parameters).
struct token_step {
  double loss = 0;  // mean over microbatches of each microbatch's mean token loss
  std::int64_t valid = 0;
  std::vector<double> ge, gh;               // vocab x hidden
  std::vector<std::vector<double>> gw, gb;  // per layer: hidden x hidden, hidden
};
token_step token_reference(const token_model& m, int microbatches, std::uint64_t index);

}  // namespace pipit_test
