// tracin._core: a thin pybind11 layer over the C++ library. Takes buffers without copying,
// releases the GIL while the kernel runs (and answers Ctrl-C meanwhile), turns a Status into
// ValueError / MemoryError / RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "../src/engine.hpp"  // AggregateColumnSums, AggregateFromColumnSums
#include "tracin/projection.hpp"
#include "tracin/tracin.hpp"

namespace py = pybind11;

namespace {

// One side as passed from Python: (factored, blocks, dtype codes). Blocks are 2-D buffers whose
// rows are contiguous: float32 (code 0), float16 (code 1; its uint16 bits also taken) or bfloat16
// as its uint16 bits (code 2), in native byte order.
using SideSpec = std::tuple<bool, std::vector<py::buffer>, std::vector<int>>;

// Whether a buffer's struct-module format is the single type character `type` in native byte order
// and size ("f", "=f", "<f" on a little-endian machine).
bool HasFormat(const std::string& format, char type) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  constexpr char kNative = '>';
#else
  constexpr char kNative = '<';
#endif
  const bool prefixed = format.size() == 2 && (format[0] == '@' || format[0] == '=' || format[0] == kNative);
  return (format.size() == 1 && format[0] == type) || (prefixed && format[1] == type);
}

// Whether the format fits dtype code `code` (see SideSpec); the expected formats, for messages.
bool FormatFits(const std::string& format, int code) {
  if (code == 0) return HasFormat(format, 'f');
  if (code == 1) return HasFormat(format, 'e') || HasFormat(format, 'H');
  return HasFormat(format, 'H');
}
const char* const kExpectedFormats[] = {"float32 ('f')", "float16 ('e', or its uint16 bits 'H')",
                                        "uint16 bits of bfloat16 ('H')"};

struct HeldSide {
  std::vector<py::buffer_info> buffers;  // keeps the memory alive and pinned
  tracin::GradientSide side;
};

HeldSide Hold(const SideSpec& spec, const char* name) {
  const auto& [factored, blocks, dtypes] = spec;
  if (blocks.size() != dtypes.size())
    throw py::value_error(std::string(name) + ": one dtype code per block expected");
  HeldSide held;
  held.side.factored = factored;
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    py::buffer_info info = blocks[b].request();
    const int code = dtypes[b];
    if (code < 0 || code > 2) throw py::value_error(std::string(name) + ": unknown dtype code");
    if (info.ndim != 2 || !FormatFits(info.format, code))
      throw py::value_error(std::string(name) + ": block " + std::to_string(b) + " (dtype code " +
                            std::to_string(code) + ") must be a 2-D buffer of " + kExpectedFormats[code] +
                            " elements in native byte order; got " + std::to_string(info.ndim) +
                            "-D, format '" + info.format + "'");
    if ((info.shape[1] > 1 && info.strides[1] != info.itemsize) || info.strides[0] < 0 ||
        info.strides[0] % info.itemsize != 0)
      throw py::value_error(std::string(name) + ": block " + std::to_string(b) +
                            " must have contiguous rows and a non-negative row stride");
    tracin::MatrixView view;
    view.data = info.ptr;
    view.rows = info.shape[0];
    view.cols = info.shape[1];
    view.row_stride = info.shape[0] > 1 ? info.strides[0] / info.itemsize : info.shape[1];
    view.dtype = static_cast<tracin::DType>(code);
    held.side.blocks.push_back(view);
    held.buffers.push_back(std::move(info));
  }
  return held;
}

tracin::Isa ParseIsa(const std::string& isa) {
  if (isa == "auto") return tracin::Isa::kAuto;
  if (isa == "generic") return tracin::Isa::kGeneric;
  if (isa == "avx2") return tracin::Isa::kAvx2;
  if (isa == "avx512") return tracin::Isa::kAvx512;
  throw py::value_error("isa must be one of 'auto', 'generic', 'avx2', 'avx512', got '" + isa + "'");
}

tracin::Options MakeOptions(int num_threads, std::int64_t train_block, std::int64_t test_block,
                            const std::string& isa, std::int64_t normalize = 0) {
  tracin::Options o;
  o.num_threads = num_threads;
  o.train_block = train_block;
  o.test_block = test_block;
  o.isa = ParseIsa(isa);
  o.normalize = normalize;
  return o;
}

// How often the waiting Python thread looks for a pending signal (Ctrl-C) during a kernel call.
constexpr std::chrono::milliseconds kSignalPoll{50};

// Calls of fewer multiply-adds (milliseconds of work) run on the calling thread: they end before
// a Ctrl-C needs answering, and a helper thread would add tens of microseconds to each.
constexpr double kInterruptibleWork = 1e8;

