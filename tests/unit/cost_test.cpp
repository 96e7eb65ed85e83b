// The cost model against the closed forms of the literature (Megatron's FLOPs and parameter
// counts, the vocabulary paper's MFU formula and output-layer ratio, Korthikanti's activation
// bytes, the zero-bubble W memory), the hardware profiles and alpha–beta collectives, the
// per-stage costs of partitions (vocabulary parallelism included), the simulator's per-stage
// costs, and model-level predictions whose shape is known in closed form.
#include <catch2/catch.hpp>

#include <algorithm>
#include <string>

#include "pipit/cost/balanced_partition.hpp"
#include "pipit/cost/communication.hpp"
#include "pipit/cost/flops.hpp"
#include "pipit/cost/hardware.hpp"
#include "pipit/cost/memory.hpp"
#include "pipit/cost/stage_costs.hpp"
#include "pipit/cost/transformer.hpp"
#include "pipit/cost/vocab_algorithm.hpp"
#include "pipit/cost/work.hpp"
#include "pipit/partition/layout.hpp"
#include "pipit/partition/naive.hpp"
#include "pipit/partition/vocab_parallel.hpp"
#include "pipit/schedule/one_f_one_b.hpp"
#include "pipit/sim/predict.hpp"
#include "pipit/sim/simulate.hpp"

using namespace pipit::cost;
namespace pp = pipit::partition;

namespace {

// The vocabulary paper's 4B GPT (reference notes, vocabulary_parallelism.md §10.1).
constexpr transformer gpt4b(int seq, int vocab) {
  return transformer{.layers = 32, .hidden = 3072, .heads = 24, .seq = seq, .vocab = vocab};
}

// A hardware profile with free communication, for closed forms of the pipeline time.
constexpr hardware no_latency() {
  hardware hw = a100_80gb;
  hw.p2p = {0, 1e30};
  hw.collective = {0, 1e30};
  return hw;
}

}  // namespace

TEST_CASE("layer FLOPs are 24nh^2 + 4nsh forward, three times that per microbatch", "[cost]") {
  for (const int h : {1024, 3072, 4096})
    for (const int s : {512, 2048, 4096})
      for (const int b : {1, 2}) {
        const transformer t{
            .layers = 4, .hidden = h, .heads = 16, .seq = s, .vocab = 1000, .microbatch_size = b};
        const double n = double(b) * s;
        const pass_work lw = layer_work(t);
        INFO("h=" << h << " s=" << s << " b=" << b);
        CHECK(lw.f.flops() == Approx(24 * n * h * double(h) + 4 * n * s * double(h)));
        CHECK(lw.total().flops() == Approx(3 * lw.f.flops()));
        CHECK(lw.w.flops() == Approx(24 * n * h * double(h)));  // the weight GEMMs only
        const pass_work ow = output_work(t);
        CHECK(ow.f.gemm_flops == Approx(2 * n * h * 1000.0));
        CHECK(ow.total().gemm_flops == Approx(3 * ow.f.gemm_flops));
      }
  // Grouped-query attention shrinks the K and V projections; a gated MLP has three matrices.
  const transformer gqa{.layers = 1,
                        .hidden = 4096,
                        .heads = 32,
                        .kv_heads = 8,
                        .ffn = 14336,
                        .seq = 4096,
                        .vocab = 128256,
                        .gated_mlp = true};
  const double n = 4096, h = 4096, k = 1024, f = 14336;
  CHECK(layer_gemm_flops(gqa) ==
        Approx(2 * n * h * (h + 2 * k) + 2 * n * h * h + 3 * 2 * n * h * f));
  // Recomputation re-runs the forward inside B.
  transformer rc = gpt4b(2048, 32000);
  rc.recompute = true;
  CHECK(layer_work(rc).total().flops() == Approx(4 * layer_work(rc).f.flops()));
}

