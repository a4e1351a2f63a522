#include "engine.hpp"

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <mutex>
#include <new>
#include <optional>
#include <sstream>
#include <string>

#include "aligned.hpp"
#include "half.hpp"
#include "parallel.hpp"
#include "tunables.hpp"

namespace tracin::detail {
namespace {

std::int64_t RoundUp(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// Bytes of one test row in the packed copy: all checkpoints' columns, float32.
std::int64_t PackedRowBytes(const GradientSide& test) {
  std::int64_t bytes = 0;
  for (const MatrixView& m : test.blocks) bytes += m.cols * 4;
  return std::max<std::int64_t>(bytes, 1);
}

// Test rows per pass over the train side: up to kDefaultTestBlock, a multiple of kPassRowQuantum,
// fewer when the packed copy of the pass would exceed kPackedTestBudget bytes; for rows too wide
// for kPassRowQuantum of them, a multiple of the thin micro-tile's lanes (so that the padded copy
// stays within the budget), at least one thin tile.
std::int64_t DefaultPassRows(std::int64_t row_bytes, const KernelTable& kernels) {
  const std::int64_t by_budget = kPackedTestBudget / row_bytes, lanes = kernels.thin.nr;
  if (by_budget < kPassRowQuantum) return std::max(by_budget / lanes * lanes, lanes);
  return std::min(by_budget / kPassRowQuantum * kPassRowQuantum, kDefaultTestBlock);
}

// A cap on the test rows per pass (at least 1) rounded down to a multiple of kPassRowQuantum, or
// of the thin micro-tile's lanes when below it.
std::int64_t RoundDownPassRows(std::int64_t cap, const KernelTable& kernels) {
  const std::int64_t lanes = kernels.thin.nr;
  if (cap >= kPassRowQuantum) return cap / kPassRowQuantum * kPassRowQuantum;
  return cap >= lanes ? cap / lanes * lanes : std::max<std::int64_t>(cap, 1);
}

// The micro-tile for passes of `rows` test rows: of the wide and narrow ones, the one padding
// fewer lanes; the thin one when the narrow one's padded copy would exceed kPackedTestBudget.
const MicroTile& TileFor(std::int64_t rows, std::int64_t row_bytes, const KernelTable& kernels) {
  if (RoundUp(rows, kernels.narrow.nr) * row_bytes > kPackedTestBudget) return kernels.thin;
  return RoundUp(rows, kernels.narrow.nr) < RoundUp(rows, kernels.wide.nr) ? kernels.narrow : kernels.wide;
}

// Train rows per task: kDefaultTrainBlock, or a somewhat larger multiple of mr when that spreads
// the tiles more evenly over the threads (with 15 tiles on 2 threads, one thread computes 8 while
// the other idles through the last; 10 larger tiles split 5 and 5): when the slowest thread's
// rows, each task counted as a full tile, drop by more than kBalanceGainPercent percent.
std::int64_t DefaultTrainBlock(std::int64_t n, int threads, int mr) {
  const auto makespan = [&](std::int64_t block) {
    const std::int64_t tasks = (n + block - 1) / block;
    return (tasks + threads - 1) / threads * block;
  };
  const std::int64_t base = RoundUp(kDefaultTrainBlock, mr);
  std::int64_t best = base;
  for (std::int64_t block = base + mr; block <= 2 * base; block += mr)
    if (makespan(block) < makespan(best)) best = block;
  return makespan(best) * 100 < makespan(base) * (100 - kBalanceGainPercent) ? best : base;
}

std::int64_t Slices(std::int64_t depth) { return (depth + kSliceDepth - 1) / kSliceDepth; }

std::string BlockName(const GradientSide& side, std::size_t block) {
  std::ostringstream s;
  if (side.factored)
    s << (block % 2 == 0 ? "left" : "right") << " factor of checkpoint " << block / 2;
  else
    s << "checkpoint " << block;
  return s.str();
}

bool IsFinite(DType dtype, const void* data, std::int64_t i) {
  switch (dtype) {
    case DType::kFloat32: {
      std::uint32_t bits;
      std::memcpy(&bits, static_cast<const float*>(data) + i, sizeof bits);
      return (bits & 0x7f800000u) != 0x7f800000u;
    }
    case DType::kFloat16:
      return (LoadBits16(data, i) & 0x7c00u) != 0x7c00u;
    default:
      return (LoadBits16(data, i) & 0x7f80u) != 0x7f80u;
  }
}

std::size_t ElementSize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

const char* RowAddress(const MatrixView& m, std::int64_t row) {
  return static_cast<const char*>(m.data) +
         static_cast<std::size_t>(row * m.row_stride) * ElementSize(m.dtype);
}

// First rows (up to `limit`) of m holding a NaN or Inf.
std::vector<std::int64_t> NonFiniteRows(const MatrixView& m, std::size_t limit) {
  std::vector<std::int64_t> rows;
  for (std::int64_t r = 0; r < m.rows && rows.size() < limit; ++r) {
    const void* row = RowAddress(m, r);
    for (std::int64_t k = 0; k < m.cols; ++k)
      if (!IsFinite(m.dtype, row, k)) {
        rows.push_back(r);
        break;
      }
  }
  return rows;
}

// Test rows of one pass, scaled by the checkpoint weights (and, for cosine scores, by each row's
// inverse norm per run of checkpoints) and laid out as panels of nr lanes: block b, slice s,
// panel p holds kc x nr floats, lane = test row within the panel.
// The weights of test row r are packed as w_c * 2^-e_r and each tile's column r is multiplied by
// 2^e_r once computed: one exponent per row, since a score's column only sees its own row. e_r is 0
// (the plain w_c, the same bits as ever) unless row r's weighted values leave float32's comfortable
// range: when every one is below 2^-96 (subnormals lose bits) e_r brings the largest to 2^-96,
// when one is at least 2^127 (or overflows) it brings the largest to 2^100, unless that would round one of the row's other
// values (in any checkpoint) that is normal at e_r = 0 by more than 2^-20 of itself (packed as a
// subnormal of fewer than about 20 bits, or as zero; ShiftLosesBits): then e_r stays 0 and the row
// overflows, reported as such (a row whose checkpoints' weighted values span more than about 2^230
// cannot be scored in float32 within the bound; factored aggregate then sums in float64, api.cpp
// ExactFactoredSums). A value lowered to a subnormal that keeps its error within 2^-20 (2^-100 to
// 2^-130 exactly, or 2^-100 (1 + 2^-23) to 2^-130, its last 4 bits lost: 2^-23 of itself) is kept. Scaling by a power of
// two is otherwise exact, so the values that change are the infinite ones (made finite), those
// small ones (within 2^-20 of themselves) and, when e_r < 0, the subnormal ones (made normal).
// Since e_r < 0 only when every packed
// value of row r is below 2^-96, a tile's column (a score times 2^-e_r) stays far from overflow;
// e_r > 0 only makes it smaller than the scores.
// Cosine scores (unit test rows times w_c) lift further: a row whose packed values are all below
// 2^-32 has its largest brought to [2^-32, 2^-31). Train rows of a norm from 2^-64 to 2^64 are not
// rescaled (TileProducer::RunExponents), and with |w_c| below about 1e-21 their products with such
// a row fell below float32's normal range before the epilogue divides by the train row's norm.
// A largest packed value of at least 2^-32 keeps each product's rounding below 2^-150
// against scores of about 2^-32 x 2^-64 x (cosine), for rows of up to 2^36 values: within the bound.
// Rows of larger weights (|w_c| >= 2^-32 sqrt(d) at least) keep e_r = 0 and their bits; a lifted row
// is no nearer overflow than an unlifted one of weight 2^-31.
// Cosine scores of factored rows: the weight and the run's inverse norm go on the left factor, so a
// row with a small norm (a tiny right factor) packs w_c s L_c beyond float32 (e.g. w_c 1e20, L_c 2e25,
// R_c 1e-40: 1e60), which lowering cannot cure when another checkpoint of the row would be lost.
// Such a row (packed values still infinite at its e_r; with `balance`, as Pack is asked) is packed
// balanced instead: per checkpoint c a power of two 2^k_rc moves from its left factor to its right
// one, bringing |R_c| 2^k_rc into [0.5, 1) (when R_c is 0, the term is 0 and k_rc brings s |L_c| 2^-k_rc
// there instead), so that the left factor's norm is about |w_c| times the checkpoint's share of the
// run's norm (at most |w_c|) and the right factor a unit; e_r is then decided on the balanced values
// as above. A product of powers of two: the score is unchanged but for roundings below float32's
// normal range. Every other row (every row of a pass without one) is packed as before, to the same bits.
class PackedTest {
 public:
  // Packs one panel of one block per task, on up to `threads` threads when the pass holds at
  // least kParallelPackBytes. normalize: as Options::normalize. balance: pack factored cosine rows
  // that overflow balanced (see the class comment). Status kNonFinite (with no message) if an input
  // value is NaN or Inf or a packed value overflows; kCancelled if `cancel` is set.
  Status Pack(const KernelTable& kernels, const GradientSide& test, const std::vector<double>& weights,
              std::int64_t begin, std::int64_t count, int nr, int threads, std::int64_t normalize,
              bool balance, const std::atomic<bool>* cancel) {
    InverseNorms(kernels, test, begin, count, normalize);
    balance_.clear();
    lanes_ = RoundUp(std::max<std::int64_t>(count, 1), nr);
    offsets_.clear();
    std::size_t total = 0;
    for (const MatrixView& m : test.blocks) {
      offsets_.push_back(total);
      total += static_cast<std::size_t>(m.cols * lanes_);  // slices of kc x lanes, the last one short
    }
    data_.Resize(total);
    exponents_.clear();
    factors_.clear();
    Outcome outcome;
    Status status = PackAll(kernels, test, weights, begin, count, nr, threads, normalize, cancel, outcome);
    if (status.ok() && (!outcome.finite || outcome.tiny || outcome.huge)) {
      std::vector<int> exponents = ExponentsFor(kernels, test, weights, begin, count, normalize);
      if (!outcome.finite && balance && normalize > 0 && test.factored &&
          Balance(kernels, test, weights, begin, count, normalize, exponents))
        exponents = ExponentsFor(kernels, test, weights, begin, count, normalize);  // the balanced rows' own
      const bool shifted = std::any_of(exponents.begin(), exponents.end(), [](int e) { return e != 0; });
      if (shifted) {
        exponents_ = std::move(exponents);
        for (const int e : exponents_) factors_.push_back(e >= -126 && e <= 127 ? std::ldexp(1.0f, e) : 0.0f);
      }
      if (shifted || !balance_.empty())
        status = PackAll(kernels, test, weights, begin, count, nr, threads, normalize, cancel, outcome);
    }
    if (!status.ok()) return status;
    return outcome.finite ? Status::Ok() : Status{StatusCode::kNonFinite, ""};
  }

  const float* Slice(std::size_t block, std::int64_t slice) const {
    return data_.data() + offsets_[block] + static_cast<std::size_t>(slice * kSliceDepth * lanes_);
  }
  std::int64_t lanes() const { return lanes_; }
  // Per test row of the pass, the binary exponent e_r its packed weights were divided by (2^-e_r):
  // tile column r is multiplied by 2^e_r. Empty when every e_r is 0.
  const std::vector<int>& exponents() const { return exponents_; }
  // 2^e_r as a float, or 0 where 2^e_r is not a normal float (multiply with std::ldexp instead).
  const std::vector<float>& factors() const { return factors_; }

 private:
  float* SliceMutable(std::size_t block, std::int64_t slice) {
    return data_.data() + offsets_[block] + static_cast<std::size_t>(slice * kSliceDepth * lanes_);
  }

  struct Outcome {
    bool finite = true;  // no packed value is NaN or Inf
    bool tiny = false;   // some row's weighted packed values are all below 2^-96, cosine scores 2^0
                         // (zeros included): ExponentsFor decides
    bool huge = false;   // some row has a weighted packed value of at least 2^127: ExponentsFor
                         // decides, whatever the pass's other rows (so e_r is a function of row r alone)
  };

  // Packs every panel of the pass with weights w_c * 2^-e_r, one panel of one block per task.
  Status PackAll(const KernelTable& kernels, const GradientSide& test, const std::vector<double>& weights,
                 std::int64_t begin, std::int64_t count, int nr, int threads, std::int64_t normalize,
                 const std::atomic<bool>* cancel, Outcome& outcome) {
    const std::int64_t panels = lanes_ / nr;
    const auto blocks = static_cast<std::int64_t>(test.blocks.size());
    std::atomic<bool> stop{false};
    std::atomic<std::uint32_t> all{0};
    // Per block and row, the OR of PackPanel's flags and of its cosine flags over the row (each task
    // writes its own entries).
    const auto entries = static_cast<std::size_t>(blocks * count);
    std::vector<std::uint32_t> row_flags(2 * entries, 0u);
    const int workers = data_.size() * sizeof(float) >= kParallelPackBytes ? threads : 1;
    const Status status = ParallelFor(blocks * panels, workers, stop, cancel, [&](std::int64_t task, int) {
      const auto b = static_cast<std::size_t>(task / panels);
      const bool weighted = !(test.factored && b % 2 == 1);
      const int* exponents = weighted && !exponents_.empty() ? exponents_.data() : nullptr;
      std::uint32_t* flags_of_rows = row_flags.data() + b * static_cast<std::size_t>(count);
      const std::uint32_t flags = PackPanel(kernels, test, b, WeightOf(test, weights, b), exponents, normalize,
                                            begin, count, task % panels, nr, flags_of_rows, flags_of_rows + entries);
      all |= flags;
      if (flags & 0x80000000u) stop = true;  // NaN or Inf
    });
    outcome.finite = (all & 0x80000000u) == 0;
    outcome.tiny = false;
    outcome.huge = false;
    // Cosine scores read the cosine flags (stored after the plain ones; no sign bit to drop: it can
    // only be set by a value above 2^96), other scores the plain ones.
    const std::size_t first = normalize > 0 ? entries : 0;
    const std::uint32_t mask = normalize > 0 ? 0xffffffffu : 0x7fffffffu;
    const std::uint32_t below = normalize > 0 ? kCosineTinyBits : kTinyBits;
    for (std::int64_t r = 0; r < count && !(outcome.tiny && outcome.huge); ++r) {
      std::uint32_t weighted = 0, plain = 0;
      for (std::size_t b = 0; b < test.blocks.size(); ++b)
        if (!(test.factored && b % 2 == 1)) {
          weighted |= row_flags[first + b * static_cast<std::size_t>(count) + r];
          plain |= row_flags[b * static_cast<std::size_t>(count) + r];
        }
      outcome.tiny = outcome.tiny || (weighted & mask) < below;
      outcome.huge = outcome.huge || (plain & kHugeBit) != 0;
    }
    return status;
  }

  // PackPanel's flags have their low 31 bits below this (a power of two) exactly when every value's
  // exponent field + 1 is below 32: every value is below 2^-96.
  static constexpr std::uint32_t kTinyBits = 32u << 23;
  // Set in PackPanel's flags (whose low 23 bits are otherwise 0) by a value of at least 2^127 (exponent
  // field 254 or more): ExponentsFor may lower the row (the OR of the exponent fields cannot tell).
  static constexpr std::uint32_t kHugeBit = 1u;
  // Its cosine flags (the OR of exponent field + kCosineOffset) are below this exactly when every
  // exponent field is below 96: every value is below 2^-31. That admits the rows ExponentsFor lifts
  // for cosine scores (largest packed value below 2^kCosineFloor; float rounding never takes a value
  // below 2^-32 past 2^-32) and the few with their largest in [2^-32, 2^-31), which it leaves as they
  // are, while rows of ordinary weights (a unit row has a value of at least 1/sqrt(d)) skip it.
  static constexpr std::uint32_t kCosineOffset = 32u << 23;
  static constexpr std::uint32_t kCosineTinyBits = 128u << 23;
  static constexpr int kCosineFloor = -32;
  // A row is lowered (e_r > 0) only if no value normal at e_r = 0 is rounded by more than 2^kLoweringBits
  // of itself (ShiftLosesBits).
  static constexpr int kLoweringBits = -20;

  // e_r for each row of the pass (see the class comment), from the row's largest |w_c x scale x test
  // value| over the weighted blocks, found in double precision; 0 when it is in range, zero, or not
  // finite (a NaN or Inf input, reported as such by the caller).
  std::vector<int> ExponentsFor(const KernelTable& kernels, const GradientSide& test,
                                const std::vector<double>& weights, std::int64_t begin, std::int64_t count,
                                std::int64_t normalize) const {
    std::vector<int> exponents(static_cast<std::size_t>(count), 0);
    float piece[kSliceDepth];
    for (std::int64_t r = 0; r < count; ++r) {
      std::optional<int> largest;  // binary exponent of the row's largest product
      bool finite = true;
      for (std::size_t b = 0; b < test.blocks.size() && finite; ++b) {
        if (test.factored && b % 2 == 1) continue;
        const MatrixView& m = test.blocks[b];
        const double scale = RowScale(test, b, r, normalize);
        double row_max = 0.0;  // the largest |scale x value|: finite (at most 2^537 x 2^128, or 2 balanced)
        for (std::int64_t k0 = 0; k0 < m.cols && finite; k0 += kSliceDepth) {
          const std::int64_t kc = std::min(kSliceDepth, m.cols - k0);
          LoadRow(kernels, m, begin + r, k0, kc, piece);
          for (std::int64_t k = 0; k < kc; ++k) {
            const double v = std::fabs(scale * static_cast<double>(piece[k]));
            finite = finite && std::isfinite(v);
            row_max = std::max(row_max, v);
          }
        }
        const double w = std::fabs(weights[test.factored ? b / 2 : b]);
        if (!finite || row_max == 0.0 || w == 0.0) continue;
        // ilogb of w x row_max without forming it (it may leave double's range): significands in [1, 4).
        const double significands =
            std::scalbn(w, -std::ilogb(w)) * std::scalbn(row_max, -std::ilogb(row_max));
        const int exponent = std::ilogb(w) + std::ilogb(row_max) + (significands >= 2.0 ? 1 : 0);
        largest = std::max(largest.value_or(exponent), exponent);
      }
      if (!finite || !largest) continue;
      if (*largest < -96) exponents[static_cast<std::size_t>(r)] = *largest + 96;  // to [2^-96, 2^-95)
      if (normalize > 0 && *largest < kCosineFloor)  // to [2^-32, 2^-31)
        exponents[static_cast<std::size_t>(r)] = *largest - kCosineFloor;
      if (*largest >= 127 && !ShiftLosesBits(kernels, test, weights, begin + r, r, *largest - 100, normalize))
        exponents[static_cast<std::size_t>(r)] = *largest - 100;  // to [2^100, 2^101)
    }
    return exponents;
  }

  // Whether packing row `row` (row r of the pass) with exponent e > 0 would round a value that is a
  // normal float32 when packed with exponent 0 by more than 2^-20 of itself: with x = w v (the float64
  // product PackPanel rounds to float32), |float32(x 2^-e) 2^e - x| > 2^-20 |x|, over the weighted
  // blocks (a value that becomes 0 always is; torch_device.py _lowering_loses_values is the same test).
  // Why 2^-20: a slot whose packed values carry relative errors up to r moves a score by at most r
  // sum_k |w_c t_k x_k|, r times that slot's part of the contract's bound 1e-5 sum_c |w_c| |g_c(t)|
  // |g_c(i)| (Cauchy-Schwarz); 2^-20 ~ 0.95e-6 leaves the rest of the bound, 9e-6, to the float32
  // rounding of the products and sums, as for any other row. The float64 difference is exact wherever
  // it is near 2^-20 |x| (the two then agree to about 19 bits), so the comparison is exact too.
  bool ShiftLosesBits(const KernelTable& kernels, const GradientSide& test, const std::vector<double>& weights,
                      std::int64_t row, std::int64_t r, int e, std::int64_t normalize) const {
    float piece[kSliceDepth];
    for (std::size_t b = 0; b < test.blocks.size(); ++b) {
      if (test.factored && b % 2 == 1) continue;
      const MatrixView& m = test.blocks[b];
      const double scale = RowScale(test, b, r, normalize);
      const double w = WeightOf(test, weights, b), plain_lw = w * scale, shifted_lw = std::ldexp(w, -e) * scale;
      for (std::int64_t k0 = 0; k0 < m.cols; k0 += kSliceDepth) {
        const std::int64_t kc = std::min(kSliceDepth, m.cols - k0);
        LoadRow(kernels, m, row, k0, kc, piece);
        for (std::int64_t k = 0; k < kc; ++k) {
          const double x = plain_lw * static_cast<double>(piece[k]);
          const float plain = static_cast<float>(x);
          const float after = static_cast<float>(shifted_lw * static_cast<double>(piece[k]));
          if (std::fabs(plain) >= FLT_MIN && std::fabs(plain) <= FLT_MAX &&
              std::fabs(std::ldexp(static_cast<double>(after), e) - x) > std::ldexp(std::fabs(x), kLoweringBits))
            return true;
        }
      }
    }
    return false;
  }

  // Weights (times each row's 2^-e_r, PackPanel) go on the left factor (or the whole gradient) of
  // each checkpoint.
  static double WeightOf(const GradientSide& test, const std::vector<double>& weights, std::size_t b) {
    if (test.factored && b % 2 == 1) return 1.0;
    return weights[test.factored ? b / 2 : b];
  }

  // Cosine scores: inverse norms of the pass's rows per run of `normalize` checkpoints, row-major
  // (count x runs); nothing otherwise.
  void InverseNorms(const KernelTable& kernels, const GradientSide& test, std::int64_t begin,
                    std::int64_t count, std::int64_t normalize) {
    runs_ = normalize > 0 ? test.checkpoints() / static_cast<std::size_t>(normalize) : 0;
    scales_.assign(static_cast<std::size_t>(count) * runs_, 0.0);
    std::vector<float> buf(runs_ > 0 ? static_cast<std::size_t>(MaxWidth(test)) : 0);
    const auto group = static_cast<std::size_t>(normalize);
    for (std::int64_t r = 0; r < count && runs_ > 0; ++r)
      for (std::size_t g = 0; g < runs_; ++g)
        scales_[static_cast<std::size_t>(r) * runs_ + g] =
            InverseNorm(RunSquaredNorm(kernels, test, g * group, group, begin + r, buf.data()));
  }

  // What row r of the pass is multiplied by in block b besides its weight and 2^-e_r: cosine scores,
  // its inverse norm over the checkpoint's run (on a factored checkpoint's left factor, with the
  // weight), and for a balanced row 2^-k_rc on the left factor, 2^k_rc on the right one; else 1.
  double RowScale(const GradientSide& test, std::size_t b, std::int64_t r, std::int64_t normalize) const {
    const bool right = test.factored && b % 2 == 1;
    const std::size_t checkpoint = test.factored ? b / 2 : b;
    const double scale =
        runs_ == 0 || right
            ? 1.0
            : scales_[static_cast<std::size_t>(r) * runs_ + checkpoint / static_cast<std::size_t>(normalize)];
    if (balance_.empty()) return scale;
    const int k = balance_[static_cast<std::size_t>(r) * test.checkpoints() + checkpoint];
    return std::ldexp(scale, right ? k : -k);
  }

  // Cosine scores of factored rows: sets balance_ (k_rc, row-major: count x checkpoints) for each row
  // of the pass whose inputs are finite and whose packing at its exponent (exponents[r]; one that
  // overflows has e_r = 0) holds an infinite value; returns whether there is one (else balance_ stays
  // empty). See the class comment.
  bool Balance(const KernelTable& kernels, const GradientSide& test, const std::vector<double>& weights,
               std::int64_t begin, std::int64_t count, std::int64_t normalize, const std::vector<int>& exponents) {
    const std::size_t checkpoints = test.checkpoints();
    std::vector<int> balance(static_cast<std::size_t>(count) * checkpoints, 0);
    std::vector<float> row(static_cast<std::size_t>(MaxWidth(test)));
    std::vector<double> squares(test.blocks.size());  // of row r's blocks
    bool any = false;
    for (std::int64_t r = 0; r < count; ++r) {
      if (exponents[static_cast<std::size_t>(r)] != 0) continue;
      bool finite = true, overflows = false;
      for (std::size_t b = 0; b < test.blocks.size() && finite; ++b) {
        const MatrixView& m = test.blocks[b];
        LoadRow(kernels, m, begin + r, 0, m.cols, row.data());
        const double lw = WeightOf(test, weights, b) * RowScale(test, b, r, normalize);
        for (std::int64_t k = 0; k < m.cols; ++k) {
          finite = finite && std::isfinite(row[k]);
          overflows = overflows || std::isinf(static_cast<float>(lw * static_cast<double>(row[k])));
        }
        squares[b] = SumOfSquares(kernels, row.data(), m.cols);
      }
      if (!finite || !overflows) continue;
      any = true;
      for (std::size_t c = 0; c < checkpoints; ++c) {
        const double left = squares[2 * c], right = squares[2 * c + 1];
        // |R_c| 2^k in [0.5, 1); a zero right factor: s |L_c| 2^-k in [0.5, 1) (s: the left's scale).
        const double norm = right > 0.0 ? std::sqrt(right) : RowScale(test, 2 * c, r, normalize) * std::sqrt(left);
        if (norm == 0.0) continue;
        int e = 0;
        std::frexp(norm, &e);
        balance[static_cast<std::size_t>(r) * checkpoints + c] = right > 0.0 ? -e : e;
      }
    }
    if (any) balance_ = std::move(balance);
    return any;
  }

  // The widest block's columns, at least 1.
  static std::int64_t MaxWidth(const GradientSide& side) {
    std::int64_t width = 1;
    for (const MatrixView& m : side.blocks) width = std::max(width, m.cols);
    return width;
  }

  // Panel `panel` of block b: lanes are test rows begin + panel * nr + lane, zero past `count`,
  // each scaled by w (times 2^-exponents[r] when not null) times RowScale. row_flags[r] gets the OR
  // of row r's flags, cosine_flags[r] the OR of its values'
  // (bits & exponent) + kCosineOffset.
  // Slice by slice, so that the kc x nr slice being filled stays in the L1 cache. Returns the OR of
  // (bits & exponent) + 1 ulp of exponent over the values, with kHugeBit where a value is at least
  // 2^127: the sign bit is set only for NaN or Inf.
  std::uint32_t PackPanel(const KernelTable& kernels, const GradientSide& test, std::size_t b, double w,
                          const int* exponents, std::int64_t normalize, std::int64_t begin, std::int64_t count,
                          std::int64_t panel, int nr, std::uint32_t* row_flags, std::uint32_t* cosine_flags) {
    const MatrixView& m = test.blocks[b];
    const std::int64_t rows = std::clamp<std::int64_t>(count - panel * nr, 0, nr);
    float piece[kSliceDepth];
    std::uint32_t flags = 0;
    for (std::int64_t s = 0; s < Slices(m.cols); ++s) {
      const std::int64_t k0 = s * kSliceDepth, kc = std::min(kSliceDepth, m.cols - k0);
      float* slice = SliceMutable(b, s) + panel * kc * nr;
      for (std::int64_t lane = 0; lane < rows; ++lane) {
        const std::int64_t r = panel * nr + lane;
        const double rw = exponents ? std::ldexp(w, -exponents[r]) : w;
        const double lw = rw * RowScale(test, b, r, normalize);
        LoadRow(kernels, m, begin + r, k0, kc, piece);
        std::uint32_t lane_flags = 0, lane_cosine = 0;
        for (std::int64_t kk = 0; kk < kc; ++kk) {
          const float v = static_cast<float>(lw * static_cast<double>(piece[kk]));
          std::uint32_t bits;
          std::memcpy(&bits, &v, sizeof bits);
          lane_flags |= ((bits & 0x7f800000u) + 0x00800000u) | ((bits & 0x7f800000u) >= 0x7f000000u ? kHugeBit : 0u);
          lane_cosine |= (bits & 0x7f800000u) + kCosineOffset;
          slice[kk * nr + lane] = v;
        }
        row_flags[r] |= lane_flags;
        cosine_flags[r] |= lane_cosine;
        flags |= lane_flags;
      }
      for (std::int64_t kk = 0; kk < kc && rows < nr; ++kk)
        std::fill(slice + kk * nr + rows, slice + (kk + 1) * nr, 0.0f);
    }
    return flags;
  }

  AlignedFloats data_;
  std::vector<std::size_t> offsets_;
  std::int64_t lanes_ = 0;
  std::vector<int> exponents_;  // e_r per row of the pass, empty when all are 0
  std::vector<float> factors_;  // 2^e_r, or 0 where that is not a normal float
  std::vector<double> scales_;  // InverseNorms
  std::vector<int> balance_;    // Balance's k_rc, empty when no row of the pass is balanced
  std::size_t runs_ = 0;
};

// Fetches the next piece of train data (rows x one slice of one block) into the cache a little
// at a time while the current piece computes, so that memory reads overlap arithmetic instead of
// stalling the copy of the next piece. A piece is small enough (block rows x 1 KiB) to stay in
// the L2 cache until it is used, whatever the gradient width.
class RowPrefetcher {
 public:
  // Columns [k0, k0 + kc) of rows [first, first + count) of m; nothing when count is 0.
  void Reset(const MatrixView& m, std::int64_t first, std::int64_t count, std::int64_t k0, std::int64_t kc) {
    m_ = &m;
    row_ = first;
    end_row_ = first + std::max<std::int64_t>(count, 0);
    offset_ = static_cast<std::int64_t>(k0 * ElementSize(m.dtype));
    lines_per_row_ = (static_cast<std::int64_t>(kc * ElementSize(m.dtype)) + kLine - 1) / kLine;
    total_ = (end_row_ - first) * lines_per_row_;
    line_ = 0;
    issued_ = 0;
  }

  // Issues prefetches up to `done` of `total` of the way through the piece.
  void Advance(std::int64_t done, std::int64_t total) {
    const std::int64_t target = total > 0 ? total_ * done / total : 0;
    if (issued_ >= target || lines_per_row_ == 0) return;
    const char* row = RowAddress(*m_, row_) + offset_;
    for (; issued_ < target; ++issued_) {
#if defined(__GNUC__)
      __builtin_prefetch(row + line_ * kLine, 0, 2);
#endif
      if (++line_ == lines_per_row_) {
        line_ = 0;
        if (++row_ < end_row_) row = RowAddress(*m_, row_) + offset_;
      }
    }
  }

 private:
  static constexpr std::int64_t kLine = 64;
  const MatrixView* m_ = nullptr;
  std::int64_t row_ = 0, end_row_ = 0, offset_ = 0, lines_per_row_ = 0, total_ = 0, line_ = 0, issued_ = 0;
};

struct ThreadScratch {
  AlignedFloats tile, left, right, rows, run;
  std::vector<double> slice_sums;  // a block of more than one slice: its slices' float64 sums (Accumulate)
  std::vector<double> norms;                  // cosine scores: per tile row, its squared norm over the run,
  std::vector<double> left_sums, right_sums;  // kNormLanes partial sums per row of a block,
  std::vector<float> scales;                  // and its inverse norm
  // Cosine scores of a run with rows of a norm below 2^-64 or above 2^64: per block of the run
  // (factored: left and right) and tile row, the power of two the row is multiplied by as it is
  // loaded (TileProducer::RunExponents).
  std::vector<int> exponents;
  std::vector<float> row;  // one whole row of a block (RunExponents' factor norms)
  RowPrefetcher prefetch;
  // After a Compute that returned false: the tile's first NaN or Inf score, (train row within the
  // tile, test row within the pass), train rows first.
  std::int64_t bad_row = 0, bad_lane = 0;
};

class TileProducer {
 public:
  // block_rows: train rows per tile, a multiple of micro.mr; normalize: as Options::normalize (0:
  // plain scores).
  TileProducer(const KernelTable& kernels, const MicroTile& micro, const GradientSide& train,
               const PackedTest& packed, std::int64_t block_rows, std::int64_t normalize)
      : kernels_(kernels), micro_(micro), train_(train), packed_(packed),
        block_rows_(block_rows), normalize_(normalize) {}

  // Computes the tile of train rows [begin, begin + rows) into scratch.tile, prefetching rows
  // [next_begin, next_begin + next_rows) meanwhile; returns false if any score in the valid
  // region is NaN or Inf (the first one's place in scratch.bad_row and bad_lane).
  // Cosine scores: each run of checkpoints is summed apart (the first in the tile itself, later ones
  // in scratch.run) while the squared norms of its train rows are summed from the rows loaded for
  // it, then scaled row by row by the inverse norms (the epilogue) and added to the tile; with a
  // single run, the scaling is done by the pass that checks the tile for NaN and Inf.
  // A run in which a train row's norm is below 2^-64 or above 2^64 is computed again with such rows
  // multiplied by powers of two (exactly, up to values then below float32's normal range, negligible
  // beside the norm) that bring their norms near 1 (RunExponents): cosine scores do not change, and
  // the inverse norm (a float) neither overflows nor loses bits, nor do the products underflow. Other
  // rows are computed as before, to the same bits.
  bool Compute(std::int64_t begin, std::int64_t rows, std::int64_t next_begin,
               std::int64_t next_rows, std::int64_t test_count, ThreadScratch& s) const {
    const NextTile next{next_begin, next_rows};
    const std::int64_t ldc = packed_.lanes();
    const auto tile_size = static_cast<std::size_t>(block_rows_ * ldc);
    const std::size_t checkpoints = train_.checkpoints();
    const std::size_t run = normalize_ > 0 ? static_cast<std::size_t>(normalize_) : checkpoints;
    s.tile.Resize(tile_size);
    s.tile.Zero();
    s.rows.Resize(static_cast<std::size_t>(block_rows_ * kSliceDepth));
    if (train_.factored) {
      s.left.Resize(tile_size);
      s.right.Resize(tile_size);
    }
    double* sums = nullptr;
    const bool scale_in_check = normalize_ > 0 && run == checkpoints;
    if (normalize_ > 0) {
      s.run.Resize(tile_size);
      s.norms.resize(static_cast<std::size_t>(rows));
      s.scales.resize(static_cast<std::size_t>(rows));
      for (auto* v : {&s.left_sums, &s.right_sums}) v->resize(static_cast<std::size_t>(rows * kNormLanes));
      sums = s.left_sums.data();
    }
    // Cosine scores: row j's squared norm over block b, from the partial sums Accumulate left.
    const auto squares = [&](std::vector<double>& block_sums, std::int64_t j) {
      return CombineSums(block_sums.data() + j * kNormLanes);
    };
    for (std::size_t c0 = 0; c0 < checkpoints; c0 += run) {
      float* sum = normalize_ > 0 && c0 > 0 ? s.run.data() : s.tile.data();
      // The run's sums and norms; exponents (when not null): RunExponents'.
      const auto compute_run = [&](const int* exponents) {
        if (sum != s.tile.data()) s.run.Zero();
        if (sum == s.tile.data() && exponents) s.tile.Zero();
        std::fill(s.norms.begin(), s.norms.end(), 0.0);
        for (std::size_t c = c0; c < c0 + run; ++c) {
          if (sums) std::fill(s.left_sums.begin(), s.left_sums.end(), 0.0);
          if (sums && train_.factored) std::fill(s.right_sums.begin(), s.right_sums.end(), 0.0);
          const int* left = exponents ? exponents + (train_.factored ? 2 * (c - c0) : c - c0) * rows : nullptr;
          if (!train_.factored) {
            Accumulate(c, begin, rows, sum, sums, s, next, left);
            for (std::int64_t j = 0; sums && j < rows; ++j) s.norms[j] += squares(s.left_sums, j);
            continue;
          }
          s.left.Zero();
          s.right.Zero();
          Accumulate(2 * c, begin, rows, s.left.data(), sums, s, next, left);
          Accumulate(2 * c + 1, begin, rows, s.right.data(), sums ? s.right_sums.data() : nullptr, s, next,
                     exponents ? left + rows : nullptr);
          const float* l = s.left.data();
          const float* r = s.right.data();
          for (std::size_t i = 0; i < tile_size; ++i) sum[i] += l[i] * r[i];
          for (std::int64_t j = 0; sums && j < rows; ++j)
            s.norms[j] += squares(s.left_sums, j) * squares(s.right_sums, j);
        }
      };
      compute_run(nullptr);
      if (normalize_ > 0 && RunExponents(c0, run, begin, rows, s)) compute_run(s.exponents.data());
      if (normalize_ > 0) {
        for (std::int64_t j = 0; j < rows; ++j) s.scales[j] = static_cast<float>(InverseNorm(s.norms[j]));
        if (!scale_in_check) ScaleRun(sum, rows, ldc, s);
      }
    }
    // (bits & exponent) + 1 ulp of exponent reaches the sign bit only for an all-ones exponent
    // (NaN or Inf); plain integer operations, so the loop vectorises.
    std::uint32_t flags = 0;
    for (std::int64_t j = 0; j < rows; ++j) {
      float* row = s.tile.data() + j * ldc;
      if (!scale_in_check) UndoWeightExponent(row, test_count);
      if (scale_in_check) {  // the epilogue of the single run, in the same loop
        const float scale = s.scales[static_cast<std::size_t>(j)];
        for (std::int64_t r = 0; r < test_count; ++r) row[r] *= scale;
        UndoWeightExponent(row, test_count);
        for (std::int64_t r = 0; r < test_count; ++r) {
          std::uint32_t bits;
          std::memcpy(&bits, row + r, sizeof bits);
          flags |= (bits & 0x7f800000u) + 0x00800000u;
        }
        continue;
      }
      for (std::int64_t r = 0; r < test_count; ++r) {
        std::uint32_t bits;
        std::memcpy(&bits, row + r, sizeof bits);
        flags |= (bits & 0x7f800000u) + 0x00800000u;
      }
    }
    if ((flags & 0x80000000u) == 0) return true;
    for (std::int64_t j = 0; j < rows; ++j)
      for (std::int64_t r = 0; r < test_count; ++r)
        if (!std::isfinite(s.tile.data()[j * ldc + r])) {
          s.bad_row = j;
          s.bad_lane = r;
          return false;
        }
    return false;
  }

 private:
  struct NextTile {
    std::int64_t begin, rows;
  };

  // Multiplies score r of `count` by 2^e_r (packed_.exponents()), rounding once (a float multiply by
  // a power of two is exact unless the result is subnormal or overflows, and then rounds as the
  // score's own float32 rounding would); nothing for the usual exponents 0.
  void UndoWeightExponent(float* row, std::int64_t count) const {
    const std::vector<int>& exponents = packed_.exponents();
    if (exponents.empty()) return;
    const std::vector<float>& factors = packed_.factors();
    for (std::int64_t r = 0; r < count; ++r) {
      const auto i = static_cast<std::size_t>(r);
      if (exponents[i] == 0) continue;
      row[r] = factors[i] != 0.0f ? row[r] * factors[i] : std::ldexp(row[r], exponents[i]);
    }
  }

  // The epilogue of a run of checkpoints summed into `sum` (the tile itself for the first run):
  // row j of the tile gets row j of `sum` times the inverse norm of train row j over the run.
  static void ScaleRun(const float* sum, std::int64_t rows, std::int64_t ldc, ThreadScratch& s) {
    for (std::int64_t j = 0; j < rows; ++j) {
      const float scale = s.scales[static_cast<std::size_t>(j)];
      float* t = s.tile.data() + j * ldc;
      const float* x = sum + j * ldc;
      if (x == t)
        for (std::int64_t r = 0; r < ldc; ++r) t[r] *= scale;
      else
        for (std::int64_t r = 0; r < ldc; ++r) t[r] += scale * x[r];
    }
  }

  // Points the prefetcher at the piece computed after slice `slice` of block b of the tile of
  // rows [begin, begin + rows): the next slice, else the next block's first, else the next tile's.
  void PrefetchAfter(std::size_t b, std::int64_t slice, std::int64_t begin, std::int64_t rows,
                     const NextTile& next, RowPrefetcher& prefetch) const {
    const MatrixView& m = train_.blocks[b];
    if (slice + 1 < Slices(m.cols)) {
      const std::int64_t k0 = (slice + 1) * kSliceDepth;
      prefetch.Reset(m, begin, rows, k0, std::min(kSliceDepth, m.cols - k0));
    } else if (b + 1 < train_.blocks.size()) {
      const MatrixView& n = train_.blocks[b + 1];
      prefetch.Reset(n, begin, rows, 0, std::min(kSliceDepth, n.cols));
    } else {
      const MatrixView& first = train_.blocks[0];
      prefetch.Reset(first, next.begin, next.rows, 0, std::min(kSliceDepth, first.cols));
    }
  }

  // Whether a row of the tile has a squared norm over the run (s.norms) that is nonzero and below
  // 2^-128 or above 2^128; if so, s.exponents gets, per block of the run and row (block-major), the
  // power of two e that row of the block is multiplied by: full gradients, the same e for every
  // block of the run, bringing the row's norm into [0.5, 1); factored, the left factor of each
  // checkpoint brought into [0.5, 1) and the right factor taking the rest, so that neither factor
  // product underflows or overflows and each checkpoint's term is multiplied by the same power of two
  // (at most 2 for the right factor, since |L| |R| is at most the norm). 0 for every other row.
  bool RunExponents(std::size_t c0, std::size_t run, std::int64_t begin, std::int64_t rows, ThreadScratch& s) const {
    constexpr double kLow = 0x1p-128, kHigh = 0x1p128;
    bool any = false;
    for (std::int64_t j = 0; j < rows && !any; ++j) any = s.norms[j] > 0.0 && (s.norms[j] < kLow || s.norms[j] > kHigh);
    if (!any) return false;
    const std::size_t per = train_.factored ? 2 : 1;
    s.exponents.assign(run * per * static_cast<std::size_t>(rows), 0);
    const auto exponent_of_norm = [](double squared) {  // e with sqrt(squared) * 2^e in [0.5, 1)
      int e = 0;
      std::frexp(std::sqrt(squared), &e);
      return -e;
    };
    for (std::int64_t j = 0; j < rows; ++j) {
      const double norm = s.norms[j];
      if (!(norm > 0.0 && (norm < kLow || norm > kHigh))) continue;
      const int e = exponent_of_norm(norm);
      for (std::size_t c = c0; c < c0 + run; ++c) {
        int* at = s.exponents.data() + (c - c0) * per * rows + j;
        if (!train_.factored) {
          *at = e;
          continue;
        }
        const MatrixView& left = train_.blocks[2 * c];
        s.row.resize(static_cast<std::size_t>(std::max<std::int64_t>(left.cols, 1)));
        LoadRow(kernels_, left, begin + j, 0, left.cols, s.row.data());
        const double squares = SumOfSquares(kernels_, s.row.data(), left.cols);
        if (squares > 0.0) {  // else the checkpoint's term is 0 whatever the right factor (left as it is)
          at[0] = exponent_of_norm(squares);
          at[rows] = e - at[0];
        }
      }
    }
    return true;
  }

  // c[i][lane] += sum over k of train block b row (begin + i) times the packed test lanes: each
  // slice's float32 chain, and for a block of more than one slice, the chains summed in float64
  // (s.slice_sums) and rounded once, so that the error does not grow with the width;
  // sums (when not null): row i's kNormLanes partial sums of squares (kernels.sum_of_squares) at
  // sums + i * kNormLanes, added to slice by slice. exponents (when not null): row i is multiplied
  // by 2^exponents[i] as it is loaded.
  void Accumulate(std::size_t b, std::int64_t begin, std::int64_t rows, float* c, double* sums,
                  ThreadScratch& s, const NextTile& next, const int* exponents) const {
    const MatrixView& m = train_.blocks[b];
    const std::int64_t ldc = packed_.lanes(), nr = micro_.nr, mr = micro_.mr;
    const bool in_double = Slices(m.cols) > 1;
    if (in_double) s.slice_sums.assign(static_cast<std::size_t>(RoundUp(rows, mr) * ldc), 0.0);
    for (std::int64_t slice = 0; slice < Slices(m.cols); ++slice) {
      const std::int64_t k0 = slice * kSliceDepth;
      const std::int64_t kc = std::min(kSliceDepth, m.cols - k0);
      const float* panels = packed_.Slice(b, slice);
      // The tile's rows are first copied (and converted) into a contiguous scratch block, rows
      // padded with zeros to a multiple of mr: long sequential reads stream from memory far
      // faster than the micro-kernel's interleaved walk over mr rows would.
      float* a_block = s.rows.data();
      const std::int64_t padded = RoundUp(rows, mr);
      for (std::int64_t r = 0; r < rows; ++r) LoadRow(kernels_, m, begin + r, k0, kc, a_block + r * kc);
      for (std::int64_t r = 0; exponents && r < rows; ++r) {
        if (exponents[r] == 0) continue;
        const double factor = std::ldexp(1.0, exponents[r]);  // |e| < 300: a normal double
        float* x = a_block + r * kc;
        for (std::int64_t k = 0; k < kc; ++k) x[k] = static_cast<float>(static_cast<double>(x[k]) * factor);
      }
      if (sums) kernels_.sum_of_squares(a_block, rows, kc, sums);
      std::memset(a_block + rows * kc, 0, static_cast<std::size_t>((padded - rows) * kc) * sizeof(float));
      PrefetchAfter(b, slice, begin, rows, next, s.prefetch);
      const std::int64_t steps = padded / mr;
      for (std::int64_t i = 0; i < rows; i += mr) {
        const float* a = a_block + i * kc;
        const std::int64_t lda = kc;
        for (std::int64_t p = 0; p < ldc; p += nr)
          if (in_double)
            micro_.double_kernel(kc, a, lda, panels + p * kc, s.slice_sums.data() + i * ldc + p, ldc);
          else
            micro_.kernel(kc, a, lda, panels + p * kc, c + i * ldc + p, ldc);
        s.prefetch.Advance(i / mr + 1, steps);
      }
    }
    if (!in_double) return;
    const double* wide = s.slice_sums.data();
    for (std::int64_t i = 0; i < rows * ldc; ++i) c[i] += static_cast<float>(wide[i]);
  }

  const KernelTable& kernels_;
  const MicroTile& micro_;
  const GradientSide& train_;
  const PackedTest& packed_;
  std::int64_t block_rows_;
  std::int64_t normalize_;
};

std::string Join(const std::vector<std::int64_t>& v) {
  std::ostringstream s;
  for (std::size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  return s.str();
}

}  // namespace

Status ValidateSide(const GradientSide& side, const char* name) {
  const std::string n(name);
  if (side.blocks.empty()) return {StatusCode::kInvalidArgument, n + " has no checkpoints"};
  if (side.factored && side.blocks.size() % 2 != 0)
    return {StatusCode::kInvalidArgument, n + ": factored gradients need a left and a right block per checkpoint"};
  for (std::size_t b = 0; b < side.blocks.size(); ++b) {
    const MatrixView& m = side.blocks[b];
    if (m.rows != side.rows())
      return {StatusCode::kInvalidArgument, n + ": " + BlockName(side, b) + " has " +
                                                std::to_string(m.rows) + " rows, expected " +
                                                std::to_string(side.rows())};
    if (m.rows < 0 || m.cols < 0 || m.row_stride < m.cols)
      return {StatusCode::kInvalidArgument, n + ": " + BlockName(side, b) + " has an invalid shape or row stride"};
    if (m.data == nullptr && m.rows > 0 && m.cols > 0)
      return {StatusCode::kInvalidArgument, n + ": " + BlockName(side, b) + " has no data"};
    if (m.dtype != DType::kFloat32 && m.dtype != DType::kFloat16 && m.dtype != DType::kBFloat16)
      return {StatusCode::kInvalidArgument, n + ": " + BlockName(side, b) + " has an unknown dtype (" +
                                                std::to_string(static_cast<int>(m.dtype)) + ")"};
  }
  return Status::Ok();
}

Status ValidatePair(const GradientSide& test, const GradientSide& train,
                    const std::vector<double>& weights) {
  Status s = ValidateSide(test, "test");
  if (!s.ok()) return s;
  s = ValidateSide(train, "train");
  if (!s.ok()) return s;
  if (test.factored != train.factored)
    return {StatusCode::kInvalidArgument, "test and train must both be factored or both full gradients"};
  if (test.blocks.size() != train.blocks.size())
    return {StatusCode::kInvalidArgument,
            "test has " + std::to_string(test.checkpoints()) + " checkpoints, train has " +
                std::to_string(train.checkpoints())};
  for (std::size_t b = 0; b < test.blocks.size(); ++b)
    if (test.blocks[b].cols != train.blocks[b].cols)
      return {StatusCode::kInvalidArgument,
              BlockName(test, b) + " has " + std::to_string(test.blocks[b].cols) +
                  " columns in test but " + std::to_string(train.blocks[b].cols) + " in train"};
  return ValidateWeights(weights, test.checkpoints());
}

Status ValidateWeights(const std::vector<double>& weights, std::size_t checkpoints) {
  if (weights.size() != checkpoints)
    return {StatusCode::kInvalidArgument, "expected one weight per checkpoint (" +
                                              std::to_string(checkpoints) + "), got " +
                                              std::to_string(weights.size())};
  for (double w : weights)
    if (!std::isfinite(w)) return {StatusCode::kInvalidArgument, "weights must be finite"};
  return Status::Ok();
}

void LoadRow(const KernelTable& kernels, const MatrixView& m, std::int64_t row, std::int64_t k0,
             std::int64_t n, float* dst) {
  const char* base = RowAddress(m, row);
  switch (m.dtype) {
    case DType::kFloat32:
      std::memcpy(dst, reinterpret_cast<const float*>(base) + k0, static_cast<std::size_t>(n) * 4);
      break;
    case DType::kFloat16:
      kernels.half_to_float(reinterpret_cast<const std::uint16_t*>(base) + k0, n, dst);
      break;
    case DType::kBFloat16:
      kernels.bfloat_to_float(reinterpret_cast<const std::uint16_t*>(base) + k0, n, dst);
      break;
  }
}

double CombineSums(double* sums) {
  for (std::int64_t width = kNormLanes / 2; width > 0; width /= 2)
    for (std::int64_t j = 0; j < width; ++j) sums[j] += sums[j + width];
  return sums[0];
}

double SumOfSquares(const KernelTable& kernels, const float* x, std::int64_t n) {
  double sums[kNormLanes] = {};
  kernels.sum_of_squares(x, 1, n, sums);
  return CombineSums(sums);
}

namespace {

double RowSquares(const KernelTable& kernels, const MatrixView& m, std::int64_t row, float* buf) {
  LoadRow(kernels, m, row, 0, m.cols, buf);
  return SumOfSquares(kernels, buf, m.cols);
}

}  // namespace

double RunSquaredNorm(const KernelTable& kernels, const GradientSide& side, std::size_t first,
                      std::size_t count, std::int64_t row, float* buf) {
  double total = 0.0;
  for (std::size_t c = first; c < first + count; ++c)
    total += side.factored ? RowSquares(kernels, side.blocks[2 * c], row, buf) *
                                 RowSquares(kernels, side.blocks[2 * c + 1], row, buf)
                           : RowSquares(kernels, side.blocks[c], row, buf);
  return total;
}

double InverseNorm(double squared) { return squared == 0.0 ? 0.0 : 1.0 / std::sqrt(squared); }

Status ValidateNormalize(const GradientSide& side, std::int64_t normalize) {
  const auto checkpoints = static_cast<std::int64_t>(side.checkpoints());
  if (normalize < 0 || (normalize > 0 && checkpoints % normalize != 0))
    return {StatusCode::kInvalidArgument,
            "normalize must be 0 (plain scores) or a divisor of the " + std::to_string(checkpoints) +
                " checkpoints (checkpoints per norm), got " + std::to_string(normalize)};
  return Status::Ok();
}

Status NonFiniteError(const GradientSide* test, const GradientSide& train, const std::int64_t* pair) {
  const std::pair<const GradientSide*, const char*> sides[] = {{test, "test"}, {&train, "train"}};
  for (const auto& [side, name] : sides) {
    if (side == nullptr) continue;
    for (std::size_t b = 0; b < side->blocks.size(); ++b) {
      const std::vector<std::int64_t> rows = NonFiniteRows(side->blocks[b], 5);
      if (!rows.empty())
        return {StatusCode::kNonFinite, std::string(name) + " " + BlockName(*side, b) +
                                            " contains NaN or Inf values, first in rows [" +
                                            Join(rows) + "]"};
    }
  }
  std::string where;
  if (pair != nullptr) where = ", first for test row " + std::to_string(pair[0]) + " and train row " + std::to_string(pair[1]);
  return {StatusCode::kNonFinite,
          "influence overflowed float32 although every input is finite: a score or one of its partial "
          "sums (of 256 products, or for factored gradients a product of left or of right factors) "
          "overflowed float32" + where + "; scale the gradients down (or the learning-rate weights, for a "
          "score beyond range)"};
}

Status CheckAllFinite(const GradientSide* test, const GradientSide& train) {
  for (const GradientSide* side : {test, &train}) {
    if (side == nullptr) continue;
    for (const MatrixView& b : side->blocks)
      if (!NonFiniteRows(b, 1).empty()) return NonFiniteError(test, train);
  }
  return Status::Ok();
}

Status RunTiles(const GradientSide& test, const GradientSide& train,
                const std::vector<double>& weights, const Options& options,
                TileConsumer& consumer) {
  const KernelTable& kernels = KernelsFor(options.isa);
  const std::int64_t m = test.rows(), n = train.rows();
  // Nothing to score, but bad input is still bad input.
  if (m == 0 || n == 0) return CheckAllFinite(&test, train);
  const std::int64_t row_bytes = PackedRowBytes(test);
  // Blocks larger than the rows are the rows: clamped before any size is computed from them (a
  // train_block near INT64_MAX would overflow its round-up and the tile's size).
  const int threads = ResolveThreads(options.num_threads);
  std::int64_t pass_rows =
      std::min(options.test_block > 0 ? options.test_block : DefaultPassRows(row_bytes, kernels), m);
  // The consumer's cap (top-k selectors), for at most one thread per train row. An overflowing
  // score is still named as in passes of the uncut rows (`window`): the smallest (train row, test
  // row) of the first window holding one, for any thread count.
  const std::int64_t window = pass_rows;
  const std::int64_t cap = consumer.MaxPassRows(std::min<std::int64_t>(threads, n));
  if (cap < pass_rows) pass_rows = RoundDownPassRows(cap, kernels);
  const bool takes_non_finite = consumer.TakesNonFinite(), balance = consumer.BalancesOverflowingRows();
  bool any_bad = false;
  std::int64_t first_bad[2] = {0, 0};  // (test row, train row) named for the current window
  const MicroTile& micro = TileFor(pass_rows, row_bytes, kernels);
  const std::int64_t block =
      options.train_block > 0 ? RoundUp(std::min(options.train_block, n), micro.mr) : DefaultTrainBlock(n, threads, micro.mr);
  const std::int64_t tasks = (n + block - 1) / block;
  // ParallelFor runs no more threads than tasks: scratch (and the consumer's state) for those only.
  const int workers = static_cast<int>(std::min<std::int64_t>(threads, tasks));
  PackedTest packed;
  std::vector<ThreadScratch> scratch;
  try {
    scratch.resize(static_cast<std::size_t>(workers));
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "out of memory for the per-thread scratch of " + std::to_string(workers) +
                                          " threads (num_threads " + std::to_string(options.num_threads) + ")"};
  }
  for (std::int64_t begin = 0, count = 0; begin < m; begin += count) {
    count = std::min({pass_rows, m - begin, window - begin % window});  // within one window
    const Status packing =
        packed.Pack(kernels, test, weights, begin, count, micro.nr, threads, options.normalize, balance,
                    options.cancel);
    if (packing.code == StatusCode::kNonFinite) return NonFiniteError(&test, train);
    if (!packing.ok()) return packing;
    const TileProducer producer(kernels, micro, train, packed, block, options.normalize);
    consumer.BeginPass(begin, count, workers);
    // A tile with a NaN or Inf score: tasks after the first such one are skipped (quickly: only
    // claimed), earlier ones still run, so the error names the pass's first such score (train rows
    // first) for any thread count.
    std::atomic<bool> stop{false};
    std::atomic<std::int64_t> bad_task{tasks};
    std::int64_t bad[2] = {0, 0};  // (test row, train row) of bad_task's first NaN or Inf score
    std::mutex bad_mutex;
    Status status = ParallelFor(tasks, workers, stop, options.cancel,
                                [&](std::int64_t task, std::int64_t upcoming, int thread) {
      if (task > bad_task.load()) return;
      const std::int64_t j0 = task * block, rows = std::min(block, n - j0);
      const std::int64_t next0 = upcoming * block, next_rows = std::max<std::int64_t>(0, std::min(block, n - next0));
      ThreadScratch& s = scratch[static_cast<std::size_t>(thread)];
      if (!producer.Compute(j0, rows, next0, next_rows, count, s) && !takes_non_finite) {
        const std::lock_guard<std::mutex> lock(bad_mutex);
        if (task < bad_task.load()) {
          bad_task = task;
          bad[0] = begin + s.bad_lane;
          bad[1] = j0 + s.bad_row;
        }
        return;
      }
      consumer.Consume(thread, j0, rows, s.tile.data(), packed.lanes());
    });
    if (!status.ok()) return status;
    if (bad_task.load() < tasks) {
      if (!any_bad || bad[1] < first_bad[1] || (bad[1] == first_bad[1] && bad[0] < first_bad[0])) {
        first_bad[0] = bad[0];
        first_bad[1] = bad[1];
      }
      any_bad = true;
    } else if (!any_bad) {
      status = consumer.EndPass(options.cancel);
      if (!status.ok()) return status;
    }
    const std::int64_t end = begin + count;
    if (any_bad && (end % window == 0 || end == m)) return NonFiniteError(&test, train, first_bad);
  }
  return Status::Ok();
}

}  // namespace tracin::detail
