#pragma once
// The action vocabulary of a pipeline plan: one pass of one (virtual) stage on one microbatch,
// or a communication between ranks. Text form: kind, stage, '.', microbatch — "F3.1" is the
// forward of virtual stage 3 on microbatch 1; "SF3.1" sends its output to the rank of stage 4.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace pipit::schedule {

enum class op : std::uint8_t {
  forward,          // F : forward
  backward_input,   // B : backward for the input gradient (zero-bubble split)
  backward_weight,  // W : backward for the weight gradient (zero-bubble split)
  backward,         // BW: combined backward (B and W together)
  vocab_s,          // S : vocabulary-parallel output layer, forward statistics pass
  vocab_t,          // T : vocabulary-parallel output layer, gradient pass
  embed_forward,    // IF: vocabulary-parallel input embedding, forward
  embed_backward,   // IB: vocabulary-parallel input embedding, backward
  send_forward,     // SF: send stage s's output activation to the rank of stage s + 1
  recv_forward,     // RF: receive stage s's input activation from the rank of stage s - 1
  send_backward,    // SB: send stage s's input gradient to the rank of stage s - 1
  recv_backward,    // RB: receive stage s's output gradient from the rank of stage s + 1
  collective,       // C : a collective over the pipeline group (e.g. vocabulary statistics)
};

inline constexpr int op_count = 13;

// Short names, indexed by op; the text form of actions.
inline constexpr std::string_view op_names[op_count] = {"F",  "B",  "W",  "BW", "S",  "T", "IF",
                                                        "IB", "SF", "RF", "SB", "RB", "C"};

constexpr std::string_view name(op o) noexcept {
  return op_names[static_cast<int>(o)];
}

constexpr bool is_compute(op o) noexcept {
  return o <= op::embed_backward;
}
constexpr bool is_communication(op o) noexcept {
  return !is_compute(o);
}
constexpr bool is_send(op o) noexcept {
  return o == op::send_forward || o == op::send_backward;
}
constexpr bool is_recv(op o) noexcept {
  return o == op::recv_forward || o == op::recv_backward;
}
constexpr bool is_vocabulary(op o) noexcept {
  return o == op::vocab_s || o == op::vocab_t || o == op::embed_forward || o == op::embed_backward;
}
constexpr bool is_backward(op o) noexcept {
  return o == op::backward_input || o == op::backward || o == op::backward_weight;
}

struct action {
  op kind = op::forward;
  std::int32_t stage = 0;       // virtual stage: 0 .. stages * chunks - 1
  std::int32_t microbatch = 0;  // 0 .. microbatches - 1
  std::int32_t peer = -1;       // the other rank of a send or receive; -1 otherwise

  friend constexpr bool operator==(const action&, const action&) = default;
};

constexpr action make_action(op kind, int stage, int microbatch, int peer = -1) noexcept {
  return action{kind, stage, microbatch, peer};
}

// "F3.1", "BW0.7", "SF3.1" (the peer is not part of the text: the placement implies it).
inline std::string to_string(const action& a) {
  std::string s(name(a.kind));
  s += std::to_string(a.stage);
  s += '.';
  s += std::to_string(a.microbatch);
  return s;
}

// Parses the text form; nullopt when `text` is not an action.
constexpr std::optional<action> parse_action(std::string_view text) noexcept {
  // Longest name first so that "BW" is not read as "B" followed by garbage.
  int best = -1;
  for (int i = 0; i < op_count; ++i)
    if (text.starts_with(op_names[i]) && (best < 0 || op_names[i].size() > op_names[best].size()))
      best = i;
  if (best < 0) return std::nullopt;
  text.remove_prefix(op_names[best].size());
  auto read_int = [&](std::int32_t& out) {
    if (text.empty() || text.front() < '0' || text.front() > '9') return false;
    std::int64_t v = 0;
    while (!text.empty() && text.front() >= '0' && text.front() <= '9') {
      v = v * 10 + (text.front() - '0');
      if (v > 0x7fffffff) return false;
      text.remove_prefix(1);
    }
    out = static_cast<std::int32_t>(v);
    return true;
  };
  action a{static_cast<op>(best), 0, 0, -1};
  if (!read_int(a.stage)) return std::nullopt;
  if (text.empty() || text.front() != '.') return std::nullopt;
  text.remove_prefix(1);
  if (!read_int(a.microbatch) || !text.empty()) return std::nullopt;
  return a;
}

}  // namespace pipit::schedule
