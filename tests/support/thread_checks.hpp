#pragma once
// Catch2 v2 assertions are not thread-safe; tests that assert inside rank threads use these,
// which serialise the assertion through one mutex. A failed PIPIT_TREQUIRE throws out of the
// rank's function, which fails the whole threads::run and so the test.
#include <catch2/catch.hpp>

#include <mutex>

namespace pipit::testing {
inline std::mutex& catch_mutex() {
  static std::mutex m;
  return m;
}
}  // namespace pipit::testing

#define PIPIT_TCHECK(...)                                                     \
  do {                                                                        \
    std::lock_guard<std::mutex> pipit_lock_(::pipit::testing::catch_mutex()); \
    CHECK(__VA_ARGS__);                                                       \
  } while (false)
#define PIPIT_TREQUIRE(...)                                                   \
  do {                                                                        \
    std::lock_guard<std::mutex> pipit_lock_(::pipit::testing::catch_mutex()); \
    REQUIRE(__VA_ARGS__);                                                     \
  } while (false)
#define PIPIT_TCHECK_THROWS_WITH(expr, matcher)                               \
  do {                                                                        \
    std::lock_guard<std::mutex> pipit_lock_(::pipit::testing::catch_mutex()); \
    CHECK_THROWS_WITH(expr, matcher);                                         \
  } while (false)
