// Random projection: validation, blocking and threading around the kernels of
// projection_kernels.hpp. Dense kinds: a blocked product, each panel of P generated once per task
// and applied to all the task's rows; sparse kind: per row, scatter-adds of each column into its
// few output positions.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "aligned.hpp"
#include "guarded.hpp"
#include "half.hpp"
#include "kernels.hpp"
#include "parallel.hpp"
#include "projection_kernels.hpp"
#include "tunables.hpp"
#include "tracin/projection.hpp"

namespace tracin {
namespace detail {
namespace {

const ProjectionKernels& ProjectionKernelsFor(Isa isa) {
  isa = ResolveIsa(isa);
#if defined(TRACIN_HAVE_X86_KERNELS)
  if (isa == Isa::kAvx512) return Avx512ProjectionKernels();
  if (isa == Isa::kAvx2) return Avx2ProjectionKernels();
#endif
  return GenericProjectionKernels();
}

std::int64_t RoundUp(std::int64_t x, std::int64_t to) { return (x + to - 1) / to * to; }

Status Invalid(const std::string& message) { return {StatusCode::kInvalidArgument, message}; }

// The column-wise concatenation of the pieces, read as float32. Optionally a subset of its rows,
// each scaled by a power of two (see RescueOverflowedRows): row r is then row rows[r] times 2^-shift[r].
class Concat {
 public:
  Concat(const std::vector<MatrixView>& pieces, const KernelTable& convert)
      : pieces_(pieces), convert_(convert) {
    starts_.push_back(0);
    for (const MatrixView& p : pieces_) starts_.push_back(starts_.back() + p.cols);
  }

  // The rows rows[i] of `all`, scaled by 2^-shifts[i] (both outlive this object).
  Concat(const Concat& all, const std::int64_t* rows, const int* shifts)
      : pieces_(all.pieces_), convert_(all.convert_), starts_(all.starts_), rows_(rows), shifts_(shifts) {}

  std::int64_t cols() const { return starts_.back(); }

