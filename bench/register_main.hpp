#pragma once
// For benchmark programs that register their benchmarks at run time (over schedule policies,
// ranks, sizes): they define register_all() and link pipit_bench_main (register_main.cpp),
// whose main() calls it before Google Benchmark runs.
namespace pipit::bench {
void register_all();
}
