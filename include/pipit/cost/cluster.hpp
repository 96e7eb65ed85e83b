#pragma once
// cluster: nodes × GPUs per node of one hardware profile, and the links the groups of a
// tensor × data × pipeline grid of ranks use on it. Ranks are laid out tensor fastest, then
// data, then pipeline (Megatron-LM's default order; Narayanan et al., SC'21, §3.3: tensor
// parallelism inside a node, pipeline parallelism across nodes): the tensor group of a rank is
// t consecutive ranks, its data group d ranks at stride t, its pipeline group p ranks at stride
// t·d. A group whose members all sit in one node uses the node's links (hardware.p2p between
// pipeline neighbours, hardware.collective for collectives); a group that crosses nodes anywhere
// uses hardware.inter_node — every instance of a group runs in lockstep, so the slowest decides.

#include "pipit/core/error.hpp"
#include "pipit/cost/hardware.hpp"

namespace pipit::cost {

struct cluster {
  int nodes = 1;
  int gpus_per_node = 1;
  hardware device{};

  constexpr int gpus() const noexcept { return nodes * gpus_per_node; }
};

// Throws pipit::error unless the cluster has GPUs, a valid profile and, with more than one node,
// an inter-node link.
constexpr const cluster& check(const cluster& c) {
  if (c.nodes < 1 || c.gpus_per_node < 1)
    fail("pipit: cluster: nodes (", c.nodes, ") and GPUs per node (", c.gpus_per_node,
         ") must be >= 1");
  check(c.device);
  if (c.nodes > 1 && !(c.device.inter_node.bandwidth > 0))
    fail("pipit: cluster: ", c.nodes, " nodes need an inter-node link, but hardware '",
         c.device.name, "' has inter_node bandwidth ", c.device.inter_node.bandwidth);
  return c;
}

// Whether some group of `size` ranks at `stride` crosses a node boundary: groups tile aligned
// blocks of stride·size ranks, which stay inside nodes only when a block divides a node.
constexpr bool spans_nodes(int stride, int size, int gpus_per_node) noexcept {
  if (size <= 1) return false;
  const long long block = static_cast<long long>(stride) * size;
  return !(block <= gpus_per_node && gpus_per_node % block == 0);
}

struct group_links {
  channel tensor{};    // collectives of the tensor-parallel group
  channel data{};      // gradient all-reduce of the data-parallel group
  channel pipeline{};  // point-to-point between neighbouring stages
  channel vocab{};     // collectives of the vocabulary shards (pipeline × tensor ranks)
  bool tensor_spans_nodes = false;
  bool data_spans_nodes = false;
  bool pipeline_spans_nodes = false;
};

// The links of a tensor × data × pipeline grid on the cluster (t·d·p need not fill it).
constexpr group_links links_of(const cluster& c, int tensor, int data, int pipeline) noexcept {
  const int g = c.gpus_per_node;
  group_links l;
  l.tensor_spans_nodes = spans_nodes(1, tensor, g);
  l.data_spans_nodes = spans_nodes(tensor, data, g);
  l.pipeline_spans_nodes = spans_nodes(tensor * data, pipeline, g);
  const channel& net = c.device.inter_node;
  l.tensor = l.tensor_spans_nodes ? net : c.device.collective;
  l.data = l.data_spans_nodes ? net : c.device.collective;
  l.pipeline = l.pipeline_spans_nodes ? net : c.device.p2p;
  l.vocab = l.tensor_spans_nodes || l.pipeline_spans_nodes ? net : c.device.collective;
  return l;
}

}  // namespace pipit::cost
