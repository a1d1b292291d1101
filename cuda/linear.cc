#include "cuda/linear.h"

#include "absl/strings/str_cat.h"
#include "cuda/kernels/f32_to_bf16.h"
#include "cuda/status.h"

namespace switchyard::cuda {

// cuBLAS is column-major. A row-major matrix M[r, c] occupies memory exactly
// as the column-major matrix M^T[c, r] with leading dimension c. So in
// column-major terms the buffers hold
//   x (row-major [T, K])  ->  X' = x^T, K × T, ld K
//   W (row-major [N, K])  ->  W' = W^T, K × N, ld K
//   y (row-major [T, N])  ->  Y' = y^T, N × T, ld N
// and y = x W^T is, transposed, y^T = W x^T, i.e.
//   Y'(N × T) = op_T(W')(N × K) · op_N(X')(K × T).
// Hence gemm(transa = T, transb = N, m = N, n = T, k = K,
//            A = W, lda = K, B = x, ldb = K, C = y, ldc = N).
absl::Status Linear(const CudaContext& ctx, const float* x, int tokens, const MatrixView& w,
                    float* y, bool accumulate, __nv_bfloat16* bf16_scratch,
                    size_t bf16_scratch_elems) {
  if (tokens < 0) return absl::InvalidArgumentError("Linear: negative token count");
  if (tokens == 0 || w.rows == 0) return absl::OkStatus();
  if (w.data == nullptr || w.cols <= 0) {
    return absl::InvalidArgumentError("Linear: empty weight matrix");
  }
  const int m = w.rows, n = tokens, k = w.cols;
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  if (w.dtype == DeviceDType::kF32) {
    SY_CUBLAS_RETURN_IF_ERROR(ctx.blas().sgemm(ctx.cublas(), CUBLAS_OP_T, CUBLAS_OP_N, m, n, k,
                                               &alpha, static_cast<const float*>(w.data), k, x, k,
                                               &beta, y, m));
    return absl::OkStatus();
  }
  const size_t need = static_cast<size_t>(tokens) * static_cast<size_t>(k);
  if (bf16_scratch == nullptr || bf16_scratch_elems < need) {
    return absl::InvalidArgumentError(
        absl::StrCat("Linear: BF16 scratch holds ", bf16_scratch_elems, " elements, needs ", need));
  }
  // "BF16 mode": activations rounded to BF16, FP32 accumulation and output.
  SY_RETURN_IF_ERROR(LaunchF32ToBf16(x, static_cast<int64_t>(need), bf16_scratch, ctx.stream()));
  SY_CUBLAS_RETURN_IF_ERROR(ctx.blas().gemm_ex(
      ctx.cublas(), CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w.data, CUDA_R_16BF, k, bf16_scratch,
      CUDA_R_16BF, k, &beta, y, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
