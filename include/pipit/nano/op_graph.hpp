#pragma once
// op_graph: the operations of a layer (or of a stack of layers) as NanoFlow sees them (Zhu et
// al., "NanoFlow: Towards Optimal Large Language Model Serving Throughput", arXiv 2408.12757,
// section 4): GEMMs, attention, norms and collectives, each tagged with the resource that bounds
// it (compute, memory or network) and with the operations whose results it reads.
//
// The graph is data only: names, kinds, dependencies. What an operation does is the caller's
// functor, fn(op id, rows), which nano_runner calls for each nano-operation. Dependencies are
// row-wise: op B on rows [b, e) needs the rows [b, e) of each op it depends on, which is what
// lets a batch be split into nano-batches (rows are tokens, or decode requests, and every
// operation here treats rows independently). An operation that needs all rows of another (e.g.
// prefill attention over a whole sequence) must be given one nano-batch.
//
// Ops are added in a topological order (every dependency is added before its user), so an op's
// id is also its position in a valid issue order.

#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "pipit/core/error.hpp"

namespace pipit::nano {

// The resource an operation is bound by. One worker serves each kind, so operations of
// different kinds can overlap (NanoFlow's compute-, memory- and network-bound classes).
enum class resource : std::uint8_t { compute, memory, network };
inline constexpr int resource_count = 3;

constexpr const char* to_string(resource r) noexcept {
  switch (r) {
    case resource::compute:
      return "compute";
    case resource::memory:
      return "memory";
    case resource::network:
      return "network";
  }
  return "?";
}

struct op {
  std::string name;
  resource kind = resource::compute;
  std::vector<int> deps;  // ids of ops whose same rows this op reads (all smaller than its id)
};

class op_graph {
 public:
  // Adds an op that depends on `deps` (ids already in the graph); returns its id.
  int add(std::string name, resource kind, std::initializer_list<int> deps = {}) {
    return add(std::move(name), kind, std::span<const int>(deps.begin(), deps.size()));
  }
  int add(std::string name, resource kind, std::span<const int> deps) {
    const int id = size();
    for (std::size_t i = 0; i < deps.size(); ++i) {
      const int d = deps[i];
      if (d < 0 || d >= id)
        fail("pipit::nano::op_graph: op ", id, " (", name, ") depends on op ", d,
             ", which is not in the graph yet (ids 0..", id - 1, ")");
      for (std::size_t j = 0; j < i; ++j)
        if (deps[j] == d)
          fail("pipit::nano::op_graph: op ", id, " (", name, ") lists dependency ", d, " twice");
    }
    ops_.push_back({std::move(name), kind, std::vector<int>(deps.begin(), deps.end())});
    return id;
  }

  int size() const noexcept { return static_cast<int>(ops_.size()); }
  bool empty() const noexcept { return ops_.empty(); }
  std::span<const op> ops() const noexcept { return ops_; }
  const op& operator[](int id) const {
    if (id < 0 || id >= size())
      fail("pipit::nano::op_graph: no op ", id, " in a graph of ", size(), " ops");
    return ops_[static_cast<std::size_t>(id)];
  }

  // Ops that no other op depends on (a layer's outputs).
  std::vector<int> sinks() const {
    std::vector<char> used(ops_.size(), 0);
    for (const op& o : ops_)
      for (int d : o.deps) used[static_cast<std::size_t>(d)] = 1;
    std::vector<int> out;
    for (int i = 0; i < size(); ++i)
      if (!used[static_cast<std::size_t>(i)]) out.push_back(i);
    return out;
  }

  // `times` copies of this graph run one after the other (a stack of identical layers): op i of
  // copy c gets id c * size() + i and name "<name>.<c>"; an op without dependencies in copy
  // c > 0 depends on the sinks of copy c - 1.
  op_graph repeated(int times) const {
    if (times < 1) fail("pipit::nano::op_graph::repeated: ", times, " copies (need >= 1)");
    const std::vector<int> ends = sinks();
    op_graph g;
    for (int c = 0; c < times; ++c) {
      const int base = c * size();
      for (const op& o : ops_) {
        std::vector<int> deps;
        for (int d : o.deps) deps.push_back(base + d);
        if (o.deps.empty() && c > 0)
          for (int e : ends) deps.push_back(base - size() + e);
        g.add(o.name + "." + std::to_string(c), o.kind, deps);
      }
    }
    return g;
  }

 private:
  std::vector<op> ops_;
};

}  // namespace pipit::nano
