#pragma once
// cuda::vocab_layers<Algorithm, T, Chunk>: the device counterpart of runtime::vocab_layers — the
// input embedding and the output layer (LM head + softmax cross-entropy) sharded over the
// vocabulary across the pipeline ranks, run by cuda::device_executor as the S, T, IF and IB
// passes of a vocabulary plan (Yeung et al., "Balancing Pipeline Parallelism with Vocabulary
// Parallelism", arXiv 2411.05288). Read runtime/vocab_layers.hpp first: same passes, same
// objective (mean over microbatches of each microbatch's loss, or their sum), same gradients
// (accumulated, +=, into fp32 shards' gradients; zero them between steps).
//
//   pipit::cuda::blas_handle blas;  // one per device
//   pipit::cuda::vocab_layers<pipit::vocab::two_barrier, float> vocab(
//       blas, compute, shards, rank, tokens, embedding, embedding_grad, head, head_grad);
//   pipit::cuda::device_executor ex(host, nccl, stage, vocab, plan, compute);
//   for (...) { vocab.set_batch(tokens, targets); ex.run(); /* optimizer on compute */ }
//   ex.synchronize();                // NCCL errors and timeouts surface here as pipit::error
//   float loss = vocab.loss().loss;  // a host wait, bounded by the communicator's timeout
//
// Device and streams. The shards and their gradients are the user's device memory (views that
// must outlive the layers). Every local kernel and GEMM runs on `compute` (the executor's compute
// stream); every collective runs on the pipeline communicator's stream, after
// comm.wait_for(compute). A collective's result is waited for (an event, never the host) only
// by the compute that needs it, so compute enqueued in between can overlap it — but the
// communication stream is in order, and every S and IB pass (and, one_barrier, the last rank's
// dX) makes compute wait for ALL of it (comm.signal(compute): its own broadcast and whatever was
// enqueued before), as does a transformer pass that needs a later exchange. So a collective
// overlaps the passes between its pass and the next such wait, not necessarily up to its
// consumer:
//   IF_k  gather (compute) -> reduce to the first stage's rank (comm). F(0, k) waits for it (the
//         executor's dependency analysis); the passes in between overlap it up to the next wait.
//   S_k   broadcast X_k from the last stage's rank (comm; s_pass waits) -> s_pass (compute) ->
//         statistics merge (comm). naive / two_barrier: T_k waits for the merge (an event), so
//         the passes the schedule puts between S_k and T_k overlap it — the paper's point — up to
//         the next S, IB or pass that waits for a later exchange, which waits for the merge too.
//         one_barrier: input_grad_partial needs the merged maxima, so it waits; then the reduce
//         of A to the last stage's rank overlaps the loss kernel (and, on the other ranks, the
//         passes after it up to the next wait).
//   T_k   loss (naive, two_barrier) and the weight gradient (compute); naive / two_barrier also
//         reduce the input-gradient partial to the last stage's rank (comm), which B(last, k)
//         waits for. For float T the reduce lands in the arena directly; for 16-bit T the cast
//         into the arena waits for it.
//   IB_k  broadcast F(0, k)'s input gradient (comm; the scatter-add waits) -> scatter-add into
//         embedding_grad (compute; deterministic, sorted_scatter).
// Scratch buffers shared by consecutive passes (the IF partial, the input-gradient accumulator)
// are guarded by events: a pass that overwrites one waits for the collective still reading it.
// The executor ends each step with the compute stream waiting for the communication stream.
//
// The batch: set_batch() takes HOST spans, checks them on the host (ids inside the vocabulary,
// targets inside it or the ignore index, finite non-negative weights: pipit::error at once, as
// the host layers do), copies them into pinned staging memory and from there, asynchronously on
// the compute stream, into device buffers; the spans may be reused as soon as it returns. Two
// staging buffers alternate: set_batch waits on the host only for the copy enqueued two calls
// earlier, i.e. only when the host runs two steps ahead of the device. The first call (and a
// call with a larger batch) allocates the buffers.
//
// The loss: each microbatch's loss is written on the device; end_step() combines them. loss()
// and microbatch_losses() wait on the host for the compute stream (the only host
// synchronisations of these layers), through the pipeline communicator's synchronize(stream):
// a compute stream stuck behind a collective of a dead peer raises pipit::error after
// nccl_options::timeout (the communicator is aborted) instead of hanging. Call
// device_executor::synchronize() first to have NCCL's errors reported by the executor.
// loss_device() is the device result, [objective, z-loss part, weight, valid tokens] in
// doubles, valid in compute-stream order after the step.
//
// T: float, __nv_bfloat16 or __half (the CUDA output layer's types); statistics, g and the
// gradients are float. Device memory: per S-to-T slot, X (tokens x hidden T), targets, g and one
// cuda::output_layer's workspace; plus tokens x hidden T (the IF / IB scratch) and floats (the
// input-gradient accumulator), and the batch. All allocated by prepare() and the first
// set_batch(), stream-ordered; later steps allocate nothing but the sorted scatter's and the
// statistics merge's stream-ordered temporaries.

