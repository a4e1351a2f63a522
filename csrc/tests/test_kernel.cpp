// Kernel tests without Python: every entry point against a float64 reference, determinism across
// threads and block sizes for every instruction set the CPU runs, half-precision inputs, factored
// mode, bad input, cancellation, cosine scores.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../src/engine.hpp"
#include "../src/kernels.hpp"
#include "../src/parallel.hpp"
#include "../src/topk.hpp"
#include "check.hpp"
#include "tracin/tracin.hpp"

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__linux__)
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace {

using tracin_test::Check;

struct Matrix {
  std::int64_t rows, cols;
  std::vector<float> data;
  tracin::MatrixView View() const {
    return {data.data(), rows, cols, cols, tracin::DType::kFloat32};
  }
};

Matrix Random(std::int64_t rows, std::int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  Matrix m{rows, cols, std::vector<float>(static_cast<std::size_t>(rows * cols))};
  for (float& v : m.data) v = normal(rng);
  return m;
}

tracin::GradientSide Full(const std::vector<Matrix>& ms) {
  tracin::GradientSide s;
  for (const Matrix& m : ms) s.blocks.push_back(m.View());
  return s;
}

double Dot(const Matrix& a, std::int64_t i, const Matrix& b, std::int64_t j) {
  double s = 0;
  for (std::int64_t k = 0; k < a.cols; ++k)
    s += static_cast<double>(a.data[i * a.cols + k]) * b.data[j * b.cols + k];
  return s;
}

double Norm(const Matrix& a, std::int64_t i) { return std::sqrt(Dot(a, i, a, i)); }

// Reference scores and the scale-aware error bound of DESIGN.md, float64.
void Reference(const std::vector<Matrix>& test, const std::vector<Matrix>& train,
               const std::vector<double>& w, std::vector<double>* exact,
               std::vector<double>* bound) {
  const std::int64_t m = test[0].rows, n = train[0].rows;
  exact->assign(static_cast<std::size_t>(m * n), 0.0);
  bound->assign(static_cast<std::size_t>(m * n), 0.0);
  for (std::size_t c = 0; c < test.size(); ++c)
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        (*exact)[i * n + j] += w[c] * Dot(test[c], i, train[c], j);
        (*bound)[i * n + j] += 1e-5 * std::abs(w[c]) * Norm(test[c], i) * Norm(train[c], j);
      }
}

void TestScoresAndDeterminism() {
  std::mt19937 rng(1);
  const std::vector<Matrix> test = {Random(37, 300, rng), Random(37, 5, rng)};
  const std::vector<Matrix> train = {Random(211, 300, rng), Random(211, 5, rng)};
  const std::vector<double> w = {0.5, -2.0};
  std::vector<double> exact, bound;
  Reference(test, train, w, &exact, &bound);
  for (tracin::Isa isa : tracin_test::RunnableIsas("Scores")) {
    std::vector<float> first;
    for (int threads : {1, 3})
      for (std::int64_t block : {0, 7, 1000}) {
        tracin::Options o;
        o.isa = isa;
        o.num_threads = threads;
        o.train_block = block;
        o.test_block = block;
        std::vector<float> out(exact.size());
        tracin::Status s = tracin::Scores(Full(test), Full(train), w, out.data(), o);
        Check(s.ok(), "Scores ok: " + s.message);
        bool close = true;
        for (std::size_t i = 0; i < out.size(); ++i)
          close = close && std::abs(out[i] - exact[i]) <= bound[i];
        Check(close, std::string("Scores within the scale-aware bound, isa ") + tracin::IsaName(isa));
        if (first.empty()) first = out;
        Check(std::memcmp(first.data(), out.data(), out.size() * 4) == 0,
              std::string("identical bits for any thread count and block size, isa ") + tracin::IsaName(isa));
      }
  }
}

// Weights far from 1 whose products with the test rows leave float32's normal range (1e-30 x 1e-12
// is subnormal, 1e45 x 1e-6 overflows) while every score is a normal float; weights below 1 with
// gradients whose unweighted products overflow (1e-5 x 3e19 x 3e19); checkpoints whose weights are
// far apart (1e-30 and 1e30, 1 and 2^40): within the bound of the float64 scores, full and factored
// (the weight on the left factor, cosine too), Scores and TopK, every instruction set. The kernel
// packs w * 2^-e, e from the weighted rows' magnitudes, and scales each tile by 2^e.
void TestWeightsFarFromOne() {
  struct Case {
    std::vector<double> w, test_scale, train_scale;  // per checkpoint
  };
  const Case cases[] = {{{1e-30}, {1e-12}, {1e25}},        {{1e45}, {1e-6}, {1e-6}},
                        {{1e-30}, {1e20}, {1e20}},         {{1e-5}, {3e19}, {3e19}},
                        {{1e-35}, {1e20}, {1e20}},         {{1e-30, 1e30}, {1.0, 1e-30}, {1.0, 1e-30}},
                        {{1.0, 0x1p40}, {1e-30, 1.0}, {1e10, 1e-30}}};
  for (const Case& c : cases) {
    std::mt19937 rng(11);
    std::vector<Matrix> test, train;
    for (std::size_t k = 0; k < c.w.size(); ++k) {
      test.push_back(Random(5, 40, rng));
      train.push_back(Random(30, 40, rng));
      for (float& v : test[k].data) v *= static_cast<float>(c.test_scale[k]);
      for (float& v : train[k].data) v *= static_cast<float>(c.train_scale[k]);
    }
    const std::vector<double>& w = c.w;
    std::vector<double> exact, bound;
    Reference(test, train, w, &exact, &bound);
    char name_buf[96];
    std::snprintf(name_buf, sizeof name_buf, "weights %g.. (%zu), test %g, isa ", w[0], w.size(), c.test_scale[0]);
    const std::string name = name_buf;
    for (tracin::Isa isa : tracin_test::RunnableIsas("WeightsFarFromOne")) {
      tracin::Options o;
      o.isa = isa;
      std::vector<float> out(exact.size());
      tracin::Status s = tracin::Scores(Full(test), Full(train), w, out.data(), o);
      Check(s.ok(), name + tracin::IsaName(isa) + ": Scores ok: " + s.message);
      bool close = true;
      for (std::size_t i = 0; i < out.size(); ++i) close = close && std::abs(out[i] - exact[i]) <= bound[i];
      Check(close, name + tracin::IsaName(isa) + ": Scores within the scale-aware bound");
      std::vector<float> values(5 * 3);
      std::vector<std::int64_t> indices(values.size());
      tracin::TopKOutput top;
      top.proponent_values = values.data();
      top.proponent_indices = indices.data();
      s = tracin::TopK(Full(test), Full(train), w, 3, tracin::Side::kProponents, top, o);
      Check(s.ok(), name + tracin::IsaName(isa) + ": TopK ok: " + s.message);
      bool same = s.ok();
      for (std::size_t i = 0; same && i < values.size(); ++i)
        same = values[i] == out[static_cast<std::size_t>(i / 3 * 30 + indices[i])];
      Check(same, name + tracin::IsaName(isa) + ": TopK values are the Scores of their indices");
      // Factored: the left factor carries the weight; a right factor of ones (width 1) keeps the scores.
      Matrix ones_t{5, 1, std::vector<float>(5, 1.0f)}, ones_x{30, 1, std::vector<float>(30, 1.0f)};
      tracin::GradientSide ft, fx;
      ft.factored = fx.factored = true;
      for (std::size_t k = 0; k < w.size(); ++k) {
        ft.blocks.insert(ft.blocks.end(), {test[k].View(), ones_t.View()});
        fx.blocks.insert(fx.blocks.end(), {train[k].View(), ones_x.View()});
      }
      std::vector<float> factored(out.size());
      s = tracin::Scores(ft, fx, w, factored.data(), o);
      close = s.ok();
      for (std::size_t i = 0; i < out.size(); ++i) close = close && std::abs(factored[i] - exact[i]) <= bound[i];
      Check(close && (w.size() > 1 || factored == out),  // one checkpoint: the same sums as the full ones
            name + tracin::IsaName(isa) + ": factored scores within the bound: " + s.message);
      if (w.size() > 1 || w[0] > 1.0) continue;  // cosine scores of weight 1e45 are beyond float32
      o.normalize = 1;
      s = tracin::Scores(Full(test), Full(train), w, out.data(), o);
      close = s.ok();
      for (std::int64_t i = 0; close && i < 5; ++i)
        for (std::int64_t j = 0; j < 30; ++j) {
          const double cosine = w[0] * Dot(test[0], i, train[0], j) / (Norm(test[0], i) * Norm(train[0], j));
          close = close && std::abs(out[static_cast<std::size_t>(i * 30 + j)] - cosine) <= 1e-5 * std::abs(w[0]);
        }
      Check(close, name + tracin::IsaName(isa) + ": cosine scores within the bound: " + s.message);
    }
  }
}

// One pass whose test rows' weighted values are far apart (review21 case A): weight 1e-30, test row 0
// ~1e10 (1e-20 packed, normal), rows 1-4 ~1e-12 (1e-42 packed, subnormal), train ~1e25. Each row
// gets its own weight exponent, so every row is within the bound of the float64 scores and rows 1-4
// have the bits they have scored alone; TopK values are the Scores of their indices. Every
// instruction set, full and factored (right factors of ones).
void TestWeightExponentPerTestRow() {
  std::mt19937 rng(5);
  Matrix test = Random(5, 40, rng), train = Random(30, 40, rng);
  for (std::int64_t k = 0; k < 40; ++k) test.data[static_cast<std::size_t>(k)] *= 1e10f;
  for (std::size_t i = 40; i < test.data.size(); ++i) test.data[i] *= 1e-12f;
  for (float& v : train.data) v *= 1e25f;
  Matrix tiny{4, 40, std::vector<float>(test.data.begin() + 40, test.data.end())};
  const std::vector<double> w = {1e-30};
  std::vector<double> exact, bound;
  Reference({test}, {train}, w, &exact, &bound);
  Matrix ones_t{5, 1, std::vector<float>(5, 1.0f)}, ones_x{30, 1, std::vector<float>(30, 1.0f)};
  tracin::GradientSide ft, fx;
  ft.factored = fx.factored = true;
  ft.blocks = {test.View(), ones_t.View()};
  fx.blocks = {train.View(), ones_x.View()};
  for (tracin::Isa isa : tracin_test::RunnableIsas("WeightExponentPerTestRow")) {
    const std::string name = std::string("per-row weight exponent, isa ") + tracin::IsaName(isa);
    tracin::Options o;
    o.isa = isa;
    std::vector<float> out(exact.size()), alone(4 * 30), factored(exact.size());
    tracin::Status s = tracin::Scores(Full({test}), Full({train}), w, out.data(), o);
    Check(s.ok(), name + ": Scores ok: " + s.message);
    bool close = true;
    for (std::size_t i = 0; i < out.size(); ++i) close = close && std::abs(out[i] - exact[i]) <= bound[i];
    Check(close, name + ": Scores within the scale-aware bound");
    s = tracin::Scores(Full({tiny}), Full({train}), w, alone.data(), o);
    Check(s.ok() && std::memcmp(alone.data(), out.data() + 30, alone.size() * 4) == 0,
          name + ": rows 1-4 have the bits they have scored alone");
    s = tracin::Scores(ft, fx, w, factored.data(), o);
    Check(s.ok() && factored == out, name + ": factored scores are the full ones");
    std::vector<float> values(5 * 3);
    std::vector<std::int64_t> indices(values.size());
    tracin::TopKOutput top;
    top.proponent_values = values.data();
    top.proponent_indices = indices.data();
    s = tracin::TopK(Full({test}), Full({train}), w, 3, tracin::Side::kProponents, top, o);
    bool same = s.ok();
    for (std::size_t i = 0; same && i < values.size(); ++i)
      same = values[i] == out[static_cast<std::size_t>(i / 3 * 30 + indices[i])] &&
             (i % 3 == 0 || values[i] <= values[i - 1]);
    Check(same, name + ": TopK values are the Scores of their indices, descending: " + s.message);
  }
}

