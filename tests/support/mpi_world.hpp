#pragma once
// The calling process's rank and the size of MPI_COMM_WORLD, for MPI test programs.
#include <mpi.h>

namespace pipit::testing {
inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int world_size() {
  int s = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}
}  // namespace pipit::testing