#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/cuda/blas_handle.cuh"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/device_buffer.cuh"
#include "pipit/cuda/embedding.cuh"
#include "pipit/cuda/entry_check.cuh"
#include "pipit/cuda/gemm.cuh"
#include "pipit/cuda/launch.cuh"
#include "pipit/cuda/nccl_communicator.cuh"
#include "pipit/cuda/output_layer.cuh"
#include "pipit/cuda/output_layer_kernels.cuh"
#include "pipit/runtime/pass_info.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/vocab/algorithms.hpp"
#include "pipit/vocab/loss.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/shard_views.hpp"
#include "pipit/vocab/shards.hpp"
#include "pipit/vocab/softmax_stats.hpp"

namespace pipit::cuda {

struct vocab_layers_options {
  vocab::loss_options loss;          // per microbatch: ignore index, reduction, smoothing, z-loss
  bool average_microbatches = true;  // the objective: mean (true) or sum of microbatch losses
};

namespace detail_device_vocab {

template <class T>
__host__ __device__ inline T from_float(float v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(v);
  else
    return __float2half_rn(v);
}

// out[i] = T(in[i]).
template <class T>
__global__ void cast_from_float(const float* in, T* out, std::size_t n) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    out[i] = from_float<T>(in[i]);
}

// The step's result from the microbatches' [loss, z, weight, tokens]: sums, the losses scaled.
__global__ void combine_losses(const double* per_microbatch, int microbatches, double scale,
                               double* out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double r[4] = {0, 0, 0, 0};
  for (int k = 0; k < microbatches; ++k)
    for (int j = 0; j < 4; ++j) r[j] += per_microbatch[4 * k + j];
  out[0] = r[0] * scale;
  out[1] = r[1] * scale;
  out[2] = r[2];
  out[3] = r[3];
}

// Page-locked host memory (cudaMallocHost), so that the batch's copy is truly asynchronous.
class pinned_bytes {
 public:
  pinned_bytes() = default;
  explicit pinned_bytes(std::size_t n) : n_(n) {
    if (n_ > 0) PIPIT_CUDA_CHECK(cudaMallocHost(&p_, n_));
  }
  pinned_bytes(pinned_bytes&& o) noexcept : p_(o.p_), n_(o.n_) {
    o.p_ = nullptr;
    o.n_ = 0;
  }
  pinned_bytes& operator=(pinned_bytes&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  pinned_bytes(const pinned_bytes&) = delete;
  pinned_bytes& operator=(const pinned_bytes&) = delete;
  ~pinned_bytes() {
    if (p_) (void)cudaFreeHost(p_);
  }
  unsigned char* data() const noexcept { return static_cast<unsigned char*>(p_); }
  std::size_t size() const noexcept { return n_; }

 private:
  void* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace detail_device_vocab

// The plan's vocabulary passes that an output-layer algorithm runs.
template <vocab::output_algorithm A>
inline constexpr schedule::vocab_passes vocab_passes_of =
    std::is_same_v<A, vocab::one_barrier>   ? schedule::vocab_passes::one_barrier
    : std::is_same_v<A, vocab::two_barrier> ? schedule::vocab_passes::two_barrier
                                            : schedule::vocab_passes::naive;

template <vocab::output_algorithm Algorithm, gemm_input T, std::size_t Chunk = default_chunk>
class vocab_layers {
  static constexpr bool is_one_barrier = std::is_same_v<Algorithm, vocab::one_barrier>;
  static constexpr bool is_naive = std::is_same_v<Algorithm, vocab::naive>;
  static constexpr bool float_values = std::is_same_v<T, float>;
  static constexpr int block = default_block;

 public:
  using value_type = T;
  using acc_type = float;
  using algorithm = Algorithm;
  using layer_type = output_layer<Algorithm, T, Chunk>;
  static constexpr schedule::vocab_passes passes = vocab_passes_of<Algorithm>;

  // blas: a handle on this device (it must outlive the layers); compute: the executor's compute
  // stream; shards, rank, tokens (per microbatch): as runtime::vocab_layers. embedding and head:
  // this rank's shards (shard_size() x hidden, device; padding rows never read); their fp32
  // gradients (device) are accumulated in place. Checked here, without a device call.
  vocab_layers(const blas_handle& blas, cudaStream_t compute, const vocab::vocab_shards& shards,
               int rank, std::int64_t tokens, vocab::matrix_view<const T> embedding,
               vocab::matrix_view<float> embedding_grad, vocab::matrix_view<const T> head,
               vocab::matrix_view<float> head_grad, vocab_layers_options options = {})
      : blas_(&blas),
        compute_(compute),
        shards_(shards),
        rank_(rank),
        tokens_(tokens),
        hidden_(head.cols),
        embedding_(embedding),
        embedding_grad_(embedding_grad),
        head_(head),
        head_grad_(head_grad),
        options_(options) {
    vocab::check_shard_views("pipit::cuda::vocab_layers", shards, rank, tokens, embedding,
                             embedding_grad, head, head_grad);
    (void)row_blocks(tokens);
    vocab::check_loss_inputs<float>(shards, {}, options.loss, {});
  }

  vocab_layers(const vocab_layers&) = delete;
  vocab_layers& operator=(const vocab_layers&) = delete;
  ~vocab_layers() {
    // The staging buffers may still feed an enqueued copy; the device buffers are freed in
    // compute-stream order (the executor made compute wait for the communication stream).
    for (cudaEvent_t e : staged_)
      if (e) (void)cudaEventSynchronize(e);
    for (cudaEvent_t e : staged_)
      if (e) (void)cudaEventDestroy(e);
    for (cudaEvent_t e : {scratch_free_, acc_free_})
      if (e) (void)cudaEventDestroy(e);
    for (slot& s : slots_)
      if (s.merged) (void)cudaEventDestroy(s.merged);
  }

  int rank() const noexcept { return rank_; }
  const vocab::vocab_shards& shards() const noexcept { return shards_; }
  std::int64_t tokens() const noexcept { return tokens_; }
  std::int64_t hidden() const noexcept { return hidden_; }
  cudaStream_t stream() const noexcept { return compute_; }
  // Elements of the first stage's input and of the last stage's output: tokens x hidden.
  std::size_t embedding_size() const noexcept {
    return static_cast<std::size_t>(tokens_) * static_cast<std::size_t>(hidden_);
  }

  // The step's token ids and targets (host memory), microbatch after microbatch (microbatches x
  // tokens each), the same on every rank; loss_weights: empty, or one weight per target. Checked
  // on the host, then copied asynchronously on the compute stream (see the header comment).
  void set_batch(std::span<const std::int64_t> tokens, std::span<const std::int64_t> targets,
                 std::span<const float> loss_weights = {}) {
    if (tokens.empty() || tokens.size() != targets.size() ||
        tokens.size() % static_cast<std::size_t>(tokens_) != 0)
      fail("pipit::cuda::vocab_layers::set_batch: ", tokens.size(), " token ids and ",
           targets.size(), " targets; both must be microbatches x ", tokens_,
           " with at least one microbatch");
    for (const std::int64_t x : tokens) shards_.check_token(x);
    vocab::check_loss_inputs<float>(shards_, targets, options_.loss, loss_weights);
    const std::size_t n = tokens.size();
    const std::size_t ids = n * sizeof(std::int64_t), weights = n * sizeof(float);
    if (batch_ids_.size() < 2 * n) {
      batch_ids_ = device_buffer<std::int64_t>(2 * n, compute_);
      batch_weights_ = device_buffer<float>(n, compute_);
      for (std::size_t i = 0; i < 2; ++i) {
        if (staged_[i]) PIPIT_CUDA_CHECK(cudaEventSynchronize(staged_[i]));
        staging_[i] = detail_device_vocab::pinned_bytes(2 * ids + weights);
        if (!staged_[i])
          PIPIT_CUDA_CHECK(cudaEventCreateWithFlags(&staged_[i], cudaEventDisableTiming));
      }
    }
    const std::size_t i = next_staging_;
    next_staging_ ^= 1;
    PIPIT_CUDA_CHECK(cudaEventSynchronize(staged_[i]));  // its copy two calls ago is done
    unsigned char* h = staging_[i].data();
    std::memcpy(h, tokens.data(), ids);
    std::memcpy(h + ids, targets.data(), ids);
    if (!loss_weights.empty()) std::memcpy(h + 2 * ids, loss_weights.data(), weights);
    PIPIT_CUDA_CHECK(
        cudaMemcpyAsync(batch_ids_.data(), h, 2 * ids, cudaMemcpyHostToDevice, compute_));
    if (!loss_weights.empty())
      PIPIT_CUDA_CHECK(cudaMemcpyAsync(batch_weights_.data(), h + 2 * ids, weights,
                                       cudaMemcpyHostToDevice, compute_));
    PIPIT_CUDA_CHECK(cudaEventRecord(staged_[i], compute_));
    batch_size_ = n;
    has_weights_ = !loss_weights.empty();
  }

  // After a run(): the objective (mean or sum over microbatches), its z-loss part, and the weight
  // and count of the valid tokens over the step. Waits for the compute stream, at most the
  // communicator's timeout (see the header comment).
  vocab::loss_result<float> loss() const {
    const std::array<double, 4> h = read_back<4>(result_.data());
    return {static_cast<float>(h[0]), static_cast<float>(h[1]), static_cast<float>(h[2]),
            static_cast<std::int64_t>(h[3])};
  }
  // After a run(): each microbatch's loss (reduced over its tokens). Waits as loss() does.
  std::vector<double> microbatch_losses() const {
    if (comm_ == nullptr)
      fail("pipit::cuda::vocab_layers: microbatch_losses() before the executor prepared it");
    std::vector<double> all(4 * static_cast<std::size_t>(microbatches_)), out;
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(all.data(), losses_.data(), all.size() * sizeof(double),
                                     cudaMemcpyDeviceToHost, compute_));
    comm_->synchronize(compute_, "vocab_layers::microbatch_losses");
    for (std::size_t k = 0; k < all.size(); k += 4) out.push_back(all[k]);
    return out;
  }
  // The step's result on the device: [objective, z-loss part, weight, valid tokens] (doubles),
  // written on the compute stream by the step's end.
  const double* loss_device() const noexcept { return result_.data(); }

  // The fp32 gradients this rank holds (for the data-parallel reduction), device memory.
  std::array<std::span<float>, 2> gradients() const {
    return {flat(embedding_grad_, "the embedding gradient"),
            flat(head_grad_, "the output-layer gradient")};
  }

  // Device bytes allocated so far (slots, scratch, accumulator, batch, results), shards excluded.
  std::size_t workspace_bytes() const noexcept {
    std::size_t n = scratch_.bytes() + acc_.bytes() + batch_ids_.bytes() + batch_weights_.bytes() +
                    losses_.bytes() + result_.bytes();
    for (const slot& s : slots_) {
      n += s.x.bytes() + s.targets.bytes() + s.g.bytes();
      if (s.layer) n += s.layer->workspace_bytes();
    }
    return n;
  }

  // ---- called by the executor ----------------------------------------------------------------
  // Once, at the executor's construction (before the start-up agreement, which reports an
  // allocation failure on every rank): the pipeline communicator (its timeout bounds loss()'s
  // wait), the plan's microbatches, the S-to-T states in flight on this rank, the ranks of the
  // first and last virtual stages. Allocates every state on the compute stream.
  void prepare(nccl_communicator& comm, int microbatches, int slots, int first_rank,
               int last_rank) {
    if (microbatches <= 0 || slots <= 0)
      fail("pipit::cuda::vocab_layers: ", microbatches, " microbatches, ", slots, " slots");
    comm_ = nullptr;  // set last: loss() is usable only once everything is allocated
    microbatches_ = microbatches;
    first_rank_ = first_rank;
    last_rank_ = last_rank;
    layer_options_ = options_.loss;
    if (options_.average_microbatches) layer_options_.grad_output /= microbatches;
    const std::size_t n = static_cast<std::size_t>(tokens_), e = embedding_size();
    for (slot& s : slots_)
      if (s.merged) (void)cudaEventDestroy(s.merged);
    slots_.clear();
    slots_ = std::vector<slot>(static_cast<std::size_t>(slots));
    for (slot& s : slots_) {
      s.x = device_buffer<T>(e, compute_);
      s.x.zero();
      s.targets = device_buffer<std::int64_t>(n, compute_);
      s.g = device_buffer<float>(n, compute_);
      s.layer.emplace(*blas_, compute_, shards_, rank_,
                      vocab::matrix_view<const T>{s.x.data(), tokens_, hidden_}, head_,
                      std::span<const std::int64_t>(s.targets.data(), n), layer_options_);
      PIPIT_CUDA_CHECK(cudaEventCreateWithFlags(&s.merged, cudaEventDisableTiming));
    }
    scratch_ = device_buffer<T>(e, compute_);
    acc_ = device_buffer<float>(e, compute_);
    losses_ = device_buffer<double>(4 * static_cast<std::size_t>(microbatches), compute_);
    losses_.zero();
    result_ = device_buffer<double>(4, compute_);
    result_.zero();
    ids_check_ = entry_check(compute_);
    weight_check_ = entry_check(compute_);
    for (cudaEvent_t* ev : {&scratch_free_, &acc_free_})
      if (!*ev) PIPIT_CUDA_CHECK(cudaEventCreateWithFlags(ev, cudaEventDisableTiming));
    comm_ = &comm;
  }

  // Before the step's first pass: the batch must cover every microbatch.
  void begin_step() {
    const std::size_t need =
        static_cast<std::size_t>(microbatches_) * static_cast<std::size_t>(tokens_);
    if (batch_size_ != need)
      fail("pipit::cuda::vocab_layers: set_batch() gave ", batch_size_, " token ids; the plan's ",
           microbatches_, " microbatches of ", tokens_, " tokens need ", need);
  }
  // After the step's last pass: the step's result, on the compute stream.
  void end_step() {
    const double scale = options_.average_microbatches ? 1.0 / microbatches_ : 1.0;
    detail_device_vocab::combine_losses<<<1, 1, 0, compute_>>>(losses_.data(), microbatches_, scale,
                                                               result_.data());
    PIPIT_CUDA_CHECK(cudaGetLastError());
  }

  // IF_k. out: F(0, k)'s input on the first stage's rank, empty on the others. The reduce is
  // left in flight: the executor makes F(0, k) wait for it.
  void embed_forward(nccl_communicator& comm, const runtime::pass_info& info, std::span<T> out) {
    const bool root = rank_ == first_rank_;
    const std::span<T> buf = root ? checked(out, "IF output") : scratch_.span();
    if (!root) wait(scratch_free_);  // the previous IF's reduce may still read the scratch
    embedding_forward_local<128, T, T>(shards_, rank_, embedding_, tokens_of(info.microbatch),
                                       view(buf), compute_, ids_check_);
    comm.wait_for(compute_);
    comm.reduce_async(buf, std::plus<>{}, first_rank_);
    if (!root) PIPIT_CUDA_CHECK(cudaEventRecord(scratch_free_, comm.stream()));
  }

  // S_k. x: F(last, k)'s output on the last stage's rank (empty elsewhere); dx (one_barrier, on
  // the last stage's rank): B(last, k)'s output gradient.
  void output_statistics(nccl_communicator& comm, const runtime::pass_info& info, int slot_index,
                         std::span<const T> x, std::span<T> dx) {
    slot& s = slot_at(slot_index);
    const bool last = rank_ == last_rank_;
    if (last) {
      if (x.size() != embedding_size())
        fail("pipit::cuda::vocab_layers: the last stage's output has ", x.size(),
             " elements, expected ", embedding_size(), " (tokens x hidden)");
      PIPIT_CUDA_CHECK(
          cudaMemcpyAsync(s.x.data(), x.data(), s.x.bytes(), cudaMemcpyDeviceToDevice, compute_));
    }
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(s.targets.data(), targets_of(info.microbatch).data(),
                                     s.targets.bytes(), cudaMemcpyDeviceToDevice, compute_));
    comm.wait_for(compute_);
    comm.broadcast_async(s.x.span(), last_rank_);
    comm.signal(compute_);  // the S pass reads X
    layer_type& layer = *s.layer;
    if constexpr (is_one_barrier) {
      // On the last rank with float values A accumulates in dx itself (no copy afterwards).
      const bool in_place = float_values && last;
      const vocab::matrix_view<float> a = in_place ? float_view(dx) : acc_view();
      if (!in_place) wait(acc_free_);  // an earlier reduce may still read the accumulator
      layer.s_pass(a);
      comm.wait_for(compute_);
      comm.all_reduce_async(layer.stats(), vocab::merge_op{});
      comm.signal(compute_);  // input_grad_partial needs the merged maxima
      layer.input_grad_partial(a);
      comm.wait_for(compute_);
      comm.reduce_async(flat(a, "the accumulator"), std::plus<>{}, last_rank_);
      if (!in_place) PIPIT_CUDA_CHECK(cudaEventRecord(acc_free_, comm.stream()));
      enqueue_loss(s, info.microbatch);  // overlaps the reduce
      if (last) {
        comm.signal(compute_);  // dX = g (.) D needs the reduced D
        scale_rows<block>(a, std::span<const float>(s.g.span()), compute_);
        if (!in_place) store(dx);
      }
    } else {
      layer.s_pass();
      if constexpr (is_naive) {
        comm.wait_for(compute_);
        comm.all_reduce_async(layer.naive_max(), comm::max_op{});
        comm.all_reduce_async(layer.naive_target_sums(), std::plus<>{});
        comm.signal(compute_);  // the sums of exp(z - global max) need the global maxima
        const std::span<float> sums = layer.naive_sum_exp();
        comm.wait_for(compute_);
        comm.all_reduce_async(sums, std::plus<>{});
      } else {
        comm.wait_for(compute_);
        comm.all_reduce_async(layer.stats(), vocab::merge_op{});
      }
      // Left in flight: T_k waits for it (an event), so the passes after S_k overlap it until
      // T_k or the next pass that waits for the whole communication stream (S, IB, a later
      // exchange's consumer), whichever comes first.
      PIPIT_CUDA_CHECK(cudaEventRecord(s.merged, comm.stream()));
    }
  }

