#include "cuda/kernels/kernel_util.cuh"
#include "cuda/kernels/moe_combine.h"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

// One block per token; threads stride over D.
__global__ void MoeCombineKernel(const float* __restrict__ expert_out,         // [T*K, D]
                                 const int32_t* __restrict__ src,              // [T, K]
                                 const float* __restrict__ w,                  // [T, K]
                                 int top_k, int dim, float* __restrict__ h) {  // [T, D]
  const int t = blockIdx.x;
  const int32_t* rows = src + static_cast<int64_t>(t) * top_k;
  const float* weights = w + static_cast<int64_t>(t) * top_k;
  float* hr = h + static_cast<int64_t>(t) * dim;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int k = 0; k < top_k; ++k) {
      acc += weights[k] * expert_out[static_cast<int64_t>(rows[k]) * dim + d];
    }
    hr[d] += acc;
  }
}

}  // namespace

absl::Status LaunchMoeCombine(const float* expert_out, const int32_t* src, const float* w,
                              int tokens, int top_k, int dim, float* h, cudaStream_t stream) {
  if (tokens <= 0 || dim <= 0 || top_k <= 0) return absl::OkStatus();
  MoeCombineKernel<<<tokens, 256, 0, stream>>>(expert_out, src, w, top_k, dim, h);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("MoeCombineKernel");
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
