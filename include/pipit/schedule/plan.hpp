#pragma once
// plan: the ordered actions of every rank for one shape, made by a schedule policy's constexpr
// generator. The same generator serves run time (make_plan<S>(shape), std::vector storage) and
// compile time (make_plan<S, shape{...}>(), fixed storage in a constexpr variable).

#include <algorithm>
#include <array>
#include <concepts>
#include <cstddef>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "pipit/core/fixed_vector.hpp"
#include "pipit/schedule/action.hpp"
#include "pipit/schedule/shape.hpp"

namespace pipit::schedule {

// Which vocabulary-parallel passes a plan carries (see vocab_passes.hpp): none, or the S, T, IF
// and IB passes of every microbatch on every rank, with the dependencies of the paper's
// Algorithm 2 (one barrier: the last stage's backward needs every rank's S) or Algorithm 1 (two
// barriers: it needs every rank's T). naive (Megatron's vocabulary-parallel cross-entropy) has
// the two-barrier dependencies: its separate max and sum reductions both sit between S and T.
enum class vocab_passes : unsigned char { none, one_barrier, two_barrier, naive };

constexpr std::string_view name(vocab_passes v) noexcept {
  return v == vocab_passes::none          ? "none"
         : v == vocab_passes::one_barrier ? "one-barrier"
         : v == vocab_passes::two_barrier ? "two-barrier"
                                          : "naive";
}

// The names above, in enum order; vocab_passes_by_name parses them (nullopt when unknown).
inline constexpr std::string_view vocab_passes_names[] = {"none", "one-barrier", "two-barrier",
                                                          "naive"};

constexpr std::optional<vocab_passes> vocab_passes_by_name(std::string_view text) noexcept {
  for (int i = 0; i < 4; ++i)
    if (text == vocab_passes_names[i]) return static_cast<vocab_passes>(i);
  return std::nullopt;
}

struct plan {
  std::string_view schedule;  // the generating policy's name (a string literal)
  shape shp;
  placement place = placement::looped;
  bool split_backward = false;  // B and W separate (zero-bubble family) instead of BW
  bool lowered = false;         // send/recv actions added (see lower.hpp)
  std::vector<std::vector<action>> ranks;
  vocab_passes vocab = vocab_passes::none;  // S/T/IF/IB passes present (vocab_passes.hpp)

  constexpr int rank_count() const noexcept { return static_cast<int>(ranks.size()); }
  constexpr std::span<const action> for_rank(int r) const {
    return ranks.at(static_cast<std::size_t>(r));
  }
  constexpr int rank_of(int stage) const noexcept { return schedule::rank_of(place, shp, stage); }
  constexpr std::size_t action_count() const noexcept {
    std::size_t n = 0;
    for (const auto& r : ranks) n += r.size();
    return n;
  }
  friend constexpr bool operator==(const plan& a, const plan& b) {
    return a.schedule == b.schedule && a.shp == b.shp && a.place == b.place &&
           a.split_backward == b.split_backward && a.lowered == b.lowered && a.ranks == b.ranks &&
           a.vocab == b.vocab;
  }
};

// What a schedule policy provides. Policies are empty structs; see the generators in this folder.
template <class S>
concept schedule_policy = requires(const shape& s, plan& out) {
  { S::name } -> std::convertible_to<std::string_view>;
  { S::place } -> std::convertible_to<placement>;
  { S::split_backward } -> std::convertible_to<bool>;
  { S::check(s) } -> std::same_as<shape_rule>;
  {S::generate(s, out)};
};

// Run-time (and transient constexpr) generation. Throws pipit::error for a refused shape.
template <schedule_policy S>
constexpr plan make_plan(const shape& s) {
  if (const shape_rule r = S::check(s); r != shape_rule::ok)
    require_shape(S::name, s, r, policy_parameters<S>());
  plan out{S::name, s, S::place, S::split_backward, false, {}};
  out.ranks.resize(static_cast<std::size_t>(s.stages));
  S::generate(s, out);
  return out;
}

// A plan stored inline, so that it can live in a constexpr variable and be checked by
// static_assert. Ranks and Capacity are computed from the plan itself by freeze().
template <int Ranks, std::size_t Capacity>
struct static_plan {
  std::string_view schedule;
  shape shp;
  placement place = placement::looped;
  bool split_backward = false;
  bool lowered = false;
  std::array<fixed_vector<action, Capacity>, static_cast<std::size_t>(Ranks)> ranks{};
  vocab_passes vocab = vocab_passes::none;

  static constexpr int rank_count() noexcept { return Ranks; }
  constexpr std::span<const action> for_rank(int r) const {
    const auto& v = ranks.at(static_cast<std::size_t>(r));
    return {v.data(), v.size()};
  }
  // Back to the run-time form (inside a constant expression this is a transient allocation).
  constexpr plan to_plan() const {
    plan p{schedule, shp, place, split_backward, lowered, {}, vocab};
    for (const auto& r : ranks) p.ranks.emplace_back(r.begin(), r.end());
    return p;
  }
};

// Evaluates the constexpr callable Make (returning a plan) at compile time and stores its result
// inline: freeze<[] { return lower(make_plan<one_f_one_b>(shape{4, 8})); }>().
template <auto Make>
consteval auto freeze() {
  constexpr auto dims = [] {
    const plan p = Make();
    std::size_t longest = 1;
    for (const auto& r : p.ranks) longest = std::max(longest, r.size());
    return std::pair<int, std::size_t>{p.rank_count(), longest};
  }();
  static_plan<dims.first, dims.second> out;
  const plan p = Make();
  out.schedule = p.schedule;
  out.shp = p.shp;
  out.place = p.place;
  out.split_backward = p.split_backward;
  out.lowered = p.lowered;
  out.vocab = p.vocab;
  for (std::size_t r = 0; r < p.ranks.size(); ++r)
    for (const action& a : p.ranks[r]) out.ranks[r].push_back(a);
  return out;
}

// Compile-time generation: a refused shape fails to compile with a static_assert naming the
// rule; the shape's values appear in the compiler's "required from" note.
template <schedule_policy S, shape Shape>
consteval auto make_plan() {
  constexpr shape_rule rule = S::check(Shape);
#define PIPIT_SCHEDULE_RULE_ASSERT(id, text) \
  static_assert(rule != shape_rule::id, "pipit: the schedule refuses this shape: " text);
  PIPIT_SCHEDULE_SHAPE_RULES(PIPIT_SCHEDULE_RULE_ASSERT)
#undef PIPIT_SCHEDULE_RULE_ASSERT
  if constexpr (rule == shape_rule::ok) {
    return freeze<[] { return make_plan<S>(Shape); }>();
  } else {
    return static_plan<1, 1>{};  // unreachable: a static_assert above has failed
  }
}

}  // namespace pipit::schedule