  // T_k. dx (naive, two_barrier, on the last stage's rank): B(last, k)'s output gradient. Its
  // reduce is left in flight (float values): the executor makes B(last, k) wait for it.
  void output_gradient(nccl_communicator& comm, const runtime::pass_info& info, int slot_index,
                       std::span<T> dx) {
    slot& s = slot_at(slot_index);
    layer_type& layer = *s.layer;
    if constexpr (is_one_barrier) {
      (void)comm;
      (void)info;
      (void)dx;
      layer.t_pass(std::span<const float>(s.g.span()), head_grad_);
    } else {
      wait(s.merged);
      if constexpr (is_naive) layer.naive_combine();
      enqueue_loss(s, info.microbatch);
      const bool last = rank_ == last_rank_;
      const bool in_place = float_values && last;
      const vocab::matrix_view<float> gx = in_place ? float_view(dx) : acc_view();
      if (!in_place) wait(acc_free_);
      layer.t_pass(std::span<const float>(s.g.span()), head_grad_, gx);
      comm.wait_for(compute_);
      comm.reduce_async(flat(gx, "the input gradient"), std::plus<>{}, last_rank_);
      if (!in_place) PIPIT_CUDA_CHECK(cudaEventRecord(acc_free_, comm.stream()));
      if (last && !in_place) {
        comm.signal(compute_);  // the cast into the arena needs the reduced dX
        store(dx);
      }
    }
  }

