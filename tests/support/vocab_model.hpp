#pragma once
// The vocabulary-parallel executor tests' model: a token embedding (V x hidden), L tanh layers
// applied to every token (tokens x hidden, row-major, Y = tanh(X W^T + b)), and an output layer
// (V x hidden) with softmax cross-entropy. The layers are a pipeline stage for any plan (split
// backward); the embedding and the output layer are pipit's vocabulary layers, sharded over the
// ranks (or over the pipeline x tensor ranks of a tp::process_grid: train_grid_rank).
// vocab_reference trains the same model in one process, in double precision, with the full
// (unsharded) logits written out plainly.

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <vector>

#include "pipit/core/math.hpp"
#include "pipit/runtime/executor.hpp"
#include "pipit/runtime/pass_info.hpp"
#include "pipit/runtime/vocab_layers.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/tp/process_grid.hpp"
#include "pipit/vocab/loss.hpp"
#include "pipit/vocab/shards.hpp"
#include "support/runtime_model.hpp"  // hash_of, unit11

namespace pipit::testing {

struct token_model_config {
  std::int64_t vocab = 37;
  int hidden = 6;
  int layers = 4;
  int tokens = 5;  // per microbatch
  std::uint64_t seed = 11;
  double ignore_fraction = 0.2;    // targets set to the ignore index
  int all_ignored_microbatch = 1;  // this microbatch's targets are all ignored (-1: none)
  vocab::loss_options loss{};
};

template <class T>
using row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Parameters, drawn from (seed, what, indices) so that every rank and the reference agree.
template <class T>
row_matrix<T> embedding_table(const token_model_config& c) {
  row_matrix<T> e(c.vocab, c.hidden);
  for (Eigen::Index i = 0; i < e.rows(); ++i)
    for (Eigen::Index j = 0; j < e.cols(); ++j)
      e(i, j) = static_cast<T>(unit11(hash_of({c.seed, 21, std::uint64_t(i), std::uint64_t(j)})));
  return e;
}
template <class T>
row_matrix<T> head_table(const token_model_config& c) {
  row_matrix<T> h(c.vocab, c.hidden);
  const double scale = 1.5 / std::sqrt(static_cast<double>(c.hidden));
  for (Eigen::Index i = 0; i < h.rows(); ++i)
    for (Eigen::Index j = 0; j < h.cols(); ++j)
      h(i, j) =
          static_cast<T>(scale * unit11(hash_of({c.seed, 22, std::uint64_t(i), std::uint64_t(j)})));
  return h;
}
template <class T>
row_matrix<T> layer_weight(const token_model_config& c, int l) {
  row_matrix<T> w(c.hidden, c.hidden);
  const double scale = 1.2 / std::sqrt(static_cast<double>(c.hidden));
  for (Eigen::Index i = 0; i < w.rows(); ++i)
    for (Eigen::Index j = 0; j < w.cols(); ++j)
      w(i, j) = static_cast<T>(scale * unit11(hash_of({c.seed, 23, std::uint64_t(l),
                                                       std::uint64_t(i), std::uint64_t(j)})));
  return w;
}
template <class T>
Eigen::Matrix<T, 1, Eigen::Dynamic> layer_bias(const token_model_config& c, int l) {
  Eigen::Matrix<T, 1, Eigen::Dynamic> b(c.hidden);
  for (Eigen::Index j = 0; j < b.cols(); ++j)
    b(j) = static_cast<T>(0.1 * unit11(hash_of({c.seed, 24, std::uint64_t(l), std::uint64_t(j)})));
  return b;
}

// The step's token ids and targets, microbatch after microbatch.
struct token_batch {
  std::vector<std::int64_t> tokens, targets;
};
inline token_batch make_batch(const token_model_config& c, int microbatches, std::uint64_t step) {
  token_batch b;
  for (int mb = 0; mb < microbatches; ++mb)
    for (int t = 0; t < c.tokens; ++t) {
      const auto key = [&](std::uint64_t what) {
        return hash_of({c.seed, what, step, std::uint64_t(mb), std::uint64_t(t)});
      };
      b.tokens.push_back(static_cast<std::int64_t>(key(31) % std::uint64_t(c.vocab)));
      const bool ignored = mb == c.all_ignored_microbatch || unit01(key(32)) < c.ignore_fraction;
      b.targets.push_back(ignored ? c.loss.ignore_index
                                  : static_cast<std::int64_t>(key(33) % std::uint64_t(c.vocab)));
    }
  return b;
}

// The layers of one pipeline rank: chunk c holds layers even_split(layers, virtual stages, s).
template <class T>
class token_mlp_stage {
 public:
  using value_type = T;
  using mat = row_matrix<T>;
  using vec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
  using map = Eigen::Map<mat>;
  using cmap = Eigen::Map<const mat>;

