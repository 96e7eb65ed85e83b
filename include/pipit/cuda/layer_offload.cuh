#pragma once
// pipit::cuda::layer_offload<T>: Superpipeline's layer offload (Abbasi & Lim, arXiv 2410.08791)
// on a GPU — the device counterpart of runtime::layer_offload (runtime/layer_offload.hpp), with
// the same slot policy: k layers resident in device slots sized to the largest layer, k′ leaving
// together after they have computed, the next k′ of the pass copied into their slots ahead of
// compute; a pass ends with its last k layers resident.
//
// Where the host version has a copy thread and ready flags, this one has a copy stream and
// events: a copy into slot s waits (on the device) for the event recorded after the last kernel
// that read s; the compute stream waits for the event recorded after the copy. The host master
// copies are page-locked (cudaHostRegister) so the copies are asynchronous DMA that overlaps
// compute. In backward(), each slot also has a device gradient buffer (zeroed on the copy stream
// when a layer arrives) and a pinned staging buffer: a leaving layer's gradient is copied out on
// the copy stream and added into host_grads[l] by a host function enqueued on the same stream
// (cudaLaunchHostFunc), so gradients accumulate over microbatches exactly as on the host.
//
//   pipit::cuda::layer_offload<float> off(host_weights, {.resident = 4, .swap = 2});
//   off.forward(stream, [&](int l, const float* w, std::size_t n, cudaStream_t s) {
//     my_layer<<<grid, block, 0, s>>>(w, ...);                   // enqueue only
//   });
//   off.backward(stream, host_grads, [&](int l, const float* w, float* g, std::size_t n,
//                                        cudaStream_t s) { ... });  // returns with grads added
//
// The layer functions only enqueue work on the stream they are given; forward() returns without
// synchronising (the results are in stream order; synchronise `compute` before changing the host
// weights, whose copies may still be queued), backward() synchronises its copy stream before
// returning. link_bandwidth/link_latency of the options are for the host version and are ignored.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/stream.cuh"
#include "pipit/runtime/layer_offload.hpp"

