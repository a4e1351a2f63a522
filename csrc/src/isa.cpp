// Run-time choice of the kernel table.
#include "kernels.hpp"

namespace tracin {
namespace {

bool CpuHas(Isa isa) {
#if defined(TRACIN_HAVE_X86_KERNELS)
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    default:
      return isa == Isa::kGeneric;
  }
#else
  return isa == Isa::kGeneric;
#endif
}

}  // namespace

Isa DetectIsa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (CpuHas(isa)) return isa;
  return Isa::kGeneric;
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kGeneric:
      return "generic";
    default:
      return "auto";
  }
}

Isa ResolveIsa(Isa requested) {
  const Isa best = DetectIsa();
  return requested == Isa::kAuto || static_cast<int>(requested) > static_cast<int>(best) ? best
                                                                                          : requested;
}

namespace detail {

const KernelTable& KernelsFor(Isa isa) {
  isa = ResolveIsa(isa);
#if defined(TRACIN_HAVE_X86_KERNELS)
  if (isa == Isa::kAvx512) return Avx512Kernels();
  if (isa == Isa::kAvx2) return Avx2Kernels();
#endif
  return GenericKernels();
}

}  // namespace detail
}  // namespace tracin
