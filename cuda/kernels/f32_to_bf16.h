// FP32 to BF16, round to nearest even (as core/dtype.h F32ToBf16 and torch).
//
// Legend: n elements.
//   x  [n]  FP32, device
//   y  [n]  BF16, device
#ifndef SWITCHYARD_CUDA_KERNELS_F32_TO_BF16_H_
#define SWITCHYARD_CUDA_KERNELS_F32_TO_BF16_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace switchyard::cuda {

absl::Status LaunchF32ToBf16(const float* x, int64_t n, __nv_bfloat16* y, cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_F32_TO_BF16_H_
