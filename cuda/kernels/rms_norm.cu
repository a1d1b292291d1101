#include "cuda/kernels/kernel_util.cuh"
#include "cuda/kernels/rms_norm.h"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

constexpr int kThreads = 256;

// One block per row.
__global__ void RmsNormKernel(const float* x,                    // [T, D]
                              const float* __restrict__ weight,  // [D]
                              int dim, float eps, float* y) {    // [T, D]
  __shared__ float scratch[kernels::kWarp];
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * dim;  // [D]
  float* yr = y + static_cast<int64_t>(blockIdx.x) * dim;        // [D]
  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) sum_sq += xr[i] * xr[i];
  sum_sq = kernels::BlockSum(sum_sq, scratch);
  // As the CPU: 1 / sqrt(sum / D + eps), IEEE division and square root.
  const float inv_rms = 1.0f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
  // Each thread reads its own elements before writing them: in place is safe.
  for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = weight[i] * (xr[i] * inv_rms);
}

}  // namespace

absl::Status LaunchRmsNorm(const float* x, const float* weight, int tokens, int dim, float eps,
                           float* y, cudaStream_t stream) {
  if (tokens <= 0 || dim <= 0) return absl::OkStatus();
  RmsNormKernel<<<tokens, kThreads, 0, stream>>>(x, weight, dim, eps, y);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("RmsNormKernel");
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
