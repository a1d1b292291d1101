#include "cuda/upload.h"

#include <algorithm>
#include <climits>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"

namespace switchyard::cuda {
namespace {

// Copies one stored tensor to `dst` (device) as `dtype`.
absl::Status UploadTensor(const TensorView& view, DeviceDType dtype, uint8_t* dst) {
  const size_t count = static_cast<size_t>(view.num_elements());
  if ((view.dtype == DType::kF32 && dtype == DeviceDType::kF32) ||
      (view.dtype == DType::kBF16 && dtype == DeviceDType::kBF16)) {
    SY_RETURN_IF_ERROR(UploadAndWait(dst, view.data, view.nbytes));
    return absl::OkStatus();
  }
  // Convert on the host in chunks (bounded memory whatever the tensor size).
  constexpr size_t kChunk = size_t{1} << 22;
  std::vector<float> f32(std::min(count, kChunk));
  std::vector<uint16_t> bf16(dtype == DeviceDType::kBF16 ? f32.size() : 0);
  const size_t src_esize = DTypeSize(view.dtype);
  for (size_t begin = 0; begin < count; begin += kChunk) {
    const size_t n = std::min(kChunk, count - begin);
    ConvertToF32(view.dtype, view.data + begin * src_esize, n, f32.data());
    if (dtype == DeviceDType::kF32) {
      SY_RETURN_IF_ERROR(UploadAndWait(dst + begin * sizeof(float), f32.data(), n * sizeof(float)));
    } else {
      for (size_t i = 0; i < n; ++i) bf16[i] = F32ToBf16(f32[i]);
      SY_RETURN_IF_ERROR(
          UploadAndWait(dst + begin * sizeof(uint16_t), bf16.data(), n * sizeof(uint16_t)));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DeviceBuffer<float>> UploadVector(const Checkpoint& checkpoint,
                                                 const std::string& name) {
  SY_ASSIGN_OR_RETURN(std::vector<float> host, checkpoint.ReadF32(name));
  SY_ASSIGN_OR_RETURN(DeviceBuffer<float> dev, DeviceBuffer<float>::Create(host.size()));
  SY_RETURN_IF_ERROR(UploadAndWait(dev.data(), host.data(), host.size() * sizeof(float)));
  return dev;
}

absl::StatusOr<DeviceMatrix> UploadMatrix(const Checkpoint& checkpoint,
                                          const std::vector<std::string>& names,
                                          DeviceDType dtype) {
  std::vector<TensorView> views;
  int64_t rows = 0, cols = -1;
  for (const std::string& name : names) {
    SY_ASSIGN_OR_RETURN(TensorView view, checkpoint.View(name));
    if (view.shape.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(name, " is not a matrix"));
    }
    if (cols >= 0 && view.shape[1] != cols) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " has ", view.shape[1], " columns, expected ", cols));
    }
    cols = view.shape[1];
    rows += view.shape[0];
    views.push_back(std::move(view));
  }
  if (views.empty() || rows > INT_MAX || cols > INT_MAX) {
    return absl::InvalidArgumentError("UploadMatrix: no tensors, or a dimension over INT_MAX");
  }
  DeviceMatrix m;
  m.dtype = dtype;
  m.rows = static_cast<int>(rows);
  m.cols = static_cast<int>(cols);
  const size_t esize = DeviceDTypeSize(dtype);
  SY_RETURN_IF_ERROR(m.storage.EnsureCapacity(static_cast<size_t>(rows) * cols * esize));
  uint8_t* dst = m.storage.data();
  for (const TensorView& view : views) {
    SY_RETURN_IF_ERROR(UploadTensor(view, dtype, dst));
    dst += static_cast<size_t>(view.num_elements()) * esize;
  }
  return m;
}

}  // namespace switchyard::cuda
