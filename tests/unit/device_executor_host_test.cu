// cuda::device_executor's host-side analysis, which runs without a device: which exchange each
// pass of a compiled program waits for.
#include <catch2/catch.hpp>

#include <vector>

#include "pipit/cuda/device_executor.cuh"
#include "pipit/schedule/gpipe.hpp"
#include "pipit/schedule/interleaved_one_f_one_b.hpp"
#include "pipit/schedule/one_f_one_b.hpp"
#include "pipit/schedule/v_half.hpp"
#include "pipit/schedule/zb_h1.hpp"
#include "pipit/schedule/zb_v.hpp"

namespace ps = pipit::schedule;
namespace rt = pipit::runtime;

TEST_CASE("the device executor's exchange dependencies let compute skip unrelated messages",
          "[cuda][runtime]") {
  // Host-only: from the compiled program. In 1F1B's steady state on rank 1 of 2, a forward
  // waits for the receive of its input, not for the latest exchange.
  const ps::plan plan = ps::lower(ps::make_plan<ps::one_f_one_b>({2, 6, 1}));
  std::vector<rt::chunk_sizes> sizes(1, {4, 4, 8});
  const rt::program p = rt::compile(plan, 1, sizes, false);
  const auto deps = pipit::cuda::detail_device_executor::exchange_dependencies(p);
  int exchanges = 0, earlier = 0;
  for (std::size_t i = 0; i < p.code.size(); ++i) {
    if (p.code[i].kind == rt::instruction_kind::exchange) {
      ++exchanges;
      continue;
    }
    CHECK(deps[i] < exchanges);  // never a later exchange
    if (deps[i] >= 0 && deps[i] < exchanges - 1) ++earlier;
  }
  CHECK(exchanges > 0);
  CHECK(earlier > 0);  // some pass waits for an older exchange only: overlap is possible
}
