# Build-tree setup of the MPI parts (PIPIT_ENABLE_MPI = AUTO | ON | OFF).
# Sets PIPIT_HAS_MPI; defines pipit::mpi when available.
include(pipit_components)
set(PIPIT_HAS_MPI OFF)
if(NOT PIPIT_ENABLE_MPI STREQUAL "OFF")
  pipit_component_mpi(pipit_mpi _ok)
  if(_ok)
    add_library(pipit::mpi ALIAS pipit_mpi)
    set(PIPIT_HAS_MPI ON)
    find_package(MPI QUIET COMPONENTS CXX)  # again at this scope, for MPIEXEC_* in tests
  elseif(PIPIT_ENABLE_MPI STREQUAL "ON")
    message(FATAL_ERROR "pipit: PIPIT_ENABLE_MPI=ON but MPI (C++) was not found")
  endif()
endif()
if(PIPIT_HAS_MPI)
  message(STATUS "pipit: MPI on (${MPIEXEC_EXECUTABLE}, MPI ${MPI_CXX_VERSION})")
else()
  message(STATUS "pipit: MPI off (PIPIT_ENABLE_MPI=${PIPIT_ENABLE_MPI}; not found or disabled)")
endif()
