#pragma once
// Nano-batching (NanoFlow, Zhu et al., arXiv 2408.12757, section 4.1): every operation's batch
// of rows is split into nano-batches, and the resulting nano-operations are issued so that
// operations of different kinds (compute, memory, network) overlap. Sizes may differ per
// operation, as NanoFlow's do (its LLaMA-2-70B pipeline splits the KQV GEMM into 4 and the
// O/UG/D GEMMs into 2 nano-batches; efeslab/Nanoflow, pipeline/src/pipeline.cu).
//
//   nano_batch     the policy: per op, the sizes of its nano-batches (they add up to the batch)
//   nano_program   the nano-operations of a graph under a policy, their row-wise dependencies
//                  and, per kind, the order in which they are issued
//   nano_runner    runs a program on the host: one worker thread per kind (compute and memory
//                  on two worker threads, network on the calling thread, so that a backend that
//                  only allows its main thread to communicate, comm::mpi, still works), with a
//                  dependency tracker on a mutex and condition variables (workers sleep, never
//                  spin); run_sequential runs the same nano-operations one by one on the caller
//
// Issue order: each kind's nano-operations run in (op id, nano index) order. Op ids are a
// topological order, so every queue is consistent with one global topological order and the
// runner cannot deadlock (the globally first unfinished nano-op is always at the head of its
// queue with its dependencies done). Network operations are issued in the same order on every
// rank, which is what collectives need.
//
// Results do not change with the split when the caller's operations treat rows independently
// and compute each row with the same arithmetic whatever rows are computed with it (see
// row_kernels.hpp and ordered_all_reduce.hpp): then nano-batching is bitwise neutral.

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <span>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/core/math.hpp"
#include "pipit/nano/op_graph.hpp"

namespace pipit::nano {

using rows_range = range<std::int64_t>;

// `count` sizes that add up to `rows` and differ by at most one.
inline std::vector<std::int64_t> even_sizes(std::int64_t rows, int count) {
  if (count < 1) fail("pipit::nano: ", count, " nano-batches (need >= 1)");
  if (count > rows)
    fail("pipit::nano: ", count, " nano-batches for ", rows, " rows (more nano-batches than rows)");
  std::vector<std::int64_t> s(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i)
    s[static_cast<std::size_t>(i)] = even_split<std::int64_t>(rows, count, i).size();
  return s;
}

// The nano-batch policy: for each op of a graph, the row counts of its nano-batches.
class nano_batch {
 public:
  nano_batch(const op_graph& g, std::int64_t rows, std::vector<std::vector<std::int64_t>> sizes)
      : rows_(rows), sizes_(std::move(sizes)) {
    if (rows < 1) fail("pipit::nano::nano_batch: a batch of ", rows, " rows (need >= 1)");
    if (static_cast<int>(sizes_.size()) != g.size())
      fail("pipit::nano::nano_batch: sizes for ", sizes_.size(), " ops, the graph has ", g.size());
    for (int o = 0; o < g.size(); ++o) check(g, o, sizes_[static_cast<std::size_t>(o)]);
  }

  // Every op split into `count` nano-batches of (nearly) equal size.
  static nano_batch uniform(const op_graph& g, std::int64_t rows, int count) {
    if (rows < 1) fail("pipit::nano::nano_batch: a batch of ", rows, " rows (need >= 1)");
    return nano_batch(g, rows,
                      std::vector<std::vector<std::int64_t>>(static_cast<std::size_t>(g.size()),
                                                             even_sizes(rows, count)));
  }
  // No nano-batching: one nano-batch of all rows per op.
  static nano_batch none(const op_graph& g, std::int64_t rows) { return uniform(g, rows, 1); }

  std::int64_t rows() const noexcept { return rows_; }
  int ops() const noexcept { return static_cast<int>(sizes_.size()); }
  std::span<const std::int64_t> sizes(int op) const {
    return sizes_.at(static_cast<std::size_t>(op));
  }
  int count(int op) const { return static_cast<int>(sizes(op).size()); }

  // Replaces op `op`'s split (checked as in the constructor).
  void set(const op_graph& g, int op, std::vector<std::int64_t> s) {
    if (op < 0 || op >= ops()) fail("pipit::nano::nano_batch: no op ", op, " (", ops(), " ops)");
    check(g, op, s);
    sizes_[static_cast<std::size_t>(op)] = std::move(s);
  }

  // "name: 8+8, name: 16, ..." for reports.
  std::string describe(const op_graph& g) const {
    std::ostringstream os;
    for (int o = 0; o < ops(); ++o) {
      if (o) os << ", ";
      os << g[o].name << ": ";
      for (std::size_t j = 0; j < sizes(o).size(); ++j) os << (j ? "+" : "") << sizes(o)[j];
    }
    return os.str();
  }

  friend bool operator==(const nano_batch&, const nano_batch&) = default;

