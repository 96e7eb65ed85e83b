#pragma once
// cuda::device_executor<Stage, Vocab>: the pipeline executor's CUDA mode. It runs one rank's
// share of a plan like runtime::executor (the same compiled program, the same buffer lifetimes
// and slots: runtime/program.hpp) with every buffer in device memory, the stage's passes enqueued
// on a compute stream and each step's sends, receives and collectives on the NCCL communicator's
// stream, ordered by events instead of host waits:
//   - before an exchange or a collective, the communication stream waits for the compute
//     stream's work so far (sends read what earlier passes wrote; receives overwrite slots
//     earlier passes read);
//   - a pass waits only for the latest communication point (an exchange, or the collective an
//     IF or T pass leaves in flight) that sent, received or reduced one of the buffers it reads
//     or writes (in-order streams cover the earlier ones), so compute that does not need a
//     message runs while the message is in flight;
//   - run() enqueues the whole step and returns without a host synchronisation; its last act
//     makes the compute stream wait for the communication stream(s), so that what the caller
//     enqueues next on compute (the optimizer, the next step) sees the finished step.
//     synchronize() waits for both streams (NCCL errors and timeouts surface there).
//
//   cudaStream_t compute;  cudaStreamCreate(&compute);
//   my_device_stage stage(compute, ...);             // enqueues its kernels on `compute`
//   pipit::cuda::device_executor ex(host_comm, nccl_comm, stage, plan, compute);
//   for (...) { ex.run(); optimizer_step_on(compute); }
//   ex.synchronize();  // before any host read of device results (NCCL errors surface here)
//
// Vocabulary plans (S, T, IF, IB; schedule::make_vocab_plan): pass a cuda::vocab_layers
// (vocab_layers.cuh), device_executor ex(host, nccl, stage, vocab, plan, compute). Its passes
// enqueue their local work on `compute` and their collectives on the pipeline communicator's
// stream; IF's reduce and T's input-gradient reduce are communication points of the analysis
// above, so F(0, k) and B(last, k) wait for exactly them, and T waits for S's statistics merge
// (an event inside the layers): the transformer passes in between overlap those collectives, as
// in the paper (Yeung et al., arXiv 2411.05288). The same start-up checks as runtime::executor
// (the plan's algorithm is the layers', one shard per pipeline rank, the first stage's input and
// the last stage's output are tokens x hidden, every rank's layers agree) run inside the
// start-up agreement, so a mismatch is a pipit::error on every rank. The overlap is bounded by
// the in-order communication stream: S and IB passes wait for all of it (see vocab_layers.cuh).
//
// Data parallelism: device_executor ex(host, pipeline, data_parallel, stage, [vocab,] plan,
// compute) with a data-parallel nccl_communicator (the same pipeline rank of every replica;
// make it with nccl_communicator::split). After the step's last pass, every span of
// stage.gradients() (device memory, float or double) and the vocabulary shards' gradients are
// summed over it with all_reduce_async on its stream and, by default
// (executor_options::data_parallel), divided by its size on that stream; compute then waits for
// it with an event. No host wait. The replicas agree at start (runtime::agree_data_parallel over
// the data-parallel communicator: plan, pipeline rank, element size, gradient sizes).
//
// The stage models runtime::stage with device spans: input, output, saved, output_grad and
// input_grad point into a device arena (cudaMallocAsync on the compute stream), and every pass
// must enqueue its work on the compute stream the stage was given, never wait on the host for
// it, and not read or write the spans from the host. load_input fills the first stage's input
// the same way (plans without vocabulary passes).
//
// Construction is collective over `host`, a host communicator (comm::threads or comm::mpi) with
// the same ranks as the NCCL pipeline communicator: the start-up agreement of
// runtime/handshake.hpp runs over it (NCCL spans must be device memory), so a bad plan or shape
// on one rank is a pipit::error on every rank. The arena, the vocabulary layers' states and the
// events are allocated before that agreement, so an allocation failure on one rank is too.

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/device_buffer.cuh"
#include "pipit/cuda/launch.cuh"
#include "pipit/cuda/nccl_communicator.cuh"
#include "pipit/cuda/vocab_layers.cuh"
#include "pipit/runtime/executor_options.hpp"
#include "pipit/runtime/handshake.hpp"
#include "pipit/runtime/pass_info.hpp"
#include "pipit/runtime/program.hpp"
#include "pipit/runtime/stage.hpp"
#include "pipit/runtime/stage_pass.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/validate.hpp"

