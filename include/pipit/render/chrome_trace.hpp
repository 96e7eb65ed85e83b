#pragma once
// chrome_trace: a simulated plan as Chrome trace-event JSON (the "JSON Object Format"), which
// Perfetto (ui.perfetto.dev) and chrome://tracing open: one process, one thread per rank, one
// complete ("X") event per compute pass, so a simulated schedule can be laid next to a profile
// of the real run.
//
//   {"traceEvents":[
//   {"name":"process_name","ph":"M","pid":0,"tid":0,"args":{"name":"pipit 1f1b"}},
//   {"name":"thread_name","ph":"M","pid":0,"tid":0,"args":{"name":"rank 0"}},
//   {"name":"F0.0","cat":"F","ph":"X","ts":0,"dur":1000,"pid":0,"tid":0,
//    "args":{"stage":0,"microbatch":0,"chunk":0}},
//   ...],
//   "displayTimeUnit":"ms","otherData":{"schedule":"1f1b",...}}
//
// Times are microseconds with three decimals (nanoseconds), printed by std::to_chars, so no
// locale can turn the decimal point into a comma.

#include <cmath>
#include <cstddef>
#include <string>

#include "pipit/core/error.hpp"
#include "pipit/render/common.hpp"
#include "pipit/schedule/action.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/sim/simulate.hpp"

namespace pipit::render {

// us_per_unit: microseconds per unit of simulated time (1000: a unit is a millisecond).
// Throws pipit::error when the result is not the plan's or us_per_unit is not finite and > 0.
inline std::string chrome_trace(const sim::result& r, const schedule::plan& p,
                                double us_per_unit = 1000) {
  using detail::format_number;
  using detail::json_string;
  detail::require_matches("chrome_trace", r, p);
  if (!std::isfinite(us_per_unit) || !(us_per_unit > 0))
    fail("pipit: chrome_trace(): us_per_unit must be finite and > 0, got ", us_per_unit);

  std::string out = "{\"traceEvents\":[\n";
  bool first = true;
  auto event = [&](const std::string& e) {
    if (!first) out += ",\n";
    first = false;
    out += e;
  };
  event(R"({"name":"process_name","ph":"M","pid":0,"tid":0,"args":{"name":)" +
        json_string("pipit " + std::string(p.schedule)) + "}}");
  for (int rank = 0; rank < p.rank_count(); ++rank) {
    const std::string tid = std::to_string(rank);
    event(R"({"name":"thread_name","ph":"M","pid":0,"tid":)" + tid + R"(,"args":{"name":"rank )" +
          tid + "\"}}");
    // Perfetto orders threads by this index rather than by name ("rank 10" before "rank 2").
    event(R"({"name":"thread_sort_index","ph":"M","pid":0,"tid":)" + tid +
          R"(,"args":{"sort_index":)" + tid + "}}");
  }
  for (int rank = 0; rank < p.rank_count(); ++rank) {
    const std::string tid = std::to_string(rank);
    for (const auto& t : r.timeline[static_cast<std::size_t>(rank)]) {
      if (!schedule::is_compute(t.act.kind)) continue;
      event("{\"name\":" + json_string(schedule::to_string(t.act)) +
            ",\"cat\":" + json_string(schedule::name(t.act.kind)) +
            ",\"ph\":\"X\",\"ts\":" + format_number(t.start * us_per_unit) +
            ",\"dur\":" + format_number((t.end - t.start) * us_per_unit) +
            ",\"pid\":0,\"tid\":" + tid + ",\"args\":{\"stage\":" + std::to_string(t.act.stage) +
            ",\"microbatch\":" + std::to_string(t.act.microbatch) +
            ",\"chunk\":" + std::to_string(detail::chunk_of(p, t.act)) + "}}");
    }
  }
  out +=
      "\n],\n\"displayTimeUnit\":\"ms\",\n\"otherData\":{\"schedule\":" + json_string(p.schedule) +
      ",\"stages\":" + std::to_string(p.shp.stages) +
      ",\"microbatches\":" + std::to_string(p.shp.microbatches) +
      ",\"chunks\":" + std::to_string(p.shp.chunks) +
      ",\"placement\":" + json_string(schedule::name(p.place)) +
      ",\"makespan\":" + format_number(r.makespan, 6) +
      ",\"bubble_fraction\":" + format_number(r.bubble_fraction, 6) +
      ",\"us_per_unit\":" + format_number(us_per_unit, 6) + "}}\n";
  return out;
}

}  // namespace pipit::render
