#pragma once
// Deterministic parameter initialisation: N(0, std^2) weights drawn element by element from a hash
// of (seed, tensor, element), so any partition of the model starts from the same values.

#include <cstdint>

#include "config.hpp"
#include "matrix.hpp"
#include "random.hpp"

namespace gpt {

template <class T>
matrix<T> normal_matrix(const model_config& c, std::uint64_t key, Eigen::Index rows,
                        Eigen::Index cols, double std) {
  matrix<T> m(rows, cols);
  for (Eigen::Index j = 0; j < cols; ++j)
    for (Eigen::Index i = 0; i < rows; ++i)
      m(i, j) = static_cast<T>(
          std * normal(hash_of({c.seed, key, static_cast<std::uint64_t>(j * rows + i)})));
  return m;
}

}  // namespace gpt