namespace pipit::cuda {

namespace detail_device_executor {

// The instructions that leave communication in flight on the communication stream: an exchange
// (its sends and receives), IF (the reduce of the embedding output to the first stage's rank)
// and T (naive, two_barrier: the reduce of the input gradient to the last stage's rank).
inline bool is_communication_point(const runtime::instruction& in) noexcept {
  return in.kind == runtime::instruction_kind::exchange ||
         in.kind == runtime::instruction_kind::embed_forward ||
         in.kind == runtime::instruction_kind::vocab_t;
}

// For every instruction of the program: the latest communication point (index among the
// points, in program order) that sent, received or reduced any buffer the instruction reads or
// writes, or -1. Reading a received buffer must wait for its receive; writing a slot must wait
// for the send that still reads the slot's previous value (slots are reused). Found by
// replaying the program: each point marks the arena ranges it touches. A point's own compute
// (IF's gather, T's GEMMs) is analysed before its range is marked.
inline std::vector<int> exchange_dependencies(const runtime::program& p) {
  struct range {
    std::size_t begin, end;
    int point;
  };
  std::vector<range> touched;  // ranges in flight, newest last
  const auto last_touch = [&](const runtime::buffer_ref& r) {
    if (r.size == 0) return -1;
    for (auto it = touched.rbegin(); it != touched.rend(); ++it)
      if (it->begin < r.offset + r.size && r.offset < it->end) return it->point;
    return -1;
  };
  const auto mark = [&](const runtime::buffer_ref& r, int point) {
    if (r.size == 0) return;
    // A newer operation on the same range supersedes the older one (in-order stream).
    std::erase_if(touched,
                  [&](const range& w) { return w.begin < r.offset + r.size && r.offset < w.end; });
    touched.push_back({r.offset, r.offset + r.size, point});
  };
  std::vector<int> out(p.code.size(), -1);
  int points = 0;
  for (std::size_t i = 0; i < p.code.size(); ++i) {
    const runtime::instruction& in = p.code[i];
    if (in.kind == runtime::instruction_kind::exchange) {
      for (std::uint32_t t = 0; t < in.transfer_count; ++t)
        mark(p.transfers[in.first_transfer + t].buffer, points);
      ++points;
      continue;
    }
    out[i] = std::max({last_touch(in.input), last_touch(in.output), last_touch(in.saved),
                       last_touch(in.output_grad), last_touch(in.input_grad)});
    if (in.kind == runtime::instruction_kind::embed_forward) mark(in.output, points++);
    if (in.kind == runtime::instruction_kind::vocab_t) mark(in.output_grad, points++);
  }
  return out;
}

// What the start-up checks need to know of the vocabulary layers.
struct vocab_facts {
  schedule::vocab_passes passes = schedule::vocab_passes::none;
  int shard_ranks = 0;
  int rank = 0;
  std::size_t embedding_size = 0;
};

// The local start-up checks of a plan against the stage's chunk sizes and the vocabulary layers
// (none: the executor has none), as runtime::executor makes them; pipit::error naming the
// mismatch. `lowered` is `plan` lowered; loads_input: the stage has load_input().
inline void check_vocab_plan(const schedule::plan& plan, const schedule::plan& lowered, int rank,
                             int ranks, const std::optional<vocab_facts>& vocab,
                             std::span<const runtime::chunk_sizes> sizes, bool loads_input) {
  if (vocab) {
    if (plan.vocab == schedule::vocab_passes::none)
      fail("the executor has vocabulary layers but plan '", plan.schedule,
           "' has no vocabulary passes (make it with schedule::make_vocab_plan)");
    if (plan.vocab != vocab->passes)
      fail("plan '", plan.schedule, "' has ", schedule::name(plan.vocab),
           " vocabulary passes but the vocabulary layers run ", schedule::name(vocab->passes));
    if (vocab->shard_ranks != ranks || vocab->rank != rank)
      fail("the vocabulary layers are rank ", vocab->rank, " of ", vocab->shard_ranks,
           " shards; the pipeline rank is ", rank, " of ", ranks);
  } else if (plan.vocab != schedule::vocab_passes::none) {
    fail("plan '", plan.schedule, "' has ", schedule::name(plan.vocab),
         " vocabulary passes: give the device executor cuda::vocab_layers to run them");
  }
  if (static_cast<int>(sizes.size()) != lowered.shp.chunks)
    fail("sizes for ", sizes.size(), " chunks, the plan has ", lowered.shp.chunks);
  const int last_stage = lowered.shp.virtual_stages() - 1;
  for (int c = 0; c < lowered.shp.chunks; ++c) {
    const runtime::chunk_sizes& z = sizes[static_cast<std::size_t>(c)];
    const int s = schedule::stage_of(lowered.place, lowered.shp, rank, c);
    if (vocab) {
      if (s == 0 && z.input != vocab->embedding_size)
        fail("the first virtual stage has input_size ", z.input,
             " but the vocabulary layers' embedding output has ", vocab->embedding_size,
             " elements (tokens x hidden)");
      if (s == last_stage && z.output != vocab->embedding_size)
        fail("the last virtual stage has output_size ", z.output,
             " but the vocabulary layers' output layer takes ", vocab->embedding_size,
             " elements (tokens x hidden)");
    } else if (!loads_input && s == 0 && z.input != 0) {
      fail("the first virtual stage has input_size ", z.input,
           " but the stage has no load_input() to fill it");
    }
  }
}

// runtime::agree_data_parallel over an NCCL communicator: its all_gather takes host spans here
// and stages them through device memory (a blocking collective, at start-up only).
class nccl_host_gather {
 public:
  explicit nccl_host_gather(nccl_communicator& c) : c_(&c) {}
  int rank() const noexcept { return c_->rank(); }
  int size() const noexcept { return c_->size(); }
  void all_gather(std::span<const double> mine, std::span<double> out) {
    device_buffer<double> d(mine.size() + out.size(), c_->stream());
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(d.data(), mine.data(), mine.size_bytes(),
                                     cudaMemcpyHostToDevice, c_->stream()));
    c_->all_gather(std::span<const double>(d.data(), mine.size()),
                   std::span<double>(d.data() + mine.size(), out.size()));
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(out.data(), d.data() + mine.size(), out.size_bytes(),
                                     cudaMemcpyDeviceToHost, c_->stream()));
    c_->synchronize();
  }

