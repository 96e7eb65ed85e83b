#pragma once
// comm::threads: N ranks as threads of one process, for tests, single-machine CPU runs and the
// demo. Messages go through mailboxes in shared memory; an optional latency and bandwidth per
// message make it behave like a slow network for experiments. Failure is collective: when one
// rank throws or a wait times out, every rank's current and later operations raise pipit::error.
//
//   pipit::comm::threads::run(4, [](pipit::comm::threads& comm) { ... });

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "pipit/comm/collectives.hpp"
#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"

namespace pipit::comm {

struct threads_options {
  double latency_seconds = 0;                // added to every message
  double bandwidth_bytes_per_s = 0;          // 0: unlimited; else n bytes take n / bandwidth more
  std::chrono::milliseconds timeout{60000};  // a wait longer than this fails the whole world
  all_reduce_algorithm all_reduce = all_reduce_algorithm::ring;
};

namespace detail_threads {

using clock = std::chrono::steady_clock;

struct message {
  std::vector<std::byte> data;
  clock::time_point ready_at;
};

// (context, source world rank, destination world rank, tag)
using mailbox_key = std::tuple<std::uint64_t, int, int, int>;

struct world {
  explicit world(int n, threads_options o) : size(n), options(o) {}
  const int size;
  const threads_options options;
  std::mutex mutex;
  std::condition_variable arrived;
  std::map<mailbox_key, std::deque<message>> boxes;
  bool failed = false;
  std::string failure;  // the first failure, as every rank reports it

  // Records the first failure and wakes every waiting rank.
  void fail(std::string what) {
    {
      std::lock_guard lock(mutex);
      if (!failed) {
        failed = true;
        failure = std::move(what);
      }
    }
    arrived.notify_all();
  }
};

}  // namespace detail_threads

class threads {
 public:
  // A started operation: sends complete when posted (they are buffered), receives in wait().
  class request {
   public:
    request() = default;

   private:
    friend class threads;
    std::span<std::byte> buffer_{};
    int peer_ = -1;
    int tag_ = 0;
    bool pending_ = false;
  };

  // Runs fn(threads&) on n ranks, one thread each, and joins them. If any rank failed, throws
  // pipit::error with the first failure (after every thread has ended).
  template <class F>
  static void run(int n, F&& fn, threads_options options = {}) {
    if (n < 1) fail("pipit: threads::run needs at least 1 rank, got ", n);
    auto w = std::make_shared<detail_threads::world>(n, options);
    std::vector<int> members(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) members[static_cast<std::size_t>(i)] = i;
    auto shared_members = std::make_shared<const std::vector<int>>(std::move(members));
    std::vector<std::thread> pool;
    pool.reserve(static_cast<std::size_t>(n));
    for (int r = 0; r < n; ++r)
      pool.emplace_back([&, r] {
        threads comm(w, shared_members, r, 0);
        try {
          fn(comm);
        } catch (const std::exception& e) {
          w->fail(detail::concat("rank ", r, " failed: ", e.what()));
        } catch (...) {
          w->fail(detail::concat("rank ", r, " failed with a non-standard exception"));
        }
      });
    for (auto& t : pool) t.join();
    if (w->failed) throw error("pipit: comm::threads: " + w->failure);
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return static_cast<int>(members_->size()); }
  int world_rank() const noexcept { return (*members_)[static_cast<std::size_t>(rank_)]; }
  const threads_options& options() const noexcept { return world_->options; }

  template <class T>
  void send(std::span<const T> data, int peer, int tag) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    post(std::as_bytes(data), peer, tag, "send");
  }
  template <class T>
  void send(std::span<T> data, int peer, int tag) {
    send(std::span<const T>(data), peer, tag);
  }
  template <class T>
  void recv(std::span<T> data, int peer, int tag) {
    take(as_writable_bytes(data), peer, tag, "recv");
  }

  template <class T>
  request isend(std::span<const T> data, int peer, int tag) {
    send(data, peer, tag);
    return {};
  }
  template <class T>
  request irecv(std::span<T> data, int peer, int tag) {
    check_peer(peer, "irecv");
    request r;
    r.buffer_ = as_writable_bytes(data);
    r.peer_ = peer;
    r.tag_ = tag;
    r.pending_ = true;
    return r;
  }
  void wait(request& r) {
    if (!r.pending_) return;
    r.pending_ = false;
    take(r.buffer_, r.peer_, r.tag_, "wait(irecv)");
  }

  // A step's sends and receives: sends are posted first (they never block), then receives.
  void exchange(std::span<p2p_op> ops) {
    for (const p2p_op& op : ops)
      if (op.what == p2p_op::kind::send) post(op.buffer, op.peer, op.tag, "exchange(send)");
    for (const p2p_op& op : ops)
      if (op.what == p2p_op::kind::recv) take(op.buffer, op.peer, op.tag, "exchange(recv)");
  }

  template <class T, class Op>
  void all_reduce(std::span<T> data, Op op) {
    all_reduce_with(options().all_reduce, *this, data, op);
  }
  template <class T, class Op>
  void all_reduce(std::span<T> data, Op op, all_reduce_algorithm algorithm) {
    all_reduce_with(algorithm, *this, data, op);
  }
  template <class T, class Op>
  void reduce(std::span<T> data, Op op, int root) {
    check_root(root, "reduce");
    star_reduce(*this, data, op, root);
  }
  template <class T>
  void broadcast(std::span<T> data, int root) {
    check_root(root, "broadcast");
    tree_broadcast(*this, data, root);
  }
  template <class T>
  void all_gather(std::span<const T> mine, std::span<T> out) {
    ring_all_gather(*this, mine, out);
  }
  template <class T>
  void all_gather(std::span<T> mine, std::span<T> out) {
    ring_all_gather(*this, std::span<const T>(mine), out);
  }
  void barrier() { tree_barrier(*this); }

