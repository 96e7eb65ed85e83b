// TPI-LLM's sliding-window weight streaming on the host: pipit's weight-block file format (round
// trip, every kind of damage refused with a message naming the file and values), the window
// (outputs equal an all-in-memory run bitwise for every window size, float and double; resident
// weight memory bounded by the window by pipit's accounting and by the process's RSS; errors
// reach the caller and the loader thread stops without a hang) and the stall-free condition of
// cost/weight_streaming.hpp on cases worked out by hand.
//
// The model: L layers of two blocks each, as TPI-LLM splits them: an "attention" half
// x <- x + tanh(W x + b) (W d×d, b d) and an "MLP" half x <- x + W2 tanh(W1 x) (W1 f×d, W2 d×f).
// One function computes a block from spans, whether they come from vectors kept in memory (the
// reference) or from the window, so equality is exact, not within a tolerance.

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "pipit/cost/weight_streaming.hpp"
#include "pipit/runtime/weight_file.hpp"
#include "pipit/runtime/weight_window.hpp"

namespace {

namespace fs = std::filesystem;
namespace rt = pipit::runtime;
namespace cost = pipit::cost;

// A fresh directory under the system's temporary directory, removed at the end of the test.
struct temp_dir {
  fs::path path;
  temp_dir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("pipit_weight_stream_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
};

template <class T>
std::vector<T> random_values(std::size_t n, unsigned seed, double scale) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  std::vector<T> v(n);
  for (T& x : v) x = static_cast<T>(u(gen));
  return v;
}

struct model_shape {
  std::size_t layers, d, f;
  std::size_t blocks() const { return 2 * layers; }
};

// Block b's tensors (deterministic in b): attention halves {W, b}, MLP halves {W1, W2}.
template <class T>
std::vector<std::vector<T>> block_tensors(const model_shape& m, std::size_t b) {
  const double s = 1.0 / std::sqrt(double(m.d));
  if (b % 2 == 0)
    return {random_values<T>(m.d * m.d, unsigned(100 + b), s),
            random_values<T>(m.d, unsigned(200 + b), 0.1)};
  return {random_values<T>(m.f * m.d, unsigned(300 + b), s),
          random_values<T>(m.d * m.f, unsigned(400 + b), 1.0 / std::sqrt(double(m.f)))};
}

template <class T>
void apply_block(const model_shape& m, std::size_t b, std::span<const T> t0, std::span<const T> t1,
                 std::vector<T>& x) {
  if (b % 2 == 0) {
    std::vector<T> y(m.d);
    for (std::size_t i = 0; i < m.d; ++i) {
      T acc = t1[i];
      for (std::size_t j = 0; j < m.d; ++j) acc += t0[i * m.d + j] * x[j];
      y[i] = std::tanh(acc);
    }
    for (std::size_t i = 0; i < m.d; ++i) x[i] += y[i];
  } else {
    std::vector<T> h(m.f);
    for (std::size_t i = 0; i < m.f; ++i) {
      T acc = 0;
      for (std::size_t j = 0; j < m.d; ++j) acc += t0[i * m.d + j] * x[j];
      h[i] = std::tanh(acc);
    }
    for (std::size_t i = 0; i < m.d; ++i) {
      T acc = 0;
      for (std::size_t j = 0; j < m.f; ++j) acc += t1[i * m.f + j] * h[j];
      x[i] += acc;
    }
  }
}

template <class T>
std::vector<T> token_input(const model_shape& m, std::size_t token) {
  return random_values<T>(m.d, unsigned(7 + token), 1.0);
}

// Writes the model's block files; returns their paths.
template <class T>
std::vector<fs::path> write_model(const model_shape& m, const fs::path& dir) {
  std::vector<fs::path> paths;
  for (std::size_t b = 0; b < m.blocks(); ++b) {
    const auto t = block_tensors<T>(m, b);
    const bool attn = b % 2 == 0;
    const std::vector<rt::weight_tensor<T>> ts{
        {attn ? std::vector<std::uint64_t>{m.d, m.d} : std::vector<std::uint64_t>{m.f, m.d}, t[0]},
        {attn ? std::vector<std::uint64_t>{m.d} : std::vector<std::uint64_t>{m.d, m.f}, t[1]}};
    paths.push_back(dir / ("block_" + std::to_string(b) + ".pwb"));
    rt::write_weight_block<T>(paths.back(), ts);
  }
  return paths;
}

// The all-in-memory run: every block's tensors in vectors, `tokens` tokens in a row.
template <class T>
std::vector<T> reference_run(const model_shape& m, std::size_t tokens) {
  std::vector<std::vector<std::vector<T>>> w;
  for (std::size_t b = 0; b < m.blocks(); ++b) w.push_back(block_tensors<T>(m, b));
  std::vector<T> out;
  for (std::size_t t = 0; t < tokens; ++t) {
    auto x = token_input<T>(m, t);
    for (std::size_t b = 0; b < m.blocks(); ++b) apply_block<T>(m, b, w[b][0], w[b][1], x);
    out.insert(out.end(), x.begin(), x.end());
  }
  return out;
}

// The same through the window; `release_early`: release each block after its compute, as
// TPI-LLM does before the all-reduce (otherwise the next acquire releases it).
template <class T>
std::vector<T> streamed_run(const model_shape& m, std::size_t tokens, rt::weight_window& win,
                            bool release_early, std::size_t* peak_accounted = nullptr) {
  std::vector<T> out;
  for (std::size_t t = 0; t < tokens; ++t) {
    auto x = token_input<T>(m, t);
    for (std::size_t b = 0; b < m.blocks(); ++b) {
      const rt::weight_block& w = win.acquire(b);
      REQUIRE(w.tensors() == 2);
      apply_block<T>(m, b, w.tensor<T>(0), w.tensor<T>(1), x);
      if (peak_accounted != nullptr)
        *peak_accounted = std::max(*peak_accounted, win.stats().resident_bytes);
      if (release_early) win.release(b);
    }
    out.insert(out.end(), x.begin(), x.end());
  }
  return out;
}

template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Resident set size of this process, bytes; -1 where /proc/self/status is not available.
long long rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return -1;
}

