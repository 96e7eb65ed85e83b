// The 3D planner: the tensor- and data-parallel cost formulas against hand-computed values and
// against the unsharded model at t = 1, the cluster's group links, and the search on small
// clusters whose best configuration is known by construction.
#include <catch2/catch.hpp>

#include <string>

#include "pipit/cost/cluster.hpp"
#include "pipit/cost/data_parallel.hpp"
#include "pipit/cost/flops.hpp"
#include "pipit/cost/memory.hpp"
#include "pipit/cost/tensor_parallel.hpp"
#include "pipit/partition/naive.hpp"
#include "pipit/partition/vocab_parallel.hpp"
#include "pipit/sim/predict.hpp"
#include "pipit/sim/search.hpp"

using namespace pipit;
using cost::tensor_parallel;

namespace {

constexpr cost::transformer gpt(int layers, int hidden, int heads, int seq, int vocab) {
  return cost::transformer{
      .layers = layers, .hidden = hidden, .heads = heads, .seq = seq, .vocab = vocab};
}

// Links that cost nothing: only compute and memory decide.
cost::hardware free_links(double capacity) {
  cost::hardware hw = cost::a100_80gb;
  hw.p2p = hw.collective = hw.inter_node = {0, 1e30};
  hw.memory_capacity = capacity;
  return hw;
}

}  // namespace

TEST_CASE("tensor-parallel costs at t = 1 are the unsharded ones", "[search]") {
  for (const bool rc : {false, true})
    for (const bool flash : {true, false}) {
      cost::transformer t = gpt(4, 1024, 16, 512, 32000);
      t.kv_heads = 4;
      t.gated_mlp = true;
      t.ffn = 2816;
      t.recompute = rc;
      t.flash_attention = flash;
      const tensor_parallel one{};
      CHECK(cost::layer_work(t, one) == cost::layer_work(t));
      CHECK(cost::layer_activation_bytes(t, one) == cost::layer_activation_bytes(t));
      CHECK(cost::layer_weight_grad_bytes(t, one) == cost::layer_weight_grad_bytes(t));
      CHECK(cost::layer_workspace_bytes(t, one) == cost::layer_workspace_bytes(t));
      CHECK(cost::layer_parameters(t, one) == cost::layer_parameters(t));
      CHECK(cost::output_work(t, one) == cost::output_work(t));
      CHECK(cost::output_parameters(t, one) == cost::output_parameters(t));
      CHECK(cost::embedding_parameters(t, one) == cost::embedding_parameters(t));
      CHECK(cost::layer_comm_time(t, one, {1e-6, 1e9}).forward == 0);
    }
}

TEST_CASE("tensor-parallel memory and parameters match Korthikanti's and Megatron's counts",
          "[search]") {
  const cost::transformer t = gpt(4, 1024, 16, 2048, 32000);
  const double h = 1024;
  // Activations per token, 16-bit, flash attention: 10h + 24h/t, or 34h/t with sequence
  // parallelism (Korthikanti et al., Table 2, without the 5as/t scores).
  CHECK(cost::layer_activation_bytes_per_token(t, {4, false}) == 10 * h + 24 * h / 4);
  CHECK(cost::layer_activation_bytes_per_token(t, {4, true}) == 34 * h / 4);
  CHECK(cost::layer_activation_bytes_per_token(t, {8, false}) == 13 * h);
  // Parameters per rank: (12h² + 7h)/t split + 6h replicated (row-parallel biases, norms).
  CHECK(cost::layer_parameters(t, {4, false}) == (12 * h * h + 7 * h) / 4 + 6 * h);
  CHECK(cost::layer_parameters(t, {4, false}) == 3153664.0);
  // GEMMs and attention split 4 ways.
  CHECK(cost::layer_work(t, {4, false}).f.flops() == Approx(cost::layer_work(t).f.flops() / 4));
  // The LM head over V/t rows; the vocabulary padded up to a multiple of t.
  cost::transformer odd = t;
  odd.vocab = 32001;
  CHECK(cost::output_parameters(odd, {4, false}) == 2 * h + 8001 * h);
  // Bad sizes are refused with the values.
  CHECK_THROWS_WITH(cost::check(tensor_parallel{3, false}, t),
                    Catch::Contains("tensor parallel size 3 must divide the heads (16)"));
  cost::transformer gqa = t;
  gqa.kv_heads = 2;
  CHECK_THROWS_WITH(cost::check(tensor_parallel{4, false}, gqa),
                    Catch::Contains("key/value heads (2)"));
}

