// Device plumbing for the CUDA backend: device discovery, RAII device and
// pinned host buffers, and the stream + cuBLAS handle every launch goes
// through.
//
// Every CUDA failure is an absl::Status (cuda/status.h); nothing here aborts.
// Copies are asynchronous on the given stream unless a function says
// otherwise; the caller synchronises before reading results on the host.
//
// Thread-safety: DeviceStatus, HasDevice, DescribeDevice and PeakMemoryBandwidth are
// thread-safe. Buffers and CudaContext are thread-compatible: one thread uses
// an object at a time (CudaExpertBackend serialises its calls with a mutex).
#ifndef SWITCHYARD_CUDA_DEVICE_H_
#define SWITCHYARD_CUDA_DEVICE_H_

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "cuda/cublas_api.h"
#include "cuda/status.h"

namespace switchyard::cuda {

// OK when the CUDA runtime can be initialised and sees at least one device;
// otherwise why not, as the runtime says it ("no CUDA-capable device",
// "driver version is insufficient", ...).
absl::Status DeviceStatus();
// DeviceStatus().ok(): false on a machine without a GPU or driver.
bool HasDevice();

// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)".
absl::StatusOr<std::string> DescribeDevice(int device = 0);

// Theoretical DRAM bandwidth in bytes per second:
// 2 (double data rate) × memory clock × bus width / 8.
absl::StatusOr<double> PeakMemoryBandwidth(int device = 0);

// Element types the backend stores on the device.
enum class DeviceDType { kF32, kBF16 };
inline size_t DeviceDTypeSize(DeviceDType t) { return t == DeviceDType::kF32 ? 4 : 2; }
inline const char* DeviceDTypeName(DeviceDType t) {
  return t == DeviceDType::kF32 ? "f32" : "bf16";
}

// Where a Buffer's memory lives: how it is allocated and freed.
struct DeviceMemory {
  static constexpr const char* kAllocator = "cudaMalloc";
  static cudaError_t Allocate(void** p, size_t bytes) { return cudaMalloc(p, bytes); }
  static void Free(void* p) { cudaFree(p); }
};
struct PinnedHostMemory {  // page-locked host memory, for asynchronous copies
  static constexpr const char* kAllocator = "cudaMallocHost";
  static cudaError_t Allocate(void** p, size_t bytes) { return cudaMallocHost(p, bytes); }
  static void Free(void* p) { cudaFreeHost(p); }
};

// `count` elements of T in the memory `Memory` allocates. Move-only.
template <typename T, typename Memory>
class Buffer {
 public:
  Buffer() = default;
  ~Buffer() { Reset(); }
  Buffer(Buffer&& other) noexcept
      : ptr_(std::exchange(other.ptr_, nullptr)), count_(std::exchange(other.count_, 0)) {}
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      Reset();
      ptr_ = std::exchange(other.ptr_, nullptr);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // Uninitialised memory for `count` elements (count 0: an empty buffer).
  static absl::StatusOr<Buffer> Create(size_t count) {
    Buffer b;
    SY_RETURN_IF_ERROR(b.EnsureCapacity(count));
    return b;
  }

  // Makes room for at least `count` elements (RESOURCE_EXHAUSTED when the
  // memory is not there). When the buffer is smaller it
  // is freed and reallocated: the contents are lost, and no queued device
  // work or pending copy may still use the old memory (synchronise first).
  absl::Status EnsureCapacity(size_t count) {
    if (count <= count_) return absl::OkStatus();
    if (count > SIZE_MAX / sizeof(T)) {
      return absl::ResourceExhaustedError(absl::StrCat(count, " elements overflow size_t bytes"));
    }
    Reset();
    void* p = nullptr;
    const size_t bytes = count * sizeof(T);
    if (const cudaError_t err = Memory::Allocate(&p, bytes); err != cudaSuccess) {
      const std::string call = absl::StrCat(Memory::kAllocator, "(", bytes, " bytes)");
      absl::Status status = CudaErrorStatus(err, call.c_str(), __FILE__, __LINE__);
      // Out of memory is a condition callers handle (a smaller batch, a
      // refused request), not an internal error.
      if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(status.message());
      return status;
    }
    ptr_ = static_cast<T*>(p);
    count_ = count;
    return absl::OkStatus();
  }

