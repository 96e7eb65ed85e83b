#pragma once
// program: one rank's lowered plan compiled for execution. Every buffer the rank needs during a
// step — chunk inputs, outputs on their way to a peer, the stage's saved activations, output and
// input gradients — gets a fixed place in one arena, chosen once here: each value lives from the
// step that produces it to the step that last reads it, and values of the same (kind, chunk)
// whose lifetimes do not overlap share a slot (greedy interval colouring in plan order, which is
// optimal for intervals). The executor then runs the instruction list with no lookup and no
// allocation; send/receive steps become prebuilt groups of point-to-point operations.
//
// Lifetimes, for a pass of virtual stage s (chunk c on this rank) and microbatch j:
//   input       received (RF), loaded from data (s = 0), or written by F(s - 1) when s - 1 is on
//               this rank; read by F, B, W or BW; lives until the last of them
//   output      written by F(s) when s + 1 is on another rank; lives until its send (SF)
//   saved       written by F, read by B/W/BW; with re-materialization the forward writes it into a
//               scratch and B/BW re-runs the forward into a fresh slot, which W then reads
//   output_grad received (RB) or written by B(s + 1) on this rank; read by B, W or BW
//   input_grad  written by B/BW(s) when s - 1 is on another rank; lives until its send (SB)
// When the neighbouring stage is on the same rank (V placement's turn, interleaving on one
// rank) no copy is made: F(s) writes straight into s + 1's input, B(s + 1) into s's output_grad.
//
// In a plan with vocabulary passes (vocab_layers.hpp) the first and the last virtual stage trade
// values with the vocabulary layers instead of loading data and computing the loss:
//   input of stage 0        written by IF (on stage 0's rank), read by F, B, W
//   output of the last      written by F, read by S (X is broadcast from it)
//   output_grad of the last written by S (one barrier) or T (two barriers, naive); read by B, W
//   input_grad of stage 0   written by B/BW(0), read by IB (broadcast from it)
// and microbatch k's vocabulary state lives from S_k to T_k in one of vocab_slots states.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/plan.hpp"

namespace pipit::runtime {

// The sizes, in elements, of one local chunk's buffers (the stage's input_size, output_size and
// activation_size).
struct chunk_sizes {
  std::size_t input = 0;
  std::size_t output = 0;
  std::size_t activation = 0;
};

enum class buffer_kind : std::uint8_t {
  input,           // a chunk's input activation
  output,          // a chunk's output activation on its way to another rank
  saved,           // what the stage saves from its forward for its backward
  output_grad,     // the gradient of the loss with respect to a chunk's output
  input_grad,      // the gradient with respect to a chunk's input, on its way to another rank
  scratch_output,  // an output nobody reads: the last stage's, a recomputed forward's
  scratch_saved,   // with re-materialization: what the first forward saves (then dropped)
};
inline constexpr int buffer_kind_count = 7;

constexpr std::string_view name(buffer_kind k) noexcept {
  constexpr std::string_view names[buffer_kind_count] = {
      "input", "output", "saved", "output_grad", "input_grad", "scratch_output", "scratch_saved"};
  return names[static_cast<int>(k)];
}

// A buffer in the arena: elements [offset, offset + size).
struct buffer_ref {
  std::size_t offset = 0;
  std::size_t size = 0;
};

// `slots` buffers of `size` elements, from `offset` in the arena.
struct buffer_pool {
  buffer_kind kind = buffer_kind::input;
  int chunk = 0;
  std::size_t size = 0;
  int slots = 0;
  std::size_t offset = 0;
};

enum class instruction_kind : std::uint8_t {
  forward,
  backward_input,
  backward_weight,
  backward,        // combined
  exchange,        // one step of sends and receives, posted together
  embed_forward,   // IF: the vocabulary-parallel input embedding (a collective)
  vocab_s,         // S: the output layer's statistics pass (collectives)
  vocab_t,         // T: the output layer's gradient pass (collectives)
  embed_backward,  // IB: the embedding's backward (a collective)
};

struct instruction {
  instruction_kind kind = instruction_kind::forward;
  bool first = false;      // virtual stage 0: the forward loads its input from the user's data
  bool last = false;       // the last virtual stage
  bool recompute = false;  // B/BW: re-run the forward first (re-materialization)
  std::int32_t chunk = 0;
  std::int32_t stage = 0;
  std::int32_t microbatch = 0;
  std::uint32_t first_transfer = 0;  // exchange: transfers [first_transfer, + transfer_count)
  std::uint32_t transfer_count = 0;
  std::int32_t slot = 0;  // S, T: the vocabulary state of the microbatch
  // output: B/BW's recompute target, IF's result; input: S's X; input_grad: IB's gradient
  buffer_ref input, output, saved, output_grad, input_grad;
};

struct transfer {
  bool send = false;
  int peer = -1;
  int tag = 0;
  buffer_ref buffer;
};

struct program {
  int rank = 0;
  schedule::shape shp;
  std::vector<instruction> code;
  std::vector<transfer> transfers;
  std::vector<buffer_pool> pools;  // only the pools in use
  std::size_t arena_size = 0;      // elements
  int vocab_slots = 0;             // microbatches in flight between S and T (vocabulary plans)
  std::size_t compute_actions = 0;
  std::size_t communication_actions = 0;

