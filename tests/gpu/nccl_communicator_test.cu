// cuda::nccl_communicator on the devices of this machine: one communicator per device made by
// ncclCommInitAll, one host thread per rank (nranks = 1 on a one-GPU machine: point-to-point then
// goes to the rank itself, inside exchange()'s group). Results are copied back and checked on
// the host. Without a device the [gpu] cases are reported as Skipped; the unique-id file
// bootstrap needs no device and always runs.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "pipit/comm/threads.hpp"
#include "pipit/core/config.hpp"
#include "pipit/cuda/device.cuh"
#include "pipit/cuda/nccl_communicator.cuh"

using pipit::cuda::nccl_communicator;

namespace {

// The vocabulary layers' kind of merge, callable on the device: NCCL has no such operator, so
// the communicator gathers and merges in rank order.
struct max_sum {
  double m, s;
};
struct merge_max_sum {
  PIPIT_HOST_DEVICE max_sum operator()(const max_sum& a, const max_sum& b) const {
    const double m = a.m < b.m ? b.m : a.m;
    return {m, a.s * ::exp(a.m - m) + b.s * ::exp(b.m - m)};
  }
};

// A device array with host copies in and out.
template <class T>
class device_vector {
 public:
  explicit device_vector(std::size_t n) : n_(n) {
    PIPIT_CUDA_CHECK(
        cudaMalloc(reinterpret_cast<void**>(&p_), std::max<std::size_t>(n_ * sizeof(T), 1)));
  }
  explicit device_vector(const std::vector<T>& h) : device_vector(h.size()) { upload(h); }
  ~device_vector() { (void)cudaFree(p_); }
  device_vector(const device_vector&) = delete;
  device_vector& operator=(const device_vector&) = delete;
  void upload(const std::vector<T>& h) {
    PIPIT_CUDA_CHECK(cudaMemcpy(p_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    PIPIT_CUDA_CHECK(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  std::span<T> span() { return {p_, n_}; }

 private:
  std::size_t n_;
  T* p_ = nullptr;
};

// Runs fn(comm) on one thread per communicator; rethrows the first exception.
template <class F>
void on_every_rank(std::vector<nccl_communicator>& comms, F fn) {
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(comms.size());
  for (std::size_t i = 0; i < comms.size(); ++i)
    pool.emplace_back([&, i] {
      try {
        PIPIT_CUDA_CHECK(cudaSetDevice(comms[i].device()));
        fn(comms[i]);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

std::vector<int> all_devices() {
  std::vector<int> d(static_cast<std::size_t>(std::min(pipit::cuda::device_count(), 8)));
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<int>(i);
  return d;
}

}  // namespace

TEST_CASE("nccl_communicator: exchange, isend/irecv and send/recv move device data",
          "[gpu][nccl]") {
  auto comms = nccl_communicator::init_all(all_devices());
  const int n = static_cast<int>(comms.size());
  std::vector<std::vector<double>> ring(comms.size()), pair(comms.size()), plain(comms.size());
  on_every_rank(comms, [&](nccl_communicator& c) {
    const int r = c.rank(), next = (r + 1) % n, prev = (r + n - 1) % n;
    const auto i = static_cast<std::size_t>(r);
    device_vector<double> out(std::vector<double>(7, r)), in(std::vector<double>(7, -1));
    std::vector<pipit::comm::p2p_op> step{
        pipit::comm::send_op(std::span<const double>(out.span()), next, 0),
        pipit::comm::recv_op(in.span(), prev, 0)};
    c.exchange(step);  // with one rank: to itself, inside one group
    ring[i] = in.download();
    if (n < 2 || (r == n - 1 && n % 2 == 1)) return;
    // Pairs (0,1), (2,3), ...: the even rank sends first, the odd one receives first, so both
    // streams hold the operations in the same order.
    const int partner = r % 2 == 0 ? r + 1 : r - 1;
    device_vector<double> got(std::vector<double>(3, -1)), mine(std::vector<double>(3, 10.0 + r));
    if (r % 2 == 0) {
      auto s = c.isend(std::span<const double>(mine.span()), partner, 1);
      auto q = c.irecv(got.span(), partner, 1);
      c.wait(s);
      c.wait(q);
    } else {
      auto q = c.irecv(got.span(), partner, 1);
      auto s = c.isend(std::span<const double>(mine.span()), partner, 1);
      c.wait(q);
      c.wait(s);
    }
    pair[i] = got.download();
    device_vector<double> got2(std::vector<double>(2, -1)), mine2(std::vector<double>(2, 20.0 + r));
    if (r % 2 == 0) {
      c.send(std::span<const double>(mine2.span()), partner, 2);
      c.recv(got2.span(), partner, 2);
    } else {
      c.recv(got2.span(), partner, 2);
      c.send(std::span<const double>(mine2.span()), partner, 2);
      c.synchronize();
    }
    plain[i] = got2.download();
  });
  for (int r = 0; r < n; ++r) {
    const auto i = static_cast<std::size_t>(r);
    CHECK(ring[i] == std::vector<double>(7, (r + n - 1) % n));
    if (n < 2 || (r == n - 1 && n % 2 == 1)) continue;
    const int partner = r % 2 == 0 ? r + 1 : r - 1;
    CHECK(pair[i] == std::vector<double>(3, 10.0 + partner));
    CHECK(plain[i] == std::vector<double>(2, 20.0 + partner));
  }
}

TEST_CASE("nccl_communicator: every collective, and a merge operator by gather and merge",
          "[gpu][nccl]") {
  auto comms = nccl_communicator::init_all(all_devices());
  const int n = static_cast<int>(comms.size());
  const std::size_t len = 1000;
  struct results {
    std::vector<double> sum, max, reduced, broadcast, gathered;
    std::vector<float> fsum;
    std::vector<long long> isum;
    std::vector<max_sum> merged;
    int group_size = 0, group_sum = 0;
  };
  std::vector<results> res(comms.size());
  const auto local_pair = [](int r, std::size_t i) {
    return max_sum{std::sin(static_cast<double>(r * 131 + static_cast<int>(i))) * 30.0,
                   1.0 + static_cast<double>((r + static_cast<int>(i)) % 7)};
  };
  on_every_rank(comms, [&](nccl_communicator& c) {
    const int r = c.rank();
    results& out = res[static_cast<std::size_t>(r)];
    std::vector<double> h(len), hm(len);
    std::vector<float> hf(len);
    std::vector<long long> hi(len);
    std::vector<max_sum> hp(len);
    for (std::size_t i = 0; i < len; ++i) {
      h[i] = r * 100.0 + static_cast<double>(i);
      hm[i] = std::cos(static_cast<double>(r * 7 + static_cast<int>(i)));
      hf[i] = static_cast<float>(std::sin(static_cast<double>(r + static_cast<int>(i))));
      hi[i] = (1LL << 40) * r + static_cast<long long>(i);
      hp[i] = local_pair(r, i);
    }
    device_vector<double> d(h), dm(hm);
    device_vector<float> df(hf);
    device_vector<long long> di(hi);
    device_vector<max_sum> dp(hp);
    c.all_reduce(d.span(), std::plus<>{});
    c.all_reduce(dm.span(), pipit::comm::max_op{});
    c.all_reduce(df.span(), std::plus<>{});
    c.all_reduce(di.span(), std::plus<long long>{});
    c.all_reduce(dp.span(), merge_max_sum{});
    out.sum = d.download();
    out.max = dm.download();
    out.fsum = df.download();
    out.isum = di.download();
    out.merged = dp.download();
    // Reduce to the last rank, broadcast from it, gather everyone's rank.
    device_vector<double> red(std::vector<double>(4, r + 1.0));
    c.reduce(red.span(), std::plus<>{}, n - 1);
    out.reduced = red.download();
    device_vector<double> b(std::vector<double>(5, r == n - 1 ? 42.0 : -1.0));
    c.broadcast(b.span(), n - 1);
    out.broadcast = b.download();
    device_vector<double> mine(std::vector<double>(2, r)),
        all(std::vector<double>(2 * static_cast<std::size_t>(n), -1));
    c.all_gather(std::span<const double>(mine.span()), all.span());
    out.gathered = all.download();
    c.barrier();
    // Even and odd ranks in separate groups.
    nccl_communicator g = c.split(r % 2, r);
    device_vector<int> one(std::vector<int>(1, r));
    g.all_reduce(one.span(), std::plus<>{});
    out.group_size = g.size();
    out.group_sum = one.download()[0];
  });
  for (int r = 0; r < n; ++r) {
    const results& out = res[static_cast<std::size_t>(r)];
    INFO("rank " << r << " of " << n);
    for (std::size_t i = 0; i < len; ++i) {
      REQUIRE(out.sum[i] == 100.0 * n * (n - 1) / 2 + n * static_cast<double>(i));
      double m = -2;
      for (int q = 0; q < n; ++q)
        m = std::max(m, std::cos(static_cast<double>(q * 7 + static_cast<int>(i))));
      REQUIRE(out.max[i] == m);
      REQUIRE(out.isum[i] == (1LL << 40) * n * (n - 1) / 2 + n * static_cast<long long>(i));
      max_sum serial = local_pair(0, i);
      for (int q = 1; q < n; ++q) serial = merge_max_sum{}(serial, local_pair(q, i));
      REQUIRE(out.merged[i].m == serial.m);
      REQUIRE(out.merged[i].s == Approx(serial.s).epsilon(1e-12));  // device exp vs host exp
    }
    // Bit-identical on every rank.
    CHECK(std::memcmp(out.sum.data(), res[0].sum.data(), len * sizeof(double)) == 0);
    CHECK(std::memcmp(out.fsum.data(), res[0].fsum.data(), len * sizeof(float)) == 0);
    CHECK(std::memcmp(out.merged.data(), res[0].merged.data(), len * sizeof(max_sum)) == 0);
    if (r == n - 1) CHECK(out.reduced == std::vector<double>(4, n * (n + 1) / 2.0));
    CHECK(out.broadcast == std::vector<double>(5, 42.0));
    for (int q = 0; q < n; ++q) {
      CHECK(out.gathered[2 * static_cast<std::size_t>(q)] == q);
      CHECK(out.gathered[2 * static_cast<std::size_t>(q) + 1] == q);
    }
    int expect_size = 0, expect_sum = 0;
    for (int q = r % 2; q < n; q += 2) {
      ++expect_size;
      expect_sum += q;
    }
    CHECK(out.group_size == expect_size);
    CHECK(out.group_sum == expect_sum);
  }
}

TEST_CASE("nccl_communicator: bootstrap through a host communicator and through a file",
          "[gpu][nccl]") {
  pipit::comm::threads::run(1, [](pipit::comm::threads& host) {
    const ncclUniqueId id = pipit::cuda::nccl_unique_id(host);
    nccl_communicator c(id, 1, 0, 0);
    device_vector<int> v(std::vector<int>(3, 5));
    c.all_reduce(v.span(), std::plus<>{});
    if (v.download() != std::vector<int>(3, 5))
      throw pipit::error("all_reduce on 1 rank changed data");
  });
  const auto file = std::filesystem::temp_directory_path() / "pipit_nccl_gpu_test.ncclid";
  std::filesystem::remove(file);
  const ncclUniqueId id = pipit::cuda::nccl_unique_id_from_file(file, 0);
  nccl_communicator c(id, 1, 0, 0, pipit::cuda::nccl_options{std::chrono::milliseconds(20000)});
  CHECK(c.size() == 1);
  CHECK(c.rank() == 0);
  c.barrier();
  std::filesystem::remove(file);
}

TEST_CASE("the NCCL unique id travels through a file (no device needed)", "[nccl]") {
  const auto file = std::filesystem::temp_directory_path() /
                    ("pipit_nccl_id_test_" +
                     std::to_string(std::hash<std::thread::id>{}(std::this_thread::get_id())));
  std::filesystem::remove(file);
  ncclUniqueId read{};
  std::thread reader([&] { read = pipit::cuda::nccl_unique_id_from_file(file, 1); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the reader waits for the file
  const ncclUniqueId written = pipit::cuda::nccl_unique_id_from_file(file, 0);
  reader.join();
  CHECK(std::memcmp(&read, &written, sizeof read) == 0);
  std::filesystem::remove(file);
  CHECK_THROWS_WITH(pipit::cuda::nccl_unique_id_from_file(file, 3, std::chrono::milliseconds(30)),
                    Catch::Contains("rank 3 waited 30 ms for the NCCL unique id in") &&
                        Catch::Contains(file.string()));
}