// A test row whose weighted values overflow float32 in one checkpoint (1e30 x 1e30) while its other
// checkpoint holds ordinary values (1e-20, weight 1): packing the row divided by 2^99 would take those
// to zero (a score of 0 for the exact 4e-20, and TopK ranking train row 0 over row 1), so the row is
// not rescaled and the overflow is reported. A row whose small values stay normal when divided
// (1e-28 next to 1e9 x 1e30, divided by 2^29), or become subnormals without losing a bit (2^-100
// divided by 2^30) or rounded by at most 2^-20 of themselves, is still rescaled and scores within the
// bound (the exact subnormal exactly).
void TestExponentShiftKeepsOtherCheckpoints() {
  const Matrix t0{1, 4, std::vector<float>(4, 1e30f)}, t1{1, 4, std::vector<float>(4, 1e-20f)};
  const Matrix x0{2, 4, std::vector<float>(8, 0.0f)}, x1{2, 4, {1, 1, 1, 1, 2, 2, 2, 2}};
  const std::vector<double> w = {1e30, 1.0};
  for (tracin::Isa isa : tracin_test::RunnableIsas("ExponentShiftKeepsOtherCheckpoints")) {
    const std::string name = std::string("rescale would lose a checkpoint, isa ") + tracin::IsaName(isa);
    tracin::Options o;
    o.isa = isa;
    std::vector<float> out(2, -1.0f);
    tracin::Status s = tracin::Scores(Full({t0, t1}), Full({x0, x1}), w, out.data(), o);
    Check(s.code == tracin::StatusCode::kNonFinite && s.message.find("overflowed float32") != std::string::npos,
          name + ": Scores reports the overflow: " + s.message + " (scores " + std::to_string(out[0]) + ")");
    std::vector<float> values(1);
    std::vector<std::int64_t> indices(1);
    tracin::TopKOutput top;
    top.proponent_values = values.data();
    top.proponent_indices = indices.data();
    s = tracin::TopK(Full({t0, t1}), Full({x0, x1}), w, 1, tracin::Side::kProponents, top, o);
    Check(s.code == tracin::StatusCode::kNonFinite, name + ": TopK reports the overflow: " + s.message);
    // Factored (right factors of ones): the same.
    const Matrix ones_t{1, 1, {1.0f}}, ones_x{2, 1, {1.0f, 1.0f}};
    tracin::GradientSide ft, fx;
    ft.factored = fx.factored = true;
    ft.blocks = {t0.View(), ones_t.View(), t1.View(), ones_t.View()};
    fx.blocks = {x0.View(), ones_x.View(), x1.View(), ones_x.View()};
    s = tracin::Scores(ft, fx, w, out.data(), o);
    Check(s.code == tracin::StatusCode::kNonFinite, name + ": factored Scores reports the overflow: " + s.message);
    // Still rescaled: 1e9 x 1e30 = 1e39 overflows, 1e-28 / 2^29 is normal.
    Matrix big{1, 4, std::vector<float>(4, 1e9f)}, small{1, 4, std::vector<float>(4, 1e-28f)};
    std::vector<double> exact, bound;
    Reference({big, small}, {x0, x1}, w, &exact, &bound);
    s = tracin::Scores(Full({big, small}), Full({x0, x1}), w, out.data(), o);
    Check(s.ok() && std::abs(out[0] - exact[0]) <= 1e-6 * exact[0] && std::abs(out[1] - exact[1]) <= 1e-6 * exact[1],
          std::string("rescaled row beside normal values scores within 1e-6, isa ") + tracin::IsaName(isa) + ": " +
              s.message + " " + std::to_string(out[0] / exact[0]));
    // review112 F3: lowering by 2^e loses no bit of a value exact as a subnormal. w = [2^100, 1],
    // test 2^30 and 2^-100 (2^130 and 2^-100 weighted: e = 30 takes 2^-100 to 2^-130, exact), train
    // 2^-60 and 2^90: the score 2^70 + 2^-10 is a float32 (2^70), from both the full and factored
    // kernels, and top_k's value; before, the row was refused as an overflow.
    const Matrix p0{1, 1, {0x1p30f}}, p1{1, 1, {0x1p-100f}}, q0{1, 1, {0x1p-60f}}, q1{1, 1, {0x1p90f}};
    const std::vector<double> wp = {0x1p100, 1.0};
    const float score = static_cast<float>(0x1p70 + 0x1p-10);
    s = tracin::Scores(Full({p0, p1}), Full({q0, q1}), wp, out.data(), o);
    Check(s.ok() && out[0] == score, name + ": a lowered row exact as a subnormal scores 2^70 + 2^-10: " + s.message +
                                         " " + std::to_string(out[0]));
    s = tracin::TopK(Full({p0, p1}), Full({q0, q1}), wp, 1, tracin::Side::kProponents, top, o);
    Check(s.ok() && values[0] == score && indices[0] == 0, name + ": its top_k: " + s.message);
    const Matrix one{1, 1, {1.0f}};
    tracin::GradientSide fp, fq;
    fp.factored = fq.factored = true;
    fp.blocks = {p0.View(), one.View(), p1.View(), one.View()};
    fq.blocks = {q0.View(), one.View(), q1.View(), one.View()};
    s = tracin::Scores(fp, fq, wp, out.data(), o);
    Check(s.ok() && out[0] == score, name + ": factored, the same: " + s.message + " " + std::to_string(out[0]));
    // Lowered by 2^30, slot 1's value keeps 24 - k bits at 2^(-96-k) (k = 3: 2^-99 to 2^-129). It may
    // lose bits while its rounding stays within 2^-20 of itself (ShiftLosesBits): then the row is
    // lowered and scored within the bound (train row [0] / [2^90]: slot 1 carries the whole score, of
    // which the bound is 1e-5); beyond 2^-20, or to 0, the row is refused (the overflow of its 2^130).
    // Before, any lost bit was refused (32eaeb6), so the first four were the overflow too.
    const Matrix zero{1, 1, {0.0f}};
    struct Lowered {
      float value;
      bool scored;
      const char* what;
    };
    const Lowered cases[] = {
        {0x1.00000ap-99f, true, "3 bits lost (101 rounds up: 3 x 2^-23 of itself)"},
        {0x1.000002p-100f, true, "4 bits lost (2^-23 of itself)"},
        {0x1.000010p-101f, true, "5 bits lost, 8 x 2^-23 / (1 + 8 x 2^-23) of itself: just within 2^-20"},
        {0x1.000012p-101f, false, "5 bits lost, 9 x 2^-23 / (1 + 9 x 2^-23) of itself: beyond 2^-20"},
        {0x1.00001ep-101f, false, "5 bits lost, 15 x 2^-23 of itself"},
        {0x1.0002p-106f, false, "10 bits lost, 2^-15 of itself"},
        {0x1p-120f, false, "to 2^-150: 0"},
        {0x1p-125f, false, "to 2^-155: 0"},
    };
    for (const Lowered& c : cases) {
      const Matrix pc{1, 1, {c.value}};
      std::vector<double> want, limit;
      Reference({p0, pc}, {zero, q1}, wp, &want, &limit);
      s = tracin::Scores(Full({p0, pc}), Full({zero, q1}), wp, out.data(), o);
      const bool scored = s.ok() && std::abs(out[0] - want[0]) <= limit[0];
      const bool refused = s.code == tracin::StatusCode::kNonFinite;
      s = tracin::TopK(Full({p0, pc}), Full({zero, q1}), wp, 1, tracin::Side::kProponents, top, o);
      const bool top_scored = s.ok() && std::abs(values[0] - want[0]) <= limit[0];
      const bool top_refused = s.code == tracin::StatusCode::kNonFinite;
      fp.blocks = {p0.View(), one.View(), pc.View(), one.View()};
      fq.blocks = {zero.View(), one.View(), q1.View(), one.View()};
      s = tracin::Scores(fp, fq, wp, out.data(), o);
      const bool factored_scored = s.ok() && std::abs(out[0] - want[0]) <= limit[0];
      const bool factored_refused = s.code == tracin::StatusCode::kNonFinite;
      Check(c.scored ? scored && top_scored && factored_scored : refused && top_refused && factored_refused,
            name + ": a row lowered with " + c.what + (c.scored ? " is scored within the bound" : " is refused") +
                ": " + s.message + " " + std::to_string(out[0] / want[0]));
    }
  }
}

void TestTopK() {
  std::mt19937 rng(2);
  const std::vector<Matrix> test = {Random(5, 33, rng)};
  Matrix train = Random(500, 33, rng);
  // Duplicate rows create exact ties; the smaller index must come first.
  std::copy_n(train.data.begin(), 33, train.data.begin() + 100 * 33);
  const std::vector<Matrix> trains = {train};
  const std::vector<double> w = {1.0};
  std::vector<float> dense(5 * 500);
  Check(tracin::Scores(Full(test), Full(trains), w, dense.data()).ok(), "dense scores");
  // k = 250 and 500: partition buffers of n = 500 candidates (cut back when one thread scores
  // every row) and of k + 1 (never cut back). 64 threads: more than the 39 or 6 tiles.
  for (std::int64_t k : {1, 10, 100, 250, 500})
    for (int threads : {1, 3, 64})
      for (std::int64_t block : {13, 0}) {
        std::vector<float> pv(5 * k), ov(5 * k);
        std::vector<std::int64_t> pi(5 * k), oi(5 * k);
        tracin::Options o;
        o.num_threads = threads;
        o.train_block = block;
        tracin::Status s = tracin::TopK(Full(test), Full(trains), w, k, tracin::Side::kBoth,
                                        {pv.data(), pi.data(), ov.data(), oi.data()}, o);
        Check(s.ok(), "TopK ok: " + s.message);
        bool same = true;
        for (std::int64_t r = 0; r < 5; ++r) {
          std::vector<std::int64_t> order(500);
          std::iota(order.begin(), order.end(), 0);
          const float* row = dense.data() + r * 500;
          std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return row[a] > row[b]; });
          for (std::int64_t j = 0; j < k; ++j)
            same = same && pi[r * k + j] == order[j] && pv[r * k + j] == row[order[j]];
          std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return row[a] < row[b]; });
          for (std::int64_t j = 0; j < k; ++j)
            same = same && oi[r * k + j] == order[j] && ov[r * k + j] == row[order[j]];
        }
        Check(same, "TopK matches a stable sort of the dense scores, k=" + std::to_string(k) +
                        ", threads=" + std::to_string(threads) + ", train_block=" + std::to_string(block));
      }
}

std::uint16_t ToBFloat16(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<std::uint16_t>(bits >> 16);  // truncation: exactly representable below
}

void TestHalfPrecisionAndFactored() {
  std::mt19937 rng(3);
  Matrix left_t = Random(9, 4, rng), right_t = Random(9, 20, rng);
  Matrix left_x = Random(50, 4, rng), right_x = Random(50, 20, rng);
  for (Matrix* m : {&left_t, &right_t, &left_x, &right_x})
    for (float& v : m->data) {
      const std::uint16_t b = ToBFloat16(v);
      std::uint32_t bits = std::uint32_t{b} << 16;
      std::memcpy(&v, &bits, 4);
    }
  tracin::GradientSide t, x;
  t.factored = x.factored = true;
  t.blocks = {left_t.View(), right_t.View()};
  x.blocks = {left_x.View(), right_x.View()};
  std::vector<float> out(9 * 50);
  Check(tracin::Scores(t, x, {0.25}, out.data()).ok(), "factored scores");
  bool close = true;
  for (std::int64_t i = 0; i < 9; ++i)
    for (std::int64_t j = 0; j < 50; ++j) {
      const double e = 0.25 * Dot(left_t, i, left_x, j) * Dot(right_t, i, right_x, j);
      const double b = 1e-5 * 0.25 * Norm(left_t, i) * Norm(right_t, i) * Norm(left_x, j) *
                       Norm(right_x, j);
      close = close && std::abs(out[i * 50 + j] - e) <= b;
    }
  Check(close, "factored scores within bound");

  // The same values as bfloat16 bits give the same scores.
  std::vector<std::vector<std::uint16_t>> bits;
  for (const Matrix* m : {&left_t, &right_t, &left_x, &right_x}) {
    bits.emplace_back();
    for (float v : m->data) bits.back().push_back(ToBFloat16(v));
  }
  tracin::GradientSide tb = t, xb = x;
  for (int b = 0; b < 2; ++b) {
    tb.blocks[b].data = bits[b].data();
    tb.blocks[b].dtype = tracin::DType::kBFloat16;
    xb.blocks[b].data = bits[2 + b].data();
    xb.blocks[b].dtype = tracin::DType::kBFloat16;
  }
  std::vector<float> out_b(out.size());
  Check(tracin::Scores(tb, xb, {0.25}, out_b.data()).ok(), "bfloat16 factored scores");
  Check(out == out_b, "bfloat16 inputs give the float32 results bit for bit");

  // Float16: 1.5 is 0x3e00, -0.25 is 0xb400.
  const std::vector<std::uint16_t> h = {0x3e00, 0xb400};
  tracin::GradientSide hs;
  hs.blocks = {{h.data(), 1, 2, 2, tracin::DType::kFloat16}};
  float self = 0;
  Check(tracin::SelfInfluence(hs, {2.0}, &self).ok(), "float16 self-influence");
  Check(self == 2.0f * (2.25f + 0.0625f), "float16 decoded exactly");
}

