#pragma once
// embedding: x[:, b S + t] = E[:, token] + P[:, t] — the token embedding E (d x V) and the learned
// position embedding P (d x S) of GPT-2. The input backward has nothing to do (tokens have no
// gradient); the weight backward scatter-adds the output gradient into the rows used, in token
// order, so it is deterministic. Under vocabulary parallelism E is sharded over the ranks and
// applied by pipit's executor; the first stage then adds only P (add_positions).

#include <cstdint>
#include <span>

#include "config.hpp"
#include "init.hpp"
#include "matrix.hpp"

namespace gpt {

template <class T>
struct position_embedding {
  matrix<T> p, d_p;  // d x S
  int seq = 1;

  position_embedding() = default;
  explicit position_embedding(const model_config& c)
      : p(normal_matrix<T>(c, tensor_key(-1, tensor_id::position_embedding), c.hidden, c.seq,
                           c.init_std)),
        d_p(matrix<T>::Zero(c.hidden, c.seq)),
        seq(c.seq) {}

  // x += P for every sequence of the microbatch (x: d x (batch S)).
  void add(map<T> x) const {
    for (Eigen::Index j = 0; j < x.cols(); ++j) x.col(j) += p.col(j % seq);
  }
  void backward_weight(cmap<T> dx) {
    for (Eigen::Index j = 0; j < dx.cols(); ++j) d_p.col(j % seq) += dx.col(j);
  }
};

template <class T>
struct token_embedding {
  matrix<T> e, d_e;  // d x V

  token_embedding() = default;
  explicit token_embedding(const model_config& c)
      : e(normal_matrix<T>(c, tensor_key(-1, tensor_id::token_embedding), c.hidden, c.vocab,
                           c.init_std)),
        d_e(matrix<T>::Zero(c.hidden, c.vocab)) {}

  // x[:, j] = E[:, tokens[j]] (x: d x n).
  void forward(std::span<const std::int32_t> tokens, map<T> x) const {
    for (Eigen::Index j = 0; j < x.cols(); ++j)
      x.col(j) = e.col(tokens[static_cast<std::size_t>(j)]);
  }
  void backward_weight(std::span<const std::int32_t> tokens, cmap<T> dx) {
    for (Eigen::Index j = 0; j < dx.cols(); ++j)
      d_e.col(tokens[static_cast<std::size_t>(j)]) += dx.col(j);
  }
};

}  // namespace gpt
