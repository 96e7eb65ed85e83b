#pragma once
// calibration: the simulator's prediction of a training configuration from measured pass times.
//
// calibrate<T>(model, ranks, algorithm) is a short profiling run on the calling thread: it times
// one transformer block's F, B and W, the unsharded output layer's (final norm + LM head + loss,
// lm_head.hpp), the S and T passes of `algorithm` on one rank's vocabulary shard and the sharded
// embedding's gather and scatter (pipit::vocab, as runtime::vocab_layers calls them, without the
// collectives), and Adam's time per element — each the median of a few repetitions after one
// warm-up. predict_step(options, ranks, calibration) builds the configuration's plan and
// partition, gives every virtual stage its layers' and vocabulary layers' times
// (pipit::sim::costs::stages, vocab_s/vocab_t/embed_f/embed_b), simulates the plan
// (pipit::sim::simulate) and adds the slowest rank's optimizer step.
//
// Not modelled: point-to-point transfers and the vocabulary passes' collectives (in-process
// copies of tokens x hidden values here; costs.comm = 0), the embedding stage's gather and the
// final norm of a vocabulary-parallel last stage (O(tokens x hidden)), and the slowdown when
// ranks share cores or memory bandwidth: the profile runs on one thread alone.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "block.hpp"
#include "config.hpp"
#include "lm_head.hpp"
#include "matrix.hpp"
#include "pipit/sim/costs.hpp"
#include "pipit/sim/simulate.hpp"
#include "pipit/vocab/embedding.hpp"
#include "pipit/vocab/output_layer.hpp"
#include "pipit/vocab/shards.hpp"
#include "random.hpp"
#include "train.hpp"

