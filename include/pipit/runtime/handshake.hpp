#pragma once
// The start-up agreement of an executor's ranks. Before the first step every rank gathers every
// other rank's view — its plan's hash and shape, its element size, whether it could prepare the
// plan at all (and why not), its chunks' activation sizes — and all ranks reach the same verdict
// from the same data. So a rank that runs another plan or another microbatch count, a stage
// whose sizes do not match its neighbour's, or a rank that failed to prepare, is refused with
// pipit::error on every rank, at start, instead of a hang or a corrupted message later.
//
// The functions here return the verdict ("" when all agree) instead of throwing, so that the
// executor can finish every collective of the agreement (pipeline group, vocabulary group,
// data-parallel group, then once more the replica) before any rank throws: no rank is left
// waiting in a collective its peers have left.
// Everything travels as doubles (integers below 2^53, one character per element), the one
// element type the communicator concept guarantees.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/runtime/program.hpp"
#include "pipit/schedule/plan.hpp"

namespace pipit::runtime {

// FNV-1a (Fowler, Noll, Vo) over the plan: schedule name, shape, placement, flags, and every
// rank's actions with their peers.
constexpr std::uint64_t plan_hash(const schedule::plan& p) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  const auto add = [&h](std::uint64_t x) {
    for (int i = 0; i < 8; ++i) {
      h ^= (x >> (8 * i)) & 0xffU;
      h *= 0x100000001b3ULL;
    }
  };
  for (const char c : p.schedule) add(static_cast<unsigned char>(c));
  add(static_cast<std::uint64_t>(p.shp.stages));
  add(static_cast<std::uint64_t>(p.shp.microbatches));
  add(static_cast<std::uint64_t>(p.shp.chunks));
  add(static_cast<std::uint64_t>(p.place));
  add(p.split_backward ? 1 : 0);
  add(p.lowered ? 1 : 0);
  for (const auto& acts : p.ranks) {
    add(acts.size());
    for (const schedule::action& a : acts) {
      add(static_cast<std::uint64_t>(a.kind));
      add(static_cast<std::uint64_t>(static_cast<std::uint32_t>(a.stage)));
      add(static_cast<std::uint64_t>(static_cast<std::uint32_t>(a.microbatch)));
      add(static_cast<std::uint64_t>(static_cast<std::uint32_t>(a.peer)));
    }
  }
  return h;
}

// One rank's view at start.
struct start_view {
  std::string_view problem;  // why this rank cannot run; empty when it can
  std::uint64_t plan_hash = 0;
  schedule::shape shp;
  int plan_ranks = 0;
  std::size_t element_size = 0;
};

namespace detail_handshake {

inline constexpr std::size_t header = 10;
inline constexpr std::size_t message_chars = 160;
inline constexpr std::size_t record = header + message_chars;

inline std::string hex(std::uint64_t x) {
  constexpr char digits[] = "0123456789abcdef";
  std::string s = "0x";
  for (int i = 60; i >= 0; i -= 4) s += digits[(x >> i) & 0xfU];
  return s;
}

// A message that travelled as one double per character: `full` is its length before it was cut
// to at most `kept` characters; "..." marks a cut message.
inline std::string message_text(const double* chars, std::size_t full, std::size_t kept) {
  std::string text;
  const std::size_t n = std::min(full, kept);
  for (std::size_t i = 0; i < n; ++i) text += static_cast<char>(static_cast<int>(chars[i]));
  if (full > kept) text += "...";
  return text;
}

inline std::string ranks_text(const std::vector<int>& ranks) {
  std::string s = ranks.size() == 1 ? "rank " : "ranks ";
  for (std::size_t i = 0; i < ranks.size(); ++i) s += detail::concat(i ? ", " : "", ranks[i]);
  return s;
}

}  // namespace detail_handshake

