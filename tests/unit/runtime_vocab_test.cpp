// The executor running vocabulary plans: the input embedding and the output layer sharded over
// 1 to 8 thread ranks (runtime::vocab_layers), with 1F1B, interleaved 1F1B and V-Half and the
// naive, two-barrier and one-barrier algorithms, trains exactly like one process that holds the
// whole vocabulary (double precision, tolerance 1e-12 relative to each tensor's largest value).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "pipit/comm/threads.hpp"
#include "pipit/runtime/executor.hpp"
#include "pipit/runtime/vocab_layers.hpp"
#include "pipit/schedule/vocab_passes.hpp"
#include "support/thread_checks.hpp"
#include "support/vocab_model.hpp"

namespace ps = pipit::schedule;
namespace rt = pipit::runtime;
namespace v = pipit::vocab;
using pipit::comm::threads;
using pipit::testing::row_matrix;
using pipit::testing::token_mlp_stage;
using pipit::testing::token_model_config;

namespace {

// Trains `steps` steps of the plan on threads; every rank compares every step against the
// reference. Returns the largest relative error seen on any rank.
template <class Alg>
double train_and_compare(std::string_view schedule, const ps::shape& s,
                         const token_model_config& cfg, int steps,
                         rt::executor_options options = {}) {
  const auto ref = pipit::testing::reference_run(cfg, s.microbatches, steps);
  const ps::plan plan = ps::make_vocab_plan(schedule, s, rt::vocab_passes_of<Alg>);
  std::vector<double> worst(static_cast<std::size_t>(s.stages), 0.0);
  threads::run(s.stages, [&](threads& comm) {
    worst[static_cast<std::size_t>(comm.rank())] =
        pipit::testing::train_vocab_rank<Alg>(comm, plan, cfg, ref, options);
  });
  return *std::max_element(worst.begin(), worst.end());
}

template <class Alg>
void sweep(std::string_view schedule, int chunks, std::initializer_list<int> ranks,
           const token_model_config& cfg) {
  for (const int p : ranks)
    for (const int m : {1, 3, 4, 8}) {
      const ps::shape s{p, m, chunks};
      if (schedule == "interleaved" && ps::interleaved_one_f_one_b::check(s) != ps::shape_rule::ok)
        continue;
      if (schedule == "v-half" && ps::v_half::check(s) != ps::shape_rule::ok) continue;
      INFO(schedule << " p=" << p << " m=" << m);
      CHECK(train_and_compare<Alg>(schedule, s, cfg, 2) <= 1e-12);
    }
}

token_model_config base_config() {
  token_model_config c;
  c.vocab = 37;  // divides by none of 2..8: the last shards are partly or wholly padding
  return c;
}

}  // namespace

TEST_CASE("1F1B with vocabulary layers trains like one process, all three algorithms",
          "[runtime][vocab][equivalence]") {
  const auto cfg = base_config();
  sweep<v::one_barrier>("1f1b", 1, {1, 2, 3, 4, 8}, cfg);
  sweep<v::two_barrier>("1f1b", 1, {1, 2, 3, 5, 8}, cfg);
  sweep<v::naive>("1f1b", 1, {1, 2, 4, 7}, cfg);
}

TEST_CASE("interleaved 1F1B with vocabulary layers trains like one process",
          "[runtime][vocab][equivalence]") {
  const auto cfg = base_config();
  sweep<v::one_barrier>("interleaved", 2, {2, 4}, cfg);
  sweep<v::two_barrier>("interleaved", 2, {2, 3}, cfg);
  sweep<v::naive>("interleaved", 2, {4}, cfg);
}

TEST_CASE("V-Half with vocabulary layers trains like one process",
          "[runtime][vocab][equivalence]") {
  auto cfg = base_config();
  cfg.layers = 6;  // fewer than the 8 or 16 virtual stages at p = 4, 8: empty stages pass through
  sweep<v::one_barrier>("v-half", 2, {1, 2, 4, 8}, cfg);
  sweep<v::two_barrier>("v-half", 2, {2, 3}, cfg);
  sweep<v::naive>("v-half", 2, {2}, cfg);
}

