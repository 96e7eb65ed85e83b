#include <pipit/pipit.hpp>

#include <cstdio>
#include <cstring>

static_assert(__cplusplus >= 202002L, "pipit::pipit must bring C++20 to its consumers");

int main() {
  char version[32];
  std::snprintf(version, sizeof version, "%d.%d.%d", PIPIT_VERSION_MAJOR, PIPIT_VERSION_MINOR,
                PIPIT_VERSION_PATCH);
  if (std::strcmp(version, PIPIT_EXPECT_VERSION) != 0) {
    std::printf("header version %s != package version %s\n", version, PIPIT_EXPECT_VERSION);
    return 1;
  }
  constexpr pipit::fixed_vector<int, 4> v{1, 2, 3};
  static_assert(v.size() == 3 && pipit::round_up(50257, 128) == 50304);
  std::printf("pipit %s consumed\n", version);
  return 0;
}