  token_mlp_stage(const token_model_config& c, const schedule::plan& p, int rank) : cfg_(c) {
    for (int ch = 0; ch < p.shp.chunks; ++ch) {
      const int s = schedule::stage_of(p.place, p.shp, rank, ch);
      const auto r = even_split(c.layers, p.shp.virtual_stages(), s);
      chunks_.push_back({r.begin, r.end});
      for (int l = r.begin; l < r.end; ++l) {
        w_[l] = layer_weight<T>(c, l);
        b_[l] = layer_bias<T>(c, l);
        gw_[l] = mat::Zero(c.hidden, c.hidden);
        gb_[l] = vec::Zero(c.hidden);
      }
    }
    for (auto& [l, g] : gw_) grads_.emplace_back(g.data(), static_cast<std::size_t>(g.size()));
    for (auto& [l, g] : gb_) grads_.emplace_back(g.data(), static_cast<std::size_t>(g.size()));
  }

  std::size_t input_size(int) const { return block(); }
  std::size_t output_size(int) const { return block(); }
  // Per layer: Y, dZ and dX (the gradient of its input).
  std::size_t activation_size(int c) const {
    const auto& ch = chunks_[static_cast<std::size_t>(c)];
    return 3 * block() * static_cast<std::size_t>(ch.l1 - ch.l0);
  }

  void forward(const runtime::pass_info& i, std::span<const T> in, std::span<T> out,
               std::span<T> saved) {
    const auto& ch = chunks_[static_cast<std::size_t>(i.chunk)];
    if (ch.l0 == ch.l1) {
      std::copy(in.begin(), in.end(), out.begin());
      return;
    }
    for (int l = ch.l0; l < ch.l1; ++l) {
      map y = slot(saved, ch, l, 0);
      y.noalias() = layer_input(in, saved, ch, l) * w_[l].transpose();
      y.rowwise() += b_[l];
      y = y.array().tanh().matrix();
    }
    const map y = slot(saved, ch, ch.l1 - 1, 0);
    std::copy(y.data(), y.data() + y.size(), out.begin());
  }

  void backward_input(const runtime::pass_info& i, std::span<const T>, std::span<T> saved,
                      std::span<const T> gout, std::span<T> gin) {
    const auto& ch = chunks_[static_cast<std::size_t>(i.chunk)];
    if (ch.l0 == ch.l1) {
      if (!gin.empty()) std::copy(gout.begin(), gout.end(), gin.begin());
      return;
    }
    for (int l = ch.l1 - 1; l >= ch.l0; --l) {
      const map y = slot(saved, ch, l, 0);
      map dz = slot(saved, ch, l, 1);
      const cmap dy = l == ch.l1 - 1 ? cmap(gout.data(), rows(), cfg_.hidden)
                                     : cmap(slot(saved, ch, l + 1, 2).data(), rows(), cfg_.hidden);
      dz = dy.cwiseProduct((mat::Ones(rows(), cfg_.hidden) - y.cwiseProduct(y)));
      map dx = slot(saved, ch, l, 2);
      dx.noalias() = dz * w_[l];
      if (l == ch.l0 && !gin.empty()) std::copy(dx.data(), dx.data() + dx.size(), gin.begin());
    }
  }

