#include "cuda/kernels/gather_rows.h"
#include "cuda/kernels/kernel_util.cuh"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

// One block per gathered row; threads stride over D.
__global__ void GatherRowsKernel(const float* __restrict__ x, int dim,
                                 const int32_t* __restrict__ rows,
                                 float* __restrict__ out) {  // [N, D]
  const int i = blockIdx.x;
  const float* src = x + static_cast<int64_t>(rows[i]) * dim;  // [D]
  float* dst = out + static_cast<int64_t>(i) * dim;            // [D]
  for (int d = threadIdx.x; d < dim; d += blockDim.x) dst[d] = src[d];
}

}  // namespace

absl::Status LaunchGatherRows(const float* x, int dim, const int32_t* rows, int count, float* out,
                              cudaStream_t stream) {
  if (count <= 0 || dim <= 0) return absl::OkStatus();
  GatherRowsKernel<<<count, 256, 0, stream>>>(x, dim, rows, out);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("GatherRowsKernel");
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
