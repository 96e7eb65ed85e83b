#pragma once
// The communication operators that pair with the tensor-parallel layers (Megatron-LM's
// mappings.py; Shoeybi et al., arXiv 1909.08053, section 3: the conjugate operators f and g;
// Korthikanti et al., arXiv 2205.05198, section 4.2.2: the sequence-parallel g and g-bar).
// Activations are rows x cols matrices (tokens x features), stored contiguously; the sequence-
// parallel share of rank r is its row block (row_block(rows, t, r)).
//
//   operator                         forward                  backward
//   copy_to_tensor_region (f)        identity                 all-reduce
//   reduce_from_tensor_region (g)    all-reduce               identity
//   gather_from_sequence_region      all-gather rows          reduce-scatter rows
//   reduce_scatter_to_sequence_region reduce-scatter rows     all-gather rows
//   scatter_to_sequence_region       keep own rows            all-gather rows
//
// Each forward/backward is a collective over the tensor group `tp` (every member calls it).

#include <algorithm>
#include <cstdint>
#include <span>
#include <type_traits>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"
#include "pipit/tp/ring_collective.hpp"

namespace pipit::tp {

namespace detail {
template <class T>
void check_full(const char* op, std::span<T> s, std::int64_t rows, std::int64_t cols) {
  if (rows < 0 || cols < 0 || static_cast<std::int64_t>(s.size()) != rows * cols)
    fail("pipit::tp::", op, ": ", s.size(), " elements for a ", rows, " x ", cols, " activation");
}
template <class T>
void check_local(const char* op, std::span<T> s, std::int64_t rows, std::int64_t cols, int t,
                 int r) {
  const std::int64_t mine = row_block(rows, t, r).size();
  if (static_cast<std::int64_t>(s.size()) != mine * cols)
    fail("pipit::tp::", op, ": rank ", r, " of ", t, " holds ", mine, " of ", rows, " rows x ",
         cols, " = ", mine * cols, " elements, got ", s.size());
}
template <class T>
std::span<T> own_rows(std::span<T> full, std::int64_t rows, std::int64_t cols, int t, int r) {
  const auto rg = row_block(rows, t, r);
  return full.subspan(static_cast<std::size_t>(rg.begin * cols),
                      static_cast<std::size_t>(rg.size() * cols));
}
}  // namespace detail

// f: the input of a column-parallel layer. Forward: every rank already holds the whole input.
// Backward: the ranks' input-gradient partials are summed.
struct copy_to_tensor_region {
  template <comm::communicator C, class T>
  static void forward(C&, std::span<T> x, std::int64_t rows, std::int64_t cols) {
    detail::check_full("copy_to_tensor_region", x, rows, cols);
  }
  template <comm::communicator C, class T>
  static void backward(C& tp, std::span<T> grad, std::int64_t rows, std::int64_t cols) {
    detail::check_full("copy_to_tensor_region", grad, rows, cols);
    ring_all_reduce_rows(tp, grad, rows, cols);
  }
};

// g: the output of a row-parallel layer. Forward: the partial outputs are summed. Backward:
// every rank already holds the whole output gradient.
struct reduce_from_tensor_region {
  template <comm::communicator C, class T>
  static void forward(C& tp, std::span<T> y, std::int64_t rows, std::int64_t cols) {
    detail::check_full("reduce_from_tensor_region", y, rows, cols);
    ring_all_reduce_rows(tp, y, rows, cols);
  }
  template <comm::communicator C, class T>
  static void backward(C&, std::span<T> grad, std::int64_t rows, std::int64_t cols) {
    detail::check_full("reduce_from_tensor_region", grad, rows, cols);
  }
};

// Sequence parallelism's g (before a column-parallel layer): local rows in, all rows out.
struct gather_from_sequence_region {
  // local: this rank's row block; full: rows x cols, overwritten.
  template <comm::communicator C, class T>
  static void forward(C& tp, std::span<const std::type_identity_t<T>> local, std::span<T> full,
                      std::int64_t rows, std::int64_t cols) {
    detail::check_full("gather_from_sequence_region", full, rows, cols);
    detail::check_local("gather_from_sequence_region", local, rows, cols, tp.size(), tp.rank());
    std::copy(local.begin(), local.end(),
              detail::own_rows(full, rows, cols, tp.size(), tp.rank()).begin());
    ring_all_gather_rows(tp, full, rows, cols);
  }
  // full_grad: this rank's partial gradient of all rows (used as scratch); local_grad: out.
  template <comm::communicator C, class T>
  static void backward(C& tp, std::span<T> full_grad, std::span<T> local_grad, std::int64_t rows,
                       std::int64_t cols) {
    detail::check_full("gather_from_sequence_region", full_grad, rows, cols);
    detail::check_local("gather_from_sequence_region", local_grad, rows, cols, tp.size(),
                        tp.rank());
    ring_reduce_scatter_rows(tp, full_grad, rows, cols);
    const auto mine = detail::own_rows(full_grad, rows, cols, tp.size(), tp.rank());
    std::copy(mine.begin(), mine.end(), local_grad.begin());
  }
};

// Sequence parallelism's g-bar (after a row-parallel layer): partial outputs of all rows in,
// the sum of this rank's rows out.
struct reduce_scatter_to_sequence_region {
  // full: this rank's partial output of all rows (used as scratch); local: out.
  template <comm::communicator C, class T>
  static void forward(C& tp, std::span<T> full, std::span<T> local, std::int64_t rows,
                      std::int64_t cols) {
    gather_from_sequence_region::backward(tp, full, local, rows, cols);
  }
  // local_grad: this rank's rows of the output gradient; full_grad: all rows, overwritten.
  template <comm::communicator C, class T>
  static void backward(C& tp, std::span<const std::type_identity_t<T>> local_grad,
                       std::span<T> full_grad, std::int64_t rows, std::int64_t cols) {
    gather_from_sequence_region::forward(tp, local_grad, full_grad, rows, cols);
  }
};

// Entering the sequence-parallel region from a replicated activation: forward keeps this rank's
// rows (no communication), backward all-gathers the gradient rows.
struct scatter_to_sequence_region {
  template <comm::communicator C, class T>
  static void forward(C& tp, std::span<const std::type_identity_t<T>> full, std::span<T> local,
                      std::int64_t rows, std::int64_t cols) {
    detail::check_full("scatter_to_sequence_region", full, rows, cols);
    detail::check_local("scatter_to_sequence_region", local, rows, cols, tp.size(), tp.rank());
    const auto mine = detail::own_rows(full, rows, cols, tp.size(), tp.rank());
    std::copy(mine.begin(), mine.end(), local.begin());
  }
  template <comm::communicator C, class T>
  static void backward(C& tp, std::span<const std::type_identity_t<T>> local_grad,
                       std::span<T> full_grad, std::int64_t rows, std::int64_t cols) {
    gather_from_sequence_region::forward(tp, local_grad, full_grad, rows, cols);
  }
};

}  // namespace pipit::tp
