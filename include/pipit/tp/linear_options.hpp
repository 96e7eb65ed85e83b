#pragma once
// Options shared by the tensor-parallel layers, and the check that a layer is called on the
// tensor group it was built for.

#include <cstdint>

#include "pipit/core/error.hpp"

namespace pipit::tp {

struct linear_options {
  bool bias = true;                // column-parallel: a sharded bias; row-parallel: a replicated
                                   // bias added once, after the reduction
  bool sequence_parallel = false;  // activations outside the layer are split by rows (tokens)
};

namespace detail {
template <class C>
void check_group(const char* layer, const C& tp, int tensor_size, int tensor_rank) {
  if (tp.size() != tensor_size || tp.rank() != tensor_rank)
    fail("pipit::tp::", layer, ": built for tensor rank ", tensor_rank, " of ", tensor_size,
         " but called on rank ", tp.rank(), " of a group of ", tp.size());
}
inline void check_tensor_rank(const char* layer, int tensor_size, int tensor_rank) {
  if (tensor_size < 1 || tensor_rank < 0 || tensor_rank >= tensor_size)
    fail("pipit::tp::", layer, ": tensor rank ", tensor_rank, " of ", tensor_size,
         " (need 0 <= rank < size, size >= 1)");
}
inline void check_divides(const char* layer, std::int64_t n, const char* what, int tensor_size) {
  if (n < 1 || n % tensor_size != 0)
    fail("pipit::tp::", layer, ": the tensor size ", tensor_size, " does not divide ", what, " ",
         n);
}
}  // namespace detail
}  // namespace pipit::tp
