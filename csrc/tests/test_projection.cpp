// Projection tests without Python: the product against a float64 reference built from P itself,
// the scaling of every kind, and identical bits across threads, instruction sets, row chunking,
// splits of the columns into pieces and half-precision inputs; bad input; cancellation.
#include <atomic>
#include <chrono>
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "tracin/projection.hpp"

namespace {

using tracin_test::Check;

using tracin::DType;
using tracin::MatrixView;
using tracin::ProjectionKind;
using tracin::ProjectionSpec;

const char* KindName(ProjectionKind kind) {
  return kind == ProjectionKind::kRademacher ? "rademacher"
         : kind == ProjectionKind::kGaussian ? "gaussian"
                                             : "sparse";
}

std::vector<float> Project(const ProjectionSpec& spec, const std::vector<MatrixView>& pieces,
                           std::int64_t offset = 0, int threads = 0,
                           tracin::Isa isa = tracin::Isa::kAuto) {
  tracin::Options options;
  options.num_threads = threads;
  options.isa = isa;
  std::vector<float> out(static_cast<std::size_t>(pieces.front().rows * spec.dim), -7.0f);
  const tracin::Status s = tracin::Project(spec, pieces, offset, out.data(), spec.dim, options);
  Check(s.ok(), std::string("Project ok: ") + s.message);
  return out;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Column k of P (dim values) = the projection of the unit vector e_k.
std::vector<double> ExplicitP(const ProjectionSpec& spec, std::int64_t d) {
  std::vector<float> eye(static_cast<std::size_t>(d * d), 0.0f);
  for (std::int64_t k = 0; k < d; ++k) eye[static_cast<std::size_t>(k * d + k)] = 1.0f;
  const std::vector<float> pt = Project(spec, {{eye.data(), d, d, d, DType::kFloat32}});
  return {pt.begin(), pt.end()};  // (d, dim): row k is column k of P
}

void TestKind(ProjectionKind kind) {
  const std::string name = KindName(kind);
  const std::int64_t n = 37, d = 301, dim = 72;
  ProjectionSpec spec{kind, 1234, 0, dim, 4};
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<std::size_t>(n * d));
  for (float& v : x) v = normal(rng);
  const MatrixView whole{x.data(), n, d, d, DType::kFloat32};

  // Scaling: every column of P has unit norm for rademacher and sparse, about 1 for gaussian.
  const std::vector<double> pt = ExplicitP(spec, d);
  double worst = 0, mean_sq = 0;
  for (std::int64_t k = 0; k < d; ++k) {
    double sq = 0;
    for (std::int64_t i = 0; i < dim; ++i) sq += pt[k * dim + i] * pt[k * dim + i];
    worst = std::max(worst, std::fabs(sq - 1.0));
    mean_sq += sq / static_cast<double>(d);
  }
  if (kind == ProjectionKind::kGaussian)
    Check(std::fabs(mean_sq - 1.0) < 0.03, name + ": mean squared column norm near 1");
  else
    Check(worst < 1e-6, name + ": unit column norms");

  // The product against float64 X . P^T.
  const std::vector<float> y = Project(spec, {whole});
  double err = 0;
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t i = 0; i < dim; ++i) {
      double ref = 0, bound = 0;
      for (std::int64_t k = 0; k < d; ++k) {
        ref += x[r * d + k] * pt[k * dim + i];
        bound += std::fabs(x[r * d + k] * pt[k * dim + i]);
      }
      err = std::max(err, std::fabs(y[r * dim + i] - ref) / bound);
    }
  Check(err < 1e-5, name + ": product matches float64 reference (rel err " + std::to_string(err) + ")");

  // Identical bits across threads and instruction sets.
  for (int threads : {1, 2, 5})
    Check(SameBits(Project(spec, {whole}, 0, threads), y), name + ": threads " + std::to_string(threads));
  for (tracin::Isa isa : tracin_test::RunnableIsas("Project"))
    Check(SameBits(Project(spec, {whole}, 0, 2, isa), y),
          name + ": isa " + tracin::IsaName(isa));

