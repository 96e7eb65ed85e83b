#pragma once
// vocab_layers<Algorithm, T, Chunk>: the input embedding and the output layer (LM head + softmax
// cross-entropy) sharded over the vocabulary across every pipeline rank (or every pipeline x
// tensor rank, below), run by the executor as the S, T, IF and IB passes of a vocabulary plan
// (Yeung et al., "Balancing Pipeline Parallelism with Vocabulary Parallelism", arXiv 2411.05288;
// schedule/vocab_passes.hpp places the passes).
//
//   pipit::vocab::vocab_shards shards(V, p);
//   pipit::runtime::vocab_layers<pipit::vocab::one_barrier, float> vocab(
//       shards, comm.rank(), tokens_per_microbatch, embedding_shard, embedding_grad,
//       head_shard, head_grad);
//   pipit::runtime::executor ex(comm, my_stage, vocab,
//                               pipit::schedule::make_vocab_plan("1f1b", shape, vocab.passes));
//   for (...) { vocab.set_batch(tokens, targets); ex.run(); /* optimizer */ }
//
// The user's stages then hold only the transformer layers: the first virtual stage's input is
// the embedding output (tokens x hidden, row-major), the last virtual stage's output is the final
// hidden states X it hands to the output layer, and its backward receives dLoss/dX as a real
// output gradient. Each pass runs its collectives over the pipeline communicator, inside the
// pass, so every rank calls them at the same point of the lowered plan (lower.hpp):
//   IF_k  gather this shard's rows of microbatch k's tokens; reduce (sum) to the first stage's
//         rank, into F(0, k)'s input — exactly one rank contributes each row, so the sum is exact
//   S_k   broadcast X_k from the last stage's rank; the S pass on this shard; the statistics
//         merge (naive: three all-reduces; otherwise one all-reduce with vocab::merge_op); the
//         loss and per-token gradient scale g. one_barrier also forms the input gradient here:
//         input_grad_partial, reduce to the last stage's rank, scale by g -> B(last, k)'s dX
//   T_k   the weight gradient of this shard (+= into head_grad); naive and two_barrier also the
//         input-gradient partial, reduced to the last stage's rank -> B(last, k)'s dX
//   IB_k  broadcast F(0, k)'s input gradient from the first stage's rank; scatter-add this
//         shard's rows into embedding_grad
//
// Over pipeline x tensor ranks (Megatron's tensor parallelism composed with vocabulary
// parallelism; executor(comm_groups{pipeline, data, vocab}, ...), tp::process_grid::groups()):
// the vocabulary group holds p * t ranks, one shard each, ordered pipeline * t + tensor, and the
// t tensor ranks of a pipeline stage run the same stage program in lockstep with replicated
// activations at the stage boundaries. The collectives above then run over that group; the
// roots are tensor rank 0 of the first and the last stage (vocabulary ranks first * t and
// last * t), and every rank that needs a result gets it:
//   IF_k  t > 1: all-reduce instead of reduce (each of the first stage's t ranks takes the input)
//   S_k   broadcast X_k from vocabulary rank last * t; one_barrier's input-gradient partial:
//         t > 1: all-reduce instead of reduce (each of the last stage's t ranks takes dX)
//   T_k   naive, two_barrier: the same rule for the input-gradient partial
//   IB_k  broadcast from vocabulary rank first * t
// With t = 1 the passes send exactly what they send over the pipeline communicator. An
// all-reduce of n elements over p * t ranks costs about twice a reduce's bytes per rank (a ring:
// 2 (pt - 1)/pt n against (pt - 1)/pt n), paid only for the IF input and the dX partial.
// Microbatch k's X, statistics and g live from S_k to T_k in one of `slots` reusable states (the
// executor counts the microbatches in flight between S and T from the plan). The states and
// scratch buffers are allocated by prepare() and by the first use of each state; later steps
// allocate nothing.
//
// The objective is the mean over the step's microbatches of each microbatch's loss (Megatron's
// convention; options.average_microbatches = false: their sum); each microbatch's loss is
// reduced over its tokens by options.loss (mean or sum, ignore index, loss weights, label
// smoothing, z-loss). Gradients accumulate (+=) into embedding_grad and head_grad, in accum_t<T>
// (float for float and bfloat16, double for double); zero them between steps.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/runtime/pass_info.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/vocab/algorithms.hpp"
#include "pipit/vocab/embedding.hpp"
#include "pipit/vocab/loss.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/output_layer.hpp"
#include "pipit/vocab/shard_views.hpp"
#include "pipit/vocab/shards.hpp"
#include "pipit/vocab/softmax_stats.hpp"

