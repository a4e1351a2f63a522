// Instruction-set specific inner kernels, chosen at run time.
#pragma once

#include <cstdint>

#include "tracin/tracin.hpp"

// Full unrolling of the micro-kernel loops keeps the accumulators in registers.
#if defined(__clang__)
#define TRACIN_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define TRACIN_UNROLL _Pragma("GCC unroll 64")
#else
#define TRACIN_UNROLL
#endif

namespace tracin::detail {

// Depth of one slice of the inner dimension. Every dot product is summed as fixed slices of this
// many terms (a sequential float32 multiply-add chain each) added in order (in float64 where a block
// has more than one slice: MicroTile::double_kernel), whatever the tiling and thread count, so results
// are bit-identical for any block size and number of threads.
inline constexpr std::int64_t kSliceDepth = 256;

// C[i * ldc + j] += sum_{k < kc} a[i * lda + k] * b[k * nr + j]   for i < mr, j < nr.
// a: mr train rows of float32 (broadcast side); b: a packed panel of nr test lanes.
using MicroKernel = void (*)(std::int64_t kc, const float* a, std::int64_t lda, const float* b,
                             float* c, std::int64_t ldc);

// The same float32 chains, each converted exactly to float64 and added to a float64 C: the slices of a
// wide block are summed in float64, so their error does not grow with the number of slices.
using MicroKernelToDouble = void (*)(std::int64_t kc, const float* a, std::int64_t lda, const float* b,
                                     double* c, std::int64_t ldc);

// dst[0, n) = float32(src[0, n)) for float16 / bfloat16 bits. src may be at any address (NumPy admits
// misaligned arrays): it is read by unaligned vector loads and LoadBits16 (half.hpp), never as uint16_t.
using ConvertKernel = void (*)(const std::uint16_t* src, std::int64_t n, float* dst);

// Squares of `rows` rows of n float32 values (row r at x + r * n) added in float64 to kNormLanes
// (16) partial sums per row: value k of row r to sums[r * 16 + k % 16]. Called slice by slice with
// n a multiple of 16 but for a row's last slice, the sums carry on across slices; CombineSums
// (engine.hpp) makes one sum of them. Every square of a float32 is exact in float64, so each
// instruction set gives the same bits.
using SquaresKernel = void (*)(const float* x, std::int64_t rows, std::int64_t n, double* sums);

// A float64 row a[0, n) times a float32 row x[0, n) added to kNormLanes (16) partial sums: product
// k, a[k] * double(x[k]) rounded to float64, then added to sums[k % 16] (two roundings: never a
// fused multiply-add, which the kernel sources are built to forbid with -ffp-contract=off), so each
// instruction set gives the same bits. CombineSums (engine.hpp) makes one sum of them. Aggregate's
// dot product of a train row with the test side's weighted column sums.
using DotKernel = void (*)(const double* a, const float* x, std::int64_t n, double* sums);

struct MicroTile {
  int mr = 0;  // train rows per micro tile
  int nr = 0;  // test lanes per micro tile
  MicroKernel kernel = nullptr;
  MicroKernelToDouble double_kernel = nullptr;
};

struct KernelTable {
  Isa isa = Isa::kGeneric;
  MicroTile wide;    // for many test rows
  MicroTile narrow;  // for few test rows (fewer padded lanes)
  MicroTile thin;    // the fewest lanes: for passes of rows so wide that the narrow one's would not fit
  ConvertKernel half_to_float = nullptr;
  ConvertKernel bfloat_to_float = nullptr;
  SquaresKernel sum_of_squares = nullptr;
  DotKernel dot = nullptr;
};

const KernelTable& GenericKernels();
#if defined(TRACIN_HAVE_X86_KERNELS)
const KernelTable& Avx2Kernels();
const KernelTable& Avx512Kernels();
#endif

// The table for tracin::ResolveIsa(isa).
const KernelTable& KernelsFor(Isa isa);

}  // namespace tracin::detail
