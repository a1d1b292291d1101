// Rotary position embedding, "rotate half" convention (pairs i and i + hd/2),
// in place, as core/cpu_ops.cc RopeRotateHalf: inv_freq in FP32 exactly as
// the CPU computes it (RopeInvFreq, on the host), the angle pos * inv_freq
// and its cos/sin in double, then rounded to FP32.
//
// Legend: T tokens, Hr heads rotated, hd head dim.
//   x          T rows of Hr heads of hd floats: element (t, h, i) at
//              x[t * row_stride + h * hd + i]; FP32, device. Rotating q and k
//              of a fused qkv row at once: x = qkv, Hr = H + Hkv,
//              row_stride = (H + 2 Hkv) hd.
//   positions  [T]     int32, device
//   inv_freq   [hd/2]  FP32, device (upload RopeInvFreq)
#ifndef SWITCHYARD_CUDA_KERNELS_ROPE_ROTATE_HALF_H_
#define SWITCHYARD_CUDA_KERNELS_ROPE_ROTATE_HALF_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace switchyard::cuda {

// [hd/2]: inv_freq[i] = 1 / float(theta^(2i / hd)), bit-identical to the CPU's.
std::vector<float> RopeInvFreq(int head_dim, double theta);

// head_dim must be even.
absl::Status LaunchRopeRotateHalf(float* x, int64_t row_stride, const int32_t* positions,
                                  int tokens, int heads, int head_dim, const float* inv_freq,
                                  cudaStream_t stream);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_ROPE_ROTATE_HALF_H_
