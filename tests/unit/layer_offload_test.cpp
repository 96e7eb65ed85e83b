// Superpipeline's layer offload on the host, against a bounded_pool standing in for device memory:
// the pool itself (first fit, coalescing, refusal past capacity), then inference and training of
// a stack of tanh layers through layer_offload for many (k, k') — outputs, weight gradients
// accumulated over microbatches and the weights after two SGD steps all equal the all-in-memory
// run bitwise; the pool's peak is exactly the slots the policy promises (plus the activations
// the test allocates from it); the copies counted are those the policy implies; bad parameters,
// a pool too small and an exception inside a layer give pipit::error / propagate without a hang.
//
// The layer: y = tanh(W x + b) over a batch of B rows (W d×d and b d, in one span); loss
// 0.5·Σ y_L², so the last output gradient is y_L. One function per pass, fed either the host
// vectors (the reference) or the pool's copies, so equality is exact.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <span>
#include <stdexcept>
#include <utility>
#include <vector>

#include "pipit/runtime/bounded_pool.hpp"
#include "pipit/runtime/layer_offload.hpp"

namespace {

namespace rt = pipit::runtime;

struct stack_shape {
  std::size_t layers, d, batch;
  std::size_t params() const { return d * d + d; }
};

std::vector<std::vector<double>> make_weights(const stack_shape& m, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(-1, 1);
  const double s = 1.5 / std::sqrt(double(m.d));
  std::vector<std::vector<double>> w(m.layers, std::vector<double>(m.params()));
  for (auto& l : w)
    for (auto& x : l) x = s * u(gen);
  return w;
}

std::vector<double> make_input(const stack_shape& m, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<double> x(m.batch * m.d);
  for (auto& v : x) v = u(gen);
  return x;
}

void layer_forward(const stack_shape& m, std::span<const double> w, std::span<const double> x,
                   std::span<double> y) {
  for (std::size_t r = 0; r < m.batch; ++r)
    for (std::size_t i = 0; i < m.d; ++i) {
      double acc = w[m.d * m.d + i];
      for (std::size_t j = 0; j < m.d; ++j) acc += w[i * m.d + j] * x[r * m.d + j];
      y[r * m.d + i] = std::tanh(acc);
    }
}

// dy -> dx; accumulates dW, db into grad.
void layer_backward(const stack_shape& m, std::span<const double> w, std::span<const double> x,
                    std::span<const double> y, std::span<const double> dy, std::span<double> dx,
                    std::span<double> grad) {
  std::vector<double> dz(m.batch * m.d);
  for (std::size_t i = 0; i < dz.size(); ++i) dz[i] = dy[i] * (1 - y[i] * y[i]);
  for (std::size_t r = 0; r < m.batch; ++r)
    for (std::size_t i = 0; i < m.d; ++i) {
      for (std::size_t j = 0; j < m.d; ++j) grad[i * m.d + j] += dz[r * m.d + i] * x[r * m.d + j];
      grad[m.d * m.d + i] += dz[r * m.d + i];
    }
  for (std::size_t r = 0; r < m.batch; ++r)
    for (std::size_t j = 0; j < m.d; ++j) {
      double acc = 0;
      for (std::size_t i = 0; i < m.d; ++i) acc += dz[r * m.d + i] * w[i * m.d + j];
      dx[r * m.d + j] = acc;
    }
}

template <class T>
bool bitwise_equal(std::span<const T> a, std::span<const T> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

struct train_result {
  std::vector<double> outputs;               // every microbatch's last output, every step
  std::vector<std::vector<double>> weights;  // after the steps
  std::vector<std::vector<double>> grads;    // of the last step
};

constexpr double lr = 0.05;

// The all-in-memory run: `steps` SGD steps over `micro` microbatches.
train_result train_reference(const stack_shape& m, int steps, int micro) {
  train_result r;
  r.weights = make_weights(m, 11);
  for (int s = 0; s < steps; ++s) {
    r.grads.assign(m.layers, std::vector<double>(m.params(), 0.0));
    for (int mb = 0; mb < micro; ++mb) {
      std::vector<std::vector<double>> acts(m.layers + 1);
      acts[0] = make_input(m, unsigned(100 * s + mb));
      for (std::size_t l = 0; l < m.layers; ++l) {
        acts[l + 1].resize(m.batch * m.d);
        layer_forward(m, r.weights[l], acts[l], acts[l + 1]);
      }
      r.outputs.insert(r.outputs.end(), acts[m.layers].begin(), acts[m.layers].end());
      std::vector<double> dy = acts[m.layers], dx(dy.size());
      for (std::size_t l = m.layers; l-- > 0;) {
        // As the offload does: a zeroed per-layer gradient, then added into the total.
        std::vector<double> g(m.params(), 0.0);
        layer_backward(m, r.weights[l], acts[l], acts[l + 1], dy, dx, g);
        for (std::size_t i = 0; i < g.size(); ++i) r.grads[l][i] += g[i];
        std::swap(dy, dx);
      }
    }
    for (std::size_t l = 0; l < m.layers; ++l)
      for (std::size_t i = 0; i < m.params(); ++i) r.weights[l][i] -= lr * r.grads[l][i];
  }
  return r;
}

// The same through layer_offload; the activations live in the pool too.
train_result train_offloaded(const stack_shape& m, int steps, int micro, rt::bounded_pool& pool,
                             const rt::layer_offload_options& o, rt::layer_offload_stats* stats,
                             std::size_t* peak) {
  train_result r;
  r.weights = make_weights(m, 11);
  std::vector<std::span<const double>> host;
  for (auto& w : r.weights) host.emplace_back(w);
  rt::layer_offload<double> off(host, pool, o);
  for (int s = 0; s < steps; ++s) {
    r.grads.assign(m.layers, std::vector<double>(m.params(), 0.0));
    std::vector<std::span<double>> gspans;
    for (auto& g : r.grads) gspans.emplace_back(g);
    for (int mb = 0; mb < micro; ++mb) {
      std::vector<rt::pool_block> acts;
      for (std::size_t l = 0; l <= m.layers; ++l)
        acts.push_back(pool.allocate(m.batch * m.d * sizeof(double)));
      auto act = [&](std::size_t l) { return acts[l].as<double>(m.batch * m.d); };
      const auto in = make_input(m, unsigned(100 * s + mb));
      std::copy(in.begin(), in.end(), act(0).begin());
      off.forward([&](int l, std::span<const double> w) {
        layer_forward(m, w, act(std::size_t(l)), act(std::size_t(l) + 1));
      });
      const auto out = act(m.layers);
      r.outputs.insert(r.outputs.end(), out.begin(), out.end());
      rt::pool_block dyb = pool.allocate(m.batch * m.d * sizeof(double)),
                     dxb = pool.allocate(m.batch * m.d * sizeof(double));
      auto dy = dyb.as<double>(m.batch * m.d), dx = dxb.as<double>(m.batch * m.d);
      std::copy(out.begin(), out.end(), dy.begin());
      off.backward(gspans, [&](int l, std::span<const double> w, std::span<double> g) {
        layer_backward(m, w, act(std::size_t(l)), act(std::size_t(l) + 1), dy, dx, g);
        std::swap(dy, dx);
      });
    }
    for (std::size_t l = 0; l < m.layers; ++l)
      for (std::size_t i = 0; i < m.params(); ++i) r.weights[l][i] -= lr * r.grads[l][i];
  }
  if (stats != nullptr) *stats = off.stats();
  if (peak != nullptr) *peak = pool.peak_in_use();
  return r;
}

}  // namespace

TEST_CASE("bounded_pool allocates first fit, coalesces and refuses past its capacity",
          "[runtime][memory]") {
  rt::bounded_pool pool(4096, 256);
  CHECK(pool.capacity() == 4096);
  auto a = pool.allocate(1000);  // 1024
  auto b = pool.allocate(1024);
  auto c = pool.allocate(2048);
  CHECK(pool.in_use() == 4096);
  CHECK(a.size() == 1000);
  CHECK(std::to_integer<int>(c.data()[5]) == 0);  // zero-filled
  CHECK_THROWS_WITH(pool.allocate(1),
                    Catch::Contains("cannot allocate 1 bytes") && Catch::Contains("4096 of 4096"));
  c.data()[0] = std::byte{7};
  a.reset();
  b.reset();
  CHECK(pool.largest_free() == 2048);  // a and b coalesced
  auto d = pool.allocate(1500);
  CHECK(d.data() != nullptr);
  CHECK(pool.in_use() == 2048 + 1536);
  CHECK_THROWS_WITH(pool.allocate(1024), Catch::Contains("largest free range 512"));
  d.reset();
  c.reset();
  CHECK(pool.in_use() == 0);
  CHECK(pool.largest_free() == 4096);
  CHECK(pool.peak_in_use() == 4096);
  auto e = pool.allocate(4096);
  CHECK(std::to_integer<int>(e.data()[0]) == 0);  // zeroed again after reuse
  CHECK_THROWS_WITH(rt::bounded_pool(1024, 3), Catch::Contains("alignment 3"));
}

TEST_CASE("offloaded inference equals the all-in-memory run bitwise for every k and k'",
          "[runtime][memory]") {
  const stack_shape m{.layers = 7, .d = 12, .batch = 3};
  auto weights = make_weights(m, 5);
  const auto input = make_input(m, 6);
  auto run_ref = [&] {
    std::vector<double> x = input, y(x.size());
    for (std::size_t l = 0; l < m.layers; ++l) {
      layer_forward(m, weights[l], x, y);
      std::swap(x, y);
    }
    return x;
  };
  const auto ref = run_ref();
  std::vector<std::span<const double>> host;
  for (auto& w : weights) host.emplace_back(w);
  const std::pair<int, int> cases[] = {{1, 1}, {2, 1}, {2, 2}, {3, 1}, {3, 2}, {3, 3},
                                       {4, 3}, {6, 2}, {7, 1}, {7, 7}, {10, 4}};
  for (auto [k, kp] : cases) {
    INFO("k = " << k << ", k' = " << kp);
    rt::bounded_pool pool(std::size_t(1) << 20);
    rt::layer_offload<double> off(host, pool, {.resident = k, .swap = kp});
    const std::size_t ke = std::min<std::size_t>(std::size_t(k), m.layers);
    CHECK(off.resident() == int(ke));
    for (int pass = 0; pass < 3; ++pass) {
      std::vector<double> x = input, y(x.size());
      int expect = 0;
      off.forward([&](int l, std::span<const double> w) {
        CHECK(l == expect++);
        CHECK(off.is_resident(l));
        layer_forward(m, w, x, y);
        std::swap(x, y);
      });
      CHECK(expect == int(m.layers));
      CHECK(bitwise_equal<double>(x, ref));
    }
    // The device never held more than the k slots (sized to the largest layer).
    CHECK(pool.peak_in_use() == ke * off.slot_bytes());
    const auto s = off.stats();
    // The first pass copies every layer in and ends with the last k resident; a later pass
    // keeps those of them in its first window, [L − k, k), and copies the rest.
    const std::size_t kept = 2 * ke > m.layers ? 2 * ke - m.layers : 0;
    CHECK(s.h2d_transfers == m.layers + 2 * (m.layers - kept));
    CHECK(s.d2h_transfers == 0);
  }

  SECTION("after the host weights change, invalidate() makes the next pass copy them again") {
    rt::bounded_pool pool(std::size_t(1) << 20);
    rt::layer_offload<double> off(host, pool, {.resident = 7, .swap = 1});
    std::vector<double> x = input, y(x.size());
    off.forward([&](int, std::span<const double> w) {
      layer_forward(m, w, x, y);
      std::swap(x, y);
    });
    for (auto& w : weights) w[0] += 0.25;
    off.invalidate();
    x = input;
    off.forward([&](int, std::span<const double> w) {
      layer_forward(m, w, x, y);
      std::swap(x, y);
    });
    CHECK(bitwise_equal<double>(x, run_ref()));
    for (auto& w : weights) w[0] -= 0.25;
  }
}

TEST_CASE("offloaded training equals the all-in-memory run bitwise: outputs, gradients, weights",
          "[runtime][memory]") {
  const stack_shape m{.layers = 6, .d = 10, .batch = 4};
  const int steps = 2, micro = 3;
  const auto ref = train_reference(m, steps, micro);
  const std::pair<int, int> cases[] = {{1, 1}, {2, 1}, {2, 2}, {3, 2}, {4, 1}, {6, 3}, {9, 9}};
  for (auto [k, kp] : cases) {
    INFO("k = " << k << ", k' = " << kp);
    rt::bounded_pool pool(std::size_t(1) << 20);
    rt::layer_offload_stats st;
    std::size_t peak = 0;
    const auto got =
        train_offloaded(m, steps, micro, pool, {.resident = k, .swap = kp}, &st, &peak);
    CHECK(bitwise_equal<double>(got.outputs, ref.outputs));
    for (std::size_t l = 0; l < m.layers; ++l) {
      INFO("layer " << l);
      CHECK(bitwise_equal<double>(got.grads[l], ref.grads[l]));
      CHECK(bitwise_equal<double>(got.weights[l], ref.weights[l]));
    }
    const std::size_t ke = std::min<std::size_t>(std::size_t(k), m.layers);
    const std::size_t slot = pool.footprint(m.params() * sizeof(double));
    const std::size_t acts = (m.layers + 3) * pool.footprint(m.batch * m.d * sizeof(double));
    // Weights and gradients of k layers, and the activations: nothing else ever.
    CHECK(peak == 2 * ke * slot + acts);
    // Every forward copies all L layers in (the backward before it emptied the device); every
    // backward starts with the last k resident and copies in the other L − k; each layer's
    // gradient leaves once per backward.
    const std::size_t passes = std::size_t(steps * micro);
    CHECK(st.h2d_transfers == passes * (m.layers + (m.layers - ke)));
    CHECK(st.d2h_transfers == passes * m.layers);
    CHECK(pool.in_use() == 0);  // everything went back
  }
}

TEST_CASE("layer_offload refuses bad k, k' and a pool too small, naming the values",
          "[runtime][memory]") {
  const stack_shape m{.layers = 4, .d = 8, .batch = 2};
  auto weights = make_weights(m, 3);
  std::vector<std::span<const double>> host;
  for (auto& w : weights) host.emplace_back(w);
  rt::bounded_pool pool(std::size_t(1) << 16);
  CHECK_THROWS_WITH(rt::layer_offload<double>(host, pool, {.resident = 0, .swap = 1}),
                    Catch::Contains("resident layers k = 0"));
  CHECK_THROWS_WITH(rt::layer_offload<double>(host, pool, {.resident = 2, .swap = 0}),
                    Catch::Contains("k' = 0"));
  CHECK_THROWS_WITH(rt::layer_offload<double>(host, pool, {.resident = 2, .swap = 3}),
                    Catch::Contains("k' = 3 > resident layers k = 2"));
  CHECK_THROWS_WITH(rt::layer_offload<double>({}, pool, {}), Catch::Contains("no layers"));

  const std::size_t slot = pool.footprint(m.params() * sizeof(double));  // 768
  rt::bounded_pool small(2 * slot + 256);
  CHECK_THROWS_WITH(rt::layer_offload<double>(host, small, {.resident = 3, .swap = 1}),
                    Catch::Contains("too small") && Catch::Contains("k = 3") &&
                        Catch::Contains(std::to_string(3 * slot) + " bytes") &&
                        Catch::Contains(std::to_string(small.capacity())));
  CHECK(small.in_use() == 0);
  // Two slots fit for inference; training needs two more for the gradients.
  rt::layer_offload<double> off(host, small, {.resident = 2, .swap = 1});
  std::vector<std::vector<double>> grads(m.layers, std::vector<double>(m.params()));
  std::vector<std::span<double>> gs;
  for (auto& g : grads) gs.emplace_back(g);
  CHECK_THROWS_WITH(off.backward(gs, [](int, std::span<const double>, std::span<double>) {}),
                    Catch::Contains("too small for the gradients"));
  gs.pop_back();
  CHECK_THROWS_WITH(off.backward(gs, [](int, std::span<const double>, std::span<double>) {}),
                    Catch::Contains("3 gradient buffers for 4 layers"));
}

TEST_CASE("an exception inside a layer propagates, and the offload stays usable",
          "[runtime][memory]") {
  const stack_shape m{.layers = 6, .d = 8, .batch = 2};
  auto weights = make_weights(m, 9);
  std::vector<std::span<const double>> host;
  for (auto& w : weights) host.emplace_back(w);
  const auto input = make_input(m, 10);
  std::vector<double> ref = input, tmp(ref.size());
  for (std::size_t l = 0; l < m.layers; ++l) {
    layer_forward(m, weights[l], ref, tmp);
    std::swap(ref, tmp);
  }
  rt::bounded_pool pool(std::size_t(1) << 16);
  // A slow simulated link, so that copies are still queued when the layer throws.
  rt::layer_offload<double> off(host, pool, {.resident = 3, .swap = 1, .link_latency = 2e-3});
  CHECK_THROWS_WITH(off.forward([&](int l, std::span<const double>) {
    if (l == 2) throw std::runtime_error("layer 2 failed");
  }),
                    "layer 2 failed");
  std::vector<double> x = input, y(x.size());
  off.forward([&](int l, std::span<const double> w) {
    (void)l;
    layer_forward(m, w, x, y);
    std::swap(x, y);
  });
  CHECK(bitwise_equal<double>(x, ref));
  CHECK(pool.in_use() == 3 * off.slot_bytes());
}
