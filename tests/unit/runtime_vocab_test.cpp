// The executor running vocabulary plans: the input embedding and the output layer sharded over
// 1 to 8 thread ranks (runtime::vocab_layers), with 1F1B, interleaved 1F1B and V-Half and the
// naive, two-barrier and one-barrier algorithms, trains exactly like one process that holds the
// whole vocabulary (double precision, tolerance 1e-12 relative to each tensor's largest value);
// so does a tp::process_grid whose vocabulary group shards over pipeline x tensor ranks (with
// data parallelism too), and a malformed vocabulary group is refused on every rank.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "pipit/comm/threads.hpp"
#include "pipit/runtime/comm_groups.hpp"
#include "pipit/runtime/executor.hpp"
#include "pipit/runtime/vocab_layers.hpp"
#include "pipit/schedule/by_name.hpp"
#include "pipit/schedule/vocab_passes.hpp"
#include "pipit/tp/process_grid.hpp"
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
  // The reference: per step, each replica's gradients on its own batch, averaged.
  const auto want = pipit::testing::reference_run_data_parallel(cfg, m, steps, replicas);
  const ps::plan plan = ps::make_vocab_plan("1f1b", {2, m, 1}, ps::vocab_passes::one_barrier);
  std::vector<double> worst(4, 0.0);
  threads::run(4, [&](threads& world) {
    const int replica = world.rank() / 2, pr = world.rank() % 2;
    threads pipe = world.split(replica, pr);
    threads data = world.split(pr, replica);
    token_mlp_stage<double> stage(cfg, plan, pr);
    const v::vocab_shards shards(cfg.vocab, 2);
    auto [real, rows, e, h, ge, gh] = pipit::testing::shard_tables_of(cfg, shards, pr);
    const std::int64_t n = real.size();
    rt::vocab_layers<v::one_barrier, double> layers(
        shards, pr, cfg.tokens, {e.data(), rows, cfg.hidden}, {ge.data(), rows, cfg.hidden},
        {h.data(), rows, cfg.hidden}, {gh.data(), rows, cfg.hidden}, {cfg.loss});
    rt::executor ex(pipe, data, stage, layers, plan);
    double& w = worst[static_cast<std::size_t>(world.rank())];
    for (int step = 0; step < steps; ++step) {
      const auto batch = pipit::testing::replica_batch(cfg, m, step, replica, replicas);
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

// ---- vocabulary shards over pipeline x tensor ranks (tp::process_grid) -----------------------

namespace {

// Trains `steps` steps on a (tensor, data, pipeline) grid of threads, the executor built from
// grid.groups(); every rank compares every step against the data-parallel reference. Returns
// the largest relative error seen on any rank.
template <class Alg>
double train_on_grid(std::string_view schedule, int chunks, pipit::tp::grid_shape g, int m,
                     const token_model_config& cfg, int steps = 2) {
  const auto ref = pipit::testing::reference_run_data_parallel(cfg, m, steps, g.data);
  const ps::plan plan =
      ps::make_vocab_plan(schedule, {g.pipeline, m, chunks}, rt::vocab_passes_of<Alg>);
  std::vector<double> worst(static_cast<std::size_t>(g.size()), 0.0);
  threads::run(g.size(), [&](threads& world) {
    pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout(g));
    worst[static_cast<std::size_t>(world.rank())] =
        pipit::testing::train_grid_rank<Alg>(grid, plan, cfg, ref);
  });
  return *std::max_element(worst.begin(), worst.end());
}

template <class Alg>
void grid_sweep(const token_model_config& cfg) {
  using gs = pipit::tp::grid_shape;
  for (const gs g : {gs{1, 1, 2}, gs{1, 2, 2}, gs{2, 1, 2}, gs{2, 2, 2}, gs{4, 1, 2}, gs{2, 1, 3}})
    for (const auto& [schedule, chunks, m] :
         {std::tuple{"1f1b", 1, 4}, std::tuple{"v-half", 2, 4}, std::tuple{"1f1b", 1, 1}}) {
      INFO(schedule << " tensor=" << g.tensor << " data=" << g.data << " pipeline=" << g.pipeline
                    << " m=" << m);
      CHECK(train_on_grid<Alg>(schedule, chunks, g, m, cfg) <= 1e-12);
    }
}

// The grid's threads as the tests build them: world, then a process_grid, then the layers for
// shard `shard` of `shard_count`.
// shard `shard` of `shard_count`; `gradient_pad` > 0 gives the gradients a row stride of
// hidden + gradient_pad (a strided view).
struct grid_rank_layers {
  row_matrix<double> e, g;
  std::unique_ptr<rt::vocab_layers<v::one_barrier, double>> layers;
  grid_rank_layers(const token_model_config& cfg, int shard_count, int shard,
                   std::int64_t gradient_pad = 0) {
    const v::vocab_shards shards(cfg.vocab, shard_count);
    e = row_matrix<double>::Zero(shards.shard_size(), cfg.hidden);
    g = row_matrix<double>::Zero(shards.shard_size(), cfg.hidden + gradient_pad);
    const v::matrix_view<double> gv{g.data(), g.rows(), cfg.hidden, g.cols()};
    layers = std::make_unique<rt::vocab_layers<v::one_barrier, double>>(
        shards, shard, cfg.tokens, v::matrix_view<const double>{e.data(), e.rows(), e.cols()}, gv,
        v::matrix_view<const double>{e.data(), e.rows(), e.cols()}, gv);
  }
};

// token_mlp_stage whose gradients() leaves out its last buffer when `fewer` is set.
struct fewer_gradients_stage : token_mlp_stage<double> {
  using token_mlp_stage<double>::token_mlp_stage;
  bool fewer = false;
  std::span<const std::span<double>> gradients() {
    const auto g = token_mlp_stage<double>::gradients();
    return fewer && !g.empty() ? g.first(g.size() - 1) : g;
  }
};

// Builds the executor (collective: outside the assertions' lock) and returns what it threw.
template <class Stage, class Layers>
std::exception_ptr construct(const rt::comm_groups<threads>& groups, Stage& stage, Layers& layers,
                             const ps::plan& plan) {
  try {
    rt::executor ex(groups, stage, layers, plan);
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

}  // namespace

TEST_CASE("vocabulary shards over pipeline x tensor ranks train like one process, one barrier",
          "[runtime][vocab][tensor][equivalence]") {
  grid_sweep<v::one_barrier>(base_config());
}

TEST_CASE("vocabulary shards over pipeline x tensor ranks train like one process, two barriers",
          "[runtime][vocab][tensor][equivalence]") {
  grid_sweep<v::two_barrier>(base_config());
}

TEST_CASE("vocabulary shards over pipeline x tensor ranks train like one process, naive",
          "[runtime][vocab][tensor][equivalence]") {
  grid_sweep<v::naive>(base_config());
}

TEST_CASE("vocabulary shards over pipeline x tensor ranks with interleaving and a rich loss",
          "[runtime][vocab][tensor][equivalence]") {
  auto cfg = base_config();
  cfg.loss.label_smoothing = 0.1;
  cfg.loss.z_loss = 1e-3;
  cfg.loss.reduce = v::reduction::sum;
  cfg.all_ignored_microbatch = 0;
  CHECK(train_on_grid<v::one_barrier>("interleaved", 2, {2, 1, 2}, 4, cfg) <= 1e-12);
  CHECK(train_on_grid<v::two_barrier>("v-half", 2, {2, 2, 3}, 3, cfg) <= 1e-12);
  CHECK(train_on_grid<v::naive>("1f1b", 1, {3, 1, 2}, 5, cfg) <= 1e-12);
}

TEST_CASE("the grid's executor groups point into the grid", "[runtime][vocab][tensor]") {
  threads::run(8, [&](threads& world) {
    pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout({2, 2, 2}));
    const rt::comm_groups<threads> gr = grid.groups();
    PIPIT_TCHECK(gr.pipeline == &grid.pipeline());
    PIPIT_TCHECK(gr.data == &grid.data());
    PIPIT_TCHECK(gr.vocab == &grid.vocab());
    PIPIT_TCHECK(gr.vocab->rank() == grid.coords().pipeline * 2 + grid.coords().tensor);
  });
}

TEST_CASE("a vocabulary group that is not the pipeline x tensor ranks is refused on every rank",
          "[runtime][vocab][tensor]") {
  const auto cfg = base_config();
  const ps::plan plan = ps::make_vocab_plan("1f1b", {2, 3, 1}, ps::vocab_passes::one_barrier);
  SECTION("a group whose size is not a multiple of the pipeline's") {
    threads::run(4, [&](threads& world) {
      const int r = world.rank();
      threads pipe = world.split(r / 2, r % 2);
      threads vocab = world.split(r < 3 ? 0 : 1, r);  // 3 ranks and 1 rank over pipelines of 2
      token_mlp_stage<double> stage(cfg, plan, pipe.rank());
      grid_rank_layers l(cfg, vocab.size(), vocab.rank());
      const auto err = construct({&pipe, nullptr, &vocab}, stage, *l.layers, plan);
      PIPIT_TCHECK(err != nullptr);
      PIPIT_TCHECK_THROWS_WITH(std::rethrow_exception(err),
                               Catch::Contains("not a multiple of the pipeline's 2") &&
                                   Catch::Contains("vocabulary group cannot start"));
    });
  }
  SECTION("a group ordered tensor * p + pipeline") {
    threads::run(4, [&](threads& world) {
      pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout({2, 1, 2}));
      const auto c = grid.coords();
      threads vocab = world.split(0, c.tensor * 2 + c.pipeline);
      token_mlp_stage<double> stage(cfg, plan, c.pipeline);
      grid_rank_layers l(cfg, 4, vocab.rank());
      const auto err = construct({&grid.pipeline(), nullptr, &vocab}, stage, *l.layers, plan);
      PIPIT_TCHECK(err != nullptr);
      // Vocabulary ranks 1 and 2 sit at the wrong pipeline rank, so both pipelines refuse; every
      // rank raises the same message, vocabulary rank 0's (its pipeline's verdict).
      PIPIT_TCHECK_THROWS_WITH(std::rethrow_exception(err),
                               Catch::Contains("ranks 0, 1, 2, 3 of 4 refused") &&
                                   Catch::Contains("vocabulary group rank 1 would be pipeline "
                                                   "rank 0") &&
                                   Catch::Contains("order the group pipeline * t + tensor"));
    });
  }
  SECTION("layers sharded over the pipeline ranks only") {
    threads::run(4, [&](threads& world) {
      pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout({2, 1, 2}));
      token_mlp_stage<double> stage(cfg, plan, grid.coords().pipeline);
      grid_rank_layers l(cfg, 2, grid.coords().pipeline);
      const auto err = construct(grid.groups(), stage, *l.layers, plan);
      PIPIT_TCHECK(err != nullptr);
      PIPIT_TCHECK_THROWS_WITH(std::rethrow_exception(err),
                               Catch::Contains("of 2 shards; the vocabulary group rank is"));
    });
  }
  SECTION("tensor replicas that run different plans") {
    threads::run(4, [&](threads& world) {
      pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout({2, 1, 2}));
      // Each pipeline agrees with itself; only the vocabulary group sees the difference.
      const ps::plan mine = ps::make_vocab_plan("1f1b", {2, 3 + grid.coords().tensor, 1},
                                                ps::vocab_passes::one_barrier);
      token_mlp_stage<double> stage(cfg, mine, grid.coords().pipeline);
      grid_rank_layers l(cfg, 4, grid.vocab().rank());
      const auto err = construct(grid.groups(), stage, *l.layers, mine);
      PIPIT_TCHECK(err != nullptr);
      PIPIT_TCHECK_THROWS_WITH(std::rethrow_exception(err),
                               Catch::Contains("the tensor replicas run different plans"));
    });
  }
}

