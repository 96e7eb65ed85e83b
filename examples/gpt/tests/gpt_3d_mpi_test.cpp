// 3D training of the GPT example under mpirun -np 8: tensor 2 x data 2 x pipeline 2 on comm::mpi
// against single-process training with d * m microbatches. Every process computes the
// single-process reference itself (comm::threads with one rank) and checks the losses of every
// step and each of its own parameter shards against the matching elements of the whole tensors
// (tensor_group.hpp: whole_index); the replicated parameters must be bit-identical on the ranks
// of each tensor group and the whole shard set on the ranks of each data group. Scatter/gather
// between the stages is on (the default): each rank sends only its tensor rank's slice.
#include <catch2/catch.hpp>

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "pipit/comm/mpi_communicator.hpp"
#include "pipit/comm/threads.hpp"
#include "pipit/tp/grid_layout.hpp"
#include "pipit/tp/ring_collective.hpp"
#include "support/mpi_world.hpp"
#include "tensor_group.hpp"
#include "train.hpp"

namespace {

using pipit::comm::mpi;

struct reference {
  std::vector<double> losses;
  std::map<std::uint64_t, std::vector<double>> trained;
};

reference single_process(const gpt::train_options& o, const gpt::data_source& data) {
  reference r;
  pipit::comm::threads::run(1, [&](pipit::comm::threads& comm) {
    const auto s = gpt::train<double>(
        comm, o, data, [](const gpt::step_report&) {},
        [&](std::span<const gpt::parameter<double>> ps) {
          for (const auto& p : ps) r.trained[p.key].assign(p.value.begin(), p.value.end());
        });
    r.losses = s.losses;
  });
  return r;
}

// FNV-1a over the bytes of some doubles: equal for bit-identical sequences.
std::uint64_t fingerprint(std::uint64_t h, std::span<const double> v) {
  const auto* b = reinterpret_cast<const unsigned char*>(v.data());
  for (std::size_t k = 0; k < v.size_bytes(); ++k) h = (h ^ b[k]) * 1099511628211ull;
  return h;
}

TEST_CASE("3D training over MPI (tensor 2 x data 2 x pipeline 2) equals single-process training",
          "[gpt]") {
  REQUIRE(pipit::testing::world_size() == 8);
  gpt::model_config c;
  c.vocab = 48;
  c.seq = 8;
  c.hidden = 16;
  c.heads = 2;
  c.layers = 4;
  c.batch = 2;
  c.seed = 3;
  c.init_std = 0.1;
  const gpt::data_source data(gpt::synthetic_language(c.vocab, 4, 1.0, 11));
  gpt::train_options o;
  o.model = c;
  o.microbatches = 4;  // d * m
  o.steps = 3;
  o.adam.lr = 1e-2;
  const reference ref = single_process(o, data);
  REQUIRE(ref.losses.back() < ref.losses.front());
  const pipit::tp::grid_layout layout({.tensor = 2, .data = 2, .pipeline = 2});

  for (const char* partition : {"naive", "vocab-parallel"})
    for (const char* schedule : {"1f1b", "zb-h1"}) {
      if (std::string(partition) == "vocab-parallel" && std::string(schedule) == "zb-h1")
        continue;  // zb-h1 has no vocabulary-parallel variant
      gpt::train_options p = o;
      p.schedule = schedule;
      p.partition = partition;
      p.tensor = 2;
      p.data = 2;
      p.pipeline = 2;
      p.microbatches = 2;  // per replica
      REQUIRE(p.scatter_gather);
      std::vector<double> losses;
      double sent = -1;
      double worst = 0;
      int tensors = 0;
      std::uint64_t replicated = 14695981039346656037ull, all = replicated;
      pipit::comm::mpi_options mo;
      mo.timeout = std::chrono::milliseconds(60000);  // 8 processes share 2 cores
      mpi::run(
          MPI_COMM_WORLD,
          [&](mpi& comm) {
            const auto s = gpt::train<double>(
                comm, p, data, [](const gpt::step_report&) {},
                [&](std::span<const gpt::parameter<double>> ps) {
                  for (const auto& q : ps) {
                    const std::vector<double>& whole = ref.trained.at(q.key);
                    double scale = 0, diff = 0;
                    for (const double v : whole) scale = std::max(scale, std::abs(v));
                    for (std::size_t k = 0; k < q.value.size(); ++k)
                      diff =
                          std::max(diff, std::abs(q.value[k] - whole.at(gpt::whole_index(q, k))));
                    worst = std::max(worst, diff / std::max(scale, 1e-300));
                    ++tensors;
                    const std::span<const double> v(q.value);
                    all = fingerprint(all, v);
                    // Replicated over the tensor group: everything not split, except the
                    // vocabulary-parallel shards of E and L (one per pipeline x tensor rank).
                    const bool vocab_shard =
                        std::string(partition) == "vocab-parallel" &&
                        (q.key == gpt::tensor_key(-1, gpt::tensor_id::token_embedding) ||
                         q.key == gpt::tensor_key(-1, gpt::tensor_id::head_w));
                    if (q.split == gpt::tensor_split::replicated && !vocab_shard)
                      replicated = fingerprint(replicated, v);
                  }
                });
            losses = s.losses;
            sent = s.ranks.at(static_cast<std::size_t>(comm.rank())).sent_bytes_per_step;
          },
          mo);
      INFO(schedule << ", " << partition << ", world rank " << pipit::testing::world_rank());
      REQUIRE(losses.size() == ref.losses.size());
      for (std::size_t s = 0; s < ref.losses.size(); ++s)
        CHECK(std::abs(losses[s] - ref.losses[s]) <= 1e-10 * ref.losses[s]);
      CHECK(tensors > 0);
      CHECK(worst <= 1e-10);
      // Pipeline 2, one chunk each: stage 0 sends m activations, stage 1 m gradients, each the
      // tensor rank's half of the n = hidden x tokens elements.
      const pipit::tp::grid_coords me_at = layout.coords_of(pipit::testing::world_rank());
      const auto n = static_cast<std::int64_t>(c.hidden) * c.tokens();
      CHECK(sent == p.microbatches *
                        static_cast<double>(pipit::tp::row_block(n, 2, me_at.tensor).size()) *
                        sizeof(double));
      // Bit-identical replicas: every rank's fingerprints to every rank.
      std::uint64_t mine[2] = {replicated, all};
      std::vector<std::uint64_t> every(16);
      MPI_Allgather(mine, 2, MPI_UINT64_T, every.data(), 2, MPI_UINT64_T, MPI_COMM_WORLD);
      const int me = pipit::testing::world_rank();
      const pipit::tp::grid_coords at = layout.coords_of(me);
      pipit::tp::grid_coords t0 = at, d0 = at;
      t0.tensor = 0;
      d0.data = 0;
      CHECK(every[2 * static_cast<std::size_t>(layout.rank_of(t0))] == replicated);
      CHECK(every[2 * static_cast<std::size_t>(layout.rank_of(d0)) + 1] == all);
    }
}

}  // namespace
