#pragma once
// cuda::nccl_communicator: ranks as GPUs, through NCCL. One communicator per rank (per GPU), each
// with its own CUDA stream on its device. Needs CUDA and NCCL >= 2.18 (link pipit::nccl); it is
// also reachable as pipit::comm::nccl, the name the communication policy uses. It lives in
// pipit::cuda because everything that includes a CUDA header does (one namespace per folder).
//
// It models pipit::comm::communicator with these differences from comm::threads / comm::mpi:
// - Every span is DEVICE memory (cudaMalloc, or managed memory) on the communicator's device.
// - Operations are enqueued on stream(). send() and isend() return once enqueued: the stream
//   reads the buffer later, so write it only on stream() or after synchronize(). recv(),
//   exchange(), wait() and the collectives return when the stream has finished the operation
//   (and everything enqueued on stream() before it).
// - NCCL matches point-to-point by peer and order only: tags are accepted for the interface and
//   ignored, so messages between a pair must be received in the order they were sent, whatever
//   their tags. A lone ncclSend may wait on the device for its receive, so a step that both sends
//   and receives must use exchange() (one ncclGroupStart/End) or isend/irecv in an order both
//   peers share; the send-then-receive algorithms of collectives.hpp do not apply (they also read
//   the buffers on the host).
// - all_reduce / reduce: std::plus and max_op on the types NCCL knows (int8/uint8, int32/uint32,
//   int64/uint64, float, double, __half, __nv_bfloat16) use ncclAllReduce / ncclReduce with
//   ncclSum / ncclMax; NCCL's algorithms reduce each element once and send the result to every
//   rank (16-bit sums round to the 16-bit type at each step of NCCL's reduction). NCCL has no user
//   operators: any other operator (the vocabulary layers' (max, sum-exp) merge) or element type is
//   done by ncclAllGather into a temporary of size x ranks, then a kernel that combines the ranks'
//   values in rank order, so every rank computes bit-identical results. The operator must be
//   callable on the device (PIPIT_HOST_DEVICE) and trivially copyable; memory and traffic grow
//   with the rank count, so keep such reductions small (statistics, not gradients).
// - Failure: every wait polls the stream (cudaStreamQuery) and ncclCommGetAsyncError until
//   nccl_options::timeout; on an asynchronous NCCL error or a timeout the communicator is
//   aborted (ncclCommAbort) and pipit::error names the rank, the operation and the peer. Later
//   operations raise too. A peer waiting on an aborted rank times out in turn. To turn a host
//   exception on one rank into an error on every rank, run the program inside
//   pipit::comm::mpi::run (comm/mpi_communicator.hpp).
// - Construction is blocking (ncclCommInitRank / ncclCommInitAll wait for every rank).
// - Overlap with compute: the *_async collectives only enqueue on stream(), and wait_for(s) /
//   signal(s) order stream() after / before another stream with an event (no host round trip):
//     comm.wait_for(compute);                          // the statistics are written on compute
//     comm.all_reduce_async(layer.stats(), vocab::merge_op{});
//     comm.signal(compute);                            // compute's later work sees the result
//   Asynchronous NCCL errors then surface at the next blocking call (synchronize(), a blocking
//   collective, wait()).
//
// Making communicators:
//   // one process per GPU: the unique id travels through MPI (or any host communicator) ...
//   pipit::comm::mpi::run(MPI_COMM_WORLD, [&](pipit::comm::mpi& host) {
//     const ncclUniqueId id = pipit::cuda::nccl_unique_id(host);
//     pipit::cuda::nccl_communicator comm(id, host.size(), host.rank(), local_device);
//   });
//   // ... or through a file every rank can read (a new path for every job):
//   const ncclUniqueId id = pipit::cuda::nccl_unique_id_from_file("/shared/job42.ncclid", rank);
//   // one process, one thread per GPU:
//   auto comms = pipit::cuda::nccl_communicator::init_all(std::vector<int>{0, 1, 2, 3});

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/nccl_check.cuh"

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 18, 0)
#error "pipit::cuda::nccl_communicator needs NCCL >= 2.18 (ncclCommSplit)"
#endif