TEST_CASE("the output layer costs V / (12h + 2s) transformer layers", "[cost]") {
  // The reference table (vocabulary_parallelism.md §1): 6.25, 3.125, 1.5625 at s = 2048.
  CHECK(output_layer_in_layers(gpt4b(2048, 256000)) == Approx(6.25));
  CHECK(output_layer_in_layers(gpt4b(2048, 128000)) == Approx(3.125));
  CHECK(output_layer_in_layers(gpt4b(2048, 64000)) == Approx(1.5625));
  CHECK(output_layer_in_layers(gpt4b(4096, 256000)) == Approx(5.68).epsilon(0.001));
  for (const int h : {2048, 3072, 8192})
    for (const int s : {1024, 4096})
      for (const int v : {32000, 151936}) {
        const transformer t{.layers = 8, .hidden = h, .heads = 16, .seq = s, .vocab = v};
        CHECK(output_layer_in_layers(t) == Approx(double(v) / (12.0 * h + 2.0 * s)));
      }
  STATIC_REQUIRE(output_layer_in_layers(gpt4b(2048, 256000)) > 6.2);  // constexpr
}

TEST_CASE("model FLOPs match the artifact's MFU formula and Megatron's per-iteration formula",
          "[cost]") {
  for (const int s : {2048, 4096})
    for (const int v : {32000, 64000, 128000, 256000})
      for (const int m : {1, 128}) {
        const transformer t = gpt4b(s, v);
        const double B = m, h = 3072, L = 32, FH = 4 * h, V = v;
        // 3·(2BshV + L·(8Bsh² + 4Bs²h + 4Bsh·FH)) (vocabulary_parallelism.md §1).
        const double artifact =
            3 * (2 * B * s * h * V +
                 L * (8 * B * s * h * h + 4 * B * s * double(s) * h + 4 * B * s * h * FH));
        CHECK(model_flops_per_iteration(t, m) == Approx(artifact).epsilon(1e-12));
        // The same from the passes: m × (L layers + the LM head) × (F + B + W), elementwise aside.
        const double passes =
            m * (L * layer_work(t).total().flops() + output_work(t).total().gemm_flops);
        CHECK(passes == Approx(artifact).epsilon(1e-12));
        // Megatron (Narayanan et al., SC'21): 96·B·s·l·h²·(1 + s/6h + V/16lh) counts the
        // recomputed forward of every layer.
        transformer rc = t;
        rc.recompute = true;
        const double megatron = 96 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h));
        const double with_recompute =
            m * (L * layer_work(rc).total().flops() + output_work(rc).total().gemm_flops);
        CHECK(with_recompute == Approx(megatron).epsilon(1e-12));
      }
}

TEST_CASE("parameter counts match Megatron's 12lh^2 (1 + 13/12h + (V + s)/12lh)", "[cost]") {
  for (const int h : {1024, 3072, 12288}) {
    const transformer t{.layers = 40,
                        .hidden = h,
                        .heads = 8,
                        .seq = 2048,
                        .vocab = 51200,
                        .learned_positions = true};
    const double l = 40, H = h, V = 51200, s = 2048;
    CHECK(layer_parameters(t) == Approx(12 * H * H + 13 * H));
    const double megatron = 12 * l * H * H * (1 + 13 / (12 * H) + (V + s) / (12 * l * H));
    CHECK(l * layer_parameters(t) + embedding_parameters(t) == Approx(megatron));
    CHECK(output_parameters(t) == Approx(V * H + 2 * H));  // untied head + final norm
  }
  // 18 bytes per parameter by default (fp32 gradients), ZeRO's 16 with 16-bit gradients.
  transformer t = gpt4b(2048, 32000);
  CHECK(states_of(t, 1000).total() == Approx(18000));
  t.bytes.gradient = 2;
  CHECK(states_of(t, 1000).total() == Approx(16000));
}

