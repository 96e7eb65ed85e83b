#pragma once
// executor: runs one rank's share of a pipeline plan. It walks the rank's lowered actions and
// calls the user's stage (see stage.hpp) for each pass, posts each step's sends and receives as
// one group (comm.exchange), owns every activation and gradient buffer in flight, optionally
// re-materializes forwards (GPipe's re-materialization), and ends each step with the
// data-parallel all-reduce of the stage's gradients when a data-parallel group is given.
//
//   pipit::runtime::executor ex(pipeline_comm, my_stage, pipit::schedule::make_plan<zb_v>(shape));
//   for (int step = 0; step < steps; ++step) { ex.run(); my_stage.optimizer_step(); }
//
// Or, with the schedule policy known at compile time, make_executor<Policy>(comm, stage, shape):
// a stage with only a combined backward then fails to compile against a split-backward policy.
//
// Construction is collective over the pipeline group (and the data-parallel group): every rank
// lowers and validates the plan, compiles its share (program.hpp) into an instruction list over
// one preallocated arena, and takes part in the start-up agreement (handshake.hpp); any rank's
// problem is raised as pipit::error on every rank. run() then makes no heap allocation of its
// own, no virtual call and no std::function call: a switch over precompiled instructions, direct
// calls into the stage, and prebuilt point-to-point groups (the communicator may allocate
// inside exchange(); comm::threads copies each message).
//
// Failure: an exception from the stage leaves run() on that rank; the communicator's collective
// failure (threads: every pending and later operation on every rank raises pipit::error naming
// the failed rank; a silent peer times out) ends every other rank's run() with pipit::error.
//
// Re-materialization (executor_options::rematerialize): the forward writes `saved` into a
// scratch that is dropped at once, so between a microbatch's forward and its backward the rank
// keeps only the chunk's input; before B (or BW) the executor runs the forward again with
// pass_info::recompute set, into a fresh `saved`, which then lives until W. The recomputed
// forward must produce the same `saved` as the first: a deterministic function of the
// parameters, the input and pass_info (draw randomness from pass_info::seed, which is equal on
// both runs; parameters change only between steps).
//
// Data parallelism: after the last pass of a step, each span of stage.gradients() is summed over
// the data-parallel group (comm.all_reduce with std::plus) and, by default, divided by the
// group's size (gradient_reduction::average: replicas that each average over their own
// microbatches then hold the average over the global batch).

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/runtime/handshake.hpp"
#include "pipit/runtime/pass_info.hpp"
#include "pipit/runtime/program.hpp"
#include "pipit/runtime/stage.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/validate.hpp"

namespace pipit::runtime {

enum class gradient_reduction { sum, average };

struct executor_options {
  bool rematerialize = false;    // keep only chunk inputs; recompute the forward before B/BW
  std::uint64_t seed = 0;        // folded into every pass_info::seed
  std::uint64_t first_step = 0;  // pass_info::step of the first run()
  gradient_reduction data_parallel = gradient_reduction::average;
  bool validate = true;  // validate the (lowered) plan at construction
};

namespace detail_executor {
template <class S>
struct value_type_of {
  using type = unsigned char;  // only to keep the errors after check_stage's quiet
};
template <class S>
requires stage_has_value_type<S>
struct value_type_of<S> {
  using type = typename S::value_type;
};
}  // namespace detail_executor

template <class Stage, comm::communicator Comm>
class executor {
  static_assert(check_stage<Stage>());

 public:
  using value_type = typename detail_executor::value_type_of<Stage>::type;
  using T = value_type;

  // Pipeline only. Collective over `pipeline` (a group of plan.rank_count() ranks; this rank's
  // pipeline stage is pipeline.rank()).
  executor(Comm& pipeline, Stage& stage, const schedule::plan& plan, executor_options options = {})
      : comm_(&pipeline), stage_(&stage), options_(options), step_(options.first_step) {
    prepare(plan);
  }

  // Pipeline and data parallelism: `data_parallel` groups the ranks that hold the same pipeline
  // stage of different replicas. Collective over both groups.
  executor(Comm& pipeline, Comm& data_parallel, Stage& stage, const schedule::plan& plan,
           executor_options options = {})
      : comm_(&pipeline),
        dp_(&data_parallel),
        stage_(&stage),
        options_(options),
        step_(options.first_step) {
    static_assert(stage_has_gradients<Stage>,
                  "pipit::runtime: with a data-parallel group the stage must provide "
                  "`gradients()`, a range of std::span<value_type> (its gradient buffers)");
    prepare(plan);
  }

