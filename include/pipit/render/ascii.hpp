#pragma once
// ascii_timeline: a simulated plan as text, one row per rank, for terminals, logs and test
// failure messages.
//
//   1f1b {stages=2, microbatches=2, chunks=1}  makespan 9  bubble 33.3%  1 column = 0.5
//   rank 0 |F0F1....X0--..X1--|
//   rank 1 |..F0X0--F1X1--....|
//   time    +---------+-------
//           0         5
//   legend: F = forward, X = backward (input and weight gradients together), . = idle
//           F3: the pass of microbatch 3; the number is shown when it fits, '-' continues a pass
//
// Column c shows the pass running at time (c + 1/2) * time_per_column, so with durations that
// are multiples of time_per_column every '.' is exactly a stretch where the rank is idle.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/render/common.hpp"
#include "pipit/schedule/action.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/sim/simulate.hpp"

namespace pipit::render {

namespace detail {

// One letter per compute kind; the combined backward is 'X' so that it never reads as a B.
constexpr char ascii_letter(schedule::op o) noexcept {
  constexpr std::array<char, 8> letters = {'F', 'B', 'W', 'X', 'S', 'T', 'E', 'G'};
  return schedule::is_compute(o) ? letters[static_cast<std::size_t>(o)] : '?';
}

constexpr char lower(char c) noexcept {
  return c >= 'A' && c <= 'Z' ? char(c - 'A' + 'a') : c;
}

inline int decimal_digits(int v) {
  int n = 1;
  while (v >= 10) v /= 10, ++n;
  return n;
}

// The widest column width that keeps the chart within `budget` columns: a fraction of the
// shortest pass, so that the shortest passes are wide enough for their label ("F12") when room
// allows; otherwise the makespan spread over the budget, rounded up to three significant digits
// (every pass still gets about its share of columns).
inline double auto_time_per_column(const sim::result& r, const schedule::plan& p, int budget) {
  if (!(r.makespan > 0)) return 1;
  double shortest = std::numeric_limits<double>::infinity();
  for (const auto& row : r.timeline)
    for (const auto& t : row)
      if (t.end - t.start > 0) shortest = std::min(shortest, t.end - t.start);
  if (std::isfinite(shortest)) {
    const int label = 1 + decimal_digits(std::max(0, p.shp.microbatches - 1));
    for (int k = label; k >= 1; --k)
      if (r.makespan * k / shortest <= budget * (1 + 1e-9)) return shortest / k;
  }
  // Dividing by an exact power of ten keeps "1.06" from printing as "1.0600000000000001".
  const double x = r.makespan / budget, e = std::floor(std::log10(x)) - 2;
  if (e < 0) {
    const double scale = std::pow(10.0, -e);
    return std::ceil(x * scale - 1e-9) / scale;
  }
  const double unit = std::pow(10.0, e);
  return std::ceil(x / unit - 1e-9) * unit;
}

}  // namespace detail

// time_per_column: time units per character column; 0 picks one so that the widest row fits
// about 120 characters. Throws pipit::error when the result is not the plan's or
// time_per_column is negative, not finite, or so small the chart would exceed 10^6 columns.
inline std::string ascii_timeline(const sim::result& r, const schedule::plan& p,
                                  double time_per_column = 0) {
  detail::require_matches("ascii_timeline", r, p);
  if (!std::isfinite(time_per_column) || time_per_column < 0)
    fail("pipit: ascii_timeline(): time_per_column must be finite and >= 0 (0: automatic), got ",
         time_per_column);
  const int ranks = p.rank_count();
  const int label_width = 5 + detail::decimal_digits(std::max(0, ranks - 1));  // "rank 12"
  const int prefix = label_width + 2;                                          // "rank 12 |"
  const double tpc =
      time_per_column > 0 ? time_per_column : detail::auto_time_per_column(r, p, 120 - prefix - 1);
  const double span = r.makespan > 0 ? r.makespan / tpc : 0;
  if (span > 1e6)
    fail("pipit: ascii_timeline(): makespan ", r.makespan, " at ", tpc,
         " per column needs more than 10^6 columns");
  // A makespan that is a whole number of columns up to rounding error takes exactly that many.
  const auto columns = static_cast<std::size_t>(std::max(0.0, std::ceil(span - 1e-9)));
  const auto column_at = [&](double t) {  // the column boundary nearest to time t
    return static_cast<std::size_t>(
        std::clamp(std::floor(t / tpc + 0.5), 0.0, static_cast<double>(columns)));
  };

  std::array<bool, 8> present{};
  std::string out = detail::summary(r, p);
  out += "  1 column = " + detail::format_shortest(tpc) + "\n";
  for (int rank = 0; rank < ranks; ++rank) {
    std::string row(columns, '.');
    for (const auto& t : r.timeline[static_cast<std::size_t>(rank)]) {
      if (!schedule::is_compute(t.act.kind)) continue;
      present[static_cast<std::size_t>(t.act.kind)] = true;
      const bool lower_case = detail::chunk_of(p, t.act) % 2 == 1;
      char letter = detail::ascii_letter(t.act.kind);
      if (lower_case) letter = detail::lower(letter);
      std::size_t b = column_at(t.start), e = column_at(t.end);
      if (e <= b) {
        // Narrower than a column: one letter in the column of its middle, if that one is free.
        if (columns == 0) continue;
        b = std::min(columns - 1, column_at((t.start + t.end) / 2 - tpc / 2));
        if (row[b] != '.') continue;
        e = b + 1;
      }
      std::string text(1, letter);
      if (const std::string mb = std::to_string(t.act.microbatch); 1 + mb.size() <= e - b)
        text += mb;
      for (std::size_t c = b; c < e; ++c) row[c] = c - b < text.size() ? text[c - b] : '-';
    }
    std::string label = "rank " + std::to_string(rank);
    label.resize(static_cast<std::size_t>(label_width), ' ');
    out += label + " |" + row + "|\n";
  }

  // Time axis: a '+' under the column where each tick time starts, its value below.
  const double tick = detail::nice_step(10 * tpc);
  std::string axis(columns, '-'), values;
  std::size_t free_from = 0;  // first position a value may take without touching the previous
  for (int i = 0;; ++i) {
    const double t = i * tick;
    const std::size_t c = column_at(t);
    if (t > r.makespan * (1 + 1e-12) || c >= columns) break;
    axis[c] = '+';
    if (c < free_from) continue;
    const std::string v = detail::format_number(t, 4);
    values.resize(c, ' ');
    values += v;
    free_from = values.size() + 1;
  }
  std::string time_label = "time";
  time_label.resize(static_cast<std::size_t>(prefix - 1), ' ');
  if (columns > 0) out += time_label + " " + axis + "\n";
  if (!values.empty()) out += std::string(static_cast<std::size_t>(prefix), ' ') + values + "\n";

  // Legend: the kinds that appear, then how to read a cell.
  out += "legend:";
  for (std::size_t k = 0; k < present.size(); ++k)
    if (present[k]) {
      const auto o = static_cast<schedule::op>(k);
      out += ' ';
      out += detail::ascii_letter(o);
      out += " = ";
      out += detail::describe(o);
      out += ',';
    }
  out += " . = idle\n";
  out +=
      "        F3: the pass of microbatch 3; the number is shown when it fits, '-' continues a "
      "pass\n";
  if (p.shp.chunks == 2)
    out += "        lower case (f, b, w, x): a pass of chunk 1; upper case: chunk 0\n";
  else if (p.shp.chunks > 2)
    out +=
        "        lower case (f, b, w, x): a pass of an odd chunk (1, 3, ...); upper case: even\n";
  return out;
}

}  // namespace pipit::render
