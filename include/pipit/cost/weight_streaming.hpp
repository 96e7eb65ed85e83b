#pragma once
// When does streaming weights through a bounded window stall compute? Two instances of one model:
//
// * TPI-LLM's sliding window (Li et al., arXiv 2410.00531): n blocks in cyclic order, k resident,
//   a block freed as soon as its compute ends (its all-reduce then overlaps the next read). The
//   paper's stall-free condition, for window w: the read of block b + w − 1 fits in the compute
//   and all-reduce of the blocks before it that are still resident,
//       load(b + w − 1) ≤ Σ_{j=b}^{b+w−2} (compute_j + communicate_j)   for every b (cyclically);
//   with w = 2: load(next) ≤ compute(current) + all-reduce(current).
// * Superpipeline's layer offload (Abbasi & Lim, arXiv 2410.08791): L layers, k resident, and
//   after every k′ computed layers those k′ leave and the next k′ are copied in. Stall-free when
//   the copy of the next k′ layers fits in the compute of the k − k′ layers still resident.
//
// The closed forms are necessary per block but ignore that one loader (one disk, one copy engine)
// serves every read, so each estimate also runs the exact event recurrence of the runtime
// (runtime/weight_window.hpp, runtime/layer_offload.hpp) and reports its stall time:
//   load_start_i  = max(load_end_{i−1}, free_{i−k})     (one loader; a slot must have been freed)
//   load_end_i    = load_start_i + load_i
//   compute_i     starts at max(load_end_i, comm_end_{i−1}), communication follows on the same
//                 thread (comm_end_i = compute_end_i + communicate_i)
//   free_j        = compute_end of the last item of j's release group (groups of g = 1 for the
//                   window, g = k′ for the offload)

#include <algorithm>
#include <cstddef>
#include <limits>
#include <span>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/cost/hardware.hpp"