namespace {

// The runtime tests' MLP stage without gradients(): a stage that cannot join a data-parallel
// reduction.
class mlp_stage_without_gradients : private pipit::testing::mlp_stage<double> {
  using base = pipit::testing::mlp_stage<double>;

 public:
  using value_type = double;
  using base::activation_size;
  using base::backward_input;
  using base::backward_weight;
  using base::base;
  using base::forward;
  using base::input_size;
  using base::load_input;
  using base::output_size;
};

pipit::testing::mlp_config small_mlp() {
  pipit::testing::mlp_config c;
  c.widths = {5, 8, 7, 6, 9, 5};
  c.batch = 3;
  return c;
}

}  // namespace

TEST_CASE("executor(grid.groups(), stage, plan) runs like executor(pipeline, data, stage, plan)",
          "[runtime][tensor][data_parallel]") {
  const auto cfg = small_mlp();
  const ps::plan plan = ps::make_plan_by_name("1f1b", {2, 4});
  // 2 data x 2 pipeline ranks: the weights after 2 steps, bit for bit, both ways.
  std::vector<std::vector<pipit::testing::mlp_stage<double>::mat>> by_groups(4), by_comms(4);
  for (const bool groups : {true, false})
    threads::run(4, [&](threads& world) {
      pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout({1, 2, 2}));
      const auto c = grid.coords();
      pipit::testing::mlp_stage<double> st(cfg, plan, c.pipeline, c.data);
      const auto train = [&](auto& ex) {
        for (int step = 0; step < 2; ++step) {
          ex.run();
          st.sgd(0.1);
        }
      };
      if (groups) {
        rt::executor ex(grid.groups(), st, plan);
        train(ex);
      } else {
        rt::executor ex(grid.pipeline(), grid.data(), st, plan);
        train(ex);
      }
      auto& out = (groups ? by_groups : by_comms)[static_cast<std::size_t>(world.rank())];
      for (int l = 0; l < cfg.layers(); ++l)
        if (st.holds(l)) out.push_back(st.weight(l));
    });
  for (std::size_t r = 0; r < 4; ++r) {
    REQUIRE(by_groups[r].size() == by_comms[r].size());
    CHECK(!by_groups[r].empty());
    for (std::size_t l = 0; l < by_groups[r].size(); ++l) CHECK(by_groups[r][l] == by_comms[r][l]);
  }
  // The replicas trained on different inputs and averaged: the same weights on both replicas
  // (world ranks 2 d + p: rank 0 and 1 hold stage 0).
  for (std::size_t l = 0; l < by_groups[0].size(); ++l) CHECK(by_groups[0][l] == by_groups[1][l]);
}

