// pipit-plan: see and compare pipeline schedules. Generates a plan, validates it (unlowered and
// lowered), simulates it under the given costs and prints a table, JSON, an ASCII timeline, an SVG
// diagram or a Chrome trace (open in Perfetto or chrome://tracing).
//
//   pipit-plan --schedule 1f1b --stages 4 --microbatches 8
//   pipit-plan --schedule all --stages 8 --microbatches 32 --cost f=1,b=1,w=1
//   pipit-plan --schedule v-half --stages 4 --microbatches 12 --format svg --output v_half.svg
//   pipit-plan --schedule 1f1b --stages 8 --microbatches 32 --vocab one-barrier
//   pipit-plan --schedule v-half --stages 8 --microbatches 32 --vocab two-barrier
//              --cost f=1,b=1,w=1,s=0.1,t=0.1,if=0.02,ib=0.02 --format svg --output vocab.svg
//
// Model mode (--model): a transformer, a partition of it over the pipeline, a hardware profile
// and the schedule give every rank's compute and idle time, peak memory by category, and the
// iteration time, tokens/s and MFU (pipit/sim/predict.hpp):
//
//   pipit-plan --model --layers 32 --hidden 3072 --heads 24 --seq 2048 --vocab-size 256000
//       --stages 8 --microbatches 128 --hardware a100-80gb --schedule 1f1b --partition all
//
// Search mode (--search): the 3D planner (pipit/sim/search.hpp) — the model flags plus a cluster
// and a global batch; prints the fastest configurations that fit and why the others were not
// chosen (docs/planner.md):
//
//   pipit-plan --search --layers 96 --hidden 12288 --heads 96 --seq 2048 --vocab-size 51200
//       --nodes 12 --gpus-per-node 8 --global-batch 1536 --hardware a100-80gb --top 5
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

