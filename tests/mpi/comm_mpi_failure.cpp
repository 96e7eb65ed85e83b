// A program written the way a user's trainer is, run under mpirun in one failure scenario per
// invocation; CTest checks each rank's output and mpirun's exit code
// (tests/mpi/CMakeLists.txt, cmake/pipit_check_output.cmake).
//
//   comm_mpi_failure none    every rank finishes: "rank R: ok", exit 0
//   comm_mpi_failure throw   rank 2 throws: every rank prints the error naming rank 2, exit 3
//   comm_mpi_failure silent  rank 3 is stuck for 1 s: the others raise after the 300 ms timeout,
//                            rank 3 at its next call; all print, exit 3 (clean finalisation)
//   comm_mpi_failure hung    rank 3 is stuck for 60 s: the others raise after 300 ms, wait 1 s
//                            for acknowledgements, print and call MPI_Abort (mpirun exits 1)
//
// Each rank also checks when its own code saw the error and prints "rank R: in time" or
// "rank R: TOO LATE". (run() itself returns once every rank has acknowledged the failure.)
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>

#include "pipit/comm/mpi_communicator.hpp"

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int main(int argc, char* argv[]) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const std::string scenario = argc > 1 ? argv[1] : "none";
  pipit::comm::mpi_options o;
  o.timeout = std::chrono::milliseconds(scenario == "throw" || scenario == "none" ? 20000 : 300);
  o.acknowledge_timeout = std::chrono::milliseconds(scenario == "hung" ? 1000 : 10000);
  const auto t0 = std::chrono::steady_clock::now();
  int rc = 0;
  double raised_after = -1;  // when this rank's own code saw the error
  try {
    pipit::comm::mpi::run(
        MPI_COMM_WORLD,
        [&](pipit::comm::mpi& comm) {
          try {
            double x = comm.rank();
            comm.all_reduce(std::span<double>(&x, 1), std::plus<>{});  // everyone is here
            if (scenario == "throw" && comm.rank() == 2)
              throw std::runtime_error("boom on purpose");
            if ((scenario == "silent" || scenario == "hung") && comm.rank() == 3)
              std::this_thread::sleep_for(std::chrono::seconds(scenario == "silent" ? 1 : 60));
            comm.all_reduce(std::span<double>(&x, 1), std::plus<>{});
            comm.barrier();
          } catch (...) {
            raised_after = seconds_since(t0);
            throw;
          }
        },
        o);
    std::printf("rank %d: ok\n", rank);
  } catch (const pipit::error& e) {
    // throw: notified at once; silent: the 300 ms timeout, not rank 3's 1 s sleep, bounds when
    // the others raise; rank 3 raises at its first call after the sleep.
    const double limit = scenario == "throw" ? 10.0 : rank == 3 ? 3.0 : 0.95;
    std::printf("rank %d: pipit::error: %s\nrank %d: %s\n", rank, e.what(), rank,
                raised_after >= 0 && raised_after < limit ? "in time" : "TOO LATE");
    rc = 3;
  }
  std::fflush(stdout);
  MPI_Finalize();
  return rc;
}
