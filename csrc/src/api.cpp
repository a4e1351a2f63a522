// Public entry points: validation, then the tile engine with the right consumer.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "engine.hpp"
#include "guarded.hpp"
#include "parallel.hpp"
#include "topk.hpp"
#include "tunables.hpp"
#include "tracin/tracin.hpp"

namespace tracin {
namespace detail {
namespace {

class DenseConsumer final : public TileConsumer {
 public:
  DenseConsumer(float* out, std::int64_t n) : out_(out), n_(n) {}
  void BeginPass(std::int64_t begin, std::int64_t count, int) override {
    begin_ = begin;
    count_ = count;
  }
  void Consume(int, std::int64_t j0, std::int64_t rows, const float* tile,
               std::int64_t ldc) override {
    for (std::int64_t r = 0; r < count_; ++r) {
      float* dst = out_ + (begin_ + r) * n_ + j0;
      for (std::int64_t j = 0; j < rows; ++j) dst[j] = tile[j * ldc + r];
    }
  }
  Status EndPass(const std::atomic<bool>*) override { return Status::Ok(); }

 private:
  float* out_;
  std::int64_t n_, begin_ = 0, count_ = 0;
};

// Test rows per group of factored aggregate's float64 sums (SumConsumer): part of the numerical
// contract, not a tunable (every pass-row count gives the same bits).
constexpr std::int64_t kSumGroupRows = 32;

// Sums each train row's scores over all test rows, in a fixed order for any pass rows: each group
// of kSumGroupRows consecutive test rows (counted from row 0) summed in float64 in row order, the
// groups' sums added in turn. A group split between passes (passes not a multiple of
// kSumGroupRows rows) carries its partial sums per train row to the next pass.
class SumConsumer final : public TileConsumer {
 public:
  SumConsumer(std::int64_t m, std::int64_t n) : m_(m), sums_(static_cast<std::size_t>(n), 0.0) {}
  void BeginPass(std::int64_t begin, std::int64_t count, int) override {
    begin_ = begin;
    count_ = count;
    const std::int64_t end = begin + count;
    if (end % kSumGroupRows != 0 && end != m_ && carried_.empty()) carried_.assign(sums_.size(), 0.0);
  }
  void Consume(int, std::int64_t j0, std::int64_t rows, const float* tile,
               std::int64_t ldc) override {
    const bool carry_in = begin_ % kSumGroupRows != 0;
    const std::int64_t end = begin_ + count_;
    const bool carry_out = end % kSumGroupRows != 0 && end != m_;
    for (std::int64_t j = 0; j < rows; ++j) {
      const auto i = static_cast<std::size_t>(j0 + j);
      double s = carry_in ? carried_[i] : 0.0;
      for (std::int64_t r = 0; r < count_; ++r) {
        s += tile[j * ldc + r];
        const std::int64_t t = begin_ + r + 1;  // test rows summed so far
        if (t % kSumGroupRows == 0 || t == m_) {
          sums_[i] += s;
          s = 0.0;
        }
      }
      if (carry_out) carried_[i] = s;
    }
  }
  Status EndPass(const std::atomic<bool>*) override { return Status::Ok(); }
  // Tiles with NaN or Inf scores are summed too: a train row's sum is then not finite (a float64 sum
  // of finite float32 scores cannot overflow), and Aggregate recomputes that row alone.
  bool TakesNonFinite() const override { return true; }
  // A test row whose packing overflows sums every train row in float64 instead (Aggregate), closer
  // than the float32 scores of its balanced packing.
  bool BalancesOverflowingRows() const override { return false; }
  const std::vector<double>& sums() const { return sums_; }

 private:
  std::int64_t m_;
  std::vector<double> sums_;
  std::vector<double> carried_;  // per train row, the open group's partial sum (passes cutting groups)
  std::int64_t begin_ = 0, count_ = 0;
};

// Selectors are made per pass for the threads that run, each on its thread's first tile (a thread
// given no tile holds none).
template <class Selector>
class TopKConsumer final : public TileConsumer {
 public:
  // n: train rows (bound a BufferSelector's buffers, a share of them sizes them).
  TopKConsumer(std::int64_t k, std::int64_t n, Side side, const TopKOutput& out, int threads)
      : k_(k), n_(n), want_prop_(side != Side::kOpponents), want_opp_(side != Side::kProponents),
        out_(out), threads_(threads) {}

