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
// problem is raised as pipit::error on every rank. With a data-parallel group the agreement ends
// with one more round over the replica (its vocabulary group, else its pipeline group), so that a
// refusal inside one data group reaches every rank of every replica. run() then makes no heap
// allocation of its own, no virtual call and no std::function call: a switch over precompiled
// instructions, direct calls into the stage, and prebuilt point-to-point groups (the communicator
// may allocate inside exchange(); comm::threads copies each message).
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
// Vocabulary parallelism (vocab_layers.hpp): executor(pipeline, stage, vocab_layers, plan) runs a
// plan with S, T, IF and IB passes (schedule::make_vocab_plan): the vocabulary layers compute the
// first stage's input and the last stage's output gradient, and run their collectives over the
// pipeline communicator inside those passes. vocab_layers::set_batch() gives each step's tokens.
// With comm_groups (comm_groups.hpp; tp::process_grid::groups()) the shards span the pipeline x
// tensor ranks of a replica: executor(groups, stage, vocab_layers, plan) runs the vocabulary
// collectives over groups.vocab, whose p * t ranks are ordered pipeline * t + tensor and whose
// t tensor ranks per stage run the same program in lockstep (vocab_layers.hpp). Construction
// is then collective over the pipeline, the vocabulary and the data-parallel groups, then the
// vocabulary group once more, in that order, on every rank of the vocabulary group together.
// Without vocabulary layers the executor does not know the tensor ranks: a refusal reaches the
// pipeline and data groups, and the tensor ranks of other pipelines learn of it through the
// communicator's failure handling.
//
// Data parallelism: after the last pass of a step, each span of stage.gradients() is summed over
// the data-parallel group (comm.all_reduce with std::plus) and, by default, divided by the
// group's size (gradient_reduction::average: replicas that each average over their own
// microbatches then hold the average over the global batch).

#include <algorithm>
#include <array>
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
#include "pipit/runtime/comm_groups.hpp"
#include "pipit/runtime/executor_options.hpp"
#include "pipit/runtime/handshake.hpp"
#include "pipit/runtime/pass_info.hpp"
#include "pipit/runtime/program.hpp"
#include "pipit/runtime/stage.hpp"
#include "pipit/runtime/stage_pass.hpp"
#include "pipit/runtime/vocab_layers.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/schedule/validate.hpp"

namespace pipit::runtime {

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

// The executor's Vocab parameter when the plan has no vocabulary passes.
struct no_vocab_layers {};

// What run(observer) calls around each instruction.
template <class O>
concept run_observer = requires(O& o, const instruction& in, const pass_info& info) {
  o.begin(in, info);
  o.end(in, info);
};

// The observer of run(): nothing.
struct no_observer {
  constexpr void begin(const instruction&, const pass_info&) const noexcept {}
  constexpr void end(const instruction&, const pass_info&) const noexcept {}
};

template <class Stage, comm::communicator Comm, class Vocab = no_vocab_layers>
class executor {
  static_assert(check_stage<Stage>());
  static constexpr bool has_vocab = is_vocab_layers<Vocab>::value;
  static_assert(has_vocab || std::is_same_v<Vocab, no_vocab_layers>,
                "pipit::runtime: the executor's vocabulary layers must be a "
                "runtime::vocab_layers<Algorithm, T, Chunk>");

 public:
  using value_type = typename detail_executor::value_type_of<Stage>::type;
  using T = value_type;
  using vocab_type = Vocab;

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

  // Pipeline with vocabulary-parallel embedding and output layer (a plan with vocabulary
  // passes). Collective over `pipeline`.
  executor(Comm& pipeline, Stage& stage, Vocab& vocab, const schedule::plan& plan,
           executor_options options = {}) requires is_vocab_layers<Vocab>::value
      : comm_(&pipeline),
        stage_(&stage),
        vocab_(&vocab),
        options_(options),
        step_(options.first_step) {
    check_vocab_type();
    prepare(plan);
  }

