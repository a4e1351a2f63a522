// A zero-initialised, 64-byte aligned float buffer.
#pragma once

#include <cstddef>
#include <cstring>
#include <memory>
#include <new>

namespace tracin::detail {

class AlignedFloats {
 public:
  AlignedFloats() = default;
  explicit AlignedFloats(std::size_t n) { Resize(n); }

  void Resize(std::size_t n) {
    if (n > capacity_) {
      data_.reset(static_cast<float*>(::operator new(n * sizeof(float), std::align_val_t{64})));
      capacity_ = n;
    }
    size_ = n;
  }
  void Zero() {
    if (size_ != 0) std::memset(data_.get(), 0, size_ * sizeof(float));
  }
  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  std::size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(float* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<float, Free> data_;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

}  // namespace tracin::detail
