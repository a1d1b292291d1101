#include "cuda/kernels/f32_to_bf16.h"
#include "cuda/kernels/kernel_util.cuh"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void F32ToBf16Kernel(const float* __restrict__ x, int64_t n,
                                __nv_bfloat16* __restrict__ y) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = __float2bfloat16_rn(x[i]);
  }
}

}  // namespace

absl::Status LaunchF32ToBf16(const float* x, int64_t n, __nv_bfloat16* y, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  F32ToBf16Kernel<<<kernels::GridFor(n, kThreads), kThreads, 0, stream>>>(x, n, y);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("F32ToBf16Kernel");
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
