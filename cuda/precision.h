// The compute precision of the CUDA backend, shared by both halves of the
// model (the dense side and the experts).
//
//   kF32   every weight in FP32 on the device, FP32 cuBLAS GEMMs (no TF32):
//          the CPU engine's results up to FP32 rounding order.
//   kBF16  projection weights in BF16; activations are rounded to BF16
//          before each GEMM, which accumulates in FP32 (cuda/linear.h).
#ifndef SWITCHYARD_CUDA_PRECISION_H_
#define SWITCHYARD_CUDA_PRECISION_H_

#include <string_view>

#include "absl/status/statusor.h"
#include "cuda/device.h"

namespace switchyard::cuda {

enum class Precision { kF32, kBF16 };

// "f32" / "bf16".
const char* PrecisionName(Precision precision);
// Parses "f32" / "fp32" / "bf16"; InvalidArgument otherwise.
absl::StatusOr<Precision> ParsePrecision(std::string_view name);

// Element type of the projection weights in `precision`.
inline DeviceDType WeightDType(Precision precision) {
  return precision == Precision::kF32 ? DeviceDType::kF32 : DeviceDType::kBF16;
}

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_PRECISION_H_
