// Interleaved 1F1B needs at least as many microbatches as stages (Megatron's group rule): a
// compile-time plan for fewer fails with the rule's text.
// PIPIT_EXPECT_ERROR: interleaved 1F1B needs shape.microbatches >= shape.stages
#include "pipit/schedule/interleaved_one_f_one_b.hpp"

namespace ps = pipit::schedule;

#ifdef PIPIT_COMPILE_FAIL_CONTROL
inline constexpr auto plan =
    ps::make_plan<ps::interleaved_one_f_one_b,
                  ps::shape{.stages = 4, .microbatches = 4, .chunks = 2}>();
#else
inline constexpr auto plan =
    ps::make_plan<ps::interleaved_one_f_one_b,
                  ps::shape{.stages = 4, .microbatches = 3, .chunks = 2}>();
#endif