TEST_CASE("vocabulary training with label smoothing, z-loss and sum reduction",
          "[runtime][vocab][equivalence]") {
  auto cfg = base_config();
  cfg.loss.label_smoothing = 0.1;
  cfg.loss.z_loss = 1e-3;
  cfg.loss.reduce = v::reduction::sum;
  cfg.all_ignored_microbatch = 0;
  CHECK(train_and_compare<v::one_barrier>("1f1b", {4, 4, 1}, cfg, 2) <= 1e-12);
  CHECK(train_and_compare<v::two_barrier>("v-half", {2, 4, 2}, cfg, 2) <= 1e-12);
  CHECK(train_and_compare<v::naive>("1f1b", {3, 5, 1}, cfg, 2) <= 1e-12);
}

TEST_CASE("vocabulary training with re-materialization", "[runtime][vocab][equivalence]") {
  const auto cfg = base_config();
  const rt::executor_options remat{.rematerialize = true};
  CHECK(train_and_compare<v::one_barrier>("1f1b", {4, 6, 1}, cfg, 2, remat) <= 1e-12);
  CHECK(train_and_compare<v::two_barrier>("v-half", {4, 6, 2}, cfg, 2, remat) <= 1e-12);
  CHECK(train_and_compare<v::naive>("interleaved", {2, 4, 2}, cfg, 2, remat) <= 1e-12);
}

TEST_CASE("the vocabulary equivalence check is sensitive", "[runtime][vocab][equivalence]") {
  // Another seed for the reference's parameters changes every gradient far beyond 1e-12.
  auto cfg = base_config();
  const auto a = pipit::testing::reference_run(cfg, 4, 1);
  cfg.seed += 1;
  const auto b = pipit::testing::reference_run(cfg, 4, 1);
  CHECK(pipit::testing::rel_error(a[0].gh, b[0].gh) > 1e-3);
  CHECK(std::abs(a[0].loss - b[0].loss) > 1e-6);
  // A microbatch whose tokens are all ignored contributes a loss of 0, not NaN.
  CHECK(std::isfinite(a[0].loss));
}