// float16 / bfloat16 blocks at an odd address (NumPy's frombuffer(..., offset=1); legal input) are
// read through memcpy, never uint16_t loads (undefined behaviour, which UBSan reports): the same bits
// as the aligned copy from Scores, TopK, SelfInfluence and Aggregate, for widths with SIMD runs and
// scalar tails, every instruction set; a misaligned Inf is found and named.
void TestMisalignedHalfPrecision() {
  std::mt19937 rng(17);
  const std::int64_t m = 5, n = 40;
  for (const tracin::DType dtype : {tracin::DType::kFloat16, tracin::DType::kBFloat16})
    for (const std::int64_t d : {std::int64_t{1}, std::int64_t{37}}) {
      const bool half = dtype == tracin::DType::kFloat16;
      // Finite values of moderate size: exponent fields 10-20 (float16) or 120-134 (bfloat16).
      std::uniform_int_distribution<int> exponent(half ? 10 : 120, half ? 20 : 134), bit(0, 0xffff);
      const auto random_bits = [&](std::int64_t count) {
        std::vector<std::uint16_t> v(static_cast<std::size_t>(count));
        for (std::uint16_t& b : v) {
          const int e = exponent(rng), r = bit(rng);
          b = static_cast<std::uint16_t>(half ? (r & 0x83ff) | (e << 10) : (r & 0x807f) | (e << 7));
        }
        return v;
      };
      const std::vector<std::uint16_t> t = random_bits(m * d), x = random_bits(n * d);
      std::vector<unsigned char> t_odd(t.size() * 2 + 1), x_odd(x.size() * 2 + 1);
      std::memcpy(t_odd.data() + 1, t.data(), t.size() * 2);
      std::memcpy(x_odd.data() + 1, x.data(), x.size() * 2);
      const auto side = [&](const void* data, std::int64_t rows) {
        tracin::GradientSide s;
        s.blocks = {{data, rows, d, d, dtype}};
        return s;
      };
      const tracin::GradientSide ta = side(t.data(), m), xa = side(x.data(), n);
      const tracin::GradientSide tm = side(t_odd.data() + 1, m), xm = side(x_odd.data() + 1, n);
      const std::string name = std::string(half ? "float16" : "bfloat16") + " at an odd address, d " +
                               std::to_string(d) + ", isa ";
      for (tracin::Isa isa : tracin_test::RunnableIsas("MisalignedHalfPrecision")) {
        tracin::Options o;
        o.isa = isa;
        std::vector<float> aligned(static_cast<std::size_t>(m * n)), odd(aligned.size());
        Check(tracin::Scores(ta, xa, {0.5}, aligned.data(), o).ok() &&
                  tracin::Scores(tm, xm, {0.5}, odd.data(), o).ok() &&
                  std::memcmp(aligned.data(), odd.data(), aligned.size() * 4) == 0,
              name + tracin::IsaName(isa) + ": Scores, the aligned copy's bits");
        std::vector<float> va(static_cast<std::size_t>(m * 3)), vo(va.size());
        std::vector<std::int64_t> ia(va.size()), io(va.size());
        tracin::TopKOutput top_a, top_o;
        top_a.proponent_values = va.data();
        top_a.proponent_indices = ia.data();
        top_o.proponent_values = vo.data();
        top_o.proponent_indices = io.data();
        Check(tracin::TopK(ta, xa, {0.5}, 3, tracin::Side::kProponents, top_a, o).ok() &&
                  tracin::TopK(tm, xm, {0.5}, 3, tracin::Side::kProponents, top_o, o).ok() && va == vo && ia == io,
              name + tracin::IsaName(isa) + ": TopK, the aligned copy's");
        std::vector<float> sa(static_cast<std::size_t>(n)), so(sa.size());
        Check(tracin::SelfInfluence(xa, {0.5}, sa.data(), o).ok() &&
                  tracin::SelfInfluence(xm, {0.5}, so.data(), o).ok() && sa == so,
              name + tracin::IsaName(isa) + ": SelfInfluence, the aligned copy's");
        std::vector<double> aa(static_cast<std::size_t>(n)), ao(aa.size());
        Check(tracin::Aggregate(ta, xa, {0.5}, aa.data(), o).ok() &&
                  tracin::Aggregate(tm, xm, {0.5}, ao.data(), o).ok() && aa == ao,
              name + tracin::IsaName(isa) + ": Aggregate, the aligned copy's");
      }
      // An Inf in row 3's last column, at an odd address: found by the finiteness check.
      const std::uint16_t inf = half ? 0x7c00 : 0x7f80;
      std::memcpy(t_odd.data() + 1 + (3 * d + d - 1) * 2, &inf, 2);
      std::vector<float> out(static_cast<std::size_t>(m * n));
      const tracin::Status s = tracin::Scores(tm, xm, {0.5}, out.data());
      Check(s.code == tracin::StatusCode::kNonFinite &&
                s.message.find("test checkpoint 0 contains NaN or Inf values, first in rows [3]") != std::string::npos,
            name + "any: a misaligned Inf is named: " + s.message);
    }
}

void TestSelfInfluenceAndAggregate() {
  std::mt19937 rng(4);
  const std::vector<Matrix> test = {Random(8, 40, rng), Random(8, 3, rng)};
  const std::vector<Matrix> train = {Random(30, 40, rng), Random(30, 3, rng)};
  const std::vector<double> w = {0.1, 3.0};
  std::vector<float> self(30);
  std::vector<double> agg(30);
  Check(tracin::SelfInfluence(Full(train), w, self.data()).ok(), "self-influence ok");
  Check(tracin::Aggregate(Full(test), Full(train), w, agg.data()).ok(), "aggregate ok");
  bool ok_self = true, ok_agg = true;
  for (std::int64_t j = 0; j < 30; ++j) {
    double e = 0, b = 0, a = 0, ab = 0;
    for (int c = 0; c < 2; ++c) {
      e += w[c] * Dot(train[c], j, train[c], j);
      b += 1e-5 * w[c] * Dot(train[c], j, train[c], j);
      for (std::int64_t i = 0; i < 8; ++i) {
        a += w[c] * Dot(test[c], i, train[c], j);
        ab += 1e-5 * w[c] * Norm(test[c], i) * Norm(train[c], j);
      }
    }
    ok_self = ok_self && std::abs(self[j] - e) <= b;
    ok_agg = ok_agg && std::abs(agg[j] - a) <= ab;
  }
  Check(ok_self, "self-influence within bound");
  Check(ok_agg, "aggregate within bound");
}

// Results that do not depend on the test rows per pass (review146): factored aggregate sums groups
// of 32 test rows in float64 for any test_block (test rows over ~20 orders of magnitude make
// another order show), and top-k with partition buffers, whose passes are cut by the selector
// budget as the threads grow, gives the same bits on 1 and 16 threads.
void TestSameBitsForAnyPassRows() {
  std::mt19937 rng(23);
  Matrix left_t = Random(100, 3, rng), right_t = Random(100, 5, rng);
  const Matrix left_x = Random(40, 3, rng), right_x = Random(40, 5, rng);
  std::uniform_real_distribution<float> exponent(-25.0f, 25.0f);
  for (std::int64_t i = 0; i < left_t.rows; ++i) {
    const float scale = std::exp(exponent(rng));
    for (std::int64_t c = 0; c < left_t.cols; ++c) left_t.data[i * left_t.cols + c] *= scale;
  }
  tracin::GradientSide t, x;
  t.factored = x.factored = true;
  t.blocks = {left_t.View(), right_t.View()};
  x.blocks = {left_x.View(), right_x.View()};
  std::vector<float> scores(100 * 40);
  Check(tracin::Scores(t, x, {0.5}, scores.data()).ok(), "factored scores for the sums");
  std::vector<double> expected(40, 0.0);
  for (std::int64_t j = 0; j < 40; ++j)
    for (std::int64_t g = 0; g < 100; g += 32) {
      double group = 0.0;
      for (std::int64_t i = g; i < std::min<std::int64_t>(g + 32, 100); ++i) group += scores[i * 40 + j];
      expected[j] += group;
    }
  bool same = true;
  for (std::int64_t block : {0, 1, 7, 33, 64, 100})
    for (int threads : {1, 3}) {
      tracin::Options o;
      o.test_block = block;
      o.num_threads = threads;
      std::vector<double> got(40);
      same = same && tracin::Aggregate(t, x, {0.5}, got.data(), o).ok() && got == expected;
    }
  Check(same, "factored aggregate: groups of 32 test rows summed in order, for any test_block and threads");

  const std::vector<Matrix> test = {Random(64, 4, rng)}, train = {Random(3000, 4, rng)};
  const std::int64_t k = 1500;
  std::vector<std::vector<float>> values;
  std::vector<std::vector<std::int64_t>> indices;
  for (int threads : {1, 16}) {
    values.emplace_back(2 * 64 * k);
    indices.emplace_back(2 * 64 * k);
    const tracin::TopKOutput out{values.back().data(), indices.back().data(), values.back().data() + 64 * k,
                                 indices.back().data() + 64 * k};
    tracin::Options o;
    o.num_threads = threads;
    Check(tracin::TopK(Full(test), Full(train), {1.0}, k, tracin::Side::kBoth, out, o).ok(), "top-k of 1500");
  }
  Check(values[0] == values[1] && indices[0] == indices[1], "top-k with cut passes: the same bits on 1 and 16 threads");
}

void TestBadInput() {
  std::mt19937 rng(5);
  std::vector<Matrix> test = {Random(4, 8, rng)};
  std::vector<Matrix> train = {Random(20, 8, rng)};
  train[0].data[13 * 8 + 2] = std::nanf("");
  train[0].data[17 * 8 + 0] = INFINITY;
  std::vector<float> out(4 * 20);
  tracin::Status s = tracin::Scores(Full(test), Full(train), {1.0}, out.data());
  Check(s.code == tracin::StatusCode::kNonFinite &&
            s.message.find("train checkpoint 0") != std::string::npos &&
            s.message.find("[13, 17]") != std::string::npos,
        "NaN/Inf names the checkpoint and rows: " + s.message);
  std::vector<Matrix> other = {Random(20, 9, rng)};
  s = tracin::Scores(Full(test), Full(other), {1.0}, out.data());
  Check(s.code == tracin::StatusCode::kInvalidArgument, "mismatched dims rejected");
  s = tracin::Scores(Full(test), Full(test), {1.0, 2.0}, out.data());
  Check(s.code == tracin::StatusCode::kInvalidArgument, "wrong weight count rejected");
  for (double bad : {static_cast<double>(NAN), static_cast<double>(INFINITY)}) {
    s = tracin::SelfInfluence(Full(train), {bad}, out.data());
    Check(s.code == tracin::StatusCode::kInvalidArgument && s.message == "weights must be finite",
          "self-influence rejects a non-finite weight: " + s.message);
  }
  s = tracin::SelfInfluence(Full(train), {1.0, 2.0}, out.data());
  Check(s.code == tracin::StatusCode::kInvalidArgument &&
            s.message == "expected one weight per checkpoint (1), got 2",
        "self-influence rejects a wrong weight count: " + s.message);
  std::vector<float> v(4 * 30);
  std::vector<std::int64_t> i(4 * 30);
  s = tracin::TopK(Full(test), Full(test), {1.0}, 30, tracin::Side::kProponents,
                   {v.data(), i.data(), nullptr, nullptr});
  Check(s.code == tracin::StatusCode::kInvalidArgument, "k beyond the train rows rejected");
}

// Rows so wide (600,000 columns) that fewer than 32 fit the packed budget: passes of fewer rows,
// on the thin micro-tile where the narrow one's padding would not fit, still exact.
void TestWideRows() {
  std::mt19937 rng(7);
  const std::vector<Matrix> test = {Random(30, 600000, rng)};
  const std::vector<Matrix> train = {Random(4, 600000, rng)};
  std::vector<double> exact, bound;
  Reference(test, train, {0.5}, &exact, &bound);
  for (tracin::Isa isa : tracin_test::RunnableIsas("wide rows")) {
    tracin::Options o;
    o.isa = isa;
    std::vector<float> out(exact.size());
    const tracin::Status s = tracin::Scores(Full(test), Full(train), {0.5}, out.data(), o);
    bool close = s.ok();
    for (std::size_t i = 0; i < out.size(); ++i) close = close && std::abs(out[i] - exact[i]) <= bound[i];
    Check(close, std::string("wide rows within the scale-aware bound, isa ") + tracin::IsaName(isa));
  }
}

