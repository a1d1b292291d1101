#include "cuda/kernels/kernel_util.cuh"
#include "cuda/kernels/swiglu.h"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

constexpr int kThreads = 256;

// Grid-stride over the N * F outputs.
__global__ void SwiGluKernel(const float* __restrict__ gate_up,                  // [N, 2F]
                             int64_t count, int ffn, float* __restrict__ act) {  // [N, F]
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < count;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = k / ffn, f = k % ffn;
    const float g = gate_up[n * 2 * ffn + f];
    const float u = gate_up[n * 2 * ffn + ffn + f];
    act[k] = g / (1.0f + expf(-g)) * u;
  }
}

}  // namespace

absl::Status LaunchSwiGlu(const float* gate_up, int rows, int ffn, float* act,
                          cudaStream_t stream) {
  const int64_t count = static_cast<int64_t>(rows) * ffn;
  if (count <= 0) return absl::OkStatus();
  SwiGluKernel<<<kernels::GridFor(count, kThreads), kThreads, 0, stream>>>(gate_up, count, ffn,
                                                                           act);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("SwiGluKernel");
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
