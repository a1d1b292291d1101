#include "cuda/kernels/kernel_util.cuh"
#include "cuda/kernels/kv_append.h"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

// One block per token; threads stride over kv_dim for both K and V.
__global__ void KvAppendKernel(const float* __restrict__ src, int64_t src_stride, int k_offset,
                               int v_offset, int kv_dim, const SeqKvDesc* __restrict__ seqs,
                               const int32_t* __restrict__ tok_seq,
                               const int32_t* __restrict__ tok_pos, int layer) {
  const int t = blockIdx.x;
  const SeqKvDesc d = seqs[tok_seq[t]];
  const int pos = tok_pos[t];
  if (pos < 0 || pos >= d.capacity) return;  // the runner guarantees this never happens
  const float* row = src + static_cast<int64_t>(t) * src_stride;
  float* k_dst = d.base + KvRowOffset(d.capacity, layer, 0, pos, kv_dim);  // [kv_dim]
  float* v_dst = d.base + KvRowOffset(d.capacity, layer, 1, pos, kv_dim);  // [kv_dim]
  for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
    k_dst[i] = row[k_offset + i];
    v_dst[i] = row[v_offset + i];
  }
}

}  // namespace

absl::Status LaunchKvAppend(const float* src, int64_t src_stride, int k_offset, int v_offset,
                            int tokens, int kv_dim, const SeqKvDesc* seqs, const int32_t* tok_seq,
                            const int32_t* tok_pos, int layer, cudaStream_t stream) {
  if (tokens <= 0 || kv_dim <= 0) return absl::OkStatus();
  KvAppendKernel<<<tokens, 128, 0, stream>>>(src, src_stride, k_offset, v_offset, kv_dim, seqs,
                                             tok_seq, tok_pos, layer);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("KvAppendKernel");
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
