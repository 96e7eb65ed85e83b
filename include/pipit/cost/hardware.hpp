#pragma once
// hardware: what one device can do — peak dense 16-bit FLOP/s, the fraction of it each kind of
// work achieves, memory bandwidth and capacity — and the links between devices as alpha–beta
// (latency + bytes / bandwidth). seconds() turns a pass's work into time: each kind of work at
// its own rate, one after the other (kernels on one stream do not overlap). Named presets for
// A100-80GB and H200; a user builds their own by filling the struct (or overriding fields of a
// preset with set_field, which pipit-plan's --hardware-set uses).

#include <array>
#include <charconv>
#include <string>
#include <string_view>

#include "pipit/core/error.hpp"
#include "pipit/cost/work.hpp"

namespace pipit::cost {

// A point-to-point channel (one link between two devices): sending `bytes` takes latency + bytes /
// bandwidth (the alpha–beta model, Hockney 1994; the collectives built on it are in
// communication.hpp).
struct channel {
  double latency = 0;    // alpha, seconds
  double bandwidth = 0;  // 1 / beta, bytes per second (one direction)

  constexpr double time(double bytes) const noexcept { return latency + bytes / bandwidth; }
};

struct hardware {
  std::string_view name = "custom";
  double peak_flops = 0;          // dense 16-bit tensor-core FLOP/s
  double gemm_fraction = 0;       // achievable fraction of peak on the model's GEMMs
  double attention_fraction = 0;  // ... on fused (flash) attention kernels, forward and backward
  double memory_bandwidth = 0;    // device memory, bytes per second
  double memory_fraction = 0;     // achievable fraction of it on streaming (elementwise) kernels
  double memory_capacity = 0;     // device memory, bytes
  channel p2p{};                  // between neighbouring pipeline stages
  channel collective{};           // one hop of the ring collectives (vocabulary parallelism)
  // Between GPUs of different nodes, per GPU (one network adapter per GPU, as in NVIDIA's DGX
  // nodes). p2p and collective are the links within a node; the 3D planner (sim/search.hpp)
  // uses this one for the groups that span nodes. Bandwidth 0: not given.
  channel inter_node{};
};

// NVIDIA A100 80GB SXM.
//   peak 312 TFLOP/s dense FP16/BF16 tensor core, 2,039 GB/s HBM2e, 80 GiB (A100 datasheet);
//   NVLink 3: 600 GB/s per GPU in both directions together, 300 GB/s each way (ibid.).
//   gemm 0.75: between FlashAttention-2's "50–73% of the theoretical maximum" for attention, which
//     its paper calls close to GEMM efficiency (Dao, arXiv 2307.08691), and the ~80% cuBLAS reaches
//     on large FP16 GEMMs; attention 0.55: FlashAttention-2's forward range, its backward lower.
//   memory 0.85: streaming kernels typically sustain 80–90% of HBM peak.
//   latency 10 µs: assumed, the order of NCCL's small-message latency within one node.
//   inter-node 25 GB/s per GPU each way: a DGX A100 has eight 200 Gb/s HDR InfiniBand adapters,
//     one per GPU (the cluster of Narayanan et al., SC'21, §5); latency 20 µs: assumed, NCCL's
//     small-message latency across InfiniBand is of that order.
// The fractions are assumptions of this profile, not measurements of a given cluster: override
// them (pipit-plan --hardware-set gemm=0.66) with numbers measured on yours.
inline constexpr hardware a100_80gb{
    .name = "a100-80gb",
    .peak_flops = 312e12,
    .gemm_fraction = 0.75,
    .attention_fraction = 0.55,
    .memory_bandwidth = 2039e9,
    .memory_fraction = 0.85,
    .memory_capacity = 80.0 * (1ull << 30),
    .p2p = {.latency = 10e-6, .bandwidth = 300e9},
    .collective = {.latency = 10e-6, .bandwidth = 300e9},
    .inter_node = {.latency = 20e-6, .bandwidth = 25e9},
};

// NVIDIA H200 SXM.
//   peak 989 TFLOP/s dense BF16/FP16 tensor core (1,979 with sparsity), 4.8 TB/s HBM3e, 141 GB
//   (H200 datasheet); NVLink 4: 900 GB/s per GPU both directions, 450 GB/s each way (ibid.).
//   gemm 0.70: cuBLAS BF16 on Hopper sustains roughly 650–750 TFLOP/s on large GEMMs;
//   attention 0.55: FlashAttention-3 reaches 740 TFLOP/s (75%) forward in FP16 on H100 (Shah et
//   al., arXiv 2407.08608), the backward less; memory 0.85 and latency 10 µs as for the A100;
//   inter-node 50 GB/s per GPU each way: a DGX H200 has eight 400 Gb/s ConnectX-7 adapters, one
//   per GPU (DGX H200 datasheet); latency 20 µs assumed as for the A100.
inline constexpr hardware h200{
    .name = "h200",
    .peak_flops = 989e12,
    .gemm_fraction = 0.70,
    .attention_fraction = 0.55,
    .memory_bandwidth = 4.8e12,
    .memory_fraction = 0.85,
    .memory_capacity = 141e9,
    .p2p = {.latency = 10e-6, .bandwidth = 450e9},
    .collective = {.latency = 10e-6, .bandwidth = 450e9},
    .inter_node = {.latency = 20e-6, .bandwidth = 50e9},
};

inline constexpr std::array<const hardware*, 2> hardware_presets{&a100_80gb, &h200};

// Throws pipit::error naming the field and value when a profile cannot time anything.
constexpr const hardware& check(const hardware& hw) {
  auto fraction = [&](std::string_view field, double v) {
    if (!(v > 0 && v <= 1))
      fail("pipit: hardware '", hw.name, "': ", field, " must be in (0, 1] (got ", v, ")");
  };
  auto positive = [&](std::string_view field, double v) {
    if (!(v > 0)) fail("pipit: hardware '", hw.name, "': ", field, " must be > 0 (got ", v, ")");
  };
  positive("peak_flops", hw.peak_flops);
  fraction("gemm_fraction", hw.gemm_fraction);
  fraction("attention_fraction", hw.attention_fraction);
  positive("memory_bandwidth", hw.memory_bandwidth);
  fraction("memory_fraction", hw.memory_fraction);
  positive("memory_capacity", hw.memory_capacity);
  positive("p2p.bandwidth", hw.p2p.bandwidth);
  positive("collective.bandwidth", hw.collective.bandwidth);
  if (hw.p2p.latency < 0 || hw.collective.latency < 0 || hw.inter_node.latency < 0)
    fail("pipit: hardware '", hw.name, "': latencies must be >= 0 (p2p ", hw.p2p.latency,
         ", collective ", hw.collective.latency, ", inter_node ", hw.inter_node.latency, ")");
  if (hw.inter_node.bandwidth < 0)
    fail("pipit: hardware '", hw.name, "': inter_node.bandwidth must be >= 0 (0: not given; got ",
         hw.inter_node.bandwidth, ")");
  return hw;
}

// Time of one pass's work on one device.
constexpr double seconds(const work& w, const hardware& hw) noexcept {
  return w.gemm_flops / (hw.peak_flops * hw.gemm_fraction) +
         w.attention_flops / (hw.peak_flops * hw.attention_fraction) +
         w.memory_bytes / (hw.memory_bandwidth * hw.memory_fraction);
}

inline hardware hardware_by_name(std::string_view name) {
  std::string known;
  for (const hardware* hw : hardware_presets) {
    if (hw->name == name) return *hw;
    known += detail::concat(known.empty() ? "" : ", ", hw->name);
  }
  fail("pipit: unknown hardware '", name, "' (known: ", known, ")");
}

// Sets one field from text, e.g. "gemm=0.66", "peak=312e12", "p2p_bandwidth=50e9". The keys:
// peak, gemm, attention, bandwidth, memory, capacity, p2p_latency, p2p_bandwidth,
// collective_latency, collective_bandwidth, inter_node_latency, inter_node_bandwidth.
inline void set_field(hardware& hw, std::string_view item) {
  const auto eq = item.find('=');
  if (eq == std::string_view::npos) fail("pipit: hardware setting '", item, "' is not key=value");
  const std::string_view key = item.substr(0, eq), text = item.substr(eq + 1);
  double v = 0;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc{} || ptr != text.data() + text.size())
    fail("pipit: hardware setting '", item, "': '", text, "' is not a number");
  struct field {
    std::string_view key;
    double* target;
  };
  const field fields[] = {{"peak", &hw.peak_flops},
                          {"gemm", &hw.gemm_fraction},
                          {"attention", &hw.attention_fraction},
                          {"bandwidth", &hw.memory_bandwidth},
                          {"memory", &hw.memory_fraction},
                          {"capacity", &hw.memory_capacity},
                          {"p2p_latency", &hw.p2p.latency},
                          {"p2p_bandwidth", &hw.p2p.bandwidth},
                          {"collective_latency", &hw.collective.latency},
                          {"collective_bandwidth", &hw.collective.bandwidth},
                          {"inter_node_latency", &hw.inter_node.latency},
                          {"inter_node_bandwidth", &hw.inter_node.bandwidth}};
  std::string known;
  for (const field& f : fields) {
    if (f.key == key) {
      *f.target = v;
      return;
    }
    known += detail::concat(known.empty() ? "" : ", ", f.key);
  }
  fail("pipit: unknown hardware setting '", key, "' (known: ", known, ")");
}

}  // namespace pipit::cost