// Collective over `comm` (every rank calls it): gathers every rank's view. Returns "" when every
// rank can run and all run the same plan with the same element size, else the same message on
// every rank.
template <class Comm>
std::string agree_to_start(Comm& comm, const start_view& mine) {
  using namespace detail_handshake;
  const int n = comm.size();
  std::vector<double> rec(record, 0.0), all(record * static_cast<std::size_t>(n), 0.0);
  rec[0] = 1.0;  // present
  rec[1] = mine.problem.empty() ? 1.0 : 0.0;
  rec[2] = static_cast<double>(mine.plan_hash >> 32);
  rec[3] = static_cast<double>(mine.plan_hash & 0xffffffffULL);
  rec[4] = mine.shp.stages;
  rec[5] = mine.shp.microbatches;
  rec[6] = mine.shp.chunks;
  rec[7] = mine.plan_ranks;
  rec[8] = static_cast<double>(mine.element_size);
  // The full length travels, so that "..." marks only a message that was cut.
  const std::size_t len = std::min(mine.problem.size(), message_chars);
  rec[9] = static_cast<double>(mine.problem.size());
  for (std::size_t i = 0; i < len; ++i)
    rec[header + i] = static_cast<unsigned char>(mine.problem[i]);
  comm.all_gather(std::span<const double>(rec), std::span<double>(all));

  const auto field = [&](int r, std::size_t f) {
    return all[static_cast<std::size_t>(r) * record + f];
  };
  std::vector<int> refused;
  std::string why;
  for (int r = 0; r < n; ++r) {
    if (field(r, 1) != 0.0) continue;
    refused.push_back(r);
    why += detail::concat("; rank ", r, ": ",
                          message_text(&all[static_cast<std::size_t>(r) * record + header],
                                       static_cast<std::size_t>(field(r, 9)), message_chars));
  }
  if (!refused.empty())
    return detail::concat("pipit::runtime: the pipeline cannot start: ", ranks_text(refused),
                          " could not prepare the plan", why);

  const auto view = [&](int r) {
    const auto hash =
        (static_cast<std::uint64_t>(field(r, 2)) << 32) | static_cast<std::uint64_t>(field(r, 3));
    return detail::concat("rank ", r, " runs {stages=", field(r, 4), ", microbatches=", field(r, 5),
                          ", chunks=", field(r, 6), "} on ", field(r, 7), " ranks, plan hash ",
                          hex(hash), ", ", field(r, 8), "-byte elements");
  };
  std::vector<int> differ;
  for (int r = 1; r < n; ++r)
    for (std::size_t f = 2; f <= 8; ++f)
      if (field(r, f) != field(0, f)) {
        differ.push_back(r);
        break;
      }
  if (!differ.empty()) {
    std::string s =
        "pipit::runtime: the ranks run different plans (refused at start, every rank): " + view(0);
    for (const int r : differ) s += "; " + view(r);
    return s;
  }
  return {};
}

// Collective over `comm`, after agree_to_start succeeded: every virtual stage's output size must
// equal the next one's input size. `mine` holds this rank's chunks. Returns "" or the message.
template <class Comm>
std::string agree_on_sizes(Comm& comm, const schedule::plan& p, std::span<const chunk_sizes> mine) {
  const int n = comm.size(), vs = p.shp.virtual_stages();
  const auto per_rank = 2 * static_cast<std::size_t>(vs);
  std::vector<double> rec(per_rank, -1.0), all(per_rank * static_cast<std::size_t>(n), -1.0);
  for (int c = 0; c < p.shp.chunks; ++c) {
    const auto s = static_cast<std::size_t>(schedule::stage_of(p.place, p.shp, comm.rank(), c));
    rec[2 * s] = static_cast<double>(mine[static_cast<std::size_t>(c)].input);
    rec[2 * s + 1] = static_cast<double>(mine[static_cast<std::size_t>(c)].output);
  }
  comm.all_gather(std::span<const double>(rec), std::span<double>(all));
  std::string why;
  for (int s = 0; s + 1 < vs; ++s) {
    const int a = p.rank_of(s), b = p.rank_of(s + 1);
    const double out =
        all[static_cast<std::size_t>(a) * per_rank + 2 * static_cast<std::size_t>(s) + 1];
    const double in =
        all[static_cast<std::size_t>(b) * per_rank + 2 * static_cast<std::size_t>(s + 1)];
    // A stage nobody reported (-1) can only come from a communicator that does not really
    // gather (a test double); real ranks that agree on the plan report every stage.
    if (out >= 0 && in >= 0 && out != in)
      why += detail::concat("; virtual stage ", s, " (rank ", a, ") outputs ", out,
                            " elements but virtual stage ", s + 1, " (rank ", b, ") takes ", in);
  }
  if (why.empty()) return {};
  return "pipit::runtime: the stages' activation sizes disagree (refused at start, every rank)" +
         why;
}

