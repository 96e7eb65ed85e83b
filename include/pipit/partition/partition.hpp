#pragma once
// partition: which model parts each virtual stage of a pipeline holds — a contiguous run of
// transformer layers, plus the input embedding (E) on the first and the output layer with its
// loss (L: final norm, LM head, softmax/cross-entropy) on the last — and so, through the
// placement, which (rank, chunk) runs every part. Under vocabulary parallelism E and L belong to
// no stage: they are sharded over all ranks.
//
// Virtual stages are numbered in pipeline order, as in pipit::schedule: with `looped` placement
// stage s runs on rank s mod p (chunk s / p); with `v_shape` (two chunks) stage s < p on rank s
// and stage s >= p on rank 2p − 1 − s, so rank 0 holds both the first and the last stage.
//
// Makers: naive.hpp, layout.hpp (from a string such as "E t*3 | t*4 | t*4 | t*3 L"),
// balanced.hpp, vocab_parallel.hpp.

#include <cstddef>
#include <string>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/schedule/shape.hpp"

namespace pipit::partition {

// The pipeline a partition is made for.
struct pipeline {
  int ranks = 1;   // p
  int chunks = 1;  // virtual stages per rank v (2 for the V schedules)
  schedule::placement place = schedule::placement::looped;

  constexpr int virtual_stages() const noexcept { return ranks * chunks; }
  friend constexpr bool operator==(const pipeline&, const pipeline&) = default;
};

// Throws pipit::error unless ranks >= 1, chunks >= 1 and V placement has two chunks.
constexpr const pipeline& check(const pipeline& pl) {
  if (pl.ranks < 1) fail("pipit: partition: ranks must be >= 1 (got ", pl.ranks, ")");
  if (pl.chunks < 1) fail("pipit: partition: chunks must be >= 1 (got ", pl.chunks, ")");
  if (pl.place == schedule::placement::v_shape && pl.chunks != 2)
    fail("pipit: partition: V-shaped placement needs exactly 2 chunks per rank (got ", pl.chunks,
         ")");
  return pl;
}

// One virtual stage's share of the model.
struct stage {
  int first_layer = 0;     // index of its first transformer layer
  int layers = 0;          // how many transformer layers, [first_layer, first_layer + layers)
  bool embedding = false;  // holds the input embedding (the first stage only)
  bool output = false;     // holds the output layer and the loss (the last stage only)

  friend constexpr bool operator==(const stage&, const stage&) = default;
};

// Where a part runs.
struct location {
  int rank = -1;  // -1: sharded over all ranks (vocabulary parallelism)
  int chunk = -1;
  int stage = -1;  // virtual stage
  friend constexpr bool operator==(const location&, const location&) = default;
};

struct partition {
  pipeline pipe{};
  bool vocab_parallel = false;  // E and L sharded over all ranks, in no stage
  std::vector<stage> stages;    // one per virtual stage, in pipeline order

  constexpr int virtual_stages() const noexcept { return static_cast<int>(stages.size()); }
  constexpr int layer_count() const noexcept {
    int n = 0;
    for (const auto& s : stages) n += s.layers;
    return n;
  }
  constexpr int rank_of(int s) const noexcept {
    return schedule::rank_of(pipe.place, {pipe.ranks, 1, pipe.chunks}, s);
  }
  constexpr int chunk_of(int s) const noexcept {
    return schedule::chunk_of(pipe.place, {pipe.ranks, 1, pipe.chunks}, s);
  }
  constexpr location at(int s) const noexcept { return {rank_of(s), chunk_of(s), s}; }