TEST_CASE("activation bytes are Korthikanti's 34sbh + 5as^2b, W keeps the zero-bubble 32h",
          "[cost]") {
  for (const int s : {1024, 2048, 4096})
    for (const int b : {1, 4}) {
      transformer t{.layers = 32,
                    .hidden = 3072,
                    .heads = 24,
                    .seq = s,
                    .vocab = 32000,
                    .microbatch_size = b};
      const double sbh = double(s) * b * 3072, as2b = 24.0 * s * s * b;
      CHECK(layer_activation_bytes(t) == Approx(34 * sbh));  // flash attention: no scores
      CHECK(layer_weight_grad_bytes(t) == Approx(32 * sbh));
      t.flash_attention = false;
      CHECK(layer_activation_bytes(t) == Approx(34 * sbh + 5 * as2b));
      // B frees mem_F + mem_W = 2h + 5as per token (reference notes, schedules.md §2).
      CHECK(layer_activation_bytes(t) - layer_weight_grad_bytes(t) == Approx(2 * sbh + 5 * as2b));
      t.recompute = true;
      CHECK(layer_activation_bytes(t) == Approx(2 * sbh));  // only the layer's input
    }
  // The output layer keeps the fp32 softmax: 4 bytes per logit plus two 16-bit inputs.
  const transformer t = gpt4b(2048, 256000);
  CHECK(output_activation_bytes(t) == Approx(2048.0 * (4 * 3072 + 4 * 256000.0)));
}

TEST_CASE("bad transformer descriptions are refused with their values", "[cost]") {
  auto t = gpt4b(2048, 32000);
  CHECK_NOTHROW(check(t));
  t.layers = 0;
  CHECK_THROWS_WITH(check(t), Catch::Contains("layers must be >= 1 (got 0)"));
  t = gpt4b(2048, 32000);
  t.heads = 7;
  CHECK_THROWS_WITH(check(t), Catch::Contains("heads (7) must divide hidden (3072)") &&
                                  Catch::Contains("3072 % 7 = 6"));
  t = gpt4b(2048, 32000);
  t.kv_heads = 5;
  CHECK_THROWS_WITH(check(t), Catch::Contains("kv_heads (5) must divide heads (24)"));
  t = gpt4b(2048, 0);
  CHECK_THROWS_WITH(check(t), Catch::Contains("vocab must be >= 1 (got 0)"));
  t = gpt4b(0, 32000);
  CHECK_THROWS_WITH(check(t), Catch::Contains("seq must be >= 1 (got 0)"));
  t = gpt4b(2048, 32000);
  t.microbatch_size = -1;
  CHECK_THROWS_WITH(check(t), Catch::Contains("microbatch_size must be >= 1 (got -1)"));
}

TEST_CASE("hardware profiles time work per kind and refuse bad fields", "[cost]") {
  for (const hardware* hw : hardware_presets) CHECK_NOTHROW(check(*hw));
  CHECK(hardware_by_name("h200").peak_flops == 989e12);
  CHECK_THROWS_WITH(hardware_by_name("tpu"), Catch::Contains("unknown hardware 'tpu'") &&
                                                 Catch::Contains("a100-80gb, h200"));
  const hardware hw = a100_80gb;
  CHECK(seconds(work{312e12, 0, 0}, hw) == Approx(1 / 0.75));
  CHECK(seconds(work{0, 312e12, 0}, hw) == Approx(1 / 0.55));
  CHECK(seconds(work{0, 0, 2039e9}, hw) == Approx(1 / 0.85));
  CHECK(seconds(work{312e12, 312e12, 2039e9}, hw) == Approx(1 / 0.75 + 1 / 0.55 + 1 / 0.85));
  hardware custom = a100_80gb;
  set_field(custom, "gemm=0.5");
  set_field(custom, "p2p_latency=1e-6");
  CHECK(custom.gemm_fraction == 0.5);
  CHECK(custom.p2p.latency == 1e-6);
  CHECK_THROWS_WITH(set_field(custom, "speed=1"),
                    Catch::Contains("unknown hardware setting 'speed'"));
  CHECK_THROWS_WITH(set_field(custom, "gemm=fast"), Catch::Contains("'fast' is not a number"));
  custom.gemm_fraction = 1.5;
  CHECK_THROWS_WITH(check(custom), Catch::Contains("gemm_fraction must be in (0, 1] (got 1.5)"));
  custom = a100_80gb;
  custom.peak_flops = 0;
  CHECK_THROWS_WITH(check(custom), Catch::Contains("peak_flops must be > 0 (got 0)"));
}