 private:
  nccl_communicator* c_;
};

// x[i] *= s (the data-parallel average).
template <class G>
__global__ void scale_elements(G* x, std::size_t n, double s) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    x[i] = static_cast<G>(static_cast<double>(x[i]) * s);
}

// The constructors' vocabulary parameter, spelled without the class (so that class template
// argument deduction does not instantiate device_executor<nccl_communicator> on its way).
struct no_vocab {};
template <class Vocab>
using vocab_or_none = std::conditional_t<std::is_void_v<Vocab>, no_vocab, Vocab>;

template <class S, class T>
std::vector<std::span<T>> stage_gradients(S& stage) {
  std::vector<std::span<T>> out;
  if constexpr (runtime::stage_has_gradients<S>)
    for (auto&& g : stage.gradients()) out.push_back(std::span<T>(g));
  return out;
}

}  // namespace detail_device_executor

// Vocab: void (no vocabulary layers) or a cuda::vocab_layers.
template <class Stage, class Vocab = void>
class device_executor {
  static_assert(runtime::check_stage<Stage>());
  static constexpr bool has_vocab = !std::is_void_v<Vocab>;
  static_assert(!has_vocab || is_vocab_layers<std::remove_cv_t<Vocab>>::value,
                "pipit::cuda::device_executor: the vocabulary layers must be a "
                "cuda::vocab_layers<Algorithm, T, Chunk>");
  using vocab_ref = detail_device_executor::vocab_or_none<Vocab>;

 public:
  using value_type = typename Stage::value_type;
  using T = value_type;

  // Collective over `host` and `pipeline` (the same ranks). `compute`: the stream the stage
  // enqueues on; the arena is allocated on it.
  template <comm::communicator Host>
  device_executor(Host& host, nccl_communicator& pipeline, Stage& stage, const schedule::plan& plan,
                  cudaStream_t compute,
                  runtime::executor_options options = {}) requires(std::is_void_v<Vocab>)
      : comm_(&pipeline),
        stage_(&stage),
        compute_(compute),
        options_(options),
        step_(options.first_step) {
    prepare(host, plan);
  }

