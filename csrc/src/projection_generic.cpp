// Portable projection kernels. std::fma keeps the bits equal to the vector kernels' fused
// multiply-adds (in software where the CPU has no FMA: slow but exact).
#include <cmath>

#include "kernels.hpp"
#include "projection_kernels.hpp"

namespace tracin::detail {
namespace {

constexpr int kMR = 4, kNR = 16;

void Micro(std::int64_t kc, const float* a, std::int64_t lda, const float* b, float* c,
           std::int64_t ldc) {
  float acc[kMR][kNR];
  TRACIN_UNROLL
  for (int i = 0; i < kMR; ++i)
    TRACIN_UNROLL
    for (int j = 0; j < kNR; ++j) acc[i][j] = c[i * ldc + j];
  for (std::int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * kNR;
    TRACIN_UNROLL
    for (int i = 0; i < kMR; ++i) {
      const float ai = a[i * lda + k];
      TRACIN_UNROLL
      for (int j = 0; j < kNR; ++j) acc[i][j] = std::fma(ai, bk[j], acc[i][j]);
    }
  }
  TRACIN_UNROLL
  for (int i = 0; i < kMR; ++i)
    TRACIN_UNROLL
    for (int j = 0; j < kNR; ++j) c[i * ldc + j] = acc[i][j];
}

}  // namespace

const ProjectionKernels& GenericProjectionKernels() {
  static const ProjectionKernels table{Isa::kGeneric, kMR, kNR, &Micro, &FillPanel<kNR>};
  return table;
}

}  // namespace tracin::detail
