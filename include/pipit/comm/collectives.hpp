#pragma once
// Collectives built on a communicator's point-to-point operations, so that every backend gets
// them and so that the algorithm can be chosen: all-reduce by ring, by recursive doubling
// ("tree") or through one root ("star", TPI-LLM's choice for latency-bound links: two message
// latencies whatever the rank count; Li et al., arXiv 2410.00531). choose_all_reduce() picks one
// with the alpha-beta model. Reduce, broadcast, all-gather and barrier use the same primitives.
//
// Every algorithm gives every rank bit-identical results: each element is combined in one order
// that all ranks share (ring: the order around the ring; tree: lower rank's value on the left;
// star: rank order at the root), and then copied.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/core/math.hpp"

namespace pipit::comm {

enum class all_reduce_algorithm { ring, tree, star };

constexpr std::string_view name(all_reduce_algorithm a) noexcept {
  return a == all_reduce_algorithm::ring   ? "ring"
         : a == all_reduce_algorithm::tree ? "tree"
                                           : "star";
}

// Alpha-beta model: a message of n bytes between two ranks takes alpha + n * beta. Messages a
// rank sends in one step overlap; a rank receiving k messages in one step is bound by its link,
// k * n * beta. Returns the predicted time of an all-reduce of `bytes` over `ranks` ranks.
constexpr double predicted_all_reduce_time(all_reduce_algorithm a, int ranks, double bytes,
                                           double alpha, double beta) noexcept {
  if (ranks <= 1) return 0;
  const double p = ranks;
  switch (a) {
    case all_reduce_algorithm::ring:  // reduce-scatter + all-gather: 2(p-1) steps of n/p bytes
      return 2 * (p - 1) * (alpha + bytes / p * beta);
    case all_reduce_algorithm::tree: {  // ceil(log2 p) exchanges of n bytes, +2 to fold extras
      const int pow2 = std::bit_floor(static_cast<unsigned>(ranks));
      const int rounds = std::countr_zero(static_cast<unsigned>(pow2)) + (pow2 != ranks ? 2 : 0);
      return rounds * (alpha + bytes * beta);
    }
    case all_reduce_algorithm::star:  // gather to the root, broadcast back: 2 latencies
      return 2 * (alpha + (p - 1) * bytes * beta);
  }
  return 0;
}

constexpr all_reduce_algorithm choose_all_reduce(int ranks, double bytes, double alpha,
                                                 double beta) noexcept {
  all_reduce_algorithm best = all_reduce_algorithm::ring;
  for (const auto a : {all_reduce_algorithm::tree, all_reduce_algorithm::star})
    if (predicted_all_reduce_time(a, ranks, bytes, alpha, beta) <
        predicted_all_reduce_time(best, ranks, bytes, alpha, beta))
      best = a;
  return best;
}

// Tags at or above this value are reserved for collectives; user point-to-point uses lower ones.
inline constexpr int collective_tag = 1 << 28;

namespace detail_collectives {
template <class T>
std::span<const T> as_const(std::span<T> s) noexcept {
  return {s.data(), s.size()};
}
}  // namespace detail_collectives

// Ring all-reduce: reduce-scatter then all-gather around the ring, one block per rank. The block
// b ends fully reduced on rank b, combined in ring order starting at rank b + 1.
template <class C, class T, class Op>
void ring_all_reduce(C& comm, std::span<T> data, Op op) {
  const int p = comm.size(), r = comm.rank();
  if (p == 1 || data.empty()) return;
  const auto n = static_cast<long long>(data.size());
  const auto block = [&](int b) {
    const auto rg = even_split<long long>(n, p, ((b % p) + p) % p);
    return data.subspan(static_cast<std::size_t>(rg.begin), static_cast<std::size_t>(rg.size()));
  };
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  std::vector<T> incoming(static_cast<std::size_t>(even_split<long long>(n, p, 0).size()));
  // Step s: send block r - s - 1 and fold the received block r - s - 2 into ours; after p - 1
  // steps block r is complete on rank r.
  for (int s = 0; s < p - 1; ++s) {
    const auto out = block(r - s - 1);
    const auto in = block(r - s - 2);
    std::span<T> buf(incoming.data(), in.size());
    comm.send(detail_collectives::as_const(out), next, collective_tag);
    comm.recv(buf, prev, collective_tag);
    // prev's partial (earlier in the ring) goes on the left: one order around the ring.
    for (std::size_t i = 0; i < in.size(); ++i) in[i] = op(buf[i], in[i]);
  }
  // Now block (r - p) = block r is complete on rank r. All-gather around the ring.
  for (int s = 0; s < p - 1; ++s) {
    const auto out = block(r - s);
    const auto in = block(r - s - 1);
    comm.send(detail_collectives::as_const(out), next, collective_tag + 1);
    comm.recv(in, prev, collective_tag + 1);
  }
}

// Recursive doubling; ranks beyond the largest power of two first fold into a partner and get
// the result back at the end.
template <class C, class T, class Op>
void tree_all_reduce(C& comm, std::span<T> data, Op op) {
  const int p = comm.size(), r = comm.rank();
  if (p == 1 || data.empty()) return;
  const int pow2 = static_cast<int>(std::bit_floor(static_cast<unsigned>(p)));
  const int extra = p - pow2;  // ranks pow2 .. p-1 fold into ranks 0 .. extra-1
  std::vector<T> buf(data.size());
  const std::span<T> b(buf);
  if (r >= pow2) {
    comm.send(detail_collectives::as_const(data), r - pow2, collective_tag + 2);
    comm.recv(data, r - pow2, collective_tag + 3);
    return;
  }
  if (r < extra) {
    comm.recv(b, r + pow2, collective_tag + 2);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = op(data[i], b[i]);
  }
  for (int mask = 1; mask < pow2; mask <<= 1) {
    const int partner = r ^ mask;
    comm.send(detail_collectives::as_const(data), partner, collective_tag + 4);
    comm.recv(b, partner, collective_tag + 4);
    // The lower rank's partial on the left: both partners compute the same value.
    for (std::size_t i = 0; i < data.size(); ++i)
      data[i] = r < partner ? op(data[i], b[i]) : op(b[i], data[i]);
  }
  if (r < extra) comm.send(detail_collectives::as_const(data), r + pow2, collective_tag + 3);
}

// Star: everyone sends to the root, which combines in rank order (star_reduce below) and sends
// the result back to each rank directly: two message latencies whatever the rank count.
template <class C, class T, class Op>
void star_reduce(C& comm, std::span<T> data, Op op, int root);

template <class C, class T, class Op>
void star_all_reduce(C& comm, std::span<T> data, Op op, int root = 0) {
  const int p = comm.size();
  if (p == 1 || data.empty()) return;
  star_reduce(comm, data, op, root);
  if (comm.rank() != root) {
    comm.recv(data, root, collective_tag + 6);
    return;
  }
  for (int q = 0; q < p; ++q)
    if (q != root) comm.send(detail_collectives::as_const(data), q, collective_tag + 6);
}

template <class C, class T, class Op>
void all_reduce_with(all_reduce_algorithm a, C& comm, std::span<T> data, Op op) {
  switch (a) {
    case all_reduce_algorithm::ring:
      return ring_all_reduce(comm, data, op);
    case all_reduce_algorithm::tree:
      return tree_all_reduce(comm, data, op);
    case all_reduce_algorithm::star:
      return star_all_reduce(comm, data, op);
  }
}

// Binomial-tree broadcast from `root`.
template <class C, class T>
void tree_broadcast(C& comm, std::span<T> data, int root) {
  const int p = comm.size();
  if (p == 1 || data.empty()) return;
  const int rel = (comm.rank() - root + p) % p;
  int mask = 1;
  while (mask < p) {  // receive from the parent
    if (rel & mask) {
      comm.recv(data, ((rel - mask) + root) % p, collective_tag + 7);
      break;
    }
    mask <<= 1;
  }
  // `mask` is now the lowest set bit of rel (p or more at the root): the children are rel + m for
  // every smaller power of two m.
  for (mask >>= 1; mask > 0; mask >>= 1)
    if (rel + mask < p)
      comm.send(detail_collectives::as_const(data), ((rel + mask) + root) % p, collective_tag + 7);
}

// Reduce to `root` (result only valid there), combining in rank order.
template <class C, class T, class Op>
void star_reduce(C& comm, std::span<T> data, Op op, int root) {
  const int p = comm.size(), r = comm.rank();
  if (p == 1 || data.empty()) return;
  if (r != root) {
    comm.send(detail_collectives::as_const(data), root, collective_tag + 8);
    return;
  }
  std::vector<T> acc, buf(data.size());
  for (int q = 0; q < p; ++q) {
    std::span<const T> part = data;
    if (q != root) {
      comm.recv(std::span<T>(buf), q, collective_tag + 8);
      part = buf;
    }
    if (acc.empty())
      acc.assign(part.begin(), part.end());
    else
      for (std::size_t i = 0; i < acc.size(); ++i) acc[i] = op(acc[i], part[i]);
  }
  std::copy(acc.begin(), acc.end(), data.begin());
}

// All-gather: rank r's `mine` lands at out[r * mine.size() ...], around the ring.
template <class C, class T>
void ring_all_gather(C& comm, std::span<const T> mine, std::span<T> out) {
  const int p = comm.size(), r = comm.rank();
  const std::size_t n = mine.size();
  if (out.size() != n * static_cast<std::size_t>(p))
    fail("pipit: all_gather: output has ", out.size(), " elements, expected ", n, " x ", p);
  std::copy(mine.begin(), mine.end(),
            out.begin() + static_cast<long>(n * static_cast<std::size_t>(r)));
  if (p == 1 || n == 0) return;
  const int next = (r + 1) % p, prev = (r + p - 1) % p;
  for (int s = 0; s < p - 1; ++s) {
    const int send_block = (r - s + p) % p, recv_block = (r - s - 1 + p) % p;
    comm.send(std::span<const T>(out.subspan(static_cast<std::size_t>(send_block) * n, n)), next,
              collective_tag + 9);
    comm.recv(out.subspan(static_cast<std::size_t>(recv_block) * n, n), prev, collective_tag + 9);
  }
}

template <class C>
void tree_barrier(C& comm) {
  int token = 0;
  tree_all_reduce(comm, std::span<int>(&token, 1), [](int a, int b) { return a + b; });
}

}  // namespace pipit::comm
