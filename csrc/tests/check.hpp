// The tiny check harness shared by the C++ test executables: Check() counts, Report() prints the
// closing "N passed, N failed" line and gives main's exit code.
#pragma once

#include <cstdio>
#include <string>

namespace tracin_test {

struct Tally {
  int passed = 0;
  int failed = 0;
};

inline Tally& Counts() {
  static Tally tally;
  return tally;
}

inline void Check(bool ok, const std::string& what) {
  if (ok) {
    ++Counts().passed;
  } else {
    ++Counts().failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

inline int Report() {
  std::printf("%d passed, %d failed\n", Counts().passed, Counts().failed);
  return Counts().failed == 0 ? 0 : 1;
}

}  // namespace tracin_test
