// Portable float16 / bfloat16 to float32 conversion.
#pragma once

#include <cstdint>
#include <cstring>

namespace tracin::detail {

// Element i of an array of 16-bit values that may sit at any address (NumPy and the C++ API admit
// misaligned float16 / bfloat16 rows): read through memcpy, never a uint16_t load.
inline std::uint16_t LoadBits16(const void* data, std::int64_t i) {
  std::uint16_t bits;
  std::memcpy(&bits, static_cast<const unsigned char*>(data) + i * 2, sizeof bits);
  return bits;
}

inline float BitsToFloat(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float BFloat16ToFloat(std::uint16_t h) { return BitsToFloat(std::uint32_t{h} << 16); }

inline float HalfToFloat(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16;
  std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
  if (exponent == 0) {
    if (mantissa == 0) return BitsToFloat(sign);
    // subnormal: normalise the mantissa
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    mantissa &= 0x3ffu;
    exponent = static_cast<std::uint32_t>(1 - shift);
  }
  return BitsToFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

}  // namespace tracin::detail