  // Row chunking: rows [5, 20) alone give the same bits as within the whole.
  const std::vector<float> part = Project(spec, {{x.data() + 5 * d, 15, d, d, DType::kFloat32}});
  Check(std::memcmp(part.data(), y.data() + 5 * dim, part.size() * sizeof(float)) == 0,
        name + ": row chunking");

  // Pieces: the columns split in three (views into x with a row stride) give the same bits.
  const std::vector<MatrixView> pieces{{x.data(), n, 100, d, DType::kFloat32},
                                       {x.data() + 100, n, 1, d, DType::kFloat32},
                                       {x.data() + 101, n, d - 101, d, DType::kFloat32}};
  Check(SameBits(Project(spec, pieces), y), name + ": pieces");

  // Column offset: projecting columns [100, d) at offset 100 plus columns [0, 100) gives X P^T.
  const std::vector<float> head = Project(spec, {pieces[0]});
  const std::vector<float> tail = Project(spec, {{x.data() + 100, n, d - 100, d, DType::kFloat32}}, 100);
  double off_err = 0;
  for (std::size_t i = 0; i < y.size(); ++i)
    off_err = std::max(off_err, std::fabs(static_cast<double>(head[i]) + tail[i] - y[i]));
  Check(off_err < 1e-4, name + ": column offset sums to the whole");

  // Half precision: float16 / bfloat16 bits give what their float32 values give.
  std::vector<std::uint16_t> bf(x.size());
  std::vector<float> bf_as_float(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, &x[i], 4);
    bf[i] = static_cast<std::uint16_t>(bits >> 16);
    bits = std::uint32_t{bf[i]} << 16;
    std::memcpy(&bf_as_float[i], &bits, 4);
  }
  Check(SameBits(Project(spec, {{bf.data(), n, d, d, DType::kBFloat16}}),
                 Project(spec, {{bf_as_float.data(), n, d, d, DType::kFloat32}})),
        name + ": bfloat16 input");
  std::vector<std::uint16_t> half(x.size(), 0x3c00);  // 1.0
  std::vector<float> ones(x.size(), 1.0f);
  Check(SameBits(Project(spec, {{half.data(), n, d, d, DType::kFloat16}}),
                 Project(spec, {{ones.data(), n, d, d, DType::kFloat32}})),
        name + ": float16 input");

  // Seeds and streams change the matrix.
  ProjectionSpec other = spec;
  other.seed = 1235;
  Check(!SameBits(Project(other, {whole}), y), name + ": seed changes the result");
  other = spec;
  other.stream = 1;
  Check(!SameBits(Project(other, {whole}), y), name + ": stream changes the result");
}

void TestErrors() {
  std::vector<float> x(12, 1.0f), out(64);
  const MatrixView v{x.data(), 3, 4, 4, DType::kFloat32};
  auto code = [&](ProjectionSpec spec, std::vector<MatrixView> pieces, std::int64_t off = 0) {
    return tracin::Project(spec, pieces, off, out.data(), spec.dim).code;
  };
  using tracin::StatusCode;
  Check(code({ProjectionKind::kRademacher, 0, 0, 0, 8}, {v}) == StatusCode::kInvalidArgument, "dim 0");
  Check(code({ProjectionKind::kSparse, 0, 0, 4, 0}, {v}) == StatusCode::kInvalidArgument, "nonzeros 0");
  Check(code({ProjectionKind::kRademacher, 0, 0, 4, 8}, {}) == StatusCode::kInvalidArgument, "no pieces");
  Check(code({ProjectionKind::kRademacher, 0, 0, 4, 8}, {v}, -1) == StatusCode::kInvalidArgument,
        "negative offset");
  Check(code({ProjectionKind::kRademacher, 0, 0, 4, 8}, {v, {x.data(), 2, 4, 4, DType::kFloat32}}) ==
            StatusCode::kInvalidArgument,
        "row mismatch");
  Check(code({ProjectionKind::kRademacher, 0, 0, 4, 8}, {{x.data(), 3, 4, 3, DType::kFloat32}}) ==
            StatusCode::kInvalidArgument,
        "row stride");
  Check(tracin::Project({ProjectionKind::kRademacher, 0, 0, 4, 8}, {v}, 0, out.data(), 3).code ==
            StatusCode::kInvalidArgument,
        "out row stride smaller than dim");
  x[5] = std::nanf("");
  for (ProjectionKind kind : {ProjectionKind::kRademacher, ProjectionKind::kGaussian, ProjectionKind::kSparse})
    Check(code({kind, 0, 0, 4, 2}, {v}) == StatusCode::kNonFinite, std::string("NaN: ") + KindName(kind));
}

