// A stage with only a combined backward cannot run a schedule that splits B and W (zero-bubble,
// V-shaped): make_executor<Policy> refuses it at compile time.
// PIPIT_EXPECT_ERROR: the stage needs backward_input
#include <cstddef>
#include <span>

#include "pipit/comm/threads.hpp"
#include "pipit/runtime/executor.hpp"
#include "pipit/schedule/one_f_one_b.hpp"
#include "pipit/schedule/zb_h1.hpp"

namespace rt = pipit::runtime;

struct combined_stage {
  using value_type = float;
  std::size_t input_size(int) const { return 0; }
  std::size_t output_size(int) const { return 4; }
  std::size_t activation_size(int) const { return 4; }
  void forward(const rt::pass_info&, std::span<const float>, std::span<float>, std::span<float>) {}
  void backward(const rt::pass_info&, std::span<const float>, std::span<float>,
                std::span<const float>, std::span<float>) {}
};

void train(pipit::comm::threads& comm, combined_stage& stage) {
#ifdef PIPIT_COMPILE_FAIL_CONTROL
  auto ex = rt::make_executor<pipit::schedule::one_f_one_b>(comm, stage, {4, 8});
#else
  auto ex = rt::make_executor<pipit::schedule::zb_h1>(comm, stage, {4, 8});
#endif
  ex.run();
}
