// pipit-plan: see and compare pipeline schedules. Generates a plan, validates it (unlowered and
// lowered), simulates it under the given costs and prints a table, JSON, an ASCII timeline, an SVG
// diagram or a Chrome trace (open in Perfetto or chrome://tracing).
//
//   pipit-plan --schedule 1f1b --stages 4 --microbatches 8
//   pipit-plan --schedule all --stages 8 --microbatches 32 --cost f=1,b=1,w=1
//   pipit-plan --schedule v-half --stages 4 --microbatches 12 --format svg --output v_half.svg
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "pipit/render/ascii.hpp"
#include "pipit/render/chrome_trace.hpp"
#include "pipit/render/svg.hpp"
#include "pipit/schedule/by_name.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/validate.hpp"
#include "pipit/sim/simulate.hpp"

namespace {

namespace ps = pipit::schedule;

// --cost "f=1,b=1,w=1,comm=0.1,free_at_b=0.5". Without w, b is the combined backward: split
// schedules then get B = W = b / 2, so every schedule does the same work.
pipit::sim::costs parse_costs(const std::string& text) {
  pipit::sim::costs c;
  bool have_w = false;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    const auto eq = item.find('=');
    if (eq == std::string::npos) pipit::fail("--cost: '", item, "' is not key=value");
    const std::string key = item.substr(0, eq), val = item.substr(eq + 1);
    double v = 0;
    const auto [ptr, ec] = std::from_chars(val.data(), val.data() + val.size(), v);
    if (ec != std::errc{} || ptr != val.data() + val.size() || v < 0)
      pipit::fail("--cost: '", val, "' is not a non-negative number (key ", key, ")");
    if (key == "f") {
      c.f = v;
    } else if (key == "b") {
      c.b = v;
    } else if (key == "w") {
      c.w = v;
      have_w = true;
    } else if (key == "comm") {
      c.comm = v;
    } else if (key == "free_at_b") {
      if (v > 1) pipit::fail("--cost: free_at_b must be in [0, 1], got ", v);
      c.free_at_b = v;
    } else {
      pipit::fail("--cost: unknown key '", key, "' (known: f, b, w, comm, free_at_b)");
    }
  }
  if (!have_w) {
    c.w = c.b / 2;
    c.b = c.b / 2;
  }
  return c;
}

struct report {
  ps::plan plan;
  ps::plan lowered;
  pipit::sim::result sim;
};

report run(const std::string& schedule, const ps::shape& s, const pipit::sim::costs& c) {
  report r{ps::make_plan_by_name(schedule, s), {}, {}};
  if (const auto v = ps::validate(r.plan); !v.ok) pipit::fail(schedule, ": ", ps::to_string(v));
  r.lowered = ps::lower(r.plan);
  if (const auto v = ps::validate(r.lowered); !v.ok)
    pipit::fail(schedule, " (lowered): ", ps::to_string(v));
  r.sim = pipit::sim::simulate(r.plan, c);
  return r;
}

double peak_max(const pipit::sim::result& s) {
  double p = 0;
  for (const auto& r : s.ranks) p = std::max(p, r.peak_activations);
  return p;
}

int messages(const ps::plan& lowered) {
  int n = 0;
  for (const auto& acts : lowered.ranks)
    for (const auto& a : acts) n += ps::is_send(a.kind) ? 1 : 0;
  return n;
}

nlohmann::json to_json(const report& r, bool with_lowered) {
  nlohmann::json j;
  j["schedule"] = std::string(r.plan.schedule);
  j["stages"] = r.plan.shp.stages;
  j["microbatches"] = r.plan.shp.microbatches;
  j["chunks"] = r.plan.shp.chunks;
  j["placement"] = std::string(ps::name(r.plan.place));
  j["makespan"] = r.sim.makespan;
  j["bubble_fraction"] = r.sim.bubble_fraction;
  j["peak_activations"] = peak_max(r.sim);
  j["messages"] = messages(r.lowered);
  j["ranks"] = nlohmann::json::array();
  for (int k = 0; k < r.plan.rank_count(); ++k) {
    const auto& st = r.sim.ranks[static_cast<std::size_t>(k)];
    nlohmann::json rk;
    rk["rank"] = k;
    rk["busy"] = st.busy;
    rk["idle"] = st.idle;
    rk["bubble_fraction"] = st.bubble_fraction;
    rk["peak_activations"] = st.peak_activations;
    auto& acts = rk["actions"] = nlohmann::json::array();
    for (const auto& a : r.plan.for_rank(k)) acts.push_back(ps::to_string(a));
    if (with_lowered) {
      auto& low = rk["lowered_actions"] = nlohmann::json::array();
      for (const auto& a : r.lowered.for_rank(k)) low.push_back(ps::to_string(a));
    }
    j["ranks"].push_back(std::move(rk));
  }
  return j;
}

std::string fmt(double v, int prec = 3) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, v);
  return buf;
}

