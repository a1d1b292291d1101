#include "cuda/kernels/kernel_util.cuh"
#include "cuda/kernels/residual_add.h"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void ResidualAddKernel(float* __restrict__ y, const float* __restrict__ x, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] += x[i];
  }
}

}  // namespace

absl::Status LaunchResidualAdd(float* y, const float* x, int64_t n, cudaStream_t stream) {
  if (n <= 0) return absl::OkStatus();
  ResidualAddKernel<<<kernels::GridFor(n, kThreads), kThreads, 0, stream>>>(y, x, n);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("ResidualAddKernel");
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
