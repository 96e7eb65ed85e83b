// Host side of token_model_reference.hpp: tests/support/vocab_model.hpp's reference, with its
// parameters drawn in float (what the device holds; rounded to bfloat16 on request) and widened
// to double.
#include "token_model_reference.hpp"

#include <bit>
#include <cstddef>
#include <cstdint>

#include "support/vocab_model.hpp"

namespace pipit_test {

namespace {

pipit::testing::token_model_config config(const token_model& m) {
  pipit::testing::token_model_config c;
  c.vocab = m.vocab;
  c.hidden = m.hidden;
  c.layers = m.layers;
  c.tokens = m.tokens;
  c.seed = m.seed;
  return c;
}

// The nearest bfloat16 (8 significant bits), ties to even, as a float; finite inputs only (the
// parameters are small random values).
float round_bf16(float x) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::bit_cast<float>(u & 0xffff0000u);
}

// The parameter as the device holds it: float, or float rounded to bfloat16.
template <class M>
auto held(const token_model& m, M x) {
  if (m.bf16_parameters) x = x.unaryExpr([](float a) { return round_bf16(a); });
  return x;
}

template <class M>
std::vector<float> flat_float(const M& x) {
  std::vector<float> out;
  out.reserve(static_cast<std::size_t>(x.size()));
  for (Eigen::Index i = 0; i < x.rows(); ++i)
    for (Eigen::Index j = 0; j < x.cols(); ++j) out.push_back(x(i, j));
  return out;
}

template <class M>
std::vector<double> flat_double(const M& x) {
  std::vector<double> out;
  out.reserve(static_cast<std::size_t>(x.size()));
  for (Eigen::Index i = 0; i < x.rows(); ++i)
    for (Eigen::Index j = 0; j < x.cols(); ++j) out.push_back(x(i, j));
  return out;
}

}  // namespace

std::vector<float> token_embedding(const token_model& m) {
  return flat_float(held(m, pipit::testing::embedding_table<float>(config(m))));
}
std::vector<float> token_head(const token_model& m) {
  return flat_float(held(m, pipit::testing::head_table<float>(config(m))));
}
std::vector<float> token_layer_weight(const token_model& m, int layer) {
  return flat_float(held(m, pipit::testing::layer_weight<float>(config(m), layer)));
}
std::vector<float> token_layer_bias(const token_model& m, int layer) {
  return flat_float(held(m, pipit::testing::layer_bias<float>(config(m), layer)));
}

token_batch_data token_batch(const token_model& m, int microbatches, std::uint64_t index) {
  const auto b = pipit::testing::make_batch(config(m), microbatches, index);
  return {b.tokens, b.targets};
}

token_step token_reference(const token_model& m, int microbatches, std::uint64_t index) {
  const auto c = config(m);
  pipit::testing::vocab_reference ref(c);
  // The device holds float parameters: the reference starts from the same values.
  ref.e = held(m, pipit::testing::embedding_table<float>(c)).cast<double>();
  ref.h = held(m, pipit::testing::head_table<float>(c)).cast<double>();
  for (int l = 0; l < c.layers; ++l) {
    ref.w[static_cast<std::size_t>(l)] =
        held(m, pipit::testing::layer_weight<float>(c, l)).cast<double>();
    ref.b[static_cast<std::size_t>(l)] =
        held(m, pipit::testing::layer_bias<float>(c, l)).cast<double>();
  }
  ref.step(pipit::testing::make_batch(c, microbatches, index), microbatches);
  token_step out;
  out.loss = ref.loss;
  out.valid = ref.valid;
  out.ge = flat_double(ref.ge);
  out.gh = flat_double(ref.gh);
  for (int l = 0; l < c.layers; ++l) {
    out.gw.push_back(flat_double(ref.gw[static_cast<std::size_t>(l)]));
    out.gb.push_back(flat_double(ref.gb[static_cast<std::size_t>(l)]));
  }
  return out;
}

}  // namespace pipit_test
