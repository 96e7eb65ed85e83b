#pragma once
// validate(plan): proves a plan is executable and complete, or says which rule fails at which
// action. Usable in static_assert and at run time.
//
// Rules, in the order they are checked:
//   shape           the plan's shape is one some schedule accepts; one action list per rank
//   range           stage and microbatch of every action are inside the shape
//   placement       every action runs on the rank that holds its virtual stage
//   unsupported     collective actions (C); S, T, IF or IB in a plan whose `vocab` is none
//   communication   an unlowered plan has no send/recv; a lowered one names the right peers
//   duplicate       a pass appears twice for one (stage, microbatch)
//   mixed-backward  a (stage, microbatch) has both a combined BW and a split B or W
//   missing         a (stage, microbatch) lacks its F, or its backward (BW, or B and W); in a
//                   vocabulary plan, a rank lacks one of its S, T, IF, IB for a microbatch
//   order           on its own rank a backward precedes its forward, or W precedes its B; with
//                   vocabulary passes also T before S, S before the last stage's F, the first
//                   stage's F before IF, the last stage's backward before S (one barrier) or T
//                   (two barriers), IB before the first stage's backward
//   recv-before-use (lowered) a pass uses another rank's value it has not received yet
//   send-after-produce (lowered) a value is sent before it is made, or sent/received twice
//   unmatched       (lowered) a cross-rank dependency lacks its send or its receive
//   cycle           (unlowered) the per-rank orders and the data dependencies form a cycle
//   deadlock        (lowered) with blocking, grouped send/recv (and blocking collectives for the
//                   vocabulary passes) some rank waits forever

#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "pipit/core/filled.hpp"
#include "pipit/schedule/dataflow.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/plan.hpp"

namespace pipit::schedule {

struct validation {
  bool ok = true;
  std::string_view rule;  // empty when ok
  int rank = -1;          // where the failure was found, -1 when not tied to one action
  int index = -1;
  action act{};
  std::string_view detail;  // one more phrase about the failure