// Same-sign rows of 2^20 columns (every product just above 1: 4096 slices whose float32 sums each
// round the same way) stay within the scale-aware bound, since the slices of a block are added in
// float64 (added in float32 they missed it 5x at 10^6 columns); so does a score whose slices sum to
// +3.3e38, +3.3e38 and -3.3e38 (a float32 total of the slices would overflow, the float64 one is the
// score).
void TestSlicesAddedInDouble() {
  const std::int64_t d = std::int64_t{1} << 20;
  const std::vector<Matrix> test = {Matrix{1, d, std::vector<float>(d, 1.0f)}};
  Matrix wide{3, d, std::vector<float>(3 * d)};
  for (std::int64_t k = 0; k < d; ++k) {
    wide.data[k] = 1.0f + 0.03f / 256;
    wide.data[d + k] = 1.0f + 0.1f / 256;
    wide.data[2 * d + k] = k < 512 ? 3.3e38f / 256 / 1024 : k < 768 ? -3.3e38f / 256 / 1024 : 0.0f;
  }
  const std::vector<Matrix> train = {wide};
  std::vector<double> exact, bound;
  Reference(test, train, {1024.0}, &exact, &bound);
  for (tracin::Isa isa : tracin_test::RunnableIsas("slices added in double")) {
    tracin::Options o;
    o.isa = isa;
    std::vector<float> out(exact.size());
    const tracin::Status s = tracin::Scores(Full(test), Full(train), {1024.0}, out.data(), o);
    bool close = s.ok();
    for (std::size_t i = 0; i < out.size(); ++i) close = close && std::abs(out[i] - exact[i]) <= bound[i];
    Check(close, std::string("same-sign wide rows within the scale-aware bound, isa ") + tracin::IsaName(isa) +
                     ": " + s.message);
  }
}

// A cancellation flag set before the call stops every entry point with kCancelled; one set by
// another thread during a long call stops it early.
void TestCancellation() {
  std::mt19937 rng(6);
  const std::vector<Matrix> test = {Random(40, 64, rng)};
  const std::vector<Matrix> train = {Random(300, 64, rng)};
  const std::vector<double> w = {1.0};
  std::atomic<bool> cancel{true};
  tracin::Options o;
  o.cancel = &cancel;
  std::vector<float> dense(40 * 300), pv(40 * 5), self(300);
  std::vector<std::int64_t> pi(40 * 5);
  std::vector<double> sums(300);
  Check(tracin::Scores(Full(test), Full(train), w, dense.data(), o).code == tracin::StatusCode::kCancelled,
        "Scores cancelled");
  Check(tracin::TopK(Full(test), Full(train), w, 5, tracin::Side::kProponents,
                     {pv.data(), pi.data(), nullptr, nullptr}, o)
                .code == tracin::StatusCode::kCancelled,
        "TopK cancelled");
  Check(tracin::SelfInfluence(Full(train), w, self.data(), o).code == tracin::StatusCode::kCancelled,
        "SelfInfluence cancelled");
  Check(tracin::Aggregate(Full(test), Full(train), w, sums.data(), o).code == tracin::StatusCode::kCancelled,
        "Aggregate cancelled");
  tracin::GradientSide ft, fx;
  ft.factored = fx.factored = true;
  ft.blocks = {test[0].View(), test[0].View()};
  fx.blocks = {train[0].View(), train[0].View()};
  Check(tracin::Aggregate(ft, fx, w, sums.data(), o).code == tracin::StatusCode::kCancelled,
        "factored Aggregate cancelled");

  // The same calls with the flag clear give the results of calls without one, bit for bit.
  cancel = false;
  std::vector<float> plain(dense.size());
  Check(tracin::Scores(Full(test), Full(train), w, dense.data(), o).ok(), "Scores with a clear flag");
  Check(tracin::Scores(Full(test), Full(train), w, plain.data()).ok(), "Scores without a flag");
  Check(dense == plain, "a clear cancellation flag changes no result bit");

  // Mid-call: about 2e11 multiply-adds (seconds), cancelled after 50 ms.
  const std::vector<Matrix> big_test = {{1024, 256, std::vector<float>(1024 * 256, 0.5f)}};
  const std::vector<Matrix> big_train = {{200000, 256, std::vector<float>(200000 * 256, 0.25f)}};
  std::vector<float> bv(1024), bs(1024);
  std::vector<std::int64_t> bi(1024);
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    cancel = true;
  });
  const auto start = std::chrono::steady_clock::now();
  const tracin::Status s = tracin::TopK(Full(big_test), Full(big_train), w, 1, tracin::Side::kBoth,
                                        {bv.data(), bi.data(), bs.data(), bi.data()}, o);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  canceller.join();
  Check(s.code == tracin::StatusCode::kCancelled, "long TopK cancelled from another thread: " + s.message);
  Check(seconds < 1.0, "cancelled TopK returned within a second (" + std::to_string(seconds) + " s)");
}

#if defined(__linux__)
// A Ctrl-C that lands while the kernel reads a given row, without timing: the rows from that one
// on are mapped PROT_NONE, and the first read of them faults into this handler, which sets the
// cancellation flag (as the Python layer's SIGINT handler does), makes the rows readable and
// returns, so the read is retried and succeeds.
std::atomic<bool> touch_cancel{false};
char* guard_begin = nullptr;
std::size_t guard_bytes = 0;

void CancelOnTouch(int sig, siginfo_t* info, void*) {
  char* at = static_cast<char*>(info->si_addr);
  if (at >= guard_begin && at < guard_begin + guard_bytes) {
    touch_cancel = true;  // before the rows open: no thread reads on past them with the flag clear
    if (mprotect(guard_begin, guard_bytes, PROT_READ | PROT_WRITE) == 0) return;
  }
  ::signal(sig, SIG_DFL);  // any other fault: crash as usual once the handler returns
}

// Column sums check the flag before every row of a band (a thread's share of the columns over ALL
// test rows), not only between bands: cancelled while reading row 8 of 32 rows of ones (one page
// each), every band stops after it, so each column sums rows 0..8 (9), or none for a band that had
// not started (two threads: it is handed out after the flag). Without the per-row check the
// band's sums run to 32.
void TestColumnSumsStopAtTheRowOfTheCancellation() {
  const std::int64_t page = sysconf(_SC_PAGESIZE);
  const std::int64_t m = 32, cols = 1024, cut = 8;
  const std::int64_t stride = std::max<std::int64_t>(cols, page / 4);  // a row starts a page
  const std::size_t row_bytes = static_cast<std::size_t>(stride) * 4, bytes = row_bytes * m;
  void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  Check(memory != MAP_FAILED, "column-sum cancellation: mmap of the test rows");
  if (memory == MAP_FAILED) return;
  float* data = static_cast<float*>(memory);
  std::fill(data, data + m * stride, 1.0f);
  struct sigaction action = {}, previous = {};
  action.sa_sigaction = CancelOnTouch;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, &previous);
  tracin::GradientSide test;
  test.blocks = {{data, m, cols, stride, tracin::DType::kFloat32}};
  for (const int threads : {1, 2}) {
    guard_begin = static_cast<char*>(memory) + cut * row_bytes;
    guard_bytes = row_bytes * (m - cut);
    touch_cancel = false;
    Check(mprotect(guard_begin, guard_bytes, PROT_NONE) == 0, "column-sum cancellation: mprotect");
    tracin::Options o;
    o.num_threads = threads;
    o.cancel = &touch_cancel;
    std::vector<double> sums(static_cast<std::size_t>(cols), 0.0);
    const tracin::Status s = tracin::AggregateColumnSums(test, {sums.data()}, o);
    const std::string what = "column sums cancelled at row " + std::to_string(cut) + ", " +
                             std::to_string(threads) + " thread(s): ";
    Check(touch_cancel.load(), what + "the guarded rows were read (the flag was set)");
    Check(s.code == tracin::StatusCode::kCancelled, what + "kCancelled, got '" + s.message + "'");
    const auto stopped = [&](double v) { return v == cut + 1 || (threads > 1 && v == 0.0); };
    Check(std::all_of(sums.begin(), sums.end(), stopped) &&
              std::count(sums.begin(), sums.end(), static_cast<double>(cut + 1)) > 0,
          what + "each column sums rows 0.." + std::to_string(cut) + " (or none), column 0 sums " +
              std::to_string(sums[0]) + " rows, the last " + std::to_string(sums.back()));
  }
  sigaction(SIGSEGV, &previous, nullptr);
  munmap(memory, bytes);
}
#endif

// The final sort of a large top-k pool (k = n beyond 2^16 candidates, where it goes in halves)
// checks the cancellation flag itself: a flag already set leaves it unsorted and unwritten
// (WriteBest false, output untouched); a clear one sorts it best first, ties to the smaller index.
void TestLargePoolSortIsCancellable() {
  const std::int64_t n = 200000;  // > 2^16: SortChecked splits before sorting
  std::mt19937 rng(15);
  std::uniform_int_distribution<int> value(-1000, 1000);  // many ties
  std::vector<tracin::detail::Candidate> pool(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) pool[static_cast<std::size_t>(i)] = {static_cast<float>(value(rng)), i};
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<tracin::detail::Candidate> expected = pool;
  std::sort(expected.begin(), expected.end(), tracin::detail::Better);
  std::vector<float> values(static_cast<std::size_t>(n), 7.0f);
  std::vector<std::int64_t> indices(static_cast<std::size_t>(n), -1);
  std::atomic<bool> cancel{true};
  std::vector<tracin::detail::Candidate> cancelled = pool;
  Check(!tracin::detail::WriteBest(&cancelled, n, false, values.data(), indices.data(), &cancel),
        "a k = n selection of 200000 candidates with the flag set reports the cancellation");
  Check(std::all_of(values.begin(), values.end(), [](float v) { return v == 7.0f; }) &&
            std::all_of(indices.begin(), indices.end(), [](std::int64_t i) { return i == -1; }),
        "a cancelled k = n selection writes no output");
  cancel = false;
  Check(tracin::detail::WriteBest(&pool, n, true, values.data(), indices.data(), &cancel),
        "a k = n selection of 200000 candidates with the flag clear completes");
  bool same = true;
  for (std::size_t j = 0; j < expected.size(); ++j)
    same = same && values[j] == -expected[j].value && indices[j] == expected[j].index;
  Check(same, "a k = n selection of 200000 candidates: best first, ties to the smaller index (negated output)");
}

// A train_block (or test_block) beyond the rows is the rows: values near INT64_MAX neither overflow
// the tile's size nor leave top-k slots unwritten, and give the default call's bits.
void TestBlocksBeyondTheRows() {
  std::mt19937 rng(11);
  const std::vector<Matrix> test = {Random(4, 8, rng)};
  const std::vector<Matrix> train = {Random(10, 8, rng)};
  const std::int64_t k = 3;
  std::vector<float> pv(4 * k), ov(4 * k);
  std::vector<std::int64_t> pi(4 * k), oi(4 * k);
  Check(tracin::TopK(Full(test), Full(train), {1.0}, k, tracin::Side::kBoth,
                     {pv.data(), pi.data(), ov.data(), oi.data()})
            .ok(),
        "top-k with default blocks");
  const std::int64_t max = INT64_MAX;
  for (std::int64_t block : {std::int64_t{1} << 22, std::int64_t{1} << 62, max - 11, max - 7, max}) {
    tracin::Options o;
    o.train_block = block;
    o.test_block = block;
    std::vector<float> bv(4 * k, -1.0f), bo(4 * k, -1.0f);
    std::vector<std::int64_t> bi(4 * k, -1), bj(4 * k, -1);
    const tracin::Status s = tracin::TopK(Full(test), Full(train), {1.0}, k, tracin::Side::kBoth,
                                          {bv.data(), bi.data(), bo.data(), bj.data()}, o);
    Check(s.ok() && bv == pv && bi == pi && bo == ov && bj == oi,
          "train_block = test_block = " + std::to_string(block) + " gives the default top-k: " + s.message);
    std::vector<float> dense(4 * 10), plain(4 * 10);
    Check(tracin::Scores(Full(test), Full(train), {1.0}, dense.data(), o).ok() &&
              tracin::Scores(Full(test), Full(train), {1.0}, plain.data()).ok() && dense == plain,
          "train_block = " + std::to_string(block) + " gives the default scores");
  }
}