  // ... and data parallelism: the vocabulary shards' gradients are reduced with the stage's.
  executor(Comm& pipeline, Comm& data_parallel, Stage& stage, Vocab& vocab,
           const schedule::plan& plan,
           executor_options options = {}) requires is_vocab_layers<Vocab>::value
      : comm_(&pipeline),
        dp_(&data_parallel),
        stage_(&stage),
        vocab_(&vocab),
        options_(options),
        step_(options.first_step) {
    check_vocab_type();
    static_assert(stage_has_gradients<Stage>,
                  "pipit::runtime: with a data-parallel group the stage must provide "
                  "`gradients()`, a range of std::span<value_type> (its gradient buffers)");
    prepare(plan);
  }

  // The groups in one value (comm_groups.hpp): groups.pipeline, and groups.data when not null
  // and of more than one rank (then the stage must provide gradients(); a one-rank group is
  // skipped: its reduction would be the identity). groups.vocab is read only with vocabulary
  // layers.
  executor(const comm_groups<Comm>& groups, Stage& stage, const schedule::plan& plan,
           executor_options options = {})
      : comm_(checked_pipeline(groups)),
        dp_(data_group(groups)),
        stage_(&stage),
        options_(options),
        step_(options.first_step) {
    prepare(plan);
  }

  // ... with vocabulary layers sharded over groups.vocab (nullptr: the pipeline group): their
  // shards().ranks() must be groups.vocab->size(), a multiple t of the pipeline's size, and
  // their rank() groups.vocab->rank() = pipeline rank * t + tensor rank. Collective over the
  // pipeline, vocabulary and data-parallel groups.
  executor(const comm_groups<Comm>& groups, Stage& stage, Vocab& vocab, const schedule::plan& plan,
           executor_options options = {}) requires is_vocab_layers<Vocab>::value
      : comm_(checked_pipeline(groups)),
        dp_(data_group(groups)),
        vocab_comm_(groups.vocab),
        stage_(&stage),
        vocab_(&vocab),
        options_(options),
        step_(options.first_step) {
    check_vocab_type();
    prepare(plan);
  }

  executor(const executor&) = delete;
  executor& operator=(const executor&) = delete;
  executor(executor&&) noexcept = default;
  executor& operator=(executor&&) noexcept = default;

  // One training step: every pass of this rank's plan, then the data-parallel reduction.
  void run() { run(no_observer{}); }