// Collective over the data-parallel group: every replica must have started its pipeline (each
// tells whether its pipeline group agreed), run the same plan at the same pipeline rank, hold the
// same vocabulary shard (`shard`: the vocabulary layers' rank, -1 without them; a data group
// that spans the tensor ranks of one stage would otherwise average different shards), and
// expose gradient buffers of the same sizes. Every member compares with member 0, so the verdict
// is the same on every member. Returns "" or the message.
template <class Comm>
std::string agree_data_parallel(Comm& dp, bool pipeline_ok, std::uint64_t plan_hash,
                                int pipeline_rank, std::size_t element_size,
                                std::span<const std::size_t> gradient_sizes, int shard = -1) {
  std::uint64_t sizes_hash = 0xcbf29ce484222325ULL;
  for (const std::size_t z : gradient_sizes) {
    sizes_hash ^= z;
    sizes_hash *= 0x100000001b3ULL;
  }
  constexpr std::size_t fields = 9;
  const int n = dp.size();
  std::vector<double> rec(fields, 0.0), all(fields * static_cast<std::size_t>(n), 0.0);
  rec[0] = pipeline_ok ? 1.0 : 0.0;
  rec[1] = static_cast<double>(plan_hash >> 32);
  rec[2] = static_cast<double>(plan_hash & 0xffffffffULL);
  rec[3] = pipeline_rank;
  rec[4] = static_cast<double>(element_size);
  rec[5] = static_cast<double>(gradient_sizes.size());
  rec[6] = static_cast<double>(sizes_hash >> 32);
  rec[7] = static_cast<double>(sizes_hash & 0xffffffffULL);
  rec[8] = shard;
  dp.all_gather(std::span<const double>(rec), std::span<double>(all));
  const auto field = [&](int r, std::size_t f) {
    return all[static_cast<std::size_t>(r) * fields + f];
  };
  std::vector<int> failed;
  std::string why;
  for (int r = 0; r < n; ++r) {
    if (field(r, 0) == 0.0) failed.push_back(r);
    std::string d;
    const auto add = [&d](const std::string& s) { d += (d.empty() ? "" : ", ") + s; };
    if (field(r, 1) != field(0, 1) || field(r, 2) != field(0, 2)) add("another plan");
    if (field(r, 3) != field(0, 3))
      add(detail::concat("pipeline rank ", field(r, 3), " (replica 0: ", field(0, 3), ")"));
    if (field(r, 8) != field(0, 8))
      add(detail::concat("vocabulary shard ", field(r, 8), " (replica 0: ", field(0, 8), ")"));
    if (field(r, 4) != field(0, 4))
      add(detail::concat(field(r, 4), "-byte elements (replica 0: ", field(0, 4), ")"));
    if (field(r, 5) != field(0, 5) || field(r, 6) != field(0, 6) || field(r, 7) != field(0, 7))
      add(detail::concat("other gradient buffers (", field(r, 5),
                         " buffers; replica 0: ", field(0, 5), ")"));
    if (!d.empty()) why += detail::concat("; rank ", r, ": ", d);
  }
  if (!failed.empty())
    return detail::concat("pipit::runtime: the pipeline of data-parallel ",
                          detail_handshake::ranks_text(failed), " could not start");
  if (!why.empty())
    return "pipit::runtime: the data-parallel replicas differ from replica 0 (refused at start)" +
           why;
  return {};
}

// Collective over one replica's ranks (those that run one pipeline together: its vocabulary
// group, else its pipeline group), after the data-parallel agreement: that agreement's verdict
// reaches only the members of one data group, so a replica whose stage 1 was refused would leave
// its stage 0 waiting in the first step's transfers. Each member tells whether it was refused
// (with its message); a member that was not, but whose replica holds one that was, gets that
// member's message. The refusal then reaches every replica too: each data group has a member in
// each. Returns `verdict` when it is not empty, else "" or the message.
template <class Comm>
std::string agree_replica(Comm& replica, const std::string& verdict) {
  constexpr std::size_t head = 2, chars = 480, fields = head + chars;
  const int n = replica.size();
  std::vector<double> rec(fields, 0.0), all(fields * static_cast<std::size_t>(n), 0.0);
  rec[0] = verdict.empty() ? 1.0 : 0.0;
  rec[1] = static_cast<double>(verdict.size());
  for (std::size_t i = 0; i < std::min(verdict.size(), chars); ++i)
    rec[head + i] = static_cast<unsigned char>(verdict[i]);
  replica.all_gather(std::span<const double>(rec), std::span<double>(all));
  if (!verdict.empty()) return verdict;
  for (int r = 0; r < n; ++r) {
    const double* o = all.data() + fields * static_cast<std::size_t>(r);
    if (o[0] == 0.0)
      return detail::concat(
          "pipit::runtime: rank ", r, " of this replica's ", n, " ranks was refused at start: ",
          detail_handshake::message_text(o + head, static_cast<std::size_t>(o[1]), chars));
  }
  return {};
}

}  // namespace pipit::runtime
