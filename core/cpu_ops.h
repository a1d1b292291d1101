// CPU kernels of the Mixtral forward pass, in FP32. This readable path is
// the oracle every faster backend is tested against.
//
// Legend (dimension names used in shape comments throughout Switchyard):
//   T tokens in a step, D hidden, F expert ffn, E experts, K experts per token,
//   H query heads, Hkv key/value heads, hd head dim, V vocabulary, S cached positions.
//
// All matrices are row-major. Weights keep the Hugging Face layout
// [out_features, in_features], so a projection is y = x W^T.
// Thread-safety: pure functions over caller-owned buffers.
#ifndef SWITCHYARD_CORE_CPU_OPS_H_
#define SWITCHYARD_CORE_CPU_OPS_H_

#include <cstdint>

namespace switchyard::cpu {

// y[T, N] = x[T, Kin] · w[N, Kin]^T  (+ y when accumulate). Through BLAS.
void Linear(const float* x, const float* w, int tokens, int in_features, int out_features, float* y,
            bool accumulate = false);

// y[T, D] = x / sqrt(mean(x^2) + eps) * weight, per row.
void RmsNorm(const float* x, const float* weight, int tokens, int dim, float eps, float* y);

// Rotary embedding in place, "rotate half" convention (pairs i and i + hd/2),
// on x[T, heads, hd] with positions[T].
void RopeRotateHalf(float* x, const int32_t* positions, int tokens, int heads, int head_dim,
                    double theta);

// x[n] = softmax(x[n]) in place, numerically stable.
void SoftmaxInPlace(float* x, int n);

// out[N, F] = silu(gate[N, F]) * up[N, F]  (out may alias gate).
void SwiGlu(const float* gate, const float* up, int64_t count, float* out);

// y[n] += x[n]
void AddInPlace(float* y, const float* x, int64_t n);

}  // namespace switchyard::cpu

#endif  // SWITCHYARD_CORE_CPU_OPS_H_
