#pragma once
// The host reference for the CUDA vocabulary tests: pipit::vocab's output layer (through its
// comm::threads driver) in double precision, compiled by the host compiler (it needs Eigen),
// plus the random problems of tests/unit/vocab_test.cpp. No CUDA header here.

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "pipit/vocab/loss.hpp"

namespace pipit_test {

enum class algorithm { naive, two_barrier, one_barrier };

struct vocab_problem {
  std::int64_t tokens = 0, hidden = 0, vocab = 0;
  int ranks = 1;
  std::int64_t pad_multiple = 1;
  std::vector<double> x;              // tokens x hidden
  std::vector<double> w;              // vocab x hidden (unpadded)
  std::vector<std::int64_t> targets;  // ids or opt.ignore_index
  std::vector<double> weights;        // empty or one per token
  pipit::vocab::loss_options opt;
};

struct vocab_shape {
  std::int64_t tokens, hidden, vocab;
  int ranks;
  std::int64_t pad_multiple;
};

struct vocab_reference_result {
  pipit::vocab::loss_result<double> loss{};
  std::vector<double> dx;  // tokens x hidden
  std::vector<double> dw;  // vocab x hidden: the real rows of every shard, in id order
};

// Inputs rounded through `round` (the device element type's rounding), so that the reference
// sees exactly what the device sees.
template <class Round>
vocab_problem make_vocab_problem(std::mt19937_64& rng, vocab_shape s, Round round,
                                 double logit_scale = 3.0, double ignore_fraction = 0.15,
                                 bool with_weights = false) {
  vocab_problem p;
  p.tokens = s.tokens;
  p.hidden = s.hidden;
  p.vocab = s.vocab;
  p.ranks = s.ranks;
  p.pad_multiple = s.pad_multiple;
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  const double xs = std::sqrt(logit_scale), ws = std::sqrt(logit_scale / double(s.hidden));
  for (std::int64_t i = 0; i < s.tokens * s.hidden; ++i) p.x.push_back(round(xs * u(rng)));
  for (std::int64_t i = 0; i < s.vocab * s.hidden; ++i) p.w.push_back(round(ws * u(rng)));
  std::uniform_int_distribution<std::int64_t> id(0, s.vocab - 1);
  std::uniform_real_distribution<double> f(0.0, 1.0);
  for (std::int64_t t = 0; t < s.tokens; ++t)
    p.targets.push_back(f(rng) < ignore_fraction ? p.opt.ignore_index : id(rng));
  if (with_weights)
    for (std::int64_t t = 0; t < s.tokens; ++t)
      p.weights.push_back(f(rng) < 0.2 ? 0.0 : 2 * f(rng));
  return p;
}

vocab_shape random_vocab_shape(std::mt19937_64& rng);

// vocab::output_layer_forward_backward<Alg, 7> in double on p.ranks comm::threads ranks.
vocab_reference_result host_reference(const vocab_problem& p, algorithm alg);

}  // namespace pipit_test
