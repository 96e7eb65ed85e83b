// The pipeline executor: every schedule trains a small deterministic MLP to the same loss and
// parameters as single-process training; re-materialization, data parallelism, failures, the
// start-up agreement, the stash layout and the absence of allocations in run().
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <map>
#include <new>
#include <optional>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "pipit/comm/threads.hpp"
#include "pipit/runtime/executor.hpp"
#include "pipit/schedule/by_name.hpp"
#include "support/null_communicator.hpp"
#include "support/runtime_model.hpp"
#include "support/thread_checks.hpp"

// ---- a global allocation counter, switched on per thread ----------------------------------------
// Not under AddressSanitizer: it replaces operator new itself, and memory allocated by its
// operator new (in the shared libraries) would reach our operator delete.
#if defined(__SANITIZE_ADDRESS__)
#define PIPIT_TEST_COUNT_ALLOCATIONS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PIPIT_TEST_COUNT_ALLOCATIONS 0
#endif
#endif
#ifndef PIPIT_TEST_COUNT_ALLOCATIONS
#define PIPIT_TEST_COUNT_ALLOCATIONS 1
#endif

namespace {
std::atomic<long> allocations{0};
thread_local bool counting_allocations = false;
}  // namespace

#if PIPIT_TEST_COUNT_ALLOCATIONS
// GCC inlines these pairs into callers and then reports free() on memory from operator new.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) {
  if (counting_allocations) allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
#endif

