// pipit-gpt: trains a GPT (examples/gpt) through pipit's pipeline executor on CPU ranks.
//
//   pipit-gpt --ranks 4 --schedule zb-h1 --microbatches 8 --steps 200
//   pipit-gpt --partition vocab-parallel --vocab one-barrier --trace step.json --svg step.svg
//   pipit-gpt --compare --vocab-size 65536 ...     # naive vs vocabulary parallel, measured
//   mpirun -np 4 pipit-gpt --schedule 1f1b        # one process per rank (pipit built with MPI)
//   pipit-gpt --tensor 2 --data-parallel 2 --ranks 2   # 3D: 8 ranks, tensor x data x pipeline
//
// Data: the embedded synthetic language (a Zipf-distributed Markov chain whose entropy rate is
// the loss floor) or a binary token file (--data FILE --token-bytes 2|4). At the end: the loss
// against the entropy bound, each rank's busy and idle time and memory, and optionally the
// measured step as an SVG and a Chrome trace. --compare trains the same model with the naive
// partition and with vocabulary parallelism and prints measured tokens/s, speedup and memory next
// to the simulator's prediction.
#include <CLI/CLI.hpp>

#include <unistd.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "calibration.hpp"
#include "pipit/comm/threads.hpp"
#include "pipit/render/chrome_trace.hpp"
#include "pipit/render/svg.hpp"
#include "pipit/schedule/by_name.hpp"
#include "train.hpp"
#ifdef PIPIT_GPT_WITH_MPI
#include <mpi.h>

#include "pipit/comm/mpi_communicator.hpp"
#endif

namespace {

constexpr double mib = 1024.0 * 1024.0;

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
  bool quiet = false;
  void operator()(const gpt::step_report& r) const {
    if (quiet) return;
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

double tail_mean(const std::vector<double>& losses) {
  const std::size_t n = losses.size(), tail = std::max<std::size_t>(1, n / 10);
  double mean = 0;
  for (std::size_t i = n - tail; i < n; ++i) mean += losses[i];
  return mean / static_cast<double>(tail);
}

void rank_table(const gpt::train_summary& s) {
  // On a 3D grid each rank's (tensor, data, pipeline) coordinates follow its number.
  const bool grid = s.grid.size() > s.grid.pipeline;
  std::printf("%-*s  %-26s %8s %8s %8s %6s %9s %9s %9s %9s %10s\n", grid ? 13 : 4,
              grid ? "rank (t,d,p)" : "rank", "holds", "busy s", "exch s", "idle s", "idle",
              "param MiB", "adam MiB", "stash MiB", "peak MiB", "sent KiB");
  for (std::size_t r = 0; r < s.ranks.size(); ++r) {
    const auto& k = s.ranks[r];
    const double idle = std::max(0.0, k.wall_seconds - k.busy_seconds - k.comm_seconds);
    char who[48];
    if (grid)
      std::snprintf(who, sizeof who, "%-3zu (%d,%d,%d)", r, k.tensor, k.data, k.pipeline);
    else
      std::snprintf(who, sizeof who, "%zu", r);
    std::printf("%-*s  %-26s %8.3f %8.3f %8.3f %5.1f%% %9.2f %9.2f %9.2f %9.2f %10.1f\n",
                grid ? 13 : 4, who, k.holds.c_str(), k.busy_seconds, k.comm_seconds, idle,
                k.wall_seconds > 0 ? 100.0 * idle / k.wall_seconds : 0.0, k.parameter_bytes / mib,
                k.optimizer_bytes / mib, k.stash_bytes / mib, k.peak_bytes() / mib,
                k.sent_bytes_per_step / 1024.0);
  }
  std::printf(
      "(busy: inside compute passes, the vocabulary passes' and the tensor group's collectives "
      "included; exch: the "
      "pipeline's sends and receives, waiting for the peer included; idle: the rest of the wall "
      "time (bubbles, the optimizer, "
      "waiting); peak: parameters and gradients + Adam + the executor's stash + the output "
      "layer's workspace; sent: the activations and gradients this rank sends to other pipeline "
      "stages per step)\n");
}

void report(const gpt::train_summary& s, const gpt::data_source& data) {
  const double mean = tail_mean(s.losses);
  std::printf("\nloss %.4f nats/token (mean of the last %zu steps; first step %.4f)\n", mean,
              std::max<std::size_t>(1, s.losses.size() / 10), s.losses.front());
  if (const auto h = data.entropy_bound())
    std::printf("entropy bound %.4f nats/token: %.4f above it (%.1f%%)\n", *h, mean - *h,
                100.0 * (mean - *h) / *h);
  else
    std::printf("entropy bound: unknown for a token file\n");
  std::printf(
      "%.3f s, %.0f tokens/s (%lld tokens per step; %.0f tokens/s after the first step)\n\n",
      s.seconds, s.tokens_per_second(), s.tokens_per_step, s.steady_tokens_per_second());
  rank_table(s);
}

// "out.svg" + "vocab" -> "out.vocab.svg".
std::string with_label(const std::string& path, const std::string& label) {
  const std::size_t slash = path.find_last_of('/'), dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash))
    return path + "." + label;
  return path.substr(0, dot) + "." + label + path.substr(dot);
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  if (!f) pipit::fail("pipit-gpt: cannot write '", path, "'");
}