  // ... with a data-parallel group: the stage's gradients are reduced over it after each step.
  template <comm::communicator Host>
  device_executor(Host& host, nccl_communicator& pipeline, nccl_communicator& data_parallel,
                  Stage& stage, const schedule::plan& plan, cudaStream_t compute,
                  runtime::executor_options options = {}) requires(std::is_void_v<Vocab>)
      : comm_(&pipeline),
        dp_(&data_parallel),
        stage_(&stage),
        compute_(compute),
        options_(options),
        step_(options.first_step) {
    check_data_parallel_stage();
    prepare(host, plan);
  }

  // A vocabulary plan run with `vocab` (its passes on the same compute stream).
  template <comm::communicator Host>
  device_executor(Host& host, nccl_communicator& pipeline, Stage& stage,
                  detail_device_executor::vocab_or_none<Vocab>& vocab, const schedule::plan& plan,
                  cudaStream_t compute,
                  runtime::executor_options options = {}) requires(!std::is_void_v<Vocab>)
      : comm_(&pipeline),
        stage_(&stage),
        vocab_(&vocab),
        compute_(compute),
        options_(options),
        step_(options.first_step) {
    check_vocab_type();
    prepare(host, plan);
  }

  // ... and data parallelism: the vocabulary shards' gradients are reduced with the stage's.
  template <comm::communicator Host>
  device_executor(Host& host, nccl_communicator& pipeline, nccl_communicator& data_parallel,
                  Stage& stage, detail_device_executor::vocab_or_none<Vocab>& vocab,
                  const schedule::plan& plan, cudaStream_t compute,
                  runtime::executor_options options = {}) requires(!std::is_void_v<Vocab>)
      : comm_(&pipeline),
        dp_(&data_parallel),
        stage_(&stage),
        vocab_(&vocab),
        compute_(compute),
        options_(options),
        step_(options.first_step) {
    check_vocab_type();
    check_data_parallel_stage();
    prepare(host, plan);
  }

  device_executor(const device_executor&) = delete;
  device_executor& operator=(const device_executor&) = delete;
  ~device_executor() {
    // The arena is freed in compute-stream order: let that order include the messages still in
    // flight (errors are ignored here: synchronize() is where they are reported).
    if (compute_done_ && comm_) {
      (void)cudaEventRecord(compute_done_, comm_->stream());
      (void)cudaStreamWaitEvent(compute_, compute_done_, 0);
      if (dp_) {
        (void)cudaEventRecord(compute_done_, dp_->stream());
        (void)cudaStreamWaitEvent(compute_, compute_done_, 0);
      }
    }
    destroy_events();
  }

  // Enqueues one training step on the compute and communication streams; no host wait.
  void run() {
    const std::uint64_t step = step_++;
    T* const base = arena_.data();
    const auto buf = [base](const runtime::buffer_ref& r) {
      return std::span<T>(base + r.offset, r.size);
    };
    const auto cbuf = [base](const runtime::buffer_ref& r) {
      return std::span<const T>(base + r.offset, r.size);
    };
    Stage& st = *stage_;
    if constexpr (has_vocab) vocab_->begin_step();
    int point = 0, waited = -1;
    const auto communicated = [&] {  // the end of a communication point, on the comm stream
      PIPIT_CUDA_CHECK(cudaEventRecord(points_[static_cast<std::size_t>(point)], comm_->stream()));
      ++point;
    };
    for (std::size_t i = 0; i < program_.code.size(); ++i) {
      const runtime::instruction& in = program_.code[i];
      if (in.kind == runtime::instruction_kind::exchange) {
        PIPIT_CUDA_CHECK(cudaEventRecord(compute_done_, compute_));
        PIPIT_CUDA_CHECK(cudaStreamWaitEvent(comm_->stream(), compute_done_, 0));
        comm_->exchange_async(
            std::span<comm::p2p_op>(ops_.data() + in.first_transfer, in.transfer_count));
        communicated();
        continue;
      }
      if (const int need = needs_[i]; need > waited) {
        PIPIT_CUDA_CHECK(cudaStreamWaitEvent(compute_, points_[static_cast<std::size_t>(need)], 0));
        waited = need;
      }
      runtime::pass_info info;
      info.chunk = in.chunk;
      info.stage = in.stage;
      info.microbatch = in.microbatch;
      info.step = step;
      info.seed = runtime::pass_seed(options_.seed, step, in.stage, in.microbatch);
      info.first = in.first;
      info.last = in.last;
      switch (in.kind) {
        case runtime::instruction_kind::embed_forward:
          if constexpr (has_vocab)
            vocab_->embed_forward(*comm_, std::as_const(info), buf(in.output));
          communicated();
          break;
        case runtime::instruction_kind::vocab_s:
          if constexpr (has_vocab)
            vocab_->output_statistics(*comm_, std::as_const(info), in.slot, cbuf(in.input),
                                      buf(in.output_grad));
          break;
        case runtime::instruction_kind::vocab_t:
          if constexpr (has_vocab)
            vocab_->output_gradient(*comm_, std::as_const(info), in.slot, buf(in.output_grad));
          communicated();
          break;
        case runtime::instruction_kind::embed_backward:
          if constexpr (has_vocab)
            vocab_->embed_backward(*comm_, std::as_const(info), buf(in.input_grad));
          break;
        default:
          runtime::run_stage_pass(st, in, std::as_const(info), base, !has_vocab);
          break;
      }
    }
    if constexpr (has_vocab) vocab_->end_step();
    // The step's last messages and collectives may be in flight: later compute (the optimizer,
    // the next step) must not overwrite what they read or use what they write before they are
    // done.
    comm_->signal(compute_);
    if (dp_ != nullptr) reduce_gradients();
  }