  // dst[0, n) = row r, columns [k0, k0 + n) of the concatenation, as float32.
  void Read(std::int64_t r, std::int64_t k0, std::int64_t n, float* dst) const {
    if (rows_ != nullptr) {
      ReadRow(rows_[r], k0, n, dst);
      // v 2^-shift in double is exact; one rounding to float32 (only values that become subnormal
      // or zero round), and no overflow since the shift is positive.
      const double factor = std::ldexp(1.0, -shifts_[r]);
      for (std::int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(static_cast<double>(dst[k]) * factor);
      return;
    }
    ReadRow(r, k0, n, dst);
  }

 private:
  void ReadRow(std::int64_t r, std::int64_t k0, std::int64_t n, float* dst) const {
    std::size_t p = static_cast<std::size_t>(
        std::upper_bound(starts_.begin(), starts_.end(), k0) - starts_.begin() - 1);
    while (n > 0) {
      const MatrixView& v = pieces_[p];
      const std::int64_t local = k0 - starts_[p];
      const std::int64_t take = std::min(n, v.cols - local);
      const std::int64_t at = r * v.row_stride + local;
      switch (v.dtype) {
        case DType::kFloat32:
          std::memcpy(dst, static_cast<const float*>(v.data) + at, sizeof(float) * take);
          break;
        case DType::kFloat16:
          convert_.half_to_float(static_cast<const std::uint16_t*>(v.data) + at, take, dst);
          break;
        case DType::kBFloat16:
          convert_.bfloat_to_float(static_cast<const std::uint16_t*>(v.data) + at, take, dst);
          break;
      }
      dst += take;
      k0 += take;
      n -= take;
      ++p;
    }
  }

  const std::vector<MatrixView>& pieces_;
  const KernelTable& convert_;
  std::vector<std::int64_t> starts_;
  const std::int64_t* rows_ = nullptr;
  const int* shifts_ = nullptr;
};

Status Validate(const ProjectionSpec& spec, const std::vector<MatrixView>& pieces,
                std::int64_t column_offset, const float* out, std::int64_t out_stride) {
  if (spec.kind != ProjectionKind::kRademacher && spec.kind != ProjectionKind::kGaussian &&
      spec.kind != ProjectionKind::kSparse)
    return Invalid("unknown projection kind");
  if (spec.dim < 1) return Invalid("projection dim must be >= 1, got " + std::to_string(spec.dim));
  if (spec.kind == ProjectionKind::kSparse && spec.nonzeros < 1)
    return Invalid("sparse projection needs nonzeros >= 1");
  if (pieces.empty()) return Invalid("the matrix to project has no pieces");
  if (column_offset < 0) return Invalid("column_offset must be >= 0");
  std::int64_t cols = 0;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const MatrixView& p = pieces[i];
    const std::string name = "piece " + std::to_string(i);
    if (p.rows != pieces.front().rows)
      return Invalid(name + " has " + std::to_string(p.rows) + " rows, piece 0 has " +
                     std::to_string(pieces.front().rows));
    if (p.rows < 0 || p.cols < 0 || p.row_stride < p.cols)
      return Invalid(name + ": negative shape or row stride smaller than its columns");
    if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
      return Invalid(name + ": unknown dtype");
    if (p.data == nullptr && p.rows > 0 && p.cols > 0) return Invalid(name + ": null data");
    cols += p.cols;
  }
  if (cols < 1) return Invalid("the matrix to project has no columns");
  if (pieces.front().rows > 0 && (out == nullptr || out_stride < spec.dim))
    return Invalid("output buffer missing or its row stride is smaller than dim");
  return Status::Ok();
}

// out = scale * X P^T for the dense kinds; every (row, output) one fma chain over the columns.
// A task owns a block of outputs and a group of rows: it generates each panel of P (its outputs x
// kDenseColumns columns) once and applies it to every row of the group, tile by tile. The rows form
// one group unless they exceed kDenseRows or the output blocks alone are too few for the threads.
Status ProjectDense(const ProjectionSpec& spec, const Concat& x, std::int64_t rows,
                    std::uint64_t column_offset, float* out, std::int64_t out_stride,
                    const Options& options) {
  const ProjectionKernels& kern = ProjectionKernelsFor(options.isa);
  const std::int64_t mr = kern.mr, nr = kern.nr, kc_max = kDenseColumns;
  const std::int64_t outputs = std::min(kDenseOutputs, RoundUp(spec.dim, nr));
  const std::int64_t col_blocks = (spec.dim + outputs - 1) / outputs;
  const int n_threads = ResolveThreads(options.num_threads);
  const std::int64_t most_groups = (rows + mr - 1) / mr;
  const std::int64_t groups = std::min(
      most_groups, std::max((rows + kDenseRows - 1) / kDenseRows, (n_threads + col_blocks - 1) / col_blocks));
  const std::int64_t group_rows = RoundUp((rows + groups - 1) / groups, mr);
  const std::int64_t row_groups = (rows + group_rows - 1) / group_rows;
  const std::int64_t tile_rows = std::min(RoundUp(kDenseTileRows, mr), group_rows);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(spec.dim)));
  const std::int64_t d = x.cols();

