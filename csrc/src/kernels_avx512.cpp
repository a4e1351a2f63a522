// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c).
#include <immintrin.h>

#include "kernels.hpp"
#include "tunables.hpp"

namespace tracin::detail {
namespace {

// Adds the 16 float32 sums to c[0, 16), in float32 or converted exactly to float64.
inline void AddTo(float* c, __m512 sums) { _mm512_storeu_ps(c, _mm512_add_ps(_mm512_loadu_ps(c), sums)); }
inline void AddTo(double* c, __m512 sums) {
  _mm512_storeu_pd(c, _mm512_add_pd(_mm512_loadu_pd(c), _mm512_cvtps_pd(_mm512_castps512_ps256(sums))));
  _mm512_storeu_pd(c + 8, _mm512_add_pd(_mm512_loadu_pd(c + 8), _mm512_cvtps_pd(_mm512_extractf32x8_ps(sums, 1))));
}

// MR train rows x (NV * 16) test lanes; each lane is one fused multiply-add chain over k. Out: float
// (MicroKernel) or double (MicroKernelToDouble).
template <int MR, int NV, typename Out>
void Micro(std::int64_t kc, const float* a, std::int64_t lda, const float* b, Out* c,
           std::int64_t ldc) {
  __m512 acc[MR][NV];
  TRACIN_UNROLL
  for (int i = 0; i < MR; ++i)
    TRACIN_UNROLL
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (std::int64_t k = 0; k < kc; ++k) {
    __m512 bk[NV];
    TRACIN_UNROLL
    for (int v = 0; v < NV; ++v) bk[v] = _mm512_loadu_ps(b + k * NV * 16 + v * 16);
    TRACIN_UNROLL
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * lda + k]);
      TRACIN_UNROLL
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(ai, bk[v], acc[i][v]);
    }
  }
  TRACIN_UNROLL
  for (int i = 0; i < MR; ++i)
    TRACIN_UNROLL
    for (int v = 0; v < NV; ++v) AddTo(c + i * ldc + v * 16, acc[i][v]);
}

void HalfToFloatRun(const std::uint16_t* src, std::int64_t n, float* dst) {
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i))));
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m256i h = _mm256_maskz_loadu_epi16(mask, src + i);
    _mm512_mask_storeu_ps(dst + i, mask, _mm512_cvtph_ps(h));
  }
}

void BFloatToFloatRun(const std::uint16_t* src, std::int64_t n, float* dst) {
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i w = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src + i));
    _mm512_mask_storeu_ps(dst + i, mask, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
}

// SquaresKernel (kernels.hpp) in two registers of 8 doubles: the generic kernel's bits (an exact
// square added to a sum rounds once, fused or not).
void SquaresRun(const float* x, std::int64_t rows, std::int64_t n, double* sums) {
  static_assert(kNormLanes == 16, "SquaresRun keeps 16 sums");
  for (std::int64_t r = 0; r < rows; ++r, x += n, sums += 16) {
    __m512d low = _mm512_loadu_pd(sums), high = _mm512_loadu_pd(sums + 8);
    std::int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
      const __m512d a = _mm512_cvtps_pd(_mm256_loadu_ps(x + k));
      const __m512d b = _mm512_cvtps_pd(_mm256_loadu_ps(x + k + 8));
      low = _mm512_fmadd_pd(a, a, low);
      high = _mm512_fmadd_pd(b, b, high);
    }
    _mm512_storeu_pd(sums, low);
    _mm512_storeu_pd(sums + 8, high);
    for (std::int64_t j = 0; k + j < n; ++j) sums[j] += static_cast<double>(x[k + j]) * x[k + j];
  }
}

// DotKernel (kernels.hpp) in two registers of 8 doubles: a separate multiply and add per product,
// the generic kernel's bits.
void DotRun(const double* a, const float* x, std::int64_t n, double* sums) {
  static_assert(kNormLanes == 16, "DotRun keeps 16 sums");
  __m512d low = _mm512_loadu_pd(sums), high = _mm512_loadu_pd(sums + 8);
  std::int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512d b = _mm512_cvtps_pd(_mm256_loadu_ps(x + k));
    const __m512d c = _mm512_cvtps_pd(_mm256_loadu_ps(x + k + 8));
    low = _mm512_add_pd(low, _mm512_mul_pd(_mm512_loadu_pd(a + k), b));
    high = _mm512_add_pd(high, _mm512_mul_pd(_mm512_loadu_pd(a + k + 8), c));
  }
  _mm512_storeu_pd(sums, low);
  _mm512_storeu_pd(sums + 8, high);
  for (std::int64_t j = 0; k + j < n; ++j) {
    const double product = a[k + j] * static_cast<double>(x[k + j]);
    sums[j] += product;
  }
}

}  // namespace

const KernelTable& Avx512Kernels() {
  // Thin: the AVX2 narrow tile (8 lanes; AVX-512 CPUs run AVX2, and each lane is the same
  // multiply-add chain, so the bits are the same).
  static const KernelTable table{Isa::kAvx512, {12, 32, &Micro<12, 2, float>, &Micro<12, 2, double>},
                                 {12, 16, &Micro<12, 1, float>, &Micro<12, 1, double>},
                                 Avx2Kernels().narrow, &HalfToFloatRun, &BFloatToFloatRun, &SquaresRun,
                                 &DotRun};
  return table;
}

}  // namespace tracin::detail
