#pragma once
// gpt_stage: one pipeline rank's share of the GPT, as a pipit::runtime stage (runtime/stage.hpp)
// with the split backward, so it runs every schedule (zb-h1, zb-v, v-half ... included).
//
// The rank holds one model chunk per virtual stage it runs (two under V placement), each a part
// of a pipit::partition: a run of transformer blocks, plus
//   - on virtual stage 0: the position embedding, and the token embedding when the partition
//     puts E on a stage (naive, balanced, layouts with E). The stage then takes no input
//     (input_size 0) and draws the microbatch's tokens itself from the data source. Under
//     vocabulary parallelism (partition.vocab_parallel) the token embedding is sharded and
//     applied by pipit; `input` is its output (tokens x hidden) and the stage adds the positions.
//   - on the last virtual stage: the final layer norm, and the LM head with the loss (lm_head)
//     when the partition puts L on a stage; the stage then has no output (output_size 0) and
//     computes the loss gradient itself. Under vocabulary parallelism its output is the final
//     hidden states (tokens x hidden, after the final norm) that pipit's sharded output layer
//     reads, and its backward receives their gradient as output_grad.
// Activations are hidden x tokens column-major (= tokens x hidden row-major).
//
// `saved` of a chunk holds, per microbatch: the embedding output (stage 0), every block's output
// and the gradient at every block boundary, every block's saved values (block_layout) and the
// head's (lm_head_layout), or the final norm's under vocabulary parallelism.
//
// Tensor parallelism: a stage made with a tensor_group of t > 1 ranks holds rank r's shards of
// its blocks (block.hpp); every rank of the group runs the same passes, and the blocks sum their
// partial results over the group inside them. Everything outside the blocks (embeddings, final
// norm, LM head) is replicated: each rank of the group computes it on the same values, so its
// gradients, and after the optimizer its values, stay bit-identical without communication.
//
// Scatter/gather between stages (Narayanan et al., arXiv 2104.04473, section 4.1): the t tensor
// ranks of a stage hold the same activation at a chunk boundary, so with
// stage_options::scatter_gather (and t > 1) a boundary between two transformer chunks carries
// only tensor rank r's slice (pipit::tp::slice_of: the r-th of t near-equal parts) to its peer,
// and the receiving chunk rebuilds the whole with an all-gather over its tensor group
// (tensor_group::all_gather). Both directions: the forward sends its output's slice and gathers
// its input into a scratch buffer (only the blocks' forward reads the whole input; a
// re-materialized forward gathers again, every tensor rank in lockstep); the backward gathers its
// output gradient and sends its input gradient's slice. A boundary whose neighbouring chunk is on
// the same rank (V placement's turn, several chunks on one rank) is a local hand-off with no
// message and stays whole: slicing it would only add two all-gathers.
// input_size / output_size of such a boundary are the slice's size, so the executor moves n / t
// elements instead of n. The vocabulary-parallel layers' input and output stay whole. Only data
// moves: the passes compute exactly what they compute without it.
//
// Data parallelism: replica r's microbatch j is the data source's microbatch r * m + j of the
// step (m = stage_options::microbatches), so d replicas of m microbatches draw exactly what one
// replica of d * m microbatches draws.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "block.hpp"
#include "config.hpp"
#include "data_source.hpp"
#include "embedding.hpp"
#include "layer_norm.hpp"
#include "lm_head.hpp"
#include "matrix.hpp"
#include "pipit/partition/partition.hpp"
#include "pipit/runtime/pass_info.hpp"
#include "pipit/tp/ring_collective.hpp"
#include "pipit/tp/stage_scatter_gather.hpp"
#include "tensor_group.hpp"

namespace gpt {

struct stage_options {
  int microbatches = 1;         // per step and replica: the loss is the mean over them
  std::uint64_t data_seed = 1;  // which microbatches the data source draws
  int replica = 0;  // data-parallel replica: draws the step's microbatches [r m, (r + 1) m)
  bool scatter_gather = true;  // slices between transformer chunks (only with t > 1)
};

template <class T>
class gpt_stage {
 public:
  using value_type = T;