  struct Workspace {
    AlignedFloats panel, tile, acc;
    std::vector<std::uint32_t> lo, hi;
  };
  // One workspace per thread that runs: ParallelFor starts at most one per task.
  const std::int64_t tasks = row_groups * col_blocks;
  std::vector<Workspace> spaces(static_cast<std::size_t>(std::min<std::int64_t>(n_threads, tasks)));
  std::atomic<bool> stop{false};
  std::atomic<bool> cancelled{false};
  const Status status = ParallelFor(tasks, n_threads, stop, options.cancel, [&](std::int64_t task, int thread) {
    Workspace& ws = spaces[static_cast<std::size_t>(thread)];
    const std::int64_t r0 = task / col_blocks * group_rows, i0 = task % col_blocks * outputs;
    const std::int64_t n_rows = std::min(group_rows, rows - r0);
    const std::int64_t n_out = std::min(outputs, spec.dim - i0);
    const std::int64_t strips = (n_out + nr - 1) / nr, ldc = strips * nr;
    ws.panel.Resize(static_cast<std::size_t>(ldc * kc_max));
    ws.tile.Resize(static_cast<std::size_t>(tile_rows * kc_max));
    ws.acc.Resize(static_cast<std::size_t>(RoundUp(n_rows, mr) * ldc));
    ws.acc.Zero();
    ws.lo.resize(static_cast<std::size_t>(ldc));
    ws.hi.resize(static_cast<std::size_t>(ldc));
    for (std::int64_t l = 0; l < ldc; ++l) {
      const RowKey key = KeyOfRow(spec.seed, spec.stream, static_cast<std::uint64_t>(i0 + l));
      ws.lo[static_cast<std::size_t>(l)] = key.lo;
      ws.hi[static_cast<std::size_t>(l)] = key.hi;
    }
    for (std::int64_t k0 = 0; k0 < d; k0 += kc_max) {
      // A task can hold billions of multiply-adds (4096 rows x 256 outputs x every column): the
      // cancellation flag is checked per panel of columns too, not only between tasks.
      if (IsCancelled(options.cancel)) {
        cancelled = true;
        stop = true;
        return;
      }
      const std::int64_t kc = std::min(kc_max, d - k0);
      for (std::int64_t s = 0; s < strips; ++s)
        kern.fill(spec.kind, ws.lo.data() + s * nr, ws.hi.data() + s * nr,
                  column_offset + static_cast<std::uint64_t>(k0), kc, ws.panel.data() + s * nr * kc_max);
      for (std::int64_t t0 = 0; t0 < n_rows; t0 += tile_rows) {
        const std::int64_t t_rows = std::min(tile_rows, n_rows - t0), t_pad = RoundUp(t_rows, mr);
        for (std::int64_t r = 0; r < t_rows; ++r) x.Read(r0 + t0 + r, k0, kc, ws.tile.data() + r * kc_max);
        if (t_rows < t_pad)  // the last tile of the group: rows past its end stay zero
          std::fill(ws.tile.data() + t_rows * kc_max, ws.tile.data() + t_pad * kc_max, 0.0f);
        for (std::int64_t s = 0; s < strips; ++s)
          for (std::int64_t rb = 0; rb < t_pad; rb += mr)
            kern.micro(kc, ws.tile.data() + rb * kc_max, kc_max, ws.panel.data() + s * nr * kc_max,
                       ws.acc.data() + (t0 + rb) * ldc + s * nr, ldc);
      }
    }
    for (std::int64_t r = 0; r < n_rows; ++r) {
      const float* src = ws.acc.data() + r * ldc;
      float* dst = out + (r0 + r) * out_stride + i0;
      for (std::int64_t i = 0; i < n_out; ++i) dst[i] = src[i] * scale;
    }
  });
  return status.ok() && cancelled ? Cancelled() : status;
}

// out = scale * X P^T for the sparse kind: per row, in column order, each column's value is added
// with its sign to its `nonzeros` output positions.
Status ProjectSparse(const ProjectionSpec& spec, const Concat& x, std::int64_t rows,
                     std::uint64_t column_offset, float* out, std::int64_t out_stride,
                     const Options& options) {
  const std::int64_t s = std::min<std::int64_t>(spec.nonzeros, spec.dim);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s)));
  std::vector<RowKey> keys;
  std::vector<std::uint64_t> block_lo, block_len;
  for (std::int64_t j = 0; j < s; ++j) {
    keys.push_back(KeyOfRow(spec.seed, spec.stream, static_cast<std::uint64_t>(j)));
    block_lo.push_back(static_cast<std::uint64_t>(j * spec.dim / s));
    block_len.push_back(static_cast<std::uint64_t>((j + 1) * spec.dim / s - j * spec.dim / s));
  }
  const std::int64_t d = x.cols();
  const std::int64_t row_blocks = (rows + kSparseRows - 1) / kSparseRows;
  std::atomic<bool> stop{false};
  std::atomic<bool> cancelled{false};
  const Status status = ParallelFor(row_blocks, ResolveThreads(options.num_threads), stop, options.cancel,
                                    [&](std::int64_t task, int) {
    const std::int64_t r0 = task * kSparseRows, n_rows = std::min(kSparseRows, rows - r0);
    std::vector<std::uint32_t> pos(static_cast<std::size_t>(kSparseColumns * s));
    std::vector<float> sign(pos.size()), values(static_cast<std::size_t>(kSparseColumns));
    for (std::int64_t r = 0; r < n_rows; ++r)
      std::fill_n(out + (r0 + r) * out_stride, spec.dim, 0.0f);
    for (std::int64_t k0 = 0; k0 < d; k0 += kSparseColumns) {
      if (IsCancelled(options.cancel)) {  // per chunk of columns, as in ProjectDense
        cancelled = true;
        stop = true;
        return;
      }
      const std::int64_t kc = std::min(kSparseColumns, d - k0);
      for (std::int64_t j = 0; j < s; ++j) {
        const RowKey key = keys[static_cast<std::size_t>(j)];
        const std::uint64_t lo = block_lo[static_cast<std::size_t>(j)];
        const std::uint64_t len = block_len[static_cast<std::size_t>(j)];
        for (std::int64_t k = 0; k < kc; ++k) {
          const std::uint32_t w =
              Word(key.lo, key.hi, column_offset + static_cast<std::uint64_t>(k0 + k));
          const std::size_t at = static_cast<std::size_t>(k * s + j);
          pos[at] = static_cast<std::uint32_t>(lo + (((w & 0x7fffffffU) * len) >> 31));
          sign[at] = (w >> 31) ? -1.0f : 1.0f;
        }
      }
      for (std::int64_t r = 0; r < n_rows; ++r) {
        x.Read(r0 + r, k0, kc, values.data());
        float* y = out + (r0 + r) * out_stride;
        for (std::int64_t k = 0; k < kc; ++k) {
          const float v = values[static_cast<std::size_t>(k)];
          const std::size_t at = static_cast<std::size_t>(k * s);
          for (std::int64_t j = 0; j < s; ++j)
            y[pos[at + static_cast<std::size_t>(j)]] += sign[at + static_cast<std::size_t>(j)] * v;
        }
      }
    }
    for (std::int64_t r = 0; r < n_rows; ++r) {
      float* y = out + (r0 + r) * out_stride;
      for (std::int64_t i = 0; i < spec.dim; ++i) y[i] *= scale;
    }
  });
  return status.ok() && cancelled ? Cancelled() : status;
}

