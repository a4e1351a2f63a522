// Every tuning constant of the kernel, each defined and explained once. They trade speed against
// memory; none changes a float32 result bit except kNormLanes (the float64 summation order of
// self_influence and of the norms of cosine scores). The depth of the summed slices is part of
// the numerical contract, not a tunable: kSliceDepth in kernels.hpp. Each names the benchmark
// record that shows its effect (benchmarks/results/, on the 2-core machine of that record) and the
// commit that chose it; rerun that benchmark before changing one.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tracin::detail {

// --- Tile engine (engine.cpp) ---

// Train rows per task (one tile), before rounding up to the micro-kernel's mr.
// Record: kernel.json cases "top10", "both", "skinny" (commit 5fb2acf).
inline constexpr std::int64_t kDefaultTrainBlock = 96;

// A larger train block (up to twice kDefaultTrainBlock) is taken only when it shortens the
// slowest thread's share of rows by more than kBalanceGainPercent percent (few tiles on few threads).
// Record: torch_end_to_end.json "tracin_full_stages_s"."top_k_both" (commit 81b0e01).
inline constexpr std::int64_t kBalanceGainPercent = 2;

// Most test rows per pass over the train side.
// Record: kernel.json case "top10" (m = 1000: two passes; commit 5fb2acf).
inline constexpr std::int64_t kDefaultTestBlock = 512;

// Test rows per pass are a multiple of this when the budget below allows that many.
// Record: kernel.json case "top10" (commit e3ffe02).
inline constexpr std::int64_t kPassRowQuantum = 32;

// Bytes of the packed (float32, weighted) test rows of one pass. Every pass reads the whole train
// side again, so a larger budget means fewer passes for wide gradients; beyond this one the copy
// grew without the passes getting faster. Fewer rows per pass, down to one thin micro-tile (8
// lanes; 4 generic), keep rows of up to 2,097,152 columns (4,194,304 generic) within it; a wider
// row exceeds it by that one tile of rows.
// Record: torch_end_to_end.json "tracin_full_stages_s"."top_k_both" (360 test rows of 26,122
// columns; commit 7358eae, after eea404d tried 128 MiB).
inline constexpr std::int64_t kPackedTestBudget = std::int64_t{64} << 20;

// A packed pass smaller than this is packed on one thread: a second thread cost the compute that
// follows more than it saved. Record: kernel.json cases "n=..." (256 test rows of 128 columns;
// commit 5d318e3).
inline constexpr std::size_t kParallelPackBytes = std::size_t{8} << 20;

// --- Top-k and row-wise functions (api.cpp) ---

// Heap selection up to this k, partition buffers above. Record: kernel.json case "k" (commit 5fb2acf).
inline constexpr std::int64_t kHeapMaxK = 64;

// Bytes of the top-k selectors of one pass, every thread and side together, at their largest
// (each row's buffer at its capacity): test rows per pass are cut to keep threads x sides x rows x
// capacity x 16 B within it, so that the selectors' memory does not grow with the thread count
// (on 2 threads, passes keep 512 rows up to k = 2048 one-sided, 1024 both sides).
// Record: kernel.json case "k" (k = 1000 keeps 512 rows).
inline constexpr std::int64_t kSelectorBudget = std::int64_t{64} << 20;

// Rows per task in self_influence and aggregate.
// Record: torch_end_to_end.json "tracin_full_stages_s"."self_influence" (commit 5fb2acf).
inline constexpr std::int64_t kRowsPerTask = 256;

// Tile lanes checked against the top-k thresholds at once (one vectorised compare).
// Record: kernel.json case "top10" (commit e3ffe02).
inline constexpr std::int64_t kScanLanes = 16;

// Independent float64 partial sums per row in self_influence and the norms of cosine scores
// (breaks the addition latency chain; the x86 SquaresRun kernels hold exactly 16). Record: torch_end_to_end.json "tracin_full_stages_s"."self_influence" (commit 5380ec1).
inline constexpr std::int64_t kNormLanes = 16;

// --- Random projection (projection.cpp) ---
// Record: projection.json "speed" (kDenseRows and kDenseTileRows: commit f673e23; the others: commit e35044c).

inline constexpr std::int64_t kDenseColumns = 128;    // columns of X per generated panel of P
inline constexpr std::int64_t kDenseOutputs = 256;    // outputs per task
inline constexpr std::int64_t kDenseRows = 4096;      // most rows per task (each panel generated once for them)
inline constexpr std::int64_t kDenseTileRows = 96;    // rows of X copied per tile (rounded up to the kernel's mr)
inline constexpr std::int64_t kSparseColumns = 2048;  // columns per hashed chunk
inline constexpr std::int64_t kSparseRows = 256;      // rows per task

}  // namespace tracin::detail
