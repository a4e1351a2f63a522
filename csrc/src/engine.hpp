// The tile producer: score tiles of (train rows x test rows) handed to a consumer, never the whole
// test x train matrix.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.hpp"
#include "tracin/tracin.hpp"

namespace tracin::detail {

// What happens to each finished tile (top-k selection, dense copy, row sums).
// A tile holds rows train rows x `ldc` floats; column r is test row test_begin + r of the current
// pass, valid for r < test_count. Consume runs concurrently on different threads, never twice at
// once for the same `thread`, and each train row is in exactly one tile per pass.
class TileConsumer {
 public:
  virtual ~TileConsumer() = default;
  // Most test rows per pass for passes run on `threads` threads (the consumer's state per thread
  // and row within a budget; the engine may pass fewer), at least 1.
  virtual std::int64_t MaxPassRows(std::int64_t /*threads*/) const { return std::numeric_limits<std::int64_t>::max(); }
  // threads: Consume's `thread` is below it.
  virtual void BeginPass(std::int64_t test_begin, std::int64_t test_count, int threads) = 0;
  virtual void Consume(int thread, std::int64_t train_begin, std::int64_t rows, const float* tile,
                       std::int64_t ldc) = 0;
  // After every tile of the pass; `cancel` (Options::cancel, may be null) is checked between units
  // of its work (rows of the pass), ending it with kCancelled.
  virtual Status EndPass(const std::atomic<bool>* cancel) = 0;
  // Whether Consume also gets tiles holding NaN or Inf scores: the run then goes on past them (its
  // input checks still stand), leaving the consumer to tell. Otherwise such a tile ends the run with
  // kNonFinite, naming its first score.
  virtual bool TakesNonFinite() const { return false; }
  // Cosine scores of factored test rows whose packed left factors (weight times inverse norm times
  // L_c) overflow float32: whether the engine packs them balanced and scores them (PackedTest in
  // engine.cpp), or ends the run with kNonFinite as for any other overflow.
  virtual bool BalancesOverflowingRows() const { return true; }
};

// Shape checks shared by every entry point; `name` names the side ("test", "train") in messages.
Status ValidateSide(const GradientSide& side, const char* name);
Status ValidatePair(const GradientSide& test, const GradientSide& train,
                    const std::vector<double>& weights);
// One finite weight per checkpoint.
Status ValidateWeights(const std::vector<double>& weights, std::size_t checkpoints);

// Copies float32 values of row `row`, columns [k0, k0 + n), of `m` into dst.
void LoadRow(const KernelTable& kernels, const MatrixView& m, std::int64_t row, std::int64_t k0,
             std::int64_t n, float* dst);

// One sum of kNormLanes partial sums (kernels.sum_of_squares), combined pairwise: sum j += sum
// j + 8, then + 4, + 2, + 1. Overwrites them.
double CombineSums(double* sums);

// float64 sum of squares of x[0, n): kernels.sum_of_squares into fresh sums, then CombineSums.
double SumOfSquares(const KernelTable& kernels, const float* x, std::int64_t n);

// Cosine scores (Options::normalize): the squared norm of row `row` of `side` over checkpoints
// [first, first + count), float64: per block SumOfSquares (the bits the tile producer gets slice by
// slice), blocks in order; factored: sum of |left|^2 |right|^2. buf holds the widest block.
double RunSquaredNorm(const KernelTable& kernels, const GradientSide& side, std::size_t first,
                      std::size_t count, std::int64_t row, float* buf);

// 1 / sqrt(squared): 0 for a zero gradient (its cosine scores are 0); NaN stays NaN.
double InverseNorm(double squared);

// Ok, or kInvalidArgument unless normalize is 0 or a positive divisor of side's checkpoints.
Status ValidateNormalize(const GradientSide& side, std::int64_t normalize);

// Ok, or the NonFiniteError if any input value is NaN or Inf (a full scan: for small inputs and
// error paths).
Status CheckAllFinite(const GradientSide* test, const GradientSide& train);

// The error for non-finite results: names the side, checkpoint and first rows holding NaN or Inf,
// or reports a float32 overflow when every input is finite (naming the pair (test row, train row)
// of the first overflowed score when `pair` is given).
Status NonFiniteError(const GradientSide* test, const GradientSide& train, const std::int64_t* pair = nullptr);

// Streams all train rows past each pass of test rows; see TileConsumer. kCancelled when
// options.cancel is set before or during the call.
Status RunTiles(const GradientSide& test, const GradientSide& train,
                const std::vector<double>& weights, const Options& options,
                TileConsumer& consumer);

}  // namespace tracin::detail

namespace tracin {

// Aggregate of full gradients in two steps, for a test side read in chunks (the Python package's
// stores): AggregateColumnSums for each chunk in row order, then AggregateFromColumnSums for each
// piece of the train rows. Together they give Aggregate's bits whatever the chunks and pieces.

// Adds the test rows' columns to the float64 running sums: sums[c][k] += s_t g_c(t)[k] for each test
// row t in order (s_t: the row's float64 inverse norm over c's run for options.normalize > 0, else
// 1), one array of test.blocks[c].cols values per checkpoint. Each column is summed in row order
// (threads take bands of columns), so sums carried from chunk to chunk get the bits of one call over
// all the rows. kNonFinite naming the test rows for a NaN or Inf input.
Status AggregateColumnSums(const GradientSide& test, const std::vector<double*>& sums, const Options& options = {});

// out[i] = sum_c w_c <sums_c, g_c(i)> for the train rows i (cosine scores: each run's dot products
// times the row's inverse norm over it), out (train.rows(),) float64: Aggregate's second half, with
// the column sums of every test row (AggregateColumnSums), one array of train.blocks[c].cols values
// per checkpoint. kNonFinite naming the train rows for a NaN or Inf input, else for a result beyond
// float64's range.
Status AggregateFromColumnSums(const std::vector<const double*>& sums, const GradientSide& train,
                               const std::vector<double>& weights, double* out, const Options& options = {});

}  // namespace tracin
