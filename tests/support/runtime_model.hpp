#pragma once
// The executor tests' model: a small deterministic multi-layer perceptron (tanh hidden layers,
// optional dropout, a linear last layer, half squared error), as a pipeline stage for any
// partition and as a single-process reference. Both call the same per-layer functions, so one
// microbatch's arithmetic is identical in both; only the order in which gradients of different
// microbatches (and replicas) are summed may differ.

#include <Eigen/Core>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <span>
#include <vector>

#include "pipit/core/math.hpp"
#include "pipit/runtime/pass_info.hpp"
#include "pipit/schedule/plan.hpp"

namespace pipit::testing {

struct mlp_config {
  std::vector<int> widths;  // layer l maps widths[l] -> widths[l + 1]
  int batch = 3;            // samples per microbatch
  double keep = 1.0;        // dropout keep probability on hidden layers (1: no dropout)
  // Dropout masks from pass_info::seed (depends on the partition) instead of
  // (step, replica, microbatch) (does not, so the reference can reproduce it).
  bool masks_from_pass_seed = false;
  std::uint64_t seed = 7;

  int layers() const { return static_cast<int>(widths.size()) - 1; }
};

inline std::uint64_t hash_of(std::initializer_list<std::uint64_t> xs) {
  std::uint64_t h = 0x243f6a8885a308d3ULL;
  for (const auto x : xs) h = runtime::mix_seed(h ^ x);
  return h;
}
// Uniform in [0, 1) and [-1, 1).
inline double unit01(std::uint64_t h) {
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}
inline double unit11(std::uint64_t h) {
  return 2 * unit01(h) - 1;
}

template <class T>
struct mlp_math {
  using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  using map = Eigen::Map<mat>;
  using cmap = Eigen::Map<const mat>;

  const mlp_config& cfg;

  bool hidden(int l) const { return l + 1 < cfg.layers(); }

  mat init_weight(int l) const {
    const int in = cfg.widths[static_cast<std::size_t>(l)],
              out = cfg.widths[static_cast<std::size_t>(l) + 1];
    mat w(out, in);
    const double scale = 1.2 / std::sqrt(static_cast<double>(in));
    for (int i = 0; i < out; ++i)
      for (int j = 0; j < in; ++j)
        w(i, j) = static_cast<T>(scale * unit11(hash_of({cfg.seed, 1, std::uint64_t(l),
                                                         std::uint64_t(i), std::uint64_t(j)})));
    return w;
  }
  vec init_bias(int l) const {
    const int out = cfg.widths[static_cast<std::size_t>(l) + 1];
    vec b(out);
    for (int i = 0; i < out; ++i)
      b(i) =
          static_cast<T>(0.1 * unit11(hash_of({cfg.seed, 2, std::uint64_t(l), std::uint64_t(i)})));
    return b;
  }
  // The data of microbatch mb of replica r at step `step`: input (widths[0] x batch) and target.
  void input(std::uint64_t step, int replica, int mb, map x) const {
    for (Eigen::Index j = 0; j < x.cols(); ++j)
      for (Eigen::Index i = 0; i < x.rows(); ++i)
        x(i, j) = static_cast<T>(
            unit11(hash_of({cfg.seed, 3, step, std::uint64_t(replica), std::uint64_t(mb),
                            std::uint64_t(i), std::uint64_t(j)})));
  }
  void target(std::uint64_t step, int replica, int mb, map t) const {
    for (Eigen::Index j = 0; j < t.cols(); ++j)
      for (Eigen::Index i = 0; i < t.rows(); ++i)
        t(i, j) = static_cast<T>(
            0.8 * unit11(hash_of({cfg.seed, 4, step, std::uint64_t(replica), std::uint64_t(mb),
                                  std::uint64_t(i), std::uint64_t(j)})));
  }
  std::uint64_t mask_key(std::uint64_t step, int replica, int mb) const {
    return hash_of({cfg.seed, 5, step, std::uint64_t(replica), std::uint64_t(mb)});
  }
  // Dropout scale of element (i, j) of hidden layer l: 0 or 1 / keep.
  T mask(std::uint64_t key, int l, Eigen::Index i, Eigen::Index j) const {
    if (cfg.keep >= 1.0) return T(1);
    const double u = unit01(hash_of({key, std::uint64_t(l), std::uint64_t(i), std::uint64_t(j)}));
    return u < cfg.keep ? static_cast<T>(1.0 / cfg.keep) : T(0);
  }

