#pragma once
// vocab_tables: one pipeline rank's rows of the token embedding E and of the LM head W under
// vocabulary parallelism, with their gradients, as pipit::runtime::vocab_layers reads them.
//
// Both tables are V x d row-major (the memory of the d x V column-major matrices the unsharded
// model holds: embedding.hpp, lm_head.hpp); this rank owns rows [begin, begin + shard_size) of the
// padded vocabulary (pipit::vocab::vocab_shards). Each element is initialised from the same hash
// of (seed, tensor, element) as the unsharded table, so a sharded model starts from exactly the
// same values as a single-rank one; the padding rows are zero, never read and never stepped (the
// optimizer sees only the real rows).

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "config.hpp"
#include "matrix.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/shards.hpp"
#include "random.hpp"

namespace gpt {

template <class T>
class vocab_tables {
 public:
  vocab_tables(const model_config& c, const pipit::vocab::vocab_shards& shards, int rank)
      : d_(c.hidden), rows_(shards.shard_size()), real_(shards.real_rows(rank)) {
    shards.check_rank(rank);
    const std::int64_t begin = shards.range_of(rank).begin;
    const auto n = static_cast<std::size_t>(rows_ * d_);
    for (auto* v : {&e_, &de_, &w_, &dw_}) v->assign(n, T(0));
    const auto fill = [&](std::vector<T>& table, tensor_id id) {
      for (std::int64_t r = 0; r < real_; ++r)
        for (std::int64_t j = 0; j < d_; ++j) {
          // Element (row, j) of the V x d row-major table is element row * d + j of the d x V
          // column-major matrix normal_matrix fills (init.hpp).
          const auto element = static_cast<std::uint64_t>((begin + r) * d_ + j);
          table[static_cast<std::size_t>(r * d_ + j)] =
              static_cast<T>(c.init_std * normal(hash_of({c.seed, tensor_key(-1, id), element})));
        }
    };
    fill(e_, tensor_id::token_embedding);
    fill(w_, tensor_id::head_w);
    const auto offset = static_cast<std::size_t>(begin * d_);
    const auto real = static_cast<std::size_t>(real_ * d_);
    params_.push_back({std::span<T>(e_).first(real), std::span<T>(de_).first(real),
                       tensor_key(-1, tensor_id::token_embedding), offset});
    params_.push_back({std::span<T>(w_).first(real), std::span<T>(dw_).first(real),
                       tensor_key(-1, tensor_id::head_w), offset});
  }

  vocab_tables(const vocab_tables&) = delete;
  vocab_tables& operator=(const vocab_tables&) = delete;

  pipit::vocab::matrix_view<const T> embedding() const { return {e_.data(), rows_, d_}; }
  pipit::vocab::matrix_view<T> embedding_grad() { return {de_.data(), rows_, d_}; }
  pipit::vocab::matrix_view<const T> head() const { return {w_.data(), rows_, d_}; }
  pipit::vocab::matrix_view<T> head_grad() { return {dw_.data(), rows_, d_}; }

  // The real rows of both tables, for the optimizer (`offset`: where they start in the tensor).
  std::span<const parameter<T>> parameters() const { return params_; }
  std::size_t parameter_count() const { return 2 * static_cast<std::size_t>(real_ * d_); }
  // Both tables and their gradients, padding included.
  std::size_t bytes() const { return 4 * e_.size() * sizeof(T); }

 private:
  std::int64_t d_, rows_, real_;
  std::vector<T> e_, de_, w_, dw_;
  std::vector<parameter<T>> params_;
};

}  // namespace gpt
