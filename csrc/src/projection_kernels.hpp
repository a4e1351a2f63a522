// Counter-based generation of projection entries, and the ISA-specific dense projection kernels.
//
// Everything here is integer arithmetic plus explicit float multiplies, adds, divides and square
// roots, each correctly rounded, so an entry has the same bits on every machine and in every
// vector width the compiler picks.
#pragma once

#include <cstdint>
#include <cstring>

#include "tracin/projection.hpp"

namespace tracin::detail {
// Internal linkage: every ISA file compiles its own copy for its instruction set (one shared
// inline definition could be the AVX-512 one called on a CPU without it).
namespace {

inline std::uint64_t Mix64(std::uint64_t z) {  // the splitmix64 finaliser
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

inline std::uint32_t Mix32(std::uint32_t x) {  // a 32-bit avalanche mixer (xorshift-multiply)
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

// The 64-bit key of row i of the matrix (seed, stream), split into two 32-bit halves.
struct RowKey {
  std::uint32_t lo, hi;
};

inline RowKey KeyOfRow(std::uint64_t seed, std::uint64_t stream, std::uint64_t row) {
  const std::uint64_t base = Mix64(Mix64(seed + kGolden) ^ (stream * kGolden + 0x632be59bd9b4e019ULL));
  const std::uint64_t key = Mix64(base + (row + 1) * kGolden);
  return {static_cast<std::uint32_t>(key), static_cast<std::uint32_t>(key >> 32)};
}

// 32 random bits for (row key, counter g): two keyed rounds of Mix32.
inline std::uint32_t Word(std::uint32_t key_lo, std::uint32_t key_hi, std::uint64_t g) {
  const std::uint32_t x = Mix32(static_cast<std::uint32_t>(g) ^ key_lo);
  return Mix32(x ^ key_hi ^ static_cast<std::uint32_t>(g >> 32));
}

inline float BitsAsFloat(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline std::uint32_t FloatAsBits(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// Rademacher entry (unscaled): bit (k mod 32) of Word(key, k / 32); 1 -> -1, 0 -> +1.
inline float RademacherEntry(std::uint32_t word, std::uint64_t k) {
  return BitsAsFloat(0x3f800000U | (((word >> (k & 31)) & 1U) << 31));
}

// ln(u) for u in (0, 1] from float operations only: u = m 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, series to s^9 (error < 1e-9).
inline float LogUnit(float u) {
  const std::uint32_t bits = FloatAsBits(u);
  std::uint32_t m_bits = (bits & 0x7fffffU) | 0x3f800000U;
  const std::uint32_t big = m_bits > 0x3fb504f3U ? 1U : 0U;  // m > sqrt(2): halve m, e + 1
  m_bits -= big << 23;
  const float m = BitsAsFloat(m_bits);
  const std::int32_t e = static_cast<std::int32_t>(bits >> 23) - 127 + static_cast<std::int32_t>(big);
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = s2 * (1.0f / 9.0f);
  p = s2 * ((1.0f / 7.0f) + p);
  p = s2 * ((1.0f / 5.0f) + p);
  p = s2 * ((1.0f / 3.0f) + p);
  const float ln_m = (2.0f * s) * (1.0f + p);
  return static_cast<float>(e) * 0.693147181f + ln_m;
}

// cos(theta) for theta in quadrant qq with remainder x, given sn = sin(x) and cs = cos(x): in
// quadrant qq it is (cos, -sin, -cos, sin)[qq].
inline float CosInQuadrant(float sn, float cs, std::uint32_t qq) {
  const std::uint32_t pick = 0U - (qq & 1U);  // all ones: sin
  const std::uint32_t v = (FloatAsBits(sn) & pick) | (FloatAsBits(cs) & ~pick);
  return BitsAsFloat(v ^ (((qq ^ (qq >> 1)) & 1U) << 31));
}

// The Gaussian entries (unscaled) of an even column and the odd column after it, by Box-Muller
// from w1 = Word(key, even) and w2 = Word(key, odd): u1 = (w1 / 2^8 + 1) / 2^24 in (0, 1],
// theta = 2 pi w2 / 2^32 in quarter turns q and a remainder x in [0, pi / 2); the even column takes
// r cos(theta), the odd one r sin(theta) (cos in quadrant q - 1). sin / cos of x by Taylor series
// (error < 1e-7).
inline void GaussianPair(std::uint32_t w1, std::uint32_t w2, float& even, float& odd) {
  const float u1 = static_cast<float>(static_cast<std::int32_t>((w1 >> 8) + 1U)) * 0x1p-24f;
  const float r = __builtin_sqrtf(-2.0f * LogUnit(u1));
  const float t = static_cast<float>(static_cast<std::int32_t>(w2 >> 8)) * 0x1p-22f;  // [0, 4)
  const std::uint32_t q = w2 >> 30;                         // = floor(t)
  const float x = (t - static_cast<float>(static_cast<std::int32_t>(q))) * 1.57079633f;
  const float x2 = x * x;
  float sn = x2 * (-1.0f / 39916800.0f);
  sn = x2 * ((1.0f / 362880.0f) + sn);
  sn = x2 * ((-1.0f / 5040.0f) + sn);
  sn = x2 * ((1.0f / 120.0f) + sn);
  sn = x2 * ((-1.0f / 6.0f) + sn);
  sn = x * (1.0f + sn);
  float cs = x2 * (1.0f / 479001600.0f);
  cs = x2 * ((-1.0f / 3628800.0f) + cs);
  cs = x2 * ((1.0f / 40320.0f) + cs);
  cs = x2 * ((-1.0f / 720.0f) + cs);
  cs = x2 * ((1.0f / 24.0f) + cs);
  cs = x2 * ((-1.0f / 2.0f) + cs);
  cs = 1.0f + cs;
  even = r * CosInQuadrant(sn, cs, q);
  odd = r * CosInQuadrant(sn, cs, (q + 3U) & 3U);
}

// panel[k * NR + l] = unscaled entry (row with key (lo[l], hi[l]), column k0 + k), k < kc.
// Written as plain loops over the lanes so that the compiler vectorises them per target.
template <int NR>
void FillPanel(ProjectionKind kind, const std::uint32_t* lo, const std::uint32_t* hi,
               std::uint64_t k0, std::int64_t kc, float* panel) {
  if (kind == ProjectionKind::kRademacher) {
    std::uint32_t words[NR];
    std::uint64_t group = ~std::uint64_t{0};
    for (std::int64_t k = 0; k < kc; ++k) {
      const std::uint64_t col = k0 + static_cast<std::uint64_t>(k);
      if ((col >> 5) != group) {
        group = col >> 5;
        for (int l = 0; l < NR; ++l) words[l] = Word(lo[l], hi[l], group);
      }
      float* row = panel + k * NR;
      for (int l = 0; l < NR; ++l) row[l] = RademacherEntry(words[l], col);
    }
  } else {
    // Columns in (even, odd) pairs sharing one Box-Muller draw; a pair cut by the panel's edge is
    // drawn whole and its other half dropped.
    float even[NR], odd[NR];
    for (std::int64_t k = -static_cast<std::int64_t>(k0 & 1U); k < kc; k += 2) {
      const std::uint64_t col = k0 + static_cast<std::uint64_t>(k);  // even
      for (int l = 0; l < NR; ++l)
        GaussianPair(Word(lo[l], hi[l], col), Word(lo[l], hi[l], col + 1U), even[l], odd[l]);
      if (k >= 0)
        for (int l = 0; l < NR; ++l) panel[k * NR + l] = even[l];
      if (k + 1 < kc)
        for (int l = 0; l < NR; ++l) panel[(k + 1) * NR + l] = odd[l];
    }
  }
}

}  // namespace

// c[i * ldc + j] = fma chain over k < kc of a[i * lda + k] * b[k * nr + j], starting from the
// value already in c, for i < mr, j < nr.
using ProjectMicroKernel = void (*)(std::int64_t kc, const float* a, std::int64_t lda,
                                    const float* b, float* c, std::int64_t ldc);
using ProjectFillKernel = void (*)(ProjectionKind kind, const std::uint32_t* lo,
                                   const std::uint32_t* hi, std::uint64_t k0, std::int64_t kc,
                                   float* panel);

struct ProjectionKernels {
  Isa isa = Isa::kGeneric;
  int mr = 0;  // rows per micro tile
  int nr = 0;  // output lanes per micro tile (and per panel strip)
  ProjectMicroKernel micro = nullptr;
  ProjectFillKernel fill = nullptr;
};

const ProjectionKernels& GenericProjectionKernels();
#if defined(TRACIN_HAVE_X86_KERNELS)
const ProjectionKernels& Avx2ProjectionKernels();
const ProjectionKernels& Avx512ProjectionKernels();
#endif

}  // namespace tracin::detail
