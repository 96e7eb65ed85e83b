#pragma once
// Agreement on failure across MPI ranks: every rank says whether its local step succeeded, and
// if any rank failed, *every* rank throws the same pipit::error naming the failed ranks, so a
// local error never leaves the other ranks waiting in a later collective.

#include <mpi.h>

#include <string>
#include <string_view>
#include <vector>

#include "pipit/comm/mpi_check.hpp"

namespace pipit::comm {

// Collective over `comm`: returns normally only if `local_ok` is true on every rank.
inline void mpi_require_all(MPI_Comm comm, bool local_ok, std::string_view what) {
  int size = 0;
  PIPIT_MPI_CHECK(MPI_Comm_size(comm, &size));
  const int mine = local_ok ? 1 : 0;
  std::vector<int> oks(static_cast<std::size_t>(size), 0);
  PIPIT_MPI_CHECK(MPI_Allgather(&mine, 1, MPI_INT, oks.data(), 1, MPI_INT, comm));
  std::string failed;
  for (int r = 0; r < size; ++r)
    if (!oks[static_cast<std::size_t>(r)])
      failed += (failed.empty() ? "" : ", ") + std::to_string(r);
  if (!failed.empty())
    fail("pipit: ", what, " failed on rank(s) ", failed, " of ", size, " in this communicator");
}

}  // namespace pipit::comm