TEST_CASE("collectives follow the alpha-beta ring formulas", "[cost]") {
  const channel l{.latency = 5e-6, .bandwidth = 100e9};
  const double bytes = 64e6;
  CHECK(p2p_time(l, bytes) == Approx(5e-6 + 64e6 / 100e9));
  CHECK(all_reduce_time(l, 8, bytes) == Approx(2 * 7 * 5e-6 + 2.0 * 7 / 8 * 64e6 / 100e9));
  CHECK(all_gather_time(l, 8, bytes) == Approx(7 * 5e-6 + 7.0 / 8 * 64e6 / 100e9));
  CHECK(reduce_scatter_time(l, 8, bytes) == Approx(all_gather_time(l, 8, bytes)));
  CHECK(broadcast_time(l, 8, bytes) == Approx(7 * 5e-6 + 64e6 / 100e9));
  CHECK(all_reduce_time(l, 1, bytes) == 0);  // one rank: nothing to send
  CHECK(activation_message_bytes(gpt4b(2048, 32000)) == Approx(2048.0 * 3072 * 2));
  // Vocabulary-parallel communication grows with the ranks' latency terms, not with V.
  const transformer t = gpt4b(2048, 256000);
  CHECK(vocab_parallel_comm_time(t, 8, vocab_algorithm::one_barrier, l) ==
        Approx(vocab_parallel_comm_time(gpt4b(2048, 32000), 8, vocab_algorithm::one_barrier, l)));
  CHECK(vocab_parallel_comm_time(t, 1, vocab_algorithm::one_barrier, l) == 0);
}

TEST_CASE("vocabulary parallelism splits the output layer into S and T by algorithm", "[cost]") {
  const transformer t = gpt4b(2048, 256000);
  const double n = 2048, h = 3072, shard = 256000 / 8, gemm = 2 * n * h * shard;
  const auto one = vocab_work(t, 8, vocab_algorithm::one_barrier);
  const auto two = vocab_work(t, 8, vocab_algorithm::two_barrier);
  const auto naive = vocab_work(t, 8, vocab_algorithm::naive);
  // One barrier: S = logits + A = P·W, T = ∇W. Two barriers and naive: S = logits, T = ∇X + ∇W.
  CHECK(one.s.gemm_flops == Approx(2 * gemm));
  CHECK(one.t.gemm_flops == Approx(gemm));
  CHECK(one.t_input.gemm_flops == 0);
  CHECK(two.s.gemm_flops == Approx(gemm));
  CHECK(two.t.gemm_flops == Approx(2 * gemm));
  CHECK(two.t_input.gemm_flops == Approx(gemm));
  CHECK(naive.t == two.t);
  // The same three GEMMs in total: p ranks together do the unsharded output layer's FLOPs.
  for (const auto& v : {one, two, naive})
    CHECK(8 * (v.s.gemm_flops + v.t.gemm_flops) == Approx(output_work(t).total().gemm_flops));
  CHECK(barriers(vocab_algorithm::naive) == 3);
  CHECK(barriers(vocab_algorithm::two_barrier) == 2);
  CHECK(barriers(vocab_algorithm::one_barrier) == 1);
  CHECK(vocab_algorithm_by_name("two-barrier") == vocab_algorithm::two_barrier);
  CHECK_THROWS_WITH(vocab_algorithm_by_name("three-barrier"),
                    Catch::Contains("unknown vocabulary algorithm 'three-barrier'"));
  // V not divisible by the ranks: shards are padded up.
  CHECK(vocab_shard(gpt4b(2048, 32001), 8) == 4001);
}

