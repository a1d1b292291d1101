// BF16 to FP32 (exact).
//
// Legend: n elements.
//   x  [n]  BF16, device
//   y  [n]  FP32, device
#ifndef SWITCHYARD_CUDA_KERNELS_BF16_TO_F32_H_
#define SWITCHYARD_CUDA_KERNELS_BF16_TO_F32_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace switchyard::cuda {

absl::Status LaunchBf16ToF32(const __nv_bfloat16* x, int64_t n, float* y, cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_BF16_TO_F32_H_
