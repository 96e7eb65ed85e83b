#pragma once
// comm::mpi: ranks as MPI processes, on one machine or many, started by mpirun. Needs MPI (link
// pipit::mpi); one thread per process calls it (MPI_THREAD_SINGLE or FUNNELED is enough).
//
//   MPI_Init(&argc, &argv);
//   try {
//     pipit::comm::mpi::run(MPI_COMM_WORLD, [](pipit::comm::mpi& comm) { ... });
//   } catch (const pipit::error& e) {  // every rank gets here when any rank failed
//     std::fprintf(stderr, "%s\n", e.what());
//   }
//   MPI_Finalize();
//
// How it keeps the communicator contract (see communicator.hpp):
// - The communicator works on duplicates of the MPI_Comm it is given: one carries the data, a
//   second ("control") carries only failure notices and run()'s final agreement, so neither
//   mixes with the user's own traffic.
// - send() copies the data into a buffer the communicator owns and starts an MPI_Isend; the
//   request is completed lazily by later calls (and by flush() and the destructor). So send()
//   never waits for the receiver, and the send-then-receive collectives of collectives.hpp
//   cannot deadlock on rendezvous-sized messages.
// - Every wait polls (MPI_Test*, with a short spin, then yield, then 50 us sleeps) until a
//   deadline (mpi_options::timeout) and probes the control communicator for failure notices
//   while it waits. Blocking collectives are replaced by their nonblocking forms (MPI_Iallreduce,
//   MPI_Ireduce, MPI_Ibcast, MPI_Iallgather, MPI_Ibarrier, MPI_Comm_idup); split() first meets
//   every rank in a polled all-gather, so the MPI_Comm_split that follows cannot hang.
// - all_reduce: by default MPI's own collective (MPI_SUM / MPI_MAX for std::plus and max_op on
//   arithmetic types; for any other stateless operator an MPI_Op_create operator, declared
//   commutative, applied to the elements' bytes). Every rank gets bit-identical results when
//   op(a, b) == op(b, a) bit for bit, which holds for IEEE +, max and the vocabulary layers'
//   (max, sum-exp) merge: Open MPI's algorithms either reduce each element on one rank and copy
//   it, or combine two partners' values in both orders. For an operator without that property,
//   set mpi_options::all_reduce to ring, tree or star: those fix one combination order per
//   element (collectives.hpp). An operator with state (a capturing lambda) cannot be an
//   MPI_Op; it always uses the point-to-point ring.
//
// Failure (run() only): when a rank's function throws, or any wait passes its deadline, that
// rank sends a notice ("rank 2 failed: <what>") to every rank of run()'s communicator. Every
// rank's current and later operations then raise pipit::error naming the failed rank and the
// operation they were in; a rank busy in its own code raises at its next call. run() always ends
// with one agreement (a polled MPI_Iallreduce on the control communicator) in which every rank
// says whether it failed, so a rank that had already finished its work raises too, and then
// run() throws pipit::error on every rank. Operations in flight at a failure:
// - receives are cancelled (MPI_Cancel; one already matched gets 200 ms to land);
// - buffered sends of send() are released with MPI_Request_free, and their buffers are kept
//   (leaked on purpose) since MPI may still read them; the same for the internal buffers of
//   nonblocking collectives, which MPI cannot cancel. The caller's buffers are never handed to
//   a collective, so nothing writes into them after an error; a communicator with such a
//   collective left running is not freed either (MPI would use it when it progresses).
// - sends of isend()/exchange() read the caller's buffer directly; they are released with
//   MPI_Request_free. Their receivers are failing too and cancel their receives, so in practice
//   these never match; keep such buffers alive if the program goes on using MPI.
// When every rank reaches the agreement within mpi_options::acknowledge_timeout, the exit is
// clean: run() throws on every rank and the program may call MPI_Finalize. When some rank
// does not (it is stuck in its own code, or dead), the ranks present print their error to
// stderr and call MPI_Abort (mpi_options::abort_if_unacknowledged; otherwise they throw, and
// MPI_Finalize may block). A rank still waiting for the agreement after 250 ms (or half the
// acknowledgement window, if shorter) prints its error to stderr, which is before any rank can
// abort: every rank that is inside pipit when a failure happens reports it before the job ends.

#include <mpi.h>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "pipit/comm/collectives.hpp"
#include "pipit/comm/communicator.hpp"
#include "pipit/comm/mpi_check.hpp"
#include "pipit/core/error.hpp"

