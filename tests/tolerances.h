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

}  // namespace switchyard::tolerance

#endif  // SWITCHYARD_TESTS_TOLERANCES_H_
