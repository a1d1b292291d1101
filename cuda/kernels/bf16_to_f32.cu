#include "cuda/kernels/bf16_to_f32.h"
#include "cuda/kernels/kernel_util.cuh"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void Bf16ToF32Kernel(const __nv_bfloat16* __restrict__ x, int64_t n,
                                float* __restrict__ y) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = __bfloat162float(x[i]);
  }
}

}  // namespace

absl::Status LaunchBf16ToF32(const __nv_bfloat16* x, int64_t n, float* y, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  Bf16ToF32Kernel<<<kernels::GridFor(n, kThreads), kThreads, 0, stream>>>(x, n, y);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("Bf16ToF32Kernel");
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
