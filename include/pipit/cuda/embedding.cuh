#pragma once
// The input embedding sharded over the vocabulary on a CUDA device: the per-rank passes of
// vocab/embedding.hpp (IF: gather the owned rows, zeros elsewhere; IB: scatter-add the output
// gradient into the owned rows) and their collectives over cuda::nccl_communicator.
//
// Scatter-add policies:
//   atomic_scatter   one block per token, atomicAdd per element: fast, but the order in which
//                    repeated tokens add up varies from run to run (so do the last bits).
//   sorted_scatter   deterministic: CUB's radix sort (stable) orders the tokens by their row
//                    with the token index as value, then one block per run of equal rows adds
//                    the run's gradients into the row in token order -- the host reference's
//                    order, so a float result is bit-identical to embedding_backward_local's.
// Token ids are device arrays; an id outside [0, V) is reported to `check` (and skipped):
// call check.raise_if_bad_ids(tokens, V, "tokens") where a synchronisation is acceptable.

#include <cuda_runtime.h>
#include <cub/device/device_radix_sort.cuh>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <type_traits>

#include "pipit/core/error.hpp"
#include "pipit/cuda/check.cuh"
#include "pipit/cuda/device_buffer.cuh"
#include "pipit/cuda/entry_check.cuh"
#include "pipit/cuda/launch.cuh"
#include "pipit/vocab/embedding.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/shards.hpp"

namespace pipit::cuda {

struct atomic_scatter {};
struct sorted_scatter {};

template <class S>
concept scatter_policy = std::is_same_v<S, atomic_scatter> || std::is_same_v<S, sorted_scatter>;

namespace detail_embedding {

template <class T>
void check_view(const vocab::matrix_view<T>& v, std::int64_t rows, std::int64_t cols,
                const char* what) {
  if (v.rows != rows || v.cols != cols)
    fail("pipit::cuda: ", what, " is ", v.rows, " x ", v.cols, ", expected ", rows, " x ", cols);
  if (v.ld() < v.cols) fail("pipit::cuda: ", what, " has row stride ", v.ld(), " < ", v.cols);
}

template <int Block, class T, class O>
__global__ void __launch_bounds__(Block)
    gather(const T* table, std::int64_t ldt, const std::int64_t* tokens, std::int64_t vocab_size,
           std::int64_t begin, std::int64_t end, O* out, std::int64_t ldo, std::int64_t hidden,
           entry_check_ref check) {
  const std::int64_t t = blockIdx.x;
  const std::int64_t x = tokens[t];
  const bool bad = x < 0 || x >= vocab_size;
  if (bad && threadIdx.x == 0) check.report(t);
  const std::int64_t r = bad ? -1 : vocab::owned_row(x, begin, end);
  const T* row = r >= 0 ? table + r * ldt : nullptr;
  O* o = out + t * ldo;
  for (std::int64_t j = threadIdx.x; j < hidden; j += Block)
    vocab::embedding_gather_row(row ? row + j : nullptr, o + j, 1);
}

template <int Block, class G, class A>
__global__ void __launch_bounds__(Block)
    scatter_atomic(const G* grad, std::int64_t ldg, const std::int64_t* tokens,
                   std::int64_t vocab_size, std::int64_t begin, std::int64_t end, A* table_grad,
                   std::int64_t lda, std::int64_t hidden, entry_check_ref check) {
  const std::int64_t t = blockIdx.x;
  const std::int64_t x = tokens[t];
  if (x < 0 || x >= vocab_size) {
    if (threadIdx.x == 0) check.report(t);
    return;
  }
  const std::int64_t r = vocab::owned_row(x, begin, end);
  if (r < 0) return;
  const G* g = grad + t * ldg;
  A* dst = table_grad + r * lda;
  for (std::int64_t j = threadIdx.x; j < hidden; j += Block)
    atomicAdd(dst + j, static_cast<A>(g[j]));
}

// keys[t] = the token's row in the shard, or `none` (not owned, or invalid: reported).
__global__ void sort_keys(const std::int64_t* tokens, std::int64_t n, std::int64_t vocab_size,
                          std::int64_t begin, std::int64_t end, std::uint32_t none,
                          std::uint32_t* keys, std::int32_t* values, entry_check_ref check) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += stride) {
    const std::int64_t x = tokens[t];
    std::int64_t r = -1;
    if (x < 0 || x >= vocab_size)
      check.report(t);
    else
      r = vocab::owned_row(x, begin, end);
    keys[t] = r >= 0 ? static_cast<std::uint32_t>(r) : none;
    values[t] = static_cast<std::int32_t>(t);
  }
}

