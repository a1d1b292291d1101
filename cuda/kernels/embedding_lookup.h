// Token embeddings: h[T, D] = table[ids[t]] as FP32.
//
// Legend: T tokens, D hidden, V vocabulary.
//   ids    [T]     int32, device; each in [0, V) (the runner validates ids;
//                  an id outside that range writes a row of zeros)
//   table  [V, D]  FP32 or BF16, device, row-major
//   h      [T, D]  FP32, device
#ifndef SWITCHYARD_CUDA_KERNELS_EMBEDDING_LOOKUP_H_
#define SWITCHYARD_CUDA_KERNELS_EMBEDDING_LOOKUP_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace switchyard::cuda {

absl::Status LaunchEmbeddingLookup(const int32_t* ids, int tokens, const float* table, int vocab,
                                   int dim, float* h, cudaStream_t stream);
absl::Status LaunchEmbeddingLookup(const int32_t* ids, int tokens, const __nv_bfloat16* table,
                                   int vocab, int dim, float* h, cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_EMBEDDING_LOOKUP_H_