  // `rank`: this rank's pipeline stage; `tp`: its tensor-parallel group (default: none).
  gpt_stage(const model_config& cfg, const pipit::partition::partition& part, int rank,
            const data_source& data, stage_options opt, tensor_group<T> tp = {})
      : cfg_(check(cfg)),
        data_(&data),
        opt_(opt),
        vocab_parallel_(part.vocab_parallel),
        tensor_size_(tp.size),
        tensor_rank_(tp.rank),
        scatter_gather_(opt.scatter_gather && tp.size > 1),
        tp_(tp) {
    check_tensor_parallel(cfg, tp.size);
    check_tensor_split(tp.size, tp.rank);
    pipit::partition::check(part);
    if (part.layer_count() != cfg.layers)
      pipit::fail("gpt::gpt_stage: the partition holds ", part.layer_count(),
                  " layers but the model has ", cfg.layers);
    if (data.vocab() != cfg.vocab)
      pipit::fail("gpt::gpt_stage: the data has vocabulary ", data.vocab(), " but the model ",
                  cfg.vocab);
    if (opt.microbatches < 1)
      pipit::fail("gpt::gpt_stage: microbatches must be >= 1 (got ", opt.microbatches, ")");
    if (opt.replica < 0)
      pipit::fail("gpt::gpt_stage: replica must be >= 0 (got ", opt.replica, ")");
    if (rank < 0 || rank >= part.pipe.ranks)
      pipit::fail("gpt::gpt_stage: rank ", rank, " is outside [0, ", part.pipe.ranks, ")");
    if (scatter_gather_ && !tp.gather)
      pipit::fail("gpt::gpt_stage: scatter/gather over a tensor group of ", tp.size,
                  " ranks needs its all-gather (tensor_group::gather)");
    const std::size_t dn = hidden_tokens(), n = static_cast<std::size_t>(cfg.tokens());
    const int last_stage = part.virtual_stages() - 1;
    const std::vector<int> mine = part.stages_of(rank);
    const auto local = [&mine](int s) {
      return std::find(mine.begin(), mine.end(), s) != mine.end();
    };
    for (const int s : mine) {
      const auto& st = part.stages[cu(s)];
      chunk ch;
      ch.stage = s;
      ch.first = s == 0;
      ch.last = s == last_stage;
      ch.embedding = st.embedding;
      ch.head = st.output;
      // Slices only between two transformer chunks on different ranks: the embedding's output,
      // the last stage's (the LM head's or the vocabulary layers' input) and local hand-offs stay
      // whole.
      ch.sliced_in = scatter_gather_ && !ch.first && !local(s - 1);
      ch.sliced_out = scatter_gather_ && !ch.last && !local(s + 1);
      ch.first_block = static_cast<int>(blocks_.size());
      ch.blocks = st.layers;
      for (int l = st.first_layer; l < st.first_layer + st.layers; ++l) {
        blocks_.push_back(std::make_unique<block<T>>(cfg, l, tp));
        block_layers_.push_back(l);
      }
      std::size_t at = 0;
      const auto take = [&at](std::size_t k) {
        const std::size_t o = at;
        at += k;
        return o;
      };
      if (ch.first) ch.x0 = take(dn);
      for (int k = 0; k < ch.blocks; ++k) ch.out.push_back(take(dn));
      for (int k = 0; k <= ch.blocks; ++k) ch.grad.push_back(take(dn));
      for (int k = 0; k < ch.blocks; ++k)
        ch.block_saved.push_back(take(blocks_[cu(ch.first_block + k)]->layout().size));
      if (ch.head) {
        head_ = std::make_unique<lm_head<T>>(cfg, opt.microbatches);
        ch.tail = take(head_->layout().size);
      } else if (ch.last) {  // the final norm's xhat and 1 / sigma
        final_norm_ = std::make_unique<layer_norm<T>>(cfg.hidden);
        ch.tail = take(dn + n);
      }
      ch.size = at;
      if (ch.first) positions_ = std::make_unique<position_embedding<T>>(cfg);
      if (ch.embedding) tokens_ = std::make_unique<token_embedding<T>>(cfg);
      chunks_.push_back(std::move(ch));
    }
    collect_parameters();
    batch_tokens_.resize(static_cast<std::size_t>(cfg.batch) *
                         (static_cast<std::size_t>(cfg.seq) + 1));
    ids_.resize(n);
    if (std::any_of(chunks_.begin(), chunks_.end(), [](const chunk& c) { return c.sliced_in; }))
      gathered_.resize(dn);
  }

  // ---- the pipit::runtime stage -------------------------------------------------------------
  std::size_t input_size(int c) const {
    const chunk& ch = chunks_[cu(c)];
    if (ch.first && ch.embedding) return 0;
    return ch.sliced_in ? slice_size() : hidden_tokens();
  }
  std::size_t output_size(int c) const {
    const chunk& ch = chunks_[cu(c)];
    if (ch.last && ch.head) return 0;
    return ch.sliced_out ? slice_size() : hidden_tokens();
  }
  std::size_t activation_size(int c) const { return chunks_[cu(c)].size; }

