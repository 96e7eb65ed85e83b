// Catch2 main for MPI test programs: every rank runs the selected cases; rank 0 prints the total
// of failed assertions; a rank exits non-zero if it failed, so mpirun fails.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <mpi.h>

#include <cstdio>

#include "support/mpi_world.hpp"

int main(int argc, char* argv[]) {
  MPI_Init(&argc, &argv);
  const int failures = Catch::Session().run(argc, argv);
  int total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (pipit::testing::world_rank() == 0)
    std::printf("mpi: %d rank(s), %d failed assertion(s) in all\n", pipit::testing::world_size(),
                total);
  MPI_Finalize();
  return failures == 0 ? 0 : 1;
}