namespace {

namespace ps = pipit::schedule;
namespace rt = pipit::runtime;
using pipit::comm::threads;
using pipit::comm::threads_options;
using pipit::testing::mlp_config;
using pipit::testing::mlp_reference;
using pipit::testing::mlp_stage;
using pipit::testing::mlp_stage_combined;

mlp_config model(double keep = 0.8) {
  mlp_config c;
  c.widths = {5, 8, 7, 9, 6, 8, 7, 6, 9, 5, 7, 8, 4};  // 12 layers
  c.batch = 3;
  c.keep = keep;
  return c;
}

template <class T>
struct trained {
  std::vector<double> losses;                              // per step, mean over replicas
  std::vector<std::vector<typename mlp_stage<T>::mat>> w;  // [replica][layer]
  std::vector<std::vector<typename mlp_stage<T>::vec>> b;
};

// Trains `steps` steps of the plan on replicas x plan.rank_count() thread ranks.
template <class T, template <class> class Stage = mlp_stage>
trained<T> train_pipeline(const mlp_config& cfg, const ps::plan& plan, int replicas, int steps,
                          T lr, rt::executor_options opt = {}) {
  const int p = plan.rank_count(), layers = cfg.layers();
  trained<T> out;
  out.w.assign(static_cast<std::size_t>(replicas),
               std::vector<typename mlp_stage<T>::mat>(static_cast<std::size_t>(layers)));
  out.b.assign(static_cast<std::size_t>(replicas),
               std::vector<typename mlp_stage<T>::vec>(static_cast<std::size_t>(layers)));
  std::vector<std::vector<double>> loss(static_cast<std::size_t>(replicas),
                                        std::vector<double>(static_cast<std::size_t>(steps)));
  const int last_rank = plan.rank_of(plan.shp.virtual_stages() - 1);
  threads::run(p * replicas, [&](threads& world) {
    const int replica = world.rank() / p, pr = world.rank() % p;
    threads pipe = world.split(replica, pr);
    threads data = world.split(pr, replica);
    Stage<T> st(cfg, plan, pr, replica);
    auto body = [&](auto& ex) {
      for (int s = 0; s < steps; ++s) {
        st.loss_sum = 0;
        ex.run();
        if (pr == last_rank)
          loss[static_cast<std::size_t>(replica)][static_cast<std::size_t>(s)] = st.loss_sum;
        st.sgd(lr);
      }
    };
    if (replicas > 1) {
      rt::executor ex(pipe, data, st, plan, opt);
      body(ex);
    } else {
      rt::executor ex(pipe, st, plan, opt);
      body(ex);
    }
    for (int l = 0; l < layers; ++l)
      if (st.holds(l)) {
        out.w[static_cast<std::size_t>(replica)][static_cast<std::size_t>(l)] = st.weight(l);
        out.b[static_cast<std::size_t>(replica)][static_cast<std::size_t>(l)] = st.bias(l);
      }
  });
  for (int s = 0; s < steps; ++s) {
    double sum = 0;
    for (int r = 0; r < replicas; ++r)
      sum += loss[static_cast<std::size_t>(r)][static_cast<std::size_t>(s)];
    out.losses.push_back(sum / replicas);
  }
  return out;
}

// The largest relative difference: per step for the loss, per tensor (relative to its largest
// entry) for the parameters.
template <class T>
double max_relative_error(const trained<T>& got, const mlp_reference<T>& ref) {
  double worst = 0;
  for (std::size_t s = 0; s < ref.losses.size(); ++s)
    worst = std::max(worst, std::abs(got.losses[s] - ref.losses[s]) / std::abs(ref.losses[s]));
  const auto rel = [](const auto& a, const auto& b) {
    if (a.size() != b.size()) return 1e300;
    const double scale = static_cast<double>(b.cwiseAbs().maxCoeff());
    return static_cast<double>((a - b).cwiseAbs().maxCoeff()) / scale;
  };
  for (std::size_t l = 0; l < ref.w.size(); ++l) {
    worst = std::max(worst, rel(got.w[0][l], ref.w[l]));
    worst = std::max(worst, rel(got.b[0][l], ref.b[l]));
  }
  return worst;
}

template <class T>
bool replicas_identical(const trained<T>& t) {
  for (std::size_t r = 1; r < t.w.size(); ++r)
    for (std::size_t l = 0; l < t.w[0].size(); ++l)
      if (t.w[r][l] != t.w[0][l] || t.b[r][l] != t.b[0][l]) return false;
  return true;
}

constexpr int steps = 3;

mlp_stage<double>::mat cfg_initial_weight(const mlp_config& cfg) {
  return pipit::testing::mlp_math<double>{cfg}.init_weight(0);
}

template <class T>
const mlp_reference<T>& reference(const mlp_config& cfg, int microbatches, int replicas, T lr) {
  static std::map<std::tuple<std::vector<int>, double, int, int, double>, mlp_reference<T>> cache;
  const auto key = std::make_tuple(cfg.widths, cfg.keep, microbatches, replicas, double(lr));
  auto it = cache.find(key);
  if (it == cache.end())
    it = cache.emplace(key, mlp_reference<T>(cfg, microbatches, replicas, steps, lr)).first;
  return it->second;
}

std::optional<ps::plan> plan_or_nothing(std::string_view schedule, ps::shape s) {
  try {
    return ps::make_plan_by_name(schedule, s);
  } catch (const pipit::error&) {
    return std::nullopt;  // a shape the schedule refuses
  }
}

// Every (stages, microbatches, chunks) the sweep tries for a schedule, with and without
// re-materialization; returns how many shapes the schedule accepted.
int sweep(std::string_view schedule, std::vector<int> chunk_counts) {
  const mlp_config cfg = model();
  const double lr = 0.1;
  int ran = 0;
  for (const int v : chunk_counts)
    for (int p = 1; p <= 4; ++p)
      for (const int m : {1, 2, 3, 5, 8}) {
        const auto plan = plan_or_nothing(schedule, {p, m, v});
        if (!plan) continue;
        ++ran;
        for (const bool remat : {false, true}) {
          INFO(schedule << " stages " << p << " microbatches " << m << " chunks " << v
                        << (remat ? " with" : " without") << " re-materialization");
          const auto got =
              train_pipeline<double>(cfg, *plan, 1, steps, lr, {.rematerialize = remat});
          CHECK(max_relative_error(got, reference<double>(cfg, m, 1, lr)) <= 1e-12);
        }
      }
  return ran;
}

// A stage that only copies (no model): for allocation counts and the stash layout.
struct copy_stage {
  using value_type = double;
  std::size_t n = 4;
  std::size_t input_size(int) const { return n; }
  std::size_t output_size(int) const { return n; }
  std::size_t activation_size(int) const { return 2; }
  void load_input(const rt::pass_info& i, std::span<double> in) {
    std::fill(in.begin(), in.end(), i.microbatch);
  }
  void forward(const rt::pass_info&, std::span<const double> in, std::span<double> out,
               std::span<double> saved) {
    std::copy(in.begin(), in.end(), out.begin());
    saved[0] = in[0];
  }
  void backward_input(const rt::pass_info&, std::span<const double>, std::span<double>,
                      std::span<const double> gout, std::span<double> gin) {
    if (!gin.empty() && !gout.empty()) std::copy(gout.begin(), gout.end(), gin.begin());
  }
  void backward_weight(const rt::pass_info&, std::span<const double>, std::span<const double>,
                       std::span<const double>) {}
};

}  // namespace

