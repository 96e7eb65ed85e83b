#pragma once
// Launch-configuration arithmetic of pipit's kernels, kept apart from the kernels so that it can
// be checked on a machine without a device. Two shapes are used:
//   row kernels:   one block per row (a token's logits, a token's hidden vector), the block's
//                  threads striding over the row; rows up to 2^31 - 1.
//   element loops: grid-stride loops over n elements with at most max_blocks blocks.

#include <cstdint>

#include "pipit/core/error.hpp"

namespace pipit::cuda {

// Grid-x limit of every architecture pipit builds for (compute capability >= 3.0).
inline constexpr std::int64_t max_grid_x = 2147483647;
// Enough blocks to fill an H200 (132 SMs) several times over in a grid-stride loop.
inline constexpr std::int64_t max_blocks = 4096;

template <int Block>
concept valid_block_size = Block >= 32 && Block <= 1024 && Block % 32 == 0;

// Blocks of a row kernel over `rows` rows; throws pipit::error when the grid cannot hold them.
constexpr unsigned row_blocks(std::int64_t rows) {
  if (rows < 0 || rows > max_grid_x)
    fail("pipit::cuda: ", rows, " rows do not fit one block per row (at most ", max_grid_x, ")");
  return static_cast<unsigned>(rows);
}

// Blocks of a grid-stride loop over n elements with Block threads per block (0 for n == 0).
template <int Block>
requires valid_block_size<Block>
constexpr unsigned stride_blocks(std::int64_t n) {
  if (n < 0) fail("pipit::cuda: negative element count ", n);
  const std::int64_t b = (n + Block - 1) / Block;
  return static_cast<unsigned>(b < max_blocks ? b : max_blocks);
}

}  // namespace pipit::cuda