  // Collective over this communicator: ranks with the same color form a new communicator,
  // ordered by (key, rank). Used for pipeline, data-parallel and vocabulary groups.
  threads split(int color, int key) {
    const int n = size();
    std::vector<std::int64_t> mine{color, key}, all(2 * static_cast<std::size_t>(n));
    all_gather(std::span<const std::int64_t>(mine), std::span<std::int64_t>(all));
    std::vector<std::pair<std::int64_t, int>> group;  // (key, parent rank)
    for (int q = 0; q < n; ++q)
      if (all[2 * static_cast<std::size_t>(q)] == color)
        group.emplace_back(all[2 * static_cast<std::size_t>(q) + 1], q);
    std::sort(group.begin(), group.end());
    auto members = std::make_shared<std::vector<int>>();
    int new_rank = -1;
    for (const auto& [k, q] : group) {
      if (q == rank_) new_rank = static_cast<int>(members->size());
      members->push_back((*members_)[static_cast<std::size_t>(q)]);
    }
    ++splits_;
    // Every member computes the same context; distinct splits and colors get distinct ones.
    const std::uint64_t ctx = mix(mix(context_ ^ mix(splits_)) ^ static_cast<std::uint64_t>(color));
    return threads(world_, std::move(members), new_rank, ctx);
  }

 private:
  threads(std::shared_ptr<detail_threads::world> w, std::shared_ptr<const std::vector<int>> members,
          int rank, std::uint64_t context)
      : world_(std::move(w)), members_(std::move(members)), rank_(rank), context_(context) {}

  static constexpr std::uint64_t mix(std::uint64_t x) noexcept {  // splitmix64 finalizer
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  }

  void check_peer(int peer, const char* what) const {
    if (peer < 0 || peer >= size() || peer == rank_)
      fail("pipit: comm::threads: rank ", rank_, " ", what, ": bad peer ", peer, " (size ", size(),
           ")");
  }

  void check_root(int root, const char* what) const {
    if (root < 0 || root >= size())
      fail("pipit: comm::threads: rank ", rank_, " ", what, ": bad root ", root, " (size ", size(),
           ")");
  }

  [[noreturn]] void raise_failure(const char* what, int peer) const {
    throw error(detail::concat("pipit: comm::threads: ", world_->failure, " (raised on rank ",
                               rank_, " during ", what, peer >= 0 ? " with rank " : "",
                               peer >= 0 ? std::to_string(peer) : std::string(), ")"));
  }

  void post(std::span<const std::byte> bytes, int peer, int tag, const char* what) {
    check_peer(peer, what);
    const auto& o = world_->options;
    auto ready = detail_threads::clock::now();
    const double delay =
        o.latency_seconds + (o.bandwidth_bytes_per_s > 0
                                 ? static_cast<double>(bytes.size()) / o.bandwidth_bytes_per_s
                                 : 0.0);
    if (delay > 0)
      ready += std::chrono::duration_cast<detail_threads::clock::duration>(
          std::chrono::duration<double>(delay));
    detail_threads::message m{std::vector<std::byte>(bytes.begin(), bytes.end()), ready};
    {
      std::lock_guard lock(world_->mutex);
      if (world_->failed) raise_failure(what, peer);
      world_->boxes[{context_, world_rank(), (*members_)[static_cast<std::size_t>(peer)], tag}]
          .push_back(std::move(m));
    }
    world_->arrived.notify_all();
  }

  void take(std::span<std::byte> out, int peer, int tag, const char* what) {
    check_peer(peer, what);
    const detail_threads::mailbox_key key{context_, (*members_)[static_cast<std::size_t>(peer)],
                                          world_rank(), tag};
    const auto deadline = detail_threads::clock::now() + world_->options.timeout;
    std::unique_lock lock(world_->mutex);
    for (;;) {
      if (world_->failed) raise_failure(what, peer);
      auto it = world_->boxes.find(key);
      if (it != world_->boxes.end() && !it->second.empty()) {
        auto& m = it->second.front();
        const auto now = detail_threads::clock::now();
        if (m.ready_at <= now) {
          if (m.data.size() != out.size()) {
            const auto got = m.data.size();
            lock.unlock();
            world_->fail(detail::concat("rank ", rank_, " ", what, " from rank ", peer, " tag ",
                                        tag, ": expected ", out.size(), " bytes, got ", got));
            raise_failure(what, peer);
          }
          if (!out.empty()) std::memcpy(out.data(), m.data.data(), out.size());
          it->second.pop_front();
          return;
        }
        world_->arrived.wait_until(lock, std::min(m.ready_at, deadline));
      } else {
        world_->arrived.wait_until(lock, deadline);
      }
      if (detail_threads::clock::now() >= deadline && !world_->failed) {
        lock.unlock();
        world_->fail(detail::concat("rank ", rank_, " timed out after ",
                                    world_->options.timeout.count(), " ms in ", what,
                                    " waiting for rank ", peer, " (tag ", tag, ")"));
        lock.lock();
      }
    }
  }

  std::shared_ptr<detail_threads::world> world_;
  std::shared_ptr<const std::vector<int>> members_;  // group rank -> world rank
  int rank_ = 0;
  std::uint64_t context_ = 0;
  std::uint64_t splits_ = 0;
};

static_assert(communicator<threads>);

}  // namespace pipit::comm
