#pragma once
// The communicator concept: what the executor, the vocabulary layers and the collectives need
// from a backend. Backends: comm::threads (ranks as threads of one process), comm::mpi
// (processes, through MPI), comm::nccl (GPUs). Users switch backends by changing a type, not
// their model code.
//
// Semantics every backend keeps:
// - Messages between a pair of ranks with the same tag arrive in the order they were sent.
// - send() may return before the receiver has the data (it is buffered or already delivered);
//   recv() returns when the data is in the buffer.
// - isend()/irecv() start an operation and return a C::request that wait() completes; the
//   buffer must stay alive and untouched until then.
// - exchange() posts a step's sends and receives together and returns when all are done: the
//   grouped point-to-point of a lowered plan's step (one NCCL group, one MPI Waitall).
// - Collectives are called by every rank of the communicator in the same order.
// - Failure is collective: when a rank fails (throws inside a run, or a peer does not answer
//   within the timeout), every rank's pending and later operations raise pipit::error naming
//   the failed rank and the operation. Nothing hangs.
// - Element types are trivially copyable; reductions take a binary operator object
//   (std::plus<>, comm::max_op, or a user merge such as the vocabulary layers' (max, sum-exp)
//   merge), which must be associative and commutative. Every rank receives bit-identical
//   results (one combination order per element, shared by all ranks).

#include <concepts>
#include <cstddef>
#include <functional>
#include <span>
#include <type_traits>
#include <utility>

namespace pipit::comm {

// Element-wise maximum, as a reduction operator.
struct max_op {
  template <class T>
  constexpr T operator()(const T& a, const T& b) const {
    return a < b ? b : a;
  }
};

// One point-to-point operation of a grouped step. Buffers are bytes; the typed helpers in
// backends build these from spans of trivially copyable elements.
struct p2p_op {
  enum class kind { send, recv } what;
  int peer;
  int tag;
  std::span<std::byte> buffer;  // for a send, only read
};

template <class T>
std::span<std::byte> as_writable_bytes(std::span<T> s) noexcept {
  static_assert(std::is_trivially_copyable_v<T>,
                "pipit::comm: elements must be trivially copyable");
  return {reinterpret_cast<std::byte*>(s.data()), s.size_bytes()};
}

template <class T>
p2p_op send_op(std::span<const T> data, int peer, int tag) {
  static_assert(std::is_trivially_copyable_v<T>,
                "pipit::comm: elements must be trivially copyable");
  // The buffer is only read for a send; p2p_op keeps one span type for both directions.
  return {
      p2p_op::kind::send,
      peer,
      tag,
      {const_cast<std::byte*>(reinterpret_cast<const std::byte*>(data.data())), data.size_bytes()}};
}

template <class T>
p2p_op recv_op(std::span<T> data, int peer, int tag) {
  return {p2p_op::kind::recv, peer, tag, as_writable_bytes(data)};
}

template <class C>
concept communicator = std::movable<C> &&
    requires(C& c, const C& cc, std::span<double> d, std::span<const double> cd,
             std::span<p2p_op> ops) {
  { cc.rank() } -> std::convertible_to<int>;
  { cc.size() } -> std::convertible_to<int>;
  c.send(cd, 0, 0);
  c.recv(d, 0, 0);
  { c.isend(cd, 0, 0) } -> std::same_as<typename C::request>;
  { c.irecv(d, 0, 0) } -> std::same_as<typename C::request>;
  c.wait(std::declval<typename C::request&>());
  c.exchange(ops);
  c.all_reduce(d, std::plus<>{});
  c.all_reduce(d, max_op{});
  c.reduce(d, std::plus<>{}, 0);
  c.broadcast(d, 0);
  c.all_gather(cd, d);
  c.barrier();
  { c.split(0, 0) } -> std::same_as<C>;
};

}  // namespace pipit::comm