  // Rows whose selectors, on every thread and side, fit kSelectorBudget at their largest (k
  // candidates of 16 B a row for the heap, BufferCapacity for the buffer), at least 1. Fewer rows
  // per pass change no result: scores and selection are the same bits for any pass rows.
  std::int64_t MaxPassRows(std::int64_t threads) const override {
    const std::int64_t per_row = std::is_same_v<Selector, BufferSelector> ? BufferCapacity(k_, n_) : k_;
    const std::int64_t sides = (want_prop_ ? 1 : 0) + (want_opp_ ? 1 : 0);
    const std::int64_t rows = kSelectorBudget / static_cast<std::int64_t>(sizeof(Candidate)) /
                              std::max<std::int64_t>(threads, 1) / std::max<std::int64_t>(sides, 1) /
                              std::max<std::int64_t>(per_row, 1);
    return std::max<std::int64_t>(rows, 1);
  }

  void BeginPass(std::int64_t begin, std::int64_t count, int threads) override {
    begin_ = begin;
    count_ = count;
    threads_in_pass_ = threads;
    prop_.clear();
    opp_.clear();
    prop_.resize(want_prop_ ? static_cast<std::size_t>(threads) : 0);
    opp_.resize(want_opp_ ? static_cast<std::size_t>(threads) : 0);
  }

  void Consume(int thread, std::int64_t j0, std::int64_t rows, const float* tile,
               std::int64_t ldc) override {
    Selector* prop = want_prop_ ? SelectorOf(prop_, thread) : nullptr;
    Selector* opp = want_opp_ ? SelectorOf(opp_, thread) : nullptr;
    // Opponents are the proponents of the negated scores (negation is exact).
    const float* prop_thr = prop ? prop->thresholds() : nullptr;
    const float* opp_thr = opp ? opp->thresholds() : nullptr;
    for (std::int64_t j = 0; j < rows; ++j) {
      const float* row = tile + j * ldc;
      for (std::int64_t r0 = 0; r0 < count_; r0 += kScanLanes) {
        const std::int64_t r1 = std::min(count_, r0 + kScanLanes);
        if (!AnyCandidate(row, prop_thr, opp_thr, r0, r1)) continue;
        for (std::int64_t r = r0; r < r1; ++r) {
          const float v = row[r];
          if (prop && v >= prop_thr[r]) prop->Offer(r, v, j0 + j);
          if (opp && -v >= opp_thr[r]) opp->Offer(r, -v, j0 + j);
        }
      }
    }
  }

  // One task per test row and side of the pass, and a large pool's sort (k ~ n) checks the
  // cancellation flag every ~2^16 candidates, so a cancellation lands within milliseconds even for
  // millions of train rows. Every row's selectors together hold at least k candidates (each train
  // row was offered to one of them, and a selector drops one only for k better); fewer is a bug,
  // reported as kInternal rather than leaving output slots unwritten.
  Status EndPass(const std::atomic<bool>* cancel) override {
    std::atomic<bool> stop{false}, short_pool{false}, cut{false};
    // The best k of every selector's candidates for pass row r, into the side's output row.
    const auto select = [&](const std::vector<std::optional<Selector>>& selectors, std::int64_t r, bool negate,
                            float* values, std::int64_t* indices) {
      std::size_t kept = 0;  // reserved at once: no growth by doubling past the candidates
      for (const auto& s : selectors)
        if (s) kept += static_cast<std::size_t>(s->Kept(r));
      std::vector<Candidate> pool;
      pool.reserve(kept);
      for (const auto& s : selectors)
        if (s) s->AppendKept(r, &pool);
      if (static_cast<std::int64_t>(pool.size()) < k_) {
        short_pool = true;
        stop = true;
        return;
      }
      if (!WriteBest(&pool, k_, negate, values + (begin_ + r) * k_, indices + (begin_ + r) * k_, cancel)) {
        cut = true;
        stop = true;
      }
    };
    const std::int64_t sides = (want_prop_ ? 1 : 0) + (want_opp_ ? 1 : 0);
    const Status status = ParallelFor(count_ * sides, threads_, stop, cancel, [&](std::int64_t task, int) {
      const std::int64_t r = task / sides;
      if (want_prop_ && task % sides == 0)
        select(prop_, r, false, out_.proponent_values, out_.proponent_indices);
      else
        select(opp_, r, true, out_.opponent_values, out_.opponent_indices);
    });
    if (!status.ok()) return status;
    if (cut) return Cancelled();
    if (short_pool)
      return {StatusCode::kInternal, "tracin kernel: top-k selection kept fewer than k candidates for a test row"};
    return Status::Ok();
  }

 private:
  // Lanes [r0, r1) of a tile row below both thresholds everywhere (the common case once the
  // selectors fill) are dismissed by this branch-free, vectorisable scan.
  static bool AnyCandidate(const float* row, const float* prop_thr, const float* opp_thr,
                           std::int64_t r0, std::int64_t r1) {
    int any = 0;
    if (prop_thr)
      for (std::int64_t r = r0; r < r1; ++r) any |= row[r] >= prop_thr[r];
    if (opp_thr)
      for (std::int64_t r = r0; r < r1; ++r) any |= -row[r] >= opp_thr[r];
    return any != 0;
  }