// The measured step as SVG and Chrome trace (times in seconds from the step's start).
void write_timeline(const gpt::train_summary& s, const std::string& svg, const std::string& trace,
                    const std::string& what) {
  if (!svg.empty()) {
    pipit::render::svg_options so;
    so.px_per_unit = 1200.0 / std::max(s.timeline.makespan, 1e-9);
    so.title = "measured step " + std::to_string(s.traced_step) + ": " + what + " (seconds)";
    write_file(svg, pipit::render::svg_timeline(s.timeline, s.plan, so));
    std::printf("wrote %s (the measured step, drawn as pipit-plan draws a simulated one)\n",
                svg.c_str());
  }
  if (!trace.empty()) {
    write_file(trace, pipit::render::chrome_trace(s.timeline, s.plan, 1e6));
    std::printf("wrote %s (Chrome trace of the measured step: Perfetto or chrome://tracing)\n",
                trace.c_str());
  }
}

bool under_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"})
    if (std::getenv(v) != nullptr) return true;
  return false;
}

// One configuration of --compare, and what was measured and predicted for it.
struct config_row {
  std::string label, schedule, partition;
  gpt::train_options options;
  std::vector<double> measured;  // steady tokens/s, one per repeat
  gpt::train_summary last;
  gpt::step_prediction predicted;
  double median() const {
    std::vector<double> v = measured;
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[v.size() / 2];
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"pipit-gpt: train a GPT through a pipit pipeline on CPU ranks"};
  gpt::train_options o;
  o.model = {.vocab = 256, .seq = 32, .hidden = 64, .heads = 4, .layers = 4, .batch = 4};
  o.adam.lr = 3e-3;
  int ranks = 2, tensor = 1, replicas = 1, successors = 8, token_bytes = 2, log_every = 0,
      repeats = 1;
  double zipf = 1.0;
  bool compare = false, predict = false;
  std::string data_path = "synthetic", backend = "auto", svg_path, trace_path;
  std::vector<std::string> also;
  std::vector<std::string> schedules(std::begin(pipit::schedule::all_policy_names),
                                     std::end(pipit::schedule::all_policy_names));
  std::vector<std::string> algorithms(std::begin(gpt::vocab_algorithm_names),
                                      std::end(gpt::vocab_algorithm_names));
  app.add_option("--ranks,-p", ranks,
                 "pipeline ranks (threads; under mpirun: the processes / (tensor x data-parallel))")
      ->check(CLI::PositiveNumber);
  app.add_option("--tensor,-t", tensor, "tensor-parallel ranks per pipeline stage (Megatron)")
      ->check(CLI::PositiveNumber);
  app.add_option("--data-parallel,-d", replicas,
                 "data-parallel replicas (each runs --microbatches microbatches per step)")
      ->check(CLI::PositiveNumber);
  app.add_option("--schedule", o.schedule, "pipeline schedule")->check(CLI::IsMember(schedules));
  app.add_option("--microbatches,-m", o.microbatches, "microbatches per step")
      ->check(CLI::PositiveNumber);
  app.add_option("--chunks,-v", o.chunks,
                 "model chunks per rank (default: 2 for interleaved and V schedules, else 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--partition", o.partition,
                 "naive | balanced | vocab-parallel | layout:<stages>, e.g. 'layout:E t*3 | t L'");
  app.add_option("--vocab", o.vocab,
                 "output-layer algorithm under vocab-parallel: one-barrier, two-barrier, naive")
      ->check(CLI::IsMember(algorithms));
  app.add_flag("--rematerialize", o.rematerialize, "recompute forwards before the backward");
  bool no_scatter_gather = false;
  app.add_flag("--no-scatter-gather", no_scatter_gather,
               "with --tensor > 1: send whole activations between stages (default: each tensor "
               "rank sends its 1/t slice, the next stage all-gathers them; Megatron-LM)");
  app.add_option("--layers", o.model.layers, "transformer blocks");
  app.add_option("--hidden", o.model.hidden, "hidden size d");
  app.add_option("--heads", o.model.heads, "attention heads");
  app.add_option("--seq", o.model.seq, "tokens per sequence");
  app.add_option("--batch", o.model.batch, "sequences per microbatch");
  app.add_option("--vocab-size", o.model.vocab, "vocabulary size V");
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
  app.add_option("--svg", svg_path, "write the measured step's timeline as SVG");
  app.add_option("--trace", trace_path, "write the measured step as a Chrome trace (JSON)");
  app.add_option("--trace-step", o.trace_step, "the step to record (default: the last)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--predict", predict, "also print the simulator's prediction (a profiling run)");
  app.add_flag("--compare", compare,
               "train with the naive partition and with vocab-parallel and compare them");
  app.add_option("--also", also, "--compare: more schedules to run (comma-separated)")
      ->delimiter(',')
      ->check(CLI::IsMember(schedules));
  app.add_option("--repeats", repeats, "--compare: runs of each configuration, interleaved")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  bool mpi = backend == "mpi" || (backend == "auto" && under_mpirun());
#ifndef PIPIT_GPT_WITH_MPI
  if (mpi && backend == "mpi") {
    std::fprintf(stderr, "pipit-gpt: built without MPI (configure pipit with MPI found)\n");
    return 1;
  }
  mpi = false;
#endif
  int world = 0, world_size = tensor * replicas * ranks;
  const bool ranks_given = app.count("--ranks") > 0;
#ifdef PIPIT_GPT_WITH_MPI
  if (mpi) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  }