TEST_CASE("tensor-parallel and data-parallel communication, by hand", "[search]") {
  const cost::transformer t = gpt(4, 1024, 16, 2048, 32000);
  const cost::channel link{1e-6, 1e9};
  // n·h·x = 2048 · 1024 · 2 bytes; ring all-reduce over 4: 2·3·α + 2·3/4 · bytes / bandwidth.
  const double bytes = 2048.0 * 1024 * 2;
  const double ar = 6e-6 + 1.5 * bytes / 1e9;
  CHECK(ar == Approx(0.006297456));
  const auto c = cost::layer_comm_time(t, {4, false}, link);
  CHECK(c.forward == Approx(2 * ar));
  CHECK(c.backward == Approx(2 * ar));
  // Sequence parallelism: all-gather + reduce-scatter, the all-reduce's volume and latency.
  CHECK(cost::layer_comm_time(t, {4, true}, link).forward == Approx(2 * ar));
  // Full recomputation repeats the forward's collectives in the backward.
  cost::transformer rc = t;
  rc.recompute = true;
  CHECK(cost::layer_comm_time(rc, {4, false}, link).backward == Approx(4 * ar));
  // Output layer: three all-reduces of n fp32 forward; the input gradient's all-reduce backward.
  const auto o = cost::output_comm_time(t, {4, false}, link);
  CHECK(o.forward == Approx(3 * (6e-6 + 1.5 * 2048 * 4 / 1e9)));
  CHECK(o.backward == Approx(ar));
  // Stage to stage with scatter/gather: 1/t over the pipeline link, then an all-gather.
  const cost::channel ib{20e-6, 25e9};
  CHECK(cost::stage_transfer_time(t, {4, false}, ib, link) ==
        Approx(20e-6 + bytes / 4 / 25e9 + 3e-6 + 0.75 * bytes / 1e9));
  CHECK(cost::stage_transfer_time(t, {4, false}, ib, link, false) == Approx(20e-6 + bytes / 25e9));
  // Data parallel: 1e9 fp32 gradients over 8 replicas on 25 GB/s, 20 µs:
  // 2·7·20e-6 + 2·7/8 · 4e9 / 25e9 = 0.28028 s.
  CHECK(cost::gradient_sync_time(t, 1e9, {8, false}, ib) == Approx(0.28028));
  // Distributed optimizer: reduce-scatter of fp32 gradients + all-gather of 16-bit weights.
  CHECK(cost::gradient_sync_time(t, 1e9, {8, true}, ib) ==
        Approx(7 * 20e-6 + 0.875 * 4e9 / 25e9 + 7 * 20e-6 + 0.875 * 2e9 / 25e9));
  CHECK(cost::gradient_sync_time(t, 1e9, {1, false}, ib) == 0);
}

TEST_CASE("group links: tensor fastest, then data, then pipeline", "[search]") {
  CHECK_FALSE(cost::spans_nodes(1, 8, 8));
  CHECK_FALSE(cost::spans_nodes(1, 4, 8));
  CHECK_FALSE(cost::spans_nodes(2, 4, 8));
  CHECK(cost::spans_nodes(4, 4, 8));  // a block of 16 ranks
  CHECK(cost::spans_nodes(2, 3, 8));  // blocks of 6: the second straddles two nodes
  CHECK_FALSE(cost::spans_nodes(64, 1, 8));
  const cost::cluster cl{4, 8, cost::a100_80gb};
  const auto l = cost::links_of(cl, 8, 1, 4);  // TP in a node, PP across the 4 nodes
  CHECK_FALSE(l.tensor_spans_nodes);
  CHECK(l.pipeline_spans_nodes);
  CHECK(l.pipeline.bandwidth == cost::a100_80gb.inter_node.bandwidth);
  CHECK(l.tensor.bandwidth == cost::a100_80gb.collective.bandwidth);
  const auto l2 = cost::links_of(cl, 2, 4, 4);  // DP inside a node, PP across
  CHECK_FALSE(l2.data_spans_nodes);
  CHECK(l2.pipeline_spans_nodes);
  cost::cluster no_net{2, 8, cost::a100_80gb};
  no_net.device.inter_node = {};
  CHECK_THROWS_WITH(cost::check(no_net), Catch::Contains("2 nodes need an inter-node link"));
}