  // Thread `thread`'s selector of one side, made on its first call in the pass.
  Selector* SelectorOf(std::vector<std::optional<Selector>>& selectors, int thread) const {
    std::optional<Selector>& s = selectors[static_cast<std::size_t>(thread)];
    if (!s) {
      if constexpr (std::is_same_v<Selector, BufferSelector>)
        s.emplace(count_, k_, n_, (n_ + threads_in_pass_ - 1) / threads_in_pass_);
      else
        s.emplace(count_, k_);
    }
    return &*s;
  }

  std::int64_t k_, n_;
  bool want_prop_, want_opp_;
  TopKOutput out_;
  int threads_, threads_in_pass_ = 1;
  std::int64_t begin_ = 0, count_ = 0;
  std::vector<std::optional<Selector>> prop_, opp_;  // per thread of the pass
};

// Runs body(row, scratch) for every row in parallel; scratch holds room for one converted row.
template <class Body>
Status ForEachRow(std::int64_t n, std::int64_t width, const Options& options, Body&& body) {
  std::atomic<bool> stop{false};
  const std::int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  const int threads = static_cast<int>(
      std::min<std::int64_t>(ResolveThreads(options.num_threads), std::max<std::int64_t>(tasks, 1)));
  std::vector<std::vector<float>> scratch(static_cast<std::size_t>(threads),
                                          std::vector<float>(static_cast<std::size_t>(width)));
  return ParallelFor(tasks, threads, stop, options.cancel,
                     [&](std::int64_t task, int thread) {
    const std::int64_t end = std::min(n, (task + 1) * kRowsPerTask);
    for (std::int64_t i = task * kRowsPerTask; i < end; ++i)
      body(i, scratch[static_cast<std::size_t>(thread)].data());
  });
}

std::int64_t MaxCols(const GradientSide& side) {
  std::int64_t width = 1;
  for (const MatrixView& m : side.blocks) width = std::max(width, m.cols);
  return width;
}

// Row `row` of m as float32 values: in place for aligned float32 rows, else converted (or, for a
// misaligned buffer, which is legal input, copied) into buf.
const float* RowValues(const KernelTable& kernels, const MatrixView& m, std::int64_t row, float* buf) {
  if (m.dtype == DType::kFloat32 && reinterpret_cast<std::uintptr_t>(m.data) % alignof(float) == 0)
    return static_cast<const float*>(m.data) + row * m.row_stride;
  LoadRow(kernels, m, row, 0, m.cols, buf);
  return buf;
}

// Sum of squares of one row in float64.
double SquaredNorm(const KernelTable& kernels, const MatrixView& m, std::int64_t row, float* buf) {
  return SumOfSquares(kernels, RowValues(kernels, m, row, buf), m.cols);
}

// float64 dot product of a[0, n) with x[0, n): kernels.dot into fresh sums, then CombineSums (the
// same bits for every instruction set).
double DotWithSums(const KernelTable& kernels, const double* a, const float* x, std::int64_t n) {
  double sums[kNormLanes] = {};
  kernels.dot(a, x, n, sums);
  return CombineSums(sums);
}

// kInvalidArgument when a result that has values (`has_values`) has no buffer to go to.
Status CheckOut(const void* out, bool has_values) {
  if (out == nullptr && has_values) return {StatusCode::kInvalidArgument, "out is null but the result has values"};
  return Status::Ok();
}

template <class T>
bool AllFinite(const T* v, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i)
    if (!std::isfinite(v[i])) return false;
  return true;
}

// Aggregate of factored gradients in float64 for train rows `rows` (out[i] for i in rows; the others
// untouched): out[i] = sum over test rows t and checkpoints c of w_c (L_c(t) . L_c(i)) (R_c(t) . R_c(i)),
// every product and sum in float64 (cosine scores: each run's sum times both rows' inverse norms over
// it). The fallback for the train rows whose float32 pair scores overflow although every input is
// finite: it forms no float32 score, like the full-gradient path (float64 column sums), so both
// layouts give the same influence.
// Two exact ways: the sum over t factorises, sum_t w_c s_t (L_t . L_i)(R_t . R_i) = L_i^T M_c R_i with
// the p x q matrix M_c = w_c sum_t s_t L_t R_t^T (s_t: test row t's inverse norm over c's run, or 1),
// m p q multiply-adds per checkpoint, then p q per train row; or pair by pair, m (p + q) per train
// row (when p q is above m (p + q), e.g. a few test rows of wide factors). Each gives a row the same
// bits whatever the other rows; the way is chosen by its cost per train row, not by the number of
// rows, so that a row's bits do not depend on which other rows of the call overflow.
Status ExactFactoredSums(const KernelTable& kernels, const GradientSide& test, const GradientSide& train,
                         const std::vector<double>& weights, const Options& options,
                         const std::vector<std::int64_t>& rows, double* out) {
  const std::size_t checkpoints = train.checkpoints();
  const std::size_t run = options.normalize > 0 ? static_cast<std::size_t>(options.normalize) : checkpoints;
  const std::size_t runs = checkpoints / run;
  const auto n = static_cast<std::int64_t>(rows.size());
  const std::int64_t m = test.rows(), width = MaxCols(test);
  const bool cosine = options.normalize > 0;
  std::vector<std::size_t> offsets;  // of each block in a row holding all of a train row's blocks
  std::size_t all_cols = 0;
  double pair_cost = 0.0, matrix_cost = 0.0;
  for (std::size_t b = 0; b < train.blocks.size(); ++b) {
    offsets.push_back(all_cols);
    all_cols += static_cast<std::size_t>(train.blocks[b].cols);
    if (b % 2 == 1) {
      const double p = static_cast<double>(train.blocks[b - 1].cols), q = static_cast<double>(train.blocks[b].cols);
      pair_cost += static_cast<double>(m) * (p + q);  // per train row
      matrix_cost += p * q;
    }
  }
  std::vector<double> test_scales;  // cosine scores: inverse norm of test row t over run g at t * runs + g
  std::vector<float> buf(static_cast<std::size_t>(width));
  for (std::int64_t t = 0; t < m && cosine; ++t)
    for (std::size_t g = 0; g < runs; ++g)
      test_scales.push_back(InverseNorm(RunSquaredNorm(kernels, test, g * run, run, t, buf.data())));
  const auto dot = [](const float* a, const float* b, std::int64_t k) {
    double sum = 0.0;
    for (std::int64_t j = 0; j < k; ++j) sum += static_cast<double>(a[j]) * static_cast<double>(b[j]);
    return sum;
  };
  // Cosine scores: inverse norm of train row rows[j] over run g at j * runs + g, in float64.
  std::vector<double> train_scales(cosine ? static_cast<std::size_t>(n) * runs : 0);
  Status s = ForEachRow(cosine ? n : 0, static_cast<std::int64_t>(all_cols), options, [&](std::int64_t i, float* row) {
    for (std::size_t b = 0; b < train.blocks.size(); ++b)
      LoadRow(kernels, train.blocks[b], rows[static_cast<std::size_t>(i)], 0, train.blocks[b].cols, row + offsets[b]);
    for (std::size_t g = 0; g < runs; ++g) {
      double squares = 0.0;
      for (std::size_t c = g * run; c < (g + 1) * run; ++c)
        squares += dot(row + offsets[2 * c], row + offsets[2 * c], train.blocks[2 * c].cols) *
                   dot(row + offsets[2 * c + 1], row + offsets[2 * c + 1], train.blocks[2 * c + 1].cols);
      train_scales[static_cast<std::size_t>(i) * runs + g] = InverseNorm(squares);
    }
  });
  if (!s.ok()) return s;
  if (matrix_cost <= pair_cost) {
    for (const std::int64_t i : rows) out[i] = 0.0;
    const int threads = ResolveThreads(options.num_threads);
    for (std::size_t c = 0; c < checkpoints; ++c) {
      const MatrixView &lt = test.blocks[2 * c], &rt = test.blocks[2 * c + 1];
      const std::int64_t p = lt.cols, q = rt.cols;
      const std::size_t g = c / run;
      std::vector<double> matrix(static_cast<std::size_t>(p * q), 0.0);  // M_c, row-major
      // Test rows in chunks: scaled left factors (w_c s_t L_t) and right factors, then M_c += their
      // outer products, one task per row of M_c.
      const std::int64_t chunk = kRowsPerTask;
      std::vector<double> left(static_cast<std::size_t>(chunk * p)), right(static_cast<std::size_t>(chunk * q));
      std::vector<float> load(static_cast<std::size_t>(std::max(p, q)));
      for (std::int64_t t0 = 0; t0 < m; t0 += chunk) {
        if (IsCancelled(options.cancel)) return Cancelled();
        const std::int64_t rows = std::min(chunk, m - t0);
        for (std::int64_t t = 0; t < rows; ++t) {
          const double scale = weights[c] * (cosine ? test_scales[static_cast<std::size_t>(t0 + t) * runs + g] : 1.0);
          LoadRow(kernels, lt, t0 + t, 0, p, load.data());
          for (std::int64_t a = 0; a < p; ++a) left[static_cast<std::size_t>(t * p + a)] = scale * load[a];
          LoadRow(kernels, rt, t0 + t, 0, q, load.data());
          for (std::int64_t b = 0; b < q; ++b) right[static_cast<std::size_t>(t * q + b)] = load[b];
        }
        std::atomic<bool> stop{false};
        s = ParallelFor(p, threads, stop, options.cancel, [&](std::int64_t a, int) {
          double* mrow = matrix.data() + a * q;
          for (std::int64_t t = 0; t < rows; ++t) {
            const double x = left[static_cast<std::size_t>(t * p + a)];
            const double* r = right.data() + t * q;
            if (x != 0.0)
              for (std::int64_t b = 0; b < q; ++b) mrow[b] += x * r[b];
          }
        });
        if (!s.ok()) return s;
      }
      // out_i += s_i L_i^T M_c R_i as v = M_c^T L_i (row axpys, which vectorise), then v . R_i.
      const MatrixView &li = train.blocks[2 * c], &ri = train.blocks[2 * c + 1];
      const std::int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
      const int row_threads = static_cast<int>(std::min<std::int64_t>(threads, std::max<std::int64_t>(tasks, 1)));
      std::vector<std::vector<float>> loaded(static_cast<std::size_t>(row_threads),
                                             std::vector<float>(static_cast<std::size_t>(p + q)));
      std::vector<std::vector<double>> sums(static_cast<std::size_t>(row_threads),
                                            std::vector<double>(static_cast<std::size_t>(q)));
      std::atomic<bool> stop{false};
      s = ParallelFor(tasks, row_threads, stop, options.cancel, [&](std::int64_t task, int thread) {
        float* row = loaded[static_cast<std::size_t>(thread)].data();
        double* v = sums[static_cast<std::size_t>(thread)].data();
        for (std::int64_t j = task * kRowsPerTask; j < std::min(n, (task + 1) * kRowsPerTask); ++j) {
          const std::int64_t i = rows[static_cast<std::size_t>(j)];
          LoadRow(kernels, li, i, 0, p, row);
          LoadRow(kernels, ri, i, 0, q, row + p);
          std::fill(v, v + q, 0.0);
          for (std::int64_t a = 0; a < p; ++a) {
            const double x = row[a];
            const double* mrow = matrix.data() + a * q;
            if (x != 0.0)
              for (std::int64_t b = 0; b < q; ++b) v[b] += x * mrow[b];
          }
          double total = 0.0;
          for (std::int64_t b = 0; b < q; ++b) total += v[b] * static_cast<double>(row[p + b]);
          out[i] += cosine ? total * train_scales[static_cast<std::size_t>(j) * runs + g] : total;
        }
      });
      if (!s.ok()) return s;
    }
  } else {
    s = ForEachRow(n, 1, options, [&](std::int64_t j, float*) {
      const std::int64_t i = rows[static_cast<std::size_t>(j)];
      std::vector<float> row(all_cols), other(static_cast<std::size_t>(width));
      for (std::size_t b = 0; b < train.blocks.size(); ++b)
        LoadRow(kernels, train.blocks[b], i, 0, train.blocks[b].cols, row.data() + offsets[b]);
      double total = 0.0;
      for (std::int64_t t = 0; t < m && !IsCancelled(options.cancel); ++t)
        for (std::size_t g = 0; g < runs; ++g) {
          double score = 0.0;
          for (std::size_t c = g * run; c < (g + 1) * run; ++c) {
            double product = weights[c];
            for (std::size_t b = 2 * c; b < 2 * c + 2; ++b) {
              LoadRow(kernels, test.blocks[b], t, 0, test.blocks[b].cols, other.data());
              product *= dot(other.data(), row.data() + offsets[b], test.blocks[b].cols);
            }
            score += product;
          }
          total += cosine ? score * test_scales[static_cast<std::size_t>(t) * runs + g] *
                                train_scales[static_cast<std::size_t>(j) * runs + g]
                          : score;
        }
      out[i] = total;
    });
    if (!s.ok()) return s;
  }
  if (IsCancelled(options.cancel)) return Cancelled();  // a row given up on in the last task
  for (const std::int64_t i : rows)
    if (!std::isfinite(out[i])) return NonFiniteError(&test, train);
  return Status::Ok();
}

// Finite inputs whose self-influence is beyond float32: the float64 sum over checkpoints of
// w_c |g_c(i)|^2 rounded to float32 is Inf. Names the first rows (at most 5) where it is.
Status SelfInfluenceOverflow(const float* out, std::int64_t n) {
  std::string rows;
  int named = 0;
  for (std::int64_t i = 0; i < n && named < 5; ++i) {
    if (std::isfinite(out[i])) continue;
    rows += (named++ ? ", " : "") + std::to_string(i);
  }
  return {StatusCode::kNonFinite,
          "self-influence overflowed float32 for train rows [" + rows +
              "] although every input is finite: w_c |g_c(i)|^2 (|L_c(i)|^2 |R_c(i)|^2 for factored rows), "
              "summed over the checkpoints in float64, exceeds float32's range; scale the gradients down (or the "
              "learning-rate weights)"};
}

}  // namespace
}  // namespace detail

