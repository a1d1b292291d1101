// Tensors on the wire (switchyard.v1.Tensor): FP32 rows packed as raw
// little-endian bytes, F32 (exact) or BF16 (half the bytes).
// Thread-safety: pure functions.
#ifndef SWITCHYARD_RPC_TENSOR_CODEC_H_
#define SWITCHYARD_RPC_TENSOR_CODEC_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "switchyard/v1/tensor.pb.h"

namespace switchyard::rpc {

// Packs rows[N, D] into `out` as `dtype` (DTYPE_F32 or DTYPE_BF16).
void EncodeMatrix(const float* rows, int64_t n, int64_t d, v1::DType dtype, v1::Tensor* out);

// Unpacks a [N, D] tensor into FP32. INVALID_ARGUMENT (naming `what`) unless
// it is rank 2 with D columns, N >= 1, a supported dtype and the exact byte
// count.
absl::StatusOr<std::vector<float>> DecodeMatrix(const v1::Tensor& tensor, int64_t d,
                                                const char* what);

// Like DecodeMatrix, but into `out`, which has room for exactly `rows` rows
// of D: also INVALID_ARGUMENT unless the tensor has `rows` rows. Decodes
// straight into the caller's buffer (no intermediate vector).
absl::Status DecodeMatrixInto(const v1::Tensor& tensor, int64_t d, int64_t rows, float* out,
                              const char* what);

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_TENSOR_CODEC_H_