namespace pipit::cost {

// One block (or layer) of a streamed model, seconds.
struct streamed_block {
  double load = 0;         // read from disk / copy to the device
  double compute = 0;      // while its weights are resident
  double communicate = 0;  // after its weights may go (TPI-LLM's all-reduce)
};

// Seconds to move `bytes` over a link or disk described alpha–beta.
constexpr double load_time(const channel& link, double bytes) noexcept {
  return link.time(bytes);
}

struct streaming_estimate {
  double pass_time = 0;   // steady-state seconds per pass over the blocks (one token)
  double stall_time = 0;  // of which compute waited for a load (offload: after the first layer)
  double first_pass_time = 0;     // including the cold start
  bool stall_free = false;        // the recurrence's steady state has no stall
  bool window_condition = false;  // the closed form (above) holds for every block
  double worst_slack = 0;         // its smallest margin, seconds (negative: a stall)
  std::size_t worst_block = 0;
  bool loader_keeps_up = false;  // Σ load ≤ Σ (compute + communicate)
};

namespace detail {

// The recurrence over `passes` passes; returns end times of each pass and total stall per pass.
struct streaming_trace {
  std::vector<double> pass_end;
  std::vector<double> pass_stall;
};

inline streaming_trace simulate_streaming(std::span<const streamed_block> blocks, std::size_t k,
                                          std::size_t group, std::size_t passes, bool cyclic) {
  const std::size_t n = blocks.size();
  const std::size_t total = n * passes;
  std::vector<double> load_end(total), compute_end(total), comm_end(total), freed(total);
  streaming_trace tr;
  tr.pass_end.assign(passes, 0);
  tr.pass_stall.assign(passes, 0);
  double loader = 0, prev_comm = 0;
  for (std::size_t i = 0; i < total; ++i) {
    const auto& b = blocks[i % n];
    const std::size_t pass = i / n, pos = i % n;
    // Streaming cycles through all passes in one sequence; the offload restarts each pass with
    // an empty window kept from the previous pass's tail (approximated as cold: no reuse).
    const std::size_t local = cyclic ? i : pos;
    double start = loader;
    bool resident = false;
    if (cyclic && k >= n && pass > 0) resident = true;  // all blocks stay in memory
    if (!resident) {
      if (local >= k) start = std::max(start, freed[i - k]);
      if (!cyclic && pos == 0) start = std::max(start, prev_comm);  // a new pass starts cold
      load_end[i] = start + b.load;
      loader = load_end[i];
    } else {
      load_end[i] = 0;
    }
    const double cstart = std::max(load_end[i], prev_comm);
    // The wait for a pass's first layer on an empty device (offload) is the cold start, part of
    // the pass time but not a stall that a larger k or k' could hide.
    if (cyclic || pos != 0) tr.pass_stall[pass] += cstart - prev_comm;
    compute_end[i] = cstart + b.compute;
    comm_end[i] = compute_end[i] + b.communicate;
    prev_comm = comm_end[i];
    // Release groups: items [g·q, g·q + g) of the sequence (per pass for the offload) leave when
    // the last of them has computed.
    const std::size_t gpos = local % group;
    const bool group_last = gpos + 1 == group || (cyclic ? false : pos + 1 == n);
    if (group_last) {
      const std::size_t first = i - gpos;
      for (std::size_t j = first; j <= i; ++j) freed[j] = compute_end[i];
    }
    if (pos + 1 == n) tr.pass_end[pass] = comm_end[i];
  }
  return tr;
}

}  // namespace detail

// TPI-LLM's window: `blocks` in cyclic order, `window` (k ≥ 1) resident, each freed when its
// compute ends. The steady state is measured on the last of `passes` (≥ 2) passes.
inline streaming_estimate estimate_weight_streaming(std::span<const streamed_block> blocks,
                                                    int window, int passes = 4) {
  PIPIT_REQUIRE(window >= 1, "estimate_weight_streaming: window k = ", window,
                " blocks; it must hold at least 1 block");
  PIPIT_REQUIRE(!blocks.empty(), "estimate_weight_streaming: no blocks");
  PIPIT_REQUIRE(passes >= 2, "estimate_weight_streaming: passes = ", passes, ", need >= 2");
  const std::size_t n = blocks.size(), k = static_cast<std::size_t>(window);
  const auto tr = detail::simulate_streaming(blocks, k, 1, std::size_t(passes), true);
  streaming_estimate e;
  const std::size_t last = std::size_t(passes) - 1;
  e.pass_time = tr.pass_end[last] - tr.pass_end[last - 1];
  e.stall_time = tr.pass_stall[last];
  e.first_pass_time = tr.pass_end[0];
  double busy = 0, load = 0;
  for (const auto& b : blocks) {
    busy += b.compute + b.communicate;
    load += b.load;
  }
  e.loader_keeps_up = k >= n || load <= busy;
  e.stall_free = e.stall_time <= 1e-12 * std::max(1.0, e.pass_time);
  e.worst_slack = std::numeric_limits<double>::infinity();
  if (k >= n) {
    e.window_condition = true;  // read once, then resident
  } else {
    for (std::size_t b = 0; b < n; ++b) {
      double avail = 0;
      for (std::size_t j = 0; j + 1 < k; ++j) {
        const auto& x = blocks[(b + j) % n];
        avail += x.compute + x.communicate;
      }
      const double slack = avail - blocks[(b + k - 1) % n].load;
      if (slack < e.worst_slack) {
        e.worst_slack = slack;
        e.worst_block = (b + k - 1) % n;
      }
    }
    e.window_condition = e.worst_slack >= 0;
  }
  return e;
}

// Superpipeline's offload of one pass over `layers` (forward order), k resident, swapped k′ at a
// time, each pass starting from an empty device (so first_pass_time == pass_time). The closed form
// is checked for every group: the copy of the k′ layers that enter after the group leaves must
// fit in the compute of the k − k′ layers that stay.
inline streaming_estimate estimate_layer_offload(std::span<const streamed_block> layers,
                                                 int resident, int swap) {
  PIPIT_REQUIRE(resident >= 1, "estimate_layer_offload: resident layers k = ", resident,
                ", need >= 1");
  PIPIT_REQUIRE(swap >= 1 && swap <= resident, "estimate_layer_offload: swapped layers k' = ", swap,
                ", need 1 <= k' <= k = ", resident);
  PIPIT_REQUIRE(!layers.empty(), "estimate_layer_offload: no layers");
  const std::size_t n = layers.size();
  const std::size_t k = std::min<std::size_t>(std::size_t(resident), n);
  const std::size_t g = std::min<std::size_t>(std::size_t(swap), k);
  const auto tr = detail::simulate_streaming(layers, k, g, 1, false);
  streaming_estimate e;
  e.pass_time = e.first_pass_time = tr.pass_end[0];
  e.stall_time = tr.pass_stall[0];
  e.stall_free = e.stall_time <= 1e-12 * std::max(1.0, e.pass_time);
  double busy = 0, load = 0;
  for (const auto& l : layers) {
    busy += l.compute + l.communicate;
    load += l.load;
  }
  e.loader_keeps_up = load <= busy;
  e.worst_slack = std::numeric_limits<double>::infinity();
  // The group [q, q + g) leaves; layers [q + k, q + k + g) enter while [q + g, q + k) compute.
  for (std::size_t q = 0; q + k < n; q += g) {
    double copy = 0, avail = 0;
    for (std::size_t j = q + k; j < std::min(n, q + k + g); ++j) copy += layers[j].load;
    for (std::size_t j = q + g; j < q + k; ++j) avail += layers[j].compute + layers[j].communicate;
    if (avail - copy < e.worst_slack) {
      e.worst_slack = avail - copy;
      e.worst_block = q + k;
    }
  }
  e.window_condition = e.worst_slack >= 0;
  return e;
}

}  // namespace pipit::cost