// Rows whose unscaled sums pass FLT_MAX while the scaled projection is finite are returned (summed
// again from the row times a power of two), matching the float64 product; rows whose projection is
// beyond float32 stay kNonFinite, naming the first such row; the other rows keep their bits.
void TestOverflowRescue() {
  const float big = 3e38f;
  const std::int64_t d = 4;
  // row 0 ordinary, row 1 huge (finite or not after scaling, by the signs of P), row 2 ordinary.
  const std::vector<float> x = {1.0f, -2.0f, 0.5f, 3.0f, big, big, -1.0f, 2.0f, -4.0f, 0.25f, 1.5f, 2.0f};
  const MatrixView v{x.data(), 3, d, d, DType::kFloat32};
  const MatrixView ordinary{x.data() + 8, 1, d, d, DType::kFloat32};
  int rescued = 0, refused = 0;
  for (ProjectionKind kind : {ProjectionKind::kRademacher, ProjectionKind::kGaussian, ProjectionKind::kSparse}) {
    for (std::int64_t dim : {1, 2, 4, 8, 16}) {
      const ProjectionSpec spec{kind, 11, 0, dim, 8};
      const std::string name = std::string(KindName(kind)) + " dim " + std::to_string(dim);
      const std::vector<double> p = ExplicitP(spec, d);  // (d, dim)
      const double scale = 1.0 / std::sqrt(static_cast<double>(kind == ProjectionKind::kSparse
                                                                     ? std::min<std::int64_t>(8, dim)
                                                                     : dim));
      bool finite = true, sums_overflow = false;
      std::vector<double> want(static_cast<std::size_t>(dim)), size(static_cast<std::size_t>(dim));
      for (std::int64_t i = 0; i < dim; ++i) {
        double sum = 0, abs_sum = 0;
        for (std::int64_t k = 0; k < d; ++k) {
          const double term = static_cast<double>(x[static_cast<std::size_t>(4 + k)]) *
                              p[static_cast<std::size_t>(k * dim + i)];
          sum += term;
          abs_sum += std::fabs(term);
          if (std::fabs(sum) / scale > static_cast<double>(FLT_MAX)) sums_overflow = true;
        }
        want[static_cast<std::size_t>(i)] = sum;
        size[static_cast<std::size_t>(i)] = abs_sum;
        if (std::fabs(sum) > static_cast<double>(FLT_MAX) * (1 - 1e-6)) finite = false;
      }
      std::vector<float> out(static_cast<std::size_t>(3 * dim), -7.0f);
      const tracin::Status s = tracin::Project(spec, {v}, 0, out.data(), dim);
      if (!finite) {
        ++refused;
        Check(s.code == tracin::StatusCode::kNonFinite && s.message.find("row 1 ") != std::string::npos,
              name + ": a projection beyond float32 is refused, naming row 1: " + s.message);
        continue;
      }
      rescued += sums_overflow ? 1 : 0;
      Check(s.ok(), name + ": a finite projection is returned: " + s.message);
      for (std::int64_t i = 0; i < dim; ++i)
        Check(std::fabs(out[static_cast<std::size_t>(dim + i)] - want[static_cast<std::size_t>(i)]) <=
                  1e-6 * size[static_cast<std::size_t>(i)],
              name + ": the rescued row matches the float64 product");
      const std::vector<float> alone = Project(spec, {ordinary});
      Check(std::memcmp(out.data() + 2 * dim, alone.data(), sizeof(float) * static_cast<std::size_t>(dim)) == 0,
            name + ": an ordinary row keeps its bits");
    }
  }
  Check(rescued >= 3 && refused >= 1, "the cases cover rescued rows (" + std::to_string(rescued) +
                                          ") and refused ones (" + std::to_string(refused) + ")");
}