// Null outputs, an unknown DType and an unknown Side are kInvalidArgument naming them, not a crash
// or garbage with Ok; a null output for a result with no values is fine.
void TestBadOutputsAndEnums() {
  std::mt19937 rng(12);
  const std::vector<Matrix> test = {Random(4, 8, rng)};
  const std::vector<Matrix> train = {Random(10, 8, rng)};
  const auto invalid = [](const tracin::Status& s, const char* word) {
    return s.code == tracin::StatusCode::kInvalidArgument && s.message.find(word) != std::string::npos;
  };
  tracin::Status s = tracin::Scores(Full(test), Full(train), {1.0}, nullptr);
  Check(invalid(s, "out"), "Scores with a null out: " + s.message);
  s = tracin::SelfInfluence(Full(train), {1.0}, nullptr);
  Check(invalid(s, "out"), "SelfInfluence with a null out: " + s.message);
  s = tracin::Aggregate(Full(test), Full(train), {1.0}, nullptr);
  Check(invalid(s, "out"), "Aggregate with a null out: " + s.message);
  tracin::GradientSide ft, fx;
  ft.factored = fx.factored = true;
  ft.blocks = {test[0].View(), test[0].View()};
  fx.blocks = {train[0].View(), train[0].View()};
  s = tracin::Aggregate(ft, fx, {1.0}, nullptr);
  Check(invalid(s, "out"), "factored Aggregate with a null out: " + s.message);
  const Matrix no_rows{0, 8, {}};
  Check(tracin::Scores(Full({no_rows}), Full(train), {1.0}, nullptr).ok(), "Scores of no test rows takes a null out");
  Check(tracin::SelfInfluence(Full({no_rows}), {1.0}, nullptr).ok(), "SelfInfluence of no rows takes a null out");

  std::vector<float> out(4 * 10, 0.0f), self(10);
  std::vector<double> sums(10);
  for (int code : {3, -1}) {
    tracin::GradientSide bad = Full(test);
    bad.blocks[0].dtype = static_cast<tracin::DType>(code);
    s = tracin::Scores(bad, Full(train), {1.0}, out.data());
    Check(invalid(s, "test") && invalid(s, "dtype"), "Scores with an unknown test dtype: " + s.message);
    bad = Full(train);
    bad.blocks[0].dtype = static_cast<tracin::DType>(code);
    s = tracin::SelfInfluence(bad, {1.0}, self.data());
    Check(invalid(s, "train") && invalid(s, "dtype"), "SelfInfluence with an unknown dtype: " + s.message);
    s = tracin::Aggregate(Full(test), bad, {1.0}, sums.data());
    Check(invalid(s, "train") && invalid(s, "dtype"), "Aggregate with an unknown train dtype: " + s.message);
  }

  std::vector<float> v(4 * 2, 0.0f);
  std::vector<std::int64_t> i(4 * 2, 0);
  for (int code : {3, -1}) {
    s = tracin::TopK(Full(test), Full(train), {1.0}, 2, static_cast<tracin::Side>(code),
                     {v.data(), i.data(), v.data(), i.data()});
    Check(invalid(s, "side"), "TopK with an unknown side: " + s.message);
  }
}

// num_threads far above the work (INT_MAX for a 4 x 10 problem) starts only the threads that get
// tasks and their scratch: the default result, not "out of memory".
void TestHugeThreadCount() {
  std::mt19937 rng(13);
  const std::vector<Matrix> test = {Random(4, 8, rng)};
  const std::vector<Matrix> train = {Random(10, 8, rng)};
  tracin::Options o;
  o.num_threads = INT32_MAX;
  std::vector<float> dense(4 * 10), plain(4 * 10), pv(4 * 3), qv(4 * 3);
  std::vector<std::int64_t> pi(4 * 3), qi(4 * 3);
  tracin::Status s = tracin::Scores(Full(test), Full(train), {1.0}, dense.data(), o);
  Check(s.ok() && tracin::Scores(Full(test), Full(train), {1.0}, plain.data()).ok() && dense == plain,
        "Scores with num_threads = INT_MAX: " + s.message);
  s = tracin::TopK(Full(test), Full(train), {1.0}, 3, tracin::Side::kProponents, {pv.data(), pi.data(), nullptr, nullptr},
                   o);
  Check(s.ok() && tracin::TopK(Full(test), Full(train), {1.0}, 3, tracin::Side::kProponents,
                               {qv.data(), qi.data(), nullptr, nullptr})
                      .ok() &&
            pv == qv && pi == qi,
        "TopK with num_threads = INT_MAX: " + s.message);
}

// The final selection of a pass (k = n: every train row ranked for every test row) checks the
// cancellation flag while it runs: cancelled at 40 % and 70 % of an uncancelled call's time (the
// selection dominates for one column), the call returns kCancelled within a fraction of it (the old
// per-pass check let it run on ~0.3-0.6 of the call, >= 0.6 s here). Robust to the runner's load
// changing: test rows are added until the fastest of 3 calls takes >= 2 s, and an attempt whose
// call finishes Ok before the flag (the runner got faster) is retried with that call's time, at
// most 3 times per share; at least one attempt must have seen the flag. Its pools (60000) are sorted
// whole: the check within a larger pool's sort is TestLargePoolSortIsCancellable's.
void TestCancellationDuringTheSelection() {
  const std::int64_t n = 60000;
  std::mt19937 rng(14);
  const std::vector<Matrix> train = {Random(n, 1, rng)};
  std::vector<Matrix> test;
  std::vector<float> pv, ov;
  std::vector<std::int64_t> pi, oi;
  tracin::Options o;
  o.num_threads = 2;
  bool flagged = false;  // whether the last run's flag was set before it returned
  const auto run = [&](double cancel_after, tracin::Status* status) {
    std::atomic<bool> cancel{false};
    o.cancel = &cancel;
    std::thread canceller;
    if (cancel_after > 0)
      canceller = std::thread([&] {
        std::this_thread::sleep_for(std::chrono::duration<double>(cancel_after));
        cancel = true;
      });
    const auto start = std::chrono::steady_clock::now();
    *status = tracin::TopK(Full(test), Full(train), {1.0}, n, tracin::Side::kBoth,
                           {pv.data(), pi.data(), ov.data(), oi.data()}, o);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    flagged = cancel;
    if (canceller.joinable()) canceller.join();
    o.cancel = nullptr;
    return seconds;
  };
  tracin::Status s;
  std::int64_t m = 32;
  double whole = 0;
  for (;;) {
    test = {Random(m, 1, rng)};
    pv.assign(static_cast<std::size_t>(m * n), 0.0f);
    ov.assign(pv.size(), 0.0f);
    pi.assign(pv.size(), 0);
    oi.assign(pv.size(), 0);
    whole = 1e9;
    for (int i = 0; i < 3; ++i) {
      whole = std::min(whole, run(0, &s));
      Check(s.ok(), "k = n top-k without cancelling: " + s.message);
      if (!s.ok()) return;
    }
    if (whole >= 2.0 || m >= 512) break;  // 512 x 60000 (both sides): ~0.7 GB of output
    m = std::min<std::int64_t>(512, static_cast<std::int64_t>(m * std::max(2.0, 2.5 / std::max(whole, 1e-3))));
  }
  int cancelled = 0;
  for (double share : {0.4, 0.7}) {
    for (int attempt = 0; attempt < 3; ++attempt) {
      const double at = share * whole;
      const double seconds = run(at, &s);
      if (s.ok() && !flagged) {  // finished before the flag: the runner got faster; retry with this call's time
        whole = std::min(whole, seconds);
        continue;
      }
      // Ok with the flag set is right only when the flag came after the last check (the call's end).
      ++cancelled;
      Check(s.ok() || s.code == tracin::StatusCode::kCancelled,
            "k = n top-k cancelled at " + std::to_string(at) + " s: " + s.message);
      Check(seconds - at < std::max(0.25, 0.1 * whole),
            "k = n top-k stopped " + std::to_string(seconds - at) + " s after the cancellation at " +
                std::to_string(at) + " s (whole call " + std::to_string(whole) + " s, " + std::to_string(m) +
                " test rows)");
      break;
    }
  }
  Check(cancelled > 0, "k = n top-k: every call finished before its cancellation (whole call " +
                           std::to_string(whole) + " s): the runner kept speeding up");
}
// Aggregate of the same rows as full and as factored gradients (right factors of ones) agrees when
// single pair scores exceed float32's range but the sums do not (or cancel): the factored path
// falls back to float64 pair sums instead of reporting an overflow the full path never sees.
// Plain and cosine scores (normalize 1), over two checkpoints.
void TestAggregateLayoutsAgree() {
  const Matrix test{3, 2, {1e20f, 2.0f, -1e20f, 2.0f, 3e19f, -1.0f}};
  const Matrix train{2, 2, {1e20f, 0.5f, 1.0f, -4.0f}};
  const Matrix ones_test{3, 1, std::vector<float>(3, 1.0f)}, ones_train{2, 1, std::vector<float>(2, 1.0f)};
  tracin::GradientSide ft, fx;
  ft.factored = fx.factored = true;
  ft.blocks = {test.View(), ones_test.View(), test.View(), ones_test.View()};
  fx.blocks = {train.View(), ones_train.View(), train.View(), ones_train.View()};
  const std::vector<double> w = {0.5, 0.25};
  for (std::int64_t normalize : {0, 1}) {
    tracin::Options o;
    o.normalize = normalize;
    std::vector<double> full(2), factored(2), exact(2, 0.0);
    const tracin::Status a = tracin::Aggregate(Full({test, test}), Full({train, train}), w, full.data(), o);
    const tracin::Status b = tracin::Aggregate(ft, fx, w, factored.data(), o);
    bool close = a.ok() && b.ok();
    for (std::int64_t i = 0; i < 2; ++i) {
      for (std::int64_t t = 0; t < 3; ++t) {
        const double cosine = normalize ? 1.0 / (Norm(test, t) * Norm(train, i)) : 1.0;
        exact[i] += (w[0] + w[1]) * Dot(test, t, train, i) * cosine;
      }
      // plain: float64 sums (1e-12 of the largest pair score); cosine: no overflow, float32 tiles
      // within DESIGN.md's 1e-5 bound per pair (each at most the weights' sum, 3 test rows)
      const double tolerance = normalize ? 1e-5 * 0.75 * 3 : 1e-12 * 1e40;
      close = close && std::abs(full[i] - exact[i]) <= tolerance && std::abs(factored[i] - exact[i]) <= tolerance;
    }
    Check(close, "Aggregate full == factored == float64 when pair scores overflow float32, normalize " +
                     std::to_string(normalize) + ": " + a.message + " / " + b.message + " (" +
                     std::to_string(full[0]) + ", " + std::to_string(factored[0]) + ", " + std::to_string(exact[0]) +
                     ")");
  }
}

// review154 F3: factored aggregate recomputes in float64 only the train rows with a float32 pair score
// beyond range, so every row's sum is the same bits whether the train rows come in one call or in
// pieces, and the other rows keep the float32 path's sums. Train row 7's pair scores with test rows 0
// and 1 overflow (1e20 x 1e20) and cancel.
void TestAggregateFallbackPerTrainRow() {
  std::mt19937 rng(154);
  const std::int64_t m = 40, n = 90;
  Matrix lt = Random(m, 4, rng), rt = Random(m, 3, rng), lx = Random(n, 4, rng), rx = Random(n, 3, rng);
  for (std::int64_t k = 0; k < 4; ++k) lt.data[4 + k] = -lt.data[k];
  for (std::int64_t k = 0; k < 3; ++k) rt.data[3 + k] = rt.data[k];
  for (std::int64_t t = 2; t < m; ++t) lt.data[t * 4] = 0.0f;
  const auto side = [](const Matrix& l, const Matrix& r, std::int64_t first, std::int64_t rows) {
    tracin::GradientSide s;
    s.factored = true;
    s.blocks = {{l.data.data() + first * l.cols, rows, l.cols, l.cols, tracin::DType::kFloat32},
                {r.data.data() + first * r.cols, rows, r.cols, r.cols, tracin::DType::kFloat32}};
    return s;
  };
  std::vector<double> tame(n);
  Check(tracin::Aggregate(side(lt, rt, 0, m), side(lx, rx, 0, n), {1.0}, tame.data()).ok(), "aggregate ok");
  for (std::int64_t k = 0; k < 4; ++k) lx.data[7 * 4 + k] = k == 0 ? 1e20f : 0.0f;
  for (std::int64_t k = 0; k < 3; ++k) rx.data[7 * 3 + k] *= 1e20f;
  for (int threads : {1, 2}) {
    tracin::Options o;
    o.num_threads = threads;
    std::vector<double> whole(n), pieced(n);
    bool ok = tracin::Aggregate(side(lt, rt, 0, m), side(lx, rx, 0, n), {1.0}, whole.data(), o).ok();
    for (std::int64_t first = 0; first < n; first += 20)
      ok = ok && tracin::Aggregate(side(lt, rt, 0, m), side(lx, rx, first, std::min<std::int64_t>(20, n - first)),
                                   {1.0}, pieced.data() + first, o).ok();
    bool others = true;
    for (std::int64_t i = 0; i < n; ++i) others = others && (i == 7 || whole[i] == tame[i]);
    double exact = 0.0, magnitude = 0.0;
    for (std::int64_t t = 0; t < m; ++t) {
      const double pair = Dot(lt, t, lx, 7) * Dot(rt, t, rx, 7);
      exact += pair;
      magnitude += std::abs(pair);
    }
    Check(ok && whole == pieced && others && std::abs(whole[7] - exact) <= 1e-12 * magnitude,
          "factored aggregate: only the overflowing train row is summed in float64, the same bits in pieces, " +
              std::to_string(threads) + " threads");
  }
}

