// RMSNorm per row: y[t] = weight ⊙ (x[t] / sqrt(mean(x[t]^2) + eps)), as
// core/cpu_ops.cc RmsNorm (same operation order per element; the sum of
// squares is a tree sum, so results differ from the CPU by FP32 rounding).
//
// Legend: T tokens (rows), D dim.
//   x       [T, D]  FP32, device
//   weight  [D]     FP32, device
//   y       [T, D]  FP32, device; may alias x
#ifndef SWITCHYARD_CUDA_KERNELS_RMS_NORM_H_
#define SWITCHYARD_CUDA_KERNELS_RMS_NORM_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"

namespace switchyard::cuda {

absl::Status LaunchRmsNorm(const float* x, const float* weight, int tokens, int dim, float eps,
                           float* y, cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_RMS_NORM_H_
