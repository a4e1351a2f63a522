// tracin random projection: Johnson-Lindenstrauss maps whose entries are generated on the fly.
//
// out (rows, dim) = X (rows, d) . P[:, offset : offset + d]^T, where P (dim, infinitely many
// columns) is fixed by (kind, seed, stream, dim[, nonzeros]) alone: entry (i, k) comes from a
// counter-based hash of (seed, stream, i, k), so no dim x d matrix is ever held, and the columns
// of a piece of X at a column offset are the same columns P has in the whole.
//
// Scaling makes E[<Px, Px'>] = <x, x'>:
//   kRademacher  entries +-1 / sqrt(dim)
//   kGaussian    entries N(0, 1) / sqrt(dim)   (Box-Muller with polynomial log / sin / cos)
//   kSparse      each column has `nonzeros` = s entries +-1 / sqrt(s), one in each of s
//                contiguous blocks of the output rows (block j: [j * dim / s, (j + 1) * dim / s))
//
// Determinism: every output entry is one sequential multiply-add chain over the columns in
// ascending order (dense kinds: fused multiply-add; sparse: additions), then one multiply by the
// scale. The chain does not depend on the row chunking, the blocking, the thread count, the
// instruction set or how the columns are split into pieces, so the bits do not either.
#pragma once

#include <cstdint>
#include <vector>

#include "tracin/tracin.hpp"

namespace tracin {

enum class ProjectionKind : int { kRademacher = 0, kGaussian = 1, kSparse = 2 };

struct ProjectionSpec {
  ProjectionKind kind = ProjectionKind::kRademacher;
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;  // independent matrices from one seed (per-layer pieces, factors)
  std::int64_t dim = 0;      // output dimension, >= 1
  int nonzeros = 8;          // kSparse: non-zeros per column (capped at dim)
};

// Projects the rows of the column-wise concatenation of `pieces` (all with the same row count)
// whose first column is column `column_offset` of P. out[r * out_stride + i] for i < spec.dim.
// Uses options.num_threads, options.isa and options.cancel; the block sizes in options are ignored.
// A non-finite result (NaN / Inf in the input, or a projection beyond float32's range) is reported as
// kNonFinite. A finite row whose unscaled sums pass FLT_MAX while its projection does not is summed
// again from the row times 2^-s and the result multiplied by 2^s (the same chain with an unbounded
// exponent); rows that do not overflow keep the bits described above.
Status Project(const ProjectionSpec& spec, const std::vector<MatrixView>& pieces,
               std::int64_t column_offset, float* out, std::int64_t out_stride,
               const Options& options = {});

}  // namespace tracin