namespace pipit::cuda {

template <class T>
class layer_offload {
 public:
  // device_capacity: the device memory this policy may use for weights and gradients (0: no
  // limit but the device's); a capacity below k slots (or 2k for training) is refused.
  layer_offload(std::vector<std::span<const T>> host_weights,
                const runtime::layer_offload_options& o, std::size_t device_capacity = 0)
      : host_(std::move(host_weights)), opts_(o), capacity_(device_capacity) {
    PIPIT_REQUIRE(opts_.resident >= 1, "cuda::layer_offload: resident layers k = ", opts_.resident,
                  "; at least 1 layer must fit on the device");
    PIPIT_REQUIRE(opts_.swap >= 1, "cuda::layer_offload: swapped layers k' = ", opts_.swap,
                  " must be >= 1");
    PIPIT_REQUIRE(
        opts_.swap <= opts_.resident, "cuda::layer_offload: swapped layers k' = ", opts_.swap,
        " > resident layers k = ", opts_.resident, " (only resident layers can be swapped out)");
    PIPIT_REQUIRE(!host_.empty(), "cuda::layer_offload: no layers");
    for (std::size_t l = 0; l < host_.size(); ++l) {
      PIPIT_REQUIRE(!host_[l].empty(), "cuda::layer_offload: layer ", l, " has no weights");
      max_elems_ = std::max(max_elems_, host_[l].size());
    }
    const std::size_t k = std::min<std::size_t>(std::size_t(opts_.resident), host_.size());
    require_room(k, "weights");
    copy_.emplace();  // after the checks: they must work without a device
    try {
      for (auto& h : host_) pin(h.data(), h.size_bytes());
      slots_.resize(k);
      for (auto& s : slots_) {
        PIPIT_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&s.weights), slot_bytes()));
        s.ready = std::make_unique<event>();
        s.done = std::make_unique<event>();
      }
    } catch (...) {
      release_all();
      throw;
    }
    where_.assign(host_.size(), -1);
  }

  layer_offload(const layer_offload&) = delete;
  layer_offload& operator=(const layer_offload&) = delete;

  ~layer_offload() { release_all(); }

  // f(layer, const T* weights, elements, cudaStream_t) for layer 0 .. L−1, enqueued on `compute`.
  template <class F>
  void forward(cudaStream_t compute, F&& f) {
    std::vector<int> order(host_.size());
    for (std::size_t l = 0; l < order.size(); ++l) order[l] = int(l);
    run(order, compute, false,
        [&](int l, const T* w, T*, std::size_t n, cudaStream_t s) { f(l, w, n, s); });
  }

  // g(layer, const T* weights, T* grad (zeroed), elements, cudaStream_t) for layer L−1 .. 0;
  // host_grads[l] += grad for every layer before it returns.
  template <class G>
  void backward(cudaStream_t compute, std::span<const std::span<T>> host_grads, G&& g) {
    PIPIT_REQUIRE(host_grads.size() == host_.size(), "cuda::layer_offload: ", host_grads.size(),
                  " gradient buffers for ", host_.size(), " layers");
    for (std::size_t l = 0; l < host_.size(); ++l)
      PIPIT_REQUIRE(host_grads[l].size() == host_[l].size(),
                    "cuda::layer_offload: gradient of layer ", l, " has ", host_grads[l].size(),
                    " elements, its weights ", host_[l].size());
    std::vector<int> order(host_.size());
    for (std::size_t l = 0; l < order.size(); ++l) order[l] = int(order.size() - 1 - l);
    grads_ = host_grads;
    run(order, compute, true, std::forward<G>(g));
    grads_ = {};
    invalidate();
  }

  // Forgets every resident copy (call after changing the host weights between two forwards).
  void invalidate() {
    for (auto& s : slots_) {
      if (s.layer >= 0) where_[std::size_t(s.layer)] = -1;
      s.layer = -1;
    }
  }

  int resident() const noexcept { return int(slots_.size()); }
  int swap() const noexcept { return std::min(opts_.swap, resident()); }
  std::size_t slot_bytes() const noexcept { return max_elems_ * sizeof(T); }
  bool is_resident(int layer) const { return where_.at(std::size_t(layer)) >= 0; }
  std::size_t h2d_transfers() const noexcept { return h2d_; }
  std::size_t d2h_transfers() const noexcept { return d2h_; }
  cudaStream_t copy_stream() const noexcept { return copy_->get(); }

 private:
  struct slot {
    int layer = -1;
    T* weights = nullptr;
    T* grads = nullptr;
    T* staging = nullptr;          // pinned host memory
    std::unique_ptr<event> ready;  // recorded on the copy stream after the copy in
    std::unique_ptr<event> done;   // recorded on the compute stream after the layer's work
  };
  struct accumulate_task {
    std::span<T> dst;
    const T* src;
  };

  void require_room(std::size_t k, const char* what) const {
    const std::size_t per = what[0] == 'g' ? 2 : 1;  // gradients come on top of the weights
    const std::size_t need = per * k * slot_bytes();
    if (capacity_ > 0 && need > capacity_)
      fail("cuda::layer_offload: device capacity too small for the ", what, " of k = ", k,
           " resident layers of up to ", slot_bytes(), " bytes: they need ", need,
           " bytes, the capacity is ", capacity_);
  }

  void pin(const T* p, std::size_t bytes) {
    const cudaError_t e = cudaHostRegister(const_cast<T*>(p), bytes, cudaHostRegisterDefault);
    if (e == cudaErrorHostMemoryAlreadyRegistered) {
      (void)cudaGetLastError();  // pinned by the caller already: fine
      return;
    }
    PIPIT_CUDA_CHECK(e);
    pinned_.push_back(const_cast<T*>(p));
  }

  void release_all() noexcept {
    if (!copy_) return;
    (void)cudaStreamSynchronize(copy_->get());
    for (auto& s : slots_) {
      if (s.weights != nullptr) (void)cudaFree(s.weights);
      s.weights = nullptr;
      free_gradients(s);
    }
    for (void* p : pinned_) (void)cudaHostUnregister(p);
    pinned_.clear();
  }

  void free_gradients(slot& s) noexcept {
    if (s.grads != nullptr) (void)cudaFree(s.grads);
    if (s.staging != nullptr) (void)cudaFreeHost(s.staging);
    s.grads = s.staging = nullptr;
  }

  void load(std::size_t s, int layer, bool grads) {
    auto& sl = slots_[s];
    const auto host = host_[std::size_t(layer)];
    sl.done->wait_on(copy_->get());  // the slot's previous layer has finished computing
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(sl.weights, host.data(), host.size_bytes(),
                                     cudaMemcpyHostToDevice, copy_->get()));
    if (grads) PIPIT_CUDA_CHECK(cudaMemsetAsync(sl.grads, 0, host.size_bytes(), copy_->get()));
    sl.ready->record(copy_->get());
    sl.layer = layer;
    where_[std::size_t(layer)] = int(s);
    ++h2d_;
  }

  static void CUDART_CB accumulate(void* p) {
    const auto* t = static_cast<const accumulate_task*>(p);
    for (std::size_t i = 0; i < t->dst.size(); ++i) t->dst[i] += t->src[i];
  }

  void gradient_out(std::size_t s) {
    auto& sl = slots_[s];
    const auto dst = grads_[std::size_t(sl.layer)];
    sl.done->wait_on(copy_->get());
    PIPIT_CUDA_CHECK(cudaMemcpyAsync(sl.staging, sl.grads, dst.size_bytes(), cudaMemcpyDeviceToHost,
                                     copy_->get()));
    tasks_.push_back(std::make_unique<accumulate_task>(accumulate_task{dst, sl.staging}));
    PIPIT_CUDA_CHECK(cudaLaunchHostFunc(copy_->get(), &accumulate, tasks_.back().get()));
    ++d2h_;
  }

  template <class F>
  void run(const std::vector<int>& order, cudaStream_t compute, bool grads, F&& f) {
    if (grads) require_room(slots_.size(), "gradients");
    try {
      if (grads)
        for (auto& s : slots_) {
          PIPIT_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&s.grads), slot_bytes()));
          PIPIT_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&s.staging), slot_bytes()));
        }
      run_pass(order, compute, grads, f);
    } catch (...) {
      (void)cudaStreamSynchronize(copy_->get());  // queued copies finish; their slots stay valid
      tasks_.clear();
      if (grads) {
        for (auto& s : slots_) free_gradients(s);
        grads_ = {};
        invalidate();
      }
      throw;
    }
    if (grads) {
      PIPIT_CUDA_CHECK(cudaStreamSynchronize(copy_->get()));
      tasks_.clear();
      for (auto& s : slots_) free_gradients(s);
    }
  }

  template <class F>
  void run_pass(const std::vector<int>& order, cudaStream_t compute, bool grads, F& f) {
    const std::size_t n = order.size(), k = slots_.size();
    const std::size_t g = std::min<std::size_t>(std::size_t(opts_.swap), k);
    std::size_t next = std::min(n, k);
    std::vector<std::size_t> free_slots;
    for (std::size_t s = 0; s < k; ++s) {
      const int l = slots_[s].layer;
      const bool wanted = l >= 0 && std::find(order.begin(), order.begin() + std::ptrdiff_t(next),
                                              l) != order.begin() + std::ptrdiff_t(next);
      if (!wanted) {
        if (l >= 0) where_[std::size_t(l)] = -1;
        slots_[s].layer = -1;
        free_slots.push_back(s);
      } else if (grads) {  // kept from the forward: its gradient starts at zero too
        slots_[s].done->wait_on(copy_->get());
        PIPIT_CUDA_CHECK(cudaMemsetAsync(slots_[s].grads, 0, slot_bytes(), copy_->get()));
        slots_[s].ready->record(copy_->get());
      }
    }
    for (std::size_t i = 0; i < next; ++i)
      if (where_[std::size_t(order[i])] < 0) {
        const std::size_t s = free_slots.back();
        free_slots.pop_back();
        load(s, order[i], grads);
      }
    std::vector<std::size_t> group;
    for (std::size_t i = 0; i < n; ++i) {
      const int l = order[i];
      const std::size_t s = std::size_t(where_[std::size_t(l)]);
      auto& sl = slots_[s];
      sl.ready->wait_on(compute);
      f(l, static_cast<const T*>(sl.weights), grads ? sl.grads : nullptr,
        host_[std::size_t(l)].size(), compute);
      sl.done->record(compute);
      group.push_back(s);
      if (group.size() < g) continue;
      if (next < n) {
        const std::size_t leave = std::min(group.size(), n - next);
        for (std::size_t j = 0; j < leave; ++j) {
          if (grads) gradient_out(group[j]);
          where_[std::size_t(slots_[group[j]].layer)] = -1;
          load(group[j], order[next++], grads);
        }
      }
      group.clear();
    }
    if (grads)
      for (std::size_t s = 0; s < k; ++s)
        if (slots_[s].layer >= 0) gradient_out(s);
  }

  std::vector<std::span<const T>> host_;
  runtime::layer_offload_options opts_;
  std::size_t capacity_ = 0;
  std::size_t max_elems_ = 0;
  std::vector<slot> slots_;
  std::vector<int> where_;
  std::vector<void*> pinned_;
  std::span<const std::span<T>> grads_;
  std::vector<std::unique_ptr<accumulate_task>> tasks_;
  std::optional<stream> copy_;
  std::size_t h2d_ = 0, d2h_ = 0;
};

}  // namespace pipit::cuda
