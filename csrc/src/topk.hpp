// Exact top-k selection per row: candidates are (value, index), larger value first, ties to the
// smaller index. Values at or above a row's threshold must be offered; lower ones cannot enter.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace tracin::detail {

struct Candidate {
  float value;
  std::int64_t index;
};

// The order of results (a functor, so that the standard algorithms inline it).
struct BetterThan {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.value > b.value || (a.value == b.value && a.index < b.index);
  }
};
inline constexpr BetterThan Better{};

// A bounded binary heap per row, its worst candidate on top. Best for small k.
class HeapSelector {
 public:
  HeapSelector(std::int64_t rows, std::int64_t k)
      : k_(k),
        items_(static_cast<std::size_t>(rows * k)),
        counts_(static_cast<std::size_t>(rows), 0),
        thresholds_(static_cast<std::size_t>(rows), -std::numeric_limits<float>::infinity()) {}

  const float* thresholds() const { return thresholds_.data(); }

  void Offer(std::int64_t row, float value, std::int64_t index) {
    Candidate* heap = &items_[static_cast<std::size_t>(row * k_)];
    std::int64_t& count = counts_[static_cast<std::size_t>(row)];
    const Candidate c{value, index};
    if (count < k_) {
      heap[count++] = c;
      std::push_heap(heap, heap + count, Better);
    } else if (Better(c, heap[0])) {
      std::pop_heap(heap, heap + k_, Better);
      heap[k_ - 1] = c;
      std::push_heap(heap, heap + k_, Better);
    } else {
      return;
    }
    if (count == k_) thresholds_[static_cast<std::size_t>(row)] = heap[0].value;
  }

  void AppendKept(std::int64_t row, std::vector<Candidate>* out) const {
    const Candidate* heap = &items_[static_cast<std::size_t>(row * k_)];
    out->insert(out->end(), heap, heap + counts_[static_cast<std::size_t>(row)]);
  }

 private:
  std::int64_t k_;
  std::vector<Candidate> items_;
  std::vector<std::int64_t> counts_;
  std::vector<float> thresholds_;
};

// Per row, an append buffer cut back to the best k by partition when it holds `capacity`
// candidates: min(2k, n) for n train rows, at least k + 1. Best for large k: amortised O(1) per
// accepted candidate. A row's buffer grows (doubling) as candidates arrive, so a thread that scores
// few train rows holds few; it never outgrows `capacity`.
class BufferSelector {
 public:
  BufferSelector(std::int64_t rows, std::int64_t k, std::int64_t n)
      : k_(k),
        capacity_(static_cast<std::size_t>(std::max(k + 1, std::min(2 * k, n)))),
        buffers_(static_cast<std::size_t>(rows)),
        kth_(static_cast<std::size_t>(rows), Candidate{0.0f, -1}),
        thresholds_(static_cast<std::size_t>(rows), -std::numeric_limits<float>::infinity()) {}

  const float* thresholds() const { return thresholds_.data(); }

  void Offer(std::int64_t row, float value, std::int64_t index) {
    const auto r = static_cast<std::size_t>(row);
    const Candidate c{value, index};
    if (kth_[r].index >= 0 && !Better(c, kth_[r])) return;
    std::vector<Candidate>& buffer = buffers_[r];
    if (buffer.size() == buffer.capacity())
      buffer.reserve(std::min(std::max<std::size_t>(2 * buffer.size(), kFirstCapacity), capacity_));
    buffer.push_back(c);
    if (buffer.size() == capacity_) {
      std::nth_element(buffer.begin(), buffer.begin() + (k_ - 1), buffer.end(), Better);
      kth_[r] = buffer[static_cast<std::size_t>(k_ - 1)];
      thresholds_[r] = kth_[r].value;
      buffer.resize(static_cast<std::size_t>(k_));
    }
  }

  void AppendKept(std::int64_t row, std::vector<Candidate>* out) const {
    const std::vector<Candidate>& buffer = buffers_[static_cast<std::size_t>(row)];
    out->insert(out->end(), buffer.begin(), buffer.end());
  }

 private:
  static constexpr std::size_t kFirstCapacity = 16;
  std::int64_t k_;
  std::size_t capacity_;
  std::vector<std::vector<Candidate>> buffers_;
  std::vector<Candidate> kth_;
  std::vector<float> thresholds_;
};

// The best k of `pool` (any order in, best first out) written to values / indices.
inline void WriteBest(std::vector<Candidate>* pool, std::int64_t k, bool negate, float* values,
                      std::int64_t* indices) {
  const auto keep = static_cast<std::ptrdiff_t>(std::min<std::size_t>(pool->size(), k));
  if (keep < static_cast<std::ptrdiff_t>(pool->size()))
    std::nth_element(pool->begin(), pool->begin() + keep, pool->end(), Better);
  std::sort(pool->begin(), pool->begin() + keep, Better);
  for (std::ptrdiff_t j = 0; j < keep; ++j) {
    values[j] = negate ? -(*pool)[j].value : (*pool)[j].value;
    indices[j] = (*pool)[j].index;
  }
}

}  // namespace tracin::detail
