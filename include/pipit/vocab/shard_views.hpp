#pragma once
// check_shard_views: the construction checks the host and the CUDA vocabulary layers share
// (runtime::vocab_layers, cuda::vocab_layers): a valid shard rank, tokens and hidden size > 0,
// and the embedding and output-layer shards and their gradients each shard rows x hidden with
// data and a row stride >= hidden. `who` names the caller in the pipit::error.

#include <cstdint>

#include "pipit/core/error.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/shards.hpp"

namespace pipit::vocab {

template <class E, class EG, class H, class HG>
void check_shard_views(const char* who, const vocab_shards& shards, int rank, std::int64_t tokens,
                       matrix_view<E> embedding, matrix_view<EG> embedding_grad,
                       matrix_view<H> head, matrix_view<HG> head_grad) {
  shards.check_rank(rank);
  const std::int64_t hidden = head.cols;
  if (tokens <= 0) fail(who, ": ", tokens, " tokens per microbatch");
  if (hidden <= 0) fail(who, ": hidden size ", hidden, " <= 0");
  const auto check = [&](auto v, const char* what) {
    if (v.rows != shards.shard_size() || v.cols != hidden)
      fail(who, ": ", what, " is ", v.rows, " x ", v.cols, ", expected ", shards.shard_size(),
           " x ", hidden, " (shard rows x hidden)");
    if (v.ld() < v.cols || (v.data == nullptr && v.rows * v.cols > 0))
      fail(who, ": ", what, " has no data or a row stride below ", v.cols);
  };
  check(embedding, "the embedding shard");
  check(embedding_grad, "the embedding gradient");
  check(head, "the output-layer shard");
  check(head_grad, "the output-layer gradient");
}

}  // namespace pipit::vocab