TEST_CASE("a vocabulary plan and the executor's vocabulary layers must agree", "[runtime][vocab]") {
  const auto cfg = base_config();
  const ps::shape s{2, 2, 1};
  const auto make_layers = [&](threads& comm, row_matrix<double>& e, row_matrix<double>& g,
                               std::int64_t tokens) {
    const v::vocab_shards shards(cfg.vocab, 2);
    e = row_matrix<double>::Zero(shards.shard_size(), cfg.hidden);
    g = e;
    return std::make_unique<rt::vocab_layers<v::one_barrier, double>>(
        shards, comm.rank(), tokens, v::matrix_view<const double>{e.data(), e.rows(), e.cols()},
        v::matrix_view<double>{g.data(), g.rows(), g.cols()},
        v::matrix_view<const double>{e.data(), e.rows(), e.cols()},
        v::matrix_view<double>{g.data(), g.rows(), g.cols()});
  };
  SECTION("a vocabulary plan without vocabulary layers") {
    const ps::plan plan = ps::make_vocab_plan("1f1b", s, ps::vocab_passes::one_barrier);
    threads::run(2, [&](threads& comm) {
      token_mlp_stage<double> stage(cfg, plan, comm.rank());
      try {
        rt::executor ex(comm, stage, plan);
        PIPIT_TCHECK(false);
      } catch (const pipit::error& e) {
        PIPIT_TCHECK(std::string(e.what()).find("give the executor runtime::vocab_layers") !=
                     std::string::npos);
      }
    });
  }
  SECTION("another algorithm's plan") {
    const ps::plan plan = ps::make_vocab_plan("1f1b", s, ps::vocab_passes::two_barrier);
    threads::run(2, [&](threads& comm) {
      token_mlp_stage<double> stage(cfg, plan, comm.rank());
      row_matrix<double> e, g;
      auto layers = make_layers(comm, e, g, cfg.tokens);
      try {
        rt::executor ex(comm, stage, *layers, plan);
        PIPIT_TCHECK(false);
      } catch (const pipit::error& err) {
        PIPIT_TCHECK(std::string(err.what())
                         .find("two-barrier vocabulary passes but the "
                               "vocabulary layers run one-barrier") != std::string::npos);
      }
    });
  }
  SECTION("a plain plan with vocabulary layers") {
    const ps::plan plan = ps::make_vocab_plan("1f1b", s, ps::vocab_passes::none);
    threads::run(2, [&](threads& comm) {
      token_mlp_stage<double> stage(cfg, plan, comm.rank());
      row_matrix<double> e, g;
      auto layers = make_layers(comm, e, g, cfg.tokens);
      // Construction is collective: build outside the assertion's lock.
      std::string what;
      try {
        rt::executor ex(comm, stage, *layers, plan);
      } catch (const pipit::error& err) {
        what = err.what();
      }
      PIPIT_TCHECK(what.find("has no vocabulary passes") != std::string::npos);
    });
  }
  SECTION("ranks whose layers disagree on the tokens, and a stage of the wrong size") {
    const ps::plan plan = ps::make_vocab_plan("1f1b", s, ps::vocab_passes::one_barrier);
    threads::run(2, [&](threads& comm) {
      token_mlp_stage<double> stage(cfg, plan, comm.rank());
      row_matrix<double> e, g;
      // Rank 1's layers take one token more: its stage sizes disagree with them (rank 1 fails
      // locally), and every rank must raise, not hang.
      auto layers = make_layers(comm, e, g, cfg.tokens + comm.rank());
      try {
        rt::executor ex(comm, stage, *layers, plan);
        PIPIT_TCHECK(false);
      } catch (const pipit::error& err) {
        PIPIT_TCHECK(std::string(err.what()).find("tokens x hidden") != std::string::npos);
      }
    });
  }
  SECTION("a token id outside the vocabulary") {
    threads::run(1, [&](threads& comm) {
      row_matrix<double> e, g;
      const v::vocab_shards shards(cfg.vocab, 1);
      e = row_matrix<double>::Zero(shards.shard_size(), cfg.hidden);
      g = e;
      rt::vocab_layers<v::two_barrier, double> layers(
          shards, comm.rank(), 2, {e.data(), e.rows(), e.cols()}, {g.data(), g.rows(), g.cols()},
          {e.data(), e.rows(), e.cols()}, {g.data(), g.rows(), g.cols()});
      const std::vector<std::int64_t> tokens{3, 37}, targets{1, 2};
      PIPIT_TCHECK_THROWS_WITH(layers.set_batch(tokens, targets),
                               Catch::Contains("token id 37") && Catch::Contains("size 37"));
      const std::vector<std::int64_t> ok{3, 4}, bad_targets{1, -5};
      PIPIT_TCHECK_THROWS_WITH(layers.set_batch(ok, bad_targets), Catch::Contains("token id -5"));
    });
  }
}

