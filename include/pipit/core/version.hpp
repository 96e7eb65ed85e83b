#pragma once
// The library version. Kept equal to project(pipit VERSION ...) in CMakeLists.txt: the package
// test (tests/package) asserts that the installed header and the CMake package agree.

#define PIPIT_VERSION_MAJOR 0
#define PIPIT_VERSION_MINOR 1
#define PIPIT_VERSION_PATCH 0
// One comparable integer: major * 10000 + minor * 100 + patch.
#define PIPIT_VERSION \
  (PIPIT_VERSION_MAJOR * 10000 + PIPIT_VERSION_MINOR * 100 + PIPIT_VERSION_PATCH)

namespace pipit {
inline constexpr int version_major = PIPIT_VERSION_MAJOR;
inline constexpr int version_minor = PIPIT_VERSION_MINOR;
inline constexpr int version_patch = PIPIT_VERSION_PATCH;
}  // namespace pipit
