// CUDA and cuBLAS errors as absl::Status.
//
// SY_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, n));
// SY_CUBLAS_RETURN_IF_ERROR(cublasSgemm(...));
//
// On failure the enclosing function returns
//   absl::InternalError("cuda/device.cc:42: cudaMalloc(&p, n) failed: cudaErrorMemoryAllocation
//   (out of memory)")
// (the shape of ggml's CUDA_CHECK, without the abort). Nothing in the CUDA
// backend exits or aborts on a CUDA error: every error travels up as a status.
// Works in functions returning absl::Status or absl::StatusOr<T>.
//
// Thread-safety: stateless.
#ifndef SWITCHYARD_CUDA_STATUS_H_
#define SWITCHYARD_CUDA_STATUS_H_

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cuda/cublas_api.h"

namespace switchyard::cuda {

// `file` from __FILE__, shortened to start at the repository's "cuda/" folder
// when it holds one (CMake passes absolute paths).
inline const char* ShortSourcePath(const char* file) {
  const char* best = nullptr;
  for (const char* p = std::strstr(file, "cuda/"); p != nullptr; p = std::strstr(p + 1, "cuda/")) {
    if (p == file || p[-1] == '/') best = p;
  }
  return best != nullptr ? best : file;
}

// Also resets the thread's last-error state (cudaGetLastError), so that a
// failed call (say an out-of-memory cudaMalloc that the caller turns into
// RESOURCE_EXHAUSTED) is not reported again by a later launch check. Sticky
// errors (a faulted kernel) cannot be reset: every later call reports them.
inline absl::Status CudaErrorStatus(cudaError_t err, const char* expr, const char* file, int line) {
  cudaGetLastError();
  return absl::InternalError(absl::StrCat(ShortSourcePath(file), ":", line, ": ", expr,
                                          " failed: ", cudaGetErrorName(err), " (",
                                          cudaGetErrorString(err), ")"));
}

inline absl::Status CublasErrorStatus(cublasStatus_t err, const char* expr, const char* file,
                                      int line) {
  // cuBLAS is loaded at run time (cublas_api.h); it is, if a call failed.
  absl::StatusOr<const CublasApi*> blas = Cublas();
  const std::string name = blas.ok() ? (*blas)->status_name(err) : std::to_string(err);
  const std::string text = blas.ok() ? (*blas)->status_string(err) : "cuBLAS not loaded";
  return absl::InternalError(absl::StrCat(ShortSourcePath(file), ":", line, ": ", expr,
                                          " failed: ", name, " (", text, ")"));
}

}  // namespace switchyard::cuda

#define SY_CUDA_RETURN_IF_ERROR(expr)                                                      \
  do {                                                                                     \
    const cudaError_t sy_cuda_err_ = (expr);                                               \
    if (sy_cuda_err_ != cudaSuccess) {                                                     \
      return ::switchyard::cuda::CudaErrorStatus(sy_cuda_err_, #expr, __FILE__, __LINE__); \
    }                                                                                      \
  } while (0)

#define SY_CUBLAS_RETURN_IF_ERROR(expr)                                                        \
  do {                                                                                         \
    const cublasStatus_t sy_cublas_err_ = (expr);                                              \
    if (sy_cublas_err_ != CUBLAS_STATUS_SUCCESS) {                                             \
      return ::switchyard::cuda::CublasErrorStatus(sy_cublas_err_, #expr, __FILE__, __LINE__); \
    }                                                                                          \
  } while (0)

// After a kernel launch: launch-configuration errors (and sticky errors from
// earlier asynchronous work) as a status naming the kernel.
#define SY_CUDA_RETURN_IF_LAUNCH_FAILED(kernel_name)                                               \
  do {                                                                                             \
    const cudaError_t sy_cuda_err_ = cudaGetLastError();                                           \
    if (sy_cuda_err_ != cudaSuccess) {                                                             \
      return ::switchyard::cuda::CudaErrorStatus(sy_cuda_err_, "launch of " kernel_name, __FILE__, \
                                                 __LINE__);                                        \
    }                                                                                              \
  } while (0)

#endif  // SWITCHYARD_CUDA_STATUS_H_
