// AVX2 + FMA + F16C kernels (compiled with -mavx2 -mfma -mf16c).
#include <immintrin.h>

#include "half.hpp"
#include "kernels.hpp"
#include "tunables.hpp"

namespace tracin::detail {
namespace {

// Adds the 8 float32 sums to c[0, 8), in float32 or converted exactly to float64.
inline void AddTo(float* c, __m256 sums) { _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), sums)); }
inline void AddTo(double* c, __m256 sums) {
  _mm256_storeu_pd(c, _mm256_add_pd(_mm256_loadu_pd(c), _mm256_cvtps_pd(_mm256_castps256_ps128(sums))));
  _mm256_storeu_pd(c + 4, _mm256_add_pd(_mm256_loadu_pd(c + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(sums, 1))));
}

// MR train rows x (NV * 8) test lanes; each lane is one fused multiply-add chain over k. Out: float
// (MicroKernel) or double (MicroKernelToDouble).
template <int MR, int NV, typename Out>
void Micro(std::int64_t kc, const float* a, std::int64_t lda, const float* b, Out* c,
           std::int64_t ldc) {
  __m256 acc[MR][NV];
  TRACIN_UNROLL
  for (int i = 0; i < MR; ++i)
    TRACIN_UNROLL
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (std::int64_t k = 0; k < kc; ++k) {
    __m256 bk[NV];
    TRACIN_UNROLL
    for (int v = 0; v < NV; ++v) bk[v] = _mm256_loadu_ps(b + k * NV * 8 + v * 8);
    TRACIN_UNROLL
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i * lda + k);
      TRACIN_UNROLL
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(ai, bk[v], acc[i][v]);
    }
  }
  TRACIN_UNROLL
  for (int i = 0; i < MR; ++i)
    TRACIN_UNROLL
    for (int v = 0; v < NV; ++v) AddTo(c + i * ldc + v * 8, acc[i][v]);
}

void HalfToFloatRun(const std::uint16_t* src, std::int64_t n, float* dst) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = HalfToFloat(LoadBits16(src, i));
}

void BFloatToFloatRun(const std::uint16_t* src, std::int64_t n, float* dst) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; i < n; ++i) dst[i] = BFloat16ToFloat(LoadBits16(src, i));
}

// SquaresKernel (kernels.hpp) in four registers of 4 doubles: the generic kernel's bits (an exact
// square added to a sum rounds once, fused or not).
void SquaresRun(const float* x, std::int64_t rows, std::int64_t n, double* sums) {
  static_assert(kNormLanes == 16, "SquaresRun keeps 16 sums");
  for (std::int64_t r = 0; r < rows; ++r, x += n, sums += 16) {
    __m256d acc[4];
    for (int v = 0; v < 4; ++v) acc[v] = _mm256_loadu_pd(sums + 4 * v);
    std::int64_t k = 0;
    for (; k + 16 <= n; k += 16)
      for (int v = 0; v < 4; ++v) {
        const __m256d a = _mm256_cvtps_pd(_mm_loadu_ps(x + k + 4 * v));
        acc[v] = _mm256_fmadd_pd(a, a, acc[v]);
      }
    for (int v = 0; v < 4; ++v) _mm256_storeu_pd(sums + 4 * v, acc[v]);
    for (std::int64_t j = 0; k + j < n; ++j) sums[j] += static_cast<double>(x[k + j]) * x[k + j];
  }
}

// DotKernel (kernels.hpp) in four registers of 4 doubles: a separate multiply and add per product,
// the generic kernel's bits.
void DotRun(const double* a, const float* x, std::int64_t n, double* sums) {
  static_assert(kNormLanes == 16, "DotRun keeps 16 sums");
  __m256d acc[4];
  for (int v = 0; v < 4; ++v) acc[v] = _mm256_loadu_pd(sums + 4 * v);
  std::int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int v = 0; v < 4; ++v) {
      const __m256d b = _mm256_cvtps_pd(_mm_loadu_ps(x + k + 4 * v));
      acc[v] = _mm256_add_pd(acc[v], _mm256_mul_pd(_mm256_loadu_pd(a + k + 4 * v), b));
    }
  for (int v = 0; v < 4; ++v) _mm256_storeu_pd(sums + 4 * v, acc[v]);
  for (std::int64_t j = 0; k + j < n; ++j) {
    const double product = a[k + j] * static_cast<double>(x[k + j]);
    sums[j] += product;
  }
}

}  // namespace

const KernelTable& Avx2Kernels() {
  static const KernelTable table{Isa::kAvx2,
                                 {6, 16, &Micro<6, 2, float>, &Micro<6, 2, double>},
                                 {12, 8, &Micro<12, 1, float>, &Micro<12, 1, double>},
                                 {12, 8, &Micro<12, 1, float>, &Micro<12, 1, double>},
                                 &HalfToFloatRun, &BFloatToFloatRun, &SquaresRun,
                                 &DotRun};
  return table;
}

}  // namespace tracin::detail