TEST_CASE("stage costs add up to the model, with or without vocabulary parallelism", "[cost]") {
  const transformer t = gpt4b(2048, 256000);
  const pp::pipeline pl{.ranks = 8};
  const auto naive = stage_costs(t, pp::naive(32, pl));
  const auto vp = stage_costs(t, pp::vocab_parallel(32, pl), vocab_algorithm::one_barrier);
  work total_naive, total_vp;
  double params_naive = 0, params_vp = 0;
  for (const auto& s : naive.stages) total_naive += s.work.total();
  for (const auto& s : vp.stages) total_vp += s.work.total();
  for (const auto& r : naive.ranks) params_naive += r.parameters;
  for (const auto& r : vp.ranks) params_vp += r.parameters;
  // The GEMM FLOPs are the same however the vocabulary layers are placed.
  CHECK(total_vp.gemm_flops == Approx(total_naive.gemm_flops));
  CHECK(total_vp.attention_flops == Approx(total_naive.attention_flops));
  CHECK(params_vp == Approx(params_naive));
  const double model_params =
      32 * layer_parameters(t) + embedding_parameters(t) + output_parameters(t);
  CHECK(params_naive == Approx(model_params));
  // Naive: the last stage carries the output layer; vocabulary parallel: every stage the same
  // GEMM work (the last one's extra final norm is memory-bound).
  CHECK(naive.stages.back().work.total().gemm_flops >
        2 * naive.stages.front().work.total().gemm_flops);
  for (const auto& s : vp.stages)
    CHECK(s.work.total().gemm_flops == Approx(vp.stages.front().work.total().gemm_flops));
  // Vocabulary parallelism keeps one microbatch more per rank and one S/T pair per barrier.
  CHECK(vp.barriers == 1);
  const double per_microbatch = vp.stages.front().activation_bytes;
  CHECK(per_microbatch == Approx(4 * layer_activation_bytes(t)));
  const double pair = 4.0 * 2048 * 32000 + 4.0 * 2048 * 3073;
  CHECK(vp.ranks.front().extra_activation_bytes == Approx(per_microbatch + pair));
  const auto vp2 = stage_costs(t, pp::vocab_parallel(32, pl), vocab_algorithm::two_barrier);
  CHECK(vp2.ranks.front().extra_activation_bytes == Approx(2 * per_microbatch + 2 * pair));
  // A partition for another model is refused with both counts.
  CHECK_THROWS_WITH(stage_costs(gpt4b(2048, 32000), pp::naive(24, pl)),
                    Catch::Contains("holds 24 transformer layers but the model has 32"));
}

TEST_CASE("the balanced partition gives the output layer a stage of its own at 256k", "[cost]") {
  const pp::pipeline pl{.ranks = 8};
  // At 32k the output layer is lighter than a layer: the naive split is already optimal.
  CHECK(pp::to_layout(balanced_partition(gpt4b(2048, 32000), a100_80gb, pl)) ==
        pp::to_layout(pp::naive(32, pl)));
  // At 256k it outweighs several layers: the last stage holds it alone.
  const auto b = balanced_partition(gpt4b(2048, 256000), a100_80gb, pl);
  CHECK(b.stages.back().output);
  CHECK(b.stages.back().layers == 0);
  const auto c = item_costs(gpt4b(2048, 256000), a100_80gb);
  CHECK(c.output > 6 * c.layer);
}