// Multiply-adds of scoring `rows` rows against the side `other` (its columns, summed).
double Work(std::int64_t rows, const tracin::GradientSide& other) {
  double cols = 0;
  for (const tracin::MatrixView& m : other.blocks) cols += static_cast<double>(m.cols);
  return static_cast<double>(rows) * static_cast<double>(other.rows()) * cols;
}

// Work of a call that computes every score of `rows` rows against `other` (scores, top_k, factored
// aggregate): the multiply-adds, plus kScoreWork per score (the tile's epilogue, writing or consuming
// it: on 2 cores 15-25 ns a score against 0.15-0.2 ns a multiply-add, so for gradients of few columns
// most of the call; counting multiply-adds alone, 9000 x 11000 scores of one column ran 1.5 s inline,
// out of Ctrl-C's reach) and kPackWork per input value (converting and packing both sides).
constexpr double kScoreWork = 128, kPackWork = 4;
double ScoreWork(std::int64_t rows, const tracin::GradientSide& other) {
  double cols = 0;
  for (const tracin::MatrixView& m : other.blocks) cols += static_cast<double>(m.cols);
  const double n = static_cast<double>(other.rows()), m = static_cast<double>(rows);
  return Work(rows, other) + kScoreWork * m * n + kPackWork * (m + n) * cols;
}

// Work of top_k: the scores, plus the selection of the best k of n per test row and side. A
// candidate is weighed as kSelectionWork multiply-adds (a comparison or move against a vectorised
// fused multiply-add); for k near n the final sort of k candidates per row, about log2(k)
// comparisons each, costs far more than the product with a narrow side, and must not run inline,
// out of Ctrl-C's reach.
constexpr double kSelectionWork = 32;
double TopKWork(std::int64_t rows, const tracin::GradientSide& other, std::int64_t k, int sides) {
  const double n = static_cast<double>(other.rows()), kk = static_cast<double>(std::max<std::int64_t>(k, 0));
  const double selection = static_cast<double>(rows) * sides * (n + kk * std::log2(kk + 2));
  return ScoreWork(rows, other) + kSelectionWork * selection;
}

// Runs kernel(options) with the GIL released. For `work` (multiply-adds) of at least
// kInterruptibleWork, on a helper thread while this thread, every kSignalPoll, takes the GIL
// back to run Python's signal handlers: if a handler raises (Ctrl-C: KeyboardInterrupt), the
// kernel is cancelled through options.cancel, joined (no kernel thread outlives the call), and
// the Python exception propagates. Call with the GIL held.
template <class Kernel>
tracin::Status RunInterruptibly(tracin::Options options, double work, Kernel&& kernel) {
  if (work < kInterruptibleWork) {
    py::gil_scoped_release release;
    return kernel(options);
  }
  std::atomic<bool> cancel{false};
  options.cancel = &cancel;
  std::mutex mutex;
  std::condition_variable finished;
  bool done = false;
  bool interrupted = false;
  tracin::Status status;
  {
    py::gil_scoped_release release;
    std::thread helper;
    try {
      helper = std::thread([&] {
        tracin::Status s = kernel(options);
        std::lock_guard<std::mutex> lock(mutex);
        status = std::move(s);
        done = true;
        finished.notify_one();
      });
    } catch (const std::system_error&) {
      return kernel(options);  // no thread to spare: run here, without Ctrl-C
    }
    std::unique_lock<std::mutex> lock(mutex);
    while (!finished.wait_for(lock, kSignalPoll, [&] { return done; })) {
      if (interrupted) continue;  // cancelled: wait for the kernel's threads to stop
      lock.unlock();
      {
        py::gil_scoped_acquire acquire;
        interrupted = PyErr_CheckSignals() != 0;  // the exception stays set on this thread
      }
      if (interrupted) cancel = true;
      lock.lock();
    }
    lock.unlock();
    helper.join();
  }
  if (interrupted) throw py::error_already_set();
  return status;
}

// Float64 column sums passed from Python, one 1-D array per block of `side` of the block's columns,
// contiguous (and writable when `writable`); their buffers are held in `held`.
std::vector<double*> SumArrays(const std::vector<py::buffer>& sums, const tracin::GradientSide& side, bool writable,
                               std::vector<py::buffer_info>* held) {
  if (sums.size() != side.blocks.size())
    throw py::value_error("sums: expected one array per checkpoint (" + std::to_string(side.blocks.size()) +
                          "), got " + std::to_string(sums.size()));
  std::vector<double*> out;
  for (std::size_t c = 0; c < sums.size(); ++c) {
    py::buffer_info info = sums[c].request(writable);
    if (info.ndim != 1 || !HasFormat(info.format, 'd') || info.shape[0] != side.blocks[c].cols ||
        (info.shape[0] > 1 && info.strides[0] != 8))
      throw py::value_error("sums: array " + std::to_string(c) + " must be a contiguous 1-D float64 array of " +
                            std::to_string(side.blocks[c].cols) + " values (the checkpoint's columns)");
    out.push_back(static_cast<double*>(info.ptr));
    held->push_back(std::move(info));
  }
  return out;
}