Status Scores(const GradientSide& test, const GradientSide& train,
              const std::vector<double>& weights, float* out, const Options& options) {
  return detail::Guarded([&]() -> Status {
    Status s = detail::ValidatePair(test, train, weights);
    if (s.ok()) s = detail::ValidateNormalize(test, options.normalize);
    if (s.ok()) s = detail::CheckOut(out, test.rows() > 0 && train.rows() > 0);
    if (!s.ok()) return s;
    detail::DenseConsumer consumer(out, train.rows());
    return detail::RunTiles(test, train, weights, options, consumer);
  });
}

Status TopK(const GradientSide& test, const GradientSide& train, const std::vector<double>& weights,
            std::int64_t k, Side side, const TopKOutput& out, const Options& options) {
  return detail::Guarded([&]() -> Status {
    Status s = detail::ValidatePair(test, train, weights);
    if (s.ok()) s = detail::ValidateNormalize(test, options.normalize);
    if (!s.ok()) return s;
    if (side != Side::kProponents && side != Side::kOpponents && side != Side::kBoth)
      return {StatusCode::kInvalidArgument, "side must be Side::kProponents, kOpponents or kBoth, got " +
                                                std::to_string(static_cast<int>(side))};
    if (k < 0 || k > train.rows())
      return {StatusCode::kInvalidArgument, "k must be between 0 and the number of train rows"};
    if ((side != Side::kOpponents && (!out.proponent_values || !out.proponent_indices)) ||
        (side != Side::kProponents && (!out.opponent_values || !out.opponent_indices)))
      if (k > 0 && test.rows() > 0)
        return {StatusCode::kInvalidArgument, "missing output buffers for the requested side"};
    const int threads = detail::ResolveThreads(options.num_threads);
    if (k == 0 || test.rows() == 0) return detail::CheckAllFinite(&test, train);
    if (k <= detail::kHeapMaxK) {
      detail::TopKConsumer<detail::HeapSelector> consumer(k, train.rows(), side, out, threads);
      return detail::RunTiles(test, train, weights, options, consumer);
    }
    detail::TopKConsumer<detail::BufferSelector> consumer(k, train.rows(), side, out, threads);
    return detail::RunTiles(test, train, weights, options, consumer);
  });
}

