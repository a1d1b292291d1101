// SwiGLU from the fused gate/up projection: act[n, f] = silu(gu[n, f]) * gu[n, F + f],
// silu(g) = g / (1 + exp(-g)), as core/cpu_ops.cc SwiGlu.
//
// Legend: N rows (tokens routed to an expert), F expert ffn.
//   gate_up  [N, 2F]  FP32, device: per row the w1 (gate) outputs, then the w3 (up) outputs
//   act      [N, F]   FP32, device
#ifndef SWITCHYARD_CUDA_KERNELS_SWIGLU_H_
#define SWITCHYARD_CUDA_KERNELS_SWIGLU_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"

namespace switchyard::cuda {

absl::Status LaunchSwiGlu(const float* gate_up, int rows, int ffn, float* act, cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_SWIGLU_H_