  void forward(const pipit::runtime::pass_info& i, std::span<const T> in, std::span<T> out,
               std::span<T> saved) {
    const timer tm(busy_seconds_);
    const chunk& ch = chunks_[cu(i.chunk)];
    const Eigen::Index d = cfg_.hidden, n = cfg_.tokens();
    const T* cur = in.data();
    if (ch.first) {
      map<T> x0 = view(saved, ch.x0, d, n);
      if (ch.embedding) {
        load_ids(i, false);
        tokens_->forward(ids_, x0);
      } else {
        x0 = cmap<T>(in.data(), d, n);  // the sharded embedding's output
      }
      positions_->add(x0);
      cur = x0.data();
    } else if (ch.sliced_in) {
      cur = gather_into(std::span<T>(gathered_), in);
    }
    for (int k = 0; k < ch.blocks; ++k) {
      map<T> y = view(saved, ch.out[cu(k)], d, n);
      block_of(ch, k).forward(cmap<T>(cur, d, n), y, block_saved(ch, k, saved));
      cur = y.data();
    }
    if (ch.last && ch.head) {
      load_ids(i, true);
      const double loss = head_->forward(i.microbatch, cmap<T>(cur, d, n), ids_,
                                         saved.subspan(ch.tail), 1.0 / opt_.microbatches);
      if (!i.recompute) loss_sum_ += loss / opt_.microbatches;
    } else if (ch.last) {
      final_norm_->forward(cmap<T>(cur, d, n), map<T>(out.data(), d, n), view(saved, ch.tail, d, n),
                           view(saved, ch.tail + hidden_tokens(), 1, n));
    } else if (ch.sliced_out) {
      const auto mine = my_slice(std::span<const T>(cur, hidden_tokens()));
      std::copy(mine.begin(), mine.end(), out.begin());
    } else if (cur != out.data()) {
      std::copy_n(cur, hidden_tokens(), out.data());
    }
  }

  void backward_input(const pipit::runtime::pass_info& i, std::span<const T> in, std::span<T> saved,
                      std::span<const T> output_grad, std::span<T> input_grad) {
    (void)in;
    const timer tm(busy_seconds_);
    const chunk& ch = chunks_[cu(i.chunk)];
    top_gradient(i, ch, saved, output_grad, false);
    for (int k = ch.blocks - 1; k >= 0; --k)
      block_of(ch, k).backward_input(grad_at(ch, k + 1, std::span<const T>(saved)),
                                     block_saved(ch, k, saved), grad_at(ch, k, saved));
    send_input_grad(ch, saved, input_grad);
  }

  void backward_weight(const pipit::runtime::pass_info& i, std::span<const T> in,
                       std::span<const T> saved, std::span<const T> output_grad) {
    (void)in;
    const timer tm(busy_seconds_);
    const chunk& ch = chunks_[cu(i.chunk)];
    const Eigen::Index d = cfg_.hidden, n = cfg_.tokens();
    if (ch.last && ch.head)
      head_->backward_weight(i.microbatch, saved.subspan(ch.tail));
    else if (ch.last)
      final_norm_->backward_weight(cmap<T>(output_grad.data(), d, n), cview(saved, ch.tail, d, n));
    for (int k = ch.blocks - 1; k >= 0; --k)
      block_of(ch, k).backward_weight(grad_at(ch, k + 1, saved), block_saved(ch, k, saved));
    if (ch.first) embedding_weight(i, ch, saved);
  }

  // The combined backward: each layer's weight gradient right after its input gradient. It
  // agrees exactly with B then W, since W reads only what B saved (a test checks it).
  void backward(const pipit::runtime::pass_info& i, std::span<const T> in, std::span<T> saved,
                std::span<const T> output_grad, std::span<T> input_grad) {
    (void)in;
    const timer tm(busy_seconds_);
    const chunk& ch = chunks_[cu(i.chunk)];
    const std::span<const T> csaved(saved);
    top_gradient(i, ch, saved, output_grad, true);
    for (int k = ch.blocks - 1; k >= 0; --k) {
      block<T>& b = block_of(ch, k);
      b.backward_input(grad_at(ch, k + 1, csaved), block_saved(ch, k, saved),
                       grad_at(ch, k, saved));
      b.backward_weight(grad_at(ch, k + 1, csaved), block_saved(ch, k, csaved));
    }
    if (ch.first) embedding_weight(i, ch, csaved);
    send_input_grad(ch, saved, input_grad);
  }

  // Every gradient buffer (the data-parallel all-reduce).
  std::span<const std::span<T>> gradients() { return grads_; }
  // Every parameter with its gradient (the optimizer).
  std::span<const parameter<T>> parameters() const { return params_; }

