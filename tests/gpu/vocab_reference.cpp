// The host reference of the CUDA vocabulary tests (see vocab_reference.hpp).
#include "vocab_reference.hpp"

#include <span>

#include "pipit/comm/threads.hpp"
#include "pipit/vocab/matrix_view.hpp"
#include "pipit/vocab/output_layer_forward_backward.hpp"
#include "pipit/vocab/shards.hpp"

namespace pipit_test {

namespace v = pipit::vocab;
using i64 = std::int64_t;

vocab_shape random_vocab_shape(std::mt19937_64& rng) {
  std::uniform_int_distribution<i64> tokens(1, 40), hidden(1, 24), vocab(1, 300);
  std::uniform_int_distribution<int> ranks(1, 8);
  const i64 multiples[] = {1, 1, 4, 16};
  return {tokens(rng), hidden(rng), vocab(rng), ranks(rng), multiples[rng() % 4]};
}

namespace {
template <class Alg>
vocab_reference_result run(const vocab_problem& p) {
  const v::vocab_shards shards(p.vocab, p.ranks, p.pad_multiple);
  const i64 H = p.hidden, T = p.tokens, S = shards.shard_size();
  std::vector<std::vector<double>> w(static_cast<std::size_t>(p.ranks)), dx(w.size()), dw(w.size());
  std::vector<v::loss_result<double>> res(w.size());
  for (int r = 0; r < p.ranks; ++r) {
    w[r].assign(static_cast<std::size_t>(S * H), 0.0);
    const auto range = shards.real_range_of(r);
    for (i64 i = range.begin * H; i < range.end * H; ++i) w[r][i - range.begin * H] = p.w[i];
  }
  pipit::comm::threads::run(p.ranks, [&](pipit::comm::threads& comm) {
    const int r = comm.rank();
    dx[r].assign(static_cast<std::size_t>(T * H), 0.0);
    dw[r].assign(static_cast<std::size_t>(S * H), 0.0);
    res[r] = v::output_layer_forward_backward<Alg, 7>(
        comm, shards, v::make_view<const double>(p.x.data(), T, H),
        v::make_view<const double>(w[r].data(), S, H), p.targets, v::make_view(dx[r].data(), T, H),
        v::make_view(dw[r].data(), S, H), p.opt, std::span<const double>(p.weights));
  });
  vocab_reference_result out;
  out.loss = res[0];
  out.dx = dx[0];
  for (int r = 0; r < p.ranks; ++r)
    for (i64 i = 0; i < shards.real_rows(r) * H; ++i) out.dw.push_back(dw[r][i]);
  return out;
}
}  // namespace

vocab_reference_result host_reference(const vocab_problem& p, algorithm alg) {
  switch (alg) {
    case algorithm::naive:
      return run<v::naive>(p);
    case algorithm::two_barrier:
      return run<v::two_barrier>(p);
    default:
      return run<v::one_barrier>(p);
  }
}

}  // namespace pipit_test
