#pragma once
// naive: the transformer layers split evenly over the virtual stages (the first layers % stages
// stages get one more), the input embedding on the first stage and the output layer on the last —
// the baseline of the vocabulary-parallelism paper (Yeung et al., MLSys 2025, "Baseline"). With
// V-shaped placement the first and the last stage are both on rank 0.

#include <cstddef>

#include "pipit/core/error.hpp"
#include "pipit/core/math.hpp"
#include "pipit/partition/partition.hpp"

namespace pipit::partition {

namespace impl {
// Layers split evenly over the virtual stages; every stage gets at least one layer.
constexpr partition even_layers(const char* who, int layers, const pipeline& pl) {
  check(pl);
  const int stages = pl.virtual_stages();
  if (layers < stages)
    fail("pipit: ", who, " partition needs at least one transformer layer per stage: layers (",
         layers, ") < stages (", stages, " = ranks ", pl.ranks, " x chunks ", pl.chunks, ")");
  partition p{pl, false, {}};
  p.stages.reserve(static_cast<std::size_t>(stages));
  for (int s = 0; s < stages; ++s) {
    const auto r = even_split(layers, stages, s);
    p.stages.push_back({r.begin, r.size(), false, false});
  }
  return p;
}
}  // namespace impl

constexpr partition naive(int layers, const pipeline& pl) {
  partition p = impl::even_layers("naive", layers, pl);
  p.stages.front().embedding = true;
  p.stages.back().output = true;
  check(p);
  return p;
}

}  // namespace pipit::partition
