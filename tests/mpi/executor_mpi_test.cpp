// The pipeline executor on comm::mpi under mpirun with 4 ranks: every schedule trains the test
// MLP (tests/support/runtime_model.hpp) to the loss and parameters of single-process training.
// Every process computes the single-process reference itself and checks the layers its stage
// holds (and, on the last stage's rank, the loss of every step).
#include <catch2/catch.hpp>

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "pipit/comm/mpi_communicator.hpp"
#include "pipit/runtime/executor.hpp"
#include "pipit/schedule/by_name.hpp"
#include "support/mpi_world.hpp"
#include "support/runtime_model.hpp"

namespace {

namespace ps = pipit::schedule;
namespace rt = pipit::runtime;
using pipit::comm::mpi;
using pipit::testing::mlp_config;
using pipit::testing::mlp_reference;
using pipit::testing::mlp_stage;

constexpr int steps = 3;

using pipit::testing::world_size;

pipit::comm::mpi_options quick() {
  pipit::comm::mpi_options o;
  o.timeout = std::chrono::milliseconds(30000);  // 4 ranks share 2 cores
  return o;
}

mlp_config model() {
  mlp_config c;
  c.widths = {5, 8, 7, 9, 6, 8, 7, 6, 9, 5, 7, 8, 4};
  c.batch = 3;
  c.keep = 0.8;
  return c;
}

// Trains the plan on `replicas` x plan.rank_count() = 4 ranks; returns the largest relative
// difference to the reference over this rank's layers (and its losses, on the last stage).
template <class T>
double train_and_compare(const ps::plan& plan, int replicas, bool remat, T lr) {
  const mlp_config cfg = model();
  const mlp_reference<T> ref(cfg, plan.shp.microbatches, replicas, steps, lr);
  const int p = plan.rank_count();
  double worst = 0;
  mpi::run(
      MPI_COMM_WORLD,
      [&](mpi& world) {
        REQUIRE(world.size() == p * replicas);
        const int replica = world.rank() / p, pr = world.rank() % p;
        mpi pipe = world.split(replica, pr);
        mpi data = world.split(pr, replica);
        mlp_stage<T> st(cfg, plan, pr, replica);
        const bool last = pr == plan.rank_of(plan.shp.virtual_stages() - 1);
        std::vector<double> losses;
        const auto body = [&](auto& ex) {
          for (int s = 0; s < steps; ++s) {
            st.loss_sum = 0;
            ex.run();
            losses.push_back(st.loss_sum);
            st.sgd(lr);
          }
        };
        if (replicas > 1) {
          rt::executor ex(pipe, data, st, plan, {.rematerialize = remat});
          body(ex);
        } else {
          rt::executor ex(pipe, st, plan, {.rematerialize = remat});
          body(ex);
        }
        if (last) {
          // The mean over replicas of each replica's loss.
          std::vector<double> mean = losses;
          data.all_reduce(std::span<double>(mean), std::plus<>{});
          for (int s = 0; s < steps; ++s)
            worst = std::max(worst, std::abs(mean[static_cast<std::size_t>(s)] / replicas -
                                             ref.losses[static_cast<std::size_t>(s)]) /
                                        std::abs(ref.losses[static_cast<std::size_t>(s)]));
        }
        for (int l = 0; l < cfg.layers(); ++l)
          if (st.holds(l)) {
            const auto lu = static_cast<std::size_t>(l);
            worst = std::max(worst,
                             static_cast<double>((st.weight(l) - ref.w[lu]).cwiseAbs().maxCoeff() /
                                                 ref.w[lu].cwiseAbs().maxCoeff()));
            worst =
                std::max(worst, static_cast<double>((st.bias(l) - ref.b[lu]).cwiseAbs().maxCoeff() /
                                                    ref.b[lu].cwiseAbs().maxCoeff()));
          }
      },
      quick());
  return worst;
}

ps::shape shape_for(std::string_view name, int p) {
  if (name == "interleaved") return {p, 6, 2};
  if (ps::placement_of(name) == ps::placement::v_shape) return {p, name == "dualpipe-v" ? 8 : 5, 2};
  return {p, 5, 1};
}

}  // namespace

TEST_CASE("every schedule on 4 MPI ranks trains like a single process", "[mpi][runtime]") {
  REQUIRE(world_size() == 4);
  for (const auto name : ps::all_policy_names)
    for (const bool remat : {false, true}) {
      INFO(name << (remat ? " with" : " without") << " re-materialization");
      const ps::plan plan = ps::make_plan_by_name(name, shape_for(name, 4));
      CHECK(train_and_compare<double>(plan, 1, remat, 0.1) <= 1e-12);
    }
}

TEST_CASE("2 data-parallel x 2 pipeline MPI ranks train like a single process", "[mpi][runtime]") {
  for (const auto name : {"1f1b", "interleaved", "zb-h2", "zb-v", "dualpipe-v"})
    for (const bool remat : {false, true}) {
      INFO(name << (remat ? " with" : " without") << " re-materialization");
      const ps::plan plan = ps::make_plan_by_name(name, shape_for(name, 2));
      CHECK(train_and_compare<double>(plan, 2, remat, 0.1) <= 1e-12);
    }
}

TEST_CASE("float on 4 MPI ranks matches the float reference to 1e-5", "[mpi][runtime]") {
  for (const auto name : {"1f1b", "zb-h1", "v-half"}) {
    INFO(name);
    const ps::plan plan = ps::make_plan_by_name(name, shape_for(name, 4));
    CHECK(train_and_compare<float>(plan, 1, true, 0.1f) <= 1e-5);
  }
}

TEST_CASE("ranks with different plans are refused at start on every MPI rank", "[mpi][runtime]") {
  const mlp_config cfg = model();
  std::string what;
  try {
    mpi::run(
        MPI_COMM_WORLD,
        [&](mpi& c) {
          const ps::plan plan = ps::make_plan_by_name("1f1b", {4, c.rank() == 2 ? 6 : 8});
          mlp_stage<double> st(cfg, plan, c.rank());
          rt::executor ex(c, st, plan);
          ex.run();
        },
        quick());
  } catch (const pipit::error& e) {
    what = e.what();
  }
  CHECK_THAT(what, Catch::Contains("the ranks run different plans") &&
                       Catch::Contains("rank 2 runs {stages=4, microbatches=6, chunks=1}"));
}
