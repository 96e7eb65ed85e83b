// cuda::device_executor's host-side logic, which runs without a device: which communication point
// (exchange, IF's reduce, T's reduce) each pass of a compiled program waits for, the start-up
// refusals of mismatched vocabulary plans, and cuda::vocab_layers' host-side checks.
#include <catch2/catch.hpp>

#include <functional>
#include <optional>
#include <string_view>
#include <vector>

#include "pipit/cuda/blas_handle.cuh"
#include "pipit/cuda/device_executor.cuh"
#include "pipit/cuda/vocab_layers.cuh"
#include "pipit/schedule/gpipe.hpp"
#include "pipit/schedule/interleaved_one_f_one_b.hpp"
#include "pipit/schedule/one_f_one_b.hpp"
#include "pipit/schedule/v_half.hpp"
#include "pipit/schedule/vocab_passes.hpp"
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

// ---- vocabulary plans: communication points and start-up checks (host only) -------------------

namespace {

namespace pc = pipit::cuda;
namespace v = pipit::vocab;

// The communication point (index among the program's points) each instruction ends, or -1.
std::vector<int> point_of(const rt::program& p) {
  std::vector<int> out(p.code.size(), -1);
  int n = 0;
  for (std::size_t i = 0; i < p.code.size(); ++i)
    if (pc::detail_device_executor::is_communication_point(p.code[i])) out[i] = n++;
  return out;
}

// The first instruction of kind k (B: backward_input or the combined backward) for mb.
std::size_t find(const rt::program& p, rt::instruction_kind k, int mb, int stage = -1) {
  const auto is = [k](rt::instruction_kind x) {
    return x == k ||
           (k == rt::instruction_kind::backward_input && x == rt::instruction_kind::backward);
  };
  for (std::size_t i = 0; i < p.code.size(); ++i)
    if (is(p.code[i].kind) && p.code[i].microbatch == mb && (stage < 0 || p.code[i].stage == stage))
      return i;
  FAIL("instruction not found");
  return 0;
}

}  // namespace

TEST_CASE("the device executor's forwards and backwards wait for the vocabulary collectives",
          "[cuda][runtime][vocab]") {
  // F(0, k) reads what IF_k's reduce leaves in flight; B(last, k) (naive, two-barrier) what
  // T_k's reduce does. Each must wait for exactly that point or a later one, and some compute
  // between the point and its consumer must not wait for it (overlap).
  for (const auto passes :
       {ps::vocab_passes::two_barrier, ps::vocab_passes::naive, ps::vocab_passes::one_barrier}) {
    for (const char* schedule : {"1f1b", "v-half"}) {
      const int chunks = std::string_view(schedule) == "v-half" ? 2 : 1;
      const ps::shape s{2, 6, chunks};
      const ps::plan plan = ps::lower(ps::make_vocab_plan(schedule, s, passes));
      const int last = s.virtual_stages() - 1;
      std::vector<rt::chunk_sizes> sizes(static_cast<std::size_t>(chunks), {12, 12, 24});
      int overlapped = 0;
      for (int rank = 0; rank < 2; ++rank) {
        INFO(schedule << " " << ps::name(passes) << " rank " << rank);
        const rt::program p = rt::compile(plan, rank, sizes, false);
        const auto deps = pc::detail_device_executor::exchange_dependencies(p);
        const auto points = point_of(p);
        const auto check_consumer = [&](std::size_t producer, std::size_t consumer) {
          REQUIRE(points[producer] >= 0);
          CHECK(deps[consumer] >= points[producer]);
          for (std::size_t i = producer + 1; i < consumer; ++i)
            if (!pc::detail_device_executor::is_communication_point(p.code[i]) &&
                deps[i] < points[producer])
              ++overlapped;
        };
        for (int mb = 0; mb < s.microbatches; ++mb) {
          if (plan.rank_of(0) == rank)
            check_consumer(find(p, rt::instruction_kind::embed_forward, mb),
                           find(p, rt::instruction_kind::forward, mb, 0));
          if (plan.rank_of(last) == rank && passes != ps::vocab_passes::one_barrier) {
            const auto b = p.code[find(p, rt::instruction_kind::vocab_t, mb)].output_grad;
            CHECK(b.size == 12);  // T writes B(last, k)'s output gradient on the last rank
            check_consumer(find(p, rt::instruction_kind::vocab_t, mb),
                           find(p, rt::instruction_kind::backward_input, mb, last));
          }
        }
      }
      CHECK(overlapped > 0);
    }
  }
}