TEST_CASE("a stage without gradients runs on a grid with one data replica, and only there",
          "[runtime][tensor][data_parallel]") {
  const auto cfg = small_mlp();
  const ps::plan plan = ps::make_plan_by_name("1f1b", {2, 3});
  threads::run(2, [&](threads& world) {
    pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout({1, 1, 2}));
    mlp_stage_without_gradients st(cfg, plan, grid.coords().pipeline);
    rt::executor ex(grid.groups(), st, plan);  // the one-rank data group is skipped
    ex.run();
    PIPIT_TCHECK(ex.step() == 1u);
  });
  threads::run(4, [&](threads& world) {
    pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout({1, 2, 2}));
    mlp_stage_without_gradients st(cfg, plan, grid.coords().pipeline);
    std::exception_ptr err;
    try {
      rt::executor ex(grid.groups(), st, plan);
    } catch (...) {
      err = std::current_exception();
    }
    PIPIT_TCHECK(err != nullptr);
    PIPIT_TCHECK_THROWS_WITH(std::rethrow_exception(err),
                             Catch::Contains("the data-parallel group has 2 ranks but the stage "
                                             "provides no `gradients()`"));
  });
}

// ---- refusals that must reach every rank of every replica --------------------------------------

TEST_CASE("a data group's refusal reaches every rank of every replica and every tensor rank",
          "[runtime][vocab][tensor][data_parallel]") {
  // A (tensor 2, data 2, pipeline 2) grid; replica 1's stage 1, tensor rank 0, has one gradient
  // buffer fewer. Only that data group sees it; the agreement over each replica's vocabulary
  // group then refuses the other 6 ranks too (else they would wait in run()).
  const auto cfg = base_config();
  const ps::plan plan = ps::make_vocab_plan("1f1b", {2, 3, 1}, ps::vocab_passes::one_barrier);
  threads::run(
      8,
      [&](threads& world) {
        pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout({2, 2, 2}));
        const auto c = grid.coords();
        fewer_gradients_stage stage(cfg, plan, c.pipeline);
        stage.fewer = c.data == 1 && c.pipeline == 1 && c.tensor == 0;
        grid_rank_layers l(cfg, grid.vocab().size(), grid.vocab().rank());
        const auto err = construct(grid.groups(), stage, *l.layers, plan);
        PIPIT_TCHECK(err != nullptr);
        if (err == nullptr) return;
        PIPIT_TCHECK_THROWS_WITH(std::rethrow_exception(err),
                                 Catch::Contains("the data-parallel replicas differ from replica "
                                                 "0") &&
                                     Catch::Contains("rank 1: other gradient buffers"));
        if (c.pipeline != 1 || c.tensor != 0)
          PIPIT_TCHECK_THROWS_WITH(std::rethrow_exception(err),
                                   Catch::Contains("rank 2 of this replica's 4 ranks was refused"));
      },
      {.timeout = std::chrono::milliseconds(20000)});
}

