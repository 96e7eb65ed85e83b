// The README's first program: one generator, used at compile time and at run time.
//   first_plan 32     -> prints the 1F1B bubble for 8 stages and 32 microbatches
#include <cstdio>
#include <cstdlib>

#include <pipit/schedule/one_f_one_b.hpp>
#include <pipit/schedule/validate.hpp>
#include <pipit/sim/simulate.hpp>

namespace ps = pipit::schedule;

// At compile time: a refused shape is a static_assert naming the rule.
constexpr auto plan = ps::make_plan<ps::one_f_one_b, ps::shape{.stages = 8, .microbatches = 32}>();
static_assert(ps::validate(plan));

int main(int argc, char** argv) {
  const int microbatches = argc > 1 ? std::atoi(argv[1]) : 32;
  try {
    // At run time, e.g. from a config file: the same generator, the same actions.
    const ps::plan p = ps::make_plan<ps::one_f_one_b>({.stages = 8, .microbatches = microbatches});
    const auto sim = pipit::sim::simulate(p, {.f = 1, .b = 1, .w = 1});
    std::printf("1f1b, 8 stages, %d microbatches: bubble %.3f, rank 0 keeps %.0f microbatches\n",
                microbatches, sim.bubble_fraction, sim.ranks[0].peak_activations);
    return p == plan.to_plan() || microbatches != 32 ? 0 : 1;
  } catch (const pipit::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
