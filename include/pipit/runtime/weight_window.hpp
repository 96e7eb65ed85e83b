#pragma once
// weight_window: TPI-LLM's sliding-window weight streaming (Li et al., "TPI-LLM: Serving 70B-scale
// LLMs Efficiently on Low-resource Edge Devices", arXiv 2410.00531; the memory scheduler of
// Lizonghang/TPI-LLM, src/tpi_llm/memory/mem_manager.py, re-implemented here).
//
// A model's weights are n block files (weight_file.hpp), used in the cyclic order 0, 1, ..., n−1,
// 0, 1, ... (one cycle per token). A background loader thread keeps at most k blocks resident —
// the one being computed and the next k − 1, read ahead while it computes and communicates — and
// a block leaves memory when the caller is done with it:
//
//   const weight_block& w = win.acquire(b);  // waits until block b is resident; frees the blocks
//                                            // behind it
//   compute(w);
//   win.release(b);                          // optional: frees b now, so the loader reads the
//   all_reduce();                            // next block during the communication (TPI-LLM
//                                            // issues its all-reduce after the block's scope)
//
// So resident weight memory never exceeds the k largest blocks (weight_window_stats counts every
// byte from allocation, in-flight reads included), and what compute sees is the bytes of the
// files: outputs equal an all-in-memory run exactly. With k ≥ n every block is read once and
// stays (TPI-LLM's --disable_memory_schedule). Whether reads stall compute is predicted by
// cost::estimate_weight_streaming (cost/weight_streaming.hpp).
//
// Errors: every header is read and checked at construction (bad magic, version, table, truncated
// file: pipit::error naming the file). A read failure in the loader (checksum mismatch, I/O)
// stops the loader and is rethrown by the acquire() that needs that block; blocks already
// resident stay usable. The destructor cancels an in-flight read and joins: no hang.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/runtime/weight_file.hpp"

namespace pipit::runtime {

struct weight_window_options {
  int window = 2;             // k: blocks resident at once, the one being computed included
  double disk_bandwidth = 0;  // simulated disk, bytes per second (0: the file system's speed)
  double disk_latency = 0;    // simulated disk, seconds per block read
  bool verify_checksum = true;
};

struct weight_window_stats {
  std::size_t resident_bytes = 0;       // now
  std::size_t peak_resident_bytes = 0;  // since construction (or reset_peak)
  std::size_t loads = 0;                // block reads completed
  std::size_t bytes_read = 0;           // payload bytes of those reads
  double load_seconds = 0;              // loader busy time
  double stall_seconds = 0;             // time acquire() waited for a block
};

class weight_window {
 public:
  explicit weight_window(std::vector<std::filesystem::path> blocks,
                         const weight_window_options& o = {})
      : paths_(std::move(blocks)), opts_(o) {
    PIPIT_REQUIRE(opts_.window >= 1, "weight_window: window k = ", opts_.window,
                  " blocks; it must hold at least 1 block");
    PIPIT_REQUIRE(!paths_.empty(), "weight_window: no block files");
    PIPIT_REQUIRE(opts_.disk_bandwidth >= 0 && opts_.disk_latency >= 0,
                  "weight_window: disk bandwidth ", opts_.disk_bandwidth, " and latency ",
                  opts_.disk_latency, " must be >= 0");
    infos_.reserve(paths_.size());
    for (const auto& p : paths_) {
      infos_.push_back(read_weight_file_info(p));
      max_block_bytes_ = std::max(max_block_bytes_, resident_size(infos_.back()));
    }
    all_resident_ = std::size_t(opts_.window) >= paths_.size();
    loader_ = std::thread([this] { loader_loop(); });
  }

  weight_window(const weight_window&) = delete;
  weight_window& operator=(const weight_window&) = delete;

  ~weight_window() {
    {
      std::lock_guard lk(mu_);
      stop_.store(true);
    }
    cv_.notify_all();
    loader_.join();
  }

  // Block b, resident until release(b) or the next acquire(). Blocks are acquired in cyclic order
  // (0, 1, ..., n−1, 0, ...); acquiring b frees every block before it in that order.
  const weight_block& acquire(std::size_t b) {
    std::unique_lock lk(mu_);
    const std::size_t n = paths_.size();
    PIPIT_REQUIRE(b == next_ % n, "weight_window: acquire(", b, "): blocks are acquired in cyclic ",
                  "order and block ", next_ % n, " is next");
    const std::size_t seq = next_++;
    if (!all_resident_) {
      bool freed = false;
      while (!slots_.empty() && slots_.front().seq < seq) {
        drop_front();
        freed = true;
      }
      if (freed) cv_.notify_all();
    }
    slot* s = find(all_resident_ ? b : seq);
    if (s == nullptr || !s->ready) {
      const auto t0 = std::chrono::steady_clock::now();
      cv_.wait(lk, [&] {
        s = find(all_resident_ ? b : seq);
        return (s != nullptr && s->ready) || error_ != nullptr;
      });
      stats_.stall_seconds +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (s == nullptr || !s->ready) {
        next_ = seq;  // a retry of acquire(b) reports the same error, not "b + 1 is next"
        std::rethrow_exception(error_);
      }
    }
    return *s->block;
  }