  void backward_weight(const runtime::pass_info& i, std::span<const T> in, std::span<const T> saved,
                       std::span<const T>) {
    const auto& ch = chunks_[static_cast<std::size_t>(i.chunk)];
    const std::span<T> s(const_cast<T*>(saved.data()), saved.size());
    for (int l = ch.l0; l < ch.l1; ++l) {
      const map dz = slot(s, ch, l, 1);
      gw_[l].noalias() += dz.transpose() * layer_input(in, s, ch, l);
      gb_[l] += dz.colwise().sum();
    }
  }

  std::span<const std::span<T>> gradients() { return grads_; }
  bool holds(int l) const { return w_.count(l) != 0; }
  const mat& weight_grad(int l) const { return gw_.at(l); }
  const vec& bias_grad(int l) const { return gb_.at(l); }
  void sgd(T lr) {
    for (auto& [l, w] : w_) {
      w -= lr * gw_[l];
      b_[l] -= lr * gb_[l];
      gw_[l].setZero();
      gb_[l].setZero();
    }
  }

 private:
  struct chunk {
    int l0, l1;
  };
  Eigen::Index rows() const { return cfg_.tokens; }
  std::size_t block() const {
    return static_cast<std::size_t>(cfg_.tokens) * static_cast<std::size_t>(cfg_.hidden);
  }
  // Layer l's Y (k = 0), dZ (1) or dX (2) in `saved`.
  map slot(std::span<T> saved, const chunk& ch, int l, int k) const {
    return map(
        saved.data() +
            (3 * static_cast<std::size_t>(l - ch.l0) + static_cast<std::size_t>(k)) * block(),
        rows(), cfg_.hidden);
  }
  cmap layer_input(std::span<const T> in, std::span<T> saved, const chunk& ch, int l) const {
    if (l == ch.l0) return cmap(in.data(), rows(), cfg_.hidden);
    return cmap(slot(saved, ch, l - 1, 0).data(), rows(), cfg_.hidden);
  }

  token_model_config cfg_;
  std::vector<chunk> chunks_;
  std::map<int, mat> w_, gw_;
  std::map<int, vec> b_, gb_;
  std::vector<std::span<T>> grads_;
};

// One process, double precision, unsharded: the objective (mean over microbatches of each
// microbatch's loss) and every gradient of one step, then SGD with `lr`.
struct vocab_reference {
  using mat = row_matrix<double>;
  using vec = Eigen::Matrix<double, 1, Eigen::Dynamic>;
  token_model_config cfg;
  mat e, h;
  std::vector<mat> w;
  std::vector<vec> b;
  // The last step's objective and gradients.
  double loss = 0;
  std::int64_t valid = 0;
  mat ge, gh;
  std::vector<mat> gw;
  std::vector<vec> gb;

  explicit vocab_reference(const token_model_config& c) : cfg(c) {
    e = embedding_table<double>(c);
    h = head_table<double>(c);
    for (int l = 0; l < c.layers; ++l) {
      w.push_back(layer_weight<double>(c, l));
      b.push_back(layer_bias<double>(c, l));
    }
  }

