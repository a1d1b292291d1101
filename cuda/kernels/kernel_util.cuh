// Small helpers shared by the kernels in this folder. Device code only
// (included from .cu files).
#ifndef SWITCHYARD_CUDA_KERNELS_KERNEL_UTIL_CUH_
#define SWITCHYARD_CUDA_KERNELS_KERNEL_UTIL_CUH_

#include <cuda_runtime.h>

#include <cstdint>

namespace switchyard::cuda::kernels {

inline constexpr int kWarp = 32;

// Blocks for a grid-stride loop over n elements with `threads` per block,
// capped (the loop covers the rest). n must be > 0.
inline unsigned int GridFor(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  constexpr int64_t kMaxBlocks = 1 << 20;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Sum over the 32 lanes of a warp; every lane gets the total. All lanes must call it.
__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024);
// every thread gets the total. `scratch` holds 32 floats of shared memory.
// All threads must call it; it synchronises the block.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  v = WarpSum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < warps ? scratch[lane] : 0.0f;
  return WarpSum(total);
}

}  // namespace switchyard::cuda::kernels

#endif  // SWITCHYARD_CUDA_KERNELS_KERNEL_UTIL_CUH_
