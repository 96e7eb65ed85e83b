// The executor names the member a stage lacks: here the forward.
// PIPIT_EXPECT_ERROR: the stage lacks .void forward
#include <cstddef>
#include <span>

#include "pipit/comm/threads.hpp"
#include "pipit/runtime/executor.hpp"
#include "pipit/schedule/plan.hpp"

namespace rt = pipit::runtime;

struct no_forward_stage {
  using value_type = double;
  std::size_t input_size(int) const { return 0; }
  std::size_t output_size(int) const { return 4; }
  std::size_t activation_size(int) const { return 4; }
#ifdef PIPIT_COMPILE_FAIL_CONTROL
  void forward(const rt::pass_info&, std::span<const double>, std::span<double>,
               std::span<double>) {}
#endif
  void backward(const rt::pass_info&, std::span<const double>, std::span<double>,
                std::span<const double>, std::span<double>) {}
};

void train(pipit::comm::threads& comm, no_forward_stage& stage, const pipit::schedule::plan& p) {
  rt::executor ex(comm, stage, p);
  ex.run();
}