  // IB_k. grad: F(0, k)'s input gradient on the first stage's rank (broadcast in place), empty
  // elsewhere.
  void embed_backward(nccl_communicator& comm, const runtime::pass_info& info, std::span<T> grad) {
    const std::span<T> buf = rank_ == first_rank_ ? checked(grad, "IB input") : scratch_.span();
    comm.wait_for(compute_);
    comm.broadcast_async(buf, first_rank_);
    comm.signal(compute_);  // the scatter-add reads the broadcast gradient
    embedding_backward_local<sorted_scatter, 128, T, float>(
        shards_, rank_, tokens_of(info.microbatch),
        vocab::matrix_view<const T>{buf.data(), tokens_, hidden_}, embedding_grad_, compute_,
        ids_check_);
  }

 private:
  struct slot {
    device_buffer<T> x;                   // X_k (tokens x hidden)
    device_buffer<std::int64_t> targets;  // microbatch k's targets
    device_buffer<float> g;               // the per-token loss-gradient scale
    std::optional<layer_type> layer;      // bound to x and targets once
    cudaEvent_t merged = nullptr;         // naive, two_barrier: the statistics are merged
  };

  slot& slot_at(int i) {
    if (i < 0 || static_cast<std::size_t>(i) >= slots_.size())
      fail("pipit::cuda::vocab_layers: state ", i, " of ", slots_.size(),
           " (prepare() not called, or a program for another plan)");
    return slots_[static_cast<std::size_t>(i)];
  }