void Raise(const tracin::Status& s) {
  switch (s.code) {
    case tracin::StatusCode::kOk:
      return;
    case tracin::StatusCode::kInvalidArgument:
    case tracin::StatusCode::kNonFinite:
      throw py::value_error(s.message);
    case tracin::StatusCode::kOutOfMemory:
      PyErr_SetString(PyExc_MemoryError, s.message.c_str());
      throw py::error_already_set();
    default:
      throw std::runtime_error(s.message);
  }
}

#define TRACIN_OPTION_ARGS                                                              \
  py::kw_only(), py::arg("num_threads") = 0, py::arg("train_block") = 0,                \
      py::arg("test_block") = 0, py::arg("isa") = "auto", py::arg("normalize") = 0

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "tracin C++ kernel (internal; use the functions in the tracin package)";

  m.def("scores",
        [](const SideSpec& test, const SideSpec& train, const std::vector<double>& weights,
           int num_threads, std::int64_t train_block, std::int64_t test_block,
           const std::string& isa, std::int64_t normalize) {
          const auto options = MakeOptions(num_threads, train_block, test_block, isa, normalize);
          HeldSide t = Hold(test, "test"), x = Hold(train, "train");
          py::array_t<float> out({t.side.rows(), x.side.rows()});
          float* ptr = out.mutable_data();
          const double work = ScoreWork(t.side.rows(), x.side);
          const tracin::Status s = RunInterruptibly(options, work, [&](const tracin::Options& o) {
            return tracin::Scores(t.side, x.side, weights, ptr, o);
          });
          Raise(s);
          return out;
        },
        py::arg("test"), py::arg("train"), py::arg("weights"), TRACIN_OPTION_ARGS);

  m.def("top_k",
        [](const SideSpec& test, const SideSpec& train, const std::vector<double>& weights,
           std::int64_t k, int side, int num_threads, std::int64_t train_block,
           std::int64_t test_block, const std::string& isa, std::int64_t normalize) {
          const auto options = MakeOptions(num_threads, train_block, test_block, isa, normalize);
          if (side < 0 || side > 2) throw py::value_error("side code must be 0, 1 or 2");
          HeldSide t = Hold(test, "test"), x = Hold(train, "train");
          // Before the (m, k) outputs are made: a k beyond the rows would size them past memory
          // (or overflow their strides).
          if (k < 0 || k > x.side.rows()) throw py::value_error("k must be between 0 and the number of train rows");
          const std::int64_t m_rows = t.side.rows();
          const auto which = static_cast<tracin::Side>(side);
          const bool prop = which != tracin::Side::kOpponents;
          const bool opp = which != tracin::Side::kProponents;
          py::array_t<float> pv({prop ? m_rows : 0, k}), ov({opp ? m_rows : 0, k});
          py::array_t<std::int64_t> pi({prop ? m_rows : 0, k}), oi({opp ? m_rows : 0, k});
          tracin::TopKOutput out{pv.mutable_data(), pi.mutable_data(), ov.mutable_data(),
                                 oi.mutable_data()};
          const double work = TopKWork(t.side.rows(), x.side, k, prop && opp ? 2 : 1);
          const tracin::Status s = RunInterruptibly(options, work, [&](const tracin::Options& o) {
            return tracin::TopK(t.side, x.side, weights, k, which, out, o);
          });
          Raise(s);
          return py::make_tuple(pv, pi, ov, oi);
        },
        py::arg("test"), py::arg("train"), py::arg("weights"), py::arg("k"), py::arg("side"),
        TRACIN_OPTION_ARGS);

  m.def("self_influence",
        [](const SideSpec& train, const std::vector<double>& weights, int num_threads,
           std::int64_t train_block, std::int64_t test_block, const std::string& isa,
           std::int64_t normalize) {
          const auto options = MakeOptions(num_threads, train_block, test_block, isa, normalize);
          HeldSide x = Hold(train, "train");
          py::array_t<float> out(x.side.rows());
          float* ptr = out.mutable_data();
          const tracin::Status s = RunInterruptibly(options, Work(1, x.side), [&](const tracin::Options& o) {
            return tracin::SelfInfluence(x.side, weights, ptr, o);
          });
          Raise(s);
          return out;
        },
        py::arg("train"), py::arg("weights"), TRACIN_OPTION_ARGS);

  m.def("aggregate",
        [](const SideSpec& test, const SideSpec& train, const std::vector<double>& weights,
           int num_threads, std::int64_t train_block, std::int64_t test_block,
           const std::string& isa, std::int64_t normalize) {
          const auto options = MakeOptions(num_threads, train_block, test_block, isa, normalize);
          HeldSide t = Hold(test, "test"), x = Hold(train, "train");
          py::array_t<double> out(x.side.rows());
          double* ptr = out.mutable_data();
          // Factored gradients are aggregated from every pair's score; full ones from column sums.
          const double work = x.side.factored ? ScoreWork(t.side.rows(), x.side) : Work(t.side.rows(), x.side);
          const tracin::Status s = RunInterruptibly(options, work, [&](const tracin::Options& o) {
            return tracin::Aggregate(t.side, x.side, weights, ptr, o);
          });
          Raise(s);
          return out;
        },
        py::arg("test"), py::arg("train"), py::arg("weights"), TRACIN_OPTION_ARGS);

  m.def("column_sums",
        [](const SideSpec& test, const std::vector<py::buffer>& sums, int num_threads, std::int64_t train_block,
           std::int64_t test_block, const std::string& isa, std::int64_t normalize) {
          const auto options = MakeOptions(num_threads, train_block, test_block, isa, normalize);
          HeldSide t = Hold(test, "test");
          std::vector<py::buffer_info> held;
          const std::vector<double*> into = SumArrays(sums, t.side, true, &held);
          const tracin::Status s = RunInterruptibly(options, Work(1, t.side), [&](const tracin::Options& o) {
            return tracin::AggregateColumnSums(t.side, into, o);
          });
          Raise(s);
        },
        py::arg("test"), py::arg("sums"), TRACIN_OPTION_ARGS);

  m.def("aggregate_sums",
        [](const std::vector<py::buffer>& sums, const SideSpec& train, const std::vector<double>& weights,
           int num_threads, std::int64_t train_block, std::int64_t test_block, const std::string& isa,
           std::int64_t normalize) {
          const auto options = MakeOptions(num_threads, train_block, test_block, isa, normalize);
          HeldSide x = Hold(train, "train");
          std::vector<py::buffer_info> held;
          const std::vector<double*> read = SumArrays(sums, x.side, false, &held);
          const std::vector<const double*> from(read.begin(), read.end());
          py::array_t<double> out(x.side.rows());
          double* ptr = out.mutable_data();
          const tracin::Status s = RunInterruptibly(options, Work(1, x.side), [&](const tracin::Options& o) {
            return tracin::AggregateFromColumnSums(from, x.side, weights, ptr, o);
          });
          Raise(s);
          return out;
        },
        py::arg("sums"), py::arg("train"), py::arg("weights"), TRACIN_OPTION_ARGS);

  m.def("project",
        [](int kind, std::uint64_t seed, std::uint64_t stream, std::int64_t dim, int nonzeros,
           const SideSpec& pieces, std::int64_t column_offset, py::buffer out, int num_threads,
           const std::string& isa) {
          const auto options = MakeOptions(num_threads, 0, 0, isa);
          if (kind < 0 || kind > 2) throw py::value_error("kind code must be 0, 1 or 2");
          const tracin::ProjectionSpec spec{static_cast<tracin::ProjectionKind>(kind), seed, stream,
                                            dim, nonzeros};
          HeldSide x = Hold(pieces, "matrix");
          py::buffer_info o = out.request(true);
          if (o.ndim != 2 || o.itemsize != 4 || o.format != py::format_descriptor<float>::format() ||
              o.shape[0] != x.side.rows() || o.shape[1] != dim ||
              (dim > 1 && o.strides[1] != 4) || o.strides[0] % 4 != 0 || o.strides[0] < 0)
            throw py::value_error("out must be a writable float32 (rows, dim) array with contiguous rows");
          const std::int64_t stride = o.shape[0] > 1 ? o.strides[0] / 4 : dim;
          float* ptr = static_cast<float*>(o.ptr);
          const tracin::Status s = RunInterruptibly(options, Work(dim, x.side), [&](const tracin::Options& o) {
            return tracin::Project(spec, x.side.blocks, column_offset, ptr, stride, o);
          });
          Raise(s);
        },
        py::arg("kind"), py::arg("seed"), py::arg("stream"), py::arg("dim"), py::arg("nonzeros"),
        py::arg("pieces"), py::arg("column_offset"), py::arg("out"), py::kw_only(),
        py::arg("num_threads") = 0, py::arg("isa") = "auto");

  m.def("detect_isa", [] { return std::string(tracin::IsaName(tracin::DetectIsa())); },
        "The instruction set the kernel uses on this CPU.");

  m.def("resolve_isa",
        [](const std::string& isa) { return std::string(tracin::IsaName(tracin::ResolveIsa(ParseIsa(isa)))); },
        py::arg("isa"),
        "The instruction set a call with isa=... runs with on this CPU: the one asked if the CPU has it, "
        "else the best one it has.");
}
