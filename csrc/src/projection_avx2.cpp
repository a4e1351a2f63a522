// AVX2 projection kernels (compiled with -mavx2 -mfma -mf16c).
#include <immintrin.h>

#include "kernels.hpp"
#include "projection_kernels.hpp"

namespace tracin::detail {
namespace {

constexpr int kMR = 6, kNV = 2, kNR = kNV * 8;

// kMR rows x kNR outputs; each lane is one fused multiply-add chain continuing the value in c.
void Micro(std::int64_t kc, const float* a, std::int64_t lda, const float* b, float* c,
           std::int64_t ldc) {
  __m256 acc[kMR][kNV];
  TRACIN_UNROLL
  for (int i = 0; i < kMR; ++i)
    TRACIN_UNROLL
    for (int v = 0; v < kNV; ++v) acc[i][v] = _mm256_loadu_ps(c + i * ldc + v * 8);
  for (std::int64_t k = 0; k < kc; ++k) {
    __m256 bk[kNV];
    TRACIN_UNROLL
    for (int v = 0; v < kNV; ++v) bk[v] = _mm256_loadu_ps(b + k * kNR + v * 8);
    TRACIN_UNROLL
    for (int i = 0; i < kMR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i * lda + k);
      TRACIN_UNROLL
      for (int v = 0; v < kNV; ++v) acc[i][v] = _mm256_fmadd_ps(ai, bk[v], acc[i][v]);
    }
  }
  TRACIN_UNROLL
  for (int i = 0; i < kMR; ++i)
    TRACIN_UNROLL
    for (int v = 0; v < kNV; ++v) _mm256_storeu_ps(c + i * ldc + v * 8, acc[i][v]);
}

}  // namespace

const ProjectionKernels& Avx2ProjectionKernels() {
  static const ProjectionKernels table{Isa::kAvx2, kMR, kNR, &Micro, &FillPanel<kNR>};
  return table;
}

}  // namespace tracin::detail