  // The same step, telling `observer` when each instruction begins and ends (e.g. to record a
  // measured timeline): observer.begin(instruction, pass_info) and observer.end(instruction,
  // pass_info), where the pass_info of an exchange carries only the step. With no_observer the
  // calls compile to nothing.
  template <class Observer>
  requires run_observer<Observer>
  void run(Observer&& observer) {
    const std::uint64_t step = step_++;
    T* const base = arena_.data();
    const auto buf = [base](const buffer_ref& r) { return std::span<T>(base + r.offset, r.size); };
    const auto cbuf = [base](const buffer_ref& r) {
      return std::span<const T>(base + r.offset, r.size);
    };
    Stage& st = *stage_;
    if constexpr (has_vocab) vocab_->begin_step();
    for (const instruction& in : program_.code) {
      if (in.kind == instruction_kind::exchange) {
        pass_info info;
        info.step = step;
        observer.begin(in, std::as_const(info));
        comm_->exchange(
            std::span<comm::p2p_op>(ops_.data() + in.first_transfer, in.transfer_count));
        observer.end(in, std::as_const(info));
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
      observer.begin(in, std::as_const(info));
      switch (in.kind) {
        case instruction_kind::forward:
        case instruction_kind::backward_input:
        case instruction_kind::backward_weight:
        case instruction_kind::backward:
          run_stage_pass(st, in, std::as_const(info), base, !has_vocab);
          break;
        case instruction_kind::embed_forward:
          if constexpr (has_vocab)
            vocab_->embed_forward(*vocab_comm_, std::as_const(info), buf(in.output));
          break;
        case instruction_kind::vocab_s:
          if constexpr (has_vocab)
            vocab_->output_statistics(*vocab_comm_, std::as_const(info), in.slot, cbuf(in.input),
                                      buf(in.output_grad));
          break;
        case instruction_kind::vocab_t:
          if constexpr (has_vocab)
            vocab_->output_gradient(*vocab_comm_, std::as_const(info), in.slot,
                                    buf(in.output_grad));
          break;
        case instruction_kind::embed_backward:
          if constexpr (has_vocab)
            vocab_->embed_backward(*vocab_comm_, std::as_const(info), buf(in.input_grad));
          break;
        case instruction_kind::exchange:
          break;
      }
      observer.end(in, std::as_const(info));
    }
    if constexpr (has_vocab) vocab_->end_step();
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
  template <class G>
  void reduce_one(std::span<G> s) {
    const int n = dp_->size();
    dp_->all_reduce(s, std::plus<>{});
    if (options_.data_parallel == gradient_reduction::average && n > 1)
      for (G& x : s) x = static_cast<G>(x / static_cast<G>(n));
  }

  void reduce_gradients() {
    if constexpr (stage_has_gradients<Stage>)
      for (auto&& g : stage_->gradients()) reduce_one(std::span<T>(g));
    if constexpr (has_vocab)
      for (const auto g : vocab_->gradients()) reduce_one(g);
  }

  // Every rank's vocabulary layers must describe rank 0's vocabulary, tokens and hidden size,
  // and hold the shard of their pipeline rank. Each rank compares with rank 0's record, so the
  // message is the same on every rank.
  std::string agree_on_vocab() {
    const std::array<double, 5> mine{
        static_cast<double>(vocab_->shards().vocab_size()),
        static_cast<double>(vocab_->shards().padded_size()), static_cast<double>(vocab_->tokens()),
        static_cast<double>(vocab_->hidden()), static_cast<double>(vocab_->rank())};
    std::vector<double> all(5 * static_cast<std::size_t>(comm_->size()));
    comm_->all_gather(std::span<const double>(mine), std::span<double>(all));
    const double* z = all.data();
    for (int r = 0; r < comm_->size(); ++r) {
      const double* o = all.data() + 5 * static_cast<std::size_t>(r);
      if (o[0] != z[0] || o[1] != z[1] || o[2] != z[2] || o[3] != z[3] || o[4] != r)
        return detail::concat(
            "pipit::runtime: the vocabulary layers disagree (refused at start, every rank): rank ",
            r, " has vocabulary ", o[0], " padded to ", o[1], ", ", o[2], " tokens, hidden ", o[3],
            " as shard ", o[4], "; rank 0 has vocabulary ", z[0], " padded to ", z[1], ", ", z[2],
            " tokens, hidden ", z[3]);
    }
    return {};
  }

  // The vocabulary group's agreement (when it is not the pipeline group), reached by every member
  // whatever its pipeline group decided, so that no member waits for one that has thrown: each
  // member's pipeline verdict (a refusal's text travels with it), its layers' vocabulary, tokens,
  // hidden size and shard, its pipeline rank and size, and its plan. Returns "" or the same
  // message on every member.
  std::string agree_on_vocab_group(const std::string& verdict, std::uint64_t hash) {
    constexpr std::size_t head = 11, chars = 480, fields = head + chars;
    Comm& vc = *vocab_comm_;
    const int n = vc.size(), pn = comm_->size();
    std::vector<double> mine(fields, 0.0), all(fields * static_cast<std::size_t>(n), 0.0);
    mine[0] = verdict.empty() ? 1.0 : 0.0;
    mine[1] = static_cast<double>(vocab_->shards().vocab_size());
    mine[2] = static_cast<double>(vocab_->shards().padded_size());
    mine[3] = static_cast<double>(vocab_->tokens());
    mine[4] = static_cast<double>(vocab_->hidden());
    mine[5] = static_cast<double>(vocab_->rank());
    mine[6] = comm_->rank();
    mine[7] = pn;
    mine[8] = static_cast<double>(hash >> 32);
    mine[9] = static_cast<double>(hash & 0xffffffffULL);
    const std::size_t len = std::min(verdict.size(), chars);
    mine[10] = static_cast<double>(verdict.size());  // the full length: "..." only when cut
    for (std::size_t i = 0; i < len; ++i) mine[head + i] = static_cast<unsigned char>(verdict[i]);
    vc.all_gather(std::span<const double>(mine), std::span<double>(all));
    const auto at = [&](int r) { return all.data() + fields * static_cast<std::size_t>(r); };

    std::vector<int> refused;
    for (int r = 0; r < n; ++r)
      if (at(r)[0] == 0.0) refused.push_back(r);
    if (!refused.empty()) {
      const double* o = at(refused.front());
      const std::string text =
          detail_handshake::message_text(o + head, static_cast<std::size_t>(o[10]), chars);
      std::string who;
      for (std::size_t i = 0; i < refused.size(); ++i)
        who += detail::concat(i ? ", " : "", refused[i]);
      return detail::concat("pipit::runtime: the vocabulary group cannot start (ranks ", who,
                            " of ", n, " refused; vocabulary rank ", refused.front(),
                            ", pipeline rank ", o[6], "): ", text);
    }
    // Every member passed its local checks, so n is a multiple of each member's pipeline size.
    // Each member compares with vocabulary rank 0's record (the same data everywhere), so the
    // message is the same on every member: the members must agree with it on the vocabulary,
    // on the pipeline size and order, and on the plan.
    const double* z = at(0);
    const int t = n / static_cast<int>(z[7]);
    for (int r = 0; r < n; ++r) {
      const double* o = at(r);
      if (o[1] != z[1] || o[2] != z[2] || o[3] != z[3] || o[4] != z[4] || o[5] != r)
        return detail::concat(
            "pipit::runtime: the vocabulary layers disagree (refused at start, every rank): "
            "vocabulary rank ",
            r, " has vocabulary ", o[1], " padded to ", o[2], ", ", o[3], " tokens, hidden ", o[4],
            " as shard ", o[5], "; vocabulary rank 0 has vocabulary ", z[1], " padded to ", z[2],
            ", ", z[3], " tokens, hidden ", z[4]);
      if (o[7] != z[7] || o[6] != r / t)
        return detail::concat(
            "pipit::runtime: the vocabulary group's order is not pipeline * t + tensor (refused "
            "at start, every rank): vocabulary rank ",
            r, " is pipeline rank ", o[6], " of ", o[7], ", expected pipeline rank ", r / t, " of ",
            z[7], " (t = ", t, " tensor ranks per pipeline rank)");
      if (o[8] != z[8] || o[9] != z[9])
        return detail::concat(
            "pipit::runtime: the tensor replicas run different plans (refused at start, every "
            "rank): vocabulary rank ",
            r, " has plan hash ",
            detail_handshake::hex((static_cast<std::uint64_t>(o[8]) << 32) |
                                  static_cast<std::uint64_t>(o[9])),
            ", vocabulary rank 0 has ",
            detail_handshake::hex((static_cast<std::uint64_t>(z[8]) << 32) |
                                  static_cast<std::uint64_t>(z[9])));
    }
    return {};
  }

  static Comm* checked_pipeline(const comm_groups<Comm>& groups) {
    if (groups.pipeline == nullptr)
      fail(
          "pipit::runtime::executor: comm_groups::pipeline is null; every executor needs its "
          "pipeline communicator");
    return groups.pipeline;
  }
  // A one-rank data-parallel group reduces nothing: it is skipped (no agreement, no reduction),
  // which also lets a stage without gradients() run on a grid whose data axis has size 1.
  static Comm* data_group(const comm_groups<Comm>& groups) {
    if (groups.data != nullptr && groups.data->size() == 1) return nullptr;
    return groups.data;
  }

  static constexpr void check_vocab_type() {
    if constexpr (has_vocab)
      static_assert(std::is_same_v<typename Vocab::value_type, T>,
                    "pipit::runtime: the vocabulary layers' value_type must be the stage's");
  }

  // Everything that can fail locally is caught and taken into the start-up agreement, so that
  // every rank raises the same pipit::error (no rank waits for one that has already thrown).
  void prepare(const schedule::plan& plan) {
    const int rank = comm_->rank();
    if constexpr (!has_vocab) vocab_comm_ = nullptr;  // read only with vocabulary layers
    if (vocab_comm_ == nullptr) vocab_comm_ = comm_;
    const bool vocab_group = has_vocab && vocab_comm_ != comm_;
    int tensor_ranks = 1;
    std::string problem;
    schedule::plan lowered;
    std::vector<chunk_sizes> sizes;
    std::vector<std::size_t> grad_sizes;  // for the data-parallel agreement
    try {
      if constexpr (!stage_has_gradients<Stage>)
        if (dp_ != nullptr)
          fail("the data-parallel group has ", dp_->size(),
               " ranks but the stage provides no `gradients()`, a range of "
               "std::span<value_type> (its gradient buffers) to reduce over it");
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
      if constexpr (has_vocab) {
        if (plan.vocab == schedule::vocab_passes::none)
          fail("the executor has vocabulary layers but plan '", plan.schedule,
               "' has no vocabulary passes (make it with schedule::make_vocab_plan)");
        if (plan.vocab != Vocab::passes)
          fail("plan '", plan.schedule, "' has ", schedule::name(plan.vocab),
               " vocabulary passes but the vocabulary layers run ", schedule::name(Vocab::passes));
        if (!vocab_group) {
          if (vocab_->shards().ranks() != comm_->size() || vocab_->rank() != rank)
            fail("the vocabulary layers are rank ", vocab_->rank(), " of ",
                 vocab_->shards().ranks(), " shards; the pipeline rank is ", rank, " of ",
                 comm_->size());
        } else {
          const int vn = vocab_comm_->size(), vr = vocab_comm_->rank(), pn = comm_->size();
          if (vn % pn != 0)
            fail("the vocabulary group has ", vn, " ranks, not a multiple of the pipeline's ", pn,
                 " (it must hold the pipeline x tensor ranks of one replica)");
          tensor_ranks = vn / pn;
          if (vr / tensor_ranks != rank)
            fail("vocabulary group rank ", vr, " would be pipeline rank ", vr / tensor_ranks,
                 " (rank / t, t = ", tensor_ranks, ") but its pipeline rank is ", rank,
                 ": order the group pipeline * t + tensor (tp::process_grid::vocab())");
          if (vocab_->shards().ranks() != vn || vocab_->rank() != vr)
            fail("the vocabulary layers are rank ", vocab_->rank(), " of ",
                 vocab_->shards().ranks(), " shards; the vocabulary group rank is ", vr, " of ",
                 vn);
        }
      } else {
        if (plan.vocab != schedule::vocab_passes::none)
          fail("plan '", plan.schedule, "' has ", schedule::name(plan.vocab),
               " vocabulary passes: give the executor runtime::vocab_layers to run them");
      }
      sizes.resize(static_cast<std::size_t>(lowered.shp.chunks));
      const int last_stage = lowered.shp.virtual_stages() - 1;
      for (int c = 0; c < lowered.shp.chunks; ++c) {
        chunk_sizes& z = sizes[static_cast<std::size_t>(c)];
        z.input = static_cast<std::size_t>(stage_->input_size(c));
        z.output = static_cast<std::size_t>(stage_->output_size(c));
        z.activation = static_cast<std::size_t>(stage_->activation_size(c));
        const int s = schedule::stage_of(lowered.place, lowered.shp, rank, c);
        if constexpr (has_vocab) {
          if (s == 0 && z.input != vocab_->embedding_size())
            fail("the first virtual stage has input_size ", z.input,
                 " but the vocabulary layers' embedding output has ", vocab_->embedding_size(),
                 " elements (tokens x hidden)");
          if (s == last_stage && z.output != vocab_->embedding_size())
            fail("the last virtual stage has output_size ", z.output,
                 " but the vocabulary layers' output layer takes ", vocab_->embedding_size(),
                 " elements (tokens x hidden)");
        } else if constexpr (!stage_has_load_input<Stage>) {
          if (s == 0 && z.input != 0)
            fail("the first virtual stage has input_size ", z.input,
                 " but the stage has no load_input() to fill it");
        }
      }
      // Inside the try: gradients() may throw (vocab_layers refuses a strided gradient view,
      // which the reduction could not treat as one span), and that must reach every rank.
      if (dp_ != nullptr) {
        if constexpr (stage_has_gradients<Stage>)
          for (auto&& g : stage_->gradients()) grad_sizes.push_back(std::span<T>(g).size());
        if constexpr (has_vocab)
          for (const auto g : vocab_->gradients()) grad_sizes.push_back(g.size());
      }
      program_ = compile(lowered, rank, sizes, options_.rematerialize);
      if constexpr (has_vocab)
        vocab_->prepare(lowered.shp.microbatches, std::max(program_.vocab_slots, 1),
                        lowered.rank_of(0), lowered.rank_of(last_stage), tensor_ranks);
    } catch (const std::exception& e) {
      problem = e.what();
      if (problem.empty()) problem = "unknown error";
    }
    const std::uint64_t hash = problem.empty() ? plan_hash(lowered) : 0;
    std::string verdict =
        agree_to_start(*comm_, start_view{problem, hash, plan.shp, plan.rank_count(), sizeof(T)});
    if (verdict.empty()) verdict = agree_on_sizes(*comm_, lowered, sizes);
    if constexpr (has_vocab) {
      if (vocab_group)
        verdict = agree_on_vocab_group(verdict, hash);
      else if (verdict.empty())
        verdict = agree_on_vocab();
    }
    if (dp_ != nullptr) {
      // The members of a data group must hold the same shard: a group of the tensor ranks of
      // one stage agrees on everything else and would average different shards.
      int shard = -1;
      if constexpr (has_vocab) shard = vocab_->rank();
      std::string dp_verdict =
          agree_data_parallel(*dp_, verdict.empty(), hash, rank, sizeof(T), grad_sizes, shard);
      if (verdict.empty()) verdict = std::move(dp_verdict);
      // The data verdict reached one data group only; the replica's other ranks must hear it
      // too, or they would wait in run() for the ranks that threw.
      verdict = agree_replica(vocab_group ? *vocab_comm_ : *comm_, verdict);
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
  Comm* vocab_comm_ = nullptr;  // the vocabulary layers' group: comm_ unless comm_groups::vocab
  Stage* stage_ = nullptr;
  Vocab* vocab_ = nullptr;
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

// Class template argument deduction: executor ex(comm, stage, plan), executor ex(pipeline,
// data_parallel, stage, plan), executor ex(comm, stage, vocab, plan), executor ex(pipeline,
// data_parallel, stage, vocab, plan), executor ex(groups, stage, plan), executor ex(groups,
// stage, vocab, plan).
template <class Stage, comm::communicator Comm>
executor(Comm&, Stage&, const schedule::plan&, executor_options = {}) -> executor<Stage, Comm>;
template <class Stage, comm::communicator Comm>
executor(Comm&, Comm&, Stage&, const schedule::plan&, executor_options = {})
    -> executor<Stage, Comm>;
template <class Stage, comm::communicator Comm, class Vocab>
requires is_vocab_layers<Vocab>::value executor(Comm&, Stage&, Vocab&, const schedule::plan&,
                                                executor_options = {})
->executor<Stage, Comm, Vocab>;
template <class Stage, comm::communicator Comm, class Vocab>
requires is_vocab_layers<Vocab>::value executor(Comm&, Comm&, Stage&, Vocab&, const schedule::plan&,
                                                executor_options = {})
->executor<Stage, Comm, Vocab>;

template <class Stage, comm::communicator Comm>
executor(const comm_groups<Comm>&, Stage&, const schedule::plan&, executor_options = {})
    -> executor<Stage, Comm>;
template <class Stage, comm::communicator Comm, class Vocab>
requires is_vocab_layers<Vocab>::value executor(const comm_groups<Comm>&, Stage&, Vocab&,
                                                const schedule::plan&, executor_options = {})
->executor<Stage, Comm, Vocab>;

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