bool RowFinite(const float* out, std::int64_t dim) {
  for (std::int64_t i = 0; i < dim; ++i)
    if (!std::isfinite(out[i])) return false;
  return true;
}

// The dense and sparse kernels sum unscaled entries (|entry| < 8: +-1, or a Box-Muller normal, at
// most sqrt(-2 ln 2^-24) < 5.8) and multiply by the scale at the end, so a running sum can pass
// FLT_MAX while the scaled result is finite. Each row of out that is not finite, whose input row is
// finite, is computed again from that row times 2^-s, s the least shift that keeps every partial sum
// below 2^126 (|sum| <= cols * 8 * max|x|), and the result multiplied by 2^s: powers of two commute
// with rounding, so this is the float32 result of the same chain with an unbounded exponent (the
// inputs that 2^-s takes below the normal range excepted, which the large values dominate). Rows
// whose result does not overflow are not touched, so their bits are those of the plain chain. A row
// whose result exceeds FLT_MAX even so (or whose input holds NaN or Inf) stays not finite.
template <typename ProjectFn>
Status RescueOverflowedRows(const ProjectionSpec& spec, const Concat& x, std::int64_t rows, float* out,
                            std::int64_t out_stride, const ProjectFn& project) {
  const std::int64_t d = x.cols();
  std::vector<std::int64_t> redo;
  std::vector<int> shifts;
  std::vector<float> buffer(static_cast<std::size_t>(std::min<std::int64_t>(d, 4096)));
  int bound_bits = 0;  // ceil(log2(d * 8))
  while (bound_bits < 64 && (std::uint64_t{1} << bound_bits) < static_cast<std::uint64_t>(d) * 8U) ++bound_bits;
  for (std::int64_t r = 0; r < rows; ++r) {
    if (RowFinite(out + r * out_stride, spec.dim)) continue;
    float largest = 0.0f;
    bool finite = true;
    for (std::int64_t k0 = 0; k0 < d && finite; k0 += static_cast<std::int64_t>(buffer.size())) {
      const std::int64_t n = std::min<std::int64_t>(static_cast<std::int64_t>(buffer.size()), d - k0);
      x.Read(r, k0, n, buffer.data());
      for (std::int64_t k = 0; k < n; ++k) {
        const float a = std::fabs(buffer[static_cast<std::size_t>(k)]);
        if (!std::isfinite(a)) finite = false;
        largest = std::max(largest, a);
      }
    }
    if (!finite || largest == 0.0f) continue;
    int exponent = 0;  // largest < 2^exponent
    std::frexp(largest, &exponent);
    redo.push_back(r);
    shifts.push_back(std::max(1, exponent + bound_bits - 126));
  }
  if (redo.empty()) return Status::Ok();
  // Rows in batches of about 64 MiB of output (16M floats).
  const std::int64_t batch =
      std::max<std::int64_t>(1, (std::int64_t{16} << 20) / std::max<std::int64_t>(1, spec.dim));
  std::vector<float> again;
  for (std::size_t b0 = 0; b0 < redo.size(); b0 += static_cast<std::size_t>(batch)) {
    const std::int64_t n = std::min<std::int64_t>(batch, static_cast<std::int64_t>(redo.size() - b0));
    again.resize(static_cast<std::size_t>(n * spec.dim));
    const Concat scaled(x, redo.data() + b0, shifts.data() + b0);
    const Status status = project(scaled, n, again.data(), spec.dim);
    if (!status.ok()) return status;
    for (std::int64_t i = 0; i < n; ++i) {
      const int s = shifts[b0 + static_cast<std::size_t>(i)];
      const float* src = again.data() + i * spec.dim;
      float* dst = out + redo[b0 + static_cast<std::size_t>(i)] * out_stride;
      for (std::int64_t j = 0; j < spec.dim; ++j) {
        // src[j] 2^s is exact in double; within float32's range it is a float32 (24-bit mantissa).
        const double v = static_cast<double>(src[j]) * std::ldexp(1.0, s);
        dst[j] = std::fabs(v) <= static_cast<double>(std::numeric_limits<float>::max())
                     ? static_cast<float>(v)
                     : std::copysign(std::numeric_limits<float>::infinity(), src[j]);
      }
    }
  }
  return Status::Ok();
}

