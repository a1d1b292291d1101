// Causal attention with grouped-query heads and an optional sliding window,
// for prefill chunks and decode tokens alike: every token attends over its
// own sequence's cache, positions [first, pos] with
// first = sliding_window > 0 ? max(0, pos - sliding_window + 1) : 0
// (so the step's K/V must already be appended; see kv_append.h).
//
// Legend: T tokens in the step, B sequences, H query heads, Hkv kv heads
// (H % Hkv == 0; query head h reads kv head h / (H / Hkv)), hd head dim
// (at most 256), kv_dim = Hkv * hd, Bt = kKvBlockTokens; the paged cache
// (slab and block tables) in kv_layout.h.
//   q        token t's head h at q[t * q_stride + h * hd .. + hd); FP32, device
//            (the fused qkv buffer after RoPE: q = qkv, q_stride = (H + 2 Hkv) hd)
//   kv       the slab ([N][L][2][Bt][kv_dim], FP32 or BF16, read as FP32)
//            and the step's block tables ([B] SeqKvDesc)
//   tok_seq  [T] int32, device: token t's sequence (index into kv.seqs)
//   tok_pos  [T] int32, device: token t's position, < that sequence's
//            num_blocks * Bt
//   out      [T, H, hd] FP32, device
// K[j], V[j] are the rows of position j: slot j % Bt of block table[j / Bt].
// out[t, h] = Σ_j softmax_j(q[t, h] · K[j] * scale) V[j], scale = 1/sqrt(float(hd)),
// computed with an online softmax (one block per (t, h), its warps splitting
// the positions, their partial results merged at the end): the CPU's math up
// to FP32 rounding order.
#ifndef SWITCHYARD_CUDA_KERNELS_ATTENTION_H_
#define SWITCHYARD_CUDA_KERNELS_ATTENTION_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "cuda/kernels/kv_layout.h"

namespace switchyard::cuda {

inline constexpr int kAttentionMaxHeadDim = 256;

absl::Status LaunchAttention(const float* q, int64_t q_stride, int tokens, int heads, int kv_heads,
                             int head_dim, int sliding_window, const PagedKv& kv,
                             const int32_t* tok_seq, const int32_t* tok_pos, int layer, float* out,
                             cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_ATTENTION_H_