  // The microbatch's loss and g from merged statistics, into losses_[4 k ...] (device).
  void enqueue_loss(slot& s, int mb) {
    const std::span<const float> w = weights_of(mb);
    detail_vocab::loss_kernel<block><<<1, block, 0, compute_>>>(
        s.layer->stats().data(), s.targets.data(), w.empty() ? nullptr : w.data(), tokens_,
        shards_.vocab_size(), layer_options_.ignore_index,
        layer_options_.params<float>(shards_.vocab_size()),
        layer_options_.reduce == vocab::reduction::mean, layer_options_.grad_output, s.g.data(),
        losses_.data() + 4 * static_cast<std::size_t>(mb), weight_check_.ref());
    PIPIT_CUDA_CHECK(cudaGetLastError());
  }

  void wait(cudaEvent_t e) { PIPIT_CUDA_CHECK(cudaStreamWaitEvent(compute_, e, 0)); }

  template <std::size_t N>
  std::array<double, N> read_back(const double* d) const {
    std::array<double, N> h{};
    if (d == nullptr || comm_ == nullptr)
      fail("pipit::cuda::vocab_layers: loss() before the executor prepared it");
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(h.data(), d, sizeof h, cudaMemcpyDeviceToHost, compute_));
    comm_->synchronize(compute_, "vocab_layers::loss");
    return h;
  }

