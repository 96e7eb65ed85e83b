#include "register_main.hpp"

#include <benchmark/benchmark.h>

int main(int argc, char** argv) {
  pipit::bench::register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