TEST_CASE("run(observer) sees every instruction begin and end, vocabulary passes included",
          "[runtime][vocab]") {
  const auto cfg = base_config();
  const ps::shape s{3, 5, 1};
  const ps::plan plan = ps::make_vocab_plan("1f1b", s, ps::vocab_passes::two_barrier);
  struct recorder {
    std::vector<std::pair<rt::instruction_kind, int>> begun;
    int open = 0, max_open = 0, ended = 0;
    void begin(const rt::instruction& in, const rt::pass_info& i) {
      begun.emplace_back(in.kind, i.microbatch);
      max_open = std::max(max_open, ++open);
    }
    void end(const rt::instruction&, const rt::pass_info&) {
      --open;
      ++ended;
    }
  };
  threads::run(3, [&](threads& comm) {
    token_mlp_stage<double> stage(cfg, plan, comm.rank());
    const v::vocab_shards shards(cfg.vocab, 3);
    row_matrix<double> e = row_matrix<double>::Zero(shards.shard_size(), cfg.hidden), g = e;
    rt::vocab_layers<v::two_barrier, double> layers(
        shards, comm.rank(), cfg.tokens, {e.data(), e.rows(), e.cols()},
        {g.data(), g.rows(), g.cols()}, {e.data(), e.rows(), e.cols()},
        {g.data(), g.rows(), g.cols()});
    rt::executor ex(comm, stage, layers, plan);
    const auto batch = pipit::testing::make_batch(cfg, s.microbatches, 0);
    layers.set_batch(batch.tokens, batch.targets);
    recorder rec;
    ex.run(rec);
    PIPIT_TCHECK(rec.begun.size() == ex.compiled().code.size());
    PIPIT_TCHECK(rec.ended == static_cast<int>(rec.begun.size()));
    PIPIT_TCHECK(rec.max_open == 1);
    // The vocabulary passes, in the lowered plan's order on this rank.
    std::vector<std::pair<rt::instruction_kind, int>> seen, want;
    for (const auto& [k, mb] : rec.begun)
      if (k == rt::instruction_kind::vocab_s || k == rt::instruction_kind::vocab_t ||
          k == rt::instruction_kind::embed_forward || k == rt::instruction_kind::embed_backward)
        seen.emplace_back(k, mb);
    const auto kind_of = [](ps::op o) {
      return o == ps::op::vocab_s         ? rt::instruction_kind::vocab_s
             : o == ps::op::vocab_t       ? rt::instruction_kind::vocab_t
             : o == ps::op::embed_forward ? rt::instruction_kind::embed_forward
                                          : rt::instruction_kind::embed_backward;
    };
    const ps::plan lowered = ps::lower(plan);
    for (const auto& a : lowered.for_rank(comm.rank()))
      if (ps::is_vocabulary(a.kind)) want.emplace_back(kind_of(a.kind), a.microbatch);
    PIPIT_TCHECK(seen == want);
    PIPIT_TCHECK(seen.size() == 4u * static_cast<std::size_t>(s.microbatches));
    // An observed step trains exactly like an unobserved one: the loss is finite and positive.
    PIPIT_TCHECK(layers.loss().loss > 0);
    // The states in flight between S and T (2 on every rank here) hold X and g each, plus their
    // output layers' workspaces: at least that much is reported, and a second step allocates
    // nothing more.
    const std::size_t after_one = layers.workspace_bytes();
    PIPIT_TCHECK(after_one >= static_cast<std::size_t>(ex.compiled().vocab_slots) *
                                  layers.embedding_size() * sizeof(double));
    ex.run();
    PIPIT_TCHECK(layers.workspace_bytes() == after_one);
  });
}