namespace pipit::runtime {

struct vocab_layers_options {
  vocab::loss_options loss;          // per microbatch: ignore index, reduction, smoothing, z-loss
  bool average_microbatches = true;  // the objective: mean (true) or sum of microbatch losses
};

// The plan's vocabulary passes that an output-layer algorithm runs.
template <vocab::output_algorithm A>
inline constexpr schedule::vocab_passes vocab_passes_of =
    std::is_same_v<A, vocab::one_barrier>   ? schedule::vocab_passes::one_barrier
    : std::is_same_v<A, vocab::two_barrier> ? schedule::vocab_passes::two_barrier
                                            : schedule::vocab_passes::naive;

template <vocab::output_algorithm Algorithm, class T, std::size_t Chunk = vocab::default_chunk>
class vocab_layers {
  static constexpr bool is_one_barrier = std::is_same_v<Algorithm, vocab::one_barrier>;
  static constexpr bool is_naive = std::is_same_v<Algorithm, vocab::naive>;

 public:
  using value_type = T;
  using acc_type = vocab::accum_t<T>;
  using algorithm = Algorithm;
  using layer_type = vocab::output_layer<Algorithm, T, Chunk>;
  static constexpr schedule::vocab_passes passes = vocab_passes_of<Algorithm>;

  // shards: the vocabulary over the pipeline ranks (or the vocabulary group's p * t ranks);
  // rank: this rank in that group (the pipeline rank when t = 1); tokens: tokens per microbatch.
  // embedding and head: this rank's shards (shards.shard_size() x hidden; the padding rows are
  // never read); their gradients are accumulated in place. The views must stay valid while the
  // executor runs.
  vocab_layers(const vocab::vocab_shards& shards, int rank, std::int64_t tokens,
               vocab::matrix_view<const T> embedding, vocab::matrix_view<acc_type> embedding_grad,
               vocab::matrix_view<const T> head, vocab::matrix_view<acc_type> head_grad,
               vocab_layers_options options = {})
      : shards_(shards),
        rank_(rank),
        tokens_(tokens),
        hidden_(head.cols),
        embedding_(embedding),
        embedding_grad_(embedding_grad),
        head_(head),
        head_grad_(head_grad),
        options_(options) {
    vocab::check_shard_views("pipit::runtime::vocab_layers", shards, rank, tokens, embedding,
                             embedding_grad, head, head_grad);
    vocab::check_loss_inputs<acc_type>(shards, {}, options.loss, {});
  }

  vocab_layers(const vocab_layers&) = delete;
  vocab_layers& operator=(const vocab_layers&) = delete;

  int rank() const noexcept { return rank_; }
  const vocab::vocab_shards& shards() const noexcept { return shards_; }
  std::int64_t tokens() const noexcept { return tokens_; }
  std::int64_t hidden() const noexcept { return hidden_; }
  // Elements of the first stage's input and of the last stage's output: tokens x hidden.
  std::size_t embedding_size() const noexcept {
    return static_cast<std::size_t>(tokens_) * static_cast<std::size_t>(hidden_);
  }

  // The step's token ids and targets, microbatch after microbatch (microbatches x tokens each),
  // the same on every rank; loss_weights: empty, or one weight (a mask) per target. Checked
  // here: every id inside the vocabulary, every target inside it or the ignore index. Call
  // before each run(); the spans must stay valid until it returns. The checks are local: a rank
  // whose batch is refused raises on its own, and the other ranks learn of it through the
  // communicator's failure handling (comm::threads::run, comm::mpi::run).
  void set_batch(std::span<const std::int64_t> tokens, std::span<const std::int64_t> targets,
                 std::span<const acc_type> loss_weights = {}) {
    if (tokens.size() != targets.size() || tokens.size() % static_cast<std::size_t>(tokens_) != 0)
      fail("pipit::runtime::vocab_layers::set_batch: ", tokens.size(), " token ids and ",
           targets.size(), " targets; both must be microbatches x ", tokens_);
    for (const std::int64_t x : tokens) shards_.check_token(x);
    vocab::check_loss_inputs<acc_type>(shards_, targets, options_.loss, loss_weights);
    batch_tokens_ = tokens;
    batch_targets_ = targets;
    batch_weights_ = loss_weights;
  }