  // Slots of the pool (kind, chunk); 0 when it is not in use.
  int slots(buffer_kind k, int chunk) const noexcept {
    for (const auto& p : pools)
      if (p.kind == k && p.chunk == chunk) return p.slots;
    return 0;
  }
  std::size_t elements(buffer_kind k) const noexcept {
    std::size_t n = 0;
    for (const auto& p : pools)
      if (p.kind == k) n += p.size * static_cast<std::size_t>(p.slots);
    return n;
  }
};

// The tag of the message that carries the output (gradient = false) or the input gradient
// (gradient = true) of virtual stage `stage` for `microbatch`: unique per value within a step,
// below 2 * 2^22 (shapes are limited to stages * chunks * microbatches < 2^22), and so below
// comm::collective_tag.
constexpr int message_tag(const schedule::shape& s, bool gradient, int stage,
                          int microbatch) noexcept {
  return ((gradient ? s.virtual_stages() : 0) + stage) * s.microbatches + microbatch;
}

namespace detail_program {
// The values with lifetimes; the scratch kinds have one slot each and no lifetime.
inline constexpr int tracked_kinds = 5;
}  // namespace detail_program

// Compiles rank `rank` of the lowered plan `p` (sizes[c]: local chunk c). Throws pipit::error
// when the plan is not lowered, uses a value before it is made, makes one twice, or hands a
// buffer between two local chunks whose sizes disagree.
inline program compile(const schedule::plan& p, int rank, std::span<const chunk_sizes> sizes,
                       bool rematerialize) {
  using schedule::op;
  if (!p.lowered) fail("pipit::runtime: compile() needs a lowered plan (schedule::lower)");
  if (rank < 0 || rank >= p.rank_count())
    fail("pipit::runtime: rank ", rank, " outside the plan's ", p.rank_count(), " ranks");
  const int v = p.shp.chunks, m = p.shp.microbatches, last_stage = p.shp.virtual_stages() - 1;
  if (static_cast<int>(sizes.size()) != v)
    fail("pipit::runtime: compile() got sizes for ", sizes.size(), " chunks, the plan has ", v);

  program out;
  out.rank = rank;
  out.shp = p.shp;
  const auto acts = p.for_rank(rank);
  const auto steps = schedule::steps_of(acts);
  const int step_count = static_cast<int>(steps.size());

  constexpr int tracked = detail_program::tracked_kinds;
  const auto vid = [&](buffer_kind k, int chunk, int mb) {
    return (static_cast<std::size_t>(k) * static_cast<std::size_t>(v) +
            static_cast<std::size_t>(chunk)) *
               static_cast<std::size_t>(m) +
           static_cast<std::size_t>(mb);
  };
  const std::size_t values =
      static_cast<std::size_t>(tracked) * static_cast<std::size_t>(v) * static_cast<std::size_t>(m);
  std::vector<int> def(values, -1), last(values, -1);
  const auto chunk_of = [&](int stage) { return schedule::chunk_of(p.place, p.shp, stage); };
  const auto here = [&](int stage) { return p.rank_of(stage) == rank; };
  const auto describe = [&](buffer_kind k, int chunk, int mb) {
    return detail::concat(name(k), " of chunk ", chunk, " (virtual stage ",
                          schedule::stage_of(p.place, p.shp, rank, chunk), "), microbatch ", mb);
  };
  const auto define = [&](buffer_kind k, int chunk, int mb, int t) {
    const std::size_t id = vid(k, chunk, mb);
    if (def[id] >= 0)
      fail("pipit::runtime: rank ", rank, " produces the ", describe(k, chunk, mb), " twice");
    def[id] = t;
    last[id] = t;
  };
  const auto use = [&](buffer_kind k, int chunk, int mb, int t) {
    const std::size_t id = vid(k, chunk, mb);
    if (def[id] < 0)
      fail("pipit::runtime: rank ", rank, " uses the ", describe(k, chunk, mb),
           " before it is produced (step ", t, ")");
    last[id] = std::max(last[id], t);
  };
  // scratch_use[c]: chunk c needs a scratch output; scratch_use[v + c]: a scratch saved.
  std::vector<unsigned char> scratch_use(2 * static_cast<std::size_t>(v), 0);
  const bool vp = p.vocab != schedule::vocab_passes::none;
  const bool one_barrier = p.vocab == schedule::vocab_passes::one_barrier;
  const int first_chunk = here(0) ? chunk_of(0) : -1;
  const int last_chunk = here(last_stage) ? chunk_of(last_stage) : -1;
  // Vocabulary states: slot per microbatch, given at S and taken back at T.
  std::vector<int> vocab_slot(static_cast<std::size_t>(m), -1), free_vocab_slots;

  // Pass 1: lifetimes.
  for (int t = 0; t < step_count; ++t) {
    const auto& st = steps[static_cast<std::size_t>(t)];
    for (std::size_t i = st.begin; i < st.end; ++i) {
      const schedule::action& a = acts[i];
      const int s = a.stage, mb = a.microbatch, c = chunk_of(s);
      switch (a.kind) {
        case op::forward:
          if (s == 0 && !vp)
            define(buffer_kind::input, c, mb, t);
          else
            use(buffer_kind::input, c, mb, t);
          if (s == last_stage && vp)
            define(buffer_kind::output, c, mb, t);
          else if (s == last_stage)
            scratch_use[static_cast<std::size_t>(c)] = 1;
          else if (here(s + 1))
            define(buffer_kind::input, chunk_of(s + 1), mb, t);
          else
            define(buffer_kind::output, c, mb, t);
          if (rematerialize)
            scratch_use[static_cast<std::size_t>(v + c)] = 1;
          else
            define(buffer_kind::saved, c, mb, t);
          break;
        case op::backward_input:
        case op::backward:
          use(buffer_kind::input, c, mb, t);
          if (rematerialize) {
            define(buffer_kind::saved, c, mb, t);
            scratch_use[static_cast<std::size_t>(c)] = 1;
          } else {
            use(buffer_kind::saved, c, mb, t);
          }
          if (s < last_stage || vp) use(buffer_kind::output_grad, c, mb, t);
          if (s > 0) {
            if (here(s - 1))
              define(buffer_kind::output_grad, chunk_of(s - 1), mb, t);
            else
              define(buffer_kind::input_grad, c, mb, t);
          } else if (vp) {
            define(buffer_kind::input_grad, c, mb, t);
          }
          break;
        case op::backward_weight:
          use(buffer_kind::input, c, mb, t);
          use(buffer_kind::saved, c, mb, t);
          if (s < last_stage || vp) use(buffer_kind::output_grad, c, mb, t);
          break;
        case op::embed_forward:
          if (first_chunk >= 0) define(buffer_kind::input, first_chunk, mb, t);
          break;
        case op::embed_backward:
          if (first_chunk >= 0) use(buffer_kind::input_grad, first_chunk, mb, t);
          break;
        case op::vocab_s: {
          if (last_chunk >= 0) {
            use(buffer_kind::output, last_chunk, mb, t);
            if (one_barrier) define(buffer_kind::output_grad, last_chunk, mb, t);
          }
          int& sl = vocab_slot[static_cast<std::size_t>(mb)];
          if (sl >= 0) fail("pipit::runtime: rank ", rank, " runs S twice for microbatch ", mb);
          if (free_vocab_slots.empty()) {
            sl = out.vocab_slots++;
          } else {
            sl = free_vocab_slots.back();
            free_vocab_slots.pop_back();
          }
          break;
        }
        case op::vocab_t: {
          if (last_chunk >= 0 && !one_barrier) define(buffer_kind::output_grad, last_chunk, mb, t);
          const int sl = vocab_slot[static_cast<std::size_t>(mb)];
          if (sl < 0) fail("pipit::runtime: rank ", rank, " runs T before S for microbatch ", mb);
          free_vocab_slots.push_back(sl);
          break;
        }
        case op::send_forward:
          use(buffer_kind::output, c, mb, t);
          break;
        case op::recv_forward:
          define(buffer_kind::input, c, mb, t);
          break;
        case op::send_backward:
          use(buffer_kind::input_grad, c, mb, t);
          break;
        case op::recv_backward:
          define(buffer_kind::output_grad, c, mb, t);
          break;
        default:
          fail("pipit::runtime: rank ", rank, " cannot execute action ", schedule::to_string(a),
               " (collective actions are not placed by pipit's schedules)");
      }
    }
  }

  // Local hand-overs need equal sizes on both sides.
  for (int c = 0; c < v; ++c) {
    const int s = schedule::stage_of(p.place, p.shp, rank, c);
    if (s < last_stage && here(s + 1)) {
      const int n = chunk_of(s + 1);
      if (sizes[static_cast<std::size_t>(c)].output != sizes[static_cast<std::size_t>(n)].input)
        fail("pipit::runtime: rank ", rank, ": chunk ", c, " (virtual stage ", s,
             ") has output_size ", sizes[static_cast<std::size_t>(c)].output, " but chunk ", n,
             " (virtual stage ", s + 1, ") has input_size ",
             sizes[static_cast<std::size_t>(n)].input);
    }
  }

  // Pass 2: slots, by greedy interval colouring per (kind, chunk) in step order.
  std::vector<std::size_t> born_count(static_cast<std::size_t>(step_count) + 1, 0),
      dies_count(static_cast<std::size_t>(step_count) + 1, 0);
  for (std::size_t id = 0; id < values; ++id)
    if (def[id] >= 0) {
      ++born_count[static_cast<std::size_t>(def[id]) + 1];
      ++dies_count[static_cast<std::size_t>(last[id]) + 1];
    }
  for (std::size_t t = 1; t < born_count.size(); ++t) {
    born_count[t] += born_count[t - 1];
    dies_count[t] += dies_count[t - 1];
  }
  std::vector<std::size_t> born(born_count.back()), dies(dies_count.back());
  {
    std::vector<std::size_t> b = born_count, d = dies_count;
    for (std::size_t id = 0; id < values; ++id)
      if (def[id] >= 0) {
        born[b[static_cast<std::size_t>(def[id])]++] = id;
        dies[d[static_cast<std::size_t>(last[id])]++] = id;
      }
  }
  const std::size_t pool_count = static_cast<std::size_t>(tracked) * static_cast<std::size_t>(v);
  std::vector<int> slot(values, -1), high(pool_count, 0);
  std::vector<std::vector<int>> free_slots(pool_count);
  const auto pool_of = [&](std::size_t id) { return id / static_cast<std::size_t>(m); };
  for (int t = 0; t < step_count; ++t) {
    const auto tu = static_cast<std::size_t>(t);
    for (std::size_t k = born_count[tu]; k < born_count[tu + 1]; ++k) {
      const std::size_t id = born[k], pl = pool_of(id);
      if (free_slots[pl].empty()) {
        slot[id] = high[pl]++;
      } else {
        slot[id] = free_slots[pl].back();
        free_slots[pl].pop_back();
      }
    }
    for (std::size_t k = dies_count[tu]; k < dies_count[tu + 1]; ++k) {
      const std::size_t id = dies[k];
      free_slots[pool_of(id)].push_back(slot[id]);
    }
  }

  // Pass 3: the arena layout.
  const auto size_of = [&](buffer_kind k, int c) -> std::size_t {
    const chunk_sizes& z = sizes[static_cast<std::size_t>(c)];
    switch (k) {
      case buffer_kind::input:
      case buffer_kind::input_grad:
        return z.input;
      case buffer_kind::output:
      case buffer_kind::output_grad:
      case buffer_kind::scratch_output:
        return z.output;
      default:
        return z.activation;
    }
  };
  std::vector<std::size_t> pool_offset(pool_count + 2 * static_cast<std::size_t>(v), 0);
  for (int k = 0; k < buffer_kind_count; ++k)
    for (int c = 0; c < v; ++c) {
      const auto kind = static_cast<buffer_kind>(k);
      int n = 0;
      std::size_t index = 0;
      if (k < tracked) {
        index =
            static_cast<std::size_t>(k) * static_cast<std::size_t>(v) + static_cast<std::size_t>(c);
        n = high[index];
      } else {
        index = pool_count + static_cast<std::size_t>(k - tracked) * static_cast<std::size_t>(v) +
                static_cast<std::size_t>(c);
        n = scratch_use[static_cast<std::size_t>(k - tracked) * static_cast<std::size_t>(v) +
                        static_cast<std::size_t>(c)]
                ? 1
                : 0;
      }
      if (n == 0) continue;
      pool_offset[index] = out.arena_size;
      out.pools.push_back({kind, c, size_of(kind, c), n, out.arena_size});
      out.arena_size += size_of(kind, c) * static_cast<std::size_t>(n);
    }
  const auto ref = [&](buffer_kind k, int c, int mb) -> buffer_ref {
    const std::size_t id = vid(k, c, mb);
    return {pool_offset[pool_of(id)] + static_cast<std::size_t>(slot[id]) * size_of(k, c),
            size_of(k, c)};
  };
  const auto scratch = [&](buffer_kind k, int c) -> buffer_ref {
    return {pool_offset[pool_count +
                        static_cast<std::size_t>(static_cast<int>(k) - tracked) *
                            static_cast<std::size_t>(v) +
                        static_cast<std::size_t>(c)],
            size_of(k, c)};
  };

  // Pass 4: the instructions.
  out.code.reserve(steps.size());
  for (const auto& st : steps) {
    instruction in;
    if (st.communication) {
      in.kind = instruction_kind::exchange;
      in.first_transfer = static_cast<std::uint32_t>(out.transfers.size());
      for (std::size_t i = st.begin; i < st.end; ++i) {
        const schedule::action& a = acts[i];
        const int s = a.stage, mb = a.microbatch, c = chunk_of(s);
        transfer tr;
        tr.peer = a.peer;
        switch (a.kind) {
          case op::send_forward:
            tr.send = true;
            tr.tag = message_tag(p.shp, false, s, mb);
            tr.buffer = ref(buffer_kind::output, c, mb);
            if (tr.peer < 0) tr.peer = p.rank_of(s + 1);
            break;
          case op::recv_forward:
            tr.tag = message_tag(p.shp, false, s - 1, mb);
            tr.buffer = ref(buffer_kind::input, c, mb);
            if (tr.peer < 0) tr.peer = p.rank_of(s - 1);
            break;
          case op::send_backward:
            tr.send = true;
            tr.tag = message_tag(p.shp, true, s, mb);
            tr.buffer = ref(buffer_kind::input_grad, c, mb);
            if (tr.peer < 0) tr.peer = p.rank_of(s - 1);
            break;
          default:  // recv_backward
            tr.tag = message_tag(p.shp, true, s + 1, mb);
            tr.buffer = ref(buffer_kind::output_grad, c, mb);
            if (tr.peer < 0) tr.peer = p.rank_of(s + 1);
            break;
        }
        out.transfers.push_back(tr);
      }
      in.transfer_count = static_cast<std::uint32_t>(out.transfers.size() - in.first_transfer);
      out.communication_actions += in.transfer_count;
      out.code.push_back(in);
      continue;
    }
    const schedule::action& a = acts[st.begin];
    const int s = a.stage, mb = a.microbatch, c = chunk_of(s);
    in.chunk = c;
    in.stage = s;
    in.microbatch = mb;
    if (schedule::is_vocabulary(a.kind)) {
      in.slot = vocab_slot[static_cast<std::size_t>(mb)];
      switch (a.kind) {
        case op::embed_forward:
          in.kind = instruction_kind::embed_forward;
          if (first_chunk >= 0) in.output = ref(buffer_kind::input, first_chunk, mb);
          break;
        case op::embed_backward:
          in.kind = instruction_kind::embed_backward;
          if (first_chunk >= 0) in.input_grad = ref(buffer_kind::input_grad, first_chunk, mb);
          break;
        case op::vocab_s:
          in.kind = instruction_kind::vocab_s;
          if (last_chunk >= 0) {
            in.input = ref(buffer_kind::output, last_chunk, mb);
            if (one_barrier) in.output_grad = ref(buffer_kind::output_grad, last_chunk, mb);
          }
          break;
        default:  // vocab_t
          in.kind = instruction_kind::vocab_t;
          if (last_chunk >= 0 && !one_barrier)
            in.output_grad = ref(buffer_kind::output_grad, last_chunk, mb);
          break;
      }
      ++out.compute_actions;
      out.code.push_back(in);
      continue;
    }
    in.first = s == 0;
    in.last = s == last_stage;
    in.input = ref(buffer_kind::input, c, mb);
    switch (a.kind) {
      case op::forward:
        in.kind = instruction_kind::forward;
        in.output = s == last_stage ? (vp ? ref(buffer_kind::output, c, mb)
                                          : scratch(buffer_kind::scratch_output, c))
                    : here(s + 1)   ? ref(buffer_kind::input, chunk_of(s + 1), mb)
                                    : ref(buffer_kind::output, c, mb);
        in.saved =
            rematerialize ? scratch(buffer_kind::scratch_saved, c) : ref(buffer_kind::saved, c, mb);
        break;
      case op::backward_input:
      case op::backward:
        in.kind =
            a.kind == op::backward ? instruction_kind::backward : instruction_kind::backward_input;
        in.recompute = rematerialize;
        if (rematerialize) in.output = scratch(buffer_kind::scratch_output, c);
        in.saved = ref(buffer_kind::saved, c, mb);
        if (s < last_stage || vp) in.output_grad = ref(buffer_kind::output_grad, c, mb);
        if (s > 0)
          in.input_grad = here(s - 1) ? ref(buffer_kind::output_grad, chunk_of(s - 1), mb)
                                      : ref(buffer_kind::input_grad, c, mb);
        else if (vp)
          in.input_grad = ref(buffer_kind::input_grad, c, mb);
        break;
      default:  // backward_weight
        in.kind = instruction_kind::backward_weight;
        in.saved = ref(buffer_kind::saved, c, mb);
        if (s < last_stage || vp) in.output_grad = ref(buffer_kind::output_grad, c, mb);
        break;
    }
    ++out.compute_actions;
    out.code.push_back(in);
  }
  return out;
}

}  // namespace pipit::runtime