  // Where transformer layer `i` runs.
  constexpr location layer(int i) const {
    for (int s = 0; s < virtual_stages(); ++s) {
      const auto& st = stages[static_cast<std::size_t>(s)];
      if (i >= st.first_layer && i < st.first_layer + st.layers) return at(s);
    }
    fail("pipit: partition: no layer ", i, " (the partition has ", layer_count(), " layers)");
  }
  // Where the input embedding and the output layer run ({-1, -1, -1}: on every rank, sharded).
  constexpr location embedding() const noexcept {
    for (int s = 0; s < virtual_stages(); ++s)
      if (stages[static_cast<std::size_t>(s)].embedding) return at(s);
    return {};
  }
  constexpr location output() const noexcept {
    for (int s = 0; s < virtual_stages(); ++s)
      if (stages[static_cast<std::size_t>(s)].output) return at(s);
    return {};
  }
  // The virtual stages rank r holds, in chunk order.
  constexpr std::vector<int> stages_of(int r) const {
    std::vector<int> out;
    for (int c = 0; c < pipe.chunks; ++c)
      out.push_back(schedule::stage_of(pipe.place, {pipe.ranks, 1, pipe.chunks}, r, c));
    return out;
  }
  friend constexpr bool operator==(const partition&, const partition&) = default;
};

// Throws pipit::error naming the broken rule unless the partition is well formed: one stage per
// virtual stage, contiguous layers from 0, E exactly on the first stage and L exactly on the last
// (or neither, sharded, under vocabulary parallelism).
constexpr const partition& check(const partition& p) {
  check(p.pipe);
  if (p.virtual_stages() != p.pipe.virtual_stages())
    fail("pipit: partition has ", p.virtual_stages(), " stages but the pipeline has ",
         p.pipe.virtual_stages(), " (ranks ", p.pipe.ranks, " x chunks ", p.pipe.chunks, ")");
  int next = 0;
  const int last = p.virtual_stages() - 1;
  for (int s = 0; s <= last; ++s) {
    const auto& st = p.stages[static_cast<std::size_t>(s)];
    if (st.layers < 0 || st.first_layer != next)
      fail("pipit: partition: stage ", s, " holds layers [", st.first_layer, ", ",
           st.first_layer + st.layers, ") but the next layer is ", next);
    next += st.layers;
    if (st.embedding && (s != 0 || p.vocab_parallel))
      fail("pipit: partition: the embedding is on stage ", s,
           p.vocab_parallel ? " but it is sharded (vocabulary parallel)"
                            : "; it must be on stage 0");
    if (st.output && (s != last || p.vocab_parallel))
      fail("pipit: partition: the output layer is on stage ", s,
           p.vocab_parallel ? " but it is sharded (vocabulary parallel)"
                            : pipit::detail::concat("; it must be on the last stage, ", last));
  }
  if (!p.vocab_parallel && !p.stages.empty() &&
      (!p.stages.front().embedding || !p.stages.back().output))
    fail("pipit: partition: the first stage must hold the embedding and the last the output layer");
  return p;
}

// The layout string of a partition in the language layout.hpp reads: "E t*4 | t*4 | t*4 L";
// a vocabulary-parallel partition has neither E nor L.
inline std::string to_layout(const partition& p) {
  std::string out;
  for (std::size_t s = 0; s < p.stages.size(); ++s) {
    const auto& st = p.stages[s];
    if (s > 0) out += " |";
    std::string items;
    if (st.embedding) items += " E";
    if (st.layers == 1) items += " t";
    if (st.layers > 1) items += pipit::detail::concat(" t*", st.layers);
    if (st.output) items += " L";
    out += items;
  }
  return out.empty() ? out : out.substr(out.front() == ' ' ? 1 : 0);
}

// The parts one stage holds, e.g. "E t*4" or "t*3 L" or "-" for an empty stage.
inline std::string describe(const stage& st) {
  std::string items;
  if (st.embedding) items += "E ";
  if (st.layers == 1) items += "t ";
  if (st.layers > 1) items += pipit::detail::concat("t*", st.layers, " ");
  if (st.output) items += "L ";
  return items.empty() ? "-" : items.substr(0, items.size() - 1);
}

}  // namespace pipit::partition