TEST_CASE("predict with the default parallelism is the single-pipeline prediction", "[search]") {
  const cost::transformer t = gpt(8, 1024, 16, 1024, 32000);
  const partition::partition part = partition::vocab_parallel(8, {4, 1});
  const auto plan = schedule::make_plan_by_name("1f1b", {4, 8, 1});
  const auto a = sim::predict(plan, part, t, cost::a100_80gb);
  const auto b = sim::predict(plan, part, t, cost::a100_80gb, cost::vocab_algorithm::one_barrier,
                              sim::parallelism_of(cost::a100_80gb));
  CHECK(a.iteration_time == b.iteration_time);
  CHECK(a.max_peak_memory_bytes == b.max_peak_memory_bytes);
  CHECK(a.mfu == b.mfu);
  // Data parallelism multiplies tokens/s by the replicas less the gradient synchronisation.
  sim::parallelism par = sim::parallelism_of(cost::a100_80gb);
  par.data = {4, false};
  const auto c =
      sim::predict(plan, part, t, cost::a100_80gb, cost::vocab_algorithm::one_barrier, par);
  CHECK(c.gradient_sync_time > 0);
  CHECK(c.iteration_time == Approx(a.iteration_time + c.gradient_sync_time));
  CHECK(c.tokens_per_second ==
        Approx(4 * a.tokens_per_second * a.iteration_time / c.iteration_time));
}

TEST_CASE("with free links and room to spare, pure data parallelism wins", "[search]") {
  const cost::transformer t = gpt(8, 1024, 16, 1024, 32000);
  const cost::cluster cl{2, 4, free_links(80e9)};
  sim::search_options o;
  o.global_batch = 64;
  // With the distributed optimizer every layout does 1/8 of the optimizer step; without it a
  // data-parallel replica steps its whole model, and a pipeline that splits it can win.
  o.distributed_optimizer = true;
  const auto r = sim::search(t, cl, o);
  REQUIRE_FALSE(r.configs.empty());
  // No bubble, no tensor-parallel replication, no communication cost: t = p = 1, d = 8.
  CHECK(r.configs[0].config.tensor == 1);
  CHECK(r.configs[0].config.pipeline == 1);
  CHECK(r.configs[0].config.data == 8);
  for (const auto& e : r.configs) CHECK(e.peak_memory_bytes <= cl.device.memory_capacity);
}

TEST_CASE("a model too big for one GPU and one microbatch: tensor beats pipeline", "[search]") {
  // 116M parameters, 18 bytes each = 2.1 GB of states; 1.5 GB per GPU. With one sequence per
  // iteration a 2-stage pipeline idles half the time; 2-way tensor parallelism with free links
  // halves the work.
  const cost::transformer t = gpt(4, 1024, 16, 1024, 32000);
  const double states = 18 * (4 * cost::layer_parameters(t) + cost::embedding_parameters(t) +
                              cost::output_parameters(t));
  REQUIRE(states > 1.5e9);
  const cost::cluster cl{1, 2, free_links(1.5e9)};
  sim::search_options o;
  o.global_batch = 1;
  const auto r = sim::search(t, cl, o);
  REQUIRE_FALSE(r.configs.empty());
  CHECK(r.configs[0].config.tensor == 2);
  CHECK(r.configs[0].config.pipeline == 1);
  CHECK(r.does_not_fit.count > 0);  // every t = p = 1 configuration
  for (const auto& e : r.configs) {
    CHECK(e.config.tensor * e.config.pipeline == 2);
    CHECK(e.peak_memory_bytes <= 1.5e9);
  }
}

