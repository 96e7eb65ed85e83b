#pragma once
// ring_collective: an all-reduce, reduce-scatter or all-gather over a tensor-parallel group whose
// blocks are row blocks of a rows x cols matrix (row_block: rank b owns rows even_split(rows, p,
// b), the sequence-parallel share), run around the ring one step at a time on the communicator's
// isend/irecv.
//
// Stepwise so that a caller can compute between the steps: the constructor posts step 0, and
// each advance() completes the step in flight (waits for its receive, folds it in) and posts the
// next. The messages of a step travel while the caller computes; this is how the tensor-parallel
// layers overlap the input-gradient reduction with the weight-gradient GEMM on the host (one
// thread: no second thread touches the communicator, which comm::mpi requires).
//
// Algorithm (as comm::ring_all_reduce, Patarasuk and Yuan's bandwidth-optimal ring): p - 1
// reduce steps, in which block b is combined in ring order starting at rank b + 1 and ends
// complete on rank b, then p - 1 gather steps that pass the complete blocks around. Every rank
// gets bit-identical results, and the all-reduce and the reduce-scatter combine each element in
// the same order, so sequence-parallel and plain layers agree bit for bit.
//
// The data must stay alive and untouched (except through this object) until finish(). An
// object abandoned while a step is in flight (an exception) leaves its requests to the
// backend's collective failure.

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/core/math.hpp"

namespace pipit::tp {

// Rows [begin, end) of rank b's block when `rows` rows are split over `parts` ranks; sizes
// differ by at most one (the first rows % parts ranks get one more).
constexpr range<std::int64_t> row_block(std::int64_t rows, int parts, int b) noexcept {
  return even_split<std::int64_t>(rows, parts, b);
}

// Tags of the ring's messages: ring_tag (reduce steps) and ring_tag + 1 (gather steps), the
// top of the range every MPI must accept (0..32767, the standard's minimum MPI_TAG_UB), so the
// ring runs on any MPI. They are reserved on the communicator a ring runs on (the tensor
// group): do not use them for your own messages there.
inline constexpr int ring_tag = 32766;

enum class ring_mode { all_reduce, reduce_scatter, all_gather };

template <comm::communicator C, class T, class Op = std::plus<>>
class ring_collective {
 public:
  // data: rows x cols, contiguous, the same shape on every rank.
  //   all_reduce:     every rank's partial in, the sum out.
  //   reduce_scatter: every rank's partial in; out: this rank's row block holds the sum of the
  //                   partials' blocks (the other rows are left partially reduced).
  //   all_gather:     this rank's row block in; out: every block.
  ring_collective(C& comm, std::span<T> data, std::int64_t rows, std::int64_t cols, ring_mode mode,
                  Op op = {})
      : comm_(&comm),
        data_(data),
        rows_(rows),
        cols_(cols),
        mode_(mode),
        op_(op),
        p_(comm.size()),
        r_(comm.rank()) {
    if (rows < 0 || cols < 0 || static_cast<std::int64_t>(data.size()) != rows * cols)
      fail("pipit::tp::ring_collective: ", data.size(), " elements for a ", rows, " x ", cols,
           " matrix");
    steps_ = p_ == 1 ? 0 : (mode == ring_mode::all_reduce ? 2 * (p_ - 1) : p_ - 1);
    if (mode != ring_mode::all_gather)
      incoming_.resize(static_cast<std::size_t>(row_block(rows, p_, 0).size() * cols));
    if (steps_ > 0) post();
  }

  ring_collective(const ring_collective&) = delete;
  ring_collective& operator=(const ring_collective&) = delete;

  int steps() const noexcept { return steps_; }
  int steps_done() const noexcept { return step_; }
  bool done() const noexcept { return step_ == steps_; }

  // Completes the step in flight and posts the next; nothing when done.
  void advance() {
    if (done()) return;
    comm_->wait(recv_);
    if (is_reduce_step(step_)) {
      const std::span<T> in = block(r_ - step_ - 2);
      for (std::size_t i = 0; i < in.size(); ++i) in[i] = op_(incoming_[i], in[i]);
    }
    comm_->wait(send_);
    if (++step_ < steps_) post();
  }

  void finish() {
    while (!done()) advance();
  }

 private:
  bool is_reduce_step(int s) const noexcept {
    return mode_ == ring_mode::reduce_scatter || (mode_ == ring_mode::all_reduce && s < p_ - 1);
  }

  std::span<T> block(int b) const noexcept {
    const auto rg = row_block(rows_, p_, ((b % p_) + p_) % p_);
    return data_.subspan(static_cast<std::size_t>(rg.begin * cols_),
                         static_cast<std::size_t>(rg.size() * cols_));
  }

  void post() {
    const int next = (r_ + 1) % p_, prev = (r_ + p_ - 1) % p_;
    if (is_reduce_step(step_)) {
      const std::span<T> out = block(r_ - step_ - 1), in = block(r_ - step_ - 2);
      recv_ = comm_->irecv(std::span<T>(incoming_.data(), in.size()), prev, ring_tag);
      send_ = comm_->isend(std::span<const T>(out), next, ring_tag);
    } else {
      const int g = mode_ == ring_mode::all_reduce ? step_ - (p_ - 1) : step_;
      const std::span<T> out = block(r_ - g), in = block(r_ - g - 1);
      recv_ = comm_->irecv(in, prev, ring_tag + 1);
      send_ = comm_->isend(std::span<const T>(out), next, ring_tag + 1);
    }
  }

  C* comm_;
  std::span<T> data_;
  std::int64_t rows_, cols_;
  ring_mode mode_;
  Op op_;
  int p_, r_;
  int steps_ = 0;
  int step_ = 0;
  std::vector<T> incoming_;
  typename C::request send_{}, recv_{};
};

// Blocking forms.
template <comm::communicator C, class T, class Op = std::plus<>>
void ring_all_reduce_rows(C& comm, std::span<T> data, std::int64_t rows, std::int64_t cols,
                          Op op = {}) {
  ring_collective<C, T, Op>(comm, data, rows, cols, ring_mode::all_reduce, op).finish();
}
template <comm::communicator C, class T, class Op = std::plus<>>
void ring_reduce_scatter_rows(C& comm, std::span<T> data, std::int64_t rows, std::int64_t cols,
                              Op op = {}) {
  ring_collective<C, T, Op>(comm, data, rows, cols, ring_mode::reduce_scatter, op).finish();
}
template <comm::communicator C, class T>
void ring_all_gather_rows(C& comm, std::span<T> data, std::int64_t rows, std::int64_t cols) {
  ring_collective<C, T>(comm, data, rows, cols, ring_mode::all_gather).finish();
}

// Runs work(i) for i in [0, pieces) and advances `ring` after each piece, so that each step's
// messages travel while the next piece computes; then finishes the ring. With pieces >= the
// ring's steps every step overlaps one piece; further pieces run after the ring is done.
template <class Ring, class Work>
void overlap_with(Ring& ring, int pieces, Work&& work) {
  for (int i = 0; i < pieces; ++i) {
    work(i);
    ring.advance();
  }
  ring.finish();
}

}  // namespace pipit::tp