namespace pipit::comm {

struct mpi_options {
  // A wait longer than this (for a peer's message, a collective, or the other ranks at the end
  // of run()) fails the whole group.
  std::chrono::milliseconds timeout{60000};
  // After a failure, how long run() waits for every rank to acknowledge it; 0: `timeout`.
  std::chrono::milliseconds acknowledge_timeout{0};
  // Unset: MPI's own collectives. Set: that point-to-point algorithm for every all_reduce.
  std::optional<all_reduce_algorithm> all_reduce{};
  // When not every rank acknowledges a failure in time: print and MPI_Abort (true), or throw.
  bool abort_if_unacknowledged = true;
};

namespace detail_mpi {

using clock = std::chrono::steady_clock;

inline constexpr int notice_tag = 1;
inline constexpr std::size_t max_notice_bytes = 1000;  // stays below every eager limit

// Buffers that an abandoned MPI operation may still touch after a failure: kept, never freed.
inline void keep_forever(std::vector<std::byte>&& buffer) {
  static std::mutex m;
  static auto* kept = new std::vector<std::vector<std::byte>>();  // leaked on purpose
  std::lock_guard lock(m);
  kept->push_back(std::move(buffer));
}

inline bool finalized() noexcept {
  int f = 0;
  MPI_Finalized(&f);
  return f != 0;
}

inline int count_of(std::size_t n, const char* what) {
  if (n > static_cast<std::size_t>(INT_MAX))
    fail("pipit: comm::mpi: ", what, ": ", n, " exceeds MPI's int count (", INT_MAX,
         "); split the message");
  return static_cast<int>(n);
}

// Spin while MPI_Test makes progress cheaply, then yield (ranks may share cores), then sleep.
class backoff {
 public:
  void pause() {
    ++n_;
    if (n_ < 64) return;
    if (n_ < 4096) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

 private:
  unsigned n_ = 0;
};

// The state every communicator derived from one run() (or one constructor call) shares: the
// control communicator and what is known about failures.
struct world {
  explicit world(mpi_options o) : options(o) {}
  world(const world&) = delete;
  world& operator=(const world&) = delete;

  ~world() {
    if (control == MPI_COMM_NULL || finalized()) return;
    drain();
    for (MPI_Request& r : notices_out) {
      int done = 0;
      MPI_Test(&r, &done, MPI_STATUS_IGNORE);
      if (!done) MPI_Request_free(&r);
    }
    if (!notices_out.empty()) keep_forever(std::move(notice_buffer));
    if (!control_busy) MPI_Comm_free(&control);  // else an agreement may still run on it
  }

  std::chrono::milliseconds timeout() const noexcept { return options.timeout; }
  std::chrono::milliseconds acknowledge_timeout() const noexcept {
    return options.acknowledge_timeout.count() > 0 ? options.acknowledge_timeout : options.timeout;
  }

  // Receives every notice that has arrived; returns whether the group has failed.
  bool poll() {
    drain();
    return failed;
  }

  void drain() {
    for (;;) {
      int flag = 0;
      MPI_Status st;
      if (MPI_Iprobe(MPI_ANY_SOURCE, notice_tag, control, &flag, &st) != MPI_SUCCESS || !flag)
        return;
      int n = 0;
      MPI_Get_count(&st, MPI_CHAR, &n);
      std::string text(static_cast<std::size_t>(std::max(n, 0)), '\0');
      MPI_Recv(text.data(), n, MPI_CHAR, st.MPI_SOURCE, notice_tag, control, MPI_STATUS_IGNORE);
      if (!failed) {
        failed = true;
        failure = std::move(text);
        failed_rank = st.MPI_SOURCE;
      }
    }
  }

  // Records a failure found on this rank and tells every other rank. Never throws.
  void fail_here(std::string text) noexcept {
    if (failed) return;
    failed = true;
    failed_rank = rank;
    failure = std::move(text);
    try {
      notice_buffer.resize(std::min(failure.size(), max_notice_bytes));
      std::memcpy(notice_buffer.data(), failure.data(), notice_buffer.size());
      notices_out.reserve(static_cast<std::size_t>(size));
    } catch (...) {
      return;  // out of memory: the others will time out instead
    }
    for (int q = 0; q < size; ++q) {
      if (q == rank) continue;
      MPI_Request r = MPI_REQUEST_NULL;
      if (MPI_Isend(notice_buffer.data(), static_cast<int>(notice_buffer.size()), MPI_BYTE, q,
                    notice_tag, control, &r) == MPI_SUCCESS)
        notices_out.push_back(r);
    }
  }

  mpi_options options;
  MPI_Comm control = MPI_COMM_NULL;  // duplicate of the run's communicator: notices only
  int rank = 0, size = 1;            // in the run's communicator
  bool failed = false;
  bool control_busy = false;
  int failed_rank = -1;
  std::string failure;  // e.g. "rank 2 failed: boom", as every rank reports it
  std::string report;   // the first pipit::error text raised on this rank
  std::vector<std::byte> notice_buffer;
  std::vector<MPI_Request> notices_out;
};

// One communicator's own state: the data communicator and the sends still in flight.
struct channel {
  channel() = default;
  channel(const channel&) = delete;
  channel& operator=(const channel&) = delete;

  ~channel() {
    if (comm == MPI_COMM_NULL || finalized()) return;
    // While an exception unwinds (it will fail the run), do not wait for the peers.
    if (!world->failed && std::uncaught_exceptions() == 0) {
      try {
        complete_sends(world->timeout());
      } catch (...) {
      }
      if (!send_requests.empty())
        world->fail_here(detail::concat("rank ", world->rank, " timed out after ",
                                        world->timeout().count(),
                                        " ms completing its sends before freeing a communicator"));
    }
    release_sends();
    // A nonblocking collective MPI could not cancel may still run on this communicator: MPI
    // would touch the freed communicator when it progresses. Keep the handle instead.
    if (!abandoned_collective) MPI_Comm_free(&comm);
  }

  // Completes the sends that are done; returns whether none is left.
  bool sweep() {
    if (send_requests.empty()) return true;
    int outcount = 0;
    indices.resize(send_requests.size());
    PIPIT_MPI_CHECK(MPI_Testsome(static_cast<int>(send_requests.size()), send_requests.data(),
                                 &outcount, indices.data(), MPI_STATUSES_IGNORE));
    if (outcount > 0) {
      std::size_t j = 0;
      for (std::size_t i = 0; i < send_requests.size(); ++i)
        if (send_requests[i] != MPI_REQUEST_NULL) {
          send_requests[j] = send_requests[i];
          std::swap(send_buffers[j], send_buffers[i]);
          ++j;
        }
      send_requests.resize(j);
      send_buffers.resize(j);
    }
    return send_requests.empty();
  }