  static std::span<float> flat(vocab::matrix_view<float> m, const char* what) {
    if (m.ld() != m.cols)
      fail("pipit::cuda::vocab_layers: ", what,
           " must be contiguous to be reduced over a communicator");
    return {m.data, static_cast<std::size_t>(m.rows * m.cols)};
  }
  std::span<T> checked(std::span<T> s, const char* what) const {
    if (s.size() != embedding_size())
      fail("pipit::cuda::vocab_layers: the ", what, " has ", s.size(), " elements, expected ",
           embedding_size(), " (tokens x hidden)");
    return s;
  }
  vocab::matrix_view<T> view(std::span<T> s) const { return {s.data(), tokens_, hidden_}; }
  vocab::matrix_view<float> acc_view() { return {acc_.data(), tokens_, hidden_}; }
  // dx as fp32 (float values only: the arena is float).
  vocab::matrix_view<float> float_view(std::span<T> dx) const {
    checked(dx, "output gradient");
    if constexpr (float_values)
      return {dx.data(), tokens_, hidden_};
    else
      return {};
  }
  // dX (in acc_) into the arena's output-gradient buffer, cast to T.
  void store(std::span<T> dx) {
    checked(dx, "output gradient");
    const std::size_t n = embedding_size();
    detail_device_vocab::cast_from_float<T>
        <<<stride_blocks<block>(static_cast<std::int64_t>(n)), block, 0, compute_>>>(acc_.data(),
                                                                                     dx.data(), n);
    PIPIT_CUDA_CHECK(cudaGetLastError());
  }
  std::span<const std::int64_t> tokens_of(int mb) const {
    return {batch_ids_.data() + static_cast<std::size_t>(mb) * static_cast<std::size_t>(tokens_),
            static_cast<std::size_t>(tokens_)};
  }
  std::span<const std::int64_t> targets_of(int mb) const {
    return {batch_ids_.data() + batch_size_ +
                static_cast<std::size_t>(mb) * static_cast<std::size_t>(tokens_),
            static_cast<std::size_t>(tokens_)};
  }
  std::span<const float> weights_of(int mb) const {
    if (!has_weights_) return {};
    return {
        batch_weights_.data() + static_cast<std::size_t>(mb) * static_cast<std::size_t>(tokens_),
        static_cast<std::size_t>(tokens_)};
  }