TEST_CASE("the simulator takes per-stage durations and counts activation bytes", "[sim]") {
  using namespace pipit::schedule;
  const int p = 4, m = 8;
  const plan pl = make_plan<one_f_one_b>(shape{p, m, 1});
  pipit::sim::costs c;
  c.stages.assign(4, {.f = 1, .b = 2, .w = 0, .activation_bytes = 100, .free_at_b = 0});
  const auto r = pipit::sim::simulate(pl, c);
  CHECK(r.makespan == Approx((m + p - 1) * 3.0));  // 1F1B's closed form with f + b = 3
  for (int k = 0; k < p; ++k) {
    CHECK(r.ranks[k].peak_activation_bytes == Approx(100.0 * (p - k)));
    CHECK(r.ranks[k].peak_activations == Approx(p - k));
  }
  // A slower last stage stretches the steady state to (m − 1) × its period.
  c.stages.back() = {.f = 2, .b = 4, .w = 0, .activation_bytes = 100, .free_at_b = 0};
  const auto slow = pipit::sim::simulate(pl, c);
  CHECK(slow.makespan >= (m - 1) * 6.0 + 3 * 3.0 + 6 - 1e-9);
  // Without per-stage costs nothing is reported in bytes.
  CHECK(pipit::sim::simulate(pl, {}).ranks[0].peak_activation_bytes == 0);
  c.stages.resize(3);
  CHECK_THROWS_WITH(pipit::sim::simulate(pl, c), Catch::Contains("costs.stages has 3 entries"));
  c.stages.assign(4, {.f = 1, .b = -1});
  CHECK_THROWS_WITH(pipit::sim::simulate(pl, c), Catch::Contains("costs.stages[0] must be >= 0"));
}

TEST_CASE("predictions: 1F1B memory and time in closed form, vocabulary parallelism balances",
          "[sim][cost]") {
  const transformer t = gpt4b(2048, 256000);
  const pp::pipeline pl{.ranks = 8};
  const int m = 128;
  const auto naive = pipit::sim::predict("1f1b", m, pp::naive(32, pl), t, no_latency());
  const auto vp = pipit::sim::predict("1f1b", m, pp::vocab_parallel(32, pl), t, no_latency());
  // 1F1B keeps p − r microbatches of rank r's activations at the peak.
  for (int r = 0; r < 7; ++r)
    CHECK(naive.ranks[r].memory.activations == Approx((8 - r) * 4 * layer_activation_bytes(t)));
  // Vocabulary parallel, one barrier: p + 1 on rank 0, and one S/T pair.
  const double pair = 4.0 * 2048 * 32000 + 4.0 * 2048 * 3073;
  CHECK(vp.ranks[0].memory.activations == Approx(9 * 4 * layer_activation_bytes(t) + pair));
  // The naive last stage is the bottleneck: its busy time is most of the iteration, and the
  // pipeline takes about (m − 1) of its periods plus one pass through every stage.
  const double last = naive.stages.back().f + naive.stages.back().b + naive.stages.back().w;
  double all = 0;
  for (const auto& s : naive.stages) all += s.f + s.b + s.w;
  CHECK(naive.pipeline_time == Approx((m - 1) * last + all).epsilon(0.01));
  // Vocabulary parallelism: every rank equally busy, the 1F1B bubble (p − 1)/(m + p − 1) only.
  double lo = 1e30, hi = 0;
  for (const auto& r : vp.ranks) {
    lo = std::min(lo, r.busy);
    hi = std::max(hi, r.busy);
  }
  CHECK(hi / lo < 1.01);
  CHECK(vp.sim.bubble_fraction == Approx(7.0 / 135).epsilon(0.02));
  CHECK(vp.mfu > 2 * naive.mfu);
  CHECK(vp.max_peak_memory_bytes < naive.max_peak_memory_bytes);
  // Totals are consistent.
  for (const auto* pr : {&naive, &vp}) {
    CHECK(pr->iteration_time == Approx(pr->pipeline_time + pr->optimizer_time));
    CHECK(pr->tokens_per_second == Approx(m * 2048.0 / pr->iteration_time));
    CHECK(pr->mfu == Approx(model_flops_per_iteration(t, m) / (pr->iteration_time * 8 * 312e12)));
    for (const auto& r : pr->ranks) CHECK(r.busy + r.idle == Approx(pr->pipeline_time));
  }
  // A plan and a partition for different pipelines are refused.
  const auto plan = pipit::schedule::make_plan<pipit::schedule::one_f_one_b>({8, m, 1});
  CHECK_THROWS_WITH(pipit::sim::predict(plan, pp::naive(32, {.ranks = 4}), t, a100_80gb),
                    Catch::Contains("ranks 8, chunks 1") && Catch::Contains("ranks 4, chunks 1") &&
                        Catch::Contains("differ"));
}