Status SelfInfluence(const GradientSide& train, const std::vector<double>& weights, float* out,
                     const Options& options) {
  return detail::Guarded([&]() -> Status {
    Status s = detail::ValidateSide(train, "train");
    if (!s.ok()) return s;
    s = detail::ValidateWeights(weights, train.checkpoints());
    if (s.ok()) s = detail::CheckOut(out, train.rows() > 0);
    if (!s.ok()) return s;
    if (options.normalize != 0)
      return {StatusCode::kInvalidArgument,
              "self-influence takes no normalize: every nonzero row's cosine self-influence is the sum of its weights"};
    const detail::KernelTable& kernels = detail::KernelsFor(options.isa);
    const std::int64_t n = train.rows();
    s = detail::ForEachRow(n, detail::MaxCols(train), options, [&](std::int64_t i, float* buf) {
      double total = 0.0;
      for (std::size_t c = 0; c < train.checkpoints(); ++c) {
        const double norm = train.factored
                                ? detail::SquaredNorm(kernels, train.blocks[2 * c], i, buf) *
                                      detail::SquaredNorm(kernels, train.blocks[2 * c + 1], i, buf)
                                : detail::SquaredNorm(kernels, train.blocks[c], i, buf);
        total += weights[c] * norm;
      }
      out[i] = static_cast<float>(total);
    });
    if (!s.ok()) return s;
    if (!detail::AllFinite(out, n)) {
      s = detail::CheckAllFinite(nullptr, train);  // NaN or Inf inputs are named as such
      if (!s.ok()) return s;
      return detail::SelfInfluenceOverflow(out, n);
    }
    return Status::Ok();
  });
}