void corrupt_byte(const fs::path& p, std::uintmax_t offset) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(std::streamoff(offset));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5a);
  f.seekp(std::streamoff(offset));
  f.write(&c, 1);
}

template <class T>
void check_window_equals_reference() {
  temp_dir dir;
  const model_shape m{.layers = 4, .d = 24, .f = 40};
  const auto paths = write_model<T>(m, dir.path);
  const std::size_t tokens = 3, n = m.blocks();
  const auto ref = reference_run<T>(m, tokens);
  for (int k : {1, 2, 3, 5, int(n), int(n) + 4}) {
    for (bool early : {false, true}) {
      INFO("window " << k << ", release early " << early);
      rt::weight_window win(paths, {.window = k});
      std::size_t peak_seen = 0;
      const auto out = streamed_run<T>(m, tokens, win, early, &peak_seen);
      CHECK(bitwise_equal(out, ref));
      const auto s = win.stats();
      CHECK(s.peak_resident_bytes <= win.resident_bound());
      CHECK(peak_seen <= s.peak_resident_bytes);
      if (std::size_t(k) >= n) {
        CHECK(win.all_resident());
        CHECK(s.loads == n);  // read once, kept
      } else {
        CHECK(s.loads >= tokens * n);  // every block of every token, plus read-ahead
        CHECK(s.loads <= tokens * n + std::size_t(k));
      }
    }
  }
}

}  // namespace