TEST_CASE("the stage concept names what a stage provides", "[runtime]") {
  STATIC_REQUIRE(rt::stage<mlp_stage<double>>);
  STATIC_REQUIRE(rt::split_backward_stage<mlp_stage<double>>);
  STATIC_REQUIRE(rt::stage<mlp_stage_combined<float>>);
  STATIC_REQUIRE(!rt::split_backward_stage<mlp_stage_combined<float>>);
  STATIC_REQUIRE(rt::stage_has_gradients<mlp_stage<float>>);
  STATIC_REQUIRE(rt::stage_has_load_input<copy_stage>);
  STATIC_REQUIRE(!rt::stage_has_gradients<copy_stage>);
  STATIC_REQUIRE(!rt::stage<int>);
  STATIC_REQUIRE(rt::pass_seed(1, 2, 3, 4) == rt::pass_seed(1, 2, 3, 4));
  STATIC_REQUIRE(rt::pass_seed(1, 2, 3, 4) != rt::pass_seed(1, 2, 4, 3));
  STATIC_REQUIRE(rt::pass_seed(1, 2, 3, 4) != rt::pass_seed(1, 3, 3, 4));
}

TEST_CASE(
    "the stash keeps what is alive: m inputs for GPipe, one saved buffer with re-materialization",
    "[runtime]") {
  const std::vector<rt::chunk_sizes> sizes{{4, 4, 10}};
  const ps::plan g = ps::lower(ps::make_plan<ps::gpipe>({1, 8}));
  const rt::program keep = rt::compile(g, 0, sizes, false);
  const rt::program remat = rt::compile(g, 0, sizes, true);
  CHECK(keep.slots(rt::buffer_kind::input, 0) == 8);
  CHECK(keep.slots(rt::buffer_kind::saved, 0) == 8);
  CHECK(remat.slots(rt::buffer_kind::input, 0) == 8);
  CHECK(remat.slots(rt::buffer_kind::saved, 0) == 1);
  CHECK(remat.slots(rt::buffer_kind::scratch_saved, 0) == 1);
  CHECK(keep.elements(rt::buffer_kind::saved) == 80);
  CHECK(remat.elements(rt::buffer_kind::saved) + remat.elements(rt::buffer_kind::scratch_saved) ==
        20);
  CHECK(keep.compute_actions == 16);
  CHECK(keep.communication_actions == 0);

  // 1F1B: rank r holds min(p - r, m) microbatches' activations; the last rank one at a time.
  const ps::plan f = ps::lower(ps::make_plan<ps::one_f_one_b>({4, 8}));
  for (int r = 0; r < 4; ++r) {
    const rt::program pr = rt::compile(f, r, sizes, false);
    CHECK(pr.slots(rt::buffer_kind::saved, 0) == 4 - r);
    // Outputs and input gradients live only until their send, which directly follows the pass.
    CHECK(pr.slots(rt::buffer_kind::output, 0) <= 1);
    CHECK(pr.slots(rt::buffer_kind::input_grad, 0) <= 1);
  }

  // V placement on one rank: the turn hands buffers over in place, nothing is sent.
  const ps::plan v = ps::lower(ps::make_plan<ps::zb_v>({1, 4, 2}));
  const std::vector<rt::chunk_sizes> two{{4, 5, 3}, {5, 6, 3}};
  const rt::program pv = rt::compile(v, 0, two, false);
  CHECK(pv.transfers.empty());
  CHECK(pv.slots(rt::buffer_kind::output, 0) == 0);
  CHECK(pv.slots(rt::buffer_kind::input, 1) >= 1);
  const std::vector<rt::chunk_sizes> bad{{4, 5, 3}, {6, 6, 3}};
  CHECK_THROWS_WITH(
      rt::compile(v, 0, bad, false),
      Catch::Contains("output_size 5 but chunk 1 (virtual stage 1) has input_size 6"));
}

