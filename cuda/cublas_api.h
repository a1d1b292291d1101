// cuBLAS, loaded with dlopen on first use instead of being linked.
//
// Why: libcublasLt carries ~94 KB of static thread-local storage. Linked
// into a process, that block is carved out of every thread's stack, so any
// library thread started with a small fixed stack fails (the civetweb /metrics
// server, since replaced, ran 100 KB worker stacks). Loaded with dlopen, the
// TLS is allocated on demand instead, and processes that never use cuBLAS
// (the gateway on the CPU) never load it.
//
// Thread-safety: Cublas() is thread-safe; the table is immutable once loaded.
#ifndef SWITCHYARD_CUDA_CUBLAS_API_H_
#define SWITCHYARD_CUDA_CUBLAS_API_H_

#include <cublas_v2.h>

#include "absl/status/statusor.h"

namespace switchyard::cuda {

struct CublasApi {
  decltype(&cublasCreate_v2) create;
  decltype(&cublasDestroy_v2) destroy;
  decltype(&cublasSetStream_v2) set_stream;
  decltype(&cublasSetMathMode) set_math_mode;
  decltype(&cublasSetPointerMode_v2) set_pointer_mode;
  decltype(&cublasSgemm_v2) sgemm;
  // cublasGemmEx has a C++ overload taking a cudaDataType compute type; this
  // is the exported one, with cublasComputeType_t.
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                            int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                            cublasGemmAlgo_t);
  decltype(&cublasGetStatusName) status_name;
  decltype(&cublasGetStatusString) status_string;
};

// The loaded table. UNAVAILABLE naming the library (and dlerror) if
// libcublas cannot be loaded or lacks a symbol.
absl::StatusOr<const CublasApi*> Cublas();

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_CUBLAS_API_H_
