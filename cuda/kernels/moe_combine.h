// The MoE combine, a weighted scatter-add: per token t,
//   h[t] += Σ_k w[t, k] · expert_out[src[t, k]]
// with the sum taken from 0 in the given k order before adding it to h, as
// gateway/model_runner.cc does (the runner lists each token's K rows in
// expert-index order, the reference's summation order).
//
// Legend: T tokens, K experts per token, D hidden.
//   expert_out  [T*K, D]  FP32, device: every expert's output rows, grouped by expert
//   src         [T, K]    int32, device: token t's rows in expert_out
//   w           [T, K]    FP32, device: their router weights
//   h           [T, D]    FP32, device, updated in place
#ifndef SWITCHYARD_CUDA_KERNELS_MOE_COMBINE_H_
#define SWITCHYARD_CUDA_KERNELS_MOE_COMBINE_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace switchyard::cuda {

absl::Status LaunchMoeCombine(const float* expert_out, const int32_t* src, const float* w,
                              int tokens, int top_k, int dim, float* h, cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_MOE_COMBINE_H_