TEST_CASE("the device executor refuses mismatched vocabulary plans and layers",
          "[cuda][runtime][vocab]") {
  using Catch::Matchers::Contains;
  using pc::detail_device_executor::check_vocab_plan;
  using pc::detail_device_executor::vocab_facts;
  const ps::shape s{2, 4, 1};
  const ps::plan two = ps::make_vocab_plan("1f1b", s, ps::vocab_passes::two_barrier);
  const ps::plan lowered = ps::lower(two);
  const std::vector<rt::chunk_sizes> ok(1, {12, 12, 24});
  const vocab_facts facts{ps::vocab_passes::two_barrier, 2, 0, 12};
  CHECK_NOTHROW(check_vocab_plan(two, lowered, 0, 2, facts, ok, false));
  CHECK_NOTHROW(
      check_vocab_plan(two, lowered, 1, 2, vocab_facts{facts.passes, 2, 1, 12}, ok, false));

  auto other = facts;
  other.passes = ps::vocab_passes::one_barrier;
  CHECK_THROWS_WITH(check_vocab_plan(two, lowered, 0, 2, other, ok, false),
                    Contains("two-barrier vocabulary passes but the vocabulary layers run "
                             "one-barrier"));
  CHECK_THROWS_WITH(check_vocab_plan(two, lowered, 0, 2, std::nullopt, ok, false),
                    Contains("give the device executor cuda::vocab_layers"));
  const ps::plan plain = ps::make_plan<ps::one_f_one_b>(s);
  CHECK_THROWS_WITH(check_vocab_plan(plain, ps::lower(plain), 0, 2, facts, ok, false),
                    Contains("has no vocabulary passes"));
  CHECK_THROWS_WITH(
      check_vocab_plan(two, lowered, 0, 2, vocab_facts{facts.passes, 3, 0, 12}, ok, false),
      Contains("rank 0 of 3 shards; the pipeline rank is 0 of 2"));
  CHECK_THROWS_WITH(
      check_vocab_plan(two, lowered, 0, 2, facts, std::vector<rt::chunk_sizes>(1, {10, 12, 24}),
                       false),
      Contains("the first virtual stage has input_size 10 but the vocabulary layers' embedding "
               "output has 12"));
  CHECK_THROWS_WITH(check_vocab_plan(two, lowered, 1, 2, vocab_facts{facts.passes, 2, 1, 12},
                                     std::vector<rt::chunk_sizes>(1, {12, 11, 24}), false),
                    Contains("the last virtual stage has output_size 11"));
  // Without vocabulary layers the first stage must load its input.
  CHECK_THROWS_WITH(check_vocab_plan(plain, ps::lower(plain), 0, 2, std::nullopt, ok, false),
                    Contains("has no load_input()"));
  CHECK_NOTHROW(check_vocab_plan(plain, ps::lower(plain), 0, 2, std::nullopt, ok, true));
}

