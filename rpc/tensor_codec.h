// Tensors on the wire (switchyard.v1.Tensor): FP32 rows packed as raw
// little-endian bytes, F32 (exact) or BF16 (half the bytes), in the
// tensor's `data` or, in a version 2 frame (rpc/frame_socket.h), in the
// frame's tail.
// Thread-safety: pure functions.
#ifndef SWITCHYARD_RPC_TENSOR_CODEC_H_
#define SWITCHYARD_RPC_TENSOR_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "switchyard/v1/tensor.pb.h"

namespace switchyard::rpc {

// Packs rows[N, D] into `out` as `dtype` (DTYPE_BF16, or else DTYPE_F32).
void EncodeMatrix(const float* rows, int64_t n, int64_t d, v1::DType dtype, v1::Tensor* out);

// For a version 2 frame: the bytes [N, D] rows take as `dtype` (DTYPE_BF16,
// or else DTYPE_F32); `out` describes them at `tail_offset` of the frame's
// tail (its `data` empty); EncodeMatrixTo writes them there (`out` need not
// be aligned). Together, the same bytes EncodeMatrix puts in `data`.
size_t EncodedMatrixBytes(int64_t n, int64_t d, v1::DType dtype);
void DescribeMatrixInFrameTail(int64_t n, int64_t d, v1::DType dtype, uint64_t tail_offset,
                               v1::Tensor* out);
void EncodeMatrixTo(const float* rows, int64_t n, int64_t d, v1::DType dtype, char* out);

// Unpacks a [N, D] tensor into FP32. INVALID_ARGUMENT (naming `what`) unless
// it is rank 2 with D columns, N >= 1, a supported dtype and the exact byte
// count.
absl::StatusOr<std::vector<float>> DecodeMatrix(const v1::Tensor& tensor, int64_t d,
                                                const char* what);

// Like DecodeMatrix, but into `out`, which has room for exactly `rows` rows
// of D: also INVALID_ARGUMENT unless the tensor has `rows` rows. Decodes
// straight into the caller's buffer (no intermediate vector). A tensor whose
// bytes are in a frame's tail (frame_tail_offset) is read from `frame_tail`
// (FrameTail::view() of the frame it came in); INVALID_ARGUMENT if there is
// none or they do not fit in it.
absl::Status DecodeMatrixInto(const v1::Tensor& tensor, int64_t d, int64_t rows, float* out,
                              const char* what,
                              std::optional<std::string_view> frame_tail = std::nullopt);

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_TENSOR_CODEC_H_
