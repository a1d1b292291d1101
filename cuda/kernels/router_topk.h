// Mixtral's sparse gate on the device, as attention_service/router.cc
// RouteTopK: probs = softmax(logits) over all E experts, keep the top K
// (ties to the lower expert index), renormalise them to sum to one.
//
// Legend: T tokens, E experts, K experts per token (K <= E).
//   logits   [T, E]  FP32, device
//   experts  [T, K]  int32, device: best first
//   weights  [T, K]  FP32, device: each row sums to 1
// One thread per token, the CPU's operation order (max, exp, running sum,
// multiply by 1/sum; the top-K sum in rank order), so the choices match the
// CPU's except where two probabilities differ by an ulp.
#ifndef SWITCHYARD_CUDA_KERNELS_ROUTER_TOPK_H_
#define SWITCHYARD_CUDA_KERNELS_ROUTER_TOPK_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace switchyard::cuda {

absl::Status LaunchRouterTopK(const float* logits, int tokens, int num_experts, int top_k,
                              int32_t* experts, float* weights, cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_ROUTER_TOPK_H_