  constexpr explicit operator bool() const noexcept { return ok; }
};

inline std::string to_string(const validation& v) {
  if (v.ok) return "valid";
  std::string s = detail::concat("invalid plan: rule '", v.rule, "'");
  if (v.rank >= 0)
    s += detail::concat(" at rank ", v.rank, " action ", v.index, " (", to_string(v.act), ")");
  if (!v.detail.empty()) s += detail::concat(": ", v.detail);
  return s;
}

namespace detail_validate {

constexpr validation failure(std::string_view rule, int rank, int index, action a,
                             std::string_view detail) {
  return validation{false, rule, rank, index, a, detail};
}

// Deadlock check of a lowered plan under blocking, grouped point-to-point semantics: a rank
// posts a step's communications together and leaves the step when every one of them has its
// partner posted. Compute steps need nothing here (recv-before-use is checked statically),
// except vocabulary passes: they are blocking collectives, left when every rank has entered the
// same pass (kind, microbatch).
constexpr validation check_deadlock(const plan& p) {
  const value_index idx(p.shp);
  const int ranks = p.rank_count();
  // arrivals[(kind - S) * microbatches + mb]: ranks that have entered that vocabulary pass.
  std::vector<int> arrivals;
  if (p.vocab != vocab_passes::none)
    arrivals = filled(4 * static_cast<std::size_t>(p.shp.microbatches), 0);
  const auto arrival = [&](const action& a) -> int& {
    return arrivals[static_cast<std::size_t>(static_cast<int>(a.kind) -
                                             static_cast<int>(op::vocab_s)) *
                        static_cast<std::size_t>(p.shp.microbatches) +
                    static_cast<std::size_t>(a.microbatch)];
  };
  // posted[side][value]: the send (side 0) / receive (side 1) of this value has been posted.
  std::vector<unsigned char> posted =
      filled<unsigned char>(2 * static_cast<std::size_t>(idx.size()), 0);
  auto value_of = [&](const action& a) {  // the value a communication carries
    switch (a.kind) {
      case op::send_forward:
        return idx(value_kind::activation, a.stage, a.microbatch);
      case op::recv_forward:
        return idx(value_kind::activation, a.stage - 1, a.microbatch);
      case op::send_backward:
        return idx(value_kind::input_grad, a.stage, a.microbatch);
      default:  // recv_backward
        return idx(value_kind::input_grad, a.stage + 1, a.microbatch);
    }
  };
  std::vector<std::vector<step>> steps(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) steps[static_cast<std::size_t>(r)] = steps_of(p.for_rank(r));
  std::vector<std::size_t> at = filled<std::size_t>(static_cast<std::size_t>(ranks), 0);
  std::vector<unsigned char> entered = filled<unsigned char>(static_cast<std::size_t>(ranks), 0);
  bool progress = true;
  while (progress) {
    progress = false;
    for (int r = 0; r < ranks; ++r) {
      const auto ru = static_cast<std::size_t>(r);
      const auto acts = p.for_rank(r);
      while (at[ru] < steps[ru].size()) {
        const step& st = steps[ru][at[ru]];
        if (!st.communication) {
          if (is_vocabulary(acts[st.begin].kind)) {
            int& n = arrival(acts[st.begin]);
            if (!entered[ru]) {
              ++n;
              entered[ru] = 1;
              progress = true;
            }
            if (n < ranks) break;
            entered[ru] = 0;
          }
          ++at[ru];
          progress = true;
          continue;
        }
        if (!entered[ru]) {  // post the whole group
          for (std::size_t i = st.begin; i < st.end; ++i)
            posted[(is_send(acts[i].kind) ? 0 : static_cast<std::size_t>(idx.size())) +
                   static_cast<std::size_t>(value_of(acts[i]))] = 1;
          entered[ru] = 1;
          progress = true;
        }
        bool done = true;
        for (std::size_t i = st.begin; i < st.end && done; ++i)
          done = posted[(is_send(acts[i].kind) ? static_cast<std::size_t>(idx.size()) : 0) +
                        static_cast<std::size_t>(value_of(acts[i]))] != 0;
        if (!done) break;
        entered[ru] = 0;
        ++at[ru];
        progress = true;
      }
    }
  }
  for (int r = 0; r < ranks; ++r) {
    const auto ru = static_cast<std::size_t>(r);
    if (at[ru] < steps[ru].size()) {
      const std::size_t i = steps[ru][at[ru]].begin;
      return failure("deadlock", r, static_cast<int>(i), p.for_rank(r)[i],
                     is_vocabulary(p.for_rank(r)[i].kind)
                         ? "this collective vocabulary pass never gathers every rank"
                         : "with blocking grouped send/recv this rank's step never completes");
    }
  }
  return {};
}

// The common case, fast: proves an unlowered plan valid in one pass that executes it (Kahn's
// algorithm over the ranks' lists) and checks every per-action rule on the way, with one state
// byte per (stage, microbatch). It only answers "valid"; on any doubt it returns false and
// validate() runs the rule-by-rule checks below, which name the rule and the action.
constexpr bool valid_unlowered_fast(const plan& p) {
  if (p.vocab != vocab_passes::none) return false;  // vocabulary plans: the full checks
  const shape& s = p.shp;
  const int stages = s.virtual_stages(), m = s.microbatches, ranks = p.rank_count();
  enum : unsigned char { f_bit = 1, b_bit = 2, w_bit = 4, bw_bit = 8 };
  std::vector<int> rank_table = filled(static_cast<std::size_t>(stages), 0);
  for (int st = 0; st < stages; ++st) rank_table[static_cast<std::size_t>(st)] = p.rank_of(st);
  const auto cells = static_cast<std::size_t>(stages) * static_cast<std::size_t>(m);
  std::vector<unsigned char> state = filled<unsigned char>(cells, 0);
  std::vector<std::size_t> pos = filled<std::size_t>(static_cast<std::size_t>(ranks), 0);
  const auto cell = [m](int stage, int mb) {
    return static_cast<std::size_t>(stage) * static_cast<std::size_t>(m) +
           static_cast<std::size_t>(mb);
  };
  // Round-robin: every rank advances as far as its inputs allow; a round in which no rank
  // advances means the plan is stuck. (As fast as a worklist here, and simpler: either way the
  // cost is about one unpredictable branch per action, where ranks hand over to each other.)
  // Rounds alternate direction, so forwards flow down the ranks in one round and backwards up
  // in the next: 20% fewer mispredicted branches on 1F1B (cachegrind --branch-sim, p=64, m=512).
  std::size_t remaining = p.action_count();
  bool downward = true;
  while (remaining > 0) {
    std::size_t advanced = 0;
    for (int k = 0; k < ranks; ++k) {
      const int r = downward ? k : ranks - 1 - k;
      const auto ru = static_cast<std::size_t>(r);
      const auto& acts = p.ranks[ru];
      std::size_t i = pos[ru];
      for (; i < acts.size(); ++i) {
        const action& a = acts[i];
        if (a.stage < 0 || a.stage >= stages || a.microbatch < 0 || a.microbatch >= m) return false;
        if (rank_table[static_cast<std::size_t>(a.stage)] != r) return false;
        unsigned char& st = state[cell(a.stage, a.microbatch)];
        int dep_stage = -1;
        unsigned char dep_bits = 0, bit = 0;
        switch (a.kind) {
          case op::forward:
            bit = f_bit;
            if (a.stage > 0) dep_stage = a.stage - 1, dep_bits = f_bit;
            break;
          case op::backward_input:
          case op::backward:
            bit = a.kind == op::backward ? bw_bit : b_bit;
            if (!(st & f_bit)) return false;  // before its own forward
            if (a.stage + 1 < stages) dep_stage = a.stage + 1, dep_bits = b_bit | bw_bit;
            break;
          case op::backward_weight:
            bit = w_bit;
            if (!(st & b_bit)) return false;  // before its own B
            break;
          default:
            return false;  // communication or vocabulary passes: the full checks decide
        }
        if (dep_stage >= 0 && !(state[cell(dep_stage, a.microbatch)] & dep_bits)) {
          if (rank_table[static_cast<std::size_t>(dep_stage)] == r) return false;  // local order
          break;  // wait for the other rank
        }
        if (st & bit) return false;  // duplicate
        st = static_cast<unsigned char>(st | bit);
      }
      advanced += i - pos[ru];
      pos[ru] = i;
    }
    if (advanced == 0) return false;  // stuck: a cycle, or a pass waits for a missing one
    remaining -= advanced;
    downward = !downward;
  }
  for (const unsigned char st : state)
    if (st != (f_bit | bw_bit) && st != (f_bit | b_bit | w_bit)) return false;
  return true;
}

}  // namespace detail_validate

constexpr validation validate(const plan& p) {
  using detail_validate::failure;
  const shape& s = p.shp;
  if (check_common(s) != shape_rule::ok || p.rank_count() != s.stages)
    return failure("shape", -1, -1, {}, "bad shape, or not one action list per rank");
  if (!p.lowered && detail_validate::valid_unlowered_fast(p)) return {};
  const value_index idx(s);
  const int stages = s.virtual_stages();
  std::vector<int> rank_table = filled(static_cast<std::size_t>(stages), 0);
  for (int st = 0; st < stages; ++st) rank_table[static_cast<std::size_t>(st)] = p.rank_of(st);
  // Per (stage, microbatch): how many F, B, W, BW were seen.
  std::vector<unsigned char> count = filled<unsigned char>(
      4 * static_cast<std::size_t>(stages) * static_cast<std::size_t>(s.microbatches), 0);
  const auto count_at = [&](int slot, int stage, int mb) {  // slot: 0 F, 1 B, 2 W, 3 BW
    return (static_cast<std::size_t>(slot) * stages + static_cast<std::size_t>(stage)) *
               static_cast<std::size_t>(s.microbatches) +
           static_cast<std::size_t>(mb);
  };
  const auto counter = [&](op k, int stage, int mb) -> unsigned char& {
    const int slot = k == op::forward           ? 0
                     : k == op::backward_input  ? 1
                     : k == op::backward_weight ? 2
                                                : 3;
    return count[count_at(slot, stage, mb)];
  };
  // Vocabulary plans: how many S, T, IF, IB each rank runs per microbatch.
  std::vector<unsigned char> vocab_count;
  if (p.vocab != vocab_passes::none)
    vocab_count = filled<unsigned char>(
        4 * static_cast<std::size_t>(p.rank_count()) * static_cast<std::size_t>(s.microbatches), 0);
  const auto vocab_counter = [&](op k, int rank, int mb) -> unsigned char& {
    const int slot = static_cast<int>(k) - static_cast<int>(op::vocab_s);  // S, T, IF, IB
    return vocab_count[(static_cast<std::size_t>(slot) * static_cast<std::size_t>(p.rank_count()) +
                        static_cast<std::size_t>(rank)) *
                           static_cast<std::size_t>(s.microbatches) +
                       static_cast<std::size_t>(mb)];
  };
  // Lowered bookkeeping: sends/receives seen per value (for matching).
  // Each value has one producing rank and at most one receiving rank, so flat arrays suffice.
  std::vector<unsigned char> sends, recvs, made;
  if (p.lowered) {
    sends = filled<unsigned char>(static_cast<std::size_t>(idx.size()), 0);
    recvs = sends;
    made = sends;
  }

  for (int r = 0; r < p.rank_count(); ++r) {
    const auto acts = p.for_rank(r);
    for (std::size_t i = 0; i < acts.size(); ++i) {
      const action& a = acts[i];
      const int at = static_cast<int>(i);
      if (a.stage < 0 || a.stage >= stages || a.microbatch < 0 || a.microbatch >= s.microbatches)
        return failure("range", r, at, a, "stage or microbatch outside the shape");
      if (a.kind == op::collective)
        return failure("unsupported", r, at, a,
                       "collective actions are not placed by these schedules");
      if (is_vocabulary(a.kind)) {
        if (p.vocab == vocab_passes::none)
          return failure(
              "unsupported", r, at, a,
              "a vocabulary pass in a plan without vocabulary passes (plan.vocab is none)");
        if (a.stage != stage_of(p.place, s, r, 0))
          return failure("placement", r, at, a,
                         "a vocabulary pass's stage must be its rank's chunk-0 virtual stage");
        if (vocab_counter(a.kind, r, a.microbatch)++)
          return failure("duplicate", r, at, a, "this vocabulary pass appears twice on this rank");
        const int mb = a.microbatch;
        if (a.kind == op::vocab_t && !vocab_counter(op::vocab_s, r, mb))
          return failure("order", r, at, a, "T before its S on this rank");
        if (a.kind == op::vocab_s && rank_table[static_cast<std::size_t>(stages - 1)] == r &&
            !count[count_at(0, stages - 1, mb)])
          return failure("order", r, at, a, "S before the last stage's forward on its rank");
        if (a.kind == op::embed_backward && rank_table[0] == r &&
            !(count[count_at(1, 0, mb)] | count[count_at(3, 0, mb)]))
          return failure("order", r, at, a, "IB before the first stage's backward on its rank");
        continue;
      }
      if (is_communication(a.kind)) {
        if (!p.lowered)
          return failure("communication", r, at, a, "send/recv in a plan not marked lowered");
        // The value carried, its producer's and consumer's stages.
        const bool fwd = a.kind == op::send_forward || a.kind == op::recv_forward;
        const int from = is_send(a.kind) ? a.stage : (fwd ? a.stage - 1 : a.stage + 1);
        const int to = fwd ? from + 1 : from - 1;
        if (from < 0 || from >= stages || to < 0 || to >= stages)
          return failure("communication", r, at, a, "no such neighbouring stage");
        const int self = is_send(a.kind) ? from : to;
        const int other = is_send(a.kind) ? to : from;
        if (p.rank_of(self) != r)
          return failure("placement", r, at, a,
                         "communication on a rank that does not hold the stage");
        if (p.rank_of(other) != a.peer || a.peer == r)
          return failure("communication", r, at, a, "wrong peer rank");
        const int v =
            idx(fwd ? value_kind::activation : value_kind::input_grad, from, a.microbatch);
        const auto vu = static_cast<std::size_t>(v);
        if (is_send(a.kind)) {
          if (!made[vu]) return failure("send-after-produce", r, at, a, "sent before it is made");
          if (sends[vu]++) return failure("send-after-produce", r, at, a, "sent twice");
        } else {
          if (recvs[vu]++) return failure("send-after-produce", r, at, a, "received twice");
        }
        continue;
      }
      if (rank_table[static_cast<std::size_t>(a.stage)] != r)
        return failure("placement", r, at, a,
                       "the pass runs on a rank that does not hold its stage");
      if (counter(a.kind, a.stage, a.microbatch)++)
        return failure("duplicate", r, at, a, "this pass appears twice");
      // Same-rank order, and (lowered) inputs present before use. The inputs are those of
      // inputs_of(), spelled out per kind so that no index has to be decoded; the check returns
      // a code so that the common, passing case builds no validation object.
      enum : int { fine, out_of_order, local_missing, not_received };
      const auto input = [&](value_kind k, int stage) -> int {
        if (stage < 0 || stage >= stages) return fine;
        if (rank_table[static_cast<std::size_t>(stage)] == r) {  // produced here: must be earlier
          const bool seen = k == value_kind::activation
                                ? count[count_at(0, stage, a.microbatch)] != 0
                                : (count[count_at(1, stage, a.microbatch)] |
                                   count[count_at(3, stage, a.microbatch)]) != 0;
          if (seen) return fine;
          return stage == a.stage ? out_of_order : p.lowered ? local_missing : fine;
        }
        return p.lowered && !recvs[static_cast<std::size_t>(idx(k, stage, a.microbatch))]
                   ? not_received
                   : fine;
      };
      if (p.vocab != vocab_passes::none) {
        if (a.kind == op::forward && a.stage == 0 &&
            !vocab_counter(op::embed_forward, r, a.microbatch))
          return failure("order", r, at, a, "the first stage's forward before its rank's IF");
        const op barrier = p.vocab == vocab_passes::one_barrier ? op::vocab_s : op::vocab_t;
        if ((a.kind == op::backward_input || a.kind == op::backward) && a.stage == stages - 1 &&
            !vocab_counter(barrier, r, a.microbatch))
          return failure("order", r, at, a,
                         p.vocab == vocab_passes::one_barrier
                             ? "the last stage's backward before its rank's S"
                             : "the last stage's backward before its rank's T");
      }
      int bad = fine;
      if (a.kind == op::forward) {
        bad = input(value_kind::activation, a.stage - 1);
      } else if (a.kind == op::backward_weight) {
        bad = input(value_kind::input_grad, a.stage);
      } else {  // B or BW
        bad = input(value_kind::activation, a.stage);
        if (bad == fine) bad = input(value_kind::input_grad, a.stage + 1);
      }
      if (bad == out_of_order)
        return failure(
            "order", r, at, a,
            a.kind == op::backward_weight ? "W before its B" : "backward before its forward");
      if (bad == local_missing)
        return failure("recv-before-use", r, at, a, "local input not yet produced");
      if (bad == not_received)
        return failure("recv-before-use", r, at, a,
                       "uses another rank's value before receiving it");
      if (p.lowered)
        for (const int v : outputs_of(a, idx))
          if (v >= 0) made[static_cast<std::size_t>(v)] = 1;
    }
  }

  // Completeness: F once, and BW once or B and W once each, for every (stage, microbatch).
  for (int st = 0; st < stages; ++st)
    for (int mb = 0; mb < s.microbatches; ++mb) {
      const action where = make_action(op::forward, st, mb);
      const int r = p.rank_of(st);
      const bool bw = counter(op::backward, st, mb) != 0;
      const bool b = counter(op::backward_input, st, mb) != 0;
      const bool w = counter(op::backward_weight, st, mb) != 0;
      if (!counter(op::forward, st, mb)) return failure("missing", r, -1, where, "no forward");
      if (bw && (b || w))
        return failure("mixed-backward", r, -1, where, "both BW and a split B or W");
      if (!bw && !(b && w))
        return failure("missing", r, -1, where, "no complete backward (BW, or B and W)");
    }

  if (p.vocab != vocab_passes::none)
    for (int r = 0; r < p.rank_count(); ++r)
      for (int mb = 0; mb < s.microbatches; ++mb)
        for (const op k : {op::vocab_s, op::vocab_t, op::embed_forward, op::embed_backward})
          if (!vocab_counter(k, r, mb))
            return failure(
                "missing", r, -1, make_action(k, stage_of(p.place, s, r, 0), mb),
                "a vocabulary plan needs one S, T, IF and IB per microbatch on every rank");

  if (p.lowered) {
    for (int st = 0; st < stages; ++st)
      for (int mb = 0; mb < s.microbatches; ++mb) {
        const auto check = [&](value_kind k, int to) -> validation {
          if (to < 0 || to >= stages) return {};
          const auto vu = static_cast<std::size_t>(idx(k, st, mb));
          const bool cross = p.rank_of(st) != p.rank_of(to);
          if (cross && (sends[vu] != 1 || recvs[vu] != 1))
            return failure(
                "unmatched", p.rank_of(st), -1,
                make_action(k == value_kind::activation ? op::send_forward : op::send_backward, st,
                            mb),
                "a cross-rank dependency without exactly one send and one receive");
          if (!cross && (sends[vu] || recvs[vu]))
            return failure("communication", p.rank_of(st), -1,
                           make_action(op::send_forward, st, mb), "send/recv within one rank");
          return {};
        };
        if (auto v = check(value_kind::activation, st + 1); !v.ok) return v;
        if (auto v = check(value_kind::input_grad, st - 1); !v.ok) return v;
      }
    return detail_validate::check_deadlock(p);
  }

  const execution ex = execute<false>(p, [](const action&, int) { return 1.0; });
  if (!ex.complete)
    return failure("cycle", ex.stuck_rank, ex.stuck_index,
                   p.for_rank(ex.stuck_rank)[static_cast<std::size_t>(ex.stuck_index)],
                   "waits forever: the rank orders and the data dependencies form a cycle");
  return {};
}

template <int Ranks, std::size_t Capacity>
constexpr validation validate(const static_plan<Ranks, Capacity>& p) {
  return validate(p.to_plan());
}

}  // namespace pipit::schedule
