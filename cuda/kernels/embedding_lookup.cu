#include "cuda/kernels/embedding_lookup.h"
#include "cuda/kernels/kernel_util.cuh"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

__device__ __forceinline__ float ToF32(float v) { return v; }
__device__ __forceinline__ float ToF32(__nv_bfloat16 v) { return __bfloat162float(v); }

// One block per token; threads stride over D.
template <typename W>
__global__ void EmbeddingLookupKernel(const int32_t* __restrict__ ids,
                                      const W* __restrict__ table,                  // [V, D]
                                      int vocab, int dim, float* __restrict__ h) {  // [T, D]
  const int t = blockIdx.x;
  const int32_t id = ids[t];
  float* out = h + static_cast<int64_t>(t) * dim;  // [D]
  if (id < 0 || id >= vocab) {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[i] = 0.0f;
    return;
  }
  const W* row = table + static_cast<int64_t>(id) * dim;  // [D]
  for (int i = threadIdx.x; i < dim; i += blockDim.x) out[i] = ToF32(row[i]);
}

template <typename W>
absl::Status Launch(const int32_t* ids, int tokens, const W* table, int vocab, int dim, float* h,
                    cudaStream_t stream) {
  if (tokens <= 0 || dim <= 0) return absl::OkStatus();
  EmbeddingLookupKernel<W><<<tokens, 256, 0, stream>>>(ids, table, vocab, dim, h);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("EmbeddingLookupKernel");
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchEmbeddingLookup(const int32_t* ids, int tokens, const float* table, int vocab,
                                   int dim, float* h, cudaStream_t stream) {
  return Launch(ids, tokens, table, vocab, dim, h, stream);
}

absl::Status LaunchEmbeddingLookup(const int32_t* ids, int tokens, const __nv_bfloat16* table,
                                   int vocab, int dim, float* h, cudaStream_t stream) {
  return Launch(ids, tokens, table, vocab, dim, h, stream);
}

}  // namespace switchyard::cuda
