// The tiny check harness shared by the C++ test executables: Check() counts, Report() prints the
// closing "N passed, N failed" line and gives main's exit code; CpuRuns() says, independently of
// the library, whether an instruction set can run here.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "tracin/tracin.hpp"

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

// Whether this CPU (and a build with the x86 kernels: GCC or Clang on x86-64) runs `isa`.
inline bool CpuRuns(tracin::Isa isa) {
  switch (isa) {
    case tracin::Isa::kGeneric:
      return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    case tracin::Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case tracin::Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
#endif
    default:
      return false;
  }
}

// The instruction sets to test: each one this CPU runs (checking that the library runs it when
// asked), with a printed line for each one it does not (checking that the library falls back).
inline std::vector<tracin::Isa> RunnableIsas(const char* test_name) {
  std::vector<tracin::Isa> runnable;
  for (tracin::Isa isa : {tracin::Isa::kGeneric, tracin::Isa::kAvx2, tracin::Isa::kAvx512}) {
    const tracin::Isa used = tracin::ResolveIsa(isa);
    if (CpuRuns(isa)) {
      Check(used == isa, std::string(test_name) + ": isa " + tracin::IsaName(isa) + " runs as asked, not as " +
                             tracin::IsaName(used));
      runnable.push_back(isa);
    } else {
      std::printf("skipped %s with isa %s: not supported by this CPU\n", test_name, tracin::IsaName(isa));
      Check(used != isa && CpuRuns(used), std::string(test_name) + ": unsupported isa " +
                                              tracin::IsaName(isa) + " falls back to a supported one");
    }
  }
  return runnable;
}

inline int Report() {
  std::printf("%d passed, %d failed\n", Counts().passed, Counts().failed);
  return Counts().failed == 0 ? 0 : 1;
}

}  // namespace tracin_test
