// V-Half places exactly two chunks per rank: make_plan refuses a one-chunk shape at compile time.
// PIPIT_EXPECT_ERROR: shape.chunks must be 2
#include "pipit/schedule/v_half.hpp"

using pipit::schedule::shape;
using pipit::schedule::v_half;

#ifdef PIPIT_COMPILE_FAIL_CONTROL
constexpr auto sp =
    pipit::schedule::make_plan<v_half, shape{.stages = 4, .microbatches = 8, .chunks = 2}>();
#else
constexpr auto sp =
    pipit::schedule::make_plan<v_half, shape{.stages = 4, .microbatches = 8, .chunks = 1}>();
#endif