TEST_CASE("weight block files round-trip every tensor bit for bit", "[runtime][memory]") {
  temp_dir dir;
  const auto a = random_values<float>(3 * 5, 1, 1.0), b = random_values<float>(7, 2, 1.0);
  const auto c = random_values<double>(2 * 3 * 4 * 5, 3, 1.0);
  const fs::path pf = dir.path / "f.pwb", pd = dir.path / "d.pwb";
  rt::write_weight_block<float>(pf, {{{3, 5}, a}, {{7}, b}});
  rt::write_weight_block<double>(pd, {{{2, 3, 4, 5}, c}});

  const auto info = rt::read_weight_file_info(pf);
  CHECK(info.dtype == rt::weight_dtype::f32);
  REQUIRE(info.tensors.size() == 2);
  CHECK(info.tensors[0].rank == 2);
  CHECK(info.tensors[0].dims[0] == 3);
  CHECK(info.tensors[0].dims[1] == 5);
  CHECK(info.tensors[1].offset % rt::weight_file_alignment == 0);
  CHECK(info.payload_offset % rt::weight_file_alignment == 0);
  CHECK(fs::file_size(pf) == info.file_bytes());

  const auto blk = rt::read_weight_block(pf);
  const auto ta = blk.tensor<float>(0), tb = blk.tensor<float>(1);
  CHECK(std::memcmp(ta.data(), a.data(), a.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(tb.data(), b.data(), b.size() * sizeof(float)) == 0);
  CHECK(ta.size() == a.size());
  CHECK_THROWS_WITH(blk.tensor<double>(0), Catch::Contains("stored as dtype 1"));
  CHECK_THROWS_WITH(blk.tensor<float>(2), Catch::Contains("tensor 2 of a block with 2"));

  const auto bd = rt::read_weight_block(pd);
  CHECK(bd.shape(0).rank == 4);
  CHECK(std::memcmp(bd.tensor<double>(0).data(), c.data(), c.size() * sizeof(double)) == 0);

  CHECK_THROWS_WITH(rt::write_weight_block<float>(dir.path / "x.pwb", {{{3, 4}, a}}),
                    Catch::Contains("12 elements but 15 values"));
}

TEST_CASE("corrupt, truncated and foreign weight files are refused with the values named",
          "[runtime][memory]") {
  temp_dir dir;
  const auto a = random_values<float>(64 * 33, 4, 1.0);
  const fs::path good = dir.path / "good.pwb";
  rt::write_weight_block<float>(good, {{{64, 33}, a}});
  const auto info = rt::read_weight_file_info(good);
  auto copy = [&](const char* name) {
    const fs::path p = dir.path / name;
    fs::copy_file(good, p);
    return p;
  };

  SECTION("a flipped payload byte fails the checksum") {
    const auto p = copy("flip.pwb");
    corrupt_byte(p, info.payload_offset + 1000);
    CHECK_NOTHROW(rt::read_weight_file_info(p));  // the header is intact
    CHECK_THROWS_WITH(rt::read_weight_block(p),
                      Catch::Contains("checksum mismatch") && Catch::Contains("flip.pwb"));
  }
  SECTION("a flipped table byte is refused") {
    const auto p = copy("table.pwb");
    corrupt_byte(p, 32 + 8 + 2);  // the first tensor's first dimension
    CHECK_THROWS_AS(rt::read_weight_block(p), pipit::error);
  }
  SECTION("a truncated file names its size and the size its header states") {
    const auto p = copy("short.pwb");
    fs::resize_file(p, info.file_bytes() - 100);
    CHECK_THROWS_WITH(rt::read_weight_file_info(p),
                      Catch::Contains("truncated") &&
                          Catch::Contains(std::to_string(info.file_bytes() - 100) + " bytes") &&
                          Catch::Contains(std::to_string(info.file_bytes())));
    fs::resize_file(p, 10);
    CHECK_THROWS_WITH(rt::read_weight_file_info(p), Catch::Contains("truncated"));
  }
  SECTION("a file that is not a weight block, or a newer version") {
    const auto p = copy("magic.pwb");
    corrupt_byte(p, 0);
    CHECK_THROWS_WITH(rt::read_weight_file_info(p), Catch::Contains("bad magic"));
    const auto q = copy("version.pwb");
    corrupt_byte(q, 8);
    CHECK_THROWS_WITH(rt::read_weight_file_info(q), Catch::Contains("version"));
    CHECK_THROWS_WITH(rt::read_weight_file_info(dir.path / "missing.pwb"),
                      Catch::Contains("missing.pwb"));
  }
}

TEST_CASE("streamed float outputs equal the all-in-memory run bitwise for every window",
          "[runtime][memory]") {
  check_window_equals_reference<float>();
}

TEST_CASE("streamed double outputs equal the all-in-memory run bitwise for every window",
          "[runtime][memory]") {
  check_window_equals_reference<double>();
}

TEST_CASE("resident weight memory is bounded by the window, by accounting and by RSS",
          "[runtime][memory]") {
  temp_dir dir;
  // 16 blocks: attention halves 1 MiB, MLP halves 4 MiB: 40 MiB in all, a window of 2 holds
  // at most 8 MiB.
  const model_shape m{.layers = 8, .d = 512, .f = 1024};
  const auto paths = write_model<float>(m, dir.path);
  std::size_t total = 0;
  for (const auto& p : paths) total += rt::read_weight_file_info(p).payload_bytes;
  const std::size_t tokens = 2;

  // Streams the model; returns (peak RSS − RSS before the window existed, the window's stats).
  auto stream = [&](int k, std::size_t& bound) {
    const long long base = rss_bytes();
    long long rss_peak = base;
    rt::weight_window win(paths, {.window = k});
    bound = win.resident_bound();
    for (std::size_t t = 0; t < tokens; ++t) {
      auto x = token_input<float>(m, t);
      for (std::size_t b = 0; b < m.blocks(); ++b) {
        const auto& w = win.acquire(b);
        rss_peak = std::max(rss_peak, rss_bytes());
        apply_block<float>(m, b, w.tensor<float>(0), w.tensor<float>(1), x);
        rss_peak = std::max(rss_peak, rss_bytes());
        win.release(b);
      }
    }
    return std::pair{base < 0 ? -1 : rss_peak - base, win.stats()};
  };

  std::size_t bound = 0;
  const auto [grown, s] = stream(2, bound);
  CHECK(bound <= 2 * (std::size_t(4) << 20) + 2 * rt::mapped_buffer::page_size());
  CHECK(s.peak_resident_bytes <= bound);
  CHECK(s.peak_resident_bytes >= (std::size_t(4) << 20));  // at least one MLP half
  CHECK(s.bytes_read >= tokens * total);
  // The same model all in memory (k = n): the accounting and RSS see all of it, which shows
  // that the measurement above would have seen a leak.
  std::size_t bound_all = 0;
  const auto [grown_all, s_all] = stream(int(m.blocks()), bound_all);
  CHECK(s_all.peak_resident_bytes >= total);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  const bool sanitized = true;  // shadow memory for every mapping inflates RSS
#else
  const bool sanitized = false;
#endif
  if (grown < 0 || sanitized) {
    WARN("no /proc/self/status, or a sanitizer build: the RSS half of this test is skipped");
  } else {
    // The loader's buffers are mapped and unmapped whole, so RSS follows the accounting; the
    // slack covers the loader thread's stack and the allocator.
    INFO("RSS grew by " << grown << " bytes (all in memory: " << grown_all << "); window bound "
                        << bound << ", model " << total);
    CHECK(grown <= static_cast<long long>(bound + (std::size_t(6) << 20)));
    CHECK(grown < static_cast<long long>(total / 2));
    CHECK(grown_all >= static_cast<long long>(total * 9 / 10));
  }
}

TEST_CASE("the window refuses bad parameters and bad order", "[runtime][memory]") {
  temp_dir dir;
  const model_shape m{.layers = 2, .d = 8, .f = 8};
  const auto paths = write_model<float>(m, dir.path);
  CHECK_THROWS_WITH(rt::weight_window(paths, {.window = 0}),
                    Catch::Contains("window k = 0") && Catch::Contains("at least 1 block"));
  CHECK_THROWS_WITH(rt::weight_window(paths, {.window = -3}), Catch::Contains("window k = -3"));
  CHECK_THROWS_WITH(rt::weight_window({}, {.window = 2}), Catch::Contains("no block files"));
  CHECK_THROWS_WITH(rt::weight_window(paths, {.window = 2, .disk_bandwidth = -1}),
                    Catch::Contains("bandwidth -1"));

  rt::weight_window win(paths, {.window = 2});
  CHECK_THROWS_WITH(win.acquire(1), Catch::Contains("acquire(1)") && Catch::Contains("block 0"));
  CHECK_THROWS_WITH(win.release(0), Catch::Contains("release(0)"));
  win.acquire(0);
  CHECK_THROWS_WITH(win.release(1), Catch::Contains("release(1)"));
  win.release(0);
  win.acquire(1);
  win.acquire(2);
  win.acquire(3);
  win.acquire(0);  // wraps around for the next token
  CHECK(win.stats().loads >= 5);
}

TEST_CASE("a header damaged on disk is refused when the window is made", "[runtime][memory]") {
  temp_dir dir;
  const model_shape m{.layers = 2, .d = 8, .f = 8};
  const auto paths = write_model<float>(m, dir.path);
  fs::resize_file(paths[2], fs::file_size(paths[2]) - 8);
  CHECK_THROWS_WITH(rt::weight_window(paths, {.window = 2}),
                    Catch::Contains("block_2.pwb") && Catch::Contains("truncated"));
}

TEST_CASE("a corrupt block reaches the acquire that needs it and the loader stops cleanly",
          "[runtime][memory]") {
  temp_dir dir;
  const model_shape m{.layers = 3, .d = 16, .f = 16};
  const auto paths = write_model<float>(m, dir.path);
  const auto info = rt::read_weight_file_info(paths[3]);
  corrupt_byte(paths[3], info.payload_offset + 12);
  for (int k : {1, 2, 4, 6}) {
    INFO("window " << k);
    rt::weight_window win(paths, {.window = k});
    std::vector<float> x(m.d, 0.5f);
    for (std::size_t b = 0; b < 3; ++b) {
      const auto& w = win.acquire(b);  // the blocks before the bad one are fine
      apply_block<float>(m, b, w.tensor<float>(0), w.tensor<float>(1), x);
    }
    CHECK_THROWS_WITH(win.acquire(3),
                      Catch::Contains("checksum mismatch") && Catch::Contains("block_3.pwb"));
    // The loader has stopped; the destructor joins it (the test would hang otherwise).
  }
}

TEST_CASE("destroying a window during a slow read cancels it promptly", "[runtime][memory]") {
  temp_dir dir;
  const model_shape m{.layers = 2, .d = 256, .f = 1024};  // MLP halves of 2 MiB
  const auto paths = write_model<float>(m, dir.path);
  const auto t0 = std::chrono::steady_clock::now();
  {
    // 1 MB/s: each MLP block would take 2 s to read.
    rt::weight_window win(paths, {.window = 3, .disk_bandwidth = 1e6});
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(dt < 1.5);
}

TEST_CASE("the stall-free condition and the streaming recurrence on worked cases",
          "[cost][memory]") {
  // 4 blocks, each: read 1, compute 1, all-reduce 0.5.
  const std::vector<cost::streamed_block> blocks(4, {.load = 1, .compute = 1, .communicate = 0.5});
  SECTION("w = 2: load(next) = 1 <= compute + all-reduce = 1.5, no stall") {
    const auto e = cost::estimate_weight_streaming(blocks, 2);
    CHECK(e.window_condition);
    CHECK(e.worst_slack == Approx(0.5));
    CHECK(e.loader_keeps_up);
    CHECK(e.stall_free);
    CHECK(e.pass_time == Approx(4 * 1.5));
    CHECK(e.stall_time == Approx(0).margin(1e-12));
  }
  SECTION("w = 1: the read only overlaps the all-reduce: compute + max(read, all-reduce)") {
    const auto e = cost::estimate_weight_streaming(blocks, 1);
    CHECK_FALSE(e.window_condition);
    CHECK_FALSE(e.stall_free);
    CHECK(e.pass_time == Approx(4 * (1 + 1.0)));
    CHECK(e.stall_time == Approx(4 * 0.5));
  }
  SECTION("w = 3 and a slow disk: the closed form holds per block, the one disk does not keep up") {
    const std::vector<cost::streamed_block> slow(4, {.load = 2, .compute = 1, .communicate = 0.5});
    const auto e = cost::estimate_weight_streaming(slow, 3);
    CHECK(e.window_condition);  // 2 <= 2 · 1.5
    CHECK_FALSE(e.loader_keeps_up);
    CHECK_FALSE(e.stall_free);
    CHECK(e.pass_time == Approx(4 * 2.0));  // disk-bound
  }
  SECTION("w >= n: read once, then compute and communicate only") {
    const auto e = cost::estimate_weight_streaming(blocks, 4);
    CHECK(e.stall_free);
    CHECK(e.pass_time == Approx(4 * 1.5));
    CHECK(e.first_pass_time == Approx(1 + 4 * 1.5));
  }
  SECTION("offload: k' = k hides nothing, k' < k hides the copies when they fit") {
    const std::vector<cost::streamed_block> layers(4, {.load = 1, .compute = 1, .communicate = 0});
    const auto all = cost::estimate_layer_offload(layers, 2, 2);
    CHECK_FALSE(all.window_condition);
    CHECK(all.worst_slack == Approx(-2));  // 2 copies, 0 resident layers computing
    CHECK(all.pass_time == Approx(6));     // [load 2][c c] then [load 1 .. ][c c] : 1+1+1+1+1+1
    CHECK(all.stall_time == Approx(1));
    const auto one = cost::estimate_layer_offload(layers, 2, 1);
    CHECK(one.window_condition);
    CHECK(one.stall_free);
    CHECK(one.pass_time == Approx(5));  // one cold load, then 4 computes back to back
    const auto res = cost::estimate_layer_offload(layers, 4, 1);
    CHECK(res.pass_time == Approx(5));
  }
  CHECK_THROWS_WITH(cost::estimate_weight_streaming(blocks, 0), Catch::Contains("window k = 0"));
  CHECK_THROWS_WITH(cost::estimate_layer_offload(blocks, 2, 3),
                    Catch::Contains("k' = 3") && Catch::Contains("k = 2"));
}
