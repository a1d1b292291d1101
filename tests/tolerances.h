// Every numerical tolerance the tests use, in one table, with why.
#ifndef SWITCHYARD_TESTS_TOLERANCES_H_
#define SWITCHYARD_TESTS_TOLERANCES_H_

namespace switchyard::tolerance {

// CPU FP32 engine vs Hugging Face transformers (FP32 compute on BF16 weights):
// |ours - ref| <= kHfAbs + kHfRel * |ref| per logit (issue #2's bound).
inline constexpr double kHfAbs = 1e-3;
inline constexpr double kHfRel = 1e-4;
// Router logits vs Hugging Face, same bound.
inline constexpr double kRouterAbs = 1e-3;
inline constexpr double kRouterRel = 1e-4;
// Greedy tokens are compared up to the first reference step whose top-1 minus
// top-2 logit margin is below this (float rounding may flip such a choice).
inline constexpr double kGreedyMargin = 1e-3;

// CPU engine with K/V stored as BF16 (FP32 matmuls) vs Hugging Face (FP32):
// every cached K and V value is rounded to 8 significant bits (relative
// error <= 2^-9), which moves attention scores and outputs. Measured on
// tiny-mixtral (HfParityTest.Bf16KvCacheMatchesReferenceWithinBf16Tolerance):
// max |logit diff| 0.061 at |ref| <= 17 (FP32 K/V: 9e-6); 2.5x margin. Greedy
// tokens are compared up to the first reference step whose top-1 minus top-2
// margin is below twice that error.
inline constexpr double kBf16KvLogitAbs = 0.15;
inline constexpr double kBf16KvLogitRel = 0.01;
inline constexpr double kBf16KvGreedyMargin = 0.12;

// Same engine, different batching/chunking/GEMM shapes (GEMV vs GEMM, other
// summation order): FP32 rounding only.
inline constexpr double kReorderAbs = 2e-4;
inline constexpr double kReorderRel = 1e-4;

// Single CPU kernels against naive loops.
inline constexpr double kKernelAbs = 1e-5;
inline constexpr double kKernelRel = 1e-5;

// Expert outputs sent as BF16 on the wire vs the same FFN on the same
// (bf16-rounded) inputs in FP32: the output is rounded to 8 significant
// bits, at most half an ulp = 2^-9 relative; 2x margin, plus a tiny absolute
// term for outputs near zero.
inline constexpr double kBf16WireAbs = 1e-6;
inline constexpr double kBf16WireRel = 4e-3;

// ---- GPU: the CUDA backend (tests/cuda) ----
// Single FP32 kernels and FP32 cuBLAS GEMMs against the CPU oracle on O(1)
// random data: FP32 rounding in another order (tree sums, FMA contraction,
// CUDA's expf within 2 ulp of the correctly rounded value).
inline constexpr double kGpuKernelAbs = 1e-5;
inline constexpr double kGpuKernelRel = 1e-4;
// A BF16 cuBLAS GEMM (BF16 inputs, FP32 accumulation) against the CPU's FP32
// GEMM on the same BF16-rounded inputs: the products are exact, but the
// tensor cores' FP32 accumulation is not IEEE round-to-nearest at every add.
inline constexpr double kGpuBf16GemmAbs = 1e-4;
inline constexpr double kGpuBf16GemmRel = 1e-3;
// One expert FFN in BF16 mode against its CPU model (BF16-rounded input, FP32
// GEMM, SwiGLU, BF16-rounded activation, FP32 GEMM): the activation is
// re-rounded, so an FP32-level difference can flip one BF16 rounding, moving
// an output by up to 2^-8 |act| |w2| (about 1e-2 on O(1) data).
inline constexpr double kGpuBf16ExpertAbs = 2e-2;
inline constexpr double kGpuBf16ExpertRel = 1e-2;
// One expert FFN in BF16 mode against the FP32 expert (what a BF16 expert
// process serves in place of a CPU one): input, weights and activation each
// rounded to BF16 (relative 2^-9 each). Measured on tiny-mixtral experts with
// inputs in [-2, 2]: max |diff| 3.4e-3; about 3x margin.
inline constexpr double kGpuBf16ExpertVsF32Abs = 1e-2;
inline constexpr double kGpuBf16ExpertVsF32Rel = 1e-2;
// The GPU in FP32 mode against HF uses kHfAbs/kHfRel and all 24 greedy
// tokens, against the CPU engine kReorderAbs/kReorderRel, as does the
// remote-expert path (CPU FP32 experts) against the all-GPU path.
//
// The GPU in BF16 mode (BF16 weights, activations rounded to BF16 before each
// projection GEMM, FP32 accumulation, K/V cached in BF16, FP32 everywhere
// else) against HF (FP32 compute on the BF16 weights). Measured on the CPU
// model of BF16 mode (tests/cuda/bf16_emulation.h) for tiny-mixtral: max
// |logit diff| 0.097 at |ref| <= 17 with an FP32 KV cache, 0.107 with the
// BF16 one (FP32 alone: 9e-6). About 2.3x margin at the largest error.
inline constexpr double kGpuBf16LogitAbs = 0.25;
inline constexpr double kGpuBf16LogitRel = 0.02;
// The GPU in BF16 mode against that CPU model of BF16 mode: same rounding
// points, another FP32 summation order. Usually ~2e-6, but a BF16 rounding
// that flips on one activation propagates: the model with double instead of
// float accumulation moved logits by at most 0.044.
inline constexpr double kGpuBf16EmulationAbs = 0.1;
inline constexpr double kGpuBf16EmulationRel = 0.01;
// Greedy tokens in BF16 mode are compared up to the first step whose top-1
// minus top-2 margin is below this: twice the largest logit error seen
// (0.097), so a smaller margin may legitimately flip. Applied to HF's margins
// against HF's tokens and to the CPU model's margins against its tokens.
inline constexpr double kGpuBf16GreedyMargin = 0.2;

// cpu::Linear (skinny kernel and BLAS, FP32 and BF16 weights) against a
// double-accumulated naive loop on O(1) random data with Kin up to 1024: the
// FP32 accumulation error grows with Kin (about sqrt(Kin) u sum|x w|, with
// sum|x w| ~ 256 there) and outputs near zero get no relative slack. Measured
// at most 1.7e-5 (OpenBLAS, T = 33, Kin = 1024); ~6x margin. The same bound
// covers every kernel level (scalar, avx2, avx512, avx512_bf16) in both
// precisions, the BF16 precision against the loop over BF16-rounded
// activations (its products are exact, only the sums round): measured at most
// 1.5e-5 for the vector kernels and 5.7e-5 for the scalar loop (one serial
// FP32 sum over Kin = 3584); the scalar margin is 1.75x
// (KernelLevelTest.EveryLevelAndPrecisionMatchesOracleOnAwkwardShapes prints
// the table).
inline constexpr double kLinearAbs = 1e-4;
inline constexpr double kLinearRel = 1e-5;

}  // namespace switchyard::tolerance

#endif  // SWITCHYARD_TESTS_TOLERANCES_H_