Status CheckFinite(const float* out, std::int64_t rows, std::int64_t dim, std::int64_t stride) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t i = 0; i < dim; ++i)
      if (!std::isfinite(out[r * stride + i]))
        return {StatusCode::kNonFinite,
                "the projection of row " + std::to_string(r) +
                    " is not finite: the input holds NaN or Inf, or its values overflow float32"};
  return Status::Ok();
}

}  // namespace
}  // namespace detail

Status Project(const ProjectionSpec& spec, const std::vector<MatrixView>& pieces,
               std::int64_t column_offset, float* out, std::int64_t out_stride,
               const Options& options) {
  return detail::Guarded([&]() -> Status {
    Status status = detail::Validate(spec, pieces, column_offset, out, out_stride);
    if (!status.ok()) return status;
    const std::int64_t rows = pieces.front().rows;
    if (rows == 0) return Status::Ok();
    const detail::Concat x(pieces, detail::KernelsFor(options.isa));
    const auto offset = static_cast<std::uint64_t>(column_offset);
    const auto project = [&](const detail::Concat& rows_of, std::int64_t n, float* to, std::int64_t stride) {
      return spec.kind == ProjectionKind::kSparse
                 ? detail::ProjectSparse(spec, rows_of, n, offset, to, stride, options)
                 : detail::ProjectDense(spec, rows_of, n, offset, to, stride, options);
    };
    status = project(x, rows, out, out_stride);
    if (!status.ok()) return status;
    status = detail::RescueOverflowedRows(spec, x, rows, out, out_stride, project);
    if (!status.ok()) return status;
    return detail::CheckFinite(out, rows, spec.dim, out_stride);
  });
}

}  // namespace tracin