 private:
  void check(const op_graph& g, int o, std::span<const std::int64_t> s) const {
    const std::string& name = g[o].name;
    if (s.empty()) fail("pipit::nano::nano_batch: op ", o, " (", name, ") has zero nano-batches");
    if (static_cast<std::int64_t>(s.size()) > rows_)
      fail("pipit::nano::nano_batch: op ", o, " (", name, ") has ", s.size(), " nano-batches for ",
           rows_, " rows (more nano-batches than rows)");
    std::int64_t sum = 0;
    std::ostringstream terms;
    for (std::size_t j = 0; j < s.size(); ++j) {
      if (s[j] < 1)
        fail("pipit::nano::nano_batch: op ", o, " (", name, ") nano-batch ", j, " has ", s[j],
             " rows (need >= 1)");
      sum += s[j];
      terms << (j ? " + " : "") << s[j];
    }
    if (sum != rows_)
      fail("pipit::nano::nano_batch: op ", o, " (", name, ") has nano-batch sizes ", terms.str(),
           " = ", sum, ", which do not add up to the batch's ", rows_, " rows");
  }

  std::int64_t rows_;
  std::vector<std::vector<std::int64_t>> sizes_;
};

// One nano-operation: nano-batch `index` of op `op`, on rows [rows.begin, rows.end).
struct nano_op {
  int op;
  int index;
  rows_range rows;
  resource kind;
};

// The nano-operations of a graph under a policy, in issue order (op id, then nano index), with
// their dependencies: nano-op (B, j) depends on every nano-op of each dependency A of B whose
// rows intersect (B, j)'s rows.
class nano_program {
 public:
  nano_program(const op_graph& g, const nano_batch& plan) : ops_count_(g.size()) {
    if (plan.ops() != g.size())
      fail("pipit::nano::nano_program: a policy for ", plan.ops(), " ops, the graph has ",
           g.size());
    first_.resize(static_cast<std::size_t>(g.size()) + 1);
    for (int o = 0; o < g.size(); ++o) {
      first_[static_cast<std::size_t>(o)] = static_cast<int>(nodes_.size());
      std::int64_t begin = 0;
      const auto s = plan.sizes(o);
      for (std::size_t j = 0; j < s.size(); ++j) {
        nodes_.push_back({o, static_cast<int>(j), {begin, begin + s[j]}, g[o].kind});
        begin += s[j];
      }
    }
    first_.back() = static_cast<int>(nodes_.size());
    // Row-wise dependencies, as compressed adjacency lists.
    dep_first_.push_back(0);
    for (int i = 0; i < size(); ++i) {
      const nano_op& n = nodes_[static_cast<std::size_t>(i)];
      for (int d : g[n.op].deps)
        for (int k = first_[static_cast<std::size_t>(d)];
             k < first_[static_cast<std::size_t>(d) + 1]; ++k) {
          const rows_range r = nodes_[static_cast<std::size_t>(k)].rows;
          if (r.begin < n.rows.end && n.rows.begin < r.end) deps_.push_back(k);
        }
      dep_first_.push_back(static_cast<int>(deps_.size()));
    }
    std::vector<int> count(nodes_.size(), 0);
    for (int d : deps_) ++count[static_cast<std::size_t>(d)];
    user_first_.assign(nodes_.size() + 1, 0);
    for (std::size_t i = 0; i < nodes_.size(); ++i) user_first_[i + 1] = user_first_[i] + count[i];
    users_.resize(deps_.size());
    std::vector<int> fill(user_first_.begin(), user_first_.end() - 1);
    for (int i = 0; i < size(); ++i)
      for (int d : deps(i))
        users_[static_cast<std::size_t>(fill[static_cast<std::size_t>(d)]++)] = i;
    for (int i = 0; i < size(); ++i)
      queues_[static_cast<std::size_t>(nodes_[static_cast<std::size_t>(i)].kind)].push_back(i);
  }

  int size() const noexcept { return static_cast<int>(nodes_.size()); }
  int graph_ops() const noexcept { return ops_count_; }
  std::span<const nano_op> ops() const noexcept { return nodes_; }
  const nano_op& operator[](int i) const { return nodes_.at(static_cast<std::size_t>(i)); }
  // Nano-ops this one waits for, and nano-ops waiting for it.
  std::span<const int> deps(int i) const {
    return std::span<const int>(deps_).subspan(
        static_cast<std::size_t>(dep_first_[static_cast<std::size_t>(i)]),
        static_cast<std::size_t>(dep_first_[static_cast<std::size_t>(i) + 1] -
                                 dep_first_[static_cast<std::size_t>(i)]));
  }
  std::span<const int> users(int i) const {
    return std::span<const int>(users_).subspan(
        static_cast<std::size_t>(user_first_[static_cast<std::size_t>(i)]),
        static_cast<std::size_t>(user_first_[static_cast<std::size_t>(i) + 1] -
                                 user_first_[static_cast<std::size_t>(i)]));
  }
  // The nano-ops of one kind, in issue order.
  std::span<const int> queue(resource k) const noexcept {
    return queues_[static_cast<std::size_t>(k)];
  }