  // h = W x + b, then tanh on hidden layers; a = h times the dropout mask (hidden layers).
  void forward(int l, const mat& w, const vec& b, cmap x, map h, map a, std::uint64_t key) const {
    h.noalias() = w * x;
    h.colwise() += b;
    if (!hidden(l)) {
      a = h;
      return;
    }
    h = h.array().tanh().matrix();
    for (Eigen::Index j = 0; j < h.cols(); ++j)
      for (Eigen::Index i = 0; i < h.rows(); ++i) a(i, j) = h(i, j) * mask(key, l, i, j);
  }
  // dz from da (the gradient with respect to a): through the mask and tanh on hidden layers.
  void backward_z(int l, cmap h, cmap da, map dz, std::uint64_t key) const {
    if (!hidden(l)) {
      dz = da;
      return;
    }
    for (Eigen::Index j = 0; j < h.cols(); ++j)
      for (Eigen::Index i = 0; i < h.rows(); ++i)
        dz(i, j) = da(i, j) * mask(key, l, i, j) * (T(1) - h(i, j) * h(i, j));
  }
  static void backward_x(const mat& w, cmap dz, map dx) { dx.noalias() = w.transpose() * dz; }
  static void backward_w(cmap x, cmap dz, mat& gw, vec& gb) {
    gw.noalias() += dz * x.transpose();
    gb += dz.rowwise().sum();
  }
  // Half squared error over the microbatch, divided by `norm`; dy = (y - t) / norm.
  static T loss(cmap y, cmap t, T norm) { return T(0.5) * (y - t).squaredNorm() / norm; }
  static void loss_grad(cmap y, cmap t, T norm, map dy) { dy = (y - t) / norm; }
};

// The stage for rank `rank` of a plan's shape and placement: its chunks hold the layers
// even_split(layers, virtual stages, stage). Split backward (B writes dz, W reads it).
template <class T>
class mlp_stage {
 public:
  using value_type = T;
  using math = mlp_math<T>;
  using mat = typename math::mat;
  using vec = typename math::vec;

  mlp_stage(const mlp_config& cfg, const schedule::plan& p, int rank, int replica = 0)
      : cfg_(cfg), math_{cfg_}, replica_(replica), microbatches_(p.shp.microbatches) {
    const int vs = p.shp.virtual_stages();
    w_.resize(static_cast<std::size_t>(cfg_.layers()));
    b_.resize(w_.size());
    gw_.resize(w_.size());
    gb_.resize(w_.size());
    for (int c = 0; c < p.shp.chunks; ++c) {
      chunk ch;
      ch.stage = schedule::stage_of(p.place, p.shp, rank, c);
      const auto r = even_split(cfg_.layers(), vs, ch.stage);
      ch.l0 = r.begin;
      ch.l1 = r.end;
      std::size_t off = 0;
      for (int l = ch.l0; l < ch.l1; ++l) {
        const auto lu = static_cast<std::size_t>(l);
        ch.h.push_back(off);
        off += rows(l) * static_cast<std::size_t>(cfg_.batch);
        ch.a.push_back(off);
        off += rows(l) * static_cast<std::size_t>(cfg_.batch);
        ch.dz.push_back(off);
        off += rows(l) * static_cast<std::size_t>(cfg_.batch);
        ch.da.push_back(off);  // the gradient with respect to this layer's input (inner layers)
        off += static_cast<std::size_t>(cfg_.widths[lu]) * static_cast<std::size_t>(cfg_.batch);
        w_[lu] = math_.init_weight(l);
        b_[lu] = math_.init_bias(l);
        gw_[lu] = mat::Zero(w_[lu].rows(), w_[lu].cols());
        gb_[lu] = vec::Zero(b_[lu].rows());
        grads_.emplace_back(gw_[lu].data(), static_cast<std::size_t>(gw_[lu].size()));
        grads_.emplace_back(gb_[lu].data(), static_cast<std::size_t>(gb_[lu].size()));
      }
      ch.size = off;
      chunks_.push_back(ch);
    }
  }

