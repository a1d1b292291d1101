#include <cuda_bf16.h>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/kernel_util.cuh"
#include "cuda/kernels/kv_append.h"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

__device__ __forceinline__ void Store(float* dst, float v) { *dst = v; }
__device__ __forceinline__ void Store(__nv_bfloat16* dst, float v) {
  *dst = __float2bfloat16_rn(v);
}

// One block per token; threads stride over kv_dim for both K and V.
template <typename KvT>
__global__ void KvAppendKernel(const float* __restrict__ src, int64_t src_stride, int k_offset,
                               int v_offset, int kv_dim, KvT* __restrict__ slab, int layers,
                               const int32_t* __restrict__ block_tables,
                               const SeqKvDesc* __restrict__ seqs,
                               const int32_t* __restrict__ tok_seq,
                               const int32_t* __restrict__ tok_pos, int layer) {
  const int t = blockIdx.x;
  const SeqKvDesc d = seqs[tok_seq[t]];
  const int pos = tok_pos[t];
  // The runner guarantees this never happens.
  if (pos < 0 || pos >= d.num_blocks * kKvBlockTokens) return;
  const int32_t block = block_tables[d.table_begin + pos / kKvBlockTokens];
  const int slot = pos % kKvBlockTokens;
  const float* row = src + static_cast<int64_t>(t) * src_stride;
  KvT* k_dst = slab + PagedKvRowOffset(block, layers, layer, 0, slot, kv_dim);  // [kv_dim]
  KvT* v_dst = slab + PagedKvRowOffset(block, layers, layer, 1, slot, kv_dim);  // [kv_dim]
  for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
    Store(k_dst + i, row[k_offset + i]);
    Store(v_dst + i, row[v_offset + i]);
  }
}

template <typename KvT>
absl::Status Launch(const float* src, int64_t src_stride, int k_offset, int v_offset, int tokens,
                    int kv_dim, const PagedKv& kv, const int32_t* tok_seq, const int32_t* tok_pos,
                    int layer, cudaStream_t stream) {
  KvAppendKernel<KvT><<<tokens, 128, 0, stream>>>(
      src, src_stride, k_offset, v_offset, kv_dim, static_cast<KvT*>(kv.slab), kv.layers,
      kv.block_tables, kv.seqs, tok_seq, tok_pos, layer);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("KvAppendKernel");
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchKvAppend(const float* src, int64_t src_stride, int k_offset, int v_offset,
                            int tokens, int kv_dim, const PagedKv& kv, const int32_t* tok_seq,
                            const int32_t* tok_pos, int layer, cudaStream_t stream) {
  if (tokens <= 0 || kv_dim <= 0) return absl::OkStatus();
  if (layer < 0 || layer >= kv.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_append: layer ", layer, " outside a slab of ", kv.layers, " layers"));
  }
  if (kv.dtype == KvDType::kBF16) {
    return Launch<__nv_bfloat16>(src, src_stride, k_offset, v_offset, tokens, kv_dim, kv, tok_seq,
                                 tok_pos, layer, stream);
  }
  return Launch<float>(src, src_stride, k_offset, v_offset, tokens, kv_dim, kv, tok_seq, tok_pos,
                       layer, stream);
}

}  // namespace switchyard::cuda