TEST_CASE("message tags are unique per value and below the collective tags", "[runtime]") {
  for (const auto name : ps::all_policy_names) {
    const auto plan = plan_or_nothing(name, {4, 8, name == "interleaved" ? 3 : 2});
    const auto plan1 = plan ? plan : plan_or_nothing(name, {4, 8, 1});
    REQUIRE(plan1);
    const ps::plan low = ps::lower(*plan1);
    std::vector<rt::chunk_sizes> sizes(static_cast<std::size_t>(low.shp.chunks), {2, 2, 2});
    for (int r = 0; r < 4; ++r) {
      const rt::program pr = rt::compile(low, r, sizes, false);
      std::set<std::tuple<bool, int, int>> seen;
      for (const auto& t : pr.transfers) {
        CHECK(seen.insert({t.send, t.peer, t.tag}).second);
        CHECK(t.tag >= 0);
        CHECK(t.tag < pipit::comm::collective_tag);
      }
      CHECK(pr.communication_actions == pr.transfers.size());
    }
  }
}

TEST_CASE("the equivalence check is sensitive", "[runtime][equivalence]") {
  // A pipeline that trained even slightly differently (here: another learning rate, and another
  // microbatch split) would fail the 1e-12 check by orders of magnitude.
  const mlp_config cfg = model();
  const ps::plan plan = ps::make_plan_by_name("1f1b", {2, 4});
  const auto got = train_pipeline<double>(cfg, plan, 1, steps, 0.1);
  CHECK(max_relative_error(got, reference<double>(cfg, 4, 1, 0.1)) <= 1e-12);
  CHECK(max_relative_error(got, reference<double>(cfg, 4, 1, 0.1000001)) > 1e-9);
  CHECK(max_relative_error(got, reference<double>(cfg, 3, 1, 0.1)) > 1e-3);
  CHECK(got.w[0][0] != cfg_initial_weight(cfg));
}

TEST_CASE("gpipe and 1f1b train like a single process", "[runtime][equivalence]") {
  CHECK(sweep("gpipe", {1}) == 20);
  CHECK(sweep("1f1b", {1}) == 20);
}

TEST_CASE("zb-h1 and zb-h2 train like a single process", "[runtime][equivalence]") {
  CHECK(sweep("zb-h1", {1}) == 20);
  CHECK(sweep("zb-h2", {1}) == 20);
}

TEST_CASE("interleaved 1F1B with 2 and 3 chunks trains like a single process",
          "[runtime][equivalence]") {
  CHECK(sweep("interleaved", {2, 3}) >= 20);
}

TEST_CASE("zb-v and v-half train like a single process", "[runtime][equivalence]") {
  CHECK(sweep("zb-v", {2}) == 20);
  CHECK(sweep("v-half", {2}) == 20);
}

TEST_CASE("v-min and dualpipe-v train like a single process", "[runtime][equivalence]") {
  CHECK(sweep("v-min", {2}) == 20);
  CHECK(sweep("dualpipe-v", {2}) >= 8);
}

TEST_CASE("a stage with a combined backward trains gpipe, 1f1b and interleaved",
          "[runtime][equivalence]") {
  const mlp_config cfg = model();
  for (const auto& [name, shp] :
       {std::pair{"gpipe", ps::shape{3, 5}}, std::pair{"1f1b", ps::shape{4, 6}},
        std::pair{"interleaved", ps::shape{2, 5, 3}}})
    for (const bool remat : {false, true}) {
      INFO(name << (remat ? " with" : " without") << " re-materialization");
      const ps::plan plan = ps::make_plan_by_name(name, shp);
      const auto got = train_pipeline<double, mlp_stage_combined>(cfg, plan, 1, steps, 0.1,
                                                                  {.rematerialize = remat});
      CHECK(max_relative_error(got, reference<double>(cfg, shp.microbatches, 1, 0.1)) <= 1e-12);
    }
}