  void step(const token_batch& batch, int microbatches) {
    const int n = cfg.tokens, hid = cfg.hidden, layers = cfg.layers;
    const auto V = static_cast<Eigen::Index>(cfg.vocab);
    ge = mat::Zero(V, hid);
    gh = mat::Zero(V, hid);
    gw.assign(static_cast<std::size_t>(layers), mat::Zero(hid, hid));
    gb.assign(static_cast<std::size_t>(layers), vec::Zero(hid));
    loss = 0;
    valid = 0;
    const double eps = cfg.loss.label_smoothing, lambda = cfg.loss.z_loss;
    for (int mb = 0; mb < microbatches; ++mb) {
      const auto at = [&](int t) { return static_cast<std::size_t>(mb * n + t); };
      std::vector<mat> x(static_cast<std::size_t>(layers) + 1);
      x[0].resize(n, hid);
      for (int t = 0; t < n; ++t) x[0].row(t) = e.row(batch.tokens[at(t)]);
      for (int l = 0; l < layers; ++l) {
        const auto lu = static_cast<std::size_t>(l);
        x[lu + 1] = x[lu] * w[lu].transpose();
        x[lu + 1].rowwise() += b[lu];
        x[lu + 1] = x[lu + 1].array().tanh().matrix();
      }
      const mat z = x.back() * h.transpose();  // tokens x V: the full logits
      // Per token: lse, loss = (1 - eps)(lse - z_y) + eps (lse - mean z) + lambda lse^2.
      double total = 0, weight = 0;
      std::vector<double> lse(static_cast<std::size_t>(n));
      for (int t = 0; t < n; ++t) {
        const double m = z.row(t).maxCoeff();
        lse[static_cast<std::size_t>(t)] = m + std::log((z.row(t).array() - m).exp().sum());
        const std::int64_t y = batch.targets[at(t)];
        if (y == cfg.loss.ignore_index) continue;
        const double l = lse[static_cast<std::size_t>(t)];
        total += (1 - eps) * (l - z(t, y)) + eps * (l - z.row(t).mean()) + lambda * l * l;
        weight += 1;
        ++valid;
      }
      const bool mean = cfg.loss.reduce == vocab::reduction::mean;
      const double scale = weight > 0 ? (mean ? 1 / weight : 1.0) : 0.0;
      loss += total * scale / microbatches;
      // dZ = scale / microbatches * ((1 + 2 lambda lse) softmax - (1 - eps) onehot - eps / V).
      mat dz = mat::Zero(n, V);
      for (int t = 0; t < n; ++t) {
        const std::int64_t y = batch.targets[at(t)];
        if (y == cfg.loss.ignore_index) continue;
        const double l = lse[static_cast<std::size_t>(t)];
        const double g = cfg.loss.grad_output * scale / microbatches;
        for (Eigen::Index v = 0; v < V; ++v)
          dz(t, v) = g * ((1 + 2 * lambda * l) * std::exp(z(t, v) - l) - eps / double(V));
        dz(t, y) -= g * (1 - eps);
      }
      gh.noalias() += dz.transpose() * x.back();
      mat dx = dz * h;
      for (int l = layers - 1; l >= 0; --l) {
        const auto lu = static_cast<std::size_t>(l);
        const mat y = x[lu + 1];
        const mat dzl = dx.cwiseProduct(mat::Ones(n, hid) - y.cwiseProduct(y));
        gw[lu].noalias() += dzl.transpose() * x[lu];
        gb[lu] += dzl.colwise().sum();
        dx = dzl * w[lu];
      }
      for (int t = 0; t < n; ++t) ge.row(batch.tokens[at(t)]) += dx.row(t);
    }
  }