Status Aggregate(const GradientSide& test, const GradientSide& train,
                 const std::vector<double>& weights, double* out, const Options& options) {
  return detail::Guarded([&]() -> Status {
    Status s = detail::ValidatePair(test, train, weights);
    if (s.ok()) s = detail::ValidateNormalize(test, options.normalize);
    if (s.ok()) s = detail::CheckOut(out, train.rows() > 0);
    if (!s.ok()) return s;
    const std::int64_t n = train.rows();
    if (train.factored) {
      detail::SumConsumer consumer(test.rows(), n);
      s = detail::RunTiles(test, train, weights, options, consumer);
      const std::vector<double>& sums = consumer.sums();
      std::vector<std::int64_t> rows;  // train rows to sum in float64
      if (s.code == StatusCode::kNonFinite) {  // a test row beyond range once packed: every train row
        rows.resize(static_cast<std::size_t>(n));
        std::iota(rows.begin(), rows.end(), std::int64_t{0});
      } else if (!s.ok()) {
        return s;
      } else {
        for (std::int64_t i = 0; i < n; ++i)
          if (!std::isfinite(sums[static_cast<std::size_t>(i)])) rows.push_back(i);
      }
      if (!rows.empty()) s = detail::CheckAllFinite(&test, train);  // NaN or Inf inputs are named as such
      if (!s.ok()) return s;
      std::copy(sums.begin(), sums.end(), out);
      // Train rows with a float32 pair score (or factor product) beyond range although every input is
      // finite: the float64 sums of ExactFactoredSums, which the full-gradient path's column sums agree
      // with. Only those rows, so that the others keep their bits however the train rows are pieced.
      if (rows.empty()) return Status::Ok();
      return detail::ExactFactoredSums(detail::KernelsFor(options.isa), test, train, weights, options, rows, out);
    }
    // Full gradients: the sum over test rows commutes with the inner product, so one weighted
    // column sum of the test side per checkpoint, then one dot product per train row.
    std::vector<std::vector<double>> sums(train.checkpoints());
    std::vector<double*> into;
    for (std::size_t c = 0; c < sums.size(); ++c) {
      sums[c].assign(static_cast<std::size_t>(test.blocks[c].cols), 0.0);
      into.push_back(sums[c].data());
    }
    s = AggregateColumnSums(test, into, options);
    if (!s.ok()) return s;
    return AggregateFromColumnSums(std::vector<const double*>(into.begin(), into.end()), train, weights, out, options);
  });
}