  // Waits for everything enqueued on the streams; raises pipit::error for a CUDA or NCCL
  // failure (the communicator's timeout applies).
  void synchronize() {
    comm_->wait_for(compute_);
    comm_->synchronize();
    if (dp_ != nullptr) {
      dp_->wait_for(compute_);
      dp_->synchronize();
    }
  }

  std::uint64_t step() const noexcept { return step_; }
  const runtime::program& compiled() const noexcept { return program_; }
  std::size_t stash_bytes() const noexcept { return arena_.bytes(); }
  // For each instruction, the communication point it waits for (-1: none): what lets compute
  // overlap messages and collectives it does not need.
  const std::vector<int>& exchange_dependencies() const noexcept { return needs_; }

 private:
  static constexpr void check_vocab_type() {
    if constexpr (has_vocab)
      static_assert(std::is_same_v<typename Vocab::value_type, T>,
                    "pipit::cuda::device_executor: the vocabulary layers' value_type must be the "
                    "stage's");
  }
  static constexpr void check_data_parallel_stage() {
    static_assert(runtime::stage_has_gradients<Stage>,
                  "pipit::cuda::device_executor: with a data-parallel group the stage must "
                  "provide `gradients()`, a range of std::span<value_type> (device memory)");
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "pipit::cuda::device_executor: the data-parallel reduction sums float or double "
                  "gradients (NCCL's own sum)");
  }

  template <class G>
  void reduce_one(std::span<G> g) {
    if (g.empty()) return;
    dp_->all_reduce_async(g, std::plus<>{});
    const int n = dp_->size();
    if (options_.data_parallel == runtime::gradient_reduction::average && n > 1) {
      detail_device_executor::scale_elements<G>
          <<<stride_blocks<256>(static_cast<std::int64_t>(g.size())), 256, 0, dp_->stream()>>>(
              g.data(), g.size(), 1.0 / n);
      PIPIT_CUDA_CHECK(cudaGetLastError());
    }
  }

  // After the step's last pass: the gradients are written on compute; reduced (and averaged) on
  // the data-parallel stream; compute waits for them.
  void reduce_gradients() {
    dp_->wait_for(compute_);
    if constexpr (runtime::stage_has_gradients<Stage>)
      for (auto&& g : stage_->gradients()) reduce_one(std::span<T>(g));
    if constexpr (has_vocab)
      for (const std::span<float> g : vocab_->gradients()) reduce_one(g);
    dp_->signal(compute_);
  }

  // Every rank's vocabulary layers must describe the same vocabulary, tokens and hidden size.
  template <class Host>
  std::string agree_on_vocab(Host& host) {
    const std::array<double, 5> mine{
        static_cast<double>(vocab_->shards().vocab_size()),
        static_cast<double>(vocab_->shards().padded_size()), static_cast<double>(vocab_->tokens()),
        static_cast<double>(vocab_->hidden()), static_cast<double>(vocab_->rank())};
    std::vector<double> all(5 * static_cast<std::size_t>(host.size()));
    host.all_gather(std::span<const double>(mine), std::span<double>(all));
    for (int r = 0; r < host.size(); ++r) {
      const double* o = all.data() + 5 * static_cast<std::size_t>(r);
      if (o[0] != mine[0] || o[1] != mine[1] || o[2] != mine[2] || o[3] != mine[3] || o[4] != r)
        return detail::concat(
            "pipit::cuda::device_executor: the vocabulary layers disagree (refused at start, every "
            "rank): rank ",
            r, " has vocabulary ", o[0], " padded to ", o[1], ", ", o[2], " tokens, hidden ", o[3],
            " as shard ", o[4], "; rank ", host.rank(), " has vocabulary ", mine[0], " padded to ",
            mine[1], ", ", mine[2], " tokens, hidden ", mine[3]);
    }
    return {};
  }

  // Everything that can fail locally is caught and taken into the start-up agreement, so that
  // every rank raises the same pipit::error.
  template <class Host>
  void prepare(Host& host, const schedule::plan& plan) {
    const int rank = host.rank();
    std::string problem;
    schedule::plan lowered;
    std::vector<runtime::chunk_sizes> sizes;
    std::vector<std::size_t> grad_sizes;
    try {
      if (host.size() != comm_->size() || host.rank() != comm_->rank())
        fail("the host communicator is rank ", host.rank(), " of ", host.size(),
             " but the NCCL communicator is rank ", comm_->rank(), " of ", comm_->size());
      if (plan.rank_count() != comm_->size())
        fail("the plan has ", plan.rank_count(), " ranks but the pipeline communicator has ",
             comm_->size());
      lowered = plan.lowered ? plan : schedule::lower(plan);
      if (options_.validate)
        if (const auto v = schedule::validate(lowered); !v)
          fail("plan '", plan.schedule, "' is ", schedule::to_string(v));
      if constexpr (!runtime::split_backward_stage<Stage>) {
        bool split = lowered.split_backward;
        for (const auto& acts : lowered.ranks)
          for (const auto& a : acts)
            split = split || a.kind == schedule::op::backward_input ||
                    a.kind == schedule::op::backward_weight;
        if (split)
          fail("schedule '", plan.schedule,
               "' splits the backward into B and W passes, but the stage has only a combined "
               "backward(): give it backward_input() and backward_weight()");
      }
      sizes.resize(static_cast<std::size_t>(lowered.shp.chunks));
      for (int c = 0; c < lowered.shp.chunks; ++c) {
        runtime::chunk_sizes& z = sizes[static_cast<std::size_t>(c)];
        z.input = static_cast<std::size_t>(stage_->input_size(c));
        z.output = static_cast<std::size_t>(stage_->output_size(c));
        z.activation = static_cast<std::size_t>(stage_->activation_size(c));
      }
      std::optional<detail_device_executor::vocab_facts> facts;
      if constexpr (has_vocab) {
        facts = detail_device_executor::vocab_facts{Vocab::passes, vocab_->shards().ranks(),
                                                    vocab_->rank(), vocab_->embedding_size()};
        if (vocab_->stream() != compute_)
          fail(
              "the vocabulary layers enqueue on another stream than the executor's compute "
              "stream");
      }
      detail_device_executor::check_vocab_plan(plan, lowered, rank, comm_->size(), facts, sizes,
                                               runtime::stage_has_load_input<Stage>);
      program_ = runtime::compile(lowered, rank, sizes, options_.rematerialize);
      needs_ = detail_device_executor::exchange_dependencies(program_);
      if (dp_ != nullptr) {
        for (const auto g : detail_device_executor::stage_gradients<Stage, T>(*stage_))
          grad_sizes.push_back(g.size());
        if constexpr (has_vocab)
          for (const auto g : vocab_->gradients()) grad_sizes.push_back(g.size());
      }
      // Device memory and events are taken here, before the agreement, so that a failure (out
      // of memory on one rank) becomes every rank's pipit::error instead of a hang of the others
      // in their first collective. No rank communicates in this block: the handshake below runs
      // in the same order on every rank whatever happened here.
      allocate(lowered);
    } catch (const std::exception& e) {
      problem = e.what();
      if (problem.empty()) problem = "unknown error";
    }
    const std::uint64_t hash = problem.empty() ? runtime::plan_hash(lowered) : 0;
    std::string verdict = runtime::agree_to_start(
        host, runtime::start_view{problem, hash, plan.shp, plan.rank_count(), sizeof(T)});
    if (verdict.empty()) verdict = runtime::agree_on_sizes(host, lowered, sizes);
    if constexpr (has_vocab)
      if (verdict.empty()) verdict = agree_on_vocab(host);
    if (dp_ != nullptr) {
      detail_device_executor::nccl_host_gather dp_host(*dp_);
      int shard = -1;  // members of a data group must hold the same vocabulary shard
      if constexpr (has_vocab) shard = vocab_->rank();
      std::string dp_verdict = runtime::agree_data_parallel(dp_host, verdict.empty(), hash, rank,
                                                            sizeof(T), grad_sizes, shard);
      if (verdict.empty()) verdict = std::move(dp_verdict);
      // The data verdict reached one data group only; the pipeline's other ranks must hear it
      // too, or they would wait in run() for the ranks that threw (runtime::agree_replica).
      verdict = runtime::agree_replica(host, verdict);
    }
    if (!verdict.empty()) {
      destroy_events();  // the destructor does not run when the constructor throws
      throw error(verdict);
    }
    ops_.clear();
    ops_.reserve(program_.transfers.size());
    for (const runtime::transfer& t : program_.transfers) {
      const std::span<T> b(arena_.data() + t.buffer.offset, t.buffer.size);
      ops_.push_back(t.send ? comm::send_op(std::span<const T>(b), t.peer, t.tag)
                            : comm::recv_op(b, t.peer, t.tag));
    }
  }

  // The arena, the vocabulary layers' states and the events (inside prepare()'s try).
  void allocate(const schedule::plan& lowered) {
    arena_ = device_buffer<T>(program_.arena_size, compute_);
    arena_.zero();
    if constexpr (has_vocab) {
      const int last_stage = lowered.shp.virtual_stages() - 1;
      vocab_->prepare(*comm_, lowered.shp.microbatches, std::max(program_.vocab_slots, 1),
                      lowered.rank_of(0), lowered.rank_of(last_stage));
    }
    std::size_t points = 0;
    for (const auto& in : program_.code)
      points += detail_device_executor::is_communication_point(in) ? 1 : 0;
    PIPIT_CUDA_CHECK(cudaEventCreateWithFlags(&compute_done_, cudaEventDisableTiming));
    points_.assign(points, nullptr);
    for (cudaEvent_t& e : points_)
      PIPIT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  void destroy_events() noexcept {
    for (cudaEvent_t& e : points_)
      if (e) (void)cudaEventDestroy(e);
    points_.clear();
    if (compute_done_) (void)cudaEventDestroy(compute_done_);
    compute_done_ = nullptr;
  }

  nccl_communicator* comm_ = nullptr;
  nccl_communicator* dp_ = nullptr;
  Stage* stage_ = nullptr;
  vocab_ref* vocab_ = nullptr;
  cudaStream_t compute_ = nullptr;
  runtime::executor_options options_;
  std::uint64_t step_ = 0;
  runtime::program program_;
  std::vector<int> needs_;
  device_buffer<T> arena_;
  std::vector<comm::p2p_op> ops_;
  cudaEvent_t compute_done_ = nullptr;
  std::vector<cudaEvent_t> points_;  // the end of each communication point, in program order
};

