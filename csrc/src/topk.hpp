// Exact top-k selection per row: candidates are (value, index), larger value first, ties to the
// smaller index. Values at or above a row's threshold must be offered; lower ones cannot enter.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
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

  std::int64_t Kept(std::int64_t row) const { return counts_[static_cast<std::size_t>(row)]; }
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

// Candidates one row of a BufferSelector for top-k of n holds at most (see below).
inline std::int64_t BufferCapacity(std::int64_t k, std::int64_t n) { return std::max(k + 1, std::min(2 * k, n)); }

// Per row, an append buffer cut back to the best k by partition when it holds `capacity`
// candidates: min(2k, n) for n train rows, at least k + 1. Best for large k: amortised O(1) per
// accepted candidate. Rows share one array with room for `share` (the train rows this thread is
// expected to score) and a quarter more per row (at least 64, at most `capacity`); it doubles when a row
// fills it (rows of a pass see the same train rows, so they fill alike). A row never outgrows
// `capacity`: it is cut back on reaching it.
class BufferSelector {
 public:
  BufferSelector(std::int64_t rows, std::int64_t k, std::int64_t n, std::int64_t share)
      : k_(k),
        rows_(rows),
        capacity_(BufferCapacity(k, n)),
        counts_(static_cast<std::size_t>(rows), 0),
        kth_(static_cast<std::size_t>(rows), Candidate{0.0f, -1}),
        thresholds_(static_cast<std::size_t>(rows), -std::numeric_limits<float>::infinity()) {
    Widen(std::min(std::max(share + share / 4, kMinRoom), capacity_));
  }

  const float* thresholds() const { return thresholds_.data(); }

  void Offer(std::int64_t row, float value, std::int64_t index) {
    const auto r = static_cast<std::size_t>(row);
    const Candidate c{value, index};
    if (kth_[r].index >= 0 && !Better(c, kth_[r])) return;
    if (counts_[r] == room_) Widen(std::min(2 * room_, capacity_));
    Candidate* buffer = items_.get() + r * static_cast<std::size_t>(room_);
    buffer[counts_[r]++] = c;
    if (counts_[r] == capacity_) {
      std::nth_element(buffer, buffer + (k_ - 1), buffer + capacity_, Better);
      kth_[r] = buffer[k_ - 1];
      thresholds_[r] = kth_[r].value;
      counts_[r] = k_;
    }
  }

  std::int64_t Kept(std::int64_t row) const { return counts_[static_cast<std::size_t>(row)]; }
  void AppendKept(std::int64_t row, std::vector<Candidate>* out) const {
    const auto r = static_cast<std::size_t>(row);
    const Candidate* buffer = items_.get() + r * static_cast<std::size_t>(room_);
    out->insert(out->end(), buffer, buffer + counts_[r]);
  }

 private:
  static constexpr std::int64_t kMinRoom = 64;

  // Gives every row room for `room` candidates, keeping those it holds.
  void Widen(std::int64_t room) {
    std::unique_ptr<Candidate[]> items(new Candidate[static_cast<std::size_t>(rows_ * room)]);
    for (std::int64_t r = 0; r < rows_ && room_ > 0; ++r)
      std::copy_n(items_.get() + r * room_, counts_[static_cast<std::size_t>(r)], items.get() + r * room);
    items_ = std::move(items);
    room_ = room;
  }

  std::int64_t k_, rows_, capacity_;
  std::int64_t room_ = 0;                // candidates per row that items_ has room for
  std::unique_ptr<Candidate[]> items_;  // rows_ x room_
  std::vector<std::int64_t> counts_;
  std::vector<Candidate> kth_;
  std::vector<float> thresholds_;
};

// Sorts [first, last) best first, checking `cancel` (may be null) between steps of at most ~2^16
// elements' work when the range is larger (k ~ n selections of millions of candidates: a plain
// std::sort would run ~0.3 s per million unchecked): halves split by nth_element at the middle, each
// sorted alike. Returns false, the range partly sorted, when cancelled.
inline bool SortChecked(Candidate* first, Candidate* last, const std::atomic<bool>* cancel) {
  constexpr std::ptrdiff_t kPiece = std::ptrdiff_t{1} << 16;
  if (last - first <= kPiece) {
    std::sort(first, last, Better);
    return true;
  }
  if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) return false;
  Candidate* middle = first + (last - first) / 2;
  std::nth_element(first, middle, last, Better);
  return SortChecked(first, middle, cancel) && SortChecked(middle, last, cancel);
}

// The best k of `pool` (any order in, best first out) written to values / indices. `cancel` (may
// be null) is checked between the steps of a large pool's selection; returns false when it was
// set, the output partly written.
inline bool WriteBest(std::vector<Candidate>* pool, std::int64_t k, bool negate, float* values,
                      std::int64_t* indices, const std::atomic<bool>* cancel = nullptr) {
  const auto keep = static_cast<std::ptrdiff_t>(std::min<std::size_t>(pool->size(), k));
  if (keep < static_cast<std::ptrdiff_t>(pool->size()))
    std::nth_element(pool->begin(), pool->begin() + keep, pool->end(), Better);
  if (!SortChecked(pool->data(), pool->data() + keep, cancel)) return false;
  for (std::ptrdiff_t j = 0; j < keep; ++j) {
    values[j] = negate ? -(*pool)[j].value : (*pool)[j].value;
    indices[j] = (*pool)[j].index;
  }
  return true;
}

}  // namespace tracin::detail
