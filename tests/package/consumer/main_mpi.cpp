#include <pipit/comm/mpi_consensus.hpp>

int main(int argc, char* argv[]) {
  MPI_Init(&argc, &argv);
  pipit::comm::mpi_require_all(MPI_COMM_WORLD, true, "consumer");
  MPI_Finalize();
  return 0;
}