  void sgd(double lr) {
    e -= lr * ge;
    h -= lr * gh;
    for (std::size_t l = 0; l < w.size(); ++l) {
      w[l] -= lr * gw[l];
      b[l] -= lr * gb[l];
    }
  }
};

inline constexpr double vocab_test_lr = 0.3;

// The reference's objective and gradients after each step.
struct vocab_snapshot {
  double loss;
  std::int64_t valid;
  row_matrix<double> ge, gh;
  std::vector<row_matrix<double>> gw;
  std::vector<Eigen::Matrix<double, 1, Eigen::Dynamic>> gb;
};

inline std::vector<vocab_snapshot> reference_run(const token_model_config& cfg, int microbatches,
                                                 int steps) {
  vocab_reference ref(cfg);
  std::vector<vocab_snapshot> out;
  for (int step = 0; step < steps; ++step) {
    ref.step(make_batch(cfg, microbatches, static_cast<std::uint64_t>(step)), microbatches);
    out.push_back({ref.loss, ref.valid, ref.ge, ref.gh, ref.gw, ref.gb});
    ref.sgd(vocab_test_lr);
  }
  return out;
}

// Data replica q of d trains on batch step * d + q (d = 1: make_batch(cfg, m, step)).
inline token_batch replica_batch(const token_model_config& c, int microbatches, int step,
                                 int replica, int replicas) {
  return make_batch(c, microbatches, static_cast<std::uint64_t>(step * replicas + replica));
}

// The reference of `replicas` data-parallel replicas: per step each replica's gradients on its
// own batch (replica_batch), averaged (the executor's gradient_reduction::average), the loss
// averaged and the valid tokens summed; then SGD on the average. replicas = 1: reference_run.
inline std::vector<vocab_snapshot> reference_run_data_parallel(const token_model_config& cfg,
                                                               int microbatches, int steps,
                                                               int replicas) {
  vocab_reference ref(cfg);
  std::vector<vocab_snapshot> out;
  for (int step = 0; step < steps; ++step) {
    vocab_snapshot avg{};
    for (int q = 0; q < replicas; ++q) {
      ref.step(replica_batch(cfg, microbatches, step, q, replicas), microbatches);
      if (q == 0) {
        avg = {ref.loss, ref.valid, ref.ge, ref.gh, ref.gw, ref.gb};
        continue;
      }
      avg.loss += ref.loss;
      avg.valid += ref.valid;
      avg.ge += ref.ge;
      avg.gh += ref.gh;
      for (std::size_t l = 0; l < avg.gw.size(); ++l) {
        avg.gw[l] += ref.gw[l];
        avg.gb[l] += ref.gb[l];
      }
    }
    avg.loss /= replicas;
    avg.ge /= replicas;
    avg.gh /= replicas;
    for (std::size_t l = 0; l < avg.gw.size(); ++l) {
      avg.gw[l] /= replicas;
      avg.gb[l] /= replicas;
    }
    ref.ge = avg.ge;
    ref.gh = avg.gh;
    ref.gw = avg.gw;
    ref.gb = avg.gb;
    ref.sgd(vocab_test_lr);
    out.push_back(std::move(avg));
  }
  return out;
}

// max |a - b| / max |b| (b's scale; 1e-300 when b is zero).
template <class A, class B>
double rel_error(const A& a, const B& b) {
  const double scale = std::max(1e-300, static_cast<double>(b.cwiseAbs().maxCoeff()));
  return static_cast<double>((a - b).cwiseAbs().maxCoeff()) / scale;
}

// Shard r of the token model's embedding and output layer: the initial rows in the shard's
// real rows, zero padding rows, and zeroed gradients of the same shape.
struct shard_tables {
  range<std::int64_t> real;
  std::int64_t rows = 0;
  row_matrix<double> e, h, ge, gh;
};
inline shard_tables shard_tables_of(const token_model_config& cfg,
                                    const vocab::vocab_shards& shards, int r) {
  shard_tables t;
  t.real = shards.real_range_of(r);
  t.rows = shards.shard_size();
  t.e = row_matrix<double>::Zero(t.rows, cfg.hidden);
  t.h = t.ge = t.gh = t.e;
  const auto e_full = embedding_table<double>(cfg);
  const auto h_full = head_table<double>(cfg);
  for (std::int64_t i = 0; i < t.real.size(); ++i) {
    t.e.row(i) = e_full.row(t.real.begin + i);
    t.h.row(i) = h_full.row(t.real.begin + i);
  }
  return t;
}

// The error of one shard's embedding and output-layer gradients (ge, gh: shard rows x hidden,
// the real rows `real` first, then padding) against the reference's whole gradients, relative to
// each whole tensor's largest value; 1 when a padding row got a gradient.
template <class E, class H>
double shard_grad_error(const E& ge, const H& gh, const vocab_snapshot& want,
                        range<std::int64_t> real) {
  const std::int64_t rows = ge.rows(), n = real.size();
  double worst = 0;
  if (n > 0) {
    const double se = std::max(1e-300, want.ge.cwiseAbs().maxCoeff());
    const double sh = std::max(1e-300, want.gh.cwiseAbs().maxCoeff());
    worst =
        std::max((ge.topRows(n) - want.ge.middleRows(real.begin, n)).cwiseAbs().maxCoeff() / se,
                 (gh.topRows(n) - want.gh.middleRows(real.begin, n)).cwiseAbs().maxCoeff() / sh);
  }
  if (rows > n && (ge.bottomRows(rows - n).cwiseAbs().maxCoeff() != 0.0 ||
                   gh.bottomRows(rows - n).cwiseAbs().maxCoeff() != 0.0))
    worst = std::max(worst, 1.0);
  return worst;
}

// One rank of a vocabulary-parallel training run on any communicator: the plan's layers as a
// token_mlp_stage, this rank's shards of the embedding and the output layer in vocab_layers,
// ref.size() SGD steps. After each step it compares the loss, the valid-token count, its
// layers' gradients and its shards' gradients with the reference's (relative to the whole
// tensor's largest value) and checks that padding rows got no gradient. Returns the largest
// error (1 for a wrong count or a touched padding row).
template <class Alg, class Comm>
double train_vocab_rank(Comm& comm, const schedule::plan& plan, const token_model_config& cfg,
                        const std::vector<vocab_snapshot>& ref,
                        runtime::executor_options options = {}) {
  const int r = comm.rank();
  token_mlp_stage<double> stage(cfg, plan, r);
  const vocab::vocab_shards shards(cfg.vocab, plan.rank_count());
  auto [real, rows, e, h, ge, gh] = shard_tables_of(cfg, shards, r);
  runtime::vocab_layers<Alg, double, 4> layers(
      shards, r, cfg.tokens, {e.data(), rows, cfg.hidden}, {ge.data(), rows, cfg.hidden},
      {h.data(), rows, cfg.hidden}, {gh.data(), rows, cfg.hidden}, {cfg.loss});
  runtime::executor ex(comm, stage, layers, plan, options);
  double worst = 0;
  for (std::size_t step = 0; step < ref.size(); ++step) {
    const auto batch = make_batch(cfg, plan.shp.microbatches, step);
    layers.set_batch(batch.tokens, batch.targets);
    ex.run();
    const vocab_snapshot& want = ref[step];
    worst = std::max(worst, std::abs(static_cast<double>(layers.loss().loss) - want.loss) /
                                std::max(1.0, std::abs(want.loss)));
    if (layers.loss().tokens != want.valid) worst = std::max(worst, 1.0);
    for (int l = 0; l < cfg.layers; ++l)
      if (stage.holds(l))
        worst =
            std::max({worst, rel_error(stage.weight_grad(l), want.gw[static_cast<std::size_t>(l)]),
                      rel_error(stage.bias_grad(l), want.gb[static_cast<std::size_t>(l)])});
    worst = std::max(worst, shard_grad_error(ge, gh, want, real));
    stage.sgd(vocab_test_lr);
    e -= vocab_test_lr * ge;
    h -= vocab_test_lr * gh;
    ge.setZero();
    gh.setZero();
  }
  return worst;
}

// One rank of a tp::process_grid training the token model with the vocabulary sharded over the
// pipeline x tensor ranks of its replica (grid.vocab(): shard grid.vocab().rank() of
// grid.vocab().size()) and the executor built from grid.groups(). Each tensor rank runs the
// whole stage of its pipeline rank (a replicated stage: a legitimate t-way tensor-parallel stage
// whose layers need no tensor collective); data replica q trains on replica_batch(.., q, d).
// After each step it compares with `ref` (reference_run_data_parallel over d replicas): the loss
// averaged and the valid tokens summed over the data group, its layers' gradients, and the
// embedding and output-layer gradients reassembled from all p x t shards (all-gathered over the
// vocabulary group; padding rows must stay exactly 0). The t tensor ranks of a stage must also
// hold bit-identical stage gradients (lockstep). Returns the largest error (1 for a wrong count,
// a touched padding row or replicas that drift apart).
template <class Alg, class Comm>
double train_grid_rank(tp::process_grid<Comm>& grid, const schedule::plan& plan,
                       const token_model_config& cfg, const std::vector<vocab_snapshot>& ref,
                       runtime::executor_options options = {}) {
  Comm& vc = grid.vocab();
  const int pr = grid.coords().pipeline, replica = grid.coords().data;
  const int replicas = grid.shape().data, r = vc.rank(), ranks = vc.size();
  token_mlp_stage<double> stage(cfg, plan, pr);
  const vocab::vocab_shards shards(cfg.vocab, ranks);
  auto [real, rows, e, h, ge, gh] = shard_tables_of(cfg, shards, r);
  runtime::vocab_layers<Alg, double, 4> layers(
      shards, r, cfg.tokens, {e.data(), rows, cfg.hidden}, {ge.data(), rows, cfg.hidden},
      {h.data(), rows, cfg.hidden}, {gh.data(), rows, cfg.hidden}, {cfg.loss});
  runtime::executor ex(grid.groups(), stage, layers, plan, options);
  const auto block = static_cast<std::size_t>(rows) * static_cast<std::size_t>(cfg.hidden);
  std::vector<double> all_e(block * static_cast<std::size_t>(ranks)), all_h(all_e.size());
  const int t = grid.shape().tensor;
  double worst = 0;
  for (std::size_t step = 0; step < ref.size(); ++step) {
    const auto batch =
        replica_batch(cfg, plan.shp.microbatches, static_cast<int>(step), replica, replicas);
    layers.set_batch(batch.tokens, batch.targets);
    ex.run();
    const vocab_snapshot& want = ref[step];
    std::array<double, 2> lv{static_cast<double>(layers.loss().loss),
                             static_cast<double>(layers.loss().tokens)};
    grid.data().all_reduce(std::span<double>(lv), std::plus<>{});
    worst = std::max(worst,
                     std::abs(lv[0] / replicas - want.loss) / std::max(1.0, std::abs(want.loss)));
    if (lv[1] != static_cast<double>(want.valid)) worst = std::max(worst, 1.0);
    for (int l = 0; l < cfg.layers; ++l)
      if (stage.holds(l))
        worst =
            std::max({worst, rel_error(stage.weight_grad(l), want.gw[static_cast<std::size_t>(l)]),
                      rel_error(stage.bias_grad(l), want.gb[static_cast<std::size_t>(l)])});
    // Lockstep: every tensor rank of this stage holds the same bits.
    std::vector<double> mine;
    for (const std::span<double> g : stage.gradients()) mine.insert(mine.end(), g.begin(), g.end());
    std::vector<double> peers(mine.size() * static_cast<std::size_t>(t));
    grid.tensor().all_gather(std::span<const double>(mine), std::span<double>(peers));
    for (int q = 0; q < t; ++q)
      if (!std::equal(mine.begin(), mine.end(), peers.begin() + q * std::ptrdiff_t(mine.size())))
        worst = std::max(worst, 1.0);
    // The whole embedding and output-layer gradients, from every shard of the vocabulary group.
    vc.all_gather(std::span<const double>(ge.data(), block), std::span<double>(all_e));
    vc.all_gather(std::span<const double>(gh.data(), block), std::span<double>(all_h));
    for (int q = 0; q < ranks; ++q) {
      const Eigen::Map<const row_matrix<double>> qe(all_e.data() + block * std::size_t(q), rows,
                                                    cfg.hidden),
          qh(all_h.data() + block * std::size_t(q), rows, cfg.hidden);
      worst = std::max(worst, shard_grad_error(qe, qh, want, shards.real_range_of(q)));
    }
    stage.sgd(vocab_test_lr);
    e -= vocab_test_lr * ge;
    h -= vocab_test_lr * gh;
    ge.setZero();
    gh.setZero();
  }
  return worst;
}

}  // namespace pipit::testing
