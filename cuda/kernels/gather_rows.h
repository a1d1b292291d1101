// Row gather: out[i] = x[rows[i]] (the MoE's per-expert input batches, and
// the rows whose logits are wanted).
//
// Legend: R rows in x, N rows gathered, D row length.
//   x     [R, D]  FP32, device
//   rows  [N]     int32, device, each in [0, R)
//   out   [N, D]  FP32, device
#ifndef SWITCHYARD_CUDA_KERNELS_GATHER_ROWS_H_
#define SWITCHYARD_CUDA_KERNELS_GATHER_ROWS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace switchyard::cuda {

absl::Status LaunchGatherRows(const float* x, int dim, const int32_t* rows, int count, float* out,
                              cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_GATHER_ROWS_H_
