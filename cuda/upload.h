// Checkpoint tensors to device memory: what both halves of the model use to
// put their weights on a GPU. Uploads are synchronous (the data is on the
// device when a call returns); they run at load time only.
//
// Thread-safety: thread-safe (no shared state).
#ifndef SWITCHYARD_CUDA_UPLOAD_H_
#define SWITCHYARD_CUDA_UPLOAD_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/checkpoint.h"
#include "core/status_macros.h"
#include "cuda/device.h"
#include "cuda/linear.h"

namespace switchyard::cuda {

// Uploads the row-wise concatenation of the selected 2-D tensors `names`
// (each [rows_i, cols]) as one [Σ rows_i, cols] matrix of `dtype`. Stored
// dtypes are converted on the host (BF16 -> FP32 exactly; FP32/F16 -> BF16
// rounding to nearest even); a tensor already in `dtype` is copied as is.
absl::StatusOr<DeviceMatrix> UploadMatrix(const Checkpoint& checkpoint,
                                          const std::vector<std::string>& names, DeviceDType dtype);

// One stored tensor (any dtype) as an FP32 device vector.
absl::StatusOr<DeviceBuffer<float>> UploadVector(const Checkpoint& checkpoint,
                                                 const std::string& name);

// A host vector as a device buffer of the same type.
template <typename T>
absl::StatusOr<DeviceBuffer<T>> UploadHostVector(const std::vector<T>& host) {
  SY_ASSIGN_OR_RETURN(DeviceBuffer<T> dev, DeviceBuffer<T>::Create(host.size()));
  SY_RETURN_IF_ERROR(UploadAndWait(dev.data(), host.data(), host.size() * sizeof(T)));
  return dev;
}

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_UPLOAD_H_
