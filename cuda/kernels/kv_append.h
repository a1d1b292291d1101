// Writes the step's new keys and values into the paged device cache.
//
// Legend: T tokens in the step, B sequences in the step, kv_dim = Hkv * hd,
// Bt = kKvBlockTokens; the slab and block tables are in kv_layout.h.
//   src        [T, src_stride] FP32, device: token t's key row is
//              src[t * src_stride + k_offset .. + kv_dim), its value row
//              src[t * src_stride + v_offset .. + kv_dim) (the fused qkv
//              buffer after RoPE: k_offset = H hd, v_offset = (H + Hkv) hd)
//   kv         the slab ([N][L][2][Bt][kv_dim], FP32 or BF16) and the
//              step's block tables ([B] SeqKvDesc)
//   tok_seq    [T] int32, device: index into kv.seqs of token t's sequence
//   tok_pos    [T] int32, device: token t's position, < that sequence's
//              num_blocks * Bt
// For each t, with blk = table[pos / Bt], slot = pos % Bt:
//   K(blk, layer, slot) = key row, V(blk, layer, slot) = value row
// (rounded to nearest even in a BF16 slab).
#ifndef SWITCHYARD_CUDA_KERNELS_KV_APPEND_H_
#define SWITCHYARD_CUDA_KERNELS_KV_APPEND_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "cuda/kernels/kv_layout.h"

namespace switchyard::cuda {

absl::Status LaunchKvAppend(const float* src, int64_t src_stride, int k_offset, int v_offset,
                            int tokens, int kv_dim, const PagedKv& kv, const int32_t* tok_seq,
                            const int32_t* tok_pos, int layer, cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_KV_APPEND_H_