  // After a run(): the objective (mean or sum over microbatches of their losses), its z-loss
  // part, and the weight and count of the valid tokens over the step.
  vocab::loss_result<acc_type> loss() const noexcept { return result_; }
  // After a run(): each microbatch's loss (reduced over its tokens).
  std::span<const double> microbatch_losses() const noexcept { return losses_; }

  // Bytes these layers have allocated so far: the per-microbatch states (X, g, each output
  // layer's workspace) and the scratch buffers — their peak extra memory, shards excluded.
  std::size_t workspace_bytes() const noexcept {
    std::size_t n = (scratch_.capacity()) * sizeof(T) + acc_.capacity() * sizeof(acc_type) +
                    losses_.capacity() * sizeof(double);
    for (const slot& s : slots_) {
      n += s.x.capacity() * sizeof(T) + s.g.capacity() * sizeof(acc_type);
      if (s.layer) n += s.layer->workspace_bytes();
    }
    return n;
  }

  // The gradients this rank holds (for the data-parallel reduction).
  std::array<std::span<acc_type>, 2> gradients() const {
    return {flat(embedding_grad_, "the embedding gradient"),
            flat(head_grad_, "the output-layer gradient")};
  }

  // ---- called by the executor ----------------------------------------------------------------
  // Once, at the executor's construction: the plan's microbatches, the microbatches in flight
  // between S and T on this rank, the pipeline ranks of the first and last virtual stages, and
  // the tensor ranks per pipeline rank (t: the shards' ranks() is pipeline size x t, and shard
  // r belongs to pipeline rank r / t).
  void prepare(int microbatches, int slots, int first_rank, int last_rank, int replicas = 1) {
    if (microbatches <= 0 || slots <= 0)
      fail("pipit::runtime::vocab_layers: ", microbatches, " microbatches, ", slots, " slots");
    if (replicas <= 0 || shards_.ranks() % replicas != 0)
      fail("pipit::runtime::vocab_layers: ", shards_.ranks(), " shards cannot be split over ",
           replicas, " tensor ranks per pipeline rank");
    const int pipeline = shards_.ranks() / replicas;
    if (first_rank < 0 || first_rank >= pipeline || last_rank < 0 || last_rank >= pipeline)
      fail("pipit::runtime::vocab_layers: the first and last stages' pipeline ranks ", first_rank,
           " and ", last_rank, " must lie in [0, ", pipeline, ")");
    microbatches_ = microbatches;
    first_rank_ = first_rank;
    last_rank_ = last_rank;
    replicas_ = replicas;
    on_first_ = rank_ / replicas == first_rank;
    on_last_ = rank_ / replicas == last_rank;
    layer_options_ = options_.loss;
    if (options_.average_microbatches) layer_options_.grad_output /= microbatches;
    slots_.clear();
    slots_.resize(static_cast<std::size_t>(slots));
    for (slot& s : slots_) {
      s.x.assign(embedding_size(), T{});
      s.g.assign(static_cast<std::size_t>(tokens_), acc_type(0));
    }
    scratch_.assign(embedding_size(), T{});
    acc_.assign(embedding_size(), acc_type(0));
    losses_.assign(static_cast<std::size_t>(microbatches), 0.0);
  }

  // Before the step's first pass: the batch must cover every microbatch.
  void begin_step() {
    const std::size_t need =
        static_cast<std::size_t>(microbatches_) * static_cast<std::size_t>(tokens_);
    if (batch_tokens_.size() != need)
      fail("pipit::runtime::vocab_layers: set_batch() gave ", batch_tokens_.size(),
           " token ids; the plan's ", microbatches_, " microbatches of ", tokens_, " tokens need ",
           need);
    std::fill(losses_.begin(), losses_.end(), 0.0);
    z_total_ = 0;
    weight_total_ = 0;
    valid_total_ = 0;
  }
  // After the step's last pass.
  void end_step() {
    double total = 0;
    for (const double l : losses_) total += l;
    const double scale = options_.average_microbatches ? 1.0 / microbatches_ : 1.0;
    result_ = {static_cast<acc_type>(total * scale), static_cast<acc_type>(z_total_ * scale),
               static_cast<acc_type>(weight_total_), valid_total_};
  }

