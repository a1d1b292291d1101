#include <cmath>

#include "cuda/kernels/kernel_util.cuh"
#include "cuda/kernels/rope_rotate_half.h"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

constexpr int kThreads = 128;

// blockIdx.y strides over tokens; threads stride over that token's (head, i) pairs.
__global__ void RopeRotateHalfKernel(float* x, int64_t row_stride,
                                     const int32_t* __restrict__ positions,  // [T]
                                     int heads, int head_dim,
                                     const float* __restrict__ inv_freq,  // [hd/2]
                                     int tokens) {
  const int half = head_dim / 2;
  for (int t = blockIdx.y; t < tokens; t += gridDim.y) {
    const double pos = static_cast<double>(positions[t]);
    float* row = x + static_cast<int64_t>(t) * row_stride;
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < heads * half;
         k += gridDim.x * blockDim.x) {
      const int h = k / half, i = k % half;
      // The angle in double as the CPU; cos/sin rounded to FP32.
      double s, c;
      sincos(pos * static_cast<double>(inv_freq[i]), &s, &c);
      const float cf = static_cast<float>(c), sf = static_cast<float>(s);
      float* v = row + static_cast<int64_t>(h) * head_dim;  // [hd]
      const float a = v[i], b = v[i + half];
      // Explicitly rounded products: no FMA contraction, the CPU's arithmetic.
      v[i] = __fsub_rn(__fmul_rn(a, cf), __fmul_rn(b, sf));
      v[i + half] = __fadd_rn(__fmul_rn(b, cf), __fmul_rn(a, sf));
    }
  }
}

}  // namespace

std::vector<float> RopeInvFreq(int head_dim, double theta) {
  const int half = head_dim / 2;
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    // Exactly core/cpu_ops.cc: inv_freq in float as Hugging Face computes it.
    inv_freq[i] =
        1.0f / static_cast<float>(std::pow(theta, (2.0 * i) / static_cast<double>(head_dim)));
  }
  return inv_freq;
}

absl::Status LaunchRopeRotateHalf(float* x, int64_t row_stride, const int32_t* positions,
                                  int tokens, int heads, int head_dim, const float* inv_freq,
                                  cudaStream_t stream) {
  if (head_dim % 2 != 0) {
    return absl::InvalidArgumentError("rope: head_dim must be even");
  }
  if (tokens <= 0 || heads <= 0 || head_dim == 0) return absl::OkStatus();
  const int pairs = heads * (head_dim / 2);
  const dim3 grid((pairs + kThreads - 1) / kThreads, tokens < 65535 ? tokens : 65535);
  RopeRotateHalfKernel<<<grid, kThreads, 0, stream>>>(x, row_stride, positions, heads, head_dim,
                                                      inv_freq, tokens);
  SY_CUDA_RETURN_IF_LAUNCH_FAILED("RopeRotateHalfKernel");
  return absl::OkStatus();
}

}  // namespace switchyard::cuda
