// Residual add: y[n] += x[n], as core/cpu_ops.cc AddInPlace.
//
// Legend: n elements.
//   y  [n]  FP32, device, updated in place
//   x  [n]  FP32, device
#ifndef SWITCHYARD_CUDA_KERNELS_RESIDUAL_ADD_H_
#define SWITCHYARD_CUDA_KERNELS_RESIDUAL_ADD_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace switchyard::cuda {

absl::Status LaunchResidualAdd(float* y, const float* x, int64_t n, cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_RESIDUAL_ADD_H_
