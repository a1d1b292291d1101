// Helpers for the CUDA backend's tests: a fixture that skips without a GPU,
// and synchronous host <-> device copies.
#ifndef SWITCHYARD_TESTS_CUDA_CUDA_TEST_UTIL_H_
#define SWITCHYARD_TESTS_CUDA_CUDA_TEST_UTIL_H_

#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/status_macros.h"
#include "cuda/device.h"
#include "gtest/gtest.h"

// `SY_ASSERT_OK_AND_ASSIGN(auto x, MakeX());` in a test body (void function).
#define SY_ASSERT_OK_AND_ASSIGN(lhs, expr) \
  SY_ASSERT_OK_AND_ASSIGN_IMPL_(SY_CONCAT_(sy_test_statusor_, __LINE__), lhs, expr)
#define SY_ASSERT_OK_AND_ASSIGN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  ASSERT_TRUE(tmp.ok()) << tmp.status();              \
  lhs = std::move(tmp).value()
#define SY_ASSERT_OK(expr)                                \
  do {                                                    \
    const ::absl::Status sy_test_status_ = (expr);        \
    ASSERT_TRUE(sy_test_status_.ok()) << sy_test_status_; \
  } while (0)

// In SetUp or a test body: skips the test when there is no usable CUDA
// device, saying why. With SWITCHYARD_REQUIRE_GPU=1 in the environment (as
// on the GPU machine) it fails instead, so a missing or too old driver cannot
// pass for a green run of skipped tests.
#define SY_SKIP_WITHOUT_GPU()                                                    \
  do {                                                                           \
    const ::absl::Status sy_device_status_ = ::switchyard::cuda::DeviceStatus(); \
    if (!sy_device_status_.ok()) {                                               \
      if (::switchyard::testing::GpuRequired()) FAIL() << sy_device_status_;     \
      GTEST_SKIP() << sy_device_status_.message() << ": GPU test skipped";       \
    }                                                                            \
  } while (0)

namespace switchyard::testing {

inline bool GpuRequired() {
  const char* v = std::getenv("SWITCHYARD_REQUIRE_GPU");
  return v != nullptr && std::string(v) == "1";
}

// Every GPU test derives from this: skipped without a device (see
// SY_SKIP_WITHOUT_GPU).
class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SY_SKIP_WITHOUT_GPU();
    auto ctx = cuda::CudaContext::Create();
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    ctx_ = std::move(*ctx);
  }
  cudaStream_t stream() const { return ctx_->stream(); }
  std::unique_ptr<cuda::CudaContext> ctx_;
};

template <typename T>
absl::StatusOr<cuda::DeviceBuffer<T>> Upload(const std::vector<T>& host) {
  SY_ASSIGN_OR_RETURN(auto dev, cuda::DeviceBuffer<T>::Create(host.size()));
  SY_RETURN_IF_ERROR(cuda::UploadAndWait(dev.data(), host.data(), host.size() * sizeof(T)));
  return dev;
}

// Waits for `stream`, then copies the first `count` elements back.
template <typename T>
absl::StatusOr<std::vector<T>> Download(const T* dev, size_t count, cudaStream_t stream) {
  SY_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  std::vector<T> host(count);
  if (count > 0) {
    SY_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(host.data(), dev, count * sizeof(T), cudaMemcpyDeviceToHost));
  }
  return host;
}

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_CUDA_CUDA_TEST_UTIL_H_