  executor(const executor&) = delete;
  executor& operator=(const executor&) = delete;
  executor(executor&&) noexcept = default;
  executor& operator=(executor&&) noexcept = default;

  // One training step: every pass of this rank's plan, then the data-parallel reduction.
  void run() {
    const std::uint64_t step = step_++;
    T* const base = arena_.data();
    const auto buf = [base](const buffer_ref& r) { return std::span<T>(base + r.offset, r.size); };
    const auto cbuf = [base](const buffer_ref& r) {
      return std::span<const T>(base + r.offset, r.size);
    };
    Stage& st = *stage_;
    for (const instruction& in : program_.code) {
      if (in.kind == instruction_kind::exchange) {
        comm_->exchange(
            std::span<comm::p2p_op>(ops_.data() + in.first_transfer, in.transfer_count));
        continue;
      }
      pass_info info;
      info.chunk = in.chunk;
      info.stage = in.stage;
      info.microbatch = in.microbatch;
      info.step = step;
      info.seed = pass_seed(options_.seed, step, in.stage, in.microbatch);
      info.first = in.first;
      info.last = in.last;
      switch (in.kind) {
        case instruction_kind::forward:
          if constexpr (stage_has_load_input<Stage>)
            if (in.first) st.load_input(std::as_const(info), buf(in.input));
          st.forward(std::as_const(info), cbuf(in.input), buf(in.output), buf(in.saved));
          break;
        case instruction_kind::backward_input:
          if (in.recompute) recompute(info, in, base);
          if constexpr (split_backward_stage<Stage>)
            st.backward_input(std::as_const(info), cbuf(in.input), buf(in.saved),
                              cbuf(in.output_grad), buf(in.input_grad));
          break;
        case instruction_kind::backward_weight:
          if constexpr (split_backward_stage<Stage>)
            st.backward_weight(std::as_const(info), cbuf(in.input), cbuf(in.saved),
                               cbuf(in.output_grad));
          break;
        case instruction_kind::backward:
          if (in.recompute) recompute(info, in, base);
          if constexpr (stage_has_backward<Stage>) {
            st.backward(std::as_const(info), cbuf(in.input), buf(in.saved), cbuf(in.output_grad),
                        buf(in.input_grad));
          } else {
            st.backward_input(std::as_const(info), cbuf(in.input), buf(in.saved),
                              cbuf(in.output_grad), buf(in.input_grad));
            st.backward_weight(std::as_const(info), cbuf(in.input), cbuf(in.saved),
                               cbuf(in.output_grad));
          }
          break;
        case instruction_kind::exchange:
          break;
      }
    }
    if (dp_ != nullptr) reduce_gradients();
  }

  int rank() const noexcept { return program_.rank; }
  // pass_info::step of the next run().
  std::uint64_t step() const noexcept { return step_; }
  const executor_options& options() const noexcept { return options_; }
  // The compiled share of the plan: instructions, transfers, and the stash layout (slots per
  // buffer kind and chunk: the peak number of buffers alive at once).
  const program& compiled() const noexcept { return program_; }
  // Bytes of the activation and gradient stash (all buffers, allocated at construction).
  std::size_t stash_bytes() const noexcept { return arena_.size() * sizeof(T); }

 private:
  void recompute(pass_info info, const instruction& in, T* base) {
    info.recompute = true;
    stage_->forward(std::as_const(info), std::span<const T>(base + in.input.offset, in.input.size),
                    std::span<T>(base + in.output.offset, in.output.size),
                    std::span<T>(base + in.saved.offset, in.saved.size));
  }

  void reduce_gradients() {
    if constexpr (stage_has_gradients<Stage>) {
      const int n = dp_->size();
      for (auto&& g : stage_->gradients()) {
        std::span<T> s = g;
        dp_->all_reduce(s, std::plus<>{});
        if (options_.data_parallel == gradient_reduction::average && n > 1)
          for (T& x : s) x = static_cast<T>(x / static_cast<T>(n));
      }
    }
  }