namespace {

// AggregateColumnSums: a task's columns of a row are loaded and added kSumColumns at a time, and a
// band (a task's columns) is a multiple of kSumStep columns.
constexpr std::int64_t kSumColumns = 1024;
constexpr std::int64_t kSumStep = 64;

}  // namespace

Status AggregateColumnSums(const GradientSide& test, const std::vector<double*>& sums, const Options& options) {
  return detail::Guarded([&]() -> Status {
    Status s = detail::ValidateSide(test, "test");
    if (s.ok()) s = detail::ValidateNormalize(test, options.normalize);
    if (!s.ok()) return s;
    if (test.factored)
      return {StatusCode::kInvalidArgument, "column sums are for full gradients; test is factored"};
    if (sums.size() != test.checkpoints())
      return {StatusCode::kInvalidArgument, "expected one column-sum array per checkpoint (" +
                                                std::to_string(test.checkpoints()) + "), got " +
                                                std::to_string(sums.size())};
    for (std::size_t c = 0; c < sums.size(); ++c)
      if (sums[c] == nullptr && test.blocks[c].cols > 0)
        return {StatusCode::kInvalidArgument, "column sums of checkpoint " + std::to_string(c) + " are null"};
    const detail::KernelTable& kernels = detail::KernelsFor(options.isa);
    const std::size_t checkpoints = test.checkpoints();
    const std::size_t run = options.normalize > 0 ? static_cast<std::size_t>(options.normalize) : checkpoints;
    const std::size_t runs = checkpoints / run;
    const std::int64_t m = test.rows();
    // Cosine scores: the inverse norm of test row r over run g at r * runs + g, a row per task.
    std::vector<double> scales(options.normalize > 0 ? static_cast<std::size_t>(m) * runs : 0);
    if (options.normalize > 0) {
      s = detail::ForEachRow(m, detail::MaxCols(test), options, [&](std::int64_t r, float* buf) {
        for (std::size_t g = 0; g < runs; ++g)
          scales[static_cast<std::size_t>(r) * runs + g] =
              detail::InverseNorm(detail::RunSquaredNorm(kernels, test, g * run, run, r, buf));
      });
      if (!s.ok()) return s;
    }
    // One task per band of a block's columns, a thread's share of them: its columns summed over the
    // rows in row order, so each column gets the bits of one serial pass whatever the threads or
    // bands. Wide bands read each row's columns in one sweep (64-column bands fetched each row's
    // cache lines and pages again per band: up to 4x the memory traffic of one pass).
    const std::int64_t want = detail::ResolveThreads(options.num_threads);
    std::vector<std::tuple<std::size_t, std::int64_t, std::int64_t>> bands;  // (checkpoint, first, end column)
    for (std::size_t c = 0; c < checkpoints; ++c) {
      const std::int64_t cols = test.blocks[c].cols;
      const std::int64_t width = std::max<std::int64_t>((cols + want * kSumStep - 1) / (want * kSumStep), 1) * kSumStep;
      for (std::int64_t k0 = 0; k0 < cols; k0 += width) bands.emplace_back(c, k0, std::min(cols, k0 + width));
    }
    const auto tasks = static_cast<std::int64_t>(bands.size());
    const int threads = static_cast<int>(std::min<std::int64_t>(want, std::max<std::int64_t>(tasks, 1)));
    std::vector<std::vector<float>> scratch(static_cast<std::size_t>(threads),
                                            std::vector<float>(static_cast<std::size_t>(kSumColumns)));
    std::atomic<bool> stop{false};
    s = detail::ParallelFor(tasks, threads, stop, options.cancel, [&](std::int64_t task, int thread) {
      const auto [c, first, end] = bands[static_cast<std::size_t>(task)];
      const MatrixView& b = test.blocks[c];
      float* row = scratch[static_cast<std::size_t>(thread)].data();
      for (std::int64_t r = 0; r < m; ++r) {
        if (detail::IsCancelled(options.cancel)) return;  // ParallelFor's caller reports it
        const double scale = options.normalize > 0 ? scales[static_cast<std::size_t>(r) * runs + c / run] : 1.0;
        for (std::int64_t k0 = first; k0 < end; k0 += kSumColumns) {
          const std::int64_t width = std::min(kSumColumns, end - k0);
          detail::LoadRow(kernels, b, r, k0, width, row);
          double* sum = sums[c] + k0;
          if (options.normalize > 0) {
            for (std::int64_t k = 0; k < width; ++k) sum[k] += scale * row[k];
          } else {
            for (std::int64_t k = 0; k < width; ++k) sum[k] += row[k];
          }
        }
      }
    });
    if (!s.ok()) return s;
    if (detail::IsCancelled(options.cancel)) return detail::Cancelled();
    for (std::size_t c = 0; c < checkpoints; ++c)
      if (!detail::AllFinite(sums[c], test.blocks[c].cols)) return detail::NonFiniteError(&test, GradientSide{});
    return Status::Ok();
  });
}