TEST_CASE("2 data-parallel x 2 pipeline ranks train like a single process",
          "[runtime][equivalence][data_parallel]") {
  const mlp_config cfg = model();
  for (const auto& [name, shp] :
       {std::pair{"gpipe", ps::shape{2, 3}}, std::pair{"1f1b", ps::shape{2, 4}},
        std::pair{"interleaved", ps::shape{2, 4, 2}}, std::pair{"zb-h1", ps::shape{2, 3}},
        std::pair{"zb-h2", ps::shape{2, 5}}, std::pair{"zb-v", ps::shape{2, 4, 2}},
        std::pair{"v-half", ps::shape{2, 3, 2}}, std::pair{"v-min", ps::shape{2, 4, 2}},
        std::pair{"dualpipe-v", ps::shape{2, 4, 2}}})
    for (const bool remat : {false, true}) {
      INFO(name << (remat ? " with" : " without") << " re-materialization");
      const ps::plan plan = ps::make_plan_by_name(name, shp);
      const auto got = train_pipeline<double>(cfg, plan, 2, steps, 0.1, {.rematerialize = remat});
      CHECK(replicas_identical(got));
      CHECK(max_relative_error(got, reference<double>(cfg, shp.microbatches, 2, 0.1)) <= 1e-12);
    }
}

// Float: each microbatch's arithmetic is the same in the pipeline and the reference (same
// functions, same shapes), so the only differences can come from the order in which the pipeline
// sums the m per-microbatch weight gradients (the order of its W passes) and the replicas'
// gradients. Reordering a sum of k terms changes it by at most (k - 1) u sum |terms|, u = 2^-24;
// with m <= 8 that is a few 1e-7 of a gradient, which three SGD steps (lr 0.1) through twelve
// tanh layers carry into the parameters and the loss without large growth: 1e-5 bounds it with
// margin. (Measured: 0, since every schedule runs a stage's W passes in microbatch order.)
TEST_CASE("float training matches the single-process float reference to 1e-5",
          "[runtime][equivalence][float]") {
  const mlp_config cfg = model();
  double worst = 0;
  for (const auto name : ps::all_policy_names)
    for (const int p : {2, 4}) {
      const int v = name == "interleaved" ? 2 : 0;
      auto plan = plan_or_nothing(name, {p, 8, v ? v : 1});
      if (!plan) plan = plan_or_nothing(name, {p, 8, 2});
      REQUIRE(plan);
      for (const bool remat : {false, true}) {
        INFO(name << " stages " << p << (remat ? " with" : " without") << " re-materialization");
        const auto got =
            train_pipeline<float>(cfg, *plan, 1, steps, 0.1f, {.rematerialize = remat});
        const double err = max_relative_error(got, reference<float>(cfg, 8, 1, 0.1f));
        worst = std::max(worst, err);
        CHECK(err <= 1e-5);
      }
    }
  const auto plan = ps::make_plan_by_name("zb-v", {2, 4, 2});
  const auto got = train_pipeline<float>(cfg, plan, 2, steps, 0.1f);
  CHECK(replicas_identical(got));
  const double err = max_relative_error(got, reference<float>(cfg, 4, 2, 0.1f));
  worst = std::max(worst, err);
  CHECK(err <= 1e-5);
  WARN("float: worst relative error " << worst);
}

TEST_CASE("re-materialization recomputes every forward with the same pass seed",
          "[runtime][rematerialization]") {
  // Dropout masks drawn from pass_info::seed: the recomputed forward must see the same seed,
  // or the gradients (and so the parameters) would differ from a run that keeps activations.
  mlp_config cfg = model(0.7);
  cfg.masks_from_pass_seed = true;
  for (const auto& [name, shp] :
       {std::pair{"gpipe", ps::shape{3, 4}}, std::pair{"zb-h2", ps::shape{3, 5}},
        std::pair{"interleaved", ps::shape{2, 4, 3}}, std::pair{"v-min", ps::shape{3, 5, 2}},
        std::pair{"dualpipe-v", ps::shape{2, 4, 2}}}) {
    INFO(name);
    const ps::plan plan = ps::make_plan_by_name(name, shp);
    const auto keep = train_pipeline<double>(cfg, plan, 1, steps, 0.1, {.seed = 11});
    const auto remat =
        train_pipeline<double>(cfg, plan, 1, steps, 0.1, {.rematerialize = true, .seed = 11});
    CHECK(keep.losses == remat.losses);
    CHECK(keep.w == remat.w);
    CHECK(keep.b == remat.b);
    const auto other = train_pipeline<double>(cfg, plan, 1, steps, 0.1, {.seed = 12});
    CHECK(other.losses != keep.losses);  // the seed does reach the stage

    // Each backward (B or BW) is preceded by exactly one recomputed forward.
    threads::run(plan.rank_count(), [&](threads& c) {
      for (const bool re : {false, true}) {
        mlp_stage<double> st(cfg, plan, c.rank());
        rt::executor ex(c, st, plan, {.rematerialize = re});
        ex.run();
        int f = 0, b = 0;
        for (const auto& in : ex.compiled().code) {
          f += in.kind == rt::instruction_kind::forward;
          b += in.kind == rt::instruction_kind::backward ||
               in.kind == rt::instruction_kind::backward_input;
        }
        PIPIT_TCHECK(st.forwards == f);
        PIPIT_TCHECK(st.recomputes == (re ? b : 0));
        PIPIT_TCHECK(st.backward_inputs == b);
      }
    });
  }
}