TEST_CASE("a strided shard gradient is refused on every rank when it must be reduced",
          "[runtime][vocab][data_parallel]") {
  const auto cfg = base_config();
  const ps::plan plan = ps::make_vocab_plan("1f1b", {2, 3, 1}, ps::vocab_passes::one_barrier);
  // Without a data-parallel group a strided gradient is fine (nothing reduces it as one span).
  threads::run(2, [&](threads& world) {
    pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout({1, 1, 2}));
    token_mlp_stage<double> stage(cfg, plan, grid.coords().pipeline);
    grid_rank_layers l(cfg, 2, grid.vocab().rank(), 3);
    rt::executor ex(grid.groups(), stage, *l.layers, plan);
    PIPIT_TCHECK(ex.step() == 0u);
  });
  // With one: 2 replicas x 2 pipeline ranks, replica 1's stage 1 holds strided gradients.
  threads::run(4,
               [&](threads& world) {
                 pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout({1, 2, 2}));
                 const auto c = grid.coords();
                 token_mlp_stage<double> stage(cfg, plan, c.pipeline);
                 const bool strided = c.data == 1 && c.pipeline == 1;
                 grid_rank_layers l(cfg, 2, grid.vocab().rank(), strided ? 3 : 0);
                 const auto err = construct(grid.groups(), stage, *l.layers, plan);
                 PIPIT_TCHECK(err != nullptr);
                 if (err == nullptr) return;
                 if (c.data == 1)
                   PIPIT_TCHECK_THROWS_WITH(
                       std::rethrow_exception(err),
                       Catch::Contains("the embedding gradient must be contiguous to "
                                       "be reduced over a data-parallel group"));
                 else
                   PIPIT_TCHECK_THROWS_WITH(
                       std::rethrow_exception(err),
                       Catch::Contains("the pipeline of data-parallel rank 1 could not start"));
               },
               {.timeout = std::chrono::milliseconds(20000)});
}

