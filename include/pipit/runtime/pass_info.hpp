#pragma once
// pass_info: what the executor tells the user's stage about the pass it asks for — which local
// chunk, virtual stage and microbatch, which training step, and a seed for any randomness the
// pass draws. The seed depends only on (executor seed, step, virtual stage, microbatch), so a
// forward that re-materialization runs again before the backward sees the same seed as the
// first time (the contract that keeps recomputation exact; lingvo's GPipe does the same with a
// per-microbatch step value, torchgpipe saves and restores the RNG state).

#include <cstdint>

namespace pipit::runtime {

struct pass_info {
  int chunk = 0;           // model chunk local to this rank: 0 .. chunks - 1
  int stage = 0;           // virtual stage: 0 .. stages * chunks - 1
  int microbatch = 0;      // 0 .. microbatches - 1
  std::uint64_t step = 0;  // training step: the executor's run() count (plus options.first_step)
  std::uint64_t seed = 0;  // per (executor seed, step, stage, microbatch); equal on recomputation
  bool first = false;      // stage == 0: the input comes from the user's data, not a peer
  bool last = false;       // the last virtual stage: the pass computes the loss and its gradient
  bool recompute = false;  // a forward run again by re-materialization (suppress side effects)
};

// splitmix64's finalizer (Steele, Lea, Flood, "Fast splittable pseudorandom number generators",
// OOPSLA 2014): a bijective mix, so distinct inputs chain into distinct-looking seeds.
constexpr std::uint64_t mix_seed(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The seed of one pass: a function of these four values only.
constexpr std::uint64_t pass_seed(std::uint64_t seed, std::uint64_t step, int stage,
                                  int microbatch) noexcept {
  std::uint64_t h = mix_seed(seed);
  h = mix_seed(h ^ step);
  h = mix_seed(h ^ static_cast<std::uint64_t>(static_cast<std::uint32_t>(stage)));
  return mix_seed(h ^ static_cast<std::uint64_t>(static_cast<std::uint32_t>(microbatch)));
}

}  // namespace pipit::runtime