  // Frees block b (the one acquired last) before the next acquire().
  void release(std::size_t b) {
    std::unique_lock lk(mu_);
    PIPIT_REQUIRE(next_ > 0 && b == (next_ - 1) % paths_.size(), "weight_window: release(", b,
                  "): only the block acquired last (",
                  next_ > 0 ? long((next_ - 1) % paths_.size()) : -1L, ") can be released");
    if (all_resident_) return;
    if (!slots_.empty() && slots_.front().seq == next_ - 1) {
      drop_front();
      lk.unlock();
      cv_.notify_all();
    }
  }

  weight_window_stats stats() const {
    std::lock_guard lk(mu_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard lk(mu_);
    stats_.peak_resident_bytes = stats_.resident_bytes;
  }

  std::size_t blocks() const noexcept { return paths_.size(); }
  std::size_t max_block_bytes() const noexcept { return max_block_bytes_; }
  int window() const noexcept { return opts_.window; }
  bool all_resident() const noexcept { return all_resident_; }
  const weight_file_info& info(std::size_t b) const { return infos_.at(b); }
  // Bytes a block occupies once resident (payload rounded to whole pages).
  std::size_t block_bytes(std::size_t b) const { return resident_size(infos_.at(b)); }
  // The bound on resident weight bytes: the k largest blocks (k capped at n).
  std::size_t resident_bound() const {
    std::vector<std::size_t> sizes;
    for (const auto& i : infos_) sizes.push_back(resident_size(i));
    std::sort(sizes.begin(), sizes.end(), std::greater<>());
    std::size_t sum = 0;
    for (std::size_t i = 0; i < sizes.size() && i < std::size_t(opts_.window); ++i) sum += sizes[i];
    return sum;
  }

 private:
  struct slot {
    std::size_t seq = 0;  // position in the cyclic order (the block is seq % n)
    bool ready = false;
    std::optional<weight_block> block;
    std::size_t bytes = 0;
  };

  static std::size_t resident_size(const weight_file_info& i) {
    const std::size_t page = mapped_buffer::page_size();
    return (static_cast<std::size_t>(i.payload_bytes) + page - 1) / page * page;
  }

  slot* find(std::size_t seq) {
    for (auto& s : slots_)
      if (s.seq == seq) return &s;
    return nullptr;
  }

  // Under mu_. Only blocks the caller has acquired (hence ready) are dropped.
  void drop_front() {
    stats_.resident_bytes -= slots_.front().bytes;
    slots_.pop_front();
  }

  void loader_loop() {
    const std::size_t n = paths_.size();
    const std::size_t k = std::min<std::size_t>(std::size_t(opts_.window), n);
    std::size_t seq = 0;
    for (;;) {
      std::size_t bytes = 0;
      {
        std::unique_lock lk(mu_);
        if (all_resident_ && seq == n) return;  // everything is in; nothing will leave
        cv_.wait(lk, [&] { return stop_.load() || slots_.size() < k; });
        if (stop_.load()) return;
        bytes = resident_size(infos_[seq % n]);
        slots_.push_back(slot{.seq = seq, .ready = false, .block = std::nullopt, .bytes = bytes});
        stats_.resident_bytes += bytes;
        stats_.peak_resident_bytes = std::max(stats_.peak_resident_bytes, stats_.resident_bytes);
      }
      const auto t0 = std::chrono::steady_clock::now();
      std::optional<weight_block> block;
      std::exception_ptr err;
      bool cancelled = false;
      try {
        weight_read_options ro{.disk_bandwidth = opts_.disk_bandwidth,
                               .disk_latency = opts_.disk_latency,
                               .verify_checksum = opts_.verify_checksum,
                               .cancel = &stop_};
        block.emplace(read_weight_block(paths_[seq % n], infos_[seq % n], ro));
      } catch (const weight_read_cancelled&) {
        cancelled = true;
      } catch (...) {
        err = std::current_exception();
      }
      const double dt =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      {
        std::lock_guard lk(mu_);
        slot* s = find(seq);  // still there: the consumer never drops a block it has not had
        if (cancelled || err) {
          for (auto it = slots_.begin(); it != slots_.end(); ++it)
            if (it->seq == seq) {
              stats_.resident_bytes -= it->bytes;
              slots_.erase(it);
              break;
            }
          if (err) error_ = err;
        } else {
          s->block = std::move(block);
          s->ready = true;
          stats_.loads += 1;
          stats_.bytes_read += static_cast<std::size_t>(infos_[seq % n].payload_bytes);
          stats_.load_seconds += dt;
        }
      }
      cv_.notify_all();
      if (cancelled || err) return;
      ++seq;
    }
  }

  std::vector<std::filesystem::path> paths_;
  std::vector<weight_file_info> infos_;
  weight_window_options opts_;
  std::size_t max_block_bytes_ = 0;
  bool all_resident_ = false;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<slot> slots_;  // seq order; the loader appends, the consumer drops from the front
  std::size_t next_ = 0;    // seq of the next acquire()
  std::exception_ptr error_;
  std::atomic<bool> stop_{false};
  weight_window_stats stats_;
  std::thread loader_;  // last: started after everything above exists
};

}  // namespace pipit::runtime