  std::size_t input_size(int c) const { return width(chunks_[cu(c)].l0); }
  std::size_t output_size(int c) const { return width(chunks_[cu(c)].l1); }
  std::size_t activation_size(int c) const { return chunks_[cu(c)].size; }

  void load_input(const runtime::pass_info& i, std::span<T> in) {
    math_.input(i.step, replica_, i.microbatch, as_map(in, cfg_.widths[0]));
  }

  void forward(const runtime::pass_info& i, std::span<const T> in, std::span<T> out,
               std::span<T> saved) {
    ++(i.recompute ? recomputes : forwards);
    const chunk& ch = chunks_[cu(i.chunk)];
    const std::uint64_t key = mask_key(i);
    if (ch.l0 == ch.l1) {  // an empty stage passes its input on
      std::copy(in.begin(), in.end(), out.begin());
      return;
    }
    for (int l = ch.l0; l < ch.l1; ++l) {
      const auto k = static_cast<std::size_t>(l - ch.l0);
      const auto lu = static_cast<std::size_t>(l);
      math_.forward(l, w_[lu], b_[lu], layer_input(ch, l, in, saved), slice(saved, ch.h[k], l),
                    slice(saved, ch.a[k], l), key);
    }
    const auto y = slice(saved, ch.a.back(), ch.l1 - 1);
    std::copy(y.data(), y.data() + y.size(), out.begin());
    if (i.last && !i.recompute) {
      const auto t = target(i);
      loss_sum += static_cast<double>(math::loss(typename math::cmap(y.data(), y.rows(), y.cols()),
                                                 typename math::cmap(t.data(), t.rows(), t.cols()),
                                                 norm()));
    }
  }

  void backward_input(const runtime::pass_info& i, std::span<const T> in, std::span<T> saved,
                      std::span<const T> gout, std::span<T> gin) {
    ++backward_inputs;
    const chunk& ch = chunks_[cu(i.chunk)];
    if (ch.l0 == ch.l1) {
      std::copy(gout.begin(), gout.end(), gin.begin());
      return;
    }
    (void)in;
    const std::uint64_t key = mask_key(i);
    for (int l = ch.l1 - 1; l >= ch.l0; --l) {
      const auto k = static_cast<std::size_t>(l - ch.l0);
      const auto lu = static_cast<std::size_t>(l);
      const auto dz = slice(saved, ch.dz[k], l);
      // The gradient with respect to this layer's output a: from the loss, from the next
      // stage, or from the next layer of this chunk.
      mat loss_grad;
      const T* da_data = nullptr;
      if (l == ch.l1 - 1 && i.last) {
        const auto y = slice(saved, ch.a[k], l);
        const auto t = target(i);
        loss_grad.resize(y.rows(), y.cols());
        math::loss_grad(typename math::cmap(y.data(), y.rows(), y.cols()),
                        typename math::cmap(t.data(), t.rows(), t.cols()), norm(),
                        typename math::map(loss_grad.data(), y.rows(), y.cols()));
        da_data = loss_grad.data();
      } else if (l == ch.l1 - 1) {
        da_data = gout.data();
      } else {
        da_data = saved.data() + ch.da[k + 1];
      }
      const typename math::cmap da(da_data, dz.rows(), dz.cols());
      const auto h = slice(saved, ch.h[k], l);
      math_.backward_z(l, typename math::cmap(h.data(), h.rows(), h.cols()), da, dz, key);
      const typename math::cmap cdz(dz.data(), dz.rows(), dz.cols());
      if (l > ch.l0) {
        math::backward_x(w_[lu], cdz, slice_in(saved, ch.da[k], l));
      } else if (!gin.empty()) {
        math::backward_x(w_[lu], cdz, as_map(gin, cfg_.widths[lu]));
      }
    }
  }

  void backward_weight(const runtime::pass_info& i, std::span<const T> in, std::span<const T> saved,
                       std::span<const T> gout) {
    ++backward_weights;
    (void)gout;
    const chunk& ch = chunks_[cu(i.chunk)];
    for (int l = ch.l0; l < ch.l1; ++l) {
      const auto k = static_cast<std::size_t>(l - ch.l0);
      const auto lu = static_cast<std::size_t>(l);
      const std::span<T> s(const_cast<T*>(saved.data()), saved.size());
      const auto dz = slice(s, ch.dz[k], l);
      math::backward_w(layer_input(ch, l, in, s),
                       typename math::cmap(dz.data(), dz.rows(), dz.cols()), gw_[lu], gb_[lu]);
    }
  }

