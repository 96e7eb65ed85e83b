#pragma once
// MPI error checking: a failed MPI call becomes pipit::error naming the call, MPI's own message
// and the calling rank. Needs MPI (link pipit::mpi).

#include <mpi.h>

#include "pipit/core/error.hpp"

namespace pipit::comm {

inline void mpi_check(int status, const char* call, const char* file, int line) {
  if (status == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(status, text, &len);
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  fail("pipit: MPI call `", call, "` failed on world rank ", rank, ": ", text, " at ", file, ":",
       line);
}

}  // namespace pipit::comm

#define PIPIT_MPI_CHECK(call) ::pipit::comm::mpi_check((call), #call, __FILE__, __LINE__)
