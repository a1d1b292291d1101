#include "cuda/kernels/kernel_util.cuh"
#include "cuda/kernels/router_topk.h"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

constexpr int kThreads = 128;

// One thread per token. No per-thread arrays: a probability is recomputed
// from its logit when needed (the same expression gives the same value), and
// the chosen experts are read back from the output row.
__global__ void RouterTopKKernel(const float* __restrict__ logits,  // [T, E]
                                 int tokens, int num_experts, int top_k,
                                 int32_t* __restrict__ experts,  // [T, K]
                                 float* __restrict__ weights) {  // [T, K]
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const float* x = logits + static_cast<int64_t>(t) * num_experts;  // [E]
  int32_t* chosen = experts + static_cast<int64_t>(t) * top_k;      // [K]
  float* w = weights + static_cast<int64_t>(t) * top_k;             // [K]

  // Softmax as core/cpu_ops.cc SoftmaxInPlace: max, exp, sum in index order, × 1/sum.
  float max_v = x[0];
  for (int e = 1; e < num_experts; ++e) max_v = fmaxf(max_v, x[e]);
  float sum = 0.0f;
  for (int e = 0; e < num_experts; ++e) sum += expf(x[e] - max_v);
  const float inv = 1.0f / sum;

  // Top K by (probability desc, index asc): repeatedly the best expert not yet
  // chosen; a strict '>' keeps the lower index on ties.
  float top_sum = 0.0f;
  for (int k = 0; k < top_k; ++k) {
    int best = -1;
    float best_p = 0.0f;
    for (int e = 0; e < num_experts; ++e) {
      bool taken = false;
      for (int j = 0; j < k; ++j) taken |= chosen[j] == e;
      if (taken) continue;
      const float p = expf(x[e] - max_v) * inv;
      if (best < 0 || p > best_p) {
        best = e;
        best_p = p;
      }
    }
    chosen[k] = best;
    w[k] = best_p;
    top_sum += best_p;
  }
  for (int k = 0; k < top_k; ++k) w[k] = w[k] / top_sum;
}

}  // namespace

absl::Status LaunchRouterTopK(const float* logits, int tokens, int num_experts, int top_k,
                              int32_t* experts, float* weights, cudaStream_t stream) {
  if (num_experts <= 0 || top_k <= 0 || top_k > num_experts) {
    return absl::InvalidArgumentError("router: need 0 < top_k <= num_experts");
  }
  if (tokens <= 0) return absl::OkStatus();
  RouterTopKKernel<<<(tokens + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      logits, tokens, num_experts, top_k, experts, weights);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("RouterTopKKernel");
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