  // IF_k. out: F(0, k)'s input on the first stage's ranks, empty on the others.
  template <comm::communicator C>
  void embed_forward(C& comm, const pass_info& info, std::span<T> out) {
    const std::span<T> buf = on_first_ ? checked(out, "IF output") : scratch();
    vocab::embedding_forward_local<T, T>(shards_, rank_, embedding_, tokens_of(info.microbatch),
                                         view(buf));
    // Each row has exactly one contributor: the sum is exact, on every rank that takes it.
    sum_to_stage(comm, buf, first_rank_);
  }

  // S_k. x: F(last, k)'s output on the last stage's ranks (empty elsewhere; tensor rank 0's is
  // used); dx (one_barrier, on the last stage's ranks): B(last, k)'s output gradient.
  template <comm::communicator C>
  void output_statistics(C& comm, const pass_info& info, int slot_index, std::span<const T> x,
                         std::span<T> dx) {
    slot& s = slots_[static_cast<std::size_t>(slot_index)];
    if (rank_ == root(last_rank_)) {
      if (x.size() != embedding_size())
        fail("pipit::runtime::vocab_layers: the last stage's output has ", x.size(),
             " elements, expected ", embedding_size(), " (tokens x hidden)");
      std::copy(x.begin(), x.end(), s.x.begin());
    }
    comm.broadcast(std::span<T>(s.x), root(last_rank_));
    const std::span<const std::int64_t> targets = targets_of(info.microbatch);
    if (!s.layer)
      s.layer.emplace(shards_, rank_, const_view(s.x), head_, targets, layer_options_);
    else
      s.layer->bind(const_view(s.x), targets);
    layer_type& layer = *s.layer;
    if constexpr (is_one_barrier) {
      layer.s_pass(acc_view());
      comm.all_reduce(layer.stats(), vocab::merge_op{});
      layer.input_grad_partial(acc_view());
      sum_to_stage(comm, std::span<acc_type>(acc_), last_rank_);
    } else {
      layer.s_pass();
      if constexpr (is_naive) {
        comm.all_reduce(layer.naive_max(), comm::max_op{});
        comm.all_reduce(layer.naive_target_sums(), std::plus<>{});
        comm.all_reduce(layer.naive_sum_exp(), std::plus<>{});
        layer.naive_combine();
      } else {
        comm.all_reduce(layer.stats(), vocab::merge_op{});
      }
    }
    const vocab::loss_result<acc_type> r = layer.loss(s.g, weights_of(info.microbatch));
    losses_[static_cast<std::size_t>(info.microbatch)] = static_cast<double>(r.loss);
    z_total_ += static_cast<double>(r.z_loss);
    weight_total_ += static_cast<double>(r.weight);
    valid_total_ += r.tokens;
    if constexpr (is_one_barrier)
      if (on_last_) {
        vocab::scale_rows(acc_view(), std::span<const acc_type>(s.g));
        store(dx);
      }
  }

  // T_k. dx (naive, two_barrier, on the last stage's ranks): B(last, k)'s output gradient.
  template <comm::communicator C>
  void output_gradient(C& comm, const pass_info&, int slot_index, std::span<T> dx) {
    slot& s = slots_[static_cast<std::size_t>(slot_index)];
    if (!s.layer) fail("pipit::runtime::vocab_layers: T pass before its S pass");
    if constexpr (is_one_barrier) {
      s.layer->t_pass(s.g, head_grad_);
    } else {
      s.layer->t_pass(s.g, head_grad_, acc_view());
      sum_to_stage(comm, std::span<acc_type>(acc_), last_rank_);
      if (on_last_) store(dx);
    }
  }

  // IB_k. grad: F(0, k)'s input gradient on the first stage's ranks (tensor rank 0's is
  // broadcast in place), empty elsewhere.
  template <comm::communicator C>
  void embed_backward(C& comm, const pass_info& info, std::span<T> grad) {
    const std::span<T> buf = on_first_ ? checked(grad, "IB input") : scratch();
    comm.broadcast(buf, root(first_rank_));
    vocab::embedding_backward_local<T, acc_type>(shards_, rank_, tokens_of(info.microbatch),
                                                 const_view(buf), embedding_grad_);
  }