  // ---- training bookkeeping -----------------------------------------------------------------
  // This step's loss, summed over the microbatches / microbatches (the last stage's rank only).
  double take_loss() {
    const double l = loss_sum_;
    loss_sum_ = 0;
    return l;
  }
  // Seconds spent inside the passes since construction.
  double busy_seconds() const noexcept { return busy_seconds_; }
  bool holds_loss() const noexcept { return head_ != nullptr; }
  bool vocab_parallel() const noexcept { return vocab_parallel_; }
  int tensor_size() const noexcept { return tensor_size_; }
  int tensor_rank() const noexcept { return tensor_rank_; }
  // Whether chunk boundaries between transformer chunks carry slices (scatter/gather is on).
  bool scatter_gather() const noexcept { return scatter_gather_; }
  std::size_t parameter_count() const {
    std::size_t k = 0;
    for (const auto& p : params_) k += p.value.size();
    return k;
  }
  // What this rank holds, e.g. "E t*2 | t*2 L" (chunks in chunk order).
  std::string describe() const {
    std::string s;
    for (const chunk& ch : chunks_) {
      pipit::partition::stage st{0, ch.blocks, ch.embedding, ch.head};
      s += (s.empty() ? "" : " | ") + pipit::partition::describe(st);
    }
    return s;
  }
  // The output layer's peak workspace (its logit chunks and statistics per microbatch).
  std::size_t peak_workspace_bytes() const { return head_ ? head_->peak_workspace_bytes() : 0; }

 private:
  struct chunk {
    int stage = 0, first_block = 0, blocks = 0;
    bool first = false, last = false, embedding = false, head = false;
    bool sliced_in = false, sliced_out = false;  // scatter/gather at the input / output boundary
    std::size_t x0 = 0;                          // offset in `saved`: the embedding output
    std::size_t tail = 0, size = 0;              // tail: the head's or the final norm's values
    std::vector<std::size_t> out, grad, block_saved;  // offsets in `saved`
  };
  struct timer {
    double& into;
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    explicit timer(double& t) : into(t) {}
    ~timer() {
      into += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
  };

  static std::size_t cu(int c) { return static_cast<std::size_t>(c); }
  std::size_t hidden_tokens() const noexcept {
    return static_cast<std::size_t>(cfg_.hidden) * static_cast<std::size_t>(cfg_.tokens());
  }
  block<T>& block_of(const chunk& ch, int k) { return *blocks_[cu(ch.first_block + k)]; }
  template <class U>
  std::span<U> block_saved(const chunk& ch, int k, std::span<U> saved) {
    return saved.subspan(ch.block_saved[cu(k)], block_of(ch, k).layout().size);
  }

  // The microbatch's input ids (targets == false) or target ids into ids_.
  void load_ids(const pipit::runtime::pass_info& i, bool targets) {
    data_->microbatch(cfg_, opt_.data_seed, i.step, 0,
                      opt_.replica * opt_.microbatches + i.microbatch, batch_tokens_);
    const auto s = static_cast<std::size_t>(cfg_.seq);
    for (std::size_t b = 0; b < static_cast<std::size_t>(cfg_.batch); ++b)
      std::copy_n(
          batch_tokens_.begin() + static_cast<std::ptrdiff_t>(b * (s + 1) + (targets ? 1 : 0)), s,
          ids_.begin() + static_cast<std::ptrdiff_t>(b * s));
  }

  map<T> grad_at(const chunk& ch, int k, std::span<T> saved) const {
    return view(saved, ch.grad[cu(k)], cfg_.hidden, cfg_.tokens());
  }
  cmap<T> grad_at(const chunk& ch, int k, std::span<const T> saved) const {
    return cview(saved, ch.grad[cu(k)], cfg_.hidden, cfg_.tokens());
  }

  // The gradient of the last block's output: from the loss (own head), through the final norm
  // from output_grad (vocabulary parallel), or output_grad itself. `weights`: also the head's or
  // the final norm's weight gradient (the combined backward).
  void top_gradient(const pipit::runtime::pass_info& i, const chunk& ch, std::span<T> saved,
                    std::span<const T> output_grad, bool weights) {
    const Eigen::Index d = cfg_.hidden, n = cfg_.tokens();
    map<T> top = grad_at(ch, ch.blocks, saved);
    if (ch.last && ch.head) {
      head_->backward_input(i.microbatch, saved.subspan(ch.tail), top);
      if (weights) head_->backward_weight(i.microbatch, std::span<const T>(saved).subspan(ch.tail));
    } else if (ch.last) {
      const cmap<T> dy(output_grad.data(), d, n);
      final_norm_->backward_input(dy, cview(saved, ch.tail, d, n),
                                  cview(saved, ch.tail + hidden_tokens(), 1, n), top);
      if (weights) final_norm_->backward_weight(dy, cview(saved, ch.tail, d, n));
    } else if (ch.sliced_out) {
      gather_into(std::span<T>(top.data(), hidden_tokens()), output_grad);
    } else {
      std::copy_n(output_grad.data(), hidden_tokens(), top.data());
    }
  }