TEST_CASE("the search never returns what its memory model says does not fit", "[search]") {
  const cost::transformer t = gpt(16, 2048, 16, 2048, 50000);
  for (const double capacity : {4e9, 8e9, 16e9}) {
    cost::hardware hw = cost::a100_80gb;
    hw.memory_capacity = capacity;
    const cost::cluster cl{2, 4, hw};
    sim::search_options o;
    o.global_batch = 32;
    o.top = 20;
    const auto r = sim::search(t, cl, o);
    INFO("capacity " << capacity);
    for (const auto& e : r.configs) {
      CHECK(e.simulated);
      CHECK(e.peak_memory_bytes <= capacity);
      // The same configuration predicted on its own agrees.
      const auto pr = sim::predict(e.config, t, cl);
      CHECK(pr.max_peak_memory_bytes == Approx(e.peak_memory_bytes));
      CHECK(pr.tokens_per_second == Approx(e.tokens_per_second));
      CHECK(e.tokens_per_second <= e.upper_bound * (1 + 1e-12));
      CHECK(e.config.data * e.config.microbatch_size * e.config.microbatches == 32);
      CHECK(e.config.tensor * e.config.pipeline * e.config.data == 8);
    }
    if (r.does_not_fit.fastest) CHECK(r.does_not_fit.fastest->peak_memory_bytes > capacity);
  }
  // Nothing fits in 100 MB: no configuration, every applicable one counted as not fitting.
  cost::hardware tiny = cost::a100_80gb;
  tiny.memory_capacity = 1e8;
  sim::search_options o;
  o.global_batch = 32;
  const auto r = sim::search(t, {2, 4, tiny}, o);
  CHECK(r.configs.empty());
  CHECK(r.does_not_fit.count == r.candidates - r.not_applicable.count);
}

TEST_CASE("the bounded search returns what the exhaustive one does", "[search]") {
  const cost::transformer t = gpt(16, 2048, 16, 2048, 50000);
  cost::hardware hw = cost::a100_80gb;
  hw.memory_capacity = 12e9;
  const cost::cluster cl{2, 4, hw};
  sim::search_options o;
  o.global_batch = 64;
  o.top = 8;
  const auto fast = sim::search(t, cl, o);
  o.exhaustive = true;
  const auto all = sim::search(t, cl, o);
  CHECK(fast.simulated < all.simulated);
  REQUIRE(fast.configs.size() == all.configs.size());
  for (std::size_t k = 0; k < fast.configs.size(); ++k) {
    CHECK(sim::describe(fast.configs[k].config) == sim::describe(all.configs[k].config));
    CHECK(fast.configs[k].tokens_per_second == all.configs[k].tokens_per_second);
  }
  CHECK(fast.does_not_fit.count + fast.worse.count + fast.not_applicable.count +
            static_cast<long long>(fast.configs.size()) ==
        fast.candidates);
}

TEST_CASE("the search refuses inputs it cannot search, with the values", "[search]") {
  const cost::transformer t = gpt(8, 1024, 16, 1024, 32000);
  const cost::cluster cl{2, 4, cost::a100_80gb};
  sim::search_options o;
  o.global_batch = 0;
  CHECK_THROWS_WITH(sim::search(t, cl, o), Catch::Contains("global batch must be >= 1 (got 0)") ||
                                               Catch::Contains("(got 0)"));
  o.global_batch = 64;
  o.data = 3;
  CHECK_THROWS_WITH(sim::search(t, cl, o), Catch::Contains("do not divide the cluster's 8 GPUs"));
  o.data = 0;
  o.tensor = 8;
  CHECK_THROWS_WITH(sim::search(t, cl, o), Catch::Contains("must divide the GPUs per node (4)"));
  o.tensor = 0;
  o.data = 8;
  o.global_batch = 12;
  CHECK_THROWS_WITH(sim::search(t, cl, o),
                    Catch::Contains("global batch (12) is not divisible by the data parallel "
                                    "size (8)"));
  o.data = 0;
  o.schedules = {"2f2b"};
  CHECK_THROWS_WITH(sim::search(t, cl, o), Catch::Contains("unknown schedule '2f2b'"));
}
