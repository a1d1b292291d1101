// cuBLAS for the CPU emulator (device_emulation.h): the calls of
// cuda/cublas_api.h implemented on the CPU from the cuBLAS documentation, in
// place of cuda/cublas_api.cc's dlopen of libcublas. Column-major, as
// cuBLAS: op(A) is m × k, op(B) k × n, C m × n, element (i, j) of a matrix
// with leading dimension ld at [i + j * ld]. Argument checks and the
// supported type combinations are cuBLAS's, so a wrong leading dimension or
// an unsupported mix of types fails here as it would on a GPU.
#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#include "cuda/cublas_api.h"

namespace switchyard::cuda {
namespace {

struct Handle {
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
};

cublasStatus_t Create(cublasHandle_t* handle) {
  *handle = reinterpret_cast<cublasHandle_t>(new Handle());
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t Destroy(cublasHandle_t handle) {
  delete reinterpret_cast<Handle*>(handle);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t SetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t SetMathMode(cublasHandle_t, cublasMath_t mode) {
  // FP32 GEMMs must stay FP32: only the default mode is emulated.
  return mode == CUBLAS_DEFAULT_MATH ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_SUPPORTED;
}
cublasStatus_t SetPointerMode(cublasHandle_t handle, cublasPointerMode_t mode) {
  reinterpret_cast<Handle*>(handle)->pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

float Bf16(const void* p, int64_t i) {
  uint16_t bits;
  std::memcpy(&bits, static_cast<const char*>(p) + 2 * i, 2);
  const uint32_t u = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The checks cuBLAS documents for gemm: CUBLAS_STATUS_INVALID_VALUE.
cublasStatus_t CheckGemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                         int m, int n, int k, int lda, int ldb, int ldc) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (reinterpret_cast<Handle*>(handle)->pointer_mode != CUBLAS_POINTER_MODE_HOST) {
    return CUBLAS_STATUS_NOT_SUPPORTED;  // alpha/beta are read from the host here
  }
  auto op_ok = [](cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T; };
  if (!op_ok(transa) || !op_ok(transb) || m < 0 || n < 0 || k < 0) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const int a_rows = transa == CUBLAS_OP_N ? m : k;
  const int b_rows = transb == CUBLAS_OP_N ? k : n;
  if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  return CUBLAS_STATUS_SUCCESS;
}

// C = alpha op(A) op(B) + beta C with FP32 accumulation; `a(i, l)` and
// `b(l, j)` read the stored matrices. With beta == 0, C is not read (cuBLAS:
// it may hold anything, NaN included).
template <typename ReadA, typename ReadB>
void Gemm(cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k, float alpha,
          ReadA a, int lda, ReadB b, int ldb, float beta, float* c, int ldc) {
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      float acc = 0.0f;
      for (int l = 0; l < k; ++l) {
        const int64_t ai = transa == CUBLAS_OP_N ? i + int64_t{l} * lda : l + int64_t{i} * lda;
        const int64_t bi = transb == CUBLAS_OP_N ? l + int64_t{j} * ldb : j + int64_t{l} * ldb;
        acc += a(ai) * b(bi);
      }
      float& out = c[i + int64_t{j} * ldc];
      out = beta == 0.0f ? alpha * acc : alpha * acc + beta * out;
    }
  }
}

cublasStatus_t Sgemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                     int m, int n, int k, const float* alpha, const float* A, int lda,
                     const float* B, int ldb, const float* beta, float* C, int ldc) {
  if (const cublasStatus_t s = CheckGemm(handle, transa, transb, m, n, k, lda, ldb, ldc);
      s != CUBLAS_STATUS_SUCCESS) {
    return s;
  }
  Gemm(
      transa, transb, m, n, k, *alpha, [A](int64_t i) { return A[i]; }, lda,
      [B](int64_t i) { return B[i]; }, ldb, *beta, C, ldc);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t GemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                      int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                      int lda, const void* B, cudaDataType Btype, int ldb, const void* beta,
                      void* C, cudaDataType Ctype, int ldc, cublasComputeType_t compute,
                      cublasGemmAlgo_t /*algo*/) {
  if (const cublasStatus_t s = CheckGemm(handle, transa, transb, m, n, k, lda, ldb, ldc);
      s != CUBLAS_STATUS_SUCCESS) {
    return s;
  }
  // The combinations with CUBLAS_COMPUTE_32F (float alpha and beta) that
  // the backend may use; cuBLAS has no A and B of different types.
  if (compute != CUBLAS_COMPUTE_32F || Ctype != CUDA_R_32F || Atype != Btype ||
      (Atype != CUDA_R_16BF && Atype != CUDA_R_32F)) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  float* c = static_cast<float*>(C);
  if (Atype == CUDA_R_16BF) {
    Gemm(
        transa, transb, m, n, k, a, [A](int64_t i) { return Bf16(A, i); }, lda,
        [B](int64_t i) { return Bf16(B, i); }, ldb, b, c, ldc);
  } else {
    const float* fa = static_cast<const float*>(A);
    const float* fb = static_cast<const float*>(B);
    Gemm(
        transa, transb, m, n, k, a, [fa](int64_t i) { return fa[i]; }, lda,
        [fb](int64_t i) { return fb[i]; }, ldb, b, c, ldc);
  }
  return CUBLAS_STATUS_SUCCESS;
}

const char* StatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:
      return "CUBLAS_STATUS_UNKNOWN";
  }
}
const char* StatusString(cublasStatus_t s) { return StatusName(s); }

}  // namespace

absl::StatusOr<const CublasApi*> Cublas() {
  static const CublasApi api = {
      .create = Create,
      .destroy = Destroy,
      .set_stream = SetStream,
      .set_math_mode = SetMathMode,
      .set_pointer_mode = SetPointerMode,
      .sgemm = Sgemm,
      .gemm_ex = GemmEx,
      .status_name = StatusName,
      .status_string = StatusString,
  };
  return &api;
}

}  // namespace switchyard::cuda
