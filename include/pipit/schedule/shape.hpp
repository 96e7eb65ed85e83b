#pragma once
// shape: how many pipeline ranks, microbatches and model chunks per rank a plan is made for;
// placement: which rank holds each virtual stage; shape_rule: why a shape is refused.

#include <string>
#include <string_view>

#include "pipit/core/error.hpp"

namespace pipit::schedule {

// Structural, so it can be a template argument: make_plan<one_f_one_b, shape{.stages = 4, ...}>.
struct shape {
  int stages = 1;        // pipeline ranks (devices), p
  int microbatches = 1;  // m
  int chunks = 1;        // model chunks (virtual stages) per rank, v

  constexpr int virtual_stages() const noexcept { return stages * chunks; }
  friend constexpr bool operator==(const shape&, const shape&) = default;
};

enum class placement {
  looped,  // virtual stage s on rank s mod p (Megatron's interleaving)
  v_shape  // two chunks: stage s on rank s for s < p, on rank 2p - 1 - s after (the V)
};

constexpr std::string_view name(placement p) noexcept {
  return p == placement::looped ? "looped" : "v";
}

constexpr int rank_of(placement pl, const shape& s, int stage) noexcept {
  if (pl == placement::v_shape && stage >= s.stages) return 2 * s.stages - 1 - stage;
  return stage % s.stages;
}

constexpr int chunk_of(placement pl, const shape& s, int stage) noexcept {
  (void)pl;
  return stage / s.stages;  // looped and V agree: chunk c holds stages [c p, (c + 1) p)
}

constexpr int stage_of(placement pl, const shape& s, int rank, int chunk) noexcept {
  if (pl == placement::v_shape && chunk % 2 == 1) return (chunk + 1) * s.stages - 1 - rank;
  return chunk * s.stages + rank;
}

// Every reason a generator may refuse a shape. One list feeds the run-time messages
// (shape_rule_text) and the compile-time static_asserts (make_plan), so they cannot drift.
#define PIPIT_SCHEDULE_SHAPE_RULES(X)                                                           \
  X(stages_at_least_1, "shape.stages must be >= 1")                                             \
  X(microbatches_at_least_1, "shape.microbatches must be >= 1")                                 \
  X(chunks_at_least_1, "shape.chunks must be >= 1")                                             \
  X(one_chunk, "this schedule keeps one model chunk per rank: shape.chunks must be 1")          \
  X(two_chunks, "V-shaped schedules place exactly two chunks per rank: shape.chunks must be 2") \
  X(interleaved_microbatches_at_least_stages,                                                   \
    "interleaved 1F1B needs shape.microbatches >= shape.stages (Megatron's group rule)")        \
  X(interleaved_group_size,                                                                     \
    "interleaved 1F1B's microbatch group G needs stages <= G <= microbatches and "              \
    "microbatches % G == 0 or >= stages (Megatron's group rule)")                               \
  X(dualpipe_microbatches_at_least_twice_stages,                                                \
    "DualPipeV needs shape.microbatches >= 2 * shape.stages")                                   \
  X(too_large, "shape too large: stages * chunks * microbatches must stay below 2^22")

enum class shape_rule {
  ok,
#define PIPIT_SCHEDULE_RULE_ENUM(id, text) id,
  PIPIT_SCHEDULE_SHAPE_RULES(PIPIT_SCHEDULE_RULE_ENUM)
#undef PIPIT_SCHEDULE_RULE_ENUM
};

constexpr std::string_view shape_rule_text(shape_rule r) noexcept {
  switch (r) {
    case shape_rule::ok:
      return "ok";
#define PIPIT_SCHEDULE_RULE_TEXT(id, text) \
  case shape_rule::id:                     \
    return text;
      PIPIT_SCHEDULE_SHAPE_RULES(PIPIT_SCHEDULE_RULE_TEXT)
#undef PIPIT_SCHEDULE_RULE_TEXT
  }
  return "unknown rule";
}

// Rules every schedule shares.
constexpr shape_rule check_common(const shape& s) noexcept {
  if (s.stages < 1) return shape_rule::stages_at_least_1;
  if (s.microbatches < 1) return shape_rule::microbatches_at_least_1;
  if (s.chunks < 1) return shape_rule::chunks_at_least_1;
  if (static_cast<long long>(s.stages) * s.chunks * s.microbatches >= (1LL << 22))
    return shape_rule::too_large;
  return shape_rule::ok;
}

inline std::string to_string(const shape& s) {
  return detail::concat("{stages=", s.stages, ", microbatches=", s.microbatches,
                        ", chunks=", s.chunks, "}");
}

// Throws pipit::error naming the schedule, the rule and the shape's values (and the policy's
// own parameters, e.g. a fixed group size, when it has any).
inline void require_shape(std::string_view schedule, const shape& s, shape_rule r,
                          std::string_view parameters = {}) {
  if (r != shape_rule::ok)
    fail("pipit: schedule '", schedule, "'", parameters, " refuses shape ", to_string(s), ": ",
         shape_rule_text(r));
}

// A policy's parameters as text for messages: S::parameters() when S has it, else empty.
template <class S>
std::string policy_parameters() {
  if constexpr (requires { S::parameters(); }) return std::string(S::parameters());
  return {};
}

}  // namespace pipit::schedule
