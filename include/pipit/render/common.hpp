#pragma once
// What the renderers share: locale-independent number text, XML and JSON escaping, "nice" axis
// steps, the chunk of a pass, and the check that a simulation result belongs to its plan.

#include <charconv>
#include <cmath>
#include <cstddef>
#include <string>
#include <string_view>

#include "pipit/core/error.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/sim/simulate.hpp"

namespace pipit::render::detail {

// At most `decimals` digits after the point, trailing zeros dropped: 3 -> "3", 0.25 -> "0.25".
// std::to_chars ignores the global locale, so the decimal separator is always '.'. Non-finite
// values (which a valid simulation never yields) print as "0" so that JSON stays valid.
inline std::string format_number(double v, int decimals = 3) {
  if (!std::isfinite(v)) return "0";
  char buf[400];  // fixed notation of the largest double: 309 digits, the point, the decimals
  const auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed, decimals);
  if (res.ec != std::errc{}) return "0";
  std::string s(buf, res.ptr);
  if (s.find('.') != std::string::npos) {
    while (s.back() == '0') s.pop_back();
    if (s.back() == '.') s.pop_back();
  }
  if (s == "-0") s = "0";
  return s;
}

// The shortest text that reads back as exactly `v` ("0.5", "2.16", "1e-07"), for values a reader
// may want to recompute with.
inline std::string format_shortest(double v) {
  if (!std::isfinite(v)) return "0";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v);
  return res.ec == std::errc{} ? std::string(buf, res.ptr) : "0";
}

// Text content and attribute values. XML 1.0 forbids most control characters: they are dropped.
inline std::string xml_escape(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (const char c : in) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        if (static_cast<unsigned char>(c) >= 0x20 || c == '\t' || c == '\n' || c == '\r') out += c;
    }
  }
  return out;
}

// A JSON string literal, quotes included. Bytes >= 0x80 pass through (UTF-8 stays UTF-8).
inline std::string json_string(std::string_view in) {
  std::string out = "\"";
  for (const char c : in) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          static constexpr char hex[] = "0123456789abcdef";
          out += "\\u00";
          out += hex[(c >> 4) & 0xf];
          out += hex[c & 0xf];
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

// The smallest of 1, 2, 2.5, 5 times a power of ten that is >= x (x > 0): axis steps people
// can add up in their head.
inline double nice_step(double x) {
  if (!(x > 0) || !std::isfinite(x)) return 1;
  const double p = std::pow(10.0, std::floor(std::log10(x)));
  for (const double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * p >= x * (1 - 1e-12)) return m * p;
  return 10 * p;
}

// Legend text for a compute kind.
constexpr std::string_view describe(schedule::op o) noexcept {
  switch (o) {
    case schedule::op::forward:
      return "forward";
    case schedule::op::backward_input:
      return "backward (input gradient)";
    case schedule::op::backward_weight:
      return "backward (weight gradient)";
    case schedule::op::backward:
      return "backward (input and weight gradients together)";
    case schedule::op::vocab_s:
      return "vocabulary statistics";
    case schedule::op::vocab_t:
      return "vocabulary gradient";
    case schedule::op::embed_forward:
      return "embedding forward";
    case schedule::op::embed_backward:
      return "embedding backward";
    default:
      return "communication";
  }
}

inline int chunk_of(const schedule::plan& p, const schedule::action& a) {
  return schedule::chunk_of(p.place, p.shp, a.stage);
}

// "1f1b {stages=4, microbatches=8, chunks=1}  makespan 22  bubble 27.3%", with `sep` between
// the parts.
inline std::string summary(const sim::result& r, const schedule::plan& p,
                           std::string_view sep = "  ") {
  std::string s(p.schedule);
  s += ' ';
  s += schedule::to_string(p.shp);
  if (p.shp.chunks > 1) {
    s += " placement ";
    s += schedule::name(p.place);
  }
  s += sep;
  s += "makespan " + format_number(r.makespan);
  s += sep;
  s += "bubble " + format_number(r.bubble_fraction * 100, 1) + "%";
  return s;
}

// A result drawn against another plan would silently mislabel ranks: refuse it.
inline void require_matches(std::string_view who, const sim::result& r, const schedule::plan& p) {
  if (static_cast<int>(r.timeline.size()) != p.rank_count())
    fail("pipit: ", who, "(): the result has ", r.timeline.size(), " ranks but plan '", p.schedule,
         "' has ", p.rank_count());
}

}  // namespace pipit::render::detail
