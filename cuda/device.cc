#include "cuda/device.h"

#include "absl/strings/str_format.h"

namespace switchyard::cuda {

absl::Status DeviceStatus() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: "no device" is an answer, not a sticky failure
    return absl::UnavailableError(absl::StrCat("no usable CUDA device: ", cudaGetErrorName(err),
                                               " (", cudaGetErrorString(err), ")"));
  }
  if (count == 0) return absl::UnavailableError("no usable CUDA device: the runtime sees none");
  return absl::OkStatus();
}

bool HasDevice() { return DeviceStatus().ok(); }

absl::StatusOr<std::string> DescribeDevice(int device) {
  cudaDeviceProp prop;
  SY_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  return absl::StrFormat("%s (sm_%d%d, %d SMs, %.1f GiB)", prop.name, prop.major, prop.minor,
                         prop.multiProcessorCount,
                         static_cast<double>(prop.totalGlobalMem) / (1ull << 30));
}

absl::StatusOr<double> PeakMemoryBandwidth(int device) {
  // cudaDeviceProp::memoryClockRate is gone in CUDA 13; the attributes stay.
  int clock_khz = 0, bus_bits = 0;
  SY_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device));
  SY_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device));
  return 2.0 * static_cast<double>(clock_khz) * 1e3 * static_cast<double>(bus_bits) / 8.0;
}

absl::Status UploadAndWait(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  SY_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  SY_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaContext>> CudaContext::Create(int device) {
  auto ctx = std::unique_ptr<CudaContext>(new CudaContext());
  ctx->device_ = device;
  SY_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  SY_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&ctx->stream_, cudaStreamNonBlocking));
  SY_ASSIGN_OR_RETURN(ctx->blas_, Cublas());
  const CublasApi& blas = *ctx->blas_;
  SY_CUBLAS_RETURN_IF_ERROR(blas.create(&ctx->cublas_));
  SY_CUBLAS_RETURN_IF_ERROR(blas.set_stream(ctx->cublas_, ctx->stream_));
  SY_CUBLAS_RETURN_IF_ERROR(blas.set_math_mode(ctx->cublas_, CUBLAS_DEFAULT_MATH));
  SY_CUBLAS_RETURN_IF_ERROR(blas.set_pointer_mode(ctx->cublas_, CUBLAS_POINTER_MODE_HOST));
  return ctx;
}

CudaContext::~CudaContext() {
  if (cublas_ != nullptr) blas_->destroy(cublas_);
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
}

absl::Status CudaContext::MakeCurrent() const {
  SY_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  return absl::OkStatus();
}

absl::Status CudaContext::Synchronize() const {
  // Reports errors of the queued work (kernels that faulted, failed copies).
  // Launch errors were already reported where the launch was checked.
  SY_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::StatusOr<CudaEvent> CudaEvent::Create() {
  CudaEvent e;
  SY_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e.event_, cudaEventDisableTiming));
  return e;
}

CudaEvent::~CudaEvent() {
  if (event_ != nullptr) cudaEventDestroy(event_);
}

absl::Status CudaEvent::Record(cudaStream_t stream) {
  SY_CUDA_RETURN_IF_ERROR(cudaEventRecord(event_, stream));
  return absl::OkStatus();
}

absl::Status CudaEvent::Synchronize() const {
  SY_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(event_));
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
