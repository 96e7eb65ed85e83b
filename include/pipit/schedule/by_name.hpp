#pragma once
// Run-time selection of a schedule policy by name, for programs that read the schedule from a
// command line or a config file. One `if constexpr` fold over the policy list: the generators
// themselves stay compile-time types, and nothing here is virtual.

#include <span>
#include <string>
#include <string_view>

#include "pipit/core/error.hpp"
#include "pipit/schedule/dualpipe_v.hpp"
#include "pipit/schedule/gpipe.hpp"
#include "pipit/schedule/interleaved_one_f_one_b.hpp"
#include "pipit/schedule/one_f_one_b.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/v_half.hpp"
#include "pipit/schedule/v_min.hpp"
#include "pipit/schedule/zb_h1.hpp"
#include "pipit/schedule/zb_h2.hpp"
#include "pipit/schedule/zb_v.hpp"

namespace pipit::schedule {

template <schedule_policy... S>
struct policy_list {};

using all_policies = policy_list<gpipe, one_f_one_b, interleaved_one_f_one_b, zb_h1, zb_h2, zb_v,
                                 v_half, v_min, dualpipe_v>;

inline constexpr std::string_view all_policy_names[] = {
    gpipe::name,  one_f_one_b::name, interleaved_one_f_one_b::name,
    zb_h1::name,  zb_h2::name,       zb_v::name,
    v_half::name, v_min::name,       dualpipe_v::name};

// Returns f.template operator()<S>() for the policy S named `name`; throws pipit::error listing
// the known names when there is none. f must return a default-constructible value.
template <class F, schedule_policy... S>
constexpr auto visit_policy(std::string_view name, F&& f, policy_list<S...> = {}) {
  using R = decltype(f.template operator()<gpipe>());
  R out{};
  const bool found = ((name == S::name ? (out = f.template operator()<S>(), true) : false) || ...);
  if (!found) {
    std::string known;
    for (const auto n : all_policy_names) known += detail::concat(known.empty() ? "" : ", ", n);
    fail("pipit: unknown schedule '", name, "' (known: ", known, ")");
  }
  return out;
}

constexpr placement placement_of(std::string_view name) {
  return visit_policy(
      name, []<class S>() { return S::place; }, all_policies{});
}

// The chunk count a named schedule runs with when none is given: 2 for interleaved 1F1B and the
// V-shaped schedules, 1 for the others.
constexpr int default_chunks(std::string_view name) {
  return name == interleaved_one_f_one_b::name || placement_of(name) == placement::v_shape ? 2 : 1;
}

inline plan make_plan_by_name(std::string_view name, const shape& s) {
  return visit_policy(
      name, [&]<class S>() { return make_plan<S>(s); }, all_policies{});
}

}  // namespace pipit::schedule