TEST_CASE("make_executor takes the schedule policy at compile time", "[runtime]") {
  const mlp_config cfg = model();
  threads::run(2, [&](threads& c) {
    const ps::shape shp{2, 4};
    const ps::plan plan = ps::make_plan<ps::zb_h1>(shp);
    mlp_stage<double> st(cfg, plan, c.rank());
    auto ex = rt::make_executor<ps::zb_h1>(c, st, shp);
    ex.run();
    PIPIT_TCHECK(ex.step() == 1);
    PIPIT_TCHECK(ex.stash_bytes() > 0);
    mlp_stage_combined<double> comb(cfg, plan, c.rank());
    auto ex2 = rt::make_executor<ps::one_f_one_b>(c, comb, shp);  // combined: fine for 1F1B
    ex2.run();
  });
}

// ---- failures: every rank ends with pipit::error
// --------------------------------------------------

namespace {
// Runs `fn(world)` on n ranks, counting the ranks on which it raised pipit::error; returns the
// message threads::run raised (empty when none).
template <class F>
std::string run_failing(int n, std::atomic<int>& raised, F fn, threads_options o = {}) {
  try {
    threads::run(
        n,
        [&](threads& c) {
          try {
            fn(c);
          } catch (const pipit::error&) {
            ++raised;
            throw;
          }
        },
        o);
  } catch (const pipit::error& e) {
    return e.what();
  }
  return {};
}

struct throwing_stage : mlp_stage<double> {
  using mlp_stage<double>::mlp_stage;
  int bad_rank = -1, rank = 0;
  void forward(const rt::pass_info& i, std::span<const double> in, std::span<double> out,
               std::span<double> saved) {
    if (rank == bad_rank && i.microbatch == 2) throw std::runtime_error("stage failure in forward");
    mlp_stage<double>::forward(i, in, out, saved);
  }
};

struct stalling_stage : mlp_stage<double> {
  using mlp_stage<double>::mlp_stage;
  bool stall = false;
  void forward(const rt::pass_info& i, std::span<const double> in, std::span<double> out,
               std::span<double> saved) {
    if (stall && i.microbatch == 1) std::this_thread::sleep_for(std::chrono::milliseconds(700));
    mlp_stage<double>::forward(i, in, out, saved);
  }
};

struct resized_stage : mlp_stage<double> {
  using mlp_stage<double>::mlp_stage;
  std::size_t extra = 0;
  std::size_t input_size(int c) const { return mlp_stage<double>::input_size(c) + extra; }
};
}  // namespace

TEST_CASE("a stage that throws in its forward fails every rank, naming it", "[runtime][failure]") {
  const mlp_config cfg = model();
  for (const auto name : {"1f1b", "zb-v"}) {
    INFO(name);
    const ps::plan plan = ps::make_plan_by_name(name, {4, 6, name == std::string("zb-v") ? 2 : 1});
    std::atomic<int> raised{0}, threw{0};
    const std::string what = run_failing(4, raised, [&](threads& c) {
      try {  // a slow rank may still be in the start-up agreement when rank 1 fails
        throwing_stage st(cfg, plan, c.rank());
        st.rank = c.rank();
        st.bad_rank = 1;
        rt::executor ex(c, st, plan);
        ex.run();
      } catch (const std::runtime_error& e) {
        if (std::string(e.what()).find("stage failure") != std::string::npos) ++threw;
        throw;
      }
    });
    CHECK_THAT(what, Catch::Contains("rank 1 failed: stage failure in forward"));
    CHECK(threw == 4);   // rank 1's own exception and every other rank's pipit::error
    CHECK(raised == 3);  // the other ranks raised pipit::error
  }
}

