// Run under mpirun with several ranks: every rank runs the same Catch2 cases; mpirun fails if
// any rank reports a failure.
#include <catch2/catch.hpp>

#include <mpi.h>

#include <string>

#include "pipit/comm/mpi_consensus.hpp"
#include "support/mpi_world.hpp"

namespace {
using pipit::testing::world_rank;
using pipit::testing::world_size;
}  // namespace

TEST_CASE("mpi_require_all passes when every rank is fine", "[mpi]") {
  CHECK_NOTHROW(pipit::comm::mpi_require_all(MPI_COMM_WORLD, true, "setup"));
}

TEST_CASE("one rank's failure raises the same error on every rank", "[mpi]") {
  REQUIRE(world_size() >= 3);
  const bool ok = world_rank() != 2;
  try {
    pipit::comm::mpi_require_all(MPI_COMM_WORLD, ok, "loading the plan");
    FAIL("rank " << world_rank() << " did not raise");
  } catch (const pipit::error& e) {
    const std::string what = e.what();
    CHECK(what.find("loading the plan failed on rank(s) 2 of " + std::to_string(world_size())) !=
          std::string::npos);
  }
  // The communicator is still usable afterwards: nobody is stuck in a collective.
  CHECK_NOTHROW(pipit::comm::mpi_require_all(MPI_COMM_WORLD, true, "after"));
}

TEST_CASE("PIPIT_MPI_CHECK turns an MPI error into pipit::error", "[mpi]") {
  MPI_Comm comm;
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int x = 0;
  CHECK_THROWS_WITH(PIPIT_MPI_CHECK(MPI_Send(&x, 1, MPI_INT, 1 << 20, 0, comm)),
                    Catch::Contains("MPI_Send") && Catch::Contains("world rank"));
  MPI_Comm_free(&comm);
}
