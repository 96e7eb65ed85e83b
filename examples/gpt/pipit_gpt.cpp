// pipit-gpt: trains a GPT (examples/gpt) through pipit's pipeline executor on CPU ranks.
//
//   pipit-gpt --ranks 4 --schedule zb-h1 --microbatches 8 --steps 200
//   mpirun -np 4 pipit-gpt --schedule 1f1b        # one process per rank (pipit built with MPI)
//
// Data: the embedded synthetic language (a Zipf-distributed Markov chain whose entropy rate is
// the loss floor) or a binary token file (--data FILE --token-bytes 2|4). At the end: the loss
// against the entropy bound and each rank's busy and idle time and memory.
#include <CLI/CLI.hpp>

#include <unistd.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

#include "pipit/comm/threads.hpp"
#include "pipit/schedule/by_name.hpp"
#include "train.hpp"
#ifdef PIPIT_GPT_WITH_MPI
#include <mpi.h>

#include "pipit/comm/mpi_communicator.hpp"
#endif

namespace {

std::string clock_text(double seconds) {
  const long s = std::lround(std::max(0.0, seconds));
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  return buf;
}

// One progress line: a bar, the step, the loss, tokens/s and the ETA. On a terminal it redraws
// itself; otherwise it prints every `every` steps and at the last.
struct progress {
  bool tty = false;
  int every = 1;
  void operator()(const gpt::step_report& r) const {
    if (!tty && r.step % every != 0 && r.step != r.steps && r.step != 1) return;
    constexpr int width = 24;
    const int filled = r.step * width / r.steps;
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(width, '.');
    std::printf("%s[%s] step %d/%d  loss %.4f  %.0f tokens/s  ETA %s%s", tty ? "\r" : "",
                bar.c_str(), r.step, r.steps, r.loss, r.tokens_per_second,
                clock_text(r.eta_seconds).c_str(), tty ? (r.step == r.steps ? "\n" : "") : "\n");
    std::fflush(stdout);
  }
};

void report(const gpt::train_summary& s, const gpt::data_source& data) {
  const std::size_t n = s.losses.size(), tail = std::max<std::size_t>(1, n / 10);
  double mean = 0;
  for (std::size_t i = n - tail; i < n; ++i) mean += s.losses[i];
  mean /= static_cast<double>(tail);
  std::printf("\nloss %.4f nats/token (mean of the last %zu steps; first step %.4f)\n", mean, tail,
              s.losses.front());
  if (const auto h = data.entropy_bound())
    std::printf("entropy bound %.4f nats/token: %.4f above it (%.1f%%)\n", *h, mean - *h,
                100.0 * (mean - *h) / *h);
  else
    std::printf("entropy bound: unknown for a token file\n");
  std::printf("%.3f s, %.0f tokens/s (%lld tokens per step)\n\n", s.seconds, s.tokens_per_second(),
              s.tokens_per_step);
  std::printf("%-4s  %-22s %9s %9s %6s %10s %10s %10s %10s\n", "rank", "holds", "busy s", "idle s",
              "idle", "params MiB", "adam MiB", "stash MiB", "peak MiB");
  constexpr double mib = 1024.0 * 1024.0;
  for (std::size_t r = 0; r < s.ranks.size(); ++r) {
    const auto& k = s.ranks[r];
    const double idle = std::max(0.0, k.wall_seconds - k.busy_seconds);
    std::printf("%-4zu  %-22s %9.3f %9.3f %5.1f%% %10.2f %10.2f %10.2f %10.2f\n", r,
                k.holds.c_str(), k.busy_seconds, idle,
                k.wall_seconds > 0 ? 100.0 * idle / k.wall_seconds : 0.0, k.parameter_bytes / mib,
                k.optimizer_bytes / mib, k.stash_bytes / mib, k.peak_bytes() / mib);
  }
  std::printf(
      "(busy: inside the stage's passes; idle: waiting for messages and the pipeline's bubbles; "
      "peak: parameters and gradients + Adam + the executor's stash + the output layer's "
      "workspace)\n");
}

bool under_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"})
    if (std::getenv(v) != nullptr) return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"pipit-gpt: train a GPT through a pipit pipeline on CPU ranks"};
  gpt::train_options o;
  o.model = {.vocab = 256, .seq = 32, .hidden = 64, .heads = 4, .layers = 4, .batch = 4};
  o.adam.lr = 3e-3;
  int ranks = 2, successors = 8, token_bytes = 2, log_every = 0;
  double zipf = 1.0;
  std::string data_path = "synthetic", backend = "auto";
  std::vector<std::string> schedules(std::begin(pipit::schedule::all_policy_names),
                                     std::end(pipit::schedule::all_policy_names));
  app.add_option("--ranks,-p", ranks, "pipeline ranks (threads; under mpirun: the processes)")
      ->check(CLI::PositiveNumber);
  app.add_option("--schedule", o.schedule, "pipeline schedule")->check(CLI::IsMember(schedules));
  app.add_option("--microbatches,-m", o.microbatches, "microbatches per step")
      ->check(CLI::PositiveNumber);
  app.add_option("--chunks,-v", o.chunks,
                 "model chunks per rank (default: 2 for interleaved and V schedules, else 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--partition", o.partition,
                 "naive | balanced | layout:<stages>, e.g. 'layout:E t*3 | t L'");
  app.add_flag("--rematerialize", o.rematerialize, "recompute forwards before the backward");
  app.add_option("--layers", o.model.layers, "transformer blocks");
  app.add_option("--hidden", o.model.hidden, "hidden size d");
  app.add_option("--heads", o.model.heads, "attention heads");
  app.add_option("--seq", o.model.seq, "tokens per sequence");
  app.add_option("--batch", o.model.batch, "sequences per microbatch");
  app.add_option("--vocab", o.model.vocab, "vocabulary size V");
  app.add_option("--steps", o.steps, "training steps")->check(CLI::PositiveNumber);
  app.add_option("--lr", o.adam.lr, "Adam learning rate");
  app.add_option("--weight-decay", o.adam.weight_decay, "decoupled weight decay");
  app.add_option("--seed", o.model.seed, "initialisation seed");
  app.add_option("--data-seed", o.data_seed, "seed of the synthetic language and the batches");
  app.add_option("--data", data_path, "'synthetic' or a binary token file");
  app.add_option("--token-bytes", token_bytes, "token file: 2 (uint16) or 4 (uint32)");
  app.add_option("--successors", successors, "synthetic language: successors per token");
  app.add_option("--zipf", zipf, "synthetic language: Zipf exponent of the successors");
  app.add_option("--backend", backend, "auto (mpi under mpirun, else threads), threads, mpi")
      ->check(CLI::IsMember({"auto", "threads", "mpi"}));
  app.add_option("--log-every", log_every, "print the progress every N steps (0: about 20 lines)");
  CLI11_PARSE(app, argc, argv);

  bool mpi = backend == "mpi" || (backend == "auto" && under_mpirun());
