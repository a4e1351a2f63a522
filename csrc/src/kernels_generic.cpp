// Portable kernels: plain C++ the compiler may vectorise for any target.
#include <cmath>

#include "half.hpp"
#include "kernels.hpp"
#include "tunables.hpp"

namespace tracin::detail {
namespace {

inline float MulAdd(float a, float b, float c) {
#if defined(FP_FAST_FMAF)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Out: float (MicroKernel) or double (MicroKernelToDouble): the chains are float32 either way.
template <int MR, int NR, typename Out>
void Micro(std::int64_t kc, const float* a, std::int64_t lda, const float* b, Out* c,
           std::int64_t ldc) {
  float acc[MR][NR] = {};
  for (std::int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * NR;
    TRACIN_UNROLL
    for (int i = 0; i < MR; ++i) {
      const float ai = a[i * lda + k];
      TRACIN_UNROLL
      for (int j = 0; j < NR; ++j) acc[i][j] = MulAdd(ai, bk[j], acc[i][j]);
    }
  }
  TRACIN_UNROLL
  for (int i = 0; i < MR; ++i)
    TRACIN_UNROLL
    for (int j = 0; j < NR; ++j) c[i * ldc + j] += static_cast<Out>(acc[i][j]);
}

void HalfToFloatRun(const std::uint16_t* src, std::int64_t n, float* dst) {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = HalfToFloat(LoadBits16(src, i));
}

void BFloatToFloatRun(const std::uint16_t* src, std::int64_t n, float* dst) {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = BFloat16ToFloat(LoadBits16(src, i));
}

void SquaresRun(const float* x, std::int64_t rows, std::int64_t n, double* sums) {
  for (std::int64_t r = 0; r < rows; ++r, x += n, sums += kNormLanes)
    for (std::int64_t k = 0; k < n; ++k) sums[k % kNormLanes] += static_cast<double>(x[k]) * x[k];
}

// DotKernel (kernels.hpp): 16 sums updated together per 16 values, which the compiler may vectorise
// (each sum is still its own chain of rounded products, added in order).
void DotRun(const double* a, const float* x, std::int64_t n, double* sums) {
  static_assert(kNormLanes == 16, "DotRun keeps 16 sums");
  double acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = sums[j];
  std::int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 16; ++j) {
      const double product = a[k + j] * static_cast<double>(x[k + j]);
      acc[j] += product;
    }
  for (std::int64_t j = 0; k + j < n; ++j) {
    const double product = a[k + j] * static_cast<double>(x[k + j]);
    acc[j] += product;
  }
  for (int j = 0; j < 16; ++j) sums[j] = acc[j];
}

}  // namespace

const KernelTable& GenericKernels() {
  static const KernelTable table{Isa::kGeneric,
                                 {4, 8, &Micro<4, 8, float>, &Micro<4, 8, double>},
                                 {4, 4, &Micro<4, 4, float>, &Micro<4, 4, double>},
                                 {4, 4, &Micro<4, 4, float>, &Micro<4, 4, double>},
                                 &HalfToFloatRun, &BFloatToFloatRun, &SquaresRun,
                                 &DotRun};
  return table;
}

}  // namespace tracin::detail
