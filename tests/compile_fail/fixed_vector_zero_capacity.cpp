// A fixed_vector needs room for at least one element.
// PIPIT_EXPECT_ERROR: Capacity must be at least 1
#include "pipit/core/fixed_vector.hpp"

#ifdef PIPIT_COMPILE_FAIL_CONTROL
pipit::fixed_vector<int, 1> v;
#else
pipit::fixed_vector<int, 0> v;
#endif