// One block per sorted position; the first position of each run of equal keys adds the run's
// gradient rows, in token order, into its row.
template <int Block, class G, class A>
__global__ void __launch_bounds__(Block)
    scatter_runs(const std::uint32_t* keys, const std::int32_t* order, std::int64_t n,
                 std::uint32_t none, const G* grad, std::int64_t ldg, A* table_grad,
                 std::int64_t lda, std::int64_t hidden) {
  const std::int64_t i = blockIdx.x;
  const std::uint32_t k = keys[i];
  if (k == none || (i > 0 && keys[i - 1] == k)) return;
  std::int64_t e = i + 1;
  while (e < n && keys[e] == k) ++e;
  A* dst = table_grad + static_cast<std::int64_t>(k) * lda;
  for (std::int64_t j = threadIdx.x; j < hidden; j += Block) {
    A acc = dst[j];
    for (std::int64_t q = i; q < e; ++q)
      vocab::embedding_scatter_add_row(grad + static_cast<std::int64_t>(order[q]) * ldg + j, &acc,
                                       1);
    dst[j] = acc;
  }
}

inline int key_bits(std::uint32_t none) {
  int b = 1;
  while (b < 32 && (std::uint64_t(1) << b) <= none) ++b;
  return b;
}

}  // namespace detail_embedding

// IF on one rank: out (tokens x hidden, overwritten) = table[x - begin] for the tokens this rank
// owns, 0 for the others. table: the rank's shard, shard_size() x hidden (device).
template <int Block = 128, class T, class O>
void embedding_forward_local(const vocab::vocab_shards& shards, int rank,
                             vocab::matrix_view<const T> table,
                             std::span<const std::int64_t> tokens, vocab::matrix_view<O> out,
                             cudaStream_t stream, entry_check& check) {
  shards.check_rank(rank);
  const std::int64_t h = table.cols, n = static_cast<std::int64_t>(tokens.size());
  detail_embedding::check_view(table, shards.shard_size(), h, "the embedding shard");
  detail_embedding::check_view(out, n, h, "the embedding output");
  if (n == 0) return;
  const auto own = shards.real_range_of(rank);
  detail_embedding::gather<Block, T, O><<<row_blocks(n), Block, 0, stream>>>(
      table.data, table.ld(), tokens.data(), shards.vocab_size(), own.begin, own.end, out.data,
      out.ld(), h, check.ref());
  PIPIT_CUDA_CHECK(cudaGetLastError());
}

// IB on one rank: grad_table (shard_size() x hidden, device) += the rows of grad_out (tokens x
// hidden) of the tokens this rank owns; other rows, padding rows included, are untouched.
template <scatter_policy Scatter = sorted_scatter, int Block = 128, class G, class A>
void embedding_backward_local(const vocab::vocab_shards& shards, int rank,
                              std::span<const std::int64_t> tokens,
                              vocab::matrix_view<const G> grad_out,
                              vocab::matrix_view<A> grad_table, cudaStream_t stream,
                              entry_check& check) {
  shards.check_rank(rank);
  const std::int64_t h = grad_out.cols, n = static_cast<std::int64_t>(tokens.size());
  detail_embedding::check_view(grad_out, n, h, "the embedding-output gradient");
  detail_embedding::check_view(grad_table, shards.shard_size(), h, "the embedding gradient");
  if (n == 0 || h == 0) return;
  const auto own = shards.real_range_of(rank);
  if constexpr (std::is_same_v<Scatter, atomic_scatter>) {
    detail_embedding::scatter_atomic<Block, G, A><<<row_blocks(n), Block, 0, stream>>>(
        grad_out.data, grad_out.ld(), tokens.data(), shards.vocab_size(), own.begin, own.end,
        grad_table.data, grad_table.ld(), h, check.ref());
    PIPIT_CUDA_CHECK(cudaGetLastError());
  } else {
    if (n > 2147483647)
      fail("pipit::cuda: sorted embedding scatter of ", n, " tokens (at most 2^31 - 1)");
    if (shards.shard_size() >= 4294967295LL)
      fail("pipit::cuda: sorted embedding scatter with ", shards.shard_size(),
           " rows per shard (at most 2^32 - 2)");
    const auto none = static_cast<std::uint32_t>(shards.shard_size());
    const auto un = static_cast<std::size_t>(n);
    device_buffer<std::uint32_t> keys_in(un, stream), keys_out(un, stream);
    device_buffer<std::int32_t> vals_in(un, stream), vals_out(un, stream);
    detail_embedding::sort_keys<<<stride_blocks<256>(n), 256, 0, stream>>>(
        tokens.data(), n, shards.vocab_size(), own.begin, own.end, none, keys_in.data(),
        vals_in.data(), check.ref());
    PIPIT_CUDA_CHECK(cudaGetLastError());
    const int bits = detail_embedding::key_bits(none);
    std::size_t temp_bytes = 0;
    PIPIT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, temp_bytes, keys_in.data(), keys_out.data(), vals_in.data(), vals_out.data(),
        static_cast<int>(n), 0, bits, stream));
    device_buffer<unsigned char> temp(temp_bytes, stream);
    PIPIT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        temp.data(), temp_bytes, keys_in.data(), keys_out.data(), vals_in.data(), vals_out.data(),
        static_cast<int>(n), 0, bits, stream));
    detail_embedding::scatter_runs<Block, G, A><<<row_blocks(n), Block, 0, stream>>>(
        keys_out.data(), vals_out.data(), n, none, grad_out.data, grad_out.ld(), grad_table.data,
        grad_table.ld(), h);
    PIPIT_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace pipit::cuda
