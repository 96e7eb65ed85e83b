// Catch2 main for executables with [gpu] test cases. Without a usable CUDA device it prints a
// line starting with "PIPIT_SKIP:" and exits 0; CTest's SKIP_REGULAR_EXPRESSION then reports the
// case as Skipped, never as Passed. Listing (used by catch_discover_tests at build time) never
// touches the GPU.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <algorithm>
#include <iostream>

#include "pipit/cuda/device.cuh"

int main(int argc, char* argv[]) {
  Catch::Session session;
  if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
  const Catch::Config& cfg = session.config();
  const bool listing =
      cfg.listTests() || cfg.listTestNamesOnly() || cfg.listTags() || cfg.listReporters();
  if (!listing) {
    const auto& selected =
        Catch::filterTests(Catch::getAllTestCasesSorted(cfg), cfg.testSpec(), cfg);
    const bool wants_gpu = std::any_of(selected.begin(), selected.end(), [](const auto& tc) {
      return std::find(tc.lcaseTags.begin(), tc.lcaseTags.end(), "gpu") != tc.lcaseTags.end();
    });
    if (wants_gpu && !pipit::cuda::has_device()) {
      std::cout << "PIPIT_SKIP: no usable CUDA device; the selected [gpu] test cases did not run\n";
      return 0;
    }
  }
  return session.run();
}
