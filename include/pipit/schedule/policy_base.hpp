#pragma once
// Bases that schedule policies derive from for the members their family shares: the placement
// and the chunk-count rule. A policy adds its name, split_backward and generate().

#include "pipit/schedule/shape.hpp"

namespace pipit::schedule {

// One model chunk per rank, virtual stage = rank.
struct one_chunk_policy {
  static constexpr placement place = placement::looped;
  static constexpr shape_rule check(const shape& s) noexcept {
    if (const auto r = check_common(s); r != shape_rule::ok) return r;
    return s.chunks == 1 ? shape_rule::ok : shape_rule::one_chunk;
  }
};

// Two chunks per rank on the V placement.
struct v_shape_policy {
  static constexpr placement place = placement::v_shape;
  static constexpr shape_rule check(const shape& s) noexcept {
    if (const auto r = check_common(s); r != shape_rule::ok) return r;
    return s.chunks == 2 ? shape_rule::ok : shape_rule::two_chunks;
  }
};

}  // namespace pipit::schedule
