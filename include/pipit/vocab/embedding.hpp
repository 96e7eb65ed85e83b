#pragma once
// The input embedding sharded over the vocabulary (Yeung et al., arXiv 2411.05288, section 3.3;
// reference code vocab_input.py of sail-sg/VocabularyParallelism):
//   forward (IF):  each rank gathers the rows of the tokens it owns (zeros for the others) and
//                  the partial embeddings are summed, to the first stage (reduce) or to every
//                  rank (all_reduce). Exactly one rank contributes each row, so the sum is exact.
//   backward (IB): the first stage's gradient of the embedding output is broadcast and every
//                  rank scatter-adds the rows of the tokens it owns into its table gradient.
// The *_local functions are the per-rank passes; embedding_forward / embedding_backward add the
// collectives over a communicator. Token ids must lie in [0, V): padding ids are an error.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <type_traits>

#include "pipit/comm/communicator.hpp"
#include "pipit/core/config.hpp"
#include "pipit/core/error.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/shards.hpp"

namespace pipit::vocab {

// Kernel building blocks: one token's row, gather and scatter-add.
template <class T, class O>
PIPIT_HOST_DEVICE void embedding_gather_row(const T* table_row, O* out, std::int64_t hidden) {
  if (table_row == nullptr) {
    for (std::int64_t j = 0; j < hidden; ++j) out[j] = O(0);
  } else {
    for (std::int64_t j = 0; j < hidden; ++j) out[j] = static_cast<O>(table_row[j]);
  }
}
template <class G, class A>
PIPIT_HOST_DEVICE void embedding_scatter_add_row(const G* grad_row, A* table_grad_row,
                                                 std::int64_t hidden) {
  for (std::int64_t j = 0; j < hidden; ++j) table_grad_row[j] += static_cast<A>(grad_row[j]);
}

namespace detail {
template <class T>
void check_embedding_view(const matrix_view<T>& v, std::int64_t rows, std::int64_t cols,
                          const char* what) {
  if (v.rows != rows || v.cols != cols)
    fail("pipit::vocab: ", what, " is ", v.rows, " x ", v.cols, ", expected ", rows, " x ", cols);
  if (v.ld() < v.cols) fail("pipit::vocab: ", what, " has row stride ", v.ld(), " < ", v.cols);
}
inline void check_tokens(const vocab_shards& shards, std::span<const std::int64_t> tokens) {
  for (const std::int64_t x : tokens) shards.check_token(x);
}
}  // namespace detail

// IF on one rank: out (tokens x hidden, overwritten) = table[x - begin] for the tokens this rank
// owns, 0 for the others. table: the rank's shard, shard_size() x hidden.
template <class T, class O>
void embedding_forward_local(const vocab_shards& shards, int rank, matrix_view<const T> table,
                             std::span<const std::int64_t> tokens, matrix_view<O> out) {
  shards.check_rank(rank);
  detail::check_tokens(shards, tokens);
  const std::int64_t h = table.cols;
  detail::check_embedding_view(table, shards.shard_size(), h, "the embedding shard");
  detail::check_embedding_view(out, static_cast<std::int64_t>(tokens.size()), h,
                               "the embedding output");
  const auto own = shards.real_range_of(rank);
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const std::int64_t r = owned_row(tokens[t], own.begin, own.end);
    embedding_gather_row(r >= 0 ? table.row(r) : static_cast<const T*>(nullptr),
                         out.row(static_cast<std::int64_t>(t)), h);
  }
}

// IB on one rank: grad_table (shard_size() x hidden) += the rows of grad_out (tokens x hidden,
// the gradient of the embedding output) of the tokens this rank owns. Rows of ids this rank
// does not own, and padding rows, are untouched. Sequential, so deterministic.
template <class G, class A>
void embedding_backward_local(const vocab_shards& shards, int rank,
                              std::span<const std::int64_t> tokens, matrix_view<const G> grad_out,
                              matrix_view<A> grad_table) {
  shards.check_rank(rank);
  detail::check_tokens(shards, tokens);
  const std::int64_t h = grad_out.cols;
  detail::check_embedding_view(grad_out, static_cast<std::int64_t>(tokens.size()), h,
                               "the embedding-output gradient");
  detail::check_embedding_view(grad_table, shards.shard_size(), h, "the embedding gradient");
  const auto own = shards.real_range_of(rank);
  for (std::size_t t = 0; t < tokens.size(); ++t)
    if (const std::int64_t r = owned_row(tokens[t], own.begin, own.end); r >= 0)
      embedding_scatter_add_row(grad_out.row(static_cast<std::int64_t>(t)), grad_table.row(r), h);
}

// IF over a communicator: every rank gathers its rows, then the partials are summed into `out`
// on `root` (reduce; out is scratch on the other ranks) or on every rank (root == all_ranks).
// `out` must be contiguous.
template <comm::communicator C, class T, class O>
void embedding_forward(C& comm, const vocab_shards& shards, matrix_view<const T> table,
                       std::span<const std::int64_t> tokens, matrix_view<O> out, int root = 0) {
  if (comm.size() != shards.ranks())
    fail("pipit::vocab: the communicator has ", comm.size(),
         " ranks but the vocabulary is split "
         "over ",
         shards.ranks());
  embedding_forward_local<T, O>(shards, comm.rank(), table, tokens, out);
  if (out.ld() != out.cols) fail("pipit::vocab: the embedding output must be contiguous");
  const std::span<O> flat(out.data, static_cast<std::size_t>(out.rows * out.cols));
  if (root < 0)
    comm.all_reduce(flat, std::plus<>{});
  else
    comm.reduce(flat, std::plus<>{}, root);
}

// IB over a communicator: grad_out is broadcast from `root` (its contents on the other ranks
// are overwritten), then every rank scatter-adds its tokens' rows into grad_table.
template <comm::communicator C, class G, class A>
void embedding_backward(C& comm, const vocab_shards& shards, std::span<const std::int64_t> tokens,
                        matrix_view<G> grad_out, matrix_view<A> grad_table, int root = 0) {
  if (comm.size() != shards.ranks())
    fail("pipit::vocab: the communicator has ", comm.size(),
         " ranks but the vocabulary is split "
         "over ",
         shards.ranks());
  if (grad_out.ld() != grad_out.cols)
    fail("pipit::vocab: the embedding-output gradient must be contiguous");
  comm.broadcast(
      std::span<G>(grad_out.data, static_cast<std::size_t>(grad_out.rows * grad_out.cols)), root);
  embedding_backward_local<G, A>(shards, comm.rank(), tokens, matrix_view<const G>(grad_out),
                                 grad_table);
}

}  // namespace pipit::vocab
