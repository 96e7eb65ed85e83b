#pragma once
// lm_head: the output layer of a pipeline's last stage when it is not sharded — the final layer
// norm, the untied LM head W (V x d) and the softmax cross-entropy, per microbatch.
//
// The LM head and the loss are pipit::vocab::output_layer<one_barrier> over a single vocabulary
// shard: the same fused, chunked code that vocabulary parallelism runs on every rank, so the
// naive and the sharded output layer do the same arithmetic (Yeung et al., "Balancing Pipeline
// Parallelism with Vocabulary Parallelism", MLSys 2025, Algorithm 2). Its forward makes the loss
// and D, the input gradient before the per-token loss gradient g; the input backward is then only
// dX = g .* D and the final norm's backward; the weight backward recomputes the logits chunk by
// chunk for dW += dZ^T X. The tokens x V logits are never held.

#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "config.hpp"
#include "init.hpp"
#include "layer_norm.hpp"
#include "matrix.hpp"
#include "pipit/vocab/output_layer.hpp"

namespace gpt {

struct lm_head_layout {
  Eigen::Index d = 0, n = 0;
  std::size_t xhat = 0, rstd = 0, xf = 0, dxf = 0, size = 0;
  lm_head_layout() = default;
  explicit lm_head_layout(const model_config& c) : d(c.hidden), n(c.tokens()) {
    const auto dn = static_cast<std::size_t>(d * n);
    xhat = 0, rstd = dn, xf = rstd + static_cast<std::size_t>(n), dxf = xf + dn, size = dxf + dn;
  }
};

template <class T>
class lm_head {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "gpt::lm_head: T must be float or double (its gradients are kept in T)");
  using output_layer = pipit::vocab::output_layer<pipit::vocab::one_barrier, T>;

 public:
  layer_norm<T> norm;
  matrix<T> w, d_w;  // d x V column-major = the V x d row-major table output_layer reads

  lm_head() = default;
  lm_head(const model_config& c, int microbatches)
      : norm(c.hidden),
        w(normal_matrix<T>(c, tensor_key(-1, tensor_id::head_w), c.hidden, c.vocab, c.init_std)),
        d_w(matrix<T>::Zero(c.hidden, c.vocab)),
        shards_(c.vocab, 1, 1),
        layout_(c),
        layers_(static_cast<std::size_t>(microbatches)),
        targets_(static_cast<std::size_t>(microbatches)),
        g_(static_cast<std::size_t>(microbatches)) {}

  const lm_head_layout& layout() const noexcept { return layout_; }

  // The mean cross-entropy of microbatch `mb` (x: d x n, targets: n ids). Its gradients are
  // scaled by grad_scale (1 / microbatches: the step's loss is the mean over microbatches).
  double forward(int mb, cmap<T> x, std::span<const std::int32_t> targets, std::span<T> saved,
                 double grad_scale) {
    const lm_head_layout& L = layout_;
    const auto m = static_cast<std::size_t>(mb);
    norm.forward(x, view(saved, L.xf, L.d, L.n), view(saved, L.xhat, L.d, L.n),
                 view(saved, L.rstd, 1, L.n));
    targets_[m].assign(targets.begin(), targets.end());
    g_[m].resize(targets.size());
    pipit::vocab::loss_options opt;
    opt.grad_output = grad_scale;
    output_layer& layer = layers_[m].emplace(
        shards_, 0, pipit::vocab::make_view<const T>(saved.data() + L.xf, L.n, L.d),
        pipit::vocab::make_view<const T>(w.data(), w.cols(), w.rows()),
        std::span<const std::int64_t>(targets_[m]), opt);
    const auto a = pipit::vocab::make_view<T>(saved.data() + L.dxf, L.n, L.d);
    layer.s_pass(a);  // one shard: its statistics are already the global ones
    layer.input_grad_partial(a);
    peak_workspace_ = std::max(peak_workspace_, workspace_bytes());
    return static_cast<double>(layer.loss(g_[m]).loss);
  }

  // dx: d x n, the gradient of the head's input.
  void backward_input(int mb, std::span<T> saved, map<T> dx) {
    const lm_head_layout& L = layout_;
    const auto m = static_cast<std::size_t>(mb);
    pipit::vocab::scale_rows(pipit::vocab::make_view<T>(saved.data() + L.dxf, L.n, L.d),
                             std::span<const T>(g_[m]));
    norm.backward_input(cview(saved, L.dxf, L.d, L.n), cview(saved, L.xhat, L.d, L.n),
                        cview(saved, L.rstd, 1, L.n), dx);
  }

  void backward_weight(int mb, std::span<const T> saved) {
    const lm_head_layout& L = layout_;
    const auto m = static_cast<std::size_t>(mb);
    if (!layers_[m])
      pipit::fail("gpt::lm_head: weight backward of microbatch ", mb, " before its forward");
    layers_[m]->t_pass(std::span<const T>(g_[m]),
                       pipit::vocab::make_view<T>(d_w.data(), d_w.cols(), d_w.rows()));
    norm.backward_weight(cview(saved, L.dxf, L.d, L.n), cview(saved, L.xhat, L.d, L.n));
    layers_[m].reset();
  }

  template <class F>
  void for_each_parameter(F&& f) {
    f(tensor_id::final_gamma, norm.gamma, norm.d_gamma);
    f(tensor_id::final_beta, norm.beta, norm.d_beta);
    f(tensor_id::head_w, w, d_w);
  }

  // The most bytes workspace_bytes() has reached after a forward.
  std::size_t peak_workspace_bytes() const noexcept { return peak_workspace_; }
  // Bytes of the per-microbatch workspaces alive now (logit chunks, statistics).
  std::size_t workspace_bytes() const {
    std::size_t b = 0;
    for (const auto& l : layers_)
      if (l) b += l->workspace_bytes();
    return b;
  }

 private:
  pipit::vocab::vocab_shards shards_{2, 1, 1};
  lm_head_layout layout_;
  std::vector<std::optional<output_layer>> layers_;  // one per microbatch in flight
  std::vector<std::vector<std::int64_t>> targets_;
  std::vector<std::vector<T>> g_;  // per-token loss gradients
  std::size_t peak_workspace_ = 0;
};

}  // namespace gpt
