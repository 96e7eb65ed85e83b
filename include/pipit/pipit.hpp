#pragma once
// Umbrella header for pipit's host (CPU) API. It never includes a CUDA, NCCL or MPI header:
// those parts have their own headers (pipit/cuda/*.cuh, pipit/comm/mpi_*.hpp).

#include "pipit/core/config.hpp"
#include "pipit/core/error.hpp"
#include "pipit/core/fixed_vector.hpp"
#include "pipit/core/math.hpp"
#include "pipit/core/version.hpp"