TEST_CASE("a rank that stops answering times out on every rank", "[runtime][failure]") {
  const mlp_config cfg = model();
  threads_options o;
  o.timeout = std::chrono::milliseconds(200);
  const ps::plan plan = ps::make_plan_by_name("zb-h1", {4, 6});
  std::atomic<int> raised{0};
  const auto t0 = std::chrono::steady_clock::now();
  const std::string what = run_failing(
      4, raised,
      [&](threads& c) {
        stalling_stage st(cfg, plan, c.rank());
        rt::executor ex(c, st, plan);
        st.stall = c.rank() == 2;
        ex.run();
      },
      o);
  CHECK_THAT(what, Catch::Contains("timed out after 200 ms"));
  CHECK(raised == 4);  // including the stalled rank, at its next send
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
}

TEST_CASE("ranks with different plans are refused at start on every rank", "[runtime][failure]") {
  const mlp_config cfg = model();
  std::atomic<int> raised{0};
  const std::string what = run_failing(4, raised, [&](threads& c) {
    const ps::plan plan = ps::make_plan_by_name("1f1b", {4, c.rank() == 3 ? 6 : 8});
    mlp_stage<double> st(cfg, plan, c.rank());
    rt::executor ex(c, st, plan);
    ex.run();
  });
  CHECK_THAT(what, Catch::Contains("the ranks run different plans") &&
                       Catch::Contains("rank 3 runs {stages=4, microbatches=6, chunks=1}") &&
                       Catch::Contains("rank 0 runs {stages=4, microbatches=8, chunks=1}"));
  CHECK(raised == 4);

  std::atomic<int> raised2{0};
  const std::string sizes = run_failing(3, raised2, [&](threads& c) {
    const ps::plan plan = ps::make_plan_by_name("zb-v", {3, 4, 2});
    resized_stage st(cfg, plan, c.rank());
    st.extra = c.rank() == 1 ? 1 : 0;  // rank 1 holds virtual stages 1 and 4
    rt::executor ex(c, st, plan);
  });
  CHECK_THAT(sizes, Catch::Contains("activation sizes disagree") &&
                        Catch::Contains("virtual stage 0 (rank 0) outputs 21 elements but virtual "
                                        "stage 1 (rank 1) takes 22") &&
                        Catch::Contains("virtual stage 3 (rank 2) outputs 27 elements but virtual "
                                        "stage 4 (rank 1) takes 28"));
  CHECK(raised2 == 3);
  // On one rank (V's turn: stages 2 and 3 on rank 2) the mismatch is found while preparing.
  std::atomic<int> raised2b{0};
  const std::string local = run_failing(3, raised2b, [&](threads& c) {
    const ps::plan plan = ps::make_plan_by_name("zb-v", {3, 4, 2});
    resized_stage st(cfg, plan, c.rank());
    st.extra = c.rank() == 2 ? 1 : 0;
    rt::executor ex(c, st, plan);
  });
  CHECK_THAT(local, Catch::Contains("rank 2 could not prepare the plan") &&
                        Catch::Contains("chunk 0 (virtual stage 2) has output_size 21 but chunk 1 "
                                        "(virtual stage 3) has input_size 22"));
  CHECK(raised2b == 3);

  std::atomic<int> raised3{0};
  const std::string split = run_failing(2, raised3, [&](threads& c) {
    const ps::plan plan = ps::make_plan_by_name("zb-h1", {2, 4});
    mlp_stage_combined<double> st(cfg, plan, c.rank());
    rt::executor ex(c, st, plan);
  });
  CHECK_THAT(split, Catch::Contains("splits the backward into B and W") &&
                        Catch::Contains("ranks 0, 1 could not prepare"));
  CHECK(raised3 == 2);

  // Across the data-parallel group: replica 1's pipeline disagrees, so replica 0's ranks,
  // whose own pipeline agrees, are refused too (the replicas tell each other at start).
  std::atomic<int> raised_dp{0};
  const std::string dp = run_failing(4, raised_dp, [&](threads& world) {
    const int replica = world.rank() / 2, pr = world.rank() % 2;
    threads pipe = world.split(replica, pr);
    threads data = world.split(pr, replica);
    const ps::plan plan = ps::make_plan_by_name("zb-h1", {2, world.rank() == 3 ? 3 : 4});
    mlp_stage<double> st(cfg, plan, pr, replica);
    rt::executor ex(pipe, data, st, plan);
  });
  CHECK_THAT(dp, Catch::Contains("different plans") ||
                     Catch::Contains("the pipeline of data-parallel rank 1 could not start"));
  CHECK(raised_dp == 4);

  std::atomic<int> raised4{0};
  const std::string count = run_failing(3, raised4, [&](threads& c) {
    const ps::plan plan = ps::make_plan_by_name("gpipe", {2, 4});
    mlp_stage<double> st(cfg, plan, std::min(c.rank(), 1));
    rt::executor ex(c, st, plan);
  });
  CHECK_THAT(count, Catch::Contains("the plan has 2 ranks but the pipeline communicator has 3"));
  CHECK(raised4 == 3);
}

