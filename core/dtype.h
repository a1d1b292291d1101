// Element types of stored tensors and conversions to the FP32 that the CPU
// engine computes in. Thread-safe (pure functions).
#ifndef SWITCHYARD_CORE_DTYPE_H_
#define SWITCHYARD_CORE_DTYPE_H_

#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/status/statusor.h"

namespace switchyard {

enum class DType { kF32, kF16, kBF16, kI64, kI32 };

// Bytes per element.
size_t DTypeSize(DType dtype);
// Safetensors spelling: "F32", "F16", "BF16", "I64", "I32".
std::string_view DTypeName(DType dtype);
// Parses the safetensors spelling; InvalidArgument names an unsupported one.
absl::StatusOr<DType> ParseDType(std::string_view name);

inline float Bf16ToF32(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float F16ToF32(uint16_t bits);
uint16_t F32ToF16(float f);

// Converts `count` elements of `dtype` at `src` (little-endian, possibly
// unaligned) to FP32. dtype must be F32, F16 or BF16.
void ConvertToF32(DType dtype, const void* src, size_t count, float* dst);

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_DTYPE_H_
