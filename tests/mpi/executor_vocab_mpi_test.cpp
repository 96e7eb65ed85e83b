// The executor with vocabulary-parallel layers on 4 MPI processes: the embedding and the output
// layer sharded over the 4 ranks train like one process holding the whole vocabulary (double
// precision, 1e-12 relative), with 1F1B, interleaved 1F1B and V-Half and the three algorithms;
// and so do shards over a tensor 2 x pipeline 2 process grid (tp::process_grid::groups()).
#include <catch2/catch.hpp>

#include <mpi.h>

#include <chrono>
#include <functional>
#include <span>
#include <string_view>

#include "pipit/comm/mpi_communicator.hpp"
#include "pipit/runtime/executor.hpp"
#include "pipit/runtime/vocab_layers.hpp"
#include "pipit/schedule/vocab_passes.hpp"
#include "pipit/tp/process_grid.hpp"
#include "support/mpi_world.hpp"
#include "support/vocab_model.hpp"

namespace {

namespace ps = pipit::schedule;
namespace rt = pipit::runtime;
namespace v = pipit::vocab;
using pipit::comm::mpi;

// Every rank's largest error, reduced to the largest over the ranks.
template <class Alg>
double train_on_world(std::string_view schedule, const ps::shape& s) {
  pipit::testing::token_model_config cfg;
  const auto ref = pipit::testing::reference_run(cfg, s.microbatches, 2);
  const ps::plan plan = ps::make_vocab_plan(schedule, s, rt::vocab_passes_of<Alg>);
  double worst = 0;
  pipit::comm::mpi_options o;
  o.timeout = std::chrono::milliseconds(30000);  // 4 ranks share 2 cores
  mpi::run(
      MPI_COMM_WORLD,
      [&](mpi& world) {
        REQUIRE(world.size() == s.stages);
        double mine = pipit::testing::train_vocab_rank<Alg>(world, plan, cfg, ref);
        world.all_reduce(std::span<double>(&mine, 1), pipit::comm::max_op{});
        worst = mine;
      },
      o);
  return worst;
}

// The same on a tensor 2 x pipeline 2 grid over the 4 processes: 4 shards, ordered
// pipeline * 2 + tensor, each tensor rank running its pipeline rank's whole stage.
template <class Alg>
double train_on_grid(std::string_view schedule, const ps::shape& s) {
  pipit::testing::token_model_config cfg;
  const auto ref = pipit::testing::reference_run_data_parallel(cfg, s.microbatches, 2, 1);
  const ps::plan plan = ps::make_vocab_plan(schedule, s, rt::vocab_passes_of<Alg>);
  double worst = 0;
  pipit::comm::mpi_options o;
  o.timeout = std::chrono::milliseconds(30000);
  mpi::run(
      MPI_COMM_WORLD,
      [&](mpi& world) {
        pipit::tp::process_grid<mpi> grid(
            world, pipit::tp::grid_layout({.tensor = 2, .data = 1, .pipeline = s.stages}));
        double mine = pipit::testing::train_grid_rank<Alg>(grid, plan, cfg, ref);
        world.all_reduce(std::span<double>(&mine, 1), pipit::comm::max_op{});
        worst = mine;
      },
      o);
  return worst;
}

}  // namespace

TEST_CASE("vocabulary-parallel training on 4 MPI ranks equals one process", "[mpi][vocab]") {
  REQUIRE(pipit::testing::world_size() == 4);
  CHECK(train_on_world<v::one_barrier>("1f1b", {4, 6, 1}) <= 1e-12);
  CHECK(train_on_world<v::two_barrier>("interleaved", {4, 8, 2}) <= 1e-12);
  CHECK(train_on_world<v::naive>("v-half", {4, 5, 2}) <= 1e-12);
  CHECK(train_on_world<v::one_barrier>("v-half", {4, 8, 2}) <= 1e-12);
}

TEST_CASE("vocabulary shards over tensor 2 x pipeline 2 MPI ranks equal one process",
          "[mpi][vocab][tensor]") {
  REQUIRE(pipit::testing::world_size() == 4);
  CHECK(train_on_grid<v::one_barrier>("1f1b", {2, 4, 1}) <= 1e-12);
  CHECK(train_on_grid<v::two_barrier>("v-half", {2, 4, 2}) <= 1e-12);
  CHECK(train_on_grid<v::naive>("1f1b", {2, 3, 1}) <= 1e-12);
}
