#include <cuda_bf16.h>

#include <cmath>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/attention.h"
#include "cuda/kernels/kernel_util.cuh"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

constexpr int kWarps = 4;                                        // per block
constexpr int kPerLane = kAttentionMaxHeadDim / kernels::kWarp;  // head dims per lane

__device__ __forceinline__ float ToF32(float v) { return v; }
__device__ __forceinline__ float ToF32(__nv_bfloat16 v) { return __bfloat162float(v); }

// One block per (token, head): blockIdx.x = t * H + h. Warp w takes positions
// first + w, first + w + kWarps, ...; lane l holds head dims l, l + 32, ...
// Each warp keeps a running max m, sum l and weighted value sum acc
// (online softmax); the warps' states are merged through shared memory.
// Position j's rows are found through the sequence's block table.
template <typename KvT>
__global__ void __launch_bounds__(kWarps* kernels::kWarp)
    AttentionKernel(const float* __restrict__ q, int64_t q_stride, int heads, int kv_heads,
                    int head_dim, int sliding_window, float scale,
                    const KvT* __restrict__ slab,  // [N][L][2][Bt][kv_dim]
                    int layers, const int32_t* __restrict__ block_tables,
                    const SeqKvDesc* __restrict__ seqs, const int32_t* __restrict__ tok_seq,
                    const int32_t* __restrict__ tok_pos, int layer,
                    float* __restrict__ out) {  // [T, H, hd]
  __shared__ float s_acc[kWarps][kAttentionMaxHeadDim];
  __shared__ float s_m[kWarps];
  __shared__ float s_l[kWarps];

  const int t = blockIdx.x / heads;
  const int h = blockIdx.x % heads;
  const int lane = threadIdx.x % kernels::kWarp;
  const int warp = threadIdx.x / kernels::kWarp;
  const int kv_head = h / (heads / kv_heads);
  const int kv_dim = kv_heads * head_dim;

  const SeqKvDesc d = seqs[tok_seq[t]];
  // The runner guarantees pos < d.num_blocks * Bt; clamp rather than read
  // past the table if it ever did not.
  const int pos = min(tok_pos[t], d.num_blocks * kKvBlockTokens - 1);
  const int first = sliding_window > 0 ? max(0, pos - sliding_window + 1) : 0;

  const float* qv = q + static_cast<int64_t>(t) * q_stride + static_cast<int64_t>(h) * head_dim;
  float qr[kPerLane];
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int dd = lane + i * kernels::kWarp;
    qr[i] = dd < head_dim ? qv[dd] : 0.0f;
    acc[i] = 0.0f;
  }

  const int32_t* table = block_tables + d.table_begin;  // [num_blocks]
  const int64_t head_offset = static_cast<int64_t>(kv_head) * head_dim;
  float m = -INFINITY;  // running max of this warp's scores
  float l = 0.0f;       // running Σ exp(score - m)
  for (int j = first + warp; j <= pos; j += kWarps) {
    const int32_t block = table[j / kKvBlockTokens];
    const int slot = j % kKvBlockTokens;
    const KvT* kr =
        slab + PagedKvRowOffset(block, layers, layer, 0, slot, kv_dim) + head_offset;  // [hd]
    const KvT* vr =
        slab + PagedKvRowOffset(block, layers, layer, 1, slot, kv_dim) + head_offset;  // [hd]
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int dd = lane + i * kernels::kWarp;
      if (dd < head_dim) dot += qr[i] * ToF32(kr[dd]);
    }
    dot = kernels::WarpSum(dot);
    const float s = dot * scale;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);  // 0 at the first position (m = -inf)
    const float p = expf(s - m_new);
    l = l * corr + p;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int dd = lane + i * kernels::kWarp;
      if (dd < head_dim) acc[i] = acc[i] * corr + p * ToF32(vr[dd]);
    }
    m = m_new;
  }

#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int dd = lane + i * kernels::kWarp;
    if (dd < head_dim) s_acc[warp][dd] = acc[i];
  }
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
  __syncthreads();

  // Merge: out = Σ_w acc_w e^(m_w - M) / Σ_w l_w e^(m_w - M). A warp that saw
  // no position has m_w = -inf and weighs 0.
  float big_m = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) big_m = fmaxf(big_m, s_m[w]);
  float weight[kWarps];
  float big_l = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = s_m[w] == -INFINITY ? 0.0f : expf(s_m[w] - big_m);
    big_l += s_l[w] * weight[w];
  }
  float* o = out + (static_cast<int64_t>(t) * heads + h) * head_dim;  // [hd]
  for (int dd = threadIdx.x; dd < head_dim; dd += blockDim.x) {
    float a = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) a += s_acc[w][dd] * weight[w];
    // No keys (not reached from the model) gives 0; a NaN score stays NaN,
    // as on the CPU, rather than hiding in a zero.
    o[dd] = first <= pos ? a / big_l : 0.0f;
  }
}

}  // namespace

absl::Status LaunchAttention(const float* q, int64_t q_stride, int tokens, int heads, int kv_heads,
                             int head_dim, int sliding_window, const PagedKv& kv,
                             const int32_t* tok_seq, const int32_t* tok_pos, int layer, float* out,
                             cudaStream_t stream) {
  if (head_dim <= 0 || head_dim > kAttentionMaxHeadDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention: head_dim ", head_dim, " outside [1, ", kAttentionMaxHeadDim, "]"));
  }
  if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention: ", heads, " query heads are not a multiple of ", kv_heads, " kv heads"));
  }
  if (tokens <= 0) return absl::OkStatus();
  if (layer < 0 || layer >= kv.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention: layer ", layer, " outside a slab of ", kv.layers, " layers"));
  }
  const int64_t blocks = static_cast<int64_t>(tokens) * heads;
  if (blocks > 0x7fffffff) return absl::InvalidArgumentError("attention: too many tokens");
  // As the CPU: 1 / sqrt(float(hd)) in float.
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const auto grid = static_cast<unsigned int>(blocks);
  if (kv.dtype == KvDType::kBF16) {
    AttentionKernel<__nv_bfloat16><<<grid, kWarps * kernels::kWarp, 0, stream>>>(
        q, q_stride, heads, kv_heads, head_dim, sliding_window, scale,
        static_cast<const __nv_bfloat16*>(kv.slab), kv.layers, kv.block_tables, kv.seqs, tok_seq,
        tok_pos, layer, out);
  } else {
    AttentionKernel<float><<<grid, kWarps * kernels::kWarp, 0, stream>>>(
        q, q_stride, heads, kv_heads, head_dim, sliding_window, scale,
        static_cast<const float*>(kv.slab), kv.layers, kv.block_tables, kv.seqs, tok_seq, tok_pos,
        layer, out);
  }
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("AttentionKernel");
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