// review154 F1: a test row whose largest weighted value is in [2^127, 2^128) gets the same exponent (and
// scores) alone as beside a zero row, whose pass used to be the only one to lower it.
void TestRowNearFloat32sTop() {
  const Matrix row{1, 2, {std::ldexp(1.0f, 127), std::ldexp(1.0f, -100) * (1.0f + std::ldexp(1.0f, -23))}};
  const Matrix pair{2, 2, {row.data[0], row.data[1], 0.0f, 0.0f}};
  const Matrix train{2, 2, {std::ldexp(1.0f, -127), 0.0f, 0.0f, std::ldexp(1.0f, 100)}};
  std::vector<float> alone(2), beside(4);
  const bool ok = tracin::Scores(Full({row}), Full({train}), {1.0}, alone.data()).ok() &&
                  tracin::Scores(Full({pair}), Full({train}), {1.0}, beside.data()).ok();
  Check(ok && alone[0] == beside[0] && alone[1] == beside[1],
        "a row with a value of 2^127 has the same scores alone and beside a zero row");
}


// Aggregate of full gradients in two steps (AggregateColumnSums over test chunks in row order, then
// AggregateFromColumnSums over train pieces) gives Aggregate's bits for any cut of either side and
// any thread count, plain and cosine; NaN / Inf name their side, checkpoint and rows; bad input and
// Options::cancel are refused.
void TestAggregateInTwoSteps() {
  std::mt19937 rng(17);
  const std::int64_t m = 301, n = 257;
  const std::int64_t widths[] = {150, 9};
  std::vector<Matrix> test, train;
  for (std::int64_t w : widths) {
    test.push_back(Random(m, w, rng));
    train.push_back(Random(n, w, rng));
  }
  const std::vector<double> w = {0.7, -1.3};
  const auto rows = [](const std::vector<Matrix>& ms, std::int64_t first, std::int64_t count) {
    tracin::GradientSide s = Full(ms);
    for (tracin::MatrixView& b : s.blocks) {
      b.data = static_cast<const float*>(b.data) + first * b.cols;
      b.rows = count;
    }
    return s;
  };
  for (std::int64_t normalize : {0, 1, 2}) {
    tracin::Options o;
    o.normalize = normalize;
    std::vector<double> expected(static_cast<std::size_t>(n));
    Check(tracin::Aggregate(Full(test), Full(train), w, expected.data(), o).ok(), "Aggregate ok");
    for (std::int64_t chunk : {std::int64_t{1}, std::int64_t{64}, std::int64_t{100}, m})
      for (int threads : {1, 3}) {
        o.num_threads = threads;
        std::vector<std::vector<double>> sums = {std::vector<double>(150), std::vector<double>(9)};
        const std::vector<double*> into = {sums[0].data(), sums[1].data()};
        bool ok = true;
        for (std::int64_t a = 0; a < m; a += chunk)
          ok = ok && tracin::AggregateColumnSums(rows(test, a, std::min(chunk, m - a)), into, o).ok();
        std::vector<double> got(static_cast<std::size_t>(n));
        for (std::int64_t i = 0; i < n; i += 50)
          ok = ok && tracin::AggregateFromColumnSums({sums[0].data(), sums[1].data()},
                                                     rows(train, i, std::min<std::int64_t>(50, n - i)), w,
                                                     got.data() + i, o)
                         .ok();
        Check(ok && std::memcmp(got.data(), expected.data(), expected.size() * sizeof(double)) == 0,
              "two-step aggregate: Aggregate's bits, normalize " + std::to_string(normalize) + ", test chunks of " +
                  std::to_string(chunk) + ", threads " + std::to_string(threads));
      }
  }
  std::vector<double> s0(150), s1(9), out(static_cast<std::size_t>(n));
  const std::vector<double*> into = {s0.data(), s1.data()};
  std::vector<Matrix> bad = test;
  bad[1].data[5 * 9 + 2] = std::nanf("");
  tracin::Status s = tracin::AggregateColumnSums(Full(bad), into);
  Check(s.code == tracin::StatusCode::kNonFinite && s.message.find("test checkpoint 1") != std::string::npos &&
            s.message.find("rows [5]") != std::string::npos,
        "column sums name a NaN test row: " + s.message);
  std::fill(s0.begin(), s0.end(), 0.0);
  std::fill(s1.begin(), s1.end(), 0.0);
  bad = train;
  bad[0].data[9 * 150] = INFINITY;
  s = tracin::AggregateFromColumnSums({s0.data(), s1.data()}, Full(bad), w, out.data());
  Check(s.code == tracin::StatusCode::kNonFinite && s.message.find("train checkpoint 0") != std::string::npos &&
            s.message.find("rows [9]") != std::string::npos,
        "products name an Inf train row: " + s.message);
  s = tracin::AggregateColumnSums(Full(test), {s0.data()});
  Check(s.code == tracin::StatusCode::kInvalidArgument, "column sums with one array for two checkpoints: " + s.message);
  s = tracin::AggregateFromColumnSums({s0.data(), nullptr}, Full(train), w, out.data());
  Check(s.code == tracin::StatusCode::kInvalidArgument, "products with a null sum: " + s.message);
  tracin::GradientSide factored{true, {test[0].View(), test[1].View()}};
  s = tracin::AggregateColumnSums(factored, {s0.data()});
  Check(s.code == tracin::StatusCode::kInvalidArgument, "column sums of factored rows refused: " + s.message);
  std::atomic<bool> cancel{true};
  tracin::Options o;
  o.cancel = &cancel;
  Check(tracin::AggregateColumnSums(Full(test), into, o).code == tracin::StatusCode::kCancelled,
        "column sums cancelled");
  Check(tracin::AggregateFromColumnSums({s0.data(), s1.data()}, Full(train), w, out.data(), o).code ==
            tracin::StatusCode::kCancelled,
        "products cancelled");
}

// Aggregate's float64 dot products (KernelTable::dot): every instruction set gives the bits of the
// contract in kernels.hpp (product k rounded, then added to partial sum k % 16, the sums carried on
// from their values on entry), for lengths around the 16-value step; and Aggregate itself gives the
// same bits for every instruction set and thread count, from float32 rows read in place (aligned),
// copied (misaligned) and converted (float16), plain and cosine, within a float64 bound of the exact
// sums.
void TestAggregateDotSameBitsEveryIsa() {
  std::mt19937 rng(11);
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> exponent(-40, 40);
  for (std::int64_t n : {0, 1, 7, 15, 16, 17, 33, 256, 1000, 1023}) {
    std::vector<double> a(static_cast<std::size_t>(n)), start(16);
    std::vector<float> x(static_cast<std::size_t>(n));
    for (double& v : a) v = std::ldexp(normal(rng), exponent(rng));
    for (float& v : x) v = static_cast<float>(std::ldexp(normal(rng), exponent(rng) / 2));
    for (double& v : start) v = normal(rng);
    std::vector<double> expected = start;
    for (std::int64_t k = 0; k < n; ++k) {
      volatile double product = a[k] * static_cast<double>(x[k]);  // rounded before the add
      expected[k % 16] += product;
    }
    for (tracin::Isa isa : tracin_test::RunnableIsas("KernelTable::dot")) {
      std::vector<double> sums = start;
      tracin::detail::KernelsFor(isa).dot(a.data(), x.data(), n, sums.data());
      Check(std::memcmp(sums.data(), expected.data(), 16 * sizeof(double)) == 0,
            std::string("KernelTable::dot: the contract's bits, n ") + std::to_string(n) + ", isa " +
                tracin::IsaName(isa));
    }
  }

  // Checkpoints: float32 (aligned, read in place), float32 at a misaligned address, float16.
  const std::int64_t m = 5, n = 600;
  const std::int64_t widths[] = {1000, 37, 70};
  std::vector<Matrix> test, train;
  for (std::int64_t w : widths) {
    test.push_back(Random(m, w, rng));
    train.push_back(Random(n, w, rng));
  }
  std::vector<char> misaligned(static_cast<std::size_t>(n * widths[1]) * 4 + 1);
  std::memcpy(misaligned.data() + 1, train[1].data.data(), train[1].data.size() * 4);
  std::vector<std::uint16_t> half(static_cast<std::size_t>(n * widths[2]));
  for (std::size_t i = 0; i < half.size(); ++i) {
    // round to float16 by its bits: a float of 10 mantissa bits within float16's normal range
    const float v = std::ldexp(std::round(std::ldexp(train[2].data[i], 8)), -8);
    train[2].data[i] = v;
    std::uint32_t bits;
    std::memcpy(&bits, &v, 4);
    const std::uint32_t sign = (bits >> 16) & 0x8000u;
    const int e = static_cast<int>((bits >> 23) & 0xff) - 127;
    half[i] = v == 0.0f ? static_cast<std::uint16_t>(sign)
                        : static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(e + 15) << 10 |
                                                     ((bits >> 13) & 0x3ffu));
  }
  tracin::GradientSide train_side = Full(train);
  train_side.blocks[1].data = misaligned.data() + 1;
  train_side.blocks[2] = {half.data(), n, widths[2], widths[2], tracin::DType::kFloat16};
  const std::vector<double> w = {0.5, -3.0, 1e-3};
  for (std::int64_t normalize : {0, 3}) {
    std::vector<double> first;
    bool close = true;
    for (tracin::Isa isa : tracin_test::RunnableIsas("Aggregate dot"))
      for (int threads : {1, 3}) {
        tracin::Options o;
        o.isa = isa;
        o.num_threads = threads;
        o.normalize = normalize;
        std::vector<double> out(static_cast<std::size_t>(n));
        const tracin::Status s = tracin::Aggregate(Full(test), train_side, w, out.data(), o);
        Check(s.ok(), "Aggregate ok: " + s.message);
        if (first.empty()) {
          first = out;
          for (std::int64_t j = 0; j < n; ++j) {
            double exact = 0, scale = 0;
            for (std::int64_t t = 0; t < m; ++t) {
              double dot = 0, test_norm = 0, train_norm = 0, abs_sum = 0;
              for (std::size_t c = 0; c < test.size(); ++c) {
                dot += w[c] * Dot(test[c], t, train[c], j);
                test_norm += Dot(test[c], t, test[c], t);
                train_norm += Dot(train[c], j, train[c], j);
                abs_sum += std::abs(w[c]) * Norm(test[c], t) * Norm(train[c], j);
              }
              const double cosine = normalize ? 1.0 / std::sqrt(test_norm * train_norm) : 1.0;
              exact += dot * cosine;
              scale += abs_sum * cosine;
            }
            close = close && std::abs(out[j] - exact) <= 1e-12 * scale;
          }
        }
        Check(std::memcmp(first.data(), out.data(), out.size() * sizeof(double)) == 0,
              std::string("Aggregate: the same bits for every isa and thread count, isa ") + tracin::IsaName(isa) +
                  ", threads " + std::to_string(threads) + ", normalize " + std::to_string(normalize));
      }
    Check(close, "Aggregate within 1e-12 of the float64 sums, normalize " + std::to_string(normalize));
  }
}