  // Waits (polling, watching for notices) until every send is done or `limit` passes.
  void complete_sends(std::chrono::milliseconds limit) {
    const auto deadline = clock::now() + limit;
    backoff b;
    while (!sweep()) {
      if (world->poll() || clock::now() >= deadline) return;
      b.pause();
    }
  }

  void release_sends() noexcept {
    for (std::size_t i = 0; i < send_requests.size(); ++i) {
      MPI_Request_free(&send_requests[i]);
      try {
        keep_forever(std::move(send_buffers[i]));
      } catch (...) {
      }
    }
    send_requests.clear();
    send_buffers.clear();
  }

  std::shared_ptr<detail_mpi::world> world;
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0, size = 1;
  int tag_ub = 32767;
  bool is_run_comm = true;        // the communicator run() made (not a split)
  std::vector<int> run_ranks;     // rank here -> rank in the run's communicator
  const char* context = nullptr;  // the collective a point-to-point call belongs to
  bool abandoned_collective = false;
  std::vector<MPI_Request> send_requests;
  std::vector<std::vector<std::byte>> send_buffers;
  std::vector<int> indices;
};

template <class T>
inline constexpr bool reducible_by_mpi = std::is_arithmetic_v<T> && !std::is_same_v<T, bool>;

// 1: MPI_SUM, 2: MPI_MAX, 0: not a built-in MPI operation.
template <class T, class Op>
inline constexpr int builtin_op =
    !reducible_by_mpi<T>                                                  ? 0
    : std::is_same_v<Op, std::plus<>> || std::is_same_v<Op, std::plus<T>> ? 1
    : std::is_same_v<Op, max_op>                                          ? 2
                                                                          : 0;

template <class T>
MPI_Datatype builtin_type() {
  if constexpr (std::is_same_v<T, float>)
    return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>)
    return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, long double>)
    return MPI_LONG_DOUBLE;
  else if constexpr (std::is_signed_v<T>) {
    static_assert(sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8);
    if constexpr (sizeof(T) == 1) return MPI_INT8_T;
    if constexpr (sizeof(T) == 2) return MPI_INT16_T;
    if constexpr (sizeof(T) == 4) return MPI_INT32_T;
    if constexpr (sizeof(T) == 8) return MPI_INT64_T;
  } else {
    static_assert(sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8);
    if constexpr (sizeof(T) == 1) return MPI_UINT8_T;
    if constexpr (sizeof(T) == 2) return MPI_UINT16_T;
    if constexpr (sizeof(T) == 4) return MPI_UINT32_T;
    if constexpr (sizeof(T) == 8) return MPI_UINT64_T;
  }
}

// MPI_User_function for a stateless operator over elements of T, stored as sizeof(T) bytes:
// inout[i] = op(in[i], inout[i]).
template <class T, class Op>
void user_op(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const std::byte*>(in);
  auto* b = static_cast<std::byte*>(inout);
  for (int i = 0; i < *len; ++i, a += sizeof(T), b += sizeof(T)) {
    std::array<std::byte, sizeof(T)> x, y;
    std::memcpy(x.data(), a, sizeof(T));
    std::memcpy(y.data(), b, sizeof(T));
    const T r = static_cast<T>(Op{}(std::bit_cast<T>(x), std::bit_cast<T>(y)));
    std::memcpy(b, &r, sizeof(T));
  }
}

}  // namespace detail_mpi

class mpi {
 public:
  // A started isend/irecv; wait() completes it. The caller's buffer stays in use until then.
  class request {
   public:
    request() = default;

   private:
    friend class mpi;
    MPI_Request req_ = MPI_REQUEST_NULL;
    std::size_t bytes_ = 0;
    int peer_ = -1;
    int tag_ = 0;
    bool recv_ = false;
  };