// A spec's nonzeros above dim is capped at dim (the header's contract): the same bits as nonzeros = dim,
// whose scale is 1 / sqrt(dim), not 1 / sqrt(nonzeros).
void TestSparseNonzerosCappedAtDim() {
  std::vector<float> x(5 * 9);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 11) - 4.5f;
  const MatrixView v{x.data(), 5, 9, 9, DType::kFloat32};
  for (std::int64_t dim : {1, 3, 7})
    Check(SameBits(Project({ProjectionKind::kSparse, 2, 0, dim, 8}, {v}),
                   Project({ProjectionKind::kSparse, 2, 0, dim, static_cast<int>(dim)}, {v})),
          "sparse nonzeros 8 on dim " + std::to_string(dim) + " is nonzeros = dim");
}

// The rescue's shift comes from the largest value of the whole row: here it lies past the first
// 4096 columns (the rescue reads a row in chunks of 4096), the columns before it hold 1.0.
void TestOverflowRescueFindsTheLargestValueInALaterChunk() {
  const std::int64_t head = 4096, big_cols = 64, d = head + big_cols, dim = 256;
  for (ProjectionKind kind : {ProjectionKind::kRademacher, ProjectionKind::kGaussian}) {
    const ProjectionSpec spec{kind, 4, 0, dim, 8};
    const std::string name = KindName(kind);
    // P's columns [head, d): the projections of the unit vectors at column offset `head`.
    std::vector<float> eye(static_cast<std::size_t>(big_cols * big_cols), 0.0f);
    for (std::int64_t k = 0; k < big_cols; ++k) eye[static_cast<std::size_t>(k * big_cols + k)] = 1.0f;
    const std::vector<float> pt = Project(spec, {{eye.data(), big_cols, big_cols, big_cols, DType::kFloat32}}, head);
    std::vector<float> x(static_cast<std::size_t>(d), 1.0f);
    for (std::int64_t k = 0; k < big_cols; ++k)  // aligned with the signs of output 0: its sum passes FLT_MAX
      x[static_cast<std::size_t>(head + k)] = pt[static_cast<std::size_t>(k * dim)] < 0 ? -3e37f : 3e37f;
    std::vector<float> out(static_cast<std::size_t>(dim));
    const tracin::Status s = tracin::Project(spec, {{x.data(), 1, d, d, DType::kFloat32}}, 0, out.data(), dim);
    Check(s.ok(), name + ": a finite projection whose largest values lie past column 4096 is returned: " + s.message);
    if (!s.ok()) continue;
    for (std::int64_t i = 0; i < dim; ++i) {
      double want = 0, size = 0;  // the head's 4096 ones add at most 4096 * 6 / 16: far below the tolerance
      for (std::int64_t k = 0; k < big_cols; ++k) {
        const double term = static_cast<double>(x[static_cast<std::size_t>(head + k)]) *
                            pt[static_cast<std::size_t>(k * dim + i)];
        want += term;
        size += std::fabs(term);
      }
      Check(std::fabs(out[static_cast<std::size_t>(i)] - want) <= 1e-6 * size + 1e5,
            name + ": output " + std::to_string(i) + " matches the float64 product");
    }
    Check(std::fabs(static_cast<double>(out[0])) > static_cast<double>(FLT_MAX) / 16,
          name + ": output 0's unscaled sum passed FLT_MAX");
  }
}

// Rescued rows are summed again in batches of 16M outputs: with dim = 2^22, a batch holds 4 rows,
// and the fifth rescued row goes in a second batch, written back to its own row.
void TestOverflowRescueInSeveralBatches() {
  const std::int64_t dim = std::int64_t{1} << 22, rows = 5, d = 2;
  const ProjectionSpec spec{ProjectionKind::kRademacher, 6, 0, dim, 8};
  std::vector<float> x(static_cast<std::size_t>(rows * d));
  for (std::int64_t r = 0; r < rows; ++r)  // both columns 3e38 - r 1e37: a pair of agreeing signs overflows
    x[static_cast<std::size_t>(r * d)] = x[static_cast<std::size_t>(r * d + 1)] =
        3e38f - 1e37f * static_cast<float>(r);
  const std::vector<float> all = Project(spec, {{x.data(), rows, d, d, DType::kFloat32}});
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::vector<float> alone = Project(spec, {{x.data() + r * d, 1, d, d, DType::kFloat32}});
    Check(std::memcmp(all.data() + r * dim, alone.data(), sizeof(float) * static_cast<std::size_t>(dim)) == 0,
          "rescued row " + std::to_string(r) + " of a second batch has the bits of that row alone");
  }
}

