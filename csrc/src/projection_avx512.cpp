// AVX-512 projection kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma).
#include <immintrin.h>

#include "kernels.hpp"
#include "projection_kernels.hpp"

namespace tracin::detail {
namespace {

constexpr int kMR = 12, kNV = 2, kNR = kNV * 16;

// kMR rows x kNR outputs; each lane is one fused multiply-add chain continuing the value in c.
void Micro(std::int64_t kc, const float* a, std::int64_t lda, const float* b, float* c,
           std::int64_t ldc) {
  __m512 acc[kMR][kNV];
  TRACIN_UNROLL
  for (int i = 0; i < kMR; ++i)
    TRACIN_UNROLL
    for (int v = 0; v < kNV; ++v) acc[i][v] = _mm512_loadu_ps(c + i * ldc + v * 16);
  for (std::int64_t k = 0; k < kc; ++k) {
    __m512 bk[kNV];
    TRACIN_UNROLL
    for (int v = 0; v < kNV; ++v) bk[v] = _mm512_loadu_ps(b + k * kNR + v * 16);
    TRACIN_UNROLL
    for (int i = 0; i < kMR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * lda + k]);
      TRACIN_UNROLL
      for (int v = 0; v < kNV; ++v) acc[i][v] = _mm512_fmadd_ps(ai, bk[v], acc[i][v]);
    }
  }
  TRACIN_UNROLL
  for (int i = 0; i < kMR; ++i)
    TRACIN_UNROLL
    for (int v = 0; v < kNV; ++v) _mm512_storeu_ps(c + i * ldc + v * 16, acc[i][v]);
}

}  // namespace

const ProjectionKernels& Avx512ProjectionKernels() {
  static const ProjectionKernels table{Isa::kAvx512, kMR, kNR, &Micro, &FillPanel<kNR>};
  return table;
}

}  // namespace tracin::detail