 private:
  int ops_count_;
  std::vector<nano_op> nodes_;
  std::vector<int> first_;  // op -> its first nano-op
  std::vector<int> deps_, dep_first_, users_, user_first_;
  std::vector<int> queues_[resource_count];
};

// Runs nano-programs with one thread per kind. Workers persist across run() calls (an iteration
// costs no thread start); a run hands them a pointer to the caller's functor through a
// trampoline, so the functor's type reaches the call site without std::function.
class nano_runner {
 public:
  nano_runner() {
    for (int k = 0; k < worker_count; ++k) workers_[k] = std::thread([this, k] { work(k); });
  }
  ~nano_runner() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    for (auto& cv : ready_) cv.notify_all();
    for (auto& t : workers_) t.join();
  }
  nano_runner(const nano_runner&) = delete;
  nano_runner& operator=(const nano_runner&) = delete;

  // Runs every nano-op of `p`, calling fn(op id, rows) on the thread of its kind (network: the
  // calling thread), each after the nano-ops it depends on. Rethrows the first exception a
  // nano-op threw, after every worker has stopped (nano-ops not yet started are skipped).
  template <class Fn>
  void run(const nano_program& p, Fn&& fn) {
    using F = std::remove_reference_t<Fn>;
    {
      std::lock_guard lock(mutex_);
      program_ = &p;
      fn_ = const_cast<void*>(static_cast<const void*>(&fn));
      call_ = [](void* f, int op, rows_range r) { (*static_cast<F*>(f))(op, r); };
      pending_.resize(static_cast<std::size_t>(p.size()));
      for (int i = 0; i < p.size(); ++i)
        pending_[static_cast<std::size_t>(i)] = static_cast<int>(p.deps(i).size());
      failed_ = false;
      error_ = nullptr;
      finished_ = 0;
      ++generation_;
    }
    for (auto& cv : ready_) cv.notify_all();
    serve(kind_of_caller);
    std::unique_lock lock(mutex_);
    all_done_.wait(lock, [&] { return finished_ == worker_count; });
    program_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  // The same nano-ops, one after the other on the calling thread, in issue order: the
  // no-overlap baseline.
  template <class Fn>
  static void run_sequential(const nano_program& p, Fn&& fn) {
    for (const nano_op& n : p.ops()) fn(n.op, n.rows);
  }

 private:
  static constexpr int worker_count = 2;  // compute, memory
  static constexpr int kind_of_worker[worker_count] = {static_cast<int>(resource::compute),
                                                       static_cast<int>(resource::memory)};
  static constexpr int kind_of_caller = static_cast<int>(resource::network);

  void work(int w) {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock lock(mutex_);
        ready_[static_cast<std::size_t>(kind_of_worker[w])].wait(
            lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      serve(kind_of_worker[w]);
      {
        std::lock_guard lock(mutex_);
        ++finished_;
      }
      all_done_.notify_all();
    }
  }

  // Runs the queue of kind k: waits (sleeping) for each head's dependencies, runs it, then
  // releases its users.
  void serve(int k) {
    const nano_program& p = *program_;
    for (int i : p.queue(static_cast<resource>(k))) {
      {
        std::unique_lock lock(mutex_);
        ready_[static_cast<std::size_t>(k)].wait(
            lock, [&] { return failed_ || pending_[static_cast<std::size_t>(i)] == 0; });
        if (failed_) return;
      }
      const nano_op& n = p[i];
      try {
        call_(fn_, n.op, n.rows);
      } catch (...) {
        {
          std::lock_guard lock(mutex_);
          if (!failed_) error_ = std::current_exception();
          failed_ = true;
        }
        for (auto& cv : ready_) cv.notify_all();
        return;
      }
      int woken = 0;  // bit per kind with a newly ready nano-op
      {
        std::lock_guard lock(mutex_);
        for (int u : p.users(i))
          if (--pending_[static_cast<std::size_t>(u)] == 0)
            woken |= 1 << static_cast<int>(p[u].kind);
      }
      for (int kk = 0; kk < resource_count; ++kk)
        if (woken & (1 << kk)) ready_[static_cast<std::size_t>(kk)].notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_[resource_count];  // one per kind: its thread waits there
  std::condition_variable all_done_;
  std::thread workers_[worker_count];
  const nano_program* program_ = nullptr;
  void* fn_ = nullptr;
  void (*call_)(void*, int, rows_range) = nullptr;
  std::vector<int> pending_;  // unfinished dependencies per nano-op
  std::uint64_t generation_ = 0;
  int finished_ = 0;
  bool stop_ = false;
  bool failed_ = false;
  std::exception_ptr error_;
};

}  // namespace pipit::nano