#endif
  const bool root = world == 0;
  int rc = 0;
  try {
    if (mpi) {  // the pipeline gets what tensor x data-parallel leave; an explicit --ranks must fit
      if (ranks_given && tensor * replicas * ranks != world_size)
        pipit::fail("mpirun started ", world_size, " processes but the grid tensor ", tensor,
                    " x data ", replicas, " x pipeline ", ranks, " needs ",
                    tensor * replicas * ranks);
      if (world_size % (tensor * replicas) != 0)
        pipit::fail("mpirun started ", world_size, " processes, not a multiple of tensor ", tensor,
                    " x data ", replicas, " = ", tensor * replicas);
      ranks = world_size / (tensor * replicas);
    }
    o.tensor = tensor;
    o.data = replicas;
    o.pipeline = ranks;
    o.scatter_gather = !no_scatter_gather;
    const bool grid3d = tensor * replicas > 1;
    if (grid3d && (predict || compare))
      pipit::fail(
          "--predict and --compare model the pipeline alone; run them with --tensor 1 "
          "--data-parallel 1 (got tensor ",
          tensor, ", data ", replicas, ")");
    gpt::check(o.model);
    gpt::grid_of(o, world_size);  // refuses a grid the model does not split over
    const gpt::data_source data =
        data_path == "synthetic"
            ? gpt::data_source(
                  gpt::synthetic_language(o.model.vocab, successors, zipf, o.data_seed))
            : gpt::data_source(gpt::token_file(data_path, token_bytes, o.model.vocab, o.data_seed));
    // A terminal gets one line that redraws itself, unless --log-every asks for lines.
    const bool tty = isatty(fileno(stdout)) != 0 && log_every == 0;
    const progress show{tty, log_every > 0 ? log_every : std::max(1, o.steps / 20), !root};
    // Trains `opt` on every rank; every rank returns its summary.
    const auto train = [&](const gpt::train_options& opt, const progress& p) {
      gpt::train_summary summary;
#ifdef PIPIT_GPT_WITH_MPI
      if (mpi) {
        pipit::comm::mpi::run(MPI_COMM_WORLD, [&](pipit::comm::mpi& comm) {
          summary = gpt::train<float>(comm, opt, data, p);
        });
        return summary;
      }
#endif
      pipit::comm::threads::run(world_size, [&](pipit::comm::threads& comm) {
        auto s = gpt::train<float>(comm, opt, data, p);
        if (comm.rank() == 0) summary = std::move(s);
      });
      return summary;
    };
    if (root) {
      const gpt::model_config& c = o.model;
      std::printf(
          "pipit-gpt: %d layers, d=%d, %d heads, S=%d, V=%d; %d x %d tokens per microbatch\n",
          c.layers, c.hidden, c.heads, c.seq, c.vocab, c.batch, c.seq);
      std::printf("data: %s\n", data.describe().c_str());
      if (grid3d)
        std::printf(
            "grid: tensor %d x data %d x pipeline %d = %d ranks (%s); %d microbatches per "
            "replica, %d per step%s\n",
            tensor, replicas, ranks, world_size, mpi ? "mpi" : "threads", o.microbatches,
            o.microbatches * replicas,
            tensor > 1 && ranks > 1 ? (o.scatter_gather ? "; scatter/gather between stages"
                                                        : "; whole activations between stages")
                                    : "");
      std::fflush(stdout);
    }

    if (!compare) {
      const pipit::schedule::plan plan = gpt::plan_of(o, ranks);  // refuses bad combinations
      if (root) {
        std::printf("pipeline: %s on %d ranks (%s), %d microbatches, partition %s: %s%s\n",
                    o.schedule.c_str(), ranks, mpi ? "mpi" : "threads", o.microbatches,
                    o.partition.c_str(),
                    pipit::partition::to_layout(gpt::partition_of(o, ranks)).c_str(),
                    plan.vocab != pipit::schedule::vocab_passes::none
                        ? (std::string(", E and L sharded over the ") +
                           (tensor > 1 ? "pipeline x tensor ranks, " : "ranks, ") + o.vocab)
                              .c_str()
                        : "");
        std::fflush(stdout);
      }
      std::optional<gpt::step_prediction> pred;
      if (predict && root)
        pred = gpt::predict_step(o, ranks, gpt::calibrate<float>(o.model, ranks, o.vocab));
      const gpt::train_summary s = train(o, show);
      if (root) {
        report(s, data);
        if (pred)
          std::printf(
              "\npredicted %.3f s per step (%.0f tokens/s), measured %.3f s (%.0f "
              "tokens/s after the first step)\n",
              pred->step_seconds, pred->tokens_per_second,
              static_cast<double>(s.tokens_per_step) / s.steady_tokens_per_second(),
              s.steady_tokens_per_second());
        write_timeline(s, svg_path, trace_path, o.schedule + ", " + o.partition);
      }
    } else {
      // The configurations: the naive partition and vocabulary parallelism on --schedule, then
      // on each --also schedule (vocabulary parallelism where the schedule has a variant).
      std::vector<config_row> rows;
      std::vector<std::string> names{o.schedule};
      for (const auto& a : also)
        if (std::find(names.begin(), names.end(), a) == names.end()) names.push_back(a);
      for (const auto& name : names)
        for (const char* part : {"naive", "vocab-parallel"}) {
          if (std::string(part) == "vocab-parallel" &&
              !pipit::schedule::supports_vocab_passes(name))
            continue;
          config_row r;
          r.schedule = name;
          r.partition = part;
          r.options = o;
          r.options.schedule = name;
          r.options.partition = part;
          r.options.chunks = name == o.schedule ? o.chunks : 0;
          r.label = name + "." + (std::string(part) == "naive" ? "naive" : o.vocab);
          gpt::plan_of(r.options, ranks);  // refuses bad combinations before any training
          rows.push_back(std::move(r));
        }
      // The prediction first, from a profiling run on this thread.
      if (root) {
        std::printf(
            "calibrating the simulator: timing one block, the output layer, the %s "
            "vocabulary passes and Adam on one thread...\n",
            o.vocab.c_str());
        std::fflush(stdout);
      }
      const gpt::calibration cal = gpt::calibrate<float>(o.model, ranks, o.vocab);
      if (root)
        std::printf(
            "  per microbatch: block F %.2f ms B %.2f ms W %.2f ms; output layer F %.2f "
            "ms B %.2f ms W %.2f ms; shard S %.2f ms T %.2f ms\n",
            1e3 * cal.block.f, 1e3 * cal.block.b, 1e3 * cal.block.w, 1e3 * cal.head.f,
            1e3 * cal.head.b, 1e3 * cal.head.w, 1e3 * cal.vocab_s, 1e3 * cal.vocab_t);
      for (auto& r : rows) r.predicted = gpt::predict_step(r.options, ranks, cal);
      for (int rep = 0; rep < repeats; ++rep)
        for (auto& r : rows) {
          if (root) {
            std::printf(
                "\n== %s, %s%s on %d ranks, %d steps%s\n", r.schedule.c_str(), r.partition.c_str(),
                r.partition == "naive" ? "" : (" (" + o.vocab + ")").c_str(), ranks, o.steps,
                repeats > 1
                    ? (" (run " + std::to_string(rep + 1) + " of " + std::to_string(repeats) + ")")
                          .c_str()
                    : "");
            std::fflush(stdout);
          }
          r.last = train(r.options, show);
          r.measured.push_back(r.last.steady_tokens_per_second());
        }
      if (root) {
        const double base = rows.front().median(),
                     base_pred = rows.front().predicted.tokens_per_second;
        std::printf("\n%-26s %-30s %10s %8s %10s %8s %8s  %s\n", "configuration", "layout",
                    "tokens/s", "speedup", "predicted", "speedup", "loss", "peak MiB per rank");
        for (const auto& r : rows) {
          std::string peaks;
          for (const auto& k : r.last.ranks) {
            char b[32];
            std::snprintf(b, sizeof b, "%s%.1f", peaks.empty() ? "" : " / ", k.peak_bytes() / mib);
            peaks += b;
          }
          std::printf("%-26s %-30s %10.0f %7.2fx %10.0f %7.2fx %8.4f  %s\n", r.label.c_str(),
                      r.last.layout.c_str(), r.median(), r.median() / base,
                      r.predicted.tokens_per_second, r.predicted.tokens_per_second / base_pred,
                      r.last.losses.back(), peaks.c_str());
        }
        if (repeats > 1) {
          std::printf("\nspread over %d runs (tokens/s, min .. max):", repeats);
          for (const auto& r : rows) {
            const auto [lo, hi] = std::minmax_element(r.measured.begin(), r.measured.end());
            std::printf("  %s %.0f .. %.0f;", r.label.c_str(), *lo, *hi);
          }
          std::printf("\n");
        }
        std::printf(
            "(tokens/s: measured after each run's first step%s; predicted: the simulator on the "
            "plan with the profiled pass times, docs/results.md; loss: the last step's, the "
            "same model and data in every row)\n",
            repeats > 1 ? ", the median of the runs" : "");
        std::printf("\nper rank, %s:\n", rows.front().label.c_str());
        rank_table(rows.front().last);
        const auto vp = std::find_if(rows.begin(), rows.end(), [](const config_row& r) {
          return r.partition == "vocab-parallel";
        });
        if (vp != rows.end()) {
          std::printf("\nper rank, %s:\n", vp->label.c_str());
          rank_table(vp->last);
        }
        for (const auto& r : rows)
          write_timeline(r.last, svg_path.empty() ? "" : with_label(svg_path, r.label),
                         trace_path.empty() ? "" : with_label(trace_path, r.label),
                         r.schedule + ", " + r.partition);
        if (vp != rows.end()) std::printf("\nspeedup: %.2fx\n", vp->median() / base);
      }
    }
  } catch (const std::exception& e) {
    if (root) std::fprintf(stderr, "pipit-gpt: %s\n", e.what());
    rc = 1;
  }
#ifdef PIPIT_GPT_WITH_MPI
  if (mpi) MPI_Finalize();
#endif
  return rc;
}