  void Reset() {
    // An error is ignored: there is nothing to do about it in a destructor.
    if (ptr_ != nullptr) Memory::Free(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }

  T* data() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }
  bool empty() const { return count_ == 0; }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

template <typename T>
using DeviceBuffer = Buffer<T, DeviceMemory>;
template <typename T>
using PinnedBuffer = Buffer<T, PinnedHostMemory>;

// Asynchronous copies of `count` elements on `stream`. With pageable host
// memory the runtime stages the data, and the call returns once the host
// buffer may be reused (host to device) or holds the data (device to host).
template <typename T>
absl::Status CopyToDevice(T* dst, const T* src, size_t count, cudaStream_t stream) {
  if (count == 0) return absl::OkStatus();
  SY_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyHostToDevice, stream));
  return absl::OkStatus();
}
template <typename T>
absl::Status CopyToHost(T* dst, const T* src, size_t count, cudaStream_t stream) {
  if (count == 0) return absl::OkStatus();
  SY_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyDeviceToHost, stream));
  return absl::OkStatus();
}
template <typename T>
absl::Status CopyOnDevice(T* dst, const T* src, size_t count, cudaStream_t stream) {
  if (count == 0) return absl::OkStatus();
  SY_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dst, src, count * sizeof(T), cudaMemcpyDeviceToDevice, stream));
  return absl::OkStatus();
}

// Copies `bytes` from host memory to the device and returns once they are
// there. A plain cudaMemcpy from pageable memory may return while its DMA is
// still in flight on the legacy default stream, which work queued on a
// CudaContext's non-blocking stream does not wait for. For loading weights
// and tests; the serving path copies asynchronously on its stream.
absl::Status UploadAndWait(void* dst, const void* src, size_t bytes);

// A CUDA event without timing: marks a point in a stream so that the host
// can wait for the work queued before it and not for what was queued after
// (the micro-batch ping-pong of gateway/cuda_model_runner.h).
// Thread-compatible.
class CudaEvent {
 public:
  static absl::StatusOr<CudaEvent> Create();
  CudaEvent() = default;
  CudaEvent(CudaEvent&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
  CudaEvent& operator=(CudaEvent&& other) noexcept {
    std::swap(event_, other.event_);
    return *this;
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  ~CudaEvent();

  // Marks the current end of `stream`.
  absl::Status Record(cudaStream_t stream);
  // Waits for the work before the last Record; returns its error, if any.
  absl::Status Synchronize() const;

 private:
  cudaEvent_t event_ = nullptr;
};

// One device, one non-blocking stream and one cuBLAS handle bound to it.
// Everything a CudaContext launches is ordered on its stream.
class CudaContext {
 public:
  // Selects `device` for the calling thread, creates the stream and handle.
  // cuBLAS runs in its default math mode: FP32 GEMMs stay FP32 (no TF32).
  static absl::StatusOr<std::unique_ptr<CudaContext>> Create(int device = 0);
  ~CudaContext();
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }
  // The cuBLAS entry points (loaded with dlopen; see cublas_api.h).
  const CublasApi& blas() const { return *blas_; }

  // Makes `device()` current on the calling thread (threads other than the
  // creating one call this before using the context).
  absl::Status MakeCurrent() const;
  // Waits for everything queued on the stream; returns the error of the
  // queued work, if any.
  absl::Status Synchronize() const;

 private:
  CudaContext() = default;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  const CublasApi* blas_ = nullptr;
};

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_DEVICE_H_