// A score whose float32 partial sums overflow although the score itself fits float32 (a first slice
// of 192 products +v and 64 products -v, v = 3.3e38 / 128: its float32 chain passes float32's largest
// value at the 132nd product), and a score beyond float32 in the middle of many rows: the error says
// a score or a partial sum overflowed and names the first such (test, train) pair, the same one for
// every thread count and block size.
void TestOverflowNamesThePair() {
  const std::int64_t d = 768;
  Matrix test{1, d, std::vector<float>(d, 1.0f)};
  Matrix train{2, d, std::vector<float>(2 * d, 1.0f)};
  const float v = 3.3e38f / 128;
  for (std::int64_t k = 0; k < d; ++k) train.data[k] = k < 192 ? v : k < 256 ? -v : 0.0f;
  std::vector<float> out(2);
  tracin::Status s = tracin::Scores(Full({test}), Full({train}), {1.0}, out.data());
  Check(s.code == tracin::StatusCode::kNonFinite &&
            s.message.find("a score or one of its partial sums") != std::string::npos &&
            s.message.find("test row 0 and train row 0") != std::string::npos,
        "partial-sum overflow reported as such, naming the pair: " + s.message);

  std::mt19937 rng(12);
  Matrix many_test = Random(40, 20, rng), many_train = Random(3000, 20, rng);
  for (std::int64_t k = 0; k < 20; ++k) {
    many_test.data[37 * 20 + k] = 1e19f;
    many_train.data[2100 * 20 + k] = 1e19f;
    many_train.data[2900 * 20 + k] = 1e19f;
  }
  for (int threads : {1, 2, 5})
    for (std::int64_t block : {0, 7, 64}) {
      tracin::Options o;
      o.num_threads = threads;
      o.train_block = block;
      o.test_block = block;
      std::vector<float> dense(40 * 3000);
      s = tracin::Scores(Full({many_test}), Full({many_train}), {1.0}, dense.data(), o);
      Check(s.code == tracin::StatusCode::kNonFinite &&
                s.message.find("first for test row 37 and train row 2100;") != std::string::npos,
            "overflow names the first pair, threads " + std::to_string(threads) + ", block " +
                std::to_string(block) + ": " + s.message);
    }

  // Self-influence is summed in float64 and only its cast to float32 overflows: the error names the
  // first train rows where it does (not a pair score's partial sums), for any thread count.
  for (int threads : {1, 2}) {
    tracin::Options o;
    o.num_threads = threads;
    std::vector<float> self(3000);
    s = tracin::SelfInfluence(Full({many_train}), {1.0}, self.data(), o);
    Check(s.code == tracin::StatusCode::kNonFinite &&
              s.message.rfind("self-influence overflowed float32 for train rows [2100, 2900] although", 0) == 0 &&
              s.message.find("partial sums") == std::string::npos,
          "self-influence overflow names its rows, threads " + std::to_string(threads) + ": " + s.message);
  }
}


// Cosine scores of train rows whose norms are far outside float32's comfortable range: below 2^-64
// (subnormal values, norm ~1e-40; normal values, norm ~1e-24) and above 2^64 (~1e31, ~6e38, whose
// float32 inverse norm is subnormal), full gradients and factored (tiny left x small right, whose
// factor products are subnormal; huge left x subnormal right; huge x huge, whose products overflow;
// a zero left factor with a huge right one), and a test row of subnormal values. The kernel
// multiplies such train rows by powers of two as it loads them: within the bound of the float64
// cosine scores, the same bits for any thread count and block size, Scores and Aggregate, runs of 1
// and 2 checkpoints.
void TestCosineRowsOfExtremeNorms() {
  std::mt19937 rng(13);
  const std::int64_t m = 6, n = 40;
  const auto scale_row = [](Matrix& x, std::int64_t row, float factor) {
    for (std::int64_t k = 0; k < x.cols; ++k) x.data[row * x.cols + k] *= factor;
  };
  for (bool factored : {false, true}) {
    // blocks: full, checkpoints of 300 and 20 columns; factored, (30, 10) and (12, 4)
    const std::vector<std::int64_t> cols = factored ? std::vector<std::int64_t>{30, 10, 12, 4}
                                                    : std::vector<std::int64_t>{300, 20};
    std::vector<Matrix> test, train;
    for (std::int64_t c : cols) {
      test.push_back(Random(m, c, rng));
      train.push_back(Random(n, c, rng));
    }
    if (!factored) {
      for (std::size_t b = 0; b < 2; ++b) {
        scale_row(train[b], 3, 1e-41f);  // subnormal values
        scale_row(train[b], 5, 1e-25f);
        scale_row(train[b], 8, 1e30f);
        scale_row(train[b], 9, 2e37f);
        scale_row(test[b], 2, 1e-41f);
      }
      scale_row(train[0], 11, 1e-41f);  // only in checkpoint 0 (a run of its own with normalize 1)
    } else {
      for (std::size_t c = 0; c < 2; ++c) {
        scale_row(train[2 * c], 2, 1e-30f);
        scale_row(train[2 * c + 1], 2, 1e-12f);
        scale_row(train[2 * c], 4, 1e20f);
        scale_row(train[2 * c + 1], 4, 1e-42f);
        scale_row(train[2 * c], 6, 1e25f);
        scale_row(train[2 * c + 1], 6, 1e25f);
      }
      scale_row(train[0], 7, 0.0f);  // checkpoint 0: zero left factor, huge right
      scale_row(train[1], 7, 1e30f);
      scale_row(train[2], 7, 1e-30f);  // checkpoint 1: tiny
      scale_row(train[3], 7, 1e-12f);
    }
    const std::vector<double> w = {0.5, -2.0};
    tracin::GradientSide test_side = Full(test), train_side = Full(train);
    test_side.factored = train_side.factored = factored;
    const std::size_t per = factored ? 2 : 1;
    // float64 checkpoint terms: the dot product of rows i and j of checkpoint c (sides a, b)
    const auto term = [&](const std::vector<Matrix>& a, std::int64_t i, const std::vector<Matrix>& b,
                          std::int64_t j, std::size_t c) {
      double d = Dot(a[per * c], i, b[per * c], j);
      if (factored) d *= Dot(a[2 * c + 1], i, b[2 * c + 1], j);
      return d;
    };
    for (std::int64_t run : {1, 2}) {
      std::vector<double> exact(static_cast<std::size_t>(m * n), 0.0);
      for (std::size_t c0 = 0; c0 < 2; c0 += static_cast<std::size_t>(run))
        for (std::int64_t i = 0; i < m; ++i)
          for (std::int64_t j = 0; j < n; ++j) {
            double dot = 0, tn = 0, xn = 0;
            for (std::size_t c = c0; c < c0 + static_cast<std::size_t>(run); ++c) {
              dot += w[c] * term(test, i, train, j, c);
              tn += term(test, i, test, i, c);
              xn += term(train, j, train, j, c);
            }
            exact[i * n + j] += tn > 0 && xn > 0 ? dot / std::sqrt(tn) / std::sqrt(xn) : 0.0;
          }
      const double bound = 1e-5 * (std::abs(w[0]) + std::abs(w[1]));
      const std::string what = std::string(factored ? "factored" : "full") + ", normalize " + std::to_string(run);
      for (tracin::Isa isa : tracin_test::RunnableIsas("cosine Scores of extreme norms")) {
        std::vector<float> first;
        for (int threads : {1, 3})
          for (std::int64_t block : {0, 7}) {
            tracin::Options o;
            o.isa = isa;
            o.num_threads = threads;
            o.train_block = o.test_block = block;
            o.normalize = run;
            std::vector<float> out(exact.size());
            const tracin::Status s = tracin::Scores(test_side, train_side, w, out.data(), o);
            Check(s.ok(), "cosine Scores of extreme norms ok, " + what + ": " + s.message);
            double worst = 0;
            for (std::size_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::abs(out[i] - exact[i]));
            Check(s.ok() && worst <= bound, "cosine Scores of extreme norms within the bound, " + what + ", isa " +
                                                tracin::IsaName(isa) + ": error " + std::to_string(worst));
            if (first.empty()) first = out;
            Check(std::memcmp(first.data(), out.data(), out.size() * 4) == 0,
                  "cosine Scores of extreme norms: identical bits, " + what);
            std::vector<double> agg(static_cast<std::size_t>(n));
            const tracin::Status a = tracin::Aggregate(test_side, train_side, w, agg.data(), o);
            bool agg_close = a.ok();
            for (std::int64_t j = 0; j < n; ++j) {
              double sum = 0;
              for (std::int64_t i = 0; i < m; ++i) sum += exact[i * n + j];
              agg_close = agg_close && std::abs(agg[j] - sum) <= m * bound;
            }
            Check(agg_close, "cosine Aggregate of extreme norms within the bound, " + what + ": " + a.message);
          }
      }
    }
  }
}


// Cosine scores of a factored test row whose weighted unit left factor w_c L_c / |row| overflows
// float32 (review157 F3): a tiny right factor makes the row's norm tiny (w 1e20, L 2e25, R 1e-40:
// about 1e60 packed), and lowering the row would lose its other checkpoint (w 1e-20, packed about
// 1e-20 alone, 1e-31 sharing the row's norm with the other). The kernel packs
// such a row balanced and scores it within the bound; rows of the same pass keep the bits they
// have in a call without it; aggregate sums in float64 as for any overflowing row.
void TestCosineFactoredRowPackedBeyondFloat32() {
  std::mt19937 rng(34);
  const std::int64_t m = 5, n = 23;
  const std::vector<std::int64_t> cols = {3, 4, 2, 5};  // (left, right) of checkpoints 0 and 1
  std::vector<Matrix> test, train;
  for (std::int64_t c : cols) {
    test.push_back(Random(m, c, rng));
    train.push_back(Random(n, c, rng));
  }
  const auto scale_row = [](Matrix& x, std::int64_t row, float factor) {
    for (std::int64_t k = 0; k < x.cols; ++k) x.data[row * x.cols + k] *= factor;
  };
  const std::int64_t bad = 2;  // the test row packed beyond float32
  scale_row(test[0], bad, 1e-25f);
  scale_row(test[2], bad, 2e25f);
  scale_row(test[3], bad, 1e-40f);  // subnormal values
  scale_row(train[1], 4, 1e-25f);   // a train row of a tiny norm (rescaled as it is loaded)
  scale_row(train[3], 4, 1e-25f);
  scale_row(train[2], 9, 0.0f);  // a zero term
  const std::vector<double> w = {1e-20, 1e20};
  tracin::GradientSide test_side = Full(test), train_side = Full(train);
  test_side.factored = train_side.factored = true;
  // The other test rows alone: the same bits as in the call with the bad row.
  std::vector<Matrix> others;
  for (const Matrix& t : test) {
    Matrix o{m - 1, t.cols, {}};
    for (std::int64_t i = 0; i < m; ++i)
      if (i != bad) o.data.insert(o.data.end(), t.data.begin() + i * t.cols, t.data.begin() + (i + 1) * t.cols);
    others.push_back(o);
  }
  tracin::GradientSide others_side = Full(others);
  others_side.factored = true;
  const auto term = [&](const std::vector<Matrix>& a, std::int64_t i, const std::vector<Matrix>& b, std::int64_t j,
                        std::size_t c) {
    return Dot(a[2 * c], i, b[2 * c], j) * Dot(a[2 * c + 1], i, b[2 * c + 1], j);
  };
  for (std::int64_t run : {1, 2}) {
    std::vector<double> exact(static_cast<std::size_t>(m * n), 0.0), bound(exact.size(), 8 * std::ldexp(1.0, -149));
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j)
        for (std::size_t c0 = 0; c0 < 2; c0 += static_cast<std::size_t>(run)) {
          double tn = 0, xn = 0;
          for (std::size_t c = c0; c < c0 + static_cast<std::size_t>(run); ++c) {
            tn += term(test, i, test, i, c);
            xn += term(train, j, train, j, c);
          }
          if (tn == 0 || xn == 0) continue;
          for (std::size_t c = c0; c < c0 + static_cast<std::size_t>(run); ++c) {
            exact[i * n + j] += w[c] * term(test, i, train, j, c) / std::sqrt(tn * xn);
            const double share = term(test, i, test, i, c) * term(train, j, train, j, c) / (tn * xn);
            bound[i * n + j] += 1e-5 * std::abs(w[c]) * std::sqrt(share);
          }
        }
    const std::string what = "normalize " + std::to_string(run);
    for (tracin::Isa isa : tracin_test::RunnableIsas("cosine factored row beyond float32")) {
      std::vector<float> first;
      for (int threads : {1, 3})
        for (std::int64_t block : {0, 1, 2}) {
          tracin::Options o;
          o.isa = isa;
          o.num_threads = threads;
          o.train_block = o.test_block = block;
          o.normalize = run;
          std::vector<float> out(exact.size()), alone(static_cast<std::size_t>((m - 1) * n));
          const tracin::Status s = tracin::Scores(test_side, train_side, w, out.data(), o);
          Check(s.ok(), "cosine factored row beyond float32 scored, " + what + ": " + s.message);
          double worst = 0;  // error / bound
          for (std::size_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::abs(out[i] - exact[i]) / bound[i]);
          Check(s.ok() && worst <= 1.0, "cosine factored row beyond float32 within the bound, " + what + ", isa " +
                                            tracin::IsaName(isa) + ": error / bound " + std::to_string(worst));
          if (first.empty()) first = out;
          Check(std::memcmp(first.data(), out.data(), out.size() * 4) == 0,
                "cosine factored row beyond float32: identical bits for any threads and blocks, " + what);
          const bool ok = tracin::Scores(others_side, train_side, w, alone.data(), o).ok();
          bool same = ok;
          for (std::int64_t i = 0, k = 0; i < m; ++i)
            if (i != bad) same = same && std::memcmp(&out[i * n], &alone[k++ * n], n * 4) == 0;
          Check(same, "cosine factored row beyond float32: the other rows' bits as without it, " + what);
          // top_k: the best 3 of each row, by the float64 scores (no near ties in this data).
          const std::int64_t k = 3;
          std::vector<float> pv(m * k), ov(m * k);
          std::vector<std::int64_t> pi(m * k), oi(m * k);
          const tracin::Status t = tracin::TopK(test_side, train_side, w, k, tracin::Side::kBoth,
                                                {pv.data(), pi.data(), ov.data(), oi.data()}, o);
          bool best = t.ok();
          for (std::int64_t i = 0; i < m && best; ++i) {
            std::vector<std::int64_t> order(static_cast<std::size_t>(n));
            std::iota(order.begin(), order.end(), 0);
            std::stable_sort(order.begin(), order.end(),
                             [&](std::int64_t a, std::int64_t b) { return exact[i * n + a] > exact[i * n + b]; });
            for (std::int64_t r = 0; r < k; ++r)
              best = best && pi[i * k + r] == order[r] && oi[i * k + r] == order[n - 1 - r] &&
                     pv[i * k + r] == out[i * n + order[r]];
          }
          Check(best, "cosine factored row beyond float32: top_k picks the float64 best, " + what + ": " + t.message);
          std::vector<double> agg(static_cast<std::size_t>(n));
          const tracin::Status a = tracin::Aggregate(test_side, train_side, w, agg.data(), o);
          bool close = a.ok();
          for (std::int64_t j = 0; j < n; ++j) {
            double sum = 0, slack = 0;
            for (std::int64_t i = 0; i < m; ++i) sum += exact[i * n + j], slack += bound[i * n + j];
            close = close && std::abs(agg[j] - sum) <= slack;
          }
          Check(close, "cosine factored row beyond float32: aggregate within the bound, " + what + ": " + a.message);
        }
    }
  }
}

}  // namespace

