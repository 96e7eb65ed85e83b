#pragma once
// layer_offload: Superpipeline's policy (Abbasi & Lim, "Superpipeline: A Universal Approach for
// Reducing GPU Memory Usage in Large Models", arXiv 2410.08791), re-implemented for a memory of
// bounded capacity. The master copy of every layer's weights stays in host memory; at most k
// layers are resident in the (device) pool; after k′ resident layers have computed, those k′
// leave and the next k′ in the pass's order are copied in — by a copy engine working ahead of
// compute, so the copies overlap the compute of the k − k′ layers still resident.
//
// On the host the "device" is a bounded_pool (a real allocator that refuses to exceed its
// capacity) and the copy engine is one background thread (a CUDA copy stream's stand-in: one
// FIFO, so an eviction's gradient copy-out always precedes the copy-in that reuses its slot),
// optionally paced to a simulated link (latency + bytes / bandwidth per transfer). Memory: the
// weights of k layers (k slots sized to the largest layer, allocated once — TPI-LLM's "fixed pool
// of slabs" — so the pool never fragments), and during backward() as many gradient slots.
//
// forward(f):  f(layer, weights) for layer 0 .. L−1; weights is a std::span<const T> in the pool.
// backward(host_grads, g): g(layer, weights, grad) for layer L−1 .. 0; grad is a zeroed
//   std::span<T> in the pool; when the layer leaves the device (or at the end) the copy engine
//   adds it into host_grads[layer], so gradients accumulate across microbatches as in an
//   all-in-memory run, and backward() returns once all of them have arrived. Activations are the
//   caller's (they may live in the same pool: allocate them from it and they count).
//
// A pass keeps the layers it ends with resident, so a backward that follows a forward starts
// with the last k layers already there (no copy). After backward() every slot is emptied:
// the host weights are expected to change (optimizer step); call invalidate() after changing
// them between two forward() passes.
//
// Failures: an exception from f or g leaves the pass after the copies already queued have
// finished, so host_grads then hold the gradients of the layers that had left the device and
// not of the others — discard them (the step failed). An error in the copy engine itself is
// kept and raised by every later pass: the object is unusable after it.

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/runtime/bounded_pool.hpp"

namespace pipit::runtime {

struct layer_offload_options {
  int resident = 2;           // k: layers resident at once
  int swap = 1;               // k′: layers that leave (and enter) together, 1 <= k′ <= k
  double link_bandwidth = 0;  // simulated host <-> device link, bytes per second (0: memcpy)
  double link_latency = 0;    // simulated link, seconds per transfer
};

struct layer_offload_stats {
  std::size_t h2d_transfers = 0, h2d_bytes = 0;  // weights copied in
  std::size_t d2h_transfers = 0, d2h_bytes = 0;  // gradients copied out
  double copy_seconds = 0;                       // copy engine busy time
  double stall_seconds = 0;                      // compute waited for a copy
};

template <class T>
class layer_offload {
 public:
  layer_offload(std::vector<std::span<const T>> host_weights, bounded_pool& device,
                const layer_offload_options& o = {})
      : host_(std::move(host_weights)), pool_(device), opts_(o) {
    PIPIT_REQUIRE(opts_.resident >= 1, "layer_offload: resident layers k = ", opts_.resident,
                  "; at least 1 layer must fit on the device");
    PIPIT_REQUIRE(opts_.swap >= 1, "layer_offload: swapped layers k' = ", opts_.swap,
                  " must be >= 1");
    PIPIT_REQUIRE(opts_.swap <= opts_.resident, "layer_offload: swapped layers k' = ", opts_.swap,
                  " > resident layers k = ", opts_.resident,
                  " (only resident layers can be swapped out)");
    PIPIT_REQUIRE(!host_.empty(), "layer_offload: no layers");
    PIPIT_REQUIRE(opts_.link_bandwidth >= 0 && opts_.link_latency >= 0,
                  "layer_offload: link bandwidth ", opts_.link_bandwidth, " and latency ",
                  opts_.link_latency, " must be >= 0");
    for (std::size_t l = 0; l < host_.size(); ++l) {
      PIPIT_REQUIRE(!host_[l].empty(), "layer_offload: layer ", l, " has no weights");
      max_elems_ = std::max(max_elems_, host_[l].size());
    }
    const std::size_t k = std::min<std::size_t>(std::size_t(opts_.resident), host_.size());
    require_room(k, "weights");
    slots_.resize(k);
    for (auto& s : slots_) s.weights = pool_.allocate(max_elems_ * sizeof(T));
    where_.assign(host_.size(), -1);
    copier_ = std::thread([this] { copy_loop(); });
  }

  layer_offload(const layer_offload&) = delete;
  layer_offload& operator=(const layer_offload&) = delete;