  std::span<const std::span<T>> gradients() { return grads_; }

  void sgd(T lr) {
    for (const auto& ch : chunks_)
      for (int l = ch.l0; l < ch.l1; ++l) {
        const auto lu = static_cast<std::size_t>(l);
        w_[lu] -= lr * gw_[lu];
        b_[lu] -= lr * gb_[lu];
        gw_[lu].setZero();
        gb_[lu].setZero();
      }
  }

  // Layers this stage holds, and their parameters.
  bool holds(int l) const {
    for (const auto& ch : chunks_)
      if (l >= ch.l0 && l < ch.l1) return true;
    return false;
  }
  const mat& weight(int l) const { return w_[static_cast<std::size_t>(l)]; }
  const vec& bias(int l) const { return b_[static_cast<std::size_t>(l)]; }

  double loss_sum = 0;  // this step's loss over the microbatches (last virtual stage only)
  int forwards = 0, recomputes = 0, backward_inputs = 0, backward_weights = 0;

 private:
  struct chunk {
    int stage = 0, l0 = 0, l1 = 0;
    std::vector<std::size_t> h, a, dz, da;  // offsets in `saved`, per layer
    std::size_t size = 0;
  };
  static std::size_t cu(int c) { return static_cast<std::size_t>(c); }
  std::size_t rows(int l) const {
    return static_cast<std::size_t>(cfg_.widths[static_cast<std::size_t>(l) + 1]);
  }
  std::size_t width(int l) const {
    return static_cast<std::size_t>(cfg_.widths[static_cast<std::size_t>(l)]) *
           static_cast<std::size_t>(cfg_.batch);
  }
  T norm() const { return static_cast<T>(cfg_.batch * microbatches_); }
  typename math::map as_map(std::span<T> s, int r) const {
    return typename math::map(s.data(), r, cfg_.batch);
  }
  // Layer l's output-sized block at `off`, and its input-sized block (for da).
  typename math::map slice(std::span<T> s, std::size_t off, int l) const {
    return typename math::map(s.data() + off, static_cast<Eigen::Index>(rows(l)), cfg_.batch);
  }
  typename math::map slice_in(std::span<T> s, std::size_t off, int l) const {
    return typename math::map(s.data() + off, cfg_.widths[static_cast<std::size_t>(l)], cfg_.batch);
  }
  typename math::cmap layer_input(const chunk& ch, int l, std::span<const T> in,
                                  std::span<T> saved) const {
    const int r = cfg_.widths[static_cast<std::size_t>(l)];
    if (l == ch.l0) return typename math::cmap(in.data(), r, cfg_.batch);
    return typename math::cmap(saved.data() + ch.a[static_cast<std::size_t>(l - 1 - ch.l0)], r,
                               cfg_.batch);
  }
  mat target(const runtime::pass_info& i) const {
    mat t(cfg_.widths.back(), cfg_.batch);
    math_.target(i.step, replica_, i.microbatch, typename math::map(t.data(), t.rows(), t.cols()));
    return t;
  }
  std::uint64_t mask_key(const runtime::pass_info& i) const {
    return cfg_.masks_from_pass_seed ? i.seed : math_.mask_key(i.step, replica_, i.microbatch);
  }

  mlp_config cfg_;
  math math_;
  int replica_ = 0;
  int microbatches_ = 1;
  std::vector<chunk> chunks_;
  std::vector<mat> w_, gw_;
  std::vector<vec> b_, gb_;
  std::vector<std::span<T>> grads_;
};

// The same stage with only a combined backward (B then W in one call).
template <class T>
class mlp_stage_combined : private mlp_stage<T> {
  using base = mlp_stage<T>;

 public:
  using value_type = T;
  using base::activation_size;
  using base::base;
  using base::bias;
  using base::forward;
  using base::gradients;
  using base::holds;
  using base::input_size;
  using base::load_input;
  using base::loss_sum;
  using base::output_size;
  using base::sgd;
  using base::weight;