Status AggregateFromColumnSums(const std::vector<const double*>& sums, const GradientSide& train,
                               const std::vector<double>& weights, double* out, const Options& options) {
  return detail::Guarded([&]() -> Status {
    Status s = detail::ValidateSide(train, "train");
    if (s.ok()) s = detail::ValidateNormalize(train, options.normalize);
    if (s.ok()) s = detail::ValidateWeights(weights, train.checkpoints());
    if (s.ok()) s = detail::CheckOut(out, train.rows() > 0);
    if (!s.ok()) return s;
    if (train.factored)
      return {StatusCode::kInvalidArgument, "aggregate from column sums is for full gradients; train is factored"};
    if (sums.size() != train.checkpoints())
      return {StatusCode::kInvalidArgument, "expected one column-sum array per checkpoint (" +
                                                std::to_string(train.checkpoints()) + "), got " +
                                                std::to_string(sums.size())};
    for (std::size_t c = 0; c < sums.size(); ++c)
      if (sums[c] == nullptr && train.blocks[c].cols > 0)
        return {StatusCode::kInvalidArgument, "column sums of checkpoint " + std::to_string(c) + " are null"};
    // Each train row's dot products with the weighted sums (cosine scores: the dot products over a
    // run of checkpoints times the row's own inverse norm over it, summed from the row as it is read).
    // Each dot product is kernels.dot's 16 float64 partial sums (vectorised; the same bits for every
    // instruction set and thread count), reading aligned float32 rows in place.
    const detail::KernelTable& kernels = detail::KernelsFor(options.isa);
    const std::size_t checkpoints = train.checkpoints();
    const std::size_t run = options.normalize > 0 ? static_cast<std::size_t>(options.normalize) : checkpoints;
    const std::int64_t n = train.rows();
    std::vector<std::vector<double>> weighted(checkpoints);
    bool finite = true;
    for (std::size_t c = 0; c < checkpoints; ++c) {
      for (std::int64_t k = 0; k < train.blocks[c].cols; ++k) weighted[c].push_back(sums[c][k] * weights[c]);
      finite = finite && detail::AllFinite(weighted[c].data(), train.blocks[c].cols);
    }
    s = detail::ForEachRow(n, detail::MaxCols(train), options, [&](std::int64_t i, float* buf) {
      double total = 0.0;
      for (std::size_t c0 = 0; c0 < checkpoints; c0 += run) {
        double dot = 0.0, squares = 0.0;
        for (std::size_t c = c0; c < c0 + run; ++c) {
          const MatrixView& m = train.blocks[c];
          const float* x = detail::RowValues(kernels, m, i, buf);
          dot += detail::DotWithSums(kernels, weighted[c].data(), x, m.cols);
          if (options.normalize > 0) squares += detail::SumOfSquares(kernels, x, m.cols);
        }
        total += options.normalize > 0 ? dot * detail::InverseNorm(squares) : dot;
      }
      out[i] = total;
    });
    if (!s.ok()) return s;
    if (!finite || !detail::AllFinite(out, n)) return detail::NonFiniteError(nullptr, train);
    return Status::Ok();
  });
}

}  // namespace tracin