  ~layer_offload() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    copier_.join();
  }

  template <class F>
  void forward(F&& f) {
    std::vector<int> order(host_.size());
    for (std::size_t l = 0; l < order.size(); ++l) order[l] = static_cast<int>(l);
    run(order, false, [&](int l, std::span<const T> w, std::span<T>) { f(l, w); });
  }

  template <class G>
  void backward(std::span<const std::span<T>> host_grads, G&& g) {
    PIPIT_REQUIRE(host_grads.size() == host_.size(), "layer_offload: ", host_grads.size(),
                  " gradient buffers for ", host_.size(), " layers");
    for (std::size_t l = 0; l < host_.size(); ++l)
      PIPIT_REQUIRE(host_grads[l].size() == host_[l].size(), "layer_offload: gradient of layer ", l,
                    " has ", host_grads[l].size(), " elements, its weights ", host_[l].size());
    std::vector<int> order(host_.size());
    for (std::size_t l = 0; l < order.size(); ++l)
      order[l] = static_cast<int>(order.size() - 1 - l);
    grads_ = host_grads;
    run(order, true, std::forward<G>(g));
    grads_ = {};
    invalidate();
  }

  // Forgets every resident copy (the next pass copies its layers in again).
  void invalidate() {
    std::lock_guard lk(mu_);
    for (auto& s : slots_) {
      if (s.layer >= 0) where_[std::size_t(s.layer)] = -1;
      s.layer = -1;
      s.ready = false;
    }
  }

  std::size_t layers() const noexcept { return host_.size(); }
  int resident() const noexcept { return static_cast<int>(slots_.size()); }  // k, capped at L
  int swap() const noexcept { return std::min(opts_.swap, resident()); }
  std::size_t slot_bytes() const noexcept { return pool_.footprint(max_elems_ * sizeof(T)); }
  bool is_resident(int layer) const {
    std::lock_guard lk(mu_);
    return where_.at(std::size_t(layer)) >= 0;
  }
  layer_offload_stats stats() const {
    std::lock_guard lk(mu_);
    return stats_;
  }

 private:
  struct slot {
    int layer = -1;
    bool ready = false;
    pool_block weights;
    pool_block grads;
  };
  struct task {
    bool to_device;  // H2D weights (and zero the gradient slot) or D2H-accumulate the gradient
    int slot;
    int layer;
    bool zero_grad;
  };

  void require_room(std::size_t k, const char* what) const {
    const std::size_t need = k * slot_bytes();
    const std::size_t free = pool_.capacity() - pool_.in_use();
    if (need > free)
      fail("layer_offload: device pool too small for the ", what, " of k = ", k,
           " resident layers of up to ", max_elems_ * sizeof(T), " bytes: they need ", need,
           " bytes, the pool has ", free, " free of ", pool_.capacity());
  }

  template <class F>
  void run(const std::vector<int>& order, bool grads, F&& f) {
    const std::size_t n = order.size(), k = slots_.size();
    const std::size_t g = std::min<std::size_t>(std::size_t(opts_.swap), k);
    if (grads) {
      require_room(k, "gradients");
      for (auto& s : slots_) s.grads = pool_.allocate(max_elems_ * sizeof(T));
    }
    try {
      std::vector<int> free_slots;
      std::size_t next = std::min(n, k);  // order[0, next) are (being) made resident
      {
        std::unique_lock lk(mu_);
        for (std::size_t s = 0; s < k; ++s) {
          const int l = slots_[s].layer;
          const bool wanted =
              l >= 0 && std::find(order.begin(), order.begin() + std::ptrdiff_t(next), l) !=
                            order.begin() + std::ptrdiff_t(next);
          if (!wanted) {
            if (l >= 0) where_[std::size_t(l)] = -1;
            slots_[s].layer = -1;
            free_slots.push_back(static_cast<int>(s));
          }
        }
        for (std::size_t i = 0; i < next; ++i)
          if (where_[std::size_t(order[i])] < 0) {
            const int s = free_slots.back();
            free_slots.pop_back();
            enqueue_locked({true, s, order[i], grads});
          }
      }
      cv_.notify_all();
      std::vector<int> group;
      for (std::size_t i = 0; i < n; ++i) {
        const int l = order[i];
        slot* s = nullptr;
        {
          std::unique_lock lk(mu_);
          auto ready = [&] {
            s = &slots_[std::size_t(where_[std::size_t(l)])];
            return s->ready || error_ != nullptr;
          };
          if (!ready()) {
            const auto t0 = std::chrono::steady_clock::now();
            cv_.wait(lk, ready);
            stats_.stall_seconds +=
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          }
          if (!s->ready) std::rethrow_exception(error_);
        }
        const std::size_t len = host_[std::size_t(l)].size();
        f(l, std::span<const T>(s->weights.template as<T>(len)),
          grads ? s->grads.template as<T>(len) : std::span<T>());
        group.push_back(where_[std::size_t(l)]);
        if (group.size() < g) continue;
        if (next < n) {
          // The group leaves and the next layers of the pass take its slots; near the end of the
          // pass only as many leave (oldest first) as layers remain, so that a pass ends with
          // its last k layers resident (a backward after a forward starts without copies).
          const std::size_t leave = std::min(group.size(), n - next);
          {
            std::lock_guard lk(mu_);
            for (std::size_t j = 0; j < leave; ++j) {
              const int gs = group[j];
              auto& sl = slots_[std::size_t(gs)];
              if (grads) enqueue_locked({false, gs, sl.layer, false});
              where_[std::size_t(sl.layer)] = -1;
              sl.layer = -1;
              sl.ready = false;
              enqueue_locked({true, gs, order[next++], grads});
            }
          }
          cv_.notify_all();
        }
        group.clear();
      }
      if (grads) {  // the layers still resident hand over their gradients
        {
          std::lock_guard lk(mu_);
          for (std::size_t s = 0; s < k; ++s)
            if (slots_[s].layer >= 0) enqueue_locked({false, int(s), slots_[s].layer, false});
        }
        cv_.notify_all();
      }
      drain();
    } catch (...) {
      drain_quietly();
      {
        std::lock_guard lk(mu_);
        for (auto& sl : slots_)
          if (sl.layer >= 0 && !sl.ready) {
            where_[std::size_t(sl.layer)] = -1;
            sl.layer = -1;
          }
      }
      if (grads) {
        for (auto& s : slots_) s.grads.reset();
        grads_ = {};
      }
      throw;
    }
    if (grads)
      for (auto& s : slots_) s.grads.reset();
  }