// Class template argument deduction: device_executor ex(host, nccl, stage, plan, compute),
// (host, pipeline, data_parallel, stage, plan, compute), (host, nccl, stage, vocab, plan,
// compute), (host, pipeline, data_parallel, stage, vocab, plan, compute).
template <comm::communicator Host, class Stage>
device_executor(Host&, nccl_communicator&, Stage&, const schedule::plan&, cudaStream_t,
                runtime::executor_options = {}) -> device_executor<Stage>;
template <comm::communicator Host, class Stage>
device_executor(Host&, nccl_communicator&, nccl_communicator&, Stage&, const schedule::plan&,
                cudaStream_t, runtime::executor_options = {}) -> device_executor<Stage>;
template <comm::communicator Host, class Stage, class Vocab>
requires is_vocab_layers<Vocab>::value device_executor(Host&, nccl_communicator&, Stage&, Vocab&,
                                                       const schedule::plan&, cudaStream_t,
                                                       runtime::executor_options = {})
->device_executor<Stage, Vocab>;
template <comm::communicator Host, class Stage, class Vocab>
requires is_vocab_layers<Vocab>::value device_executor(Host&, nccl_communicator&,
                                                       nccl_communicator&, Stage&, Vocab&,
                                                       const schedule::plan&, cudaStream_t,
                                                       runtime::executor_options = {})
->device_executor<Stage, Vocab>;

}  // namespace pipit::cuda
