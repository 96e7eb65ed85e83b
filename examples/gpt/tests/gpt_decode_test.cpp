// gpt::tp_decode, the example model's blocks decoding one token per request, tensor-parallel on
// comm::threads:
//  (1) decoding positions 0, 1, ..., S-1 one step at a time (each step appends to the KV cache)
//      gives, at every position s, gpt::block's forward over the whole sequence at column s, in
//      double, to 1e-12 relative to the largest output element, at t = 1, 2 and 4 (the
//      reference sums in other orders: Eigen's blocked GEMMs, one full-width GEMM instead of t
//      partial ones);
//  (2) at t = 2 a step run by nano_runner under several nano-batch policies gives the same bits
//      as the unsplit sequential run.
// The blocks are the example's (gpt::block(cfg, layer)), with biases and LayerNorm parameters
// set to random values (the initialisation leaves them at 0 and 1, which would hide a bias or a
// gain applied to the wrong elements).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "block.hpp"
#include "gpt_decode.hpp"
#include "pipit/comm/threads.hpp"
#include "pipit/nano/nano_batch.hpp"
#include "random.hpp"

namespace {

namespace nano = pipit::nano;
using pipit::comm::threads;
using decoder = gpt::tp_decode<double, threads>;

gpt::model_config small_config() {
  gpt::model_config c;
  c.hidden = 32;
  c.heads = 4;
  c.layers = 2;
  c.seq = 6;
  c.batch = 3;
  c.seed = 7;
  return c;
}

double noise(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
  return 2 * gpt::unit01(gpt::hash_of({a, b, c})) - 1;
}

std::vector<gpt::block<double>> blocks_with_random_biases(const gpt::model_config& cfg) {
  auto blocks = gpt::model_blocks<double>(cfg);
  for (std::size_t l = 0; l < blocks.size(); ++l) {
    auto& b = blocks[l];
    std::uint64_t which = 0;
    auto set = [&](gpt::vector<double>& v, double center) {
      ++which;
      for (Eigen::Index i = 0; i < v.size(); ++i)
        v(i) = center + 0.2 * noise(l, which, static_cast<std::uint64_t>(i));
    };
    set(b.ln1.gamma, 1), set(b.ln1.beta, 0), set(b.ln2.gamma, 1), set(b.ln2.beta, 0);
    set(b.attn.qkv.b, 0), set(b.attn.proj.b, 0), set(b.ffn.fc1.b, 0), set(b.ffn.fc2.b, 0);
  }
  return blocks;
}

// The blocks' forward over the whole batch: d x (batch * seq), column b * seq + s.
gpt::matrix<double> reference(std::vector<gpt::block<double>>& blocks,
                              const gpt::matrix<double>& x) {
  gpt::matrix<double> cur = x, next(x.rows(), x.cols());
  for (auto& b : blocks) {
    std::vector<double> saved(b.layout().size);
    b.forward(gpt::cmap<double>(cur.data(), cur.rows(), cur.cols()),
              gpt::map<double>(next.data(), next.rows(), next.cols()), std::span<double>(saved));
    std::swap(cur, next);
  }
  return cur;
}

gpt::matrix<double> random_input(const gpt::model_config& cfg) {
  gpt::matrix<double> x(cfg.hidden, cfg.tokens());
  for (Eigen::Index j = 0; j < x.cols(); ++j)
    for (Eigen::Index i = 0; i < x.rows(); ++i)
      x(i, j) = noise(99, static_cast<std::uint64_t>(i), static_cast<std::uint64_t>(j));
  return x;
}

// The new tokens of step `pos`: row b = column b * seq + pos of x.
std::vector<double> step_input(const gpt::model_config& cfg, const gpt::matrix<double>& x,
                               int pos) {
  std::vector<double> in(static_cast<std::size_t>(cfg.batch * cfg.hidden));
  for (int b = 0; b < cfg.batch; ++b)
    for (int j = 0; j < cfg.hidden; ++j)
      in[static_cast<std::size_t>(b * cfg.hidden + j)] = x(j, b * cfg.seq + pos);
  return in;
}

void set_step(decoder& dec, const gpt::model_config& cfg, const gpt::matrix<double>& x, int pos) {
  const auto in = step_input(cfg, x, pos);
  dec.set_position(pos);
  dec.set_input(nano::make_view(in.data(), std::int64_t(cfg.batch), std::int64_t(cfg.hidden)));
}

}  // namespace

