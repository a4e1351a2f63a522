// Scores two small deterministic gradient sets with the tracin C++ kernel and prints, for every test
// row, its k strongest proponents (training rows) as "row: index:value index:value ...".
//
// Usage: top_k_example [k [num_threads]]   (defaults: k = 5, num_threads = 0, i.e. all cores;
// k at most the 500 train rows, num_threads at most 4096)
//
// The gradients come from a 64-bit linear congruential generator so that check_against_python.py
// can rebuild them exactly: 2 checkpoints of widths 48 and 80 with learning rates 0.1 and 0.05,
// 6 test rows (seed 1) and 500 train rows (seed 2). Values are multiples of 2^-23 in [-1, 1).
#include <tracin/tracin.hpp>

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr std::int64_t kTestRows = 6;
constexpr std::int64_t kTrainRows = 500;
const std::vector<std::int64_t> kWidths = {48, 80};
const std::vector<double> kLearningRates = {0.1, 0.05};
constexpr std::int64_t kMaxThreads = 4096;  // as tracin.top_k's num_threads

// Knuth's MMIX LCG; the top 24 bits of the state become a float in [-1, 1).
class Lcg {
 public:
  explicit Lcg(std::uint64_t seed) : state_(seed) {}
  float Next() {
    state_ = state_ * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<float>(static_cast<std::int64_t>(state_ >> 40)) / 8388608.0f - 1.0f;
  }

 private:
  std::uint64_t state_;
};

// One float32 (rows, width) matrix per checkpoint, filled checkpoint by checkpoint, row by row.
std::vector<std::vector<float>> MakeGradients(std::int64_t rows, std::uint64_t seed) {
  Lcg lcg(seed);
  std::vector<std::vector<float>> matrices;
  for (std::int64_t width : kWidths) {
    std::vector<float> m(static_cast<std::size_t>(rows * width));
    for (float& x : m) x = lcg.Next();
    matrices.push_back(std::move(m));
  }
  return matrices;
}

tracin::GradientSide View(const std::vector<std::vector<float>>& matrices, std::int64_t rows) {
  tracin::GradientSide side;
  for (std::size_t c = 0; c < matrices.size(); ++c) {
    side.blocks.push_back({matrices[c].data(), rows, kWidths[c], kWidths[c], tracin::DType::kFloat32});
  }
  return side;
}

std::int64_t ParseArgument(const char* text, const char* name, std::int64_t min_value, std::int64_t max_value) {
  std::size_t used = 0;
  std::int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || text[used] != '\0' || value < min_value || value > max_value) {
    throw std::invalid_argument(std::string(name) + " must be an integer from " + std::to_string(min_value) +
                                " to " + std::to_string(max_value) + ", got '" + text + "'");
  }
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t k = 5;
  tracin::Options options;
  try {
    if (argc > 3) throw std::invalid_argument("usage: top_k_example [k [num_threads]]");
    if (argc > 1) k = ParseArgument(argv[1], "k", 1, kTrainRows);  // TopK takes at most the train rows
    if (argc > 2) options.num_threads = static_cast<int>(ParseArgument(argv[2], "num_threads", 0, kMaxThreads));
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }

  const auto test = MakeGradients(kTestRows, 1);
  const auto train = MakeGradients(kTrainRows, 2);
  std::vector<float> values(static_cast<std::size_t>(kTestRows * k));
  std::vector<std::int64_t> indices(values.size());
  tracin::TopKOutput out;
  out.proponent_values = values.data();
  out.proponent_indices = indices.data();

  const tracin::Status status = tracin::TopK(View(test, kTestRows), View(train, kTrainRows), kLearningRates, k,
                                             tracin::Side::kProponents, out, options);
  if (!status.ok()) {
    std::fprintf(stderr, "tracin::TopK failed: %s\n", status.message.c_str());
    return 1;
  }
  for (std::int64_t t = 0; t < kTestRows; ++t) {
    std::printf("%lld:", static_cast<long long>(t));
    for (std::int64_t j = 0; j < k; ++j) {
      const std::size_t at = static_cast<std::size_t>(t * k + j);
      std::printf(" %lld:%.9g", static_cast<long long>(indices[at]), static_cast<double>(values[at]));
    }
    std::printf("\n");
  }
  return 0;
}