  // Collective over `comm`: duplicates it twice (data and control). Without run(), timeouts and
  // notices still fail operations, but an exception in the caller's code reaches the other
  // ranks only through report_failure().
  explicit mpi(MPI_Comm comm, mpi_options options = {})
      : world_(std::make_shared<detail_mpi::world>(options)) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized || detail_mpi::finalized())
      fail("pipit: comm::mpi needs MPI to be initialized (MPI_Init) and not finalized");
    PIPIT_MPI_CHECK(MPI_Comm_rank(comm, &world_->rank));
    PIPIT_MPI_CHECK(MPI_Comm_size(comm, &world_->size));
    // MPI writes the new handles when the requests complete: into storage that outlives a
    // timeout (leaked then).
    auto* handles = new MPI_Comm[2]{MPI_COMM_NULL, MPI_COMM_NULL};
    MPI_Request reqs[2];
    PIPIT_MPI_CHECK(MPI_Comm_idup(comm, &handles[0], &reqs[0]));
    PIPIT_MPI_CHECK(MPI_Comm_idup(comm, &handles[1], &reqs[1]));
    const auto deadline = detail_mpi::clock::now() + options.timeout;
    detail_mpi::backoff b;
    for (;;) {
      int done = 0;
      PIPIT_MPI_CHECK(MPI_Testall(2, reqs, &done, MPI_STATUSES_IGNORE));
      if (done) break;
      if (detail_mpi::clock::now() >= deadline)
        fail("pipit: comm::mpi: rank ", world_->rank, " timed out after ", options.timeout.count(),
             " ms duplicating the communicator (MPI_Comm_idup): not every rank of ", world_->size,
             " constructed comm::mpi");
      b.pause();
    }
    world_->control = handles[0];
    const MPI_Comm data = handles[1];
    delete[] handles;
    PIPIT_MPI_CHECK(MPI_Comm_set_errhandler(world_->control, MPI_ERRORS_RETURN));
    attach(data, true);
  }

  // Runs fn(mpi&) on every rank of `comm` with collective failure: if any rank's fn throws or any
  // wait times out, every rank throws pipit::error naming the failed rank (see the top of this
  // file). Returns normally only when every rank's fn returned.
  template <class F>
  static void run(MPI_Comm comm, F&& fn, mpi_options options = {}) {
    mpi c(comm, options);
    const std::shared_ptr<detail_mpi::world> w = c.world_;
    try {
      std::forward<F>(fn)(c);
      if (c.ch_) c.flush();  // (fn may have moved the communicator away)
    } catch (const std::exception& e) {
      note_failure(*w, e.what());
    } catch (...) {
      note_failure(*w, "a non-standard exception");
    }
    c = mpi();  // frees the data communicator
    finish(*w);
  }

  int rank() const noexcept { return ch_->rank; }
  int size() const noexcept { return ch_->size; }
  // This rank in the communicator given to run() or to the constructor.
  int run_rank() const noexcept { return world_->rank; }
  const mpi_options& options() const noexcept { return world_->options; }
  // The data communicator (a duplicate), for calls pipit does not wrap.
  MPI_Comm native_handle() const noexcept { return ch_->comm; }

  // Tells every rank that this one failed; their operations (and this rank's) raise from now on.
  void report_failure(std::string_view what) { note_failure(*world_, what); }

 private:
  static void note_failure(detail_mpi::world& w, std::string_view what) {
    w.poll();
    if (!w.failed) {
      w.fail_here(detail::concat("rank ", w.rank, " failed: ", what));
      w.report = "pipit: comm::mpi: " + w.failure;
    } else if (w.report.empty()) {
      w.report = detail::concat("pipit: comm::mpi: ", w.failure, " (raised on rank ", w.rank,
                                " after its own error: ", what, ")");
    }
  }

 public:
  // ---- point-to-point --------------------------------------------------------------------------

  template <class T>
  void send(std::span<const T> data, int peer, int tag) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    enter("send", peer);
    check_peer(peer, "send");
    check_tag(tag, "send");
    const auto bytes = std::as_bytes(data);
    std::vector<std::byte> buffer(bytes.begin(), bytes.end());
    MPI_Request r = MPI_REQUEST_NULL;
    PIPIT_MPI_CHECK(MPI_Isend(buffer.data(), detail_mpi::count_of(buffer.size(), "send"), MPI_BYTE,
                              peer, tag, ch_->comm, &r));
    ch_->send_requests.push_back(r);
    ch_->send_buffers.push_back(std::move(buffer));  // the heap block does not move
  }
  template <class T>
  void send(std::span<T> data, int peer, int tag) {
    send(std::span<const T>(data), peer, tag);
  }

  template <class T>
  void recv(std::span<T> data, int peer, int tag) {
    request r = start_recv(data, peer, tag, "recv");
    complete(r, "recv");
  }

  // Sends straight from the caller's buffer (no copy): it must stay untouched until wait().
  template <class T>
  request isend(std::span<const T> data, int peer, int tag) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    enter("isend", peer);
    check_peer(peer, "isend");
    check_tag(tag, "isend");
    request r;
    r.bytes_ = data.size_bytes();
    r.peer_ = peer;
    r.tag_ = tag;
    PIPIT_MPI_CHECK(MPI_Isend(data.data(), detail_mpi::count_of(r.bytes_, "isend"), MPI_BYTE, peer,
                              tag, ch_->comm, &r.req_));
    return r;
  }
  template <class T>
  request isend(std::span<T> data, int peer, int tag) {
    return isend(std::span<const T>(data), peer, tag);
  }

  template <class T>
  request irecv(std::span<T> data, int peer, int tag) {
    return start_recv(data, peer, tag, "irecv");
  }

  void wait(request& r) { complete(r, r.recv_ ? "wait(irecv)" : "wait(isend)"); }

  // Posts every receive and send of a step, then waits for all of them (MPI_Testsome polling).
  // Sends read the caller's buffers directly.
  void exchange(std::span<p2p_op> ops) {
    enter("exchange", -1);
    const std::size_t n = ops.size();
    std::vector<MPI_Request> reqs(n, MPI_REQUEST_NULL);
    std::vector<MPI_Status> statuses(n);
    std::vector<int> indices(n);
    std::vector<MPI_Status> finished(n);
    for (const p2p_op& op : ops) {
      const char* what = op.what == p2p_op::kind::recv ? "exchange(recv)" : "exchange(send)";
      check_peer(op.peer, what);
      check_tag(op.tag, what);
      detail_mpi::count_of(op.buffer.size(), what);
    }
    for (std::size_t pass = 0; pass < 2; ++pass)  // receives first, then sends
      for (std::size_t i = 0; i < n; ++i) {
        const p2p_op& op = ops[i];
        const bool is_recv = op.what == p2p_op::kind::recv;
        if (is_recv != (pass == 0)) continue;
        const int count = static_cast<int>(op.buffer.size());
        try {
          if (is_recv)
            PIPIT_MPI_CHECK(
                MPI_Irecv(op.buffer.data(), count, MPI_BYTE, op.peer, op.tag, ch_->comm, &reqs[i]));
          else
            PIPIT_MPI_CHECK(
                MPI_Isend(op.buffer.data(), count, MPI_BYTE, op.peer, op.tag, ch_->comm, &reqs[i]));
        } catch (...) {
          abandon_requests(ops, reqs);
          throw;
        }
      }
    std::size_t left = 0;
    for (const MPI_Request& r : reqs) left += r != MPI_REQUEST_NULL;
    progress(
        [&] {
          if (left == 0) return true;
          int outcount = 0;
          PIPIT_MPI_CHECK(MPI_Testsome(static_cast<int>(n), reqs.data(), &outcount, indices.data(),
                                       statuses.data()));
          if (outcount == MPI_UNDEFINED) return true;
          for (int k = 0; k < outcount; ++k)
            finished[static_cast<std::size_t>(indices[static_cast<std::size_t>(k)])] =
                statuses[static_cast<std::size_t>(k)];
          left -= static_cast<std::size_t>(outcount);
          return left == 0;
        },
        [&] { abandon_requests(ops, reqs); }, "exchange", -1,
        [&] {
          std::string s = detail::concat(" with ", left, " of ", n, " operations incomplete:");
          for (std::size_t i = 0; i < n; ++i)
            if (reqs[i] != MPI_REQUEST_NULL)
              s += detail::concat(ops[i].what == p2p_op::kind::recv ? " recv from " : " send to ",
                                  name_rank(ops[i].peer), " (tag ", ops[i].tag, ")");
          return s;
        });
    for (std::size_t i = 0; i < n; ++i)
      if (ops[i].what == p2p_op::kind::recv)
        check_received(finished[i], ops[i].buffer.size(), "exchange(recv)", ops[i].peer,
                       ops[i].tag);
  }

  // ---- collectives -----------------------------------------------------------------------------

  template <class T, class Op>
  void all_reduce(std::span<T> data, Op op) {
    if (const auto& a = options().all_reduce) return all_reduce(data, op, *a);
    reduce_impl(data, op, -1, "all_reduce");
  }
  template <class T, class Op>
  void all_reduce(std::span<T> data, Op op, all_reduce_algorithm algorithm) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    const scoped_context in(*ch_, algorithm == all_reduce_algorithm::ring   ? "all_reduce (ring)"
                                  : algorithm == all_reduce_algorithm::tree ? "all_reduce (tree)"
                                                                            : "all_reduce (star)");
    all_reduce_with(algorithm, *this, data, op);
  }
  template <class T, class Op>
  void reduce(std::span<T> data, Op op, int root) {
    check_root(root, "reduce");
    reduce_impl(data, op, root, "reduce");
  }

  template <class T>
  void broadcast(std::span<T> data, int root) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    enter("broadcast", -1);
    check_root(root, "broadcast");
    if (size() == 1 || data.empty()) return;
    const auto bytes = as_writable_bytes(data);
    std::vector<std::byte> buffer(bytes.begin(), bytes.end());
    MPI_Request r = MPI_REQUEST_NULL;
    PIPIT_MPI_CHECK(MPI_Ibcast(buffer.data(), detail_mpi::count_of(buffer.size(), "broadcast"),
                               MPI_BYTE, root, ch_->comm, &r));
    await_collective(r, buffer, "broadcast", "MPI_Ibcast");
    std::memcpy(bytes.data(), buffer.data(), buffer.size());
  }

  // Rank r's `mine` lands at out[r * mine.size() ...].
  template <class T>
  void all_gather(std::span<const T> mine, std::span<T> out) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    enter("all_gather", -1);
    const std::size_t n = mine.size();
    if (out.size() != n * static_cast<std::size_t>(size()))
      fail("pipit: all_gather: output has ", out.size(), " elements, expected ", n, " x ", size());
    if (n == 0) return;
    // One buffer: this rank's block in its place, gathered in place.
    std::vector<std::byte> buffer(out.size_bytes());
    std::memcpy(buffer.data() + static_cast<std::size_t>(rank()) * mine.size_bytes(), mine.data(),
                mine.size_bytes());
    const int count = detail_mpi::count_of(mine.size_bytes(), "all_gather");
    detail_mpi::count_of(buffer.size(), "all_gather");
    MPI_Request r = MPI_REQUEST_NULL;
    PIPIT_MPI_CHECK(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buffer.data(), count,
                                   MPI_BYTE, ch_->comm, &r));
    await_collective(r, buffer, "all_gather", "MPI_Iallgather");
    std::memcpy(out.data(), buffer.data(), buffer.size());
  }
  template <class T>
  void all_gather(std::span<T> mine, std::span<T> out) {
    all_gather(std::span<const T>(mine), out);
  }

  void barrier() {
    enter("barrier", -1);
    if (size() == 1) return;
    MPI_Request r = MPI_REQUEST_NULL;
    PIPIT_MPI_CHECK(MPI_Ibarrier(ch_->comm, &r));
    std::vector<std::byte> none;
    await_collective(r, none, "barrier", "MPI_Ibarrier");
  }

  // Collective: ranks with the same color (>= 0) form a new communicator, ordered by (key,
  // rank). It shares this one's failure handling: a failure in any group reaches every rank of
  // the run.
  mpi split(int color, int key) {
    enter("split", -1);
    if (color < 0) fail("pipit: comm::mpi: split: color must be >= 0, got ", color);
    // Meet every rank first (polled, with the timeout), so that MPI_Comm_split cannot hang.
    const int mine[2] = {color, key};
    std::vector<int> all(2 * static_cast<std::size_t>(size()));
    {
      const scoped_context in(*ch_, "split");
      all_gather(std::span<const int>(mine), std::span<int>(all));
    }
    MPI_Comm out = MPI_COMM_NULL;
    PIPIT_MPI_CHECK(MPI_Comm_split(ch_->comm, color, key, &out));
    mpi group;
    group.world_ = world_;
    group.attach(out, false);
    return group;
  }

  // Completes every buffered send (polling, with the timeout).
  void flush() {
    enter("flush", -1);
    progress([&] { return ch_->sweep(); }, [] {}, "flush", -1,
             [&] {
               return detail::concat(" with ", ch_->send_requests.size(),
                                     " send(s) not yet received by their peers");
             });
  }

 private:
  mpi() = default;

  struct scoped_context {
    scoped_context(detail_mpi::channel& c, const char* what) : c_(c), saved_(c.context) {
      if (!c.context) c.context = what;
    }
    ~scoped_context() { c_.context = saved_; }
    scoped_context(const scoped_context&) = delete;
    scoped_context& operator=(const scoped_context&) = delete;
    detail_mpi::channel& c_;
    const char* saved_;
  };

  template <class T>
  request start_recv(std::span<T> data, int peer, int tag, const char* what) {
    enter(what, peer);
    check_peer(peer, what);
    check_tag(tag, what);
    const auto out = as_writable_bytes(data);
    request r;
    r.bytes_ = out.size();
    r.peer_ = peer;
    r.tag_ = tag;
    r.recv_ = true;
    PIPIT_MPI_CHECK(MPI_Irecv(out.data(), detail_mpi::count_of(r.bytes_, what), MPI_BYTE, peer, tag,
                              ch_->comm, &r.req_));
    return r;
  }

  void attach(MPI_Comm data, bool is_run_comm) {
    ch_ = std::make_unique<detail_mpi::channel>();
    ch_->world = world_;
    ch_->comm = data;
    ch_->is_run_comm = is_run_comm;
    PIPIT_MPI_CHECK(MPI_Comm_set_errhandler(data, MPI_ERRORS_RETURN));
    PIPIT_MPI_CHECK(MPI_Comm_rank(data, &ch_->rank));
    PIPIT_MPI_CHECK(MPI_Comm_size(data, &ch_->size));
    // MPI_TAG_UB is a property of the MPI library, cached only on MPI_COMM_WORLD: a split or
    // duplicated communicator has no such attribute (Open MPI then reports none).
    void* attr = nullptr;
    int flag = 0;
    PIPIT_MPI_CHECK(MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &attr, &flag));
    if (flag && attr) ch_->tag_ub = *static_cast<int*>(attr);
    ch_->run_ranks.resize(static_cast<std::size_t>(ch_->size));
    if (is_run_comm) {
      for (int q = 0; q < ch_->size; ++q) ch_->run_ranks[static_cast<std::size_t>(q)] = q;
    } else {
      MPI_Group mine = MPI_GROUP_NULL, run = MPI_GROUP_NULL;
      PIPIT_MPI_CHECK(MPI_Comm_group(data, &mine));
      PIPIT_MPI_CHECK(MPI_Comm_group(world_->control, &run));
      std::vector<int> here(static_cast<std::size_t>(ch_->size));
      for (int q = 0; q < ch_->size; ++q) here[static_cast<std::size_t>(q)] = q;
      PIPIT_MPI_CHECK(
          MPI_Group_translate_ranks(mine, ch_->size, here.data(), run, ch_->run_ranks.data()));
      MPI_Group_free(&mine);
      MPI_Group_free(&run);
    }
  }

  // "rank 3", or "rank 3 (rank 1 of its group)" for a communicator made by split().
  std::string name_rank(int q) const {
    const int r = q >= 0 && q < size() ? ch_->run_ranks[static_cast<std::size_t>(q)] : q;
    if (ch_->is_run_comm) return detail::concat("rank ", r);
    return detail::concat("rank ", r, " (rank ", q, " of its group)");
  }

  std::string operation(const char* what) const {
    return ch_->context ? detail::concat(what, " in ", ch_->context) : std::string(what);
  }

  [[noreturn]] void raise(const char* what, int peer) {
    auto& w = *world_;
    std::string text = "pipit: comm::mpi: " + w.failure;
    if (w.failed_rank != w.rank)
      text += detail::concat(" (raised on ", name_rank(rank()), " during ", operation(what),
                             peer >= 0 ? " with " + name_rank(peer) : std::string(), ")");
    if (w.report.empty()) w.report = text;
    throw error(text);
  }

  // Start of every operation: raise if the group has failed; complete finished sends.
  void enter(const char* what, int peer) {
    if (world_->poll()) raise(what, peer);
    ch_->sweep();
  }

  // Polls test() until it returns true; on a notice or at the deadline, calls abandon() and
  // raises (a timeout is first reported to every rank).
  template <class Test, class Abandon, class Detail>
  void progress(Test&& test, Abandon&& abandon, const char* what, int peer, Detail&& detail) {
    const auto timeout = world_->timeout();
    const auto deadline = detail_mpi::clock::now() + timeout;
    detail_mpi::backoff b;
    for (;;) {
      if (test()) return;
      if (world_->poll()) {
        abandon();
        raise(what, peer);
      }
      if (detail_mpi::clock::now() >= deadline) {
        abandon();
        world_->fail_here(detail::concat(name_rank(rank()), " timed out after ", timeout.count(),
                                         " ms in ", operation(what), detail()));
        raise(what, peer);
      }
      b.pause();
    }
  }

  void complete(request& r, const char* what) {
    if (r.req_ == MPI_REQUEST_NULL) return;
    const auto abandon = [&] { abandon_request(r.req_, r.recv_); };
    if (world_->poll()) {
      abandon();
      raise(what, r.peer_);
    }
    MPI_Status st;
    progress(
        [&] {
          int done = 0;
          const int rc = MPI_Test(&r.req_, &done, &st);
          if (rc != MPI_SUCCESS) {
            int cls = 0;
            MPI_Error_class(rc, &cls);
            if (cls == MPI_ERR_TRUNCATE) {
              world_->fail_here(detail::concat(
                  name_rank(rank()), " ", operation(what), " from ", name_rank(r.peer_), " tag ",
                  r.tag_, ": the message is longer than the expected ", r.bytes_, " bytes"));
              raise(what, r.peer_);
            }
            PIPIT_MPI_CHECK(rc);
          }
          return done != 0;
        },
        abandon, what, r.peer_,
        [&] {
          return detail::concat(
              r.recv_ ? " waiting for " : " waiting for its send to be received by ",
              name_rank(r.peer_), " (tag ", r.tag_, ")");
        });
    r.req_ = MPI_REQUEST_NULL;
    if (r.recv_) check_received(st, r.bytes_, what, r.peer_, r.tag_);
  }

  void check_received(const MPI_Status& st, std::size_t expected, const char* what, int peer,
                      int tag) {
    int got = 0;
    MPI_Get_count(&st, MPI_BYTE, &got);
    if (static_cast<std::size_t>(got) == expected) return;
    world_->fail_here(detail::concat(name_rank(rank()), " ", operation(what), " from ",
                                     name_rank(peer), " tag ", tag, ": expected ", expected,
                                     " bytes, got ", got));
    raise(what, peer);
  }

  // A receive is cancelled (and given a moment to settle); a send is released.
  static void abandon_request(MPI_Request& r, bool is_recv) noexcept {
    if (r == MPI_REQUEST_NULL) return;
    if (is_recv) {
      MPI_Cancel(&r);
      const auto until = detail_mpi::clock::now() + std::chrono::milliseconds(200);
      for (;;) {
        int done = 0;
        if (MPI_Test(&r, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || done) break;
        if (detail_mpi::clock::now() >= until) {
          MPI_Request_free(&r);
          break;
        }
        std::this_thread::yield();
      }
    } else {
      MPI_Request_free(&r);
    }
    r = MPI_REQUEST_NULL;
  }

  static void abandon_requests(std::span<p2p_op> ops, std::vector<MPI_Request>& reqs) noexcept {
    for (std::size_t i = 0; i < reqs.size(); ++i)
      abandon_request(reqs[i], ops[i].what == p2p_op::kind::recv);
  }

  // Waits for a nonblocking collective working on `buffer`. MPI cannot cancel those: after a
  // failure the request is left alone and the buffer is kept forever.
  void await_collective(MPI_Request& r, std::vector<std::byte>& buffer, const char* what,
                        const char* call) {
    progress(
        [&] {
          int done = 0;
          PIPIT_MPI_CHECK(MPI_Test(&r, &done, MPI_STATUS_IGNORE));
          return done != 0;
        },
        [&] {
          ch_->abandoned_collective = true;
          detail_mpi::keep_forever(std::move(buffer));
        },
        what, -1,
        [&] {
          return detail::concat(" (", call, " over ", size(), " ranks): not every rank joined");
        });
  }

  template <class T, class Op>
  void reduce_impl(std::span<T> data, Op op, int root, const char* what) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    constexpr int builtin = detail_mpi::builtin_op<T, Op>;
    constexpr bool stateless = std::is_empty_v<Op> && std::is_default_constructible_v<Op>;
    if constexpr (builtin == 0 && !stateless) {
      // An operator with state cannot be an MPI_Op: point-to-point algorithms.
      const scoped_context in(*ch_, what);
      if (root < 0)
        ring_all_reduce(*this, data, op);
      else
        star_reduce(*this, data, op, root);
    } else {
      (void)op;
      enter(what, -1);
      if (size() == 1 || data.empty()) return;
      const int count = detail_mpi::count_of(data.size(), what);
      const auto bytes = as_writable_bytes(data);
      std::vector<std::byte> buffer(bytes.begin(), bytes.end());
      MPI_Datatype type = MPI_DATATYPE_NULL;
      MPI_Op mop = MPI_OP_NULL;
      if constexpr (builtin != 0) {
        type = detail_mpi::builtin_type<T>();
        mop = builtin == 1 ? MPI_SUM : MPI_MAX;
      } else {
        PIPIT_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(sizeof(T)), MPI_BYTE, &type));
        PIPIT_MPI_CHECK(MPI_Type_commit(&type));
        PIPIT_MPI_CHECK(MPI_Op_create(&detail_mpi::user_op<T, Op>, 1, &mop));
      }
      MPI_Request r = MPI_REQUEST_NULL;
      if (root < 0)
        PIPIT_MPI_CHECK(
            MPI_Iallreduce(MPI_IN_PLACE, buffer.data(), count, type, mop, ch_->comm, &r));
      else if (rank() == root)
        PIPIT_MPI_CHECK(
            MPI_Ireduce(MPI_IN_PLACE, buffer.data(), count, type, mop, root, ch_->comm, &r));
      else
        PIPIT_MPI_CHECK(MPI_Ireduce(buffer.data(), nullptr, count, type, mop, root, ch_->comm, &r));
      // A failed collective keeps its operator and type too (MPI may still use them).
      await_collective(r, buffer, what, root < 0 ? "MPI_Iallreduce" : "MPI_Ireduce");
      if constexpr (builtin == 0) {
        MPI_Op_free(&mop);
        MPI_Type_free(&type);
      }
      if (root < 0 || rank() == root) std::memcpy(bytes.data(), buffer.data(), buffer.size());
    }
  }

  void check_peer(int peer, const char* what) const {
    if (peer < 0 || peer >= size() || peer == rank())
      fail("pipit: comm::mpi: ", name_rank(rank()), " ", what, ": bad peer ", peer, " (size ",
           size(), ")");
  }
  void check_root(int root, const char* what) const {
    if (root < 0 || root >= size())
      fail("pipit: comm::mpi: ", name_rank(rank()), " ", what, ": bad root ", root, " (size ",
           size(), ")");
  }
  void check_tag(int tag, const char* what) const {
    if (tag < 0 || tag > ch_->tag_ub)
      fail("pipit: comm::mpi: ", name_rank(rank()), " ", what, ": tag ", tag,
           " is outside MPI's range 0..", ch_->tag_ub, " (MPI_TAG_UB)");
  }

  // run()'s last step on every rank: one agreement on whether anyone failed.
  static void finish(detail_mpi::world& w) {
    using detail_mpi::clock;
    w.poll();
    // (ok, lowest failed rank); on the heap: an agreement left running must not write into a
    // stack frame that is gone.
    std::unique_ptr<int[]> held(new int[2]{w.failed ? 0 : 1, w.failed ? w.failed_rank : w.size});
    int* const vals = held.get();
    MPI_Request r = MPI_REQUEST_NULL;
    if (MPI_Iallreduce(MPI_IN_PLACE, vals, 2, MPI_INT, MPI_MIN, w.control, &r) != MPI_SUCCESS) {
      w.control_busy = true;
      held.release();
      w.fail_here(detail::concat("rank ", w.rank, " could not start run()'s final agreement"));
      abort_or_throw(w, "run()'s final agreement could not start");
    }
    const auto ack = w.acknowledge_timeout();
    auto failed_since = clock::now();
    auto deadline = clock::now() + (w.failed ? ack : w.timeout());
    bool was_failed = w.failed, printed = false;
    detail_mpi::backoff b;
    for (;;) {
      int done = 0;
      if (MPI_Test(&r, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) break;
      if (done) break;
      const auto now = clock::now();
      w.poll();
      if (!was_failed && w.failed) {  // a notice arrived while waiting
        was_failed = true;
        failed_since = now;
        deadline = now + ack;
      }
      if (!w.failed && now >= deadline) {
        w.fail_here(
            detail::concat("rank ", w.rank, " timed out after ", w.timeout().count(),
                           " ms at the end of run() waiting for the other ranks to finish"));
        was_failed = true;
        failed_since = now;
        deadline = now + ack;
      }
      if (w.failed && !printed && now - failed_since >= std::min(ack / 2, decltype(ack)(250))) {
        if (w.report.empty()) w.report = "pipit: comm::mpi: " + w.failure;
        std::fprintf(stderr,
                     "pipit: comm::mpi: rank %d: %s (waiting up to %lld ms for every rank "
                     "to acknowledge the failure)\n",
                     w.rank, w.report.c_str(), static_cast<long long>(ack.count()));
        std::fflush(stderr);
        printed = true;
      }
      if (w.failed && now >= deadline) {
        w.control_busy = true;
        held.release();  // leaked on purpose, see above
        abort_or_throw(w, detail::concat("not every rank acknowledged the failure within ",
                                         ack.count(), " ms"));
      }
      b.pause();
    }
    if (vals[0] == 1) return;  // nobody failed (a local timeout that raced the agreement is moot)
    if (!w.failed) {           // another rank failed; its notice is on the way
      const auto until = clock::now() + ack;
      while (!w.poll() && clock::now() < until) b.pause();
      if (!w.failed) {
        w.failed = true;
        w.failed_rank = vals[1];
        w.failure = detail::concat("rank ", vals[1], " failed (its report did not arrive)");
      }
    }
    if (w.report.empty())
      w.report = w.failed_rank == w.rank
                     ? "pipit: comm::mpi: " + w.failure
                     : detail::concat("pipit: comm::mpi: ", w.failure, " (raised on rank ", w.rank,
                                      " at the end of run())");
    w.drain();
    throw error(w.report);
  }

  [[noreturn]] static void abort_or_throw(detail_mpi::world& w, const std::string& why) {
    if (w.report.empty()) w.report = "pipit: comm::mpi: " + w.failure;
    const std::string text = w.report + "; " + why;
    if (w.options.abort_if_unacknowledged) {
      std::fprintf(stderr, "pipit: comm::mpi: rank %d: %s: calling MPI_Abort\n", w.rank,
                   text.c_str());
      std::fflush(stderr);
      MPI_Abort(w.control, 1);
    }
    throw error(text + " (MPI_Finalize may block; consider MPI_Abort)");
  }

  std::shared_ptr<detail_mpi::world> world_;
  std::unique_ptr<detail_mpi::channel> ch_;
};

static_assert(communicator<mpi>);

}  // namespace pipit::comm