TEST_CASE("a data group whose members hold different vocabulary shards is refused",
          "[runtime][vocab][tensor][data_parallel]") {
  // A hand-built data group of the two tensor ranks of one stage (t = 2, d = 1): same plan,
  // pipeline rank and gradient sizes, but shards 2 p and 2 p + 1; averaging them would be wrong.
  const auto cfg = base_config();
  const ps::plan plan = ps::make_vocab_plan("1f1b", {2, 3, 1}, ps::vocab_passes::one_barrier);
  threads::run(
      4,
      [&](threads& world) {
        pipit::tp::process_grid<threads> grid(world, pipit::tp::grid_layout({2, 1, 2}));
        const auto c = grid.coords();
        threads same_stage = world.split(c.pipeline, c.tensor);
        token_mlp_stage<double> stage(cfg, plan, c.pipeline);
        grid_rank_layers l(cfg, 4, grid.vocab().rank());
        const auto err =
            construct({&grid.pipeline(), &same_stage, &grid.vocab()}, stage, *l.layers, plan);
        PIPIT_TCHECK(err != nullptr);
        if (err == nullptr) return;
        PIPIT_TCHECK_THROWS_WITH(
            std::rethrow_exception(err),
            Catch::Contains("the data-parallel replicas differ") &&
                Catch::Contains("rank 1: vocabulary shard " + std::to_string(2 * c.pipeline + 1) +
                                " (replica 0: " + std::to_string(2 * c.pipeline) + ")"));
      },
      {.timeout = std::chrono::milliseconds(20000)});
}