namespace {
// A stage whose gradients() leaves out its last buffer when `fewer` is set: a replica whose
// gradient buffers differ from the others'.
struct fewer_gradients_stage : mlp_stage<double> {
  using mlp_stage<double>::mlp_stage;
  bool fewer = false;
  std::span<const std::span<double>> gradients() {
    const auto g = mlp_stage<double>::gradients();
    return fewer && !g.empty() ? g.first(g.size() - 1) : g;
  }
};
}  // namespace

TEST_CASE("a data group's refusal reaches every rank of every replica", "[runtime][failure]") {
  // 2 replicas x 2 pipeline ranks; replica 1's stage 1 has one gradient buffer fewer. Only the
  // stage-1 data group sees it; stage 0 must be refused too, or it would wait in run() for the
  // stage-1 ranks that threw. Every rank raises at construction, before any run().
  const mlp_config cfg = model();
  const ps::plan plan = ps::make_plan_by_name("1f1b", {2, 4});
  threads::run(
      4,
      [&](threads& world) {
        const int replica = world.rank() / 2, pr = world.rank() % 2;
        threads pipe = world.split(replica, pr);
        threads data = world.split(pr, replica);
        fewer_gradients_stage st(cfg, plan, pr, replica);
        st.fewer = replica == 1 && pr == 1;
        std::exception_ptr err;
        try {
          rt::executor ex(pipe, data, st, plan);  // collective: outside the assertions' lock
        } catch (...) {
          err = std::current_exception();
        }
        PIPIT_TCHECK(err != nullptr);
        if (err == nullptr) return;
        PIPIT_TCHECK_THROWS_WITH(
            std::rethrow_exception(err),
            Catch::Contains("the data-parallel replicas differ from replica 0") &&
                Catch::Contains("rank 1: other gradient buffers"));
        if (pr == 0)
          PIPIT_TCHECK_THROWS_WITH(std::rethrow_exception(err),
                                   Catch::Contains("rank 1 of this replica's 2 ranks was refused"));
      },
      {.timeout = std::chrono::milliseconds(20000)});
}

TEST_CASE("run() allocates nothing", "[runtime][allocation]") {
  if (!PIPIT_TEST_COUNT_ALLOCATIONS) {
    WARN("allocations are not counted under AddressSanitizer");
    return;
  }
  // One rank alone (all stages local), and rank 1 of a 4-rank 1F1B and ZB-V pipeline whose
  // communicator moves nothing: the executor's own work, without the backend's.
  const auto count = [](auto& ex) {
    ex.run();  // first step
    allocations = 0;
    counting_allocations = true;
    ex.run();
    ex.run();
    counting_allocations = false;
    return allocations.load();
  };
  threads::run(1, [&](threads& c) {
    copy_stage st;
    rt::executor ex(c, st, ps::make_plan<ps::interleaved_one_f_one_b>({1, 6, 3}),
                    {.rematerialize = true});
    PIPIT_TCHECK(count(ex) == 0);
  });
  for (const auto name : {"1f1b", "zb-v", "dualpipe-v"}) {
    pipit::testing::null_communicator nc(1, 4);
    copy_stage st;
    rt::executor ex(nc, st,
                    ps::make_plan_by_name(name, {4, 8, name == std::string("1f1b") ? 1 : 2}));
    CHECK(count(ex) == 0);
    CHECK(nc.operations > 0);
  }
}