namespace pipit::cuda {

struct nccl_options {
  // A wait longer than this aborts the communicator and raises pipit::error.
  std::chrono::milliseconds timeout{60000};
};

namespace detail_nccl {

using clock = std::chrono::steady_clock;

// 16-bit floats: NCCL has had ncclFloat16 and ncclBfloat16 (sum, max) since 2.10; mapping them
// keeps a 16-bit gradient reduction (the vocabulary layers' IF and T reduces) a real reduce
// instead of the all-gather fallback, whose memory and traffic grow with the rank count.
template <class T>
constexpr bool has_nccl_type() {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) return true;
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) return true;
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>)
    return sizeof(T) == 1 || sizeof(T) == 4 || sizeof(T) == 8;
  return false;
}

template <class T>
constexpr ncclDataType_t nccl_type() {
  static_assert(has_nccl_type<T>());
  if constexpr (std::is_same_v<T, float>) return ncclFloat32;
  if constexpr (std::is_same_v<T, double>) return ncclFloat64;
  if constexpr (std::is_same_v<T, __half>) return ncclFloat16;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return ncclBfloat16;
  if constexpr (std::is_integral_v<T> && std::is_signed_v<T>)
    return sizeof(T) == 1 ? ncclInt8 : sizeof(T) == 4 ? ncclInt32 : ncclInt64;
  if constexpr (std::is_integral_v<T> && std::is_unsigned_v<T>)
    return sizeof(T) == 1 ? ncclUint8 : sizeof(T) == 4 ? ncclUint32 : ncclUint64;
  return ncclInt8;
}

// 1: ncclSum, 2: ncclMax, 0: not an NCCL operation (gathered and merged instead).
template <class T, class Op>
inline constexpr int builtin_op =
    !has_nccl_type<T>()                                                   ? 0
    : std::is_same_v<Op, std::plus<>> || std::is_same_v<Op, std::plus<T>> ? 1
    : std::is_same_v<Op, comm::max_op>                                    ? 2
                                                                          : 0;

// out[i] = op(...op(op(g[0][i], g[1][i]), g[2][i])..., g[ranks-1][i]): rank order, on every rank.
template <class T, class Op>
__global__ void merge_gathered(const T* gathered, T* out, std::size_t n, int ranks, Op op) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    T acc = gathered[i];
    for (int q = 1; q < ranks; ++q) acc = op(acc, gathered[static_cast<std::size_t>(q) * n + i]);
    out[i] = acc;
  }
}

