#pragma once
// Counter-based randomness: every random number the example draws is a hash of the seed and the
// coordinates of what it is for (tensor, element; step, microbatch, sequence), so that a model
// initialised or a batch drawn on one rank is bit-identical to the same one drawn on another, in
// any partition and any order.

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "pipit/runtime/pass_info.hpp"

namespace gpt {

inline std::uint64_t hash_of(std::initializer_list<std::uint64_t> xs) {
  std::uint64_t h = 0x243f6a8885a308d3ULL;
  for (const std::uint64_t x : xs) h = pipit::runtime::mix_seed(h ^ x);
  return h;
}

// Uniform in [0, 1) with 53 random bits.
inline double unit01(std::uint64_t h) {
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

// A standard normal from two hashes (Box-Muller).
inline double normal(std::uint64_t h) {
  const double u1 = 1.0 - unit01(h);  // (0, 1]: log is finite
  const double u2 = unit01(pipit::runtime::mix_seed(h ^ 0x5851f42d4c957f2dULL));
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// A small sequential generator (splitmix64) for long streams such as a sampled sequence.
struct splitmix {
  std::uint64_t state;
  std::uint64_t next() {
    state += 0x9e3779b97f4a7c15ULL;
    std::uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  double uniform() { return unit01(next()); }
};

}  // namespace gpt
