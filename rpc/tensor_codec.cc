#include "rpc/tensor_codec.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/cpu_ops.h"
#include "core/dtype.h"

namespace switchyard::rpc {

void EncodeMatrix(const float* rows, int64_t n, int64_t d, v1::DType dtype, v1::Tensor* out) {
  out->Clear();
  out->set_dtype(dtype);
  out->add_shape(n);
  out->add_shape(d);
  const int64_t count = n * d;
  std::string* data = out->mutable_data();
  if (dtype == v1::DTYPE_BF16) {
    // Vector rounding (cpu::RoundToBf16) through a small buffer: the string's
    // bytes are not uint16_t objects. Appended after a reserve, not written
    // over a resize, which would first zero MiBs at 256 rows (issue #10).
    data->clear();
    data->reserve(static_cast<size_t>(count) * 2);
    constexpr int64_t kChunk = 2048;
    uint16_t chunk[kChunk];
    for (int64_t begin = 0; begin < count; begin += kChunk) {
      const int64_t n = std::min(kChunk, count - begin);
      cpu::RoundToBf16(rows + begin, n, chunk);
      data->append(reinterpret_cast<const char*>(chunk), static_cast<size_t>(n) * 2);
    }
  } else {
    out->set_dtype(v1::DTYPE_F32);
    data->assign(reinterpret_cast<const char*>(rows), static_cast<size_t>(count) * sizeof(float));
  }
}

namespace {

// Checks `tensor` is a well-formed [N, D] matrix; returns N and its dtype.
absl::Status CheckMatrix(const v1::Tensor& tensor, int64_t d, const char* what, int64_t* rows,
                         DType* dtype_out) {
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
  if (tensor.data().size() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", tensor.data().size(), " data bytes, expected ", expected));
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
  if (absl::Status s = CheckMatrix(tensor, d, what, &n, &dtype); !s.ok()) return s;
  std::vector<float> out(static_cast<size_t>(n * d));
  ConvertToF32(dtype, tensor.data().data(), out.size(), out.data());
  return out;
}

absl::Status DecodeMatrixInto(const v1::Tensor& tensor, int64_t d, int64_t rows, float* out,
                              const char* what) {
  int64_t n = 0;
  DType dtype;
  if (absl::Status s = CheckMatrix(tensor, d, what, &n, &dtype); !s.ok()) return s;
  if (n != rows) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", n, " rows, expected ", rows));
  }
  ConvertToF32(dtype, tensor.data().data(), static_cast<size_t>(n * d), out);
  return absl::OkStatus();
}

}  // namespace switchyard::rpc