// Makes `device` current for a scope and restores the previous one.
class device_guard {
 public:
  explicit device_guard(int device) {
    PIPIT_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) PIPIT_CUDA_CHECK(cudaSetDevice(device));
  }
  ~device_guard() { (void)cudaSetDevice(previous_); }
  device_guard(const device_guard&) = delete;
  device_guard& operator=(const device_guard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace detail_nccl

class nccl_communicator {
 public:
  // A started isend/irecv: an event recorded after it on the stream; wait() polls it.
  class request {
   public:
    request() = default;
    request(request&& o) noexcept { swap(o); }
    request& operator=(request&& o) noexcept {
      request t(std::move(o));
      swap(t);
      return *this;
    }
    ~request() {
      if (event_) (void)cudaEventDestroy(event_);
    }

   private:
    friend class nccl_communicator;
    void swap(request& o) noexcept {
      std::swap(event_, o.event_);
      std::swap(peer_, o.peer_);
      std::swap(recv_, o.recv_);
    }
    cudaEvent_t event_ = nullptr;
    int peer_ = -1;
    bool recv_ = false;
  };

  // One rank of `nranks`, on `device`; every rank calls this with the same id (blocking).
  nccl_communicator(ncclUniqueId id, int nranks, int rank, int device, nccl_options options = {})
      : options_(options), device_(device) {
    if (nranks < 1 || rank < 0 || rank >= nranks)
      fail("pipit: cuda::nccl_communicator: rank ", rank, " of ", nranks, " is not a valid rank");
    detail_nccl::device_guard on(device_);
    PIPIT_NCCL_CHECK(ncclCommInitRank(&comm_, nranks, id, rank));
    finish_setup();
  }

  // Every device of `devices` as one rank (rank i on devices[i]) of one communicator, in this
  // process (ncclCommInitAll). Drive each from its own thread, or group the calls.
  static std::vector<nccl_communicator> init_all(std::span<const int> devices,
                                                 nccl_options options = {}) {
    if (devices.empty()) fail("pipit: cuda::nccl_communicator::init_all: no devices");
    std::vector<ncclComm_t> raw(devices.size(), nullptr);
    PIPIT_NCCL_CHECK(ncclCommInitAll(raw.data(), static_cast<int>(devices.size()), devices.data()));
    std::vector<nccl_communicator> out;
    out.reserve(devices.size());
    for (std::size_t i = 0; i < devices.size(); ++i)
      out.push_back(nccl_communicator(raw[i], devices[i], options));
    return out;
  }

  nccl_communicator(nccl_communicator&& o) noexcept { swap(o); }
  nccl_communicator& operator=(nccl_communicator&& o) noexcept {
    nccl_communicator t(std::move(o));
    swap(t);
    return *this;
  }
  nccl_communicator(const nccl_communicator&) = delete;
  nccl_communicator& operator=(const nccl_communicator&) = delete;

  ~nccl_communicator() {
    if (!comm_) return;
    int previous = device_;
    (void)cudaGetDevice(&previous);
    (void)cudaSetDevice(device_);
    bool idle = false;
    if (!aborted_) {  // let enqueued work finish (bounded by the timeout), then leave cleanly
      const auto deadline = detail_nccl::clock::now() + options_.timeout;
      for (;;) {
        const cudaError_t e = cudaStreamQuery(stream_);
        if (e == cudaSuccess) {
          idle = true;
          break;
        }
        ncclResult_t async = ncclSuccess;
        if (e != cudaErrorNotReady || detail_nccl::clock::now() >= deadline ||
            ncclCommGetAsyncError(comm_, &async) != ncclSuccess ||
            (async != ncclSuccess && async != ncclInProgress))
          break;
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    }
    if (idle)
      (void)ncclCommDestroy(comm_);
    else if (!aborted_)
      (void)ncclCommAbort(comm_);
    if (scratch_) (void)cudaFree(scratch_);
    if (order_) (void)cudaEventDestroy(order_);
    if (stream_) (void)cudaStreamDestroy(stream_);
    (void)cudaSetDevice(previous);
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  int device() const noexcept { return device_; }
  cudaStream_t stream() const noexcept { return stream_; }
  ncclComm_t native_handle() const noexcept { return comm_; }
  const nccl_options& options() const noexcept { return options_; }

  // Work enqueued on stream() from now on starts after the work enqueued on `producer` so far.
  void wait_for(cudaStream_t producer) {
    check_usable("wait_for");
    if (producer == stream_) return;
    detail_nccl::device_guard on(device_);
    PIPIT_CUDA_CHECK(cudaEventRecord(order_, producer));
    PIPIT_CUDA_CHECK(cudaStreamWaitEvent(stream_, order_, 0));
  }
  // Work enqueued on `consumer` from now on starts after the work enqueued on stream() so far.
  void signal(cudaStream_t consumer) {
    check_usable("signal");
    if (consumer == stream_) return;
    detail_nccl::device_guard on(device_);
    PIPIT_CUDA_CHECK(cudaEventRecord(order_, stream_));
    PIPIT_CUDA_CHECK(cudaStreamWaitEvent(consumer, order_, 0));
  }

  // Waits until everything enqueued on stream() is done.
  void synchronize() {
    check_usable("synchronize");
    detail_nccl::device_guard on(device_);
    wait_stream("synchronize", -1);
  }
  // Waits until the work enqueued on `other` so far (a stream on this device, e.g. one that
  // waits for this communicator's collectives through signal()) is done, under the same rule as
  // every wait here: NCCL's asynchronous errors and nccl_options::timeout abort the communicator
  // and raise pipit::error naming `what`. A plain cudaStreamSynchronize(other) would hang for
  // ever behind a collective whose peer died.
  void synchronize(cudaStream_t other, const char* what) {
    check_usable(what);
    detail_nccl::device_guard on(device_);
    cudaEvent_t done = nullptr;
    PIPIT_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    const auto destroy = [&] { (void)cudaEventDestroy(done); };
    try {
      PIPIT_CUDA_CHECK(cudaEventRecord(done, other));
      wait_until(
          [&] {
            const cudaError_t e = cudaEventQuery(done);
            if (e == cudaErrorNotReady) return false;
            PIPIT_CUDA_CHECK(e);
            return true;
          },
          what, -1);
    } catch (...) {
      destroy();
      throw;
    }
    destroy();
  }

  // ---- point-to-point ---------------------------------------------------------------------------

  template <class T>
  void send(std::span<const T> data, int peer, int tag) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    check_p2p(peer, tag, "send");
    detail_nccl::device_guard on(device_);
    PIPIT_NCCL_CHECK(ncclSend(data.data(), data.size_bytes(), ncclInt8, peer, comm_, stream_));
  }
  template <class T>
  void send(std::span<T> data, int peer, int tag) {
    send(std::span<const T>(data), peer, tag);
  }

  template <class T>
  void recv(std::span<T> data, int peer, int tag) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    check_p2p(peer, tag, "recv");
    detail_nccl::device_guard on(device_);
    PIPIT_NCCL_CHECK(ncclRecv(data.data(), data.size_bytes(), ncclInt8, peer, comm_, stream_));
    wait_stream("recv", peer);
  }

  template <class T>
  request isend(std::span<const T> data, int peer, int tag) {
    send(data, peer, tag);
    return marked(peer, false);
  }
  template <class T>
  request isend(std::span<T> data, int peer, int tag) {
    return isend(std::span<const T>(data), peer, tag);
  }

  template <class T>
  request irecv(std::span<T> data, int peer, int tag) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    check_p2p(peer, tag, "irecv");
    detail_nccl::device_guard on(device_);
    PIPIT_NCCL_CHECK(ncclRecv(data.data(), data.size_bytes(), ncclInt8, peer, comm_, stream_));
    return marked(peer, true);
  }

  void wait(request& r) {
    if (!r.event_) return;
    check_usable("wait");
    detail_nccl::device_guard on(device_);
    const char* what = r.recv_ ? "wait(irecv)" : "wait(isend)";
    wait_until(
        [&] {
          const cudaError_t e = cudaEventQuery(r.event_);
          if (e == cudaErrorNotReady) return false;
          PIPIT_CUDA_CHECK(e);
          return true;
        },
        what, r.peer_);
    (void)cudaEventDestroy(r.event_);
    r.event_ = nullptr;
  }

  // One step's sends and receives as one NCCL group; returns when all are done.
  void exchange(std::span<comm::p2p_op> ops) {
    if (!exchange_async(ops)) return;
    detail_nccl::device_guard on(device_);
    wait_stream("exchange", -1);
  }

  // The same group, only enqueued on stream() (see wait_for / signal). Returns false when there
  // was nothing to enqueue.
  bool exchange_async(std::span<comm::p2p_op> ops) {
    for (const comm::p2p_op& op : ops)
      check_p2p(op.peer, op.tag,
                op.what == comm::p2p_op::kind::send ? "exchange(send)" : "exchange(recv)");
    if (ops.empty()) return false;
    detail_nccl::device_guard on(device_);
    PIPIT_NCCL_CHECK(ncclGroupStart());
    ncclResult_t status = ncclSuccess;
    for (const comm::p2p_op& op : ops) {
      status =
          op.what == comm::p2p_op::kind::send
              ? ncclSend(op.buffer.data(), op.buffer.size(), ncclInt8, op.peer, comm_, stream_)
              : ncclRecv(op.buffer.data(), op.buffer.size(), ncclInt8, op.peer, comm_, stream_);
      if (status != ncclSuccess) break;
    }
    const ncclResult_t end = ncclGroupEnd();
    PIPIT_NCCL_CHECK(status);
    PIPIT_NCCL_CHECK(end);
    return true;
  }

  // ---- collectives ------------------------------------------------------------------------------

  template <class T, class Op>
  void all_reduce(std::span<T> data, Op op) {
    reduce_impl(data, op, -1, "all_reduce");
    wait_stream("all_reduce", -1);
  }
  // Enqueues only (see wait_for / signal).
  template <class T, class Op>
  void all_reduce_async(std::span<T> data, Op op) {
    reduce_impl(data, op, -1, "all_reduce_async");
  }

  // The result is valid on `root` (with a merge operator, on every rank).
  template <class T, class Op>
  void reduce(std::span<T> data, Op op, int root) {
    check_root(root, "reduce");
    reduce_impl(data, op, root, "reduce");
    wait_stream("reduce", -1);
  }
  template <class T, class Op>
  void reduce_async(std::span<T> data, Op op, int root) {
    check_root(root, "reduce_async");
    reduce_impl(data, op, root, "reduce_async");
  }

  template <class T>
  void broadcast(std::span<T> data, int root) {
    broadcast_async(data, root);
    if (!data.empty()) wait_stream("broadcast", -1);
  }
  template <class T>
  void broadcast_async(std::span<T> data, int root) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    check_usable("broadcast");
    check_root(root, "broadcast");
    if (data.empty()) return;
    detail_nccl::device_guard on(device_);
    PIPIT_NCCL_CHECK(
        ncclBroadcast(data.data(), data.data(), data.size_bytes(), ncclInt8, root, comm_, stream_));
  }

  // Rank r's `mine` lands at out[r * mine.size() ...].
  template <class T>
  void all_gather(std::span<const T> mine, std::span<T> out) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    check_usable("all_gather");
    if (out.size() != mine.size() * static_cast<std::size_t>(size_))
      fail("pipit: all_gather: output has ", out.size(), " elements, expected ", mine.size(), " x ",
           size_);
    if (mine.empty()) return;
    detail_nccl::device_guard on(device_);
    PIPIT_NCCL_CHECK(
        ncclAllGather(mine.data(), out.data(), mine.size_bytes(), ncclInt8, comm_, stream_));
    wait_stream("all_gather", -1);
  }
  template <class T>
  void all_gather(std::span<T> mine, std::span<T> out) {
    all_gather(std::span<const T>(mine), out);
  }

  // NCCL has no barrier: an all-reduce of one integer on the device.
  void barrier() {
    check_usable("barrier");
    detail_nccl::device_guard on(device_);
    PIPIT_NCCL_CHECK(ncclAllReduce(scratch_, scratch_, 1, ncclInt32, ncclSum, comm_, stream_));
    wait_stream("barrier", -1);
  }

  // Collective (ncclCommSplit): ranks with the same color (>= 0) form a new communicator,
  // ordered by (key, rank), on the same device with a new stream.
  nccl_communicator split(int color, int key) {
    check_usable("split");
    if (color < 0) fail("pipit: cuda::nccl_communicator: split: color must be >= 0, got ", color);
    detail_nccl::device_guard on(device_);
    wait_stream("split", -1);
    ncclComm_t out = nullptr;
    PIPIT_NCCL_CHECK(ncclCommSplit(comm_, color, key, &out, nullptr));
    return nccl_communicator(out, device_, options_);
  }

 private:
  nccl_communicator() = default;

  // Adopts a communicator made by ncclCommInitAll or ncclCommSplit.
  nccl_communicator(ncclComm_t comm, int device, nccl_options options)
      : options_(options), comm_(comm), device_(device) {
    detail_nccl::device_guard on(device_);
    finish_setup();
  }

  void finish_setup() {
    PIPIT_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
    PIPIT_NCCL_CHECK(ncclCommCount(comm_, &size_));
    PIPIT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    PIPIT_CUDA_CHECK(cudaMalloc(&scratch_, sizeof(int)));
    PIPIT_CUDA_CHECK(cudaMemset(scratch_, 0, sizeof(int)));
    PIPIT_CUDA_CHECK(cudaEventCreateWithFlags(&order_, cudaEventDisableTiming));
  }

  void swap(nccl_communicator& o) noexcept {
    std::swap(options_, o.options_);
    std::swap(comm_, o.comm_);
    std::swap(stream_, o.stream_);
    std::swap(order_, o.order_);
    std::swap(scratch_, o.scratch_);
    std::swap(device_, o.device_);
    std::swap(rank_, o.rank_);
    std::swap(size_, o.size_);
    std::swap(aborted_, o.aborted_);
  }

  request marked(int peer, bool is_recv) {
    request r;
    r.peer_ = peer;
    r.recv_ = is_recv;
    PIPIT_CUDA_CHECK(cudaEventCreateWithFlags(&r.event_, cudaEventDisableTiming));
    PIPIT_CUDA_CHECK(cudaEventRecord(r.event_, stream_));
    return r;
  }

  void check_usable(const char* what) const {
    if (!comm_) fail("pipit: cuda::nccl_communicator: ", what, " on a moved-from communicator");
    if (aborted_)
      fail("pipit: cuda::nccl_communicator: rank ", rank_, " ", what,
           ": the communicator was aborted after an earlier failure");
  }
  void check_p2p(int peer, int tag, const char* what) const {
    check_usable(what);
    if (peer < 0 || peer >= size_)  // a rank may send to itself (inside a group)
      fail("pipit: cuda::nccl_communicator: rank ", rank_, " ", what, ": bad peer ", peer,
           " (size ", size_, ")");
    if (tag < 0) fail("pipit: cuda::nccl_communicator: rank ", rank_, " ", what, ": bad tag ", tag);
  }
  void check_root(int root, const char* what) const {
    if (root < 0 || root >= size_)
      fail("pipit: cuda::nccl_communicator: rank ", rank_, " ", what, ": bad root ", root,
           " (size ", size_, ")");
  }

  // Polls ready() until it is true; on an asynchronous NCCL error or at the deadline, aborts the
  // communicator and raises.
  template <class Ready>
  void wait_until(Ready&& ready, const char* what, int peer) {
    const auto deadline = detail_nccl::clock::now() + options_.timeout;
    unsigned spins = 0;
    for (;;) {
      if (ready()) return;
      ncclResult_t async = ncclSuccess;
      PIPIT_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
      const std::string with = peer >= 0 ? " with rank " + std::to_string(peer) : std::string();
      if (async != ncclSuccess && async != ncclInProgress) {
        abort_comm();
        fail("pipit: cuda::nccl_communicator: rank ", rank_, " ", what, with,
             ": NCCL reported an asynchronous error: ", ncclGetErrorString(async), " (",
             ncclGetLastError(comm_), "); communicator aborted");
      }
      if (detail_nccl::clock::now() >= deadline) {
        abort_comm();
        fail("pipit: cuda::nccl_communicator: rank ", rank_, " timed out after ",
             options_.timeout.count(), " ms in ", what, with, "; communicator aborted");
      }
      if (++spins > 64) std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  void wait_stream(const char* what, int peer) {
    wait_until(
        [&] {
          const cudaError_t e = cudaStreamQuery(stream_);
          if (e == cudaErrorNotReady) return false;
          PIPIT_CUDA_CHECK(e);
          return true;
        },
        what, peer);
  }

  void abort_comm() noexcept {
    if (!aborted_ && comm_) (void)ncclCommAbort(comm_);
    aborted_ = true;
  }

  template <class T, class Op>
  void reduce_impl(std::span<T> data, Op op, int root, const char* what) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "pipit::comm: elements must be trivially copyable");
    check_usable(what);
    if (data.empty()) return;
    detail_nccl::device_guard on(device_);
    constexpr int builtin = detail_nccl::builtin_op<T, Op>;
    if constexpr (builtin != 0) {
      (void)op;
      const ncclRedOp_t nop = builtin == 1 ? ncclSum : ncclMax;
      if (root < 0)
        PIPIT_NCCL_CHECK(ncclAllReduce(data.data(), data.data(), data.size(),
                                       detail_nccl::nccl_type<T>(), nop, comm_, stream_));
      else
        PIPIT_NCCL_CHECK(ncclReduce(data.data(), data.data(), data.size(),
                                    detail_nccl::nccl_type<T>(), nop, root, comm_, stream_));
    } else {
      static_assert(std::is_trivially_copyable_v<Op>,
                    "pipit::cuda::nccl_communicator: a merge operator is copied to the device: "
                    "it must be trivially copyable (and callable in device code)");
      // NCCL has no user operators: gather every rank's values, combine them in rank order.
      T* gathered = nullptr;
      PIPIT_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&gathered),
                                       data.size_bytes() * static_cast<std::size_t>(size_),
                                       stream_));
      const ncclResult_t status =
          ncclAllGather(data.data(), gathered, data.size_bytes(), ncclInt8, comm_, stream_);
      if (status == ncclSuccess) {
        const std::size_t n = data.size();
        const unsigned blocks = static_cast<unsigned>(std::min<std::size_t>((n + 255) / 256, 1024));
        detail_nccl::merge_gathered<<<blocks, 256, 0, stream_>>>(gathered, data.data(), n, size_,
                                                                 op);
      }
      const cudaError_t launched = cudaGetLastError();
      (void)cudaFreeAsync(gathered, stream_);
      PIPIT_NCCL_CHECK(status);
      PIPIT_CUDA_CHECK(launched);
    }
  }

  nccl_options options_{};
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t order_ = nullptr;  // carries wait_for / signal orderings
  int* scratch_ = nullptr;       // one device int for barrier()
  int device_ = 0;
  int rank_ = 0;
  int size_ = 0;
  bool aborted_ = false;
};