  // Everything that can fail locally is caught and taken into the start-up agreement, so that
  // every rank raises the same pipit::error (no rank waits for one that has already thrown).
  void prepare(const schedule::plan& plan) {
    const int rank = comm_->rank();
    std::string problem;
    schedule::plan lowered;
    std::vector<chunk_sizes> sizes;
    try {
      if (plan.rank_count() != comm_->size())
        fail("the plan has ", plan.rank_count(), " ranks but the pipeline communicator has ",
             comm_->size());
      lowered = plan.lowered ? plan : schedule::lower(plan);
      if (options_.validate)
        if (const auto v = schedule::validate(lowered); !v)
          fail("plan '", plan.schedule, "' is ", schedule::to_string(v));
      if constexpr (!split_backward_stage<Stage>) {
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
        chunk_sizes& z = sizes[static_cast<std::size_t>(c)];
        z.input = static_cast<std::size_t>(stage_->input_size(c));
        z.output = static_cast<std::size_t>(stage_->output_size(c));
        z.activation = static_cast<std::size_t>(stage_->activation_size(c));
        if constexpr (!stage_has_load_input<Stage>)
          if (schedule::stage_of(lowered.place, lowered.shp, rank, c) == 0 && z.input != 0)
            fail("the first virtual stage has input_size ", z.input,
                 " but the stage has no load_input() to fill it");
      }
      program_ = compile(lowered, rank, sizes, options_.rematerialize);
    } catch (const std::exception& e) {
      problem = e.what();
      if (problem.empty()) problem = "unknown error";
    }
    const std::uint64_t hash = problem.empty() ? plan_hash(lowered) : 0;
    std::string verdict =
        agree_to_start(*comm_, start_view{problem, hash, plan.shp, plan.rank_count(), sizeof(T)});
    if (verdict.empty()) verdict = agree_on_sizes(*comm_, lowered, sizes);
    if (dp_ != nullptr) {
      std::vector<std::size_t> grad_sizes;
      if constexpr (stage_has_gradients<Stage>)
        for (auto&& g : stage_->gradients()) grad_sizes.push_back(std::span<T>(g).size());
      std::string dp_verdict =
          agree_data_parallel(*dp_, verdict.empty(), hash, rank, sizeof(T), grad_sizes);
      if (verdict.empty()) verdict = std::move(dp_verdict);
    }
    if (!verdict.empty()) throw error(verdict);

    arena_.assign(program_.arena_size, T{});
    ops_.clear();
    ops_.reserve(program_.transfers.size());
    for (const transfer& t : program_.transfers) {
      const std::span<T> b(arena_.data() + t.buffer.offset, t.buffer.size);
      ops_.push_back(t.send ? comm::send_op(std::span<const T>(b), t.peer, t.tag)
                            : comm::recv_op(b, t.peer, t.tag));
    }
  }

  Comm* comm_ = nullptr;
  Comm* dp_ = nullptr;
  Stage* stage_ = nullptr;
  executor_options options_;
  std::uint64_t step_ = 0;
  program program_;
  std::vector<T> arena_;
  std::vector<comm::p2p_op> ops_;  // program_.transfers, pointing into arena_
};

// The policy known at compile time: makes the plan and refuses, at compile time, a stage with
// only a combined backward for a schedule that splits B and W.
template <schedule::schedule_policy Policy, class Stage, comm::communicator Comm>
executor<Stage, Comm> make_executor(Comm& pipeline, Stage& stage, const schedule::shape& shape,
                                    executor_options options = {}) {
  static_assert(!Policy::split_backward || split_backward_stage<Stage>,
                "pipit::runtime: this schedule splits the backward into B and W (zb-h1, zb-h2, "
                "zb-v, v-half, v-min, dualpipe-v): the stage needs backward_input() and "
                "backward_weight(), not only a combined backward()");
  return executor<Stage, Comm>(pipeline, stage, schedule::make_plan<Policy>(shape), options);
}

template <schedule::schedule_policy Policy, class Stage, comm::communicator Comm>
executor<Stage, Comm> make_executor(Comm& pipeline, Comm& data_parallel, Stage& stage,
                                    const schedule::shape& shape, executor_options options = {}) {
  static_assert(!Policy::split_backward || split_backward_stage<Stage>,
                "pipit::runtime: this schedule splits the backward into B and W (zb-h1, zb-h2, "
                "zb-v, v-half, v-min, dualpipe-v): the stage needs backward_input() and "
                "backward_weight(), not only a combined backward()");
  return executor<Stage, Comm>(pipeline, data_parallel, stage, schedule::make_plan<Policy>(shape),
                               options);
}

}  // namespace pipit::runtime