#ifndef PIPIT_GPT_WITH_MPI
  if (mpi && backend == "mpi") {
    std::fprintf(stderr, "pipit-gpt: built without MPI (configure pipit with MPI found)\n");
    return 1;
  }
  mpi = false;
#endif
  try {
    gpt::check(o.model);
    const gpt::data_source data =
        data_path == "synthetic"
            ? gpt::data_source(
                  gpt::synthetic_language(o.model.vocab, successors, zipf, o.data_seed))
            : gpt::data_source(gpt::token_file(data_path, token_bytes, o.model.vocab, o.data_seed));
    // A terminal gets one line that redraws itself, unless --log-every asks for lines.
    const bool tty = isatty(fileno(stdout)) != 0 && log_every == 0;
    const progress show{tty, log_every > 0 ? log_every : std::max(1, o.steps / 20)};
    const auto header = [&](int n) {
      const gpt::model_config& c = o.model;
      std::printf(
          "pipit-gpt: %d layers, d=%d, %d heads, S=%d, V=%d; %d x %d tokens per microbatch\n",
          c.layers, c.hidden, c.heads, c.seq, c.vocab, c.batch, c.seq);
      std::printf("data: %s\n", data.describe().c_str());
      std::printf("pipeline: %s on %d ranks (%s), %d microbatches, partition %s: %s\n",
                  o.schedule.c_str(), n, mpi ? "mpi" : "threads", o.microbatches,
                  o.partition.c_str(),
                  pipit::partition::to_layout(gpt::partition_of(o, n)).c_str());
      std::fflush(stdout);
    };
    if (!mpi) {
      header(ranks);
      gpt::train_summary summary;
      pipit::comm::threads::run(ranks, [&](pipit::comm::threads& comm) {
        auto s = gpt::train<float>(comm, o, data, show);
        if (comm.rank() == 0) summary = std::move(s);
      });
      report(summary, data);
      return 0;
    }
#ifdef PIPIT_GPT_WITH_MPI
    MPI_Init(&argc, &argv);
    int world = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &world);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int rc = 0;
    try {
      if (world == 0) header(size);
      pipit::comm::mpi::run(MPI_COMM_WORLD, [&](pipit::comm::mpi& comm) {
        const auto s = gpt::train<float>(comm, o, data, show);
        if (comm.rank() == 0) report(s, data);
      });
    } catch (const std::exception& e) {
      if (world == 0) std::fprintf(stderr, "pipit-gpt: %s\n", e.what());
      rc = 1;
    }
    MPI_Finalize();
    return rc;
#endif
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pipit-gpt: %s\n", e.what());
    return 1;
  }
  return 0;
}