TEST_CASE("cuda::vocab_layers checks its shapes and batches on the host", "[cuda][vocab]") {
  using Catch::Matchers::Contains;
  // No device call happens before prepare(): a borrowed null handle and null stream suffice.
  const pc::blas_handle none = pc::blas_handle::borrow(nullptr);
  const v::vocab_shards shards(10, 2);  // 5 rows per shard
  std::vector<float> w(5 * 3), g(5 * 3);
  const v::matrix_view<const float> table{w.data(), 5, 3};
  const v::matrix_view<float> grad{g.data(), 5, 3};
  using layers = pc::vocab_layers<v::two_barrier, float>;
  STATIC_REQUIRE(layers::passes == ps::vocab_passes::two_barrier);
  STATIC_REQUIRE(pc::vocab_layers<v::one_barrier, float>::passes == ps::vocab_passes::one_barrier);
  STATIC_REQUIRE(pc::vocab_layers<v::naive, float>::passes == ps::vocab_passes::naive);
  STATIC_REQUIRE(pc::is_vocab_layers<layers>::value);
  STATIC_REQUIRE(!pc::is_vocab_layers<int>::value);

  CHECK_THROWS_WITH(layers(none, nullptr, shards, 1, 4, v::matrix_view<const float>{w.data(), 4, 3},
                           grad, table, grad),
                    Contains("the embedding shard is 4 x 3, expected 5 x 3"));
  CHECK_THROWS_WITH(layers(none, nullptr, shards, 1, 4, table,
                           v::matrix_view<float>{g.data(), 5, 2}, table, grad),
                    Contains("the embedding gradient is 5 x 2"));
  CHECK_THROWS_WITH(layers(none, nullptr, shards, 1, 0, table, grad, table, grad),
                    Contains("0 tokens per microbatch"));
  CHECK_THROWS(layers(none, nullptr, shards, 2, 4, table, grad, table, grad));  // rank 2 of 2

  layers ok(none, nullptr, shards, 1, 4, table, grad, table, grad);
  CHECK(ok.embedding_size() == 12);
  const std::vector<std::int64_t> ids{1, 2, 3, 4}, targets{0, -100, 9, 5};
  CHECK_THROWS_WITH(
      ok.set_batch(std::vector<std::int64_t>{1, 2, 3}, std::vector<std::int64_t>{1, 2, 3}),
      Contains("both must be microbatches x 4"));
  CHECK_THROWS(ok.set_batch(std::vector<std::int64_t>{1, 2, 10, 4}, targets));  // id 10 >= V
  CHECK_THROWS(ok.set_batch(ids, std::vector<std::int64_t>{0, 1, 2, 11}));      // target 11
  CHECK_THROWS_WITH(ok.set_batch(ids, targets, std::vector<float>{1, 1, -1, 1}),
                    Contains("loss weight -1 of token 2"));
  // An empty batch on a fresh object: refused by name before any device call (it used to reach
  // cudaEventSynchronize on a null event).
  CHECK_THROWS_WITH(ok.set_batch(std::vector<std::int64_t>{}, std::vector<std::int64_t>{}),
                    Contains("0 token ids and 0 targets") && Contains("at least one microbatch"));
  CHECK_THROWS_WITH(ok.set_batch(std::vector<std::int64_t>{}, targets),
                    Contains("0 token ids and 4 targets"));
  CHECK(ok.workspace_bytes() == 0);  // nothing was allocated by the refused batches
  // Before the executor prepared the layers there is no loss to wait for (and no communicator
  // whose timeout would bound the wait).
  CHECK_THROWS_WITH(ok.loss(), Contains("loss() before the executor prepared it"));
  CHECK_THROWS_WITH(ok.microbatch_losses(),
                    Contains("microbatch_losses() before the executor prepared it"));
}

TEST_CASE("nccl_communicator reduces 16-bit floats with NCCL's own sum and max", "[cuda][nccl]") {
  // The vocabulary layers' IF and T reduces of __nv_bfloat16 / __half partials must be real
  // ncclReduce calls, not the all-gather-and-merge fallback (ranks x tokens x hidden of memory).
  namespace dn = pipit::cuda::detail_nccl;
  STATIC_REQUIRE(dn::has_nccl_type<__nv_bfloat16>());
  STATIC_REQUIRE(dn::has_nccl_type<__half>());
  STATIC_REQUIRE(dn::nccl_type<__nv_bfloat16>() == ncclBfloat16);
  STATIC_REQUIRE(dn::nccl_type<__half>() == ncclFloat16);
  STATIC_REQUIRE(dn::nccl_type<float>() == ncclFloat32);
  STATIC_REQUIRE(dn::builtin_op<__nv_bfloat16, std::plus<>> == 1);
  STATIC_REQUIRE(dn::builtin_op<__half, std::plus<>> == 1);
  STATIC_REQUIRE(dn::builtin_op<__nv_bfloat16, pipit::comm::max_op> == 2);
  // Operators NCCL lacks keep the gather-and-merge path.
  STATIC_REQUIRE(dn::builtin_op<float, v::merge_op> == 0);
  STATIC_REQUIRE(dn::builtin_op<__nv_bfloat16, std::multiplies<>> == 0);
}

// Every member of the 16-bit layers compiles (the GPU tests instantiate float only).
template class pipit::cuda::vocab_layers<pipit::vocab::naive, __nv_bfloat16>;
template class pipit::cuda::vocab_layers<pipit::vocab::two_barrier, __nv_bfloat16>;
template class pipit::cuda::vocab_layers<pipit::vocab::one_barrier, __half>;
