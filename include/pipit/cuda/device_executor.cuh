#pragma once
// cuda::device_executor<Stage>: the pipeline executor's CUDA mode. It runs one rank's share of a
// plan like runtime::executor (the same compiled program, the same buffer lifetimes and slots:
// runtime/program.hpp) with every buffer in device memory, the stage's passes enqueued on a
// compute stream and each step's sends and receives on the NCCL communicator's stream, ordered
// by events instead of host waits:
//   - before an exchange, the communication stream waits for the compute stream's work so far
//     (its sends read what earlier passes wrote; its receives overwrite slots earlier passes
//     read);
//   - a pass waits only for the latest exchange that received one of the buffers it reads
//     (in-order streams cover the earlier ones), so compute that does not need a message runs
//     while the message is in flight;
//   - run() enqueues the whole step and returns without a host synchronisation; synchronize()
//     waits for both streams (NCCL errors and timeouts surface there, as pipit::error).
//
//   cudaStream_t compute;  cudaStreamCreate(&compute);
//   my_device_stage stage(compute, ...);             // enqueues its kernels on `compute`
//   pipit::cuda::device_executor ex(host_comm, nccl_comm, stage, plan, compute);
//   for (...) { ex.run(); optimizer_step_on(compute); }
//   ex.synchronize();
//
// Communication overlaps only the compute that does not need it: exchange_dependencies() says,
// per instruction, which exchange it waits for. The lowering posts a step's sends and
// receives together (one NCCL group), as on the host.
//
// The stage models runtime::stage with device spans: input, output, saved, output_grad and
// input_grad point into a device arena (cudaMallocAsync on the compute stream), and every pass
// must enqueue its work on the compute stream the stage was given, never wait on the host for
// it, and not read or write the spans from the host. load_input fills the first stage's input
// the same way.
//
// Construction is collective over `host`, a host communicator (comm::threads or comm::mpi) with
// the same ranks as the NCCL communicator: the start-up agreement of runtime/handshake.hpp runs
// over it (NCCL spans must be device memory), so a bad plan or shape on one rank is a
// pipit::error on every rank.
//
// Not yet: vocabulary plans (S, T, IF, IB) — refused at construction; data parallelism
// (all-reduce the stage's gradients with the NCCL communicator's all_reduce_async between steps
// yourself).

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/device_buffer.cuh"
#include "pipit/cuda/nccl_communicator.cuh"
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

// For every instruction of the program: the latest exchange (index into the exchanges, in
// program order) that sent or received any buffer the instruction reads or writes, or -1.
// Reading a received buffer must wait for its receive; writing a slot must wait for the send
// that still reads the slot's previous value (slots are reused). Found by replaying the
// program: each send and receive marks its arena range with its exchange.
inline std::vector<int> exchange_dependencies(const runtime::program& p) {
  struct range {
    std::size_t begin, end;
    int exchange;
  };
  std::vector<range> touched;  // ranges sent or received, newest last
  const auto last_touch = [&](const runtime::buffer_ref& r) {
    if (r.size == 0) return -1;
    for (auto it = touched.rbegin(); it != touched.rend(); ++it)
      if (it->begin < r.offset + r.size && r.offset < it->end) return it->exchange;
    return -1;
  };
  std::vector<int> out(p.code.size(), -1);
  int exchanges = 0;
  for (std::size_t i = 0; i < p.code.size(); ++i) {
    const runtime::instruction& in = p.code[i];
    if (in.kind == runtime::instruction_kind::exchange) {
      for (std::uint32_t t = 0; t < in.transfer_count; ++t) {
        const runtime::transfer& tr = p.transfers[in.first_transfer + t];
        // A newer transfer of the same range supersedes the older one (in-order stream).
        std::erase_if(touched, [&](const range& w) {
          return w.begin < tr.buffer.offset + tr.buffer.size && tr.buffer.offset < w.end;
        });
        touched.push_back({tr.buffer.offset, tr.buffer.offset + tr.buffer.size, exchanges});
      }
      ++exchanges;
      continue;
    }
    out[i] = std::max({last_touch(in.input), last_touch(in.output), last_touch(in.saved),
                       last_touch(in.output_grad), last_touch(in.input_grad)});
  }
  return out;
}

}  // namespace detail_device_executor

template <class Stage>
class device_executor {
  static_assert(runtime::check_stage<Stage>());

 public:
  using value_type = typename Stage::value_type;
  using T = value_type;