  const blas_handle* blas_;
  cudaStream_t compute_;
  vocab::vocab_shards shards_;
  int rank_;
  std::int64_t tokens_;
  std::int64_t hidden_;
  vocab::matrix_view<const T> embedding_;
  vocab::matrix_view<float> embedding_grad_;
  vocab::matrix_view<const T> head_;
  vocab::matrix_view<float> head_grad_;
  vocab_layers_options options_;
  vocab::loss_options layer_options_;
  int microbatches_ = 0, first_rank_ = 0, last_rank_ = 0;
  nccl_communicator* comm_ = nullptr;  // the pipeline's, from prepare(): bounds loss()'s wait
  std::vector<slot> slots_;
  device_buffer<T> scratch_;      // IF partial / IB gradient on the ranks that are not the root
  device_buffer<float> acc_;      // one_barrier's A / the input-gradient partial
  device_buffer<double> losses_;  // [loss, z, weight, tokens] per microbatch
  device_buffer<double> result_;  // the step's
  entry_check ids_check_;         // the batch is checked on the host: never reported
  entry_check weight_check_;
  cudaEvent_t scratch_free_ = nullptr;  // after the last collective that reads scratch_
  cudaEvent_t acc_free_ = nullptr;      // after the last collective that reads acc_
  // The batch: [tokens | targets] ids, weights; pinned staging, alternating.
  device_buffer<std::int64_t> batch_ids_;
  device_buffer<float> batch_weights_;
  std::size_t batch_size_ = 0;
  bool has_weights_ = false;
  std::array<detail_device_vocab::pinned_bytes, 2> staging_;
  std::array<cudaEvent_t, 2> staged_{nullptr, nullptr};
  std::size_t next_staging_ = 0;
};

// Detects cuda::vocab_layers (the device executor's optional argument).
template <class V>
struct is_vocab_layers : std::false_type {};
template <vocab::output_algorithm A, class T, std::size_t C>
struct is_vocab_layers<vocab_layers<A, T, C>> : std::true_type {};

}  // namespace pipit::cuda