static_assert(comm::communicator<nccl_communicator>);

// ---- bootstrap: every rank needs the same ncclUniqueId ------------------------------------------

// Through any host communicator (comm::mpi, comm::threads): `root` makes the id and broadcasts it.
template <comm::communicator Host>
ncclUniqueId nccl_unique_id(Host& host, int root = 0) {
  ncclUniqueId id{};
  if (host.rank() == root) PIPIT_NCCL_CHECK(ncclGetUniqueId(&id));
  host.broadcast(std::span<ncclUniqueId>(&id, 1), root);
  return id;
}

// Through a file every rank can read: rank 0 makes the id and writes it (to a temporary name,
// then renamed, so no rank reads half a file); the others wait until it appears. Use a new path
// for every job: a file left from an earlier job would hand the other ranks a stale id.
inline ncclUniqueId nccl_unique_id_from_file(
    const std::filesystem::path& file, int rank,
    std::chrono::milliseconds timeout = std::chrono::milliseconds(60000)) {
  ncclUniqueId id{};
  if (rank == 0) {
    PIPIT_NCCL_CHECK(ncclGetUniqueId(&id));
    std::filesystem::path partial = file;
    partial += ".partial";
    {
      std::ofstream out(partial, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(&id), sizeof id);
      if (!out) fail("pipit: cuda: cannot write the NCCL unique id to ", partial.string());
    }
    std::error_code ec;
    std::filesystem::rename(partial, file, ec);
    if (ec)
      fail("pipit: cuda: cannot rename ", partial.string(), " to ", file.string(), ": ",
           ec.message());
    return id;
  }
  const auto deadline = detail_nccl::clock::now() + timeout;
  for (;;) {
    std::error_code ec;
    if (std::filesystem::file_size(file, ec) == sizeof id && !ec) {
      std::ifstream in(file, std::ios::binary);
      in.read(reinterpret_cast<char*>(&id), sizeof id);
      if (in) return id;
    }
    if (detail_nccl::clock::now() >= deadline)
      fail("pipit: cuda: rank ", rank, " waited ", timeout.count(),
           " ms for the NCCL unique id in ", file.string(),
           "; did rank 0 start, and can every rank read that path?");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace pipit::cuda

namespace pipit::comm {
// The communication policy's name for the NCCL backend.
using nccl = pipit::cuda::nccl_communicator;
}  // namespace pipit::comm