TEST_CASE("gpt decode step equals the block forward at every position", "[gpt][nano][decode]") {
  const gpt::model_config cfg = small_config();
  auto blocks = blocks_with_random_biases(cfg);
  const gpt::matrix<double> x = random_input(cfg);
  const gpt::matrix<double> y = reference(blocks, x);
  const double scale = y.cwiseAbs().maxCoeff();
  REQUIRE(scale > 0.1);

  for (int t : {1, 2, 4}) {
    // out[rank][pos]: the step's output (batch x hidden), kept per rank and checked here.
    std::vector<std::vector<std::vector<double>>> out(
        static_cast<std::size_t>(t),
        std::vector<std::vector<double>>(static_cast<std::size_t>(cfg.seq)));
    threads::run(t, [&](threads& comm) {
      decoder dec(comm, cfg, std::span<const gpt::block<double>>(blocks), cfg.batch, cfg.seq);
      const nano::op_graph g = dec.graph();
      const nano::nano_program prog(g, nano::nano_batch::none(g, cfg.batch));
      for (int pos = 0; pos < cfg.seq; ++pos) {
        set_step(dec, cfg, x, pos);
        nano::nano_runner::run_sequential(prog, dec);
        const auto o = dec.output();
        out[static_cast<std::size_t>(comm.rank())][static_cast<std::size_t>(pos)].assign(
            o.data, o.data + o.rows * o.cols);
      }
    });
    double worst = 0;
    for (int pos = 0; pos < cfg.seq; ++pos)
      for (int b = 0; b < cfg.batch; ++b)
        for (int j = 0; j < cfg.hidden; ++j) {
          const double got =
              out[0][static_cast<std::size_t>(pos)][static_cast<std::size_t>(b * cfg.hidden + j)];
          worst = std::max(worst, std::abs(got - y(j, b * cfg.seq + pos)) / scale);
        }
    INFO("t = " << t << ": max |decode - forward| / max |forward| = " << worst);
    CHECK(worst <= 1e-12);
    for (int r = 1; r < t; ++r) CHECK(out[static_cast<std::size_t>(r)] == out[0]);  // same on all
  }
}

TEST_CASE("gpt decode step is bitwise the same under every nano-batch split",
          "[gpt][nano][decode]") {
  gpt::model_config cfg = small_config();
  cfg.batch = 5;
  auto blocks = blocks_with_random_biases(cfg);
  const gpt::matrix<double> x = random_input(cfg);
  constexpr int t = 2, pos = 4;
  const nano::op_graph g = decoder::layer_graph().repeated(cfg.layers);
  std::vector<nano::nano_batch> plans{nano::nano_batch::uniform(g, cfg.batch, 2),
                                      nano::nano_batch::uniform(g, cfg.batch, 3),
                                      nano::nano_batch::uniform(g, cfg.batch, 5)};
  nano::nano_batch mixed = nano::nano_batch::none(g, cfg.batch);
  for (int o = 0; o < g.size(); ++o)
    if (o % 3 == 0)
      mixed.set(g, o, {1, 4});
    else if (o % 3 == 1)
      mixed.set(g, o, {2, 2, 1});
  plans.push_back(mixed);
  plans.push_back(nano::nano_batch::none(g, cfg.batch));  // the runner unsplit

  // got[rank][k]: the output of plan k; want[rank]: the sequential unsplit run's.
  std::vector<std::vector<std::vector<double>>> got(t);
  std::vector<std::vector<double>> want(t);
  threads::run(t, [&](threads& comm) {
    decoder dec(comm, cfg, std::span<const gpt::block<double>>(blocks), cfg.batch, cfg.seq);
    nano::nano_runner runner;
    const nano::nano_program seq(g, nano::nano_batch::none(g, cfg.batch));
    for (int p = 0; p <= pos; ++p) {  // positions 0 .. pos - 1 fill the cache
      set_step(dec, cfg, x, p);
      nano::nano_runner::run_sequential(seq, dec);
    }
    const auto o = dec.output();
    want[static_cast<std::size_t>(comm.rank())].assign(o.data, o.data + o.rows * o.cols);
    for (const auto& plan : plans) {
      set_step(dec, cfg, x, pos);
      runner.run(nano::nano_program(g, plan), dec);
      got[static_cast<std::size_t>(comm.rank())].emplace_back(o.data, o.data + o.rows * o.cols);
    }
  });
  for (int r = 0; r < t; ++r)
    for (std::size_t k = 0; k < plans.size(); ++k) {
      INFO("rank " << r << ", plan " << plans[k].describe(g));
      CHECK(got[static_cast<std::size_t>(r)][k] == want[static_cast<std::size_t>(r)]);  // bitwise
    }
  CHECK(want[1] == want[0]);
}

TEST_CASE("gpt decode refuses shapes the ranks cannot split", "[gpt][nano][decode]") {
  gpt::model_config cfg = small_config();  // 4 heads, MLP width 128
  const auto blocks = gpt::model_blocks<double>(cfg);
  CHECK_THROWS_WITH(threads::run(3,
                                 [&](threads& comm) {
                                   decoder dec(comm, cfg,
                                               std::span<const gpt::block<double>>(blocks), 2, 4);
                                 }),
                    Catch::Contains("gpt::tp_decode: 3 ranks must divide the heads (4) and the "
                                    "MLP width (128)"));
  CHECK_THROWS_WITH(threads::run(1,
                                 [&](threads& comm) {
                                   decoder dec(comm, cfg,
                                               std::span<const gpt::block<double>>(blocks), 2, 4);
                                   dec.set_position(4);
                                 }),
                    Catch::Contains("gpt::tp_decode: position 4 outside the cache's 0..3"));
  CHECK_THROWS_WITH(threads::run(1,
                                 [&](threads& comm) {
                                   decoder dec(comm, cfg,
                                               std::span<const gpt::block<double>>(blocks).first(1),
                                               2, 4);
                                 }),
                    Catch::Contains("gpt::tp_decode: 1 blocks for a model of 2 layers"));
}
