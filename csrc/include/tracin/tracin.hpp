// tracin: exact TracIn influence kernels (C++17, no Python).
//
// influence(t, i) = sum_c w_c * <g_c(t), g_c(i)>, computed blocked over (train rows x test rows)
// with top-k selected in the tile epilogue. All functions are thread-safe, keep no global state
// and report problems through Status instead of throwing: a null output buffer for a result that has
// values, an unknown DType or Side is kInvalidArgument.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace tracin {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A row-major matrix view: element (r, k) lives at data + (r * row_stride + k) * element_size.
struct MatrixView {
  const void* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t row_stride = 0;  // in elements, >= cols
  DType dtype = DType::kFloat32;
};

// One side (test or train) of the problem. Full mode: one matrix per checkpoint. Factored mode:
// per checkpoint a left (n, p_c) and right (n, q_c) matrix, stored as blocks = {L_0, R_0, L_1, ...};
// the gradient is the row-wise outer product L_i (x) R_i.
struct GradientSide {
  bool factored = false;
  std::vector<MatrixView> blocks;

  std::int64_t rows() const { return blocks.empty() ? 0 : blocks.front().rows; }
  std::size_t checkpoints() const { return factored ? blocks.size() / 2 : blocks.size(); }
};

enum class Side : int { kProponents = 0, kOpponents = 1, kBoth = 2 };

// Instruction set of the inner kernels; kAuto picks the best one the CPU supports, and a set the
// CPU lacks runs as the best one it has (see ResolveIsa).
enum class Isa : int { kAuto = 0, kGeneric = 1, kAvx2 = 2, kAvx512 = 3 };

struct Options {
  // Kernel threads, started per call. 0 or negative: every CPU the process may run on (its
  // affinity mask). A positive count is used as given, even above the CPUs (the Python package
  // caps it at them): each thread that gets work (no more than the call has tasks) holds its own
  // scratch tiles and, for TopK, candidate buffers, so threads beyond the cores cost memory and
  // time and gain nothing.
  int num_threads = 0;
  // Train rows per task, 0: automatic; a block above the train rows is the train rows, then rounded
  // up to the kernel's MR. Test rows per pass over the train side, 0: automatic; at most the test rows.
  std::int64_t train_block = 0;
  std::int64_t test_block = 0;
  Isa isa = Isa::kAuto;
  // Cancellation: when non-null and set (before the call, or by another thread during it), the
  // call stops at its next task (milliseconds: a tile of train rows, or one test row's final top-k
  // selection for one side, whose sort of a large k checks the flag every ~2^16 candidates) and
  // returns kCancelled with its outputs partly written. A flag left clear changes
  // nothing, to the bit.
  const std::atomic<bool>* cancel = nullptr;
  // Cosine scores (Scores, TopK, Aggregate; SelfInfluence refuses them). 0: plain scores. g > 0:
  // each row's gradient is unit-normalised over every run of g consecutive checkpoints (g > 1: the
  // layers of one real checkpoint, stored one factor pair per layer), then weighted and summed:
  //   sum_c w_c <g_c(t), g_c(i)> / (|g(t)|_C(c) |g(i)|_C(c)),  |g|_C the norm over c's run.
  // A run whose gradient is zero scores 0. g must divide the number of checkpoints. Norms are summed
  // in float64 per row, once per call for test rows and per tile pass for train rows (from the rows
  // already loaded for the tile), and applied to the test rows as they are packed and to each run's
  // tile before it is added: no normalised copy of the train data.
  std::int64_t normalize = 0;
};

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,
  kNonFinite = 2,
  kInternal = 3,
  kOutOfMemory = 4,
  kCancelled = 5,
};

struct Status {
  StatusCode code = StatusCode::kOk;
  std::string message;
  bool ok() const { return code == StatusCode::kOk; }
  static Status Ok() { return {}; }
};

// Top-k output buffers, each (m, k) row-major; a side that is not requested may be null.
struct TopKOutput {
  float* proponent_values = nullptr;
  std::int64_t* proponent_indices = nullptr;
  float* opponent_values = nullptr;
  std::int64_t* opponent_indices = nullptr;
};

// Dense scores, out is (test.rows(), train.rows()) row-major float32 (options.normalize: cosine).
Status Scores(const GradientSide& test, const GradientSide& train,
              const std::vector<double>& weights, float* out, const Options& options = {});

// Exact top-k over train rows for every test row. k must be <= train.rows().
// Proponents: largest first; opponents: most negative first; ties: smaller train index first.
Status TopK(const GradientSide& test, const GradientSide& train, const std::vector<double>& weights,
            std::int64_t k, Side side, const TopKOutput& out, const Options& options = {});

// out[i] = sum_c w_c * |g_c(i)|^2, out is (train.rows(),). options.normalize must be 0.
Status SelfInfluence(const GradientSide& train, const std::vector<double>& weights, float* out,
                     const Options& options = {});

// out[i] = sum over test rows t of influence(t, i), out is (train.rows(),) float64, so that sums
// over several calls (test rows in chunks) stay exact to float32 precision.
// Both layouts give the same influence, overflow included: full gradients are summed by columns
// first (float64 weighted column sums of the test side, one float64 dot product per train row), so
// no pair score is formed; factored gradients are scored pair by pair as in Scores (float32 tiles,
// summed in float64), and should a pair's score or factor product exceed float32's range with every
// input finite, the call redoes the sums in float64, only then: per checkpoint through the p x q
// matrix w_c sum_t s_t L_t R_t^T ((m + n) p q float64 multiply-adds, about the float32 pass's count)
// or, when fewer, pair by pair (m n (p + q)). kNonFinite only for a NaN or Inf input or a sum beyond
// float64's range.
Status Aggregate(const GradientSide& test, const GradientSide& train,
                 const std::vector<double>& weights, double* out, const Options& options = {});

// The instruction set kAuto resolves to on this CPU, and a name for it.
Isa DetectIsa();
const char* IsaName(Isa isa);

// The instruction set a call with options.isa = requested runs with on this CPU: the request if
// the CPU supports it, else the best one it does (kAuto: DetectIsa()).
Isa ResolveIsa(Isa requested);

}  // namespace tracin