  // Collective over `host` and `pipeline` (the same ranks). `compute`: the stream the stage
  // enqueues on; the arena is allocated on it.
  template <comm::communicator Host>
  device_executor(Host& host, nccl_communicator& pipeline, Stage& stage, const schedule::plan& plan,
                  cudaStream_t compute, runtime::executor_options options = {})
      : comm_(&pipeline),
        stage_(&stage),
        compute_(compute),
        options_(options),
        step_(options.first_step) {
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
    }
    for (cudaEvent_t e : exchange_done_) (void)cudaEventDestroy(e);
    if (compute_done_) (void)cudaEventDestroy(compute_done_);
  }

  // Enqueues one training step on the compute and communication streams; no host wait.
  void run() {
    const std::uint64_t step = step_++;
    T* const base = arena_.data();
    Stage& st = *stage_;
    int exchange = 0, waited = -1;
    for (std::size_t i = 0; i < program_.code.size(); ++i) {
      const runtime::instruction& in = program_.code[i];
      if (in.kind == runtime::instruction_kind::exchange) {
        PIPIT_CUDA_CHECK(cudaEventRecord(compute_done_, compute_));
        PIPIT_CUDA_CHECK(cudaStreamWaitEvent(comm_->stream(), compute_done_, 0));
        comm_->exchange_async(
            std::span<comm::p2p_op>(ops_.data() + in.first_transfer, in.transfer_count));
        PIPIT_CUDA_CHECK(
            cudaEventRecord(exchange_done_[static_cast<std::size_t>(exchange)], comm_->stream()));
        ++exchange;
        continue;
      }
      if (const int need = needs_[i]; need > waited) {
        PIPIT_CUDA_CHECK(
            cudaStreamWaitEvent(compute_, exchange_done_[static_cast<std::size_t>(need)], 0));
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
      runtime::run_stage_pass(st, in, std::as_const(info), base, true);
    }
    // The step's last messages are in flight on the communication stream: later compute (the
    // optimizer, the next step) must not overwrite what they read or use what they write
    // before they are done.
    if (exchange > 0) {
      PIPIT_CUDA_CHECK(
          cudaStreamWaitEvent(compute_, exchange_done_[static_cast<std::size_t>(exchange - 1)], 0));
    }
  }

  // Waits for everything enqueued on both streams; raises pipit::error for a CUDA or NCCL
  // failure (the communicator's timeout applies).
  void synchronize() {
    comm_->wait_for(compute_);
    comm_->synchronize();
  }

  std::uint64_t step() const noexcept { return step_; }
  const runtime::program& compiled() const noexcept { return program_; }
  std::size_t stash_bytes() const noexcept { return arena_.bytes(); }
  // For each instruction, the exchange it waits for (-1: none): what lets compute overlap
  // messages it does not need.
  const std::vector<int>& exchange_dependencies() const noexcept { return needs_; }

 private:
  template <class Host>
  void prepare(Host& host, const schedule::plan& plan) {
    const int rank = host.rank();
    std::string problem;
    schedule::plan lowered;
    std::vector<runtime::chunk_sizes> sizes;
    try {
      if (host.size() != comm_->size() || host.rank() != comm_->rank())
        fail("the host communicator is rank ", host.rank(), " of ", host.size(),
             " but the NCCL communicator is rank ", comm_->rank(), " of ", comm_->size());
      if (plan.rank_count() != comm_->size())
        fail("the plan has ", plan.rank_count(), " ranks but the pipeline communicator has ",
             comm_->size());
      if (plan.vocab != schedule::vocab_passes::none)
        fail("plan '", plan.schedule,
             "' has vocabulary passes: the device executor does not run them yet (use "
             "runtime::executor with runtime::vocab_layers on the host)");
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
        if constexpr (!runtime::stage_has_load_input<Stage>)
          if (schedule::stage_of(lowered.place, lowered.shp, rank, c) == 0 && z.input != 0)
            fail("the first virtual stage has input_size ", z.input,
                 " but the stage has no load_input() to fill it");
      }
      program_ = runtime::compile(lowered, rank, sizes, options_.rematerialize);
      needs_ = detail_device_executor::exchange_dependencies(program_);
    } catch (const std::exception& e) {
      problem = e.what();
      if (problem.empty()) problem = "unknown error";
    }
    const std::uint64_t hash = problem.empty() ? runtime::plan_hash(lowered) : 0;
    std::string verdict = runtime::agree_to_start(
        host, runtime::start_view{problem, hash, plan.shp, plan.rank_count(), sizeof(T)});
    if (verdict.empty()) verdict = runtime::agree_on_sizes(host, lowered, sizes);
    if (!verdict.empty()) throw error(verdict);

    arena_ = device_buffer<T>(program_.arena_size, compute_);
    arena_.zero();
    std::size_t exchanges = 0;
    for (const auto& in : program_.code)
      exchanges += in.kind == runtime::instruction_kind::exchange ? 1 : 0;
    PIPIT_CUDA_CHECK(cudaEventCreateWithFlags(&compute_done_, cudaEventDisableTiming));
    exchange_done_.assign(exchanges, nullptr);
    for (cudaEvent_t& e : exchange_done_)
      PIPIT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    ops_.clear();
    ops_.reserve(program_.transfers.size());
    for (const runtime::transfer& t : program_.transfers) {
      const std::span<T> b(arena_.data() + t.buffer.offset, t.buffer.size);
      ops_.push_back(t.send ? comm::send_op(std::span<const T>(b), t.peer, t.tag)
                            : comm::recv_op(b, t.peer, t.tag));
    }
  }

  nccl_communicator* comm_ = nullptr;
  Stage* stage_ = nullptr;
  cudaStream_t compute_ = nullptr;
  runtime::executor_options options_;
  std::uint64_t step_ = 0;
  runtime::program program_;
  std::vector<int> needs_;
  device_buffer<T> arena_;
  std::vector<comm::p2p_op> ops_;
  cudaEvent_t compute_done_ = nullptr;
  std::vector<cudaEvent_t> exchange_done_;
};

}  // namespace pipit::cuda
