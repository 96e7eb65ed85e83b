#pragma once
// ordered_all_reduce: a sum over a tensor-parallel group in which every element is combined in
// rank order, ((x_0 + x_1) + x_2) + ..., on every rank and whatever rows the call covers.
//
// A ring all-reduce (tp::ring_collective, comm::ring_all_reduce) starts each element's sum at a
// rank that depends on which block the element falls in, and the blocks are cut from the rows
// of the call: all-reducing a nano-batch of rows would combine the same element in another
// order than all-reducing the whole batch, and with three or more ranks give other bits. Here
// each rank sends its partial to every other rank at once (one step: the latency of one message
// rather than the ring's 2 (p - 1), the choice TPI-LLM makes for latency-bound links with its
// star all-reduce, Li et al., arXiv 2410.00531, section 4), receives theirs, and sums locally in
// rank order. It moves (p - 1) n elements per rank instead of 2 (p - 1) / p n: the right trade
// where latency dominates, as in decoding (a few hidden vectors per request).

#include <cstdint>
#include <span>
#include <vector>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/error.hpp"

namespace pipit::nano {

// The tag of its messages; reserved on the communicator it runs on. Calls on one communicator
// must be made in the same order on every rank (messages of one pair and tag arrive in order).
inline constexpr int ordered_all_reduce_tag = 32700;

template <comm::communicator C, class T>
class ordered_all_reduce {
 public:
  // max_elements: the largest call; scratch for the peers' partials is allocated once, here.
  ordered_all_reduce(C& comm, std::int64_t max_elements)
      : comm_(&comm),
        max_(checked(max_elements)),
        scratch_(static_cast<std::size_t>(max_elements) *
                 static_cast<std::size_t>(comm.size() > 1 ? comm.size() - 1 : 0)),
        requests_(2 * static_cast<std::size_t>(comm.size())) {}

  // data: this rank's partial in, the sum of every rank's partial out (bit-identical on all).
  void operator()(std::span<T> data) {
    const int p = comm_->size(), me = comm_->rank();
    if (static_cast<std::int64_t>(data.size()) > max_)
      fail("pipit::nano::ordered_all_reduce: ", data.size(), " elements, built for at most ", max_);
    if (p == 1) return;
    const std::size_t n = data.size();
    auto slot = [&](int q) {  // scratch for rank q's partial (q != me)
      const std::size_t s = static_cast<std::size_t>(q < me ? q : q - 1);
      return std::span<T>(scratch_.data() + s * n, n);
    };
    std::size_t used = 0;
    for (int q = 0; q < p; ++q)
      if (q != me) requests_[used++] = comm_->irecv(slot(q), q, ordered_all_reduce_tag);
    for (int q = 0; q < p; ++q)
      if (q != me)
        requests_[used++] = comm_->isend(std::span<const T>(data), q, ordered_all_reduce_tag);
    for (std::size_t i = 0; i < used; ++i) comm_->wait(requests_[i]);
    for (std::size_t i = 0; i < n; ++i) {
      T s = me == 0 ? data[i] : scratch_[i];  // rank 0's partial (slot(0) starts at 0)
      for (int q = 1; q < p; ++q) s += q == me ? data[i] : slot(q)[i];
      data[i] = s;
    }
  }

 private:
  // Checked before anything is allocated from it.
  static std::int64_t checked(std::int64_t max_elements) {
    if (max_elements < 0)
      fail("pipit::nano::ordered_all_reduce: max_elements ", max_elements, " < 0");
    return max_elements;
  }
  C* comm_;
  std::int64_t max_;
  std::vector<T> scratch_;
  std::vector<typename C::request> requests_;
};

}  // namespace pipit::nano