 private:
  struct slot {
    std::vector<T> x;         // X_k (tokens x hidden)
    std::vector<acc_type> g;  // the per-token loss-gradient scale
    std::optional<layer_type> layer;
  };

  // Tensor rank 0 of pipeline rank p, in the vocabulary group.
  int root(int pipeline_rank) const noexcept { return pipeline_rank * replicas_; }
  // Sums `data` over the vocabulary group for the t ranks of `pipeline_rank`: with t = 1 a reduce
  // to that rank (the pipeline-only traffic), else an all-reduce, which gives every tensor rank
  // of the stage the same bits (communicator.hpp).
  template <comm::communicator C, class E>
  void sum_to_stage(C& comm, std::span<E> data, int pipeline_rank) {
    if (replicas_ == 1)
      comm.reduce(data, std::plus<>{}, root(pipeline_rank));
    else
      comm.all_reduce(data, std::plus<>{});
  }

  static std::span<acc_type> flat(vocab::matrix_view<acc_type> m, const char* what) {
    if (m.ld() != m.cols)
      fail("pipit::runtime::vocab_layers: ", what,
           " must be contiguous to be reduced over a data-parallel group");
    return {m.data, static_cast<std::size_t>(m.rows * m.cols)};
  }
  std::span<T> checked(std::span<T> s, const char* what) const {
    if (s.size() != embedding_size())
      fail("pipit::runtime::vocab_layers: the ", what, " has ", s.size(), " elements, expected ",
           embedding_size(), " (tokens x hidden)");
    return s;
  }
  std::span<T> scratch() { return std::span<T>(scratch_); }
  vocab::matrix_view<T> view(std::span<T> s) const { return {s.data(), tokens_, hidden_}; }
  vocab::matrix_view<const T> const_view(std::span<const T> s) const {
    return {s.data(), tokens_, hidden_};
  }
  vocab::matrix_view<acc_type> acc_view() { return {acc_.data(), tokens_, hidden_}; }
  // dX (in acc_) into the arena's output-gradient buffer.
  void store(std::span<T> dx) {
    checked(dx, "output gradient");
    std::transform(acc_.begin(), acc_.end(), dx.begin(),
                   [](acc_type v) { return static_cast<T>(v); });
  }
  std::span<const std::int64_t> tokens_of(int mb) const {
    return batch_tokens_.subspan(static_cast<std::size_t>(mb) * static_cast<std::size_t>(tokens_),
                                 static_cast<std::size_t>(tokens_));
  }
  std::span<const std::int64_t> targets_of(int mb) const {
    return batch_targets_.subspan(static_cast<std::size_t>(mb) * static_cast<std::size_t>(tokens_),
                                  static_cast<std::size_t>(tokens_));
  }
  std::span<const acc_type> weights_of(int mb) const {
    if (batch_weights_.empty()) return {};
    return batch_weights_.subspan(static_cast<std::size_t>(mb) * static_cast<std::size_t>(tokens_),
                                  static_cast<std::size_t>(tokens_));
  }

  vocab::vocab_shards shards_;
  int rank_;
  std::int64_t tokens_;
  std::int64_t hidden_;
  vocab::matrix_view<const T> embedding_;
  vocab::matrix_view<acc_type> embedding_grad_;
  vocab::matrix_view<const T> head_;
  vocab::matrix_view<acc_type> head_grad_;
  vocab_layers_options options_;
  vocab::loss_options layer_options_;
  int microbatches_ = 0, first_rank_ = 0, last_rank_ = 0, replicas_ = 1;
  bool on_first_ = false, on_last_ = false;  // this shard's pipeline rank runs that stage
  std::vector<slot> slots_;
  std::vector<T> scratch_;     // IF partial / IB gradient on the ranks outside that stage
  std::vector<acc_type> acc_;  // one_barrier's A / the input-gradient partial
  std::span<const std::int64_t> batch_tokens_, batch_targets_;
  std::span<const acc_type> batch_weights_;
  std::vector<double> losses_;
  double z_total_ = 0, weight_total_ = 0;
  std::int64_t valid_total_ = 0;
  vocab::loss_result<acc_type> result_{};
};

// Detects vocab_layers (the executor's optional third argument).
template <class V>
struct is_vocab_layers : std::false_type {};
template <vocab::output_algorithm A, class T, std::size_t C>
struct is_vocab_layers<vocab_layers<A, T, C>> : std::true_type {};

}  // namespace pipit::runtime