namespace gpt {

struct pass_seconds {
  double f = 0, b = 0, w = 0;  // one microbatch
};

struct calibration {
  pass_seconds block;                     // one transformer block
  pass_seconds head;                      // final norm + LM head + loss, whole vocabulary
  double vocab_s = 0, vocab_t = 0;        // one rank's shard, the calibrated algorithm
  double embed_f = 0, embed_b = 0;        // one rank's shard of the embedding
  double adam_seconds_per_parameter = 0;  // one Adam update of one parameter
};

namespace detail_calibration {

template <class F>
double median_seconds(int repeats, F&& f) {
  using clock = std::chrono::steady_clock;
  f();  // warm-up: first-touch allocations and caches
  std::vector<double> t;
  for (int k = 0; k < repeats; ++k) {
    const auto a = clock::now();
    f();
    t.push_back(std::chrono::duration<double>(clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

template <class T>
matrix<T> noise(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, double scale) {
  matrix<T> m(rows, cols);
  for (Eigen::Index k = 0; k < m.size(); ++k)
    m.data()[k] = static_cast<T>(scale * normal(hash_of({seed, static_cast<std::uint64_t>(k)})));
  return m;
}

}  // namespace detail_calibration

// Throws pipit::error for a bad model, ranks < 1, an unknown algorithm or repeats < 1.
template <class T>
calibration calibrate(const model_config& cfg, int ranks, std::string_view algorithm,
                      int repeats = 3) {
  using detail_calibration::median_seconds;
  using detail_calibration::noise;
  check(cfg);
  if (ranks < 1) pipit::fail("gpt::calibrate: ranks must be >= 1 (got ", ranks, ")");
  if (repeats < 1) pipit::fail("gpt::calibrate: repeats must be >= 1 (got ", repeats, ")");
  const Eigen::Index d = cfg.hidden, n = cfg.tokens();
  calibration k;
  const matrix<T> x = noise<T>(d, n, 1, 1.0), dy = noise<T>(d, n, 2, 1e-3);
  matrix<T> y(d, n), dx(d, n);
  std::vector<std::int32_t> targets(static_cast<std::size_t>(n));
  for (std::size_t t = 0; t < targets.size(); ++t)
    targets[t] = static_cast<std::int32_t>(hash_of({3, t}) % static_cast<std::uint64_t>(cfg.vocab));

  {  // one block
    block<T> blk(cfg, 0);
    std::vector<T> saved(blk.layout().size);
    const cmap<T> xin(x.data(), d, n), g(dy.data(), d, n);
    k.block.f = median_seconds(repeats, [&] { blk.forward(xin, map<T>(y.data(), d, n), saved); });
    k.block.b =
        median_seconds(repeats, [&] { blk.backward_input(g, saved, map<T>(dx.data(), d, n)); });
    k.block.w = median_seconds(repeats, [&] { blk.backward_weight(g, saved); });
  }
  {  // the unsharded output layer, one microbatch in flight
    lm_head<T> head(cfg, 1);
    std::vector<T> saved(head.layout().size);
    const cmap<T> xin(x.data(), d, n);
    k.head.f = median_seconds(repeats, [&] { head.forward(0, xin, targets, saved, 1.0); });
    k.head.b =
        median_seconds(repeats, [&] { head.backward_input(0, saved, map<T>(dx.data(), d, n)); });
    // W ends the microbatch: run its forward again outside the timer before each W.
    std::vector<double> w;
    for (int r = 0; r <= repeats; ++r) {
      head.forward(0, xin, targets, saved, 1.0);
      const auto a = std::chrono::steady_clock::now();
      head.backward_weight(0, saved);
      if (r > 0)
        w.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
    }
    std::sort(w.begin(), w.end());
    k.head.w = w[w.size() / 2];
  }
  {  // rank 0's shard: the S and T passes as vocab_layers runs them, and the embedding
    namespace v = pipit::vocab;
    const v::vocab_shards shards(cfg.vocab, ranks);
    const std::int64_t rows = shards.shard_size();
    const matrix<T> table = noise<T>(d, rows, 4, cfg.init_std);  // rows x d row-major
    matrix<T> grad = matrix<T>::Zero(d, rows), acc(d, n), emb(d, n);
    std::vector<std::int64_t> tgt(targets.begin(), targets.end()), ids(tgt.size());
    for (std::size_t t = 0; t < ids.size(); ++t)  // ids inside rank 0's real rows
      ids[t] = static_cast<std::int64_t>(hash_of({5, t}) %
                                         static_cast<std::uint64_t>(shards.real_rows(0)));
    std::vector<T> g(static_cast<std::size_t>(n));
    const auto xv = v::make_view<const T>(x.data(), n, d);
    const auto wv = v::make_view<const T>(table.data(), rows, d);
    const auto gv = v::make_view<T>(grad.data(), rows, d);
    const auto av = v::make_view<T>(acc.data(), n, d);
    with_vocab_algorithm(algorithm, [&]<class A>(std::type_identity<A>) {
      v::output_layer<A, T> layer(shards, 0, xv, wv, tgt);
      k.vocab_s = median_seconds(repeats, [&] {
        layer.bind(xv, tgt);
        if constexpr (std::is_same_v<A, v::one_barrier>) {
          layer.s_pass(av);
          layer.input_grad_partial(av);
        } else {
          layer.s_pass();
          if constexpr (std::is_same_v<A, v::naive>) layer.naive_combine();
        }
        layer.loss(g);
      });
      k.vocab_t = median_seconds(repeats, [&] {
        if constexpr (std::is_same_v<A, v::one_barrier>)
          layer.t_pass(g, gv);
        else
          layer.t_pass(g, gv, av);
      });
    });
    k.embed_f = median_seconds(repeats, [&] {
      v::embedding_forward_local<T, T>(shards, 0, wv, ids, v::make_view<T>(emb.data(), n, d));
    });
    k.embed_b = median_seconds(repeats, [&] {
      v::embedding_backward_local<T, T>(shards, 0, ids, v::make_view<const T>(acc.data(), n, d),
                                        gv);
    });
  }
  {  // Adam over a million parameters
    constexpr std::size_t count = 1 << 20;
    std::vector<T> value(count, T(0.01)), grad(count, T(0.001));
    const parameter<T> p{value, grad, 0, 0};
    adam<T> opt(std::span<const parameter<T>>(&p, 1), {});
    k.adam_seconds_per_parameter =
        median_seconds(repeats, [&] { opt.step(std::span<const parameter<T>>(&p, 1)); }) /
        static_cast<double>(count);
  }
  return k;
}

// Parameters of a virtual stage of `part` (the tensors gpt_stage holds for it).
inline double stage_parameters(const model_config& c, const pipit::partition::partition& part,
                               int s) {
  const double d = c.hidden, f = c.ffn(), v = c.vocab;
  const double block = 4 * d * d + 2 * f * d + 9 * d + f;  // two norms, qkv, proj, the MLP
  const auto& st = part.stages[static_cast<std::size_t>(s)];
  double k = st.layers * block;
  if (s == 0) k += c.seq * d;  // positions
  if (st.embedding) k += v * d;
  if (s == part.virtual_stages() - 1) k += 2 * d + (st.output ? v * d : 0);
  return k;
}

struct step_prediction {
  double step_seconds = 0;       // pipeline + optimizer
  double pipeline_seconds = 0;   // the simulated plan's makespan
  double optimizer_seconds = 0;  // the slowest rank's Adam step
  double tokens_per_second = 0;
  pipit::sim::result sim;
};

// The simulator's step time for options `o` on `ranks` ranks with the calibrated pass times
// (calibrated for o.vocab when the partition is vocab-parallel).
inline step_prediction predict_step(const train_options& o, int ranks, const calibration& k) {
  const pipit::partition::partition part = partition_of(o, ranks);
  const pipit::schedule::plan plan = plan_of(o, ranks);
  pipit::sim::costs c;
  c.comm = 0;
  c.stages.resize(static_cast<std::size_t>(part.virtual_stages()));
  for (int s = 0; s < part.virtual_stages(); ++s) {
    const auto& st = part.stages[static_cast<std::size_t>(s)];
    pipit::sim::stage_costs& sc = c.stages[static_cast<std::size_t>(s)];
    sc.f = st.layers * k.block.f + (st.output ? k.head.f : 0);
    sc.b = st.layers * k.block.b + (st.output ? k.head.b : 0);
    sc.w = st.layers * k.block.w + (st.output ? k.head.w : 0);
  }
  std::optional<pipit::vocab::vocab_shards> shards;
  if (part.vocab_parallel) {
    c.vocab_s = k.vocab_s;
    c.vocab_t = k.vocab_t;
    c.embed_f = k.embed_f;
    c.embed_b = k.embed_b;
    shards.emplace(o.model.vocab, ranks);
  }
  step_prediction out;
  out.sim = pipit::sim::simulate(plan, c);
  out.pipeline_seconds = out.sim.makespan;
  for (int r = 0; r < ranks; ++r) {
    double params = 0;
    for (const int s : part.stages_of(r)) params += stage_parameters(o.model, part, s);
    if (shards) params += 2.0 * static_cast<double>(shards->real_rows(r)) * o.model.hidden;
    out.optimizer_seconds = std::max(out.optimizer_seconds, params * k.adam_seconds_per_parameter);
  }
  out.step_seconds = out.pipeline_seconds + out.optimizer_seconds;
  out.tokens_per_second = static_cast<double>(o.model.tokens()) * o.microbatches / out.step_seconds;
  return out;
}

}  // namespace gpt