std::string table(const report& r) {
  std::ostringstream os;
  os << "schedule " << r.plan.schedule << ": stages " << r.plan.shp.stages << ", microbatches "
     << r.plan.shp.microbatches << ", chunks " << r.plan.shp.chunks << " ("
     << ps::name(r.plan.place) << " placement)\n"
     << "makespan " << fmt(r.sim.makespan) << ", bubble fraction " << fmt(r.sim.bubble_fraction)
     << ", point-to-point messages " << messages(r.lowered) << "\n\n";
  char line[160];
  std::snprintf(line, sizeof line, "%6s %12s %12s %8s %18s\n", "rank", "busy", "idle", "bubble",
                "peak activations");
  os << line;
  for (int k = 0; k < r.plan.rank_count(); ++k) {
    const auto& st = r.sim.ranks[static_cast<std::size_t>(k)];
    std::snprintf(line, sizeof line, "%6d %12.3f %12.3f %8.3f %18.3f\n", k, st.busy, st.idle,
                  st.bubble_fraction, st.peak_activations);
    os << line;
  }
  return os.str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"pipit-plan: generate, validate, simulate and draw pipeline schedules"};
  std::string schedule = "1f1b", format = "table", output, cost_text = "f=1,b=2";
  int stages = 4, microbatches = 8;
  std::optional<int> chunks;
  bool with_lowered = false;
  std::vector<std::string> schedule_choices(std::begin(ps::all_policy_names),
                                            std::end(ps::all_policy_names));
  schedule_choices.push_back("all");
  app.add_option("--schedule", schedule, "schedule, or 'all' to compare every schedule")
      ->check(CLI::IsMember(schedule_choices));
  app.add_option("--stages,-p", stages, "pipeline ranks")->check(CLI::PositiveNumber);
  app.add_option("--microbatches,-m", microbatches, "microbatches")->check(CLI::PositiveNumber);
  app.add_option("--chunks,-v", chunks,
                 "model chunks per rank (default: 2 for interleaved and V schedules, else 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--cost", cost_text,
                 "pass durations for one rank's whole share: f=,b=[,w=][,comm=][,free_at_b=]; "
                 "without w, b is the combined backward");
  app.add_option("--format", format, "output format")
      ->check(CLI::IsMember({"table", "json", "ascii", "svg", "chrome"}));
  app.add_option("--output,-o", output, "write to this file instead of standard output");
  app.add_flag("--lowered", with_lowered, "include the lowered actions (with send/recv) in JSON");
  CLI11_PARSE(app, argc, argv);

  try {
    const pipit::sim::costs costs = parse_costs(cost_text);
    auto shape_for = [&](const std::string& name) {
      const bool multi = name == "interleaved" || ps::placement_of(name) == ps::placement::v_shape;
      return ps::shape{stages, microbatches, chunks.value_or(multi ? 2 : 1)};
    };
    std::string text;
    if (schedule == "all") {
      if (format != "table" && format != "json")
        pipit::fail("--schedule all prints a table or JSON (got --format ", format, ")");
      nlohmann::json all = nlohmann::json::array();
      std::ostringstream os;
      char line[200];
      std::snprintf(line, sizeof line, "%-12s %6s %10s %8s %10s %10s %9s\n", "schedule", "chunks",
                    "makespan", "bubble", "peak act.", "rank0 act.", "messages");
      os << "stages " << stages << ", microbatches " << microbatches << ", costs f=" << costs.f
         << " b=" << costs.b << " w=" << costs.w << " comm=" << costs.comm
         << " free_at_b=" << costs.free_at_b << "\n\n"
         << line;
      for (const auto name : ps::all_policy_names) {
        const std::string n(name);
        try {
          const report r = run(n, shape_for(n), costs);
          all.push_back(to_json(r, with_lowered));
          std::snprintf(line, sizeof line, "%-12s %6d %10.3f %8.3f %10.3f %10.3f %9d\n", n.c_str(),
                        r.plan.shp.chunks, r.sim.makespan, r.sim.bubble_fraction, peak_max(r.sim),
                        r.sim.ranks[0].peak_activations, messages(r.lowered));
          os << line;
        } catch (const pipit::error& e) {
          std::snprintf(line, sizeof line, "%-12s refused: ", n.c_str());
          os << line << e.what() << "\n";
        }
      }
      text = format == "json" ? all.dump(2) + "\n" : os.str();
    } else {
      const report r = run(schedule, shape_for(schedule), costs);
      if (format == "table") text = table(r);
      if (format == "json") text = to_json(r, with_lowered).dump(2) + "\n";
      if (format == "ascii") text = pipit::render::ascii_timeline(r.sim, r.plan);
      if (format == "svg") text = pipit::render::svg_timeline(r.sim, r.plan);
      if (format == "chrome") text = pipit::render::chrome_trace(r.sim, r.plan);
    }
    if (output.empty()) {
      std::cout << text;
    } else {
      std::ofstream out(output);
      if (!(out << text)) pipit::fail("cannot write ", output);
      std::cerr << "wrote " << output << "\n";
    }
  } catch (const pipit::error& e) {
    std::cerr << "pipit-plan: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