TEST_CASE("2 data-parallel x 2 pipeline ranks with vocabulary layers train like one process",
          "[runtime][vocab][equivalence]") {
  const auto cfg = base_config();
  constexpr int m = 4, steps = 2, replicas = 2;
  const auto batch_of = [&](int step, int replica) {
    return pipit::testing::make_batch(cfg, m,
                                      static_cast<std::uint64_t>(step * replicas + replica));
  };
  // The reference: per step, each replica's gradients on its own batch, averaged.
  pipit::testing::vocab_reference ref(cfg);
  std::vector<pipit::testing::vocab_snapshot> want;
  for (int step = 0; step < steps; ++step) {
    pipit::testing::vocab_snapshot avg{};
    for (int q = 0; q < replicas; ++q) {
      ref.step(batch_of(step, q), m);
      if (q == 0) {
        avg = {ref.loss, ref.valid, ref.ge, ref.gh, ref.gw, ref.gb};
      } else {
        avg.loss += ref.loss;
        avg.ge += ref.ge;
        avg.gh += ref.gh;
        for (std::size_t l = 0; l < avg.gw.size(); ++l) {
          avg.gw[l] += ref.gw[l];
          avg.gb[l] += ref.gb[l];
        }
      }
    }
    avg.loss /= replicas;
    avg.ge /= replicas;
    avg.gh /= replicas;
    for (std::size_t l = 0; l < avg.gw.size(); ++l) {
      avg.gw[l] /= replicas;
      avg.gb[l] /= replicas;
    }
    ref.ge = avg.ge;
    ref.gh = avg.gh;
    ref.gw = avg.gw;
    ref.gb = avg.gb;
    ref.sgd(pipit::testing::vocab_test_lr);
    want.push_back(avg);
  }
  const ps::plan plan = ps::make_vocab_plan("1f1b", {2, m, 1}, ps::vocab_passes::one_barrier);
  std::vector<double> worst(4, 0.0);
  threads::run(4, [&](threads& world) {
    const int replica = world.rank() / 2, pr = world.rank() % 2;
    threads pipe = world.split(replica, pr);
    threads data = world.split(pr, replica);
    token_mlp_stage<double> stage(cfg, plan, pr);
    const v::vocab_shards shards(cfg.vocab, 2);
    const auto real = shards.real_range_of(pr);
    const std::int64_t rows = shards.shard_size(), n = real.size();
    row_matrix<double> e = row_matrix<double>::Zero(rows, cfg.hidden), h = e, ge = e, gh = e;
    const auto e_full = pipit::testing::embedding_table<double>(cfg);
    const auto h_full = pipit::testing::head_table<double>(cfg);
    for (std::int64_t i = 0; i < n; ++i) {
      e.row(i) = e_full.row(real.begin + i);
      h.row(i) = h_full.row(real.begin + i);
    }
    rt::vocab_layers<v::one_barrier, double> layers(
        shards, pr, cfg.tokens, {e.data(), rows, cfg.hidden}, {ge.data(), rows, cfg.hidden},
        {h.data(), rows, cfg.hidden}, {gh.data(), rows, cfg.hidden}, {cfg.loss});
    rt::executor ex(pipe, data, stage, layers, plan);
    double& w = worst[static_cast<std::size_t>(world.rank())];
    for (int step = 0; step < steps; ++step) {
      const auto batch = batch_of(step, replica);
      layers.set_batch(batch.tokens, batch.targets);
      ex.run();
      const auto& g = want[static_cast<std::size_t>(step)];
      double loss = static_cast<double>(layers.loss().loss);
      data.all_reduce(std::span<double>(&loss, 1), std::plus<>{});
      w = std::max(w, std::abs(loss / replicas - g.loss) / std::max(1.0, std::abs(g.loss)));
      for (int l = 0; l < cfg.layers; ++l)
        if (stage.holds(l))
          w = std::max(
              {w,
               pipit::testing::rel_error(stage.weight_grad(l), g.gw[static_cast<std::size_t>(l)]),
               pipit::testing::rel_error(stage.bias_grad(l), g.gb[static_cast<std::size_t>(l)])});
      w = std::max({w,
                    (ge.topRows(n) - g.ge.middleRows(real.begin, n)).cwiseAbs().maxCoeff() /
                        g.ge.cwiseAbs().maxCoeff(),
                    (gh.topRows(n) - g.gh.middleRows(real.begin, n)).cwiseAbs().maxCoeff() /
                        g.gh.cwiseAbs().maxCoeff()});
      stage.sgd(pipit::testing::vocab_test_lr);
      e -= pipit::testing::vocab_test_lr * ge;
      h -= pipit::testing::vocab_test_lr * gh;
      ge.setZero();
      gh.setZero();
    }
  });
  CHECK(*std::max_element(worst.begin(), worst.end()) <= 1e-12);
}