void TestCancellation() {
  std::vector<float> x(40 * 30, 1.0f), out(40 * 16);
  const std::atomic<bool> cancel{true};
  tracin::Options options;
  options.cancel = &cancel;
  for (ProjectionKind kind : {ProjectionKind::kRademacher, ProjectionKind::kGaussian, ProjectionKind::kSparse})
    Check(tracin::Project({kind, 0, 0, 16, 2}, {{x.data(), 40, 30, 30, DType::kFloat32}}, 0, out.data(), 16,
                          options)
                  .code == tracin::StatusCode::kCancelled,
          std::string("a set cancellation flag stops Project: ") + KindName(kind));
}

// A flag set while one long task runs (one thread, one row group, one output block, ~1e11
// multiply-adds over 409,600 columns: seconds) stops it within a panel of columns, not at its end.
void TestCancellationInsideATask() {
  const std::int64_t rows = 1024, piece_cols = 2048, n_pieces = 200;
  std::vector<float> x(static_cast<std::size_t>(rows * piece_cols), 0.5f);
  const std::vector<MatrixView> pieces(static_cast<std::size_t>(n_pieces),
                                       MatrixView{x.data(), rows, piece_cols, piece_cols, DType::kFloat32});
  for (ProjectionKind kind : {ProjectionKind::kRademacher, ProjectionKind::kGaussian, ProjectionKind::kSparse}) {
    const std::int64_t dim = kind == ProjectionKind::kSparse ? 4096 : 256;
    std::vector<float> out(static_cast<std::size_t>(rows * dim));
    std::atomic<bool> cancel{false};
    tracin::Options options;
    options.num_threads = 1;
    options.cancel = &cancel;
    using Clock = std::chrono::steady_clock;
    Clock::time_point set_at{};
    std::thread canceller([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      set_at = Clock::now();
      cancel = true;
    });
    const tracin::Status s =
        tracin::Project({kind, 3, 0, dim, kind == ProjectionKind::kSparse ? 64 : 8}, pieces, 0, out.data(), dim,
                        options);
    const Clock::time_point done = Clock::now();
    canceller.join();
    const double late = std::chrono::duration<double>(done - set_at).count();
    std::printf("%s: cancelled %.3f s after the flag was set\n", KindName(kind), late);
    Check(s.code == tracin::StatusCode::kCancelled, std::string("cancelled inside a task: ") + KindName(kind));
    Check(late < 0.5, std::string("a task stops soon after the flag is set: ") + KindName(kind) + ", " +
                          std::to_string(late) + " s");
  }
}

// Per-thread scratch follows the threads that run (at most one per task), not the count asked for:
// INT_MAX threads on a 4 x 10 matrix is the one-thread result, not "out of memory".
void TestHugeThreadCount() {
  std::vector<float> x(40);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7) - 3.0f;
  const MatrixView v{x.data(), 4, 10, 10, DType::kFloat32};
  for (ProjectionKind kind : {ProjectionKind::kRademacher, ProjectionKind::kGaussian, ProjectionKind::kSparse}) {
    const ProjectionSpec spec{kind, 5, 0, 8, 2};
    Check(SameBits(Project(spec, {v}, 0, INT_MAX), Project(spec, {v}, 0, 1)),
          std::string("num_threads INT_MAX on a tiny matrix: ") + KindName(kind));
  }
}

}  // namespace

int main() {
  for (ProjectionKind kind : {ProjectionKind::kRademacher, ProjectionKind::kGaussian, ProjectionKind::kSparse})
    TestKind(kind);
  TestErrors();
  TestOverflowRescue();
  TestOverflowRescueFindsTheLargestValueInALaterChunk();
  TestOverflowRescueInSeveralBatches();
  TestSparseNonzerosCappedAtDim();
  TestCancellation();
  TestCancellationInsideATask();
  TestHugeThreadCount();
  return tracin_test::Report();
}
