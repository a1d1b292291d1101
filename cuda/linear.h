// Projections through cuBLAS: y[T, N] = x[T, K] · W[N, K]^T (+ y).
//
// Legend: T tokens (rows of x), K in features, N out features.
//   x  [T, K]  FP32, device, row-major
//   W  [N, K]  FP32 or BF16, device, row-major (the Hugging Face layout
//              [out_features, in_features])
//   y  [T, N]  FP32, device, row-major
//
// FP32 weights: cublasSgemm in FP32 (the context's default math mode: no
// TF32), so results equal the CPU's up to FP32 summation order.
// BF16 weights: x is first rounded to BF16 (into `bf16_scratch`), then
// cublasGemmEx with BF16 A/B, FP32 C and CUBLAS_COMPUTE_32F (FP32
// accumulation).
//
// Thread-safety: as the CudaContext it runs on.
#ifndef SWITCHYARD_CUDA_LINEAR_H_
#define SWITCHYARD_CUDA_LINEAR_H_

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "cuda/device.h"

namespace switchyard::cuda {

// A weight matrix W[rows = N, cols = K] on the device, not owned.
struct MatrixView {
  const void* data = nullptr;
  DeviceDType dtype = DeviceDType::kF32;
  int rows = 0;  // N, out features
  int cols = 0;  // K, in features
};

// An owned device weight matrix.
struct DeviceMatrix {
  DeviceBuffer<uint8_t> storage;  // rows * cols elements of dtype
  DeviceDType dtype = DeviceDType::kF32;
  int rows = 0;
  int cols = 0;

  MatrixView view() const { return {storage.data(), dtype, rows, cols}; }
  size_t bytes() const { return storage.bytes(); }
};

// y[T, N] = x[T, K] · W^T, or y += x · W^T when `accumulate`. tokens == 0 is a
// no-op. With BF16 weights `bf16_scratch` must hold at least T * K elements
// (InvalidArgument otherwise); with FP32 weights it is unused (may be null).
absl::Status Linear(const CudaContext& ctx, const float* x, int tokens, const MatrixView& w,
                    float* y, bool accumulate, __nv_bfloat16* bf16_scratch,
                    size_t bf16_scratch_elems);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_LINEAR_H_