// An allocation the machine cannot satisfy is a Status, not an exception. The views claim 2^40
// columns over a small buffer: the packed copy of the test side is requested (and refused) before
// any value is read. Not under AddressSanitizer, whose operator new ends the process instead of
// throwing.
#if defined(__SANITIZE_ADDRESS__)
#define TRACIN_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TRACIN_ASAN 1
#endif
#endif
void TestOutOfMemoryIsAStatus() {
#if defined(TRACIN_ASAN)
  std::printf("out-of-memory test not run under AddressSanitizer\n");
#else
  std::vector<float> small(64, 1.0f);
  const std::int64_t huge = std::int64_t{1} << 40;
  tracin::GradientSide side;
  side.blocks = {{small.data(), 32, huge, huge, tracin::DType::kFloat32}};
  std::vector<float> out(32 * 32);
  const tracin::Status s = tracin::Scores(side, side, {1.0}, out.data(), tracin::Options{});
  Check(s.code == tracin::StatusCode::kOutOfMemory, "out of memory reported as a Status: " + s.message);
#endif
}

// Cosine scores (Options::normalize): rows unit-normalised over each run of checkpoints, against a
// float64 reference of the normalised rows; zero rows score 0; the same bits for any thread count
// and block size; self-influence and a run not dividing the checkpoints refused.
void TestCosineScores() {
  std::mt19937 rng(8);
  std::vector<Matrix> test = {Random(9, 300, rng), Random(9, 5, rng)};
  std::vector<Matrix> train = {Random(101, 300, rng), Random(101, 5, rng)};
  for (Matrix* m : {&test[0], &test[1], &train[0], &train[1]}) {
    const std::int64_t zero = m->rows == 9 ? 2 : 40;
    std::fill(m->data.begin() + zero * m->cols, m->data.begin() + (zero + 1) * m->cols, 0.0f);
  }
  const std::vector<double> w = {0.5, -2.0};
  for (std::int64_t run : {1, 2}) {
    // The reference: float64 rows divided by their norm over the run, then plain scores.
    std::vector<std::vector<double>> scaled_t, scaled_x;
    for (const auto* side : {&test, &train}) {
      std::vector<std::vector<double>> rows;
      for (std::size_t c = 0; c < side->size(); ++c) {
        const std::size_t c0 = c / static_cast<std::size_t>(run) * static_cast<std::size_t>(run);
        const Matrix& m = (*side)[c];
        std::vector<double> v(m.data.size());
        for (std::int64_t i = 0; i < m.rows; ++i) {
          double squares = 0;
          for (std::size_t d = c0; d < c0 + static_cast<std::size_t>(run); ++d)
            squares += Dot((*side)[d], i, (*side)[d], i);
          for (std::int64_t k = 0; k < m.cols; ++k)
            v[i * m.cols + k] = squares > 0 ? m.data[i * m.cols + k] / std::sqrt(squares) : 0.0;
        }
        rows.push_back(std::move(v));
      }
      (side == &test ? scaled_t : scaled_x) = std::move(rows);
    }
    const std::int64_t m = 9, n = 101;
    std::vector<double> exact(m * n, 0.0);
    for (std::size_t c = 0; c < 2; ++c)
      for (std::int64_t i = 0; i < m; ++i)
        for (std::int64_t j = 0; j < n; ++j)
          for (std::int64_t k = 0; k < test[c].cols; ++k)
            exact[i * n + j] += w[c] * scaled_t[c][i * test[c].cols + k] * scaled_x[c][j * test[c].cols + k];
    const double bound = 1e-5 * (std::abs(w[0]) + std::abs(w[1]));
    for (tracin::Isa isa : tracin_test::RunnableIsas("cosine Scores")) {
      std::vector<float> first;
      for (int threads : {1, 3})
        for (std::int64_t block : {0, 7}) {
          tracin::Options o;
          o.isa = isa;
          o.num_threads = threads;
          o.train_block = o.test_block = block;
          o.normalize = run;
          std::vector<float> out(exact.size());
          Check(tracin::Scores(Full(test), Full(train), w, out.data(), o).ok(), "cosine Scores ok");
          bool close = true, zeros = true;
          for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t j = 0; j < n; ++j) {
              close = close && std::abs(out[i * n + j] - exact[i * n + j]) <= bound;
              zeros = zeros && ((i != 2 && j != 40) || out[i * n + j] == 0.0f);
            }
          Check(close, std::string("cosine Scores within the bound, isa ") + tracin::IsaName(isa));
          Check(zeros, "zero rows have cosine scores 0");
          if (first.empty()) first = out;
          Check(std::memcmp(first.data(), out.data(), out.size() * 4) == 0, "cosine Scores: identical bits");
          std::vector<double> agg(n);
          Check(tracin::Aggregate(Full(test), Full(train), w, agg.data(), o).ok(), "cosine Aggregate ok");
          bool agg_close = true;
          for (std::int64_t j = 0; j < n; ++j) {
            double sum = 0;
            for (std::int64_t i = 0; i < m; ++i) sum += exact[i * n + j];
            agg_close = agg_close && std::abs(agg[j] - sum) <= m * bound;
          }
          Check(agg_close, "cosine Aggregate within the bound");
          std::vector<float> v(m * 3);
          std::vector<std::int64_t> idx(m * 3);
          const tracin::TopKOutput top{v.data(), idx.data(), nullptr, nullptr};
          Check(tracin::TopK(Full(test), Full(train), w, 3, tracin::Side::kProponents, top, o).ok(), "cosine TopK ok");
          bool same = true;
          for (std::int64_t i = 0; i < m * 3; ++i) same = same && v[i] == out[(i / 3) * n + idx[i]];
          Check(same, "cosine TopK values are the cosine scores of their indices");
        }
    }
  }
  tracin::Options o;
  o.normalize = 1;
  std::vector<float> self(101), out(9 * 101);
  Check(tracin::SelfInfluence(Full(train), w, self.data(), o).code == tracin::StatusCode::kInvalidArgument,
        "cosine self-influence refused");
  o.normalize = 3;
  Check(tracin::Scores(Full(test), Full(train), w, out.data(), o).code == tracin::StatusCode::kInvalidArgument,
        "a run not dividing the checkpoints refused");
}

// num_threads = 0 means the CPUs of the process's affinity mask (taskset, cpusets), not the
// machine's: pinned to one CPU, a call runs one thread.
void TestDefaultThreadsFollowAffinity() {
#if defined(__linux__)
  cpu_set_t before;
  CPU_ZERO(&before);
  Check(sched_getaffinity(0, sizeof(before), &before) == 0, "affinity mask readable");
  Check(tracin::detail::ResolveThreads(0) == CPU_COUNT(&before), "default threads = CPUs in the mask");
  Check(tracin::detail::ResolveThreads(3) == 3, "explicit thread count kept");
  int first = 0;
  while (!CPU_ISSET(first, &before)) ++first;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  Check(sched_setaffinity(0, sizeof(one), &one) == 0, "pin to one CPU");
  Check(tracin::detail::ResolveThreads(0) == 1, "pinned to one CPU: one default thread");
  Check(sched_setaffinity(0, sizeof(before), &before) == 0, "affinity restored");
#endif
}

// Cosine scores with a tiny weight (review55 F1): w = 1e-28 times unit test rows times train rows of
// norm 2^-60 or 2^-50 (not rescaled: only norms beyond 2^+-64 are) gave products below float32's
// normal range, every score 0 at 2^-60. The kernel lifts such test rows' packed values to 2^-32:
// within 1e-5 |w| of the float64 cosines, and the same bits at every train scale (powers of two),
// for any thread count and block size, every instruction set.
void TestCosineTinyWeights() {
  std::mt19937 rng(21);
  const Matrix test = Random(3, 1000, rng), base = Random(40, 1000, rng);
  for (const double w : {1e-20, 1e-28, -1e-35}) {
    std::vector<double> exact(3 * 40);
    for (std::int64_t i = 0; i < 3; ++i)
      for (std::int64_t j = 0; j < 40; ++j)
        exact[i * 40 + j] = w * Dot(test, i, base, j) / (Norm(test, i) * Norm(base, j));
    for (tracin::Isa isa : tracin_test::RunnableIsas("TinyWeights")) {
      std::vector<float> first;
      for (const int scale : {-60, -50, 0})
        for (const int threads : {1, 2}) {
          Matrix train = base;
          for (float& v : train.data) v = std::ldexp(v, scale);
          tracin::Options o;
          o.isa = isa;
          o.normalize = 1;
          o.num_threads = threads;
          o.train_block = threads == 1 ? 0 : 7;
          std::vector<float> out(exact.size());
          const tracin::Status s = tracin::Scores(Full({test}), Full({train}), {w}, out.data(), o);
          double worst = 0.0;
          for (std::size_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::abs(out[i] - exact[i]));
          Check(s.ok() && worst <= 1e-5 * std::abs(w),
                "tiny-weight cosine scores within the bound, scale 2^" + std::to_string(scale) + ", isa " +
                    tracin::IsaName(isa) + ": error / bound " + std::to_string(worst / (1e-5 * std::abs(w))));
          if (first.empty()) first = out;
          Check(std::memcmp(first.data(), out.data(), out.size() * 4) == 0,
                std::string("tiny-weight cosine scores: the same bits at every train scale, isa ") +
                    tracin::IsaName(isa));
        }
    }
  }
}

int main() {
  std::printf("tracin kernel tests, isa %s\n", tracin::IsaName(tracin::DetectIsa()));
  TestScoresAndDeterminism();
  TestWeightsFarFromOne();
  TestWeightExponentPerTestRow();
  TestExponentShiftKeepsOtherCheckpoints();
  TestTopK();
  TestHalfPrecisionAndFactored();
  TestMisalignedHalfPrecision();
  TestSelfInfluenceAndAggregate();
  TestSameBitsForAnyPassRows();
  TestBadInput();
  TestOutOfMemoryIsAStatus();
  TestWideRows();
  TestSlicesAddedInDouble();
  TestCancellation();
  TestCancellationDuringTheSelection();
#if defined(__linux__)
  TestColumnSumsStopAtTheRowOfTheCancellation();
#endif
  TestLargePoolSortIsCancellable();
  TestBlocksBeyondTheRows();
  TestBadOutputsAndEnums();
  TestHugeThreadCount();
  TestAggregateLayoutsAgree();
  TestAggregateFallbackPerTrainRow();
  TestRowNearFloat32sTop();
  TestAggregateDotSameBitsEveryIsa();
  TestAggregateInTwoSteps();
  TestOverflowNamesThePair();
  TestCosineRowsOfExtremeNorms();
  TestCosineScores();
  TestCosineTinyWeights();
  TestCosineFactoredRowPackedBeyondFloat32();
  TestDefaultThreadsFollowAffinity();
  return tracin_test::Report();
}