  // Under mu_.
  void enqueue_locked(task t) {
    if (t.to_device) {
      auto& s = slots_[std::size_t(t.slot)];
      s.layer = t.layer;
      s.ready = false;
      where_[std::size_t(t.layer)] = t.slot;
    }
    queue_.push_back(t);
    ++outstanding_;
  }

  void drain() {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return outstanding_ == 0 || error_ != nullptr; });
    if (error_ != nullptr) std::rethrow_exception(error_);
  }
  void drain_quietly() noexcept {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return outstanding_ == 0 || error_ != nullptr; });
  }

  void copy_loop() {
    for (;;) {
      task t;
      {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return stop_ || (!queue_.empty() && error_ == nullptr); });
        if (stop_) return;
        t = queue_.front();
        queue_.pop_front();
      }
      const auto t0 = std::chrono::steady_clock::now();
      auto& s = slots_[std::size_t(t.slot)];
      const auto host = host_[std::size_t(t.layer)];
      std::size_t bytes = 0;
      try {
        if (t.to_device) {
          std::memcpy(s.weights.data(), host.data(), host.size_bytes());
          if (t.zero_grad) std::memset(s.grads.data(), 0, host.size_bytes());
          bytes = host.size_bytes();
        } else {
          const auto dst = grads_[std::size_t(t.layer)];
          const auto src = s.grads.template as<T>(dst.size());
          for (std::size_t i = 0; i < dst.size(); ++i) dst[i] += src[i];
          bytes = dst.size_bytes();
        }
        if (opts_.link_bandwidth > 0 || opts_.link_latency > 0) {
          const double due = opts_.link_latency +
                             (opts_.link_bandwidth > 0 ? double(bytes) / opts_.link_bandwidth : 0);
          std::this_thread::sleep_until(
              t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                       std::chrono::duration<double>(due)));
        }
      } catch (...) {
        std::lock_guard lk(mu_);
        error_ = std::current_exception();
        cv_.notify_all();
        continue;
      }
      {
        std::lock_guard lk(mu_);
        if (t.to_device) {
          s.ready = true;
          ++stats_.h2d_transfers;
          stats_.h2d_bytes += bytes;
        } else {
          ++stats_.d2h_transfers;
          stats_.d2h_bytes += bytes;
        }
        stats_.copy_seconds +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        --outstanding_;
      }
      cv_.notify_all();
    }
  }

  std::vector<std::span<const T>> host_;
  bounded_pool& pool_;
  layer_offload_options opts_;
  std::size_t max_elems_ = 0;
  std::vector<slot> slots_;
  std::vector<int> where_;  // layer -> slot, −1 when not resident (or not being copied in)
  std::span<const std::span<T>> grads_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<task> queue_;
  std::size_t outstanding_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  layer_offload_stats stats_;
  std::thread copier_;  // last: started after everything above exists
};

}  // namespace pipit::runtime
