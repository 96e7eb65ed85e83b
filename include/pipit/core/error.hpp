#pragma once
// pipit::error: the one exception type pipit throws for bad run-time input, failed backends and
// failed peers. Messages name the rule that was broken and the offending values.

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace pipit {

class error : public std::runtime_error {
 public:
  explicit error(const std::string& what) : std::runtime_error(what) {}
  explicit error(const char* what) : std::runtime_error(what) {}
};

namespace detail {
// Streams every argument into one string; used to build messages with values in them.
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

// Throws pipit::error with the streamed arguments as its message.
template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw error(detail::concat(std::forward<Args>(args)...));
}

}  // namespace pipit

// Checks a run-time condition; on failure throws pipit::error naming the condition and the
// streamed context, e.g. PIPIT_REQUIRE(m >= p, "microbatches (", m, ") < stages (", p, ")").
#define PIPIT_REQUIRE(cond, ...)                                                        \
  do {                                                                                  \
    if (!(cond)) ::pipit::fail("pipit: requirement `" #cond "` failed: ", __VA_ARGS__); \
  } while (false)
