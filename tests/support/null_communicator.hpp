#pragma once
// A communicator that moves no data: one rank of a pretend group runs alone. exchange() only
// counts the operations; receives leave their buffers as they are; all_gather copies this
// rank's part into every slot (so a start-up agreement sees every rank agree). For measuring
// and checking the executor's own work (overhead, allocations) without any communication.

#include <algorithm>
#include <cstddef>
#include <span>

#include "pipit/comm/communicator.hpp"

namespace pipit::testing {

class null_communicator {
 public:
  struct request {};

  null_communicator(int rank, int size) : rank_(rank), size_(size) {}

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }

  template <class T>
  void send(std::span<T>, int, int) {}
  template <class T>
  void recv(std::span<T>, int, int) {}
  template <class T>
  request isend(std::span<T>, int, int) {
    return {};
  }
  template <class T>
  request irecv(std::span<T>, int, int) {
    return {};
  }
  void wait(request&) {}
  void exchange(std::span<comm::p2p_op> ops) { operations += ops.size(); }
  template <class T, class Op>
  void all_reduce(std::span<T>, Op) {}
  template <class T, class Op>
  void reduce(std::span<T>, Op, int) {}
  template <class T>
  void broadcast(std::span<T>, int) {}
  template <class T, class U>
  void all_gather(std::span<T> mine, std::span<U> out) {
    for (std::size_t at = 0; at + mine.size() <= out.size();
         at += std::max<std::size_t>(mine.size(), 1))
      std::copy(mine.begin(), mine.end(), out.begin() + static_cast<std::ptrdiff_t>(at));
  }
  void barrier() {}
  null_communicator split(int, int) { return *this; }

  std::size_t operations = 0;  // point-to-point operations passed to exchange()

 private:
  int rank_ = 0;
  int size_ = 1;
};

static_assert(comm::communicator<null_communicator>);

}  // namespace pipit::testing