  // Elements of this tensor rank's slice of a boundary activation.
  std::size_t slice_size() const {
    const auto rg = pipit::tp::row_block(static_cast<std::int64_t>(hidden_tokens()), tensor_size_,
                                         tensor_rank_);
    return static_cast<std::size_t>(rg.size());
  }
  template <class U>
  std::span<U> my_slice(std::span<U> whole) const {
    return pipit::tp::slice_of(whole, tensor_size_, tensor_rank_);
  }
  // This rank's slice `part` into its place in `whole`, then every rank's (the tensor group's
  // all-gather: every member calls it, in the same order of passes). Returns whole's data.
  const T* gather_into(std::span<T> whole, std::span<const T> part) {
    const std::span<T> mine = my_slice(whole);
    if (part.size() != mine.size())
      pipit::fail("gpt::gpt_stage: a slice of ", part.size(), " elements where tensor rank ",
                  tensor_rank_, " of ", tensor_size_, " holds ", mine.size());
    std::copy(part.begin(), part.end(), mine.begin());
    tp_.all_gather(whole);
    return whole.data();
  }
  // The chunk's input gradient to the previous stage: whole, or this rank's slice of it.
  void send_input_grad(const chunk& ch, std::span<const T> saved, std::span<T> input_grad) const {
    if (input_grad.empty()) return;
    const std::span<const T> dx = saved.subspan(ch.grad[0], hidden_tokens());
    const std::span<const T> part = ch.sliced_in ? my_slice(dx) : dx;
    std::copy(part.begin(), part.end(), input_grad.begin());
  }

  void embedding_weight(const pipit::runtime::pass_info& i, const chunk& ch,
                        std::span<const T> saved) {
    const cmap<T> dx0 = grad_at(ch, 0, saved);
    positions_->backward_weight(dx0);
    if (ch.embedding) {
      load_ids(i, false);
      tokens_->backward_weight(ids_, dx0);
    }
  }

  void collect_parameters() {
    int layer = -1;
    const auto add = [this, &layer](tensor_id id, auto& value, auto& grad,
                                    tensor_split split = tensor_split::replicated) {
      params_.push_back({std::span<T>(value.data(), static_cast<std::size_t>(value.size())),
                         std::span<T>(grad.data(), static_cast<std::size_t>(grad.size())),
                         tensor_key(layer, id), 0, split, static_cast<std::int64_t>(value.rows()),
                         tensor_rank_, tensor_size_});
    };
    if (tokens_) add(tensor_id::token_embedding, tokens_->e, tokens_->d_e);
    if (positions_) add(tensor_id::position_embedding, positions_->p, positions_->d_p);
    for (std::size_t k = 0; k < blocks_.size(); ++k) {
      layer = block_layers_[k];
      blocks_[k]->for_each_parameter(add);
    }
    layer = -1;
    if (final_norm_) {
      add(tensor_id::final_gamma, final_norm_->gamma, final_norm_->d_gamma);
      add(tensor_id::final_beta, final_norm_->beta, final_norm_->d_beta);
    }
    if (head_) head_->for_each_parameter(add);
    for (const auto& p : params_) grads_.push_back(p.grad);
  }

  model_config cfg_;
  const data_source* data_;
  stage_options opt_;
  bool vocab_parallel_;
  int tensor_size_, tensor_rank_;
  bool scatter_gather_;  // stage_options::scatter_gather with t > 1
  tensor_group<T> tp_;   // the all-gather of scatter/gather
  std::vector<chunk> chunks_;
  std::vector<std::unique_ptr<block<T>>> blocks_;
  std::vector<int> block_layers_;  // the model layer of each block
  std::unique_ptr<token_embedding<T>> tokens_;
  std::unique_ptr<position_embedding<T>> positions_;
  std::unique_ptr<lm_head<T>> head_;
  std::unique_ptr<layer_norm<T>> final_norm_;
  std::vector<parameter<T>> params_;
  std::vector<std::span<T>> grads_;
  std::vector<std::int32_t> batch_tokens_, ids_;
  std::vector<T> gathered_;  // a sliced input, gathered whole for the blocks' forward
  double loss_sum_ = 0, busy_seconds_ = 0;
};

}  // namespace gpt