#include "pipit/cost/balanced_partition.hpp"
#include "pipit/cost/flops.hpp"
#include "pipit/cost/hardware.hpp"
#include "pipit/cost/transformer.hpp"
#include "pipit/cost/vocab_algorithm.hpp"
#include "pipit/partition/layout.hpp"
#include "pipit/partition/naive.hpp"
#include "pipit/partition/vocab_parallel.hpp"
#include "pipit/render/ascii.hpp"
#include "pipit/render/chrome_trace.hpp"
#include "pipit/render/svg.hpp"
#include "pipit/schedule/by_name.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/validate.hpp"
#include "pipit/schedule/vocab_passes.hpp"
#include "pipit/sim/predict.hpp"
#include "pipit/sim/search.hpp"
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
    } else if (key == "s") {
      c.vocab_s = v;
    } else if (key == "t") {
      c.vocab_t = v;
    } else if (key == "if") {
      c.embed_f = v;
    } else if (key == "ib") {
      c.embed_b = v;
    } else if (key == "free_at_b") {
      if (v > 1) pipit::fail("--cost: free_at_b must be in [0, 1], got ", v);
      c.free_at_b = v;
    } else {
      pipit::fail("--cost: unknown key '", key,
                  "' (known: f, b, w, comm, free_at_b, s, t, if, ib)");
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

// With vocabulary passes (--vocab) the lowered plan keeps S, T, IF, IB as collectives at one
// point of every rank's list (schedule/lower.hpp).
report run(const std::string& schedule, const ps::shape& s, const pipit::sim::costs& c,
           ps::vocab_passes vocab = ps::vocab_passes::none) {
  report r{vocab == ps::vocab_passes::none ? ps::make_plan_by_name(schedule, s)
                                           : ps::make_vocab_plan(schedule, s, vocab),
           {},
           {}};
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
  j["vocab_passes"] = std::string(ps::name(r.plan.vocab));
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
     << ", point-to-point messages " << messages(r.lowered) << "\n";
  if (r.plan.vocab != ps::vocab_passes::none)
    os << "vocabulary passes " << ps::name(r.plan.vocab)
       << ": S, T, IF, IB of every microbatch on every rank, each a collective\n";
  os << "\n";
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

// ---- model mode ---------------------------------------------------------------------------------

struct model_options {
  pipit::cost::transformer model;
  pipit::cost::hardware hw;
  std::string hardware_settings;  // --hardware-set, echoed in the header
  std::string schedule;
  int stages = 0, microbatches = 0, chunks = 1;
  std::string partition;  // naive, balanced, vocab-parallel, layout:..., all
  pipit::cost::vocab_algorithm algorithm = pipit::cost::vocab_algorithm::one_barrier;
};

struct model_run {
  std::string name;  // naive, balanced, vocab-parallel, layout
  pipit::partition::partition part;
  ps::plan plan;
  pipit::sim::prediction pred;
};

pipit::partition::partition make_partition(const std::string& kind, const model_options& o,
                                           const pipit::partition::pipeline& pl) {
  if (kind == "naive") return pipit::partition::naive(o.model.layers, pl);
  if (kind == "balanced") return pipit::cost::balanced_partition(o.model, o.hw, pl);
  if (kind == "vocab-parallel") return pipit::partition::vocab_parallel(o.model.layers, pl);
  if (kind.rfind("layout:", 0) == 0)
    return pipit::partition::layout(kind.substr(7), pl, o.model.layers);
  pipit::fail("--partition: unknown partition '", kind,
              "' (known: naive, balanced, vocab-parallel, layout:\"E t*4 | ... | t*4 L\", all)");
}

model_run run_model(const std::string& kind, const model_options& o) {
  pipit::cost::check(o.model);
  const ps::plan plan = ps::make_plan_by_name(o.schedule, {o.stages, o.microbatches, o.chunks});
  const pipit::partition::pipeline pl{o.stages, o.chunks, plan.place};
  model_run r{
      kind.rfind("layout:", 0) == 0 ? "layout" : kind, make_partition(kind, o, pl), plan, {}};
  r.pred = pipit::sim::predict(r.plan, r.part, o.model, o.hw, o.algorithm);
  return r;
}

constexpr double gib = double(1ull << 30);

std::string model_header(const model_options& o) {
  const auto& t = o.model;
  std::ostringstream os;
  os << "model: " << t.layers << " layers, hidden " << t.hidden << ", heads " << t.heads << " (kv "
     << t.kv() << "), ffn " << t.ffn_size() << (t.gated_mlp ? " gated" : "") << ", seq " << t.seq
     << ", vocab " << t.vocab << ", microbatch size " << t.microbatch_size
     << (t.recompute ? ", full recomputation" : "")
     << (t.flash_attention ? "" : ", no flash attention") << "\n"
     << "pipeline: " << o.schedule << ", " << o.stages << " ranks x " << o.chunks << " chunk"
     << (o.chunks > 1 ? "s" : "") << ", " << o.microbatches << " microbatches; hardware "
     << o.hw.name << (o.hardware_settings.empty() ? "" : " (" + o.hardware_settings + ")")
     << "; output layer = " << fmt(pipit::cost::output_layer_in_layers(t), 2)
     << " layers in FLOPs\n";
  return os.str();
}

std::string model_table(const model_run& r, const model_options& o) {
  const auto& pr = r.pred;
  std::ostringstream os;
  os << model_header(o) << "partition " << r.name;
  if (r.part.vocab_parallel)
    os << " (vocabulary layers sharded over all ranks, " << pipit::cost::name(o.algorithm) << ")";
  os << ": " << pipit::partition::to_layout(r.part) << "\n\n"
     << "iteration " << fmt(pr.iteration_time) << " s (pipeline " << fmt(pr.pipeline_time)
     << " s + optimizer step " << fmt(pr.optimizer_time) << " s), " << fmt(pr.tokens_per_second, 0)
     << " tokens/s, MFU " << fmt(100 * pr.mfu, 2) << "%, peak memory "
     << fmt(pr.max_peak_memory_bytes / gib, 2) << " GiB\n\n";
  char line[256];
  std::snprintf(line, sizeof line, "%4s  %-22s %9s %9s %8s %8s %8s %8s %8s %9s\n", "rank", "parts",
                "busy s", "idle s", "weights", "grads", "optim", "activ", "work", "peak GiB");
  os << line;
  for (std::size_t k = 0; k < pr.ranks.size(); ++k) {
    const auto& rk = pr.ranks[k];
    const auto& m = rk.memory;
    std::snprintf(
        line, sizeof line, "%4zu  %-22s %9.3f %9.3f %8.2f %8.2f %8.2f %8.2f %8.2f %9.2f%s\n", k,
        rk.parts.c_str(), rk.busy, rk.idle, m.parameters / gib, m.gradients / gib,
        m.optimizer / gib, m.activations / gib, m.workspace / gib, rk.peak_memory_bytes / gib,
        rk.peak_memory_bytes > o.hw.memory_capacity ? "  exceeds the device" : "");
    os << line;
  }
  return os.str();
}

nlohmann::json model_json(const model_run& r, const model_options& o) {
  const auto& pr = r.pred;
  const auto& t = o.model;
  nlohmann::json j;
  j["partition"] = r.name;
  j["layout"] = pipit::partition::to_layout(r.part);
  j["vocab_parallel"] = r.part.vocab_parallel;
  if (r.part.vocab_parallel) j["vocab_algorithm"] = std::string(pipit::cost::name(o.algorithm));
  j["schedule"] = std::string(r.plan.schedule);
  j["stages"] = o.stages;
  j["chunks"] = o.chunks;
  j["microbatches"] = o.microbatches;
  j["model"] = {{"layers", t.layers},  {"hidden", t.hidden},
                {"heads", t.heads},    {"kv_heads", t.kv()},
                {"ffn", t.ffn_size()}, {"seq", t.seq},
                {"vocab", t.vocab},    {"microbatch_size", t.microbatch_size}};
  j["hardware"] = {{"name", std::string(o.hw.name)},
                   {"peak_flops", o.hw.peak_flops},
                   {"gemm_fraction", o.hw.gemm_fraction},
                   {"attention_fraction", o.hw.attention_fraction},
                   {"memory_bandwidth", o.hw.memory_bandwidth},
                   {"memory_fraction", o.hw.memory_fraction},
                   {"memory_capacity", o.hw.memory_capacity}};
  j["iteration_time"] = pr.iteration_time;
  j["pipeline_time"] = pr.pipeline_time;
  j["optimizer_time"] = pr.optimizer_time;
  j["tokens_per_second"] = pr.tokens_per_second;
  j["mfu"] = pr.mfu;
  j["model_flops"] = pr.model_flops;
  j["bubble_fraction"] = pr.sim.bubble_fraction;
  j["p2p_time"] = pr.p2p_time;
  j["vocab_comm_time"] = pr.vocab_comm_time;
  j["max_peak_memory_bytes"] = pr.max_peak_memory_bytes;
  j["ranks"] = nlohmann::json::array();
  for (std::size_t k = 0; k < pr.ranks.size(); ++k) {
    const auto& rk = pr.ranks[k];
    j["ranks"].push_back({{"rank", k},
                          {"parts", rk.parts},
                          {"busy", rk.busy},
                          {"idle", rk.idle},
                          {"optimizer_step", rk.optimizer_step},
                          {"peak_memory_bytes", rk.peak_memory_bytes},
                          {"fits", rk.peak_memory_bytes <= o.hw.memory_capacity},
                          {"memory",
                           {{"parameters", rk.memory.parameters},
                            {"gradients", rk.memory.gradients},
                            {"optimizer", rk.memory.optimizer},
                            {"activations", rk.memory.activations},
                            {"workspace", rk.memory.workspace}}}});
  }
  j["virtual_stages"] = nlohmann::json::array();
  for (std::size_t s = 0; s < pr.stages.size(); ++s) {
    const auto& st = pr.stages[s];
    j["virtual_stages"].push_back({{"stage", s},
                                   {"rank", r.part.rank_of(static_cast<int>(s))},
                                   {"parts", pipit::partition::describe(r.part.stages[s])},
                                   {"f", st.f},
                                   {"b", st.b},
                                   {"w", st.w},
                                   {"activation_bytes", st.activation_bytes}});
  }
  return j;
}

std::string model_comparison(const std::vector<model_run>& runs,
                             const std::vector<std::string>& refused, const model_options& o) {
  std::ostringstream os;
  os << model_header(o) << "\n";
  char line[512];
  std::snprintf(line, sizeof line, "%-15s %11s %10s %8s %10s %9s  %s\n", "partition", "iteration s",
                "tokens/s", "MFU %", "peak GiB", "peak rank", "layout");
  os << line;
  for (const auto& r : runs) {
    std::size_t worst = 0;
    for (std::size_t k = 0; k < r.pred.ranks.size(); ++k)
      if (r.pred.ranks[k].peak_memory_bytes > r.pred.ranks[worst].peak_memory_bytes) worst = k;
    std::string layout = pipit::partition::to_layout(r.part);
    if (r.part.vocab_parallel)
      layout += "  (E, L sharded, " + std::string(pipit::cost::name(o.algorithm)) + ")";
    std::snprintf(line, sizeof line, "%-15s %11.3f %10.0f %8.2f %10.2f %9zu  %s\n", r.name.c_str(),
                  r.pred.iteration_time, r.pred.tokens_per_second, 100 * r.pred.mfu,
                  r.pred.max_peak_memory_bytes / gib, worst, layout.c_str());
    os << line;
  }
  for (const auto& msg : refused) os << msg << "\n";
  return os.str();
}

std::string run_model_mode(const model_options& o, const std::string& format) {
  if (o.partition == "all") {
    if (format != "table" && format != "json")
      pipit::fail("--partition all prints a table or JSON (got --format ", format, ")");
    std::vector<model_run> runs;
    std::vector<std::string> refused;
    for (const std::string kind : {"naive", "balanced", "vocab-parallel"}) {
      try {
        runs.push_back(run_model(kind, o));
      } catch (const pipit::error& e) {
        refused.push_back(kind + " refused: " + e.what());
      }
    }
    if (runs.empty()) pipit::fail(refused.front());
    if (format == "table") return model_comparison(runs, refused, o);
    nlohmann::json all = nlohmann::json::array();
    for (const auto& r : runs) all.push_back(model_json(r, o));
    return all.dump(2) + "\n";
  }
  const model_run r = run_model(o.partition, o);
  if (format == "table") return model_table(r, o);
  if (format == "json") return model_json(r, o).dump(2) + "\n";
  if (format == "ascii") return pipit::render::ascii_timeline(r.pred.sim, r.plan);
  if (format == "chrome") return pipit::render::chrome_trace(r.pred.sim, r.plan, 1e6);
  pipit::render::svg_options so;
  so.px_per_unit = 1600 / r.pred.sim.makespan;
  so.title = o.schedule + ", partition " + r.name + ": " + pipit::partition::to_layout(r.part);
  return pipit::render::svg_timeline(r.pred.sim, r.plan, so);
}

// ---- search mode --------------------------------------------------------------------------------

std::string search_config_text(const pipit::sim::search_entry& e) {
  const auto& c = e.config;
  char line[256];
  std::snprintf(
      line, sizeof line, "%3d %3d %4d %3d %3d %5d  %-11s %-14s %-11s %-3s", c.tensor, c.pipeline,
      c.data, c.chunks, c.microbatch_size, c.microbatches, c.schedule.c_str(), c.partition.c_str(),
      c.vocab_algorithm ? std::string(pipit::cost::name(*c.vocab_algorithm)).c_str() : "-",
      c.recompute ? "yes" : "no");
  return line;
}

std::string percent(double v) {
  return fmt(100 * v, 1) + "%";
}

std::string search_table(const pipit::sim::search_result& r, const model_options& o) {
  const auto& t = o.model;
  const auto& cl = r.cluster;
  const auto& hw = cl.device;
  std::ostringstream os;
  os << "model: " << t.layers << " layers, hidden " << t.hidden << ", heads " << t.heads << " (kv "
     << t.kv() << "), ffn " << t.ffn_size() << (t.gated_mlp ? " gated" : "") << ", seq " << t.seq
     << ", vocab " << t.vocab << "; "
     << fmt(t.layers * pipit::cost::layer_parameters(t) / 1e9 +
                (pipit::cost::embedding_parameters(t) + pipit::cost::output_parameters(t)) / 1e9,
            1)
     << "B parameters\n"
     << "cluster: " << cl.nodes << " nodes x " << cl.gpus_per_node << " GPUs = " << cl.gpus() << " "
     << hw.name << (o.hardware_settings.empty() ? "" : " (" + o.hardware_settings + ")") << ", "
     << fmt(hw.memory_capacity / gib, 2) << " GiB each; intra-node "
     << fmt(hw.collective.bandwidth / 1e9, 0) << " GB/s, inter-node "
     << fmt(hw.inter_node.bandwidth / 1e9, 0) << " GB/s per GPU; global batch " << r.global_batch
     << " sequences\n"
     << "searched " << r.candidates << " configurations in " << fmt(r.seconds, 2)
     << " s, simulated " << r.simulated << "\n\n";
  char line[512];
  std::snprintf(line, sizeof line,
                "%4s %3s %3s %4s %3s %3s %5s  %-11s %-14s %-11s %-3s %10s %7s %9s %9s\n", "rank",
                "t", "p", "d", "v", "b", "m", "schedule", "partition", "vocab", "rc", "tokens/s",
                "MFU %", "iter s", "peak GiB");
  os << line;
  for (std::size_t k = 0; k < r.configs.size(); ++k) {
    const auto& e = r.configs[k];
    std::snprintf(line, sizeof line, "%4zu %s %10.0f %7.2f %9.3f %9.2f\n", k + 1,
                  search_config_text(e).c_str(), e.tokens_per_second, 100 * e.mfu, e.iteration_time,
                  e.peak_memory_bytes / gib);
    os << line;
  }
  if (!r.configs.empty()) {
    os << "\nlayout of #1: " << r.configs.front().layout << "\n";
  }
  const double best = r.configs.empty() ? 0 : r.configs.front().tokens_per_second;
  os << "\nwhy not the others:\n";
  const auto& nf = r.does_not_fit;
  os << "  does not fit: " << nf.count << " (" << nf.bounded
     << " refused on a memory lower bound without simulating)\n";
  if (nf.fastest)
    os << "    fastest of them: " << pipit::sim::describe(nf.fastest->config) << ": "
       << fmt(nf.fastest->tokens_per_second, 0) << " tokens/s"
       << (best > 0 ? " (" + std::string(nf.fastest->tokens_per_second >= best ? "+" : "") +
                          percent(nf.fastest->tokens_per_second / best - 1) + " vs #1)"
                    : "")
       << " but " << fmt(nf.fastest->peak_memory_bytes / gib, 2) << " GiB, "
       << fmt((nf.fastest->peak_memory_bytes - hw.memory_capacity) / gib, 2) << " GiB over\n";
  if (nf.closest)
    os << "    closest to fitting: " << pipit::sim::describe(nf.closest->config) << ": "
       << (nf.closest->simulated ? "" : "at least ") << fmt(nf.closest->peak_memory_bytes / gib, 2)
       << " GiB, " << fmt((nf.closest->peak_memory_bytes - hw.memory_capacity) / gib, 2)
       << " GiB over\n";
  const auto& w = r.worse;
  os << "  fits but slower than #" << r.configs.size() << ": " << w.count << " (" << w.bounded
     << " never simulated: their throughput bound is below #" << r.configs.size() << "'s)\n";
  if (w.best)
    os << "    fastest of them: " << pipit::sim::describe(w.best->config) << ": "
       << fmt(w.best->tokens_per_second, 0) << " tokens/s, "
       << percent(1 - w.best->tokens_per_second / best) << " slower than #1\n";
  if (w.best_bounded)
    os << "    best bound among the unsimulated: " << fmt(w.best_bounded->tokens_per_second, 0)
       << " tokens/s, at least " << percent(1 - w.best_bounded->tokens_per_second / best)
       << " slower than #1\n";
  os << "  not applicable: " << r.not_applicable.count << "\n";
  for (const auto& e : r.not_applicable.examples) os << "    e.g. " << e << "\n";
  for (const auto& n : r.notes) os << "  excluded: " << n << "\n";
  return os.str();
}

nlohmann::json search_entry_json(const pipit::sim::search_entry& e) {
  const auto& c = e.config;
  nlohmann::json j{
      {"tensor", c.tensor},
      {"pipeline", c.pipeline},
      {"data", c.data},
      {"chunks", c.chunks},
      {"microbatch_size", c.microbatch_size},
      {"microbatches", c.microbatches},
      {"schedule", c.schedule},
      {"partition", c.partition},
      {"layout", e.layout},
      {"vocab_algorithm", c.vocab_algorithm ? std::string(pipit::cost::name(*c.vocab_algorithm))
                                            : std::string("none")},
      {"recompute", c.recompute},
      {"sequence_parallel", c.sequence_parallel},
      {"tokens_per_second", e.tokens_per_second},
      {"peak_memory_bytes", e.peak_memory_bytes},
      {"simulated", e.simulated}};
  if (e.simulated) {
    j["iteration_time"] = e.iteration_time;
    j["mfu"] = e.mfu;
    j["bubble_fraction"] = e.bubble_fraction;
    j["gradient_sync_time"] = e.gradient_sync_time;
  }
  return j;
}

nlohmann::json search_json(const pipit::sim::search_result& r) {
  nlohmann::json j;
  j["configs"] = nlohmann::json::array();
  for (const auto& e : r.configs) j["configs"].push_back(search_entry_json(e));
  const auto& hw = r.cluster.device;
  j["cluster"] = {{"nodes", r.cluster.nodes},
                  {"gpus_per_node", r.cluster.gpus_per_node},
                  {"hardware", std::string(hw.name)},
                  {"memory_capacity", hw.memory_capacity}};
  j["global_batch"] = r.global_batch;
  j["candidates"] = r.candidates;
  j["simulated"] = r.simulated;
  j["seconds"] = r.seconds;
  auto opt = [](const std::optional<pipit::sim::search_entry>& e) {
    return e ? search_entry_json(*e) : nlohmann::json(nullptr);
  };
  j["rejected"] = {{"does_not_fit",
                    {{"count", r.does_not_fit.count},
                     {"bounded", r.does_not_fit.bounded},
                     {"fastest", opt(r.does_not_fit.fastest)},
                     {"closest", opt(r.does_not_fit.closest)}}},
                   {"worse",
                    {{"count", r.worse.count},
                     {"bounded", r.worse.bounded},
                     {"best", opt(r.worse.best)},
                     {"best_bounded", opt(r.worse.best_bounded)}}},
                   {"not_applicable",
                    {{"count", r.not_applicable.count}, {"examples", r.not_applicable.examples}}}};
  j["notes"] = r.notes;
  return j;
}

// Writes the result to standard output, or to `output` when given.
void emit(const std::string& text, const std::string& output) {
  if (output.empty()) {
    std::cout << text;
    return;
  }
  std::ofstream out(output);
  if (!(out << text)) pipit::fail("cannot write ", output);
  std::cerr << "wrote " << output << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"pipit-plan: generate, validate, simulate and draw pipeline schedules"};
  std::string schedule = "1f1b", format = "table", output, cost_text = "f=1,b=2";
  int stages = 4, microbatches = 8;
  std::optional<int> chunks;
  bool with_lowered = false;
  std::string vocab_text = "none";
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
                 "vocabulary passes per rank: [s=][,t=][,if=][,ib=]; "
                 "without w, b is the combined backward");
  app.add_option("--format", format, "output format")
      ->check(CLI::IsMember({"table", "json", "ascii", "svg", "chrome"}));
  app.add_option("--output,-o", output, "write to this file instead of standard output");
  app.add_flag("--lowered", with_lowered, "include the lowered actions (with send/recv) in JSON");
  app.add_option("--vocab", vocab_text,
                 "vocabulary parallelism: the output layer's algorithm. Plans: S, T, IF, IB "
                 "passes on every rank (1f1b, interleaved, v-half; durations --cost "
                 "s=,t=,if=,ib=). --model: the algorithm of --partition vocab-parallel")
      ->check(CLI::IsMember({"none", "naive", "two-barrier", "one-barrier"}));

  // Model mode.
  bool model = false, no_flash = false;
  model_options mo;
  std::string hardware = "a100-80gb";
  mo.partition = "naive";
  auto* g = app.add_option_group("model", "model mode: predict a transformer's iteration");
  g->add_flag("--model", model,
              "predict a transformer's iteration time, MFU and memory per rank (the options "
              "below; --stages, --microbatches, --chunks and --schedule as above)");
  g->add_option("--layers", mo.model.layers, "transformer layers");
  g->add_option("--hidden", mo.model.hidden, "hidden size");
  g->add_option("--heads", mo.model.heads, "attention heads");
  g->add_option("--kv-heads", mo.model.kv_heads, "key/value heads (default: heads)");
  g->add_option("--ffn", mo.model.ffn, "FFN inner size (default: 4 * hidden)");
  g->add_option("--seq", mo.model.seq, "sequence length");
  g->add_option("--vocab-size", mo.model.vocab, "vocabulary size");
  g->add_option("--microbatch-size", mo.model.microbatch_size, "sequences per microbatch");
  g->add_flag("--gated-mlp", mo.model.gated_mlp, "SwiGLU-style MLP (three h x ffn matrices)");
  g->add_flag("--learned-positions", mo.model.learned_positions,
              "a learned position embedding (seq x hidden) on the first stage");
  g->add_flag("--no-flash-attention", no_flash, "store the attention scores (5as bytes/token)");
  g->add_flag("--recompute", mo.model.recompute, "full activation recomputation");
  g->add_option("--gradient-bytes", mo.model.bytes.gradient,
                "bytes per weight gradient (default 4: fp32 accumulation; 2: 16-bit)");
  g->add_option("--hardware", hardware, "hardware profile")
      ->check(CLI::IsMember({"a100-80gb", "h200"}));
  g->add_option("--hardware-set", mo.hardware_settings,
                "override profile fields: peak=,gemm=,attention=,bandwidth=,memory=,capacity=,"
                "p2p_latency=,p2p_bandwidth=,collective_latency=,collective_bandwidth=");
  g->add_option("--partition", mo.partition,
                "naive, balanced, vocab-parallel, layout:\"E t*4 | ... | t*4 L\", or all");

  // Search mode.
  bool search = false;
  pipit::cost::cluster cl;
  pipit::sim::search_options so;
  std::string search_schedules;
  auto* sg = app.add_option_group("search", "search mode: the 3D configuration planner");
  sg->add_flag("--search", search,
               "find the fastest tensor x pipeline x data configurations that fit a cluster (the "
               "model options above; docs/planner.md)");
  auto* nodes_opt = sg->add_option("--nodes", cl.nodes, "nodes")->check(CLI::PositiveNumber);
  auto* gpn_opt = sg->add_option("--gpus-per-node", cl.gpus_per_node, "GPUs per node")
                      ->check(CLI::PositiveNumber);
  auto* batch_opt =
      sg->add_option("--global-batch", so.global_batch, "sequences per iteration (= d x b x m)");
  auto* top_opt = sg->add_option("--top", so.top, "configurations to print (default 5)")
                      ->check(CLI::PositiveNumber);
  auto* mbs_opt = sg->add_option("--max-microbatch-size", so.max_microbatch_size,
                                 "largest microbatch size tried (default 8)")
                      ->check(CLI::PositiveNumber);
  auto* chunks_opt =
      sg->add_option("--max-chunks", so.max_chunks,
                     "interleaved: model chunks per rank tried, 2 .. this (default 4)")
          ->check(CLI::PositiveNumber);
  auto* tensor_opt = sg->add_option("--tensor", so.tensor, "fix the tensor parallel size")
                         ->check(CLI::PositiveNumber);
  auto* pipeline_opt = sg->add_option("--pipeline", so.pipeline, "fix the pipeline parallel size")
                           ->check(CLI::PositiveNumber);
  auto* data_opt =
      sg->add_option("--data", so.data, "fix the data parallel size")->check(CLI::PositiveNumber);
  auto* scheds_opt = sg->add_option("--schedules", search_schedules,
                                    "schedules tried, comma-separated (default "
                                    "1f1b,interleaved,zb-h1,zb-h2,zb-v,v-half,v-min)");
  std::string search_partitions;
  auto* parts_opt = sg->add_option("--partitions", search_partitions,
                                   "partitions tried, comma-separated (default "
                                   "naive,balanced,vocab-parallel)");
  auto* sp_opt = sg->add_flag("--sequence-parallel", so.sequence_parallel,
                              "sequence parallelism with tensor parallelism");
  auto* do_opt = sg->add_flag("--distributed-optimizer", so.distributed_optimizer,
                              "optimizer states split over the data-parallel replicas");
  auto* exh_opt = sg->add_flag("--exhaustive", so.exhaustive,
                               "simulate every configuration that may fit (no throughput bound)");
  CLI11_PARSE(app, argc, argv);

  // The model options need --model or --search; the search options need --search.
  for (const CLI::Option* opt : g->get_options()) {
    if (opt->get_name() == "--model" || opt->count() == 0) continue;
    if (!model && !search) {
      std::cerr << "pipit-plan: " << opt->get_name() << " needs --model or --search\n";
      return 1;
    }
  }
  for (const CLI::Option* opt :
       {nodes_opt, gpn_opt, batch_opt, top_opt, mbs_opt, chunks_opt, tensor_opt, pipeline_opt,
        data_opt, scheds_opt, parts_opt, sp_opt, do_opt, exh_opt})
    if (opt->count() > 0 && !search) {
      std::cerr << "pipit-plan: " << opt->get_name() << " needs --search\n";
      return 1;
    }

  const ps::vocab_passes vocab = *ps::vocab_passes_by_name(vocab_text);
  if (search) {
    try {
      if (model) pipit::fail("--search and --model are two modes: give one");
      // What the search chooses cannot also be given.
      for (const char* name : {"--schedule", "--stages", "--microbatches", "--chunks",
                               "--partition", "--microbatch-size", "--recompute", "--vocab"})
        if (app.count(name) > 0)
          pipit::fail("--search chooses ", name + 2,
                      " itself (fix the sizes with --tensor, --pipeline, --data; restrict the "
                      "schedules with --schedules)");
      if (batch_opt->count() == 0) pipit::fail("--search needs --global-batch");
      mo.model.flash_attention = !no_flash;
      cl.device = pipit::cost::hardware_by_name(hardware);
      std::stringstream in(mo.hardware_settings);
      std::string item;
      while (std::getline(in, item, ',')) pipit::cost::set_field(cl.device, item);
      if (!search_schedules.empty()) {
        so.schedules.clear();
        std::stringstream ss(search_schedules);
        while (std::getline(ss, item, ',')) so.schedules.push_back(item);
      }
      if (!search_partitions.empty()) {
        so.partitions.clear();
        std::stringstream ps_(search_partitions);
        while (std::getline(ps_, item, ',')) so.partitions.push_back(item);
      }
      if (format != "table" && format != "json")
        pipit::fail("--search prints a table or JSON (got --format ", format, ")");
      const pipit::sim::search_result r = pipit::sim::search(mo.model, cl, so);
      emit(format == "json" ? search_json(r).dump(2) + "\n" : search_table(r, mo), output);
      if (r.configs.empty()) {
        std::cerr << "pipit-plan: no configuration fits in "
                  << fmt(cl.device.memory_capacity / gib, 2) << " GiB per GPU\n";
        return 1;
      }
    } catch (const pipit::error& e) {
      std::cerr << "pipit-plan: " << e.what() << "\n";
      return 1;
    }
    return 0;
  }
  if (model) {
    try {
      mo.model.flash_attention = !no_flash;
      mo.hw = pipit::cost::hardware_by_name(hardware);
      std::stringstream in(mo.hardware_settings);
      std::string item;
      while (std::getline(in, item, ',')) pipit::cost::set_field(mo.hw, item);
      pipit::cost::check(mo.hw);
      // --vocab picks the vocab-parallel partition's algorithm (default one-barrier).
      if (vocab_text != "none") mo.algorithm = pipit::cost::vocab_algorithm_by_name(vocab_text);
      if (schedule == "all")
        pipit::fail(
            "--model compares partitions (--partition all), not schedules: give one "
            "--schedule");
      mo.schedule = schedule;
      mo.stages = stages;
      mo.microbatches = microbatches;
      mo.chunks = chunks.value_or(ps::default_chunks(schedule));
      const std::string text = run_model_mode(mo, format);
      emit(text, output);
    } catch (const pipit::error& e) {
      std::cerr << "pipit-plan: " << e.what() << "\n";
      return 1;
    }
    return 0;
  }

  try {
    const pipit::sim::costs costs = parse_costs(cost_text);
    auto shape_for = [&](const std::string& name) {
      return ps::shape{stages, microbatches, chunks.value_or(ps::default_chunks(name))};
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
         << " free_at_b=" << costs.free_at_b;
      if (vocab != ps::vocab_passes::none)
        os << " s=" << costs.vocab_s << " t=" << costs.vocab_t << " if=" << costs.embed_f
           << " ib=" << costs.embed_b << ", vocabulary passes " << ps::name(vocab);
      os << "\n\n" << line;
      for (const auto name : ps::all_policy_names) {
        const std::string n(name);
        try {
          const report r = run(n, shape_for(n), costs, vocab);
          all.push_back(to_json(r, with_lowered));
          const std::string sent = std::to_string(messages(r.lowered));
          std::snprintf(line, sizeof line, "%-12s %6d %10.3f %8.3f %10.3f %10.3f %9s\n", n.c_str(),
                        r.plan.shp.chunks, r.sim.makespan, r.sim.bubble_fraction, peak_max(r.sim),
                        r.sim.ranks[0].peak_activations, sent.c_str());
          os << line;
        } catch (const pipit::error& e) {
          std::snprintf(line, sizeof line, "%-12s refused: ", n.c_str());
          os << line << e.what() << "\n";
        }
      }
      text = format == "json" ? all.dump(2) + "\n" : os.str();
    } else {
      const report r = run(schedule, shape_for(schedule), costs, vocab);
      if (format == "table") text = table(r);
      if (format == "json") text = to_json(r, with_lowered).dump(2) + "\n";
      if (format == "ascii") text = pipit::render::ascii_timeline(r.sim, r.plan);
      if (format == "svg") text = pipit::render::svg_timeline(r.sim, r.plan);
      if (format == "chrome") text = pipit::render::chrome_trace(r.sim, r.plan);
    }
    emit(text, output);
  } catch (const pipit::error& e) {
    std::cerr << "pipit-plan: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