  void backward(const runtime::pass_info& i, std::span<const T> in, std::span<T> saved,
                std::span<const T> gout, std::span<T> gin) {
    base::backward_input(i, in, saved, gout, gin);
    base::backward_weight(i, in, saved, gout);
  }
};

// Single-process training: `replicas` replicas of `microbatches` microbatches per step, gradients
// summed over microbatches in order, averaged over replicas, then SGD.
template <class T>
struct mlp_reference {
  using math = mlp_math<T>;
  std::vector<typename math::mat> w;
  std::vector<typename math::vec> b;
  std::vector<double> losses;  // per step: the mean over replicas of each replica's loss

  mlp_reference(const mlp_config& cfg, int microbatches, int replicas, int steps, T lr) {
    const math mm{cfg};
    const int layers = cfg.layers(), n = cfg.batch;
    for (int l = 0; l < layers; ++l) {
      w.push_back(mm.init_weight(l));
      b.push_back(mm.init_bias(l));
    }
    using mat = typename math::mat;
    using cmap = typename math::cmap;
    using map = typename math::map;
    const T norm = static_cast<T>(cfg.batch * microbatches);
    const auto cm = [](const mat& x) { return cmap(x.data(), x.rows(), x.cols()); };
    const auto mp = [](mat& x) { return map(x.data(), x.rows(), x.cols()); };
    for (int step = 0; step < steps; ++step) {
      std::vector<mat> sum_w;
      std::vector<typename math::vec> sum_b;
      double loss = 0;
      for (int r = 0; r < replicas; ++r) {
        std::vector<mat> gw(w.size());
        std::vector<typename math::vec> gbv(w.size());
        for (std::size_t l = 0; l < w.size(); ++l) {
          gw[l] = mat::Zero(w[l].rows(), w[l].cols());
          gbv[l] = math::vec::Zero(b[l].rows());
        }
        double replica_loss = 0;
        for (int mb = 0; mb < microbatches; ++mb) {
          const auto st = static_cast<std::uint64_t>(step);
          const std::uint64_t key = mm.mask_key(st, r, mb);
          std::vector<mat> x(static_cast<std::size_t>(layers) + 1), h(x.size());
          x[0].resize(cfg.widths[0], n);
          mm.input(st, r, mb, mp(x[0]));
          for (int l = 0; l < layers; ++l) {
            const auto lu = static_cast<std::size_t>(l);
            h[lu + 1].resize(cfg.widths[lu + 1], n);
            x[lu + 1].resize(cfg.widths[lu + 1], n);
            mm.forward(l, w[lu], b[lu], cm(x[lu]), mp(h[lu + 1]), mp(x[lu + 1]), key);
          }
          mat t(cfg.widths.back(), n);
          mm.target(st, r, mb, mp(t));
          replica_loss += static_cast<double>(math::loss(cm(x.back()), cm(t), norm));
          mat da(t.rows(), n);
          math::loss_grad(cm(x.back()), cm(t), norm, mp(da));
          for (int l = layers - 1; l >= 0; --l) {
            const auto lu = static_cast<std::size_t>(l);
            mat dz(cfg.widths[lu + 1], n);
            mm.backward_z(l, cm(h[lu + 1]), cm(da), mp(dz), key);
            if (l > 0) {
              mat dx(cfg.widths[lu], n);
              math::backward_x(w[lu], cm(dz), mp(dx));
              da = dx;
            }
            math::backward_w(cm(x[lu]), cm(dz), gw[lu], gbv[lu]);
          }
        }
        loss += replica_loss;
        if (r == 0) {
          sum_w = gw;
          sum_b = gbv;
        } else {
          for (std::size_t l = 0; l < w.size(); ++l) {
            sum_w[l] += gw[l];
            sum_b[l] += gbv[l];
          }
        }
      }
      losses.push_back(loss / replicas);
      for (std::size_t l = 0; l < w.size(); ++l) {
        if (replicas > 1) {
          sum_w[l] /= static_cast<T>(replicas);
          sum_b[l] /= static_cast<T>(replicas);
        }
        w[l] -= lr * sum_w[l];
        b[l] -= lr * sum_b[l];
      }
    }
  }
};

}  // namespace pipit::testing
