#include "rpc/tensor_codec.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "core/cpu_ops.h"
#include "core/dtype.h"

namespace switchyard::rpc {

namespace {

// Rounds rows[count] to BF16 a chunk at a time and hands each chunk's bytes
// to `sink(bytes, size)`: vector rounding (cpu::RoundToBf16) into a small
// buffer, because the destination's bytes are not uint16_t objects.
template <typename Sink>
void RoundToBf16InChunks(const float* rows, int64_t count, Sink&& sink) {
  constexpr int64_t kChunk = 2048;
  uint16_t chunk[kChunk];
  for (int64_t begin = 0; begin < count; begin += kChunk) {
    const int64_t n = std::min(kChunk, count - begin);
    cpu::RoundToBf16(rows + begin, n, chunk);
    sink(reinterpret_cast<const char*>(chunk), static_cast<size_t>(n) * 2);
  }
}

// Writes rows[count] as `dtype` (BF16 or F32) to `out`, which need not be
// aligned.
void WriteElements(const float* rows, int64_t count, v1::DType dtype, char* out) {
  if (dtype == v1::DTYPE_BF16) {
    RoundToBf16InChunks(rows, count, [&out](const char* bytes, size_t size) {
      std::memcpy(out, bytes, size);
      out += size;
    });
  } else {
    std::memcpy(out, rows, static_cast<size_t>(count) * sizeof(float));
  }
}

v1::DType WireDType(v1::DType dtype) {
  return dtype == v1::DTYPE_BF16 ? v1::DTYPE_BF16 : v1::DTYPE_F32;
}

void SetMatrixShape(int64_t n, int64_t d, v1::DType dtype, v1::Tensor* out) {
  out->Clear();
  out->set_dtype(WireDType(dtype));
  out->add_shape(n);
  out->add_shape(d);
}

}  // namespace

size_t EncodedMatrixBytes(int64_t n, int64_t d, v1::DType dtype) {
  return static_cast<size_t>(n * d) * (WireDType(dtype) == v1::DTYPE_BF16 ? 2 : sizeof(float));
}

void EncodeMatrix(const float* rows, int64_t n, int64_t d, v1::DType dtype, v1::Tensor* out) {
  SetMatrixShape(n, d, dtype, out);
  std::string* data = out->mutable_data();
  const int64_t count = n * d;
  if (out->dtype() == v1::DTYPE_F32) {
    data->assign(reinterpret_cast<const char*>(rows), static_cast<size_t>(count) * sizeof(float));
    return;
  }
  // BF16 chunks appended after a reserve, not written over a resize, which
  // would first zero MiBs at 256 rows (issue #10).
  data->reserve(static_cast<size_t>(count) * 2);
  RoundToBf16InChunks(rows, count,
                      [data](const char* bytes, size_t size) { data->append(bytes, size); });
}

void DescribeMatrixInFrameTail(int64_t n, int64_t d, v1::DType dtype, uint64_t tail_offset,
                               v1::Tensor* out) {
  SetMatrixShape(n, d, dtype, out);
  out->set_frame_tail_offset(tail_offset);
}

void EncodeMatrixTo(const float* rows, int64_t n, int64_t d, v1::DType dtype, char* out) {
  WriteElements(rows, n * d, WireDType(dtype), out);
}

namespace {

// Checks `tensor` is a well-formed [N, D] matrix; returns N, its dtype and
// its element bytes (in `data`, or for a tensor whose bytes are in a
// version 2 frame's tail, in `frame_tail`).
absl::Status CheckMatrix(const v1::Tensor& tensor, int64_t d, const char* what,
                         std::optional<std::string_view> frame_tail, int64_t* rows,
                         DType* dtype_out, std::string_view* bytes) {
  if (tensor.shape_size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": expected a rank-2 tensor [N, ", d,
                                                   "], got rank ", tensor.shape_size()));
  }
  const int64_t n = tensor.shape(0);
  if (n < 1 || n > (int64_t{1} << 24) || tensor.shape(1) != d) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": expected shape [N >= 1, ", d,
                                                   "], got [", n, ", ", tensor.shape(1), "]"));
  }
  DType dtype;
  switch (tensor.dtype()) {
    case v1::DTYPE_F32:
      dtype = DType::kF32;
      break;
    case v1::DTYPE_BF16:
      dtype = DType::kBF16;
      break;
    case v1::DTYPE_F16:
      dtype = DType::kF16;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": unsupported dtype ", v1::DType_Name(tensor.dtype())));
  }
  const size_t expected = static_cast<size_t>(n * d) * DTypeSize(dtype);
  if (tensor.has_frame_tail_offset()) {
    if (!frame_tail.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": frame_tail_offset is set, but the tensor did not come in a version 2 frame"));
    }
    const uint64_t offset = tensor.frame_tail_offset();
    if (!tensor.data().empty() || offset > frame_tail->size() ||
        expected > frame_tail->size() - offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": ", expected, " data bytes at frame tail offset ", offset, " (and ",
          tensor.data().size(), " in data), but the frame's tail has ", frame_tail->size()));
    }
    *bytes = frame_tail->substr(offset, expected);
  } else {
    if (tensor.data().size() != expected) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": ", tensor.data().size(), " data bytes, expected ", expected));
    }
    *bytes = tensor.data();
  }
  *rows = n;
  *dtype_out = dtype;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<float>> DecodeMatrix(const v1::Tensor& tensor, int64_t d,
                                                const char* what) {
  int64_t n = 0;
  DType dtype;
  std::string_view bytes;
  if (absl::Status s = CheckMatrix(tensor, d, what, std::nullopt, &n, &dtype, &bytes); !s.ok()) {
    return s;
  }
  std::vector<float> out(static_cast<size_t>(n * d));
  ConvertToF32(dtype, bytes.data(), out.size(), out.data());
  return out;
}

absl::Status DecodeMatrixInto(const v1::Tensor& tensor, int64_t d, int64_t rows, float* out,
                              const char* what, std::optional<std::string_view> frame_tail) {
  int64_t n = 0;
  DType dtype;
  std::string_view bytes;
  if (absl::Status s = CheckMatrix(tensor, d, what, frame_tail, &n, &dtype, &bytes); !s.ok()) {
    return s;
  }
  if (n != rows) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", n, " rows, expected ", rows));
  }
  ConvertToF32(dtype, bytes.data(), static_cast<size_t>(n * d), out);
  return absl::OkStatus();
}

}  // namespace switchyard::rpc
