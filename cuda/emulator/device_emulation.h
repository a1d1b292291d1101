// A CPU emulator for this project's CUDA kernels, so that the CUDA backend's
// logic (indexing, layouts, launch configurations, the cuBLAS argument
// mapping, the whole CudaModelRunner) runs its GPU tests on machines without
// a GPU, CI included.
//
// How: cu_to_cc.py turns each cuda/kernels/*.cu into C++ that includes this
// header first and launches through emulator::Launch. A block's threads run
// as fibers on the calling thread, switched at __syncthreads and at warp
// shuffles, so block barriers and warp-synchronous code keep their meaning;
// kernels of files without barriers run each thread as a plain call. Blocks
// run one after another; launches are serialised process-wide. Device memory
// is host memory (fake_cudart.cc) and cuBLAS is a plain CPU implementation of
// the calls we make (fake_cublas.cc).
//
// What it checks that a compile cannot: every kernel and launcher computes
// what the CPU oracle computes; launches with invalid configurations fail as
// on a GPU (cudaErrorInvalidConfiguration); a full-warp shuffle that some
// lanes never reach is reported as cudaErrorLaunchFailure instead of
// hanging. (__syncthreads counts exited threads as arrived, as on sm_70 and
// later.)
//
// Under AddressSanitizer + UBSan (scripts/sanitize.sh), it also finds a
// kernel's out-of-bounds device accesses (each allocation is exactly its
// size) and undefined behaviour such as overflowing int index arithmetic.
//
// What it does not check: timing, the memory model and races between
// concurrently running blocks, real float intrinsics (expf here is glibc's),
// cuBLAS's own numerics. The GPU runs (bench/gpu/README.md) stay the ground
// truth.
//
// Thread-safety: Launch may be called from any thread; launches run one at a
// time.
#ifndef SWITCHYARD_TESTS_CUDA_EMULATOR_DEVICE_EMULATION_H_
#define SWITCHYARD_TESTS_CUDA_EMULATOR_DEVICE_EMULATION_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

// The CUDA headers define these for host compilers as no-op attributes.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One copy per kernel, shared by the threads of the block that runs
// (blocks run one at a time).
#define __shared__ static

namespace switchyard::emulator {

// The running thread's coordinates (one fiber at a time runs).
extern uint3 g_thread_idx;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

// __syncthreads: waits until every thread of the block that has not exited
// arrives.
void SyncThreads();
// Publishes this lane's 8 bytes and returns those of lane (lane ^ lane_mask),
// after every lane of the warp did the same. `mask` must be 0xffffffff.
uint64_t WarpShuffleXor(unsigned mask, uint64_t mine, int lane_mask);

// The launch configuration check every real launch does. Returns the error
// a GPU would give (cudaSuccess when the launch may run).
cudaError_t CheckConfiguration(dim3 grid, dim3 block, size_t shared_bytes);
// Runs `thread_body` once per thread of every block: as fibers when
// `barriers`, else as plain calls. Sets the emulated last error on failure.
void RunGrid(dim3 grid, dim3 block, bool barriers, const std::function<void()>& thread_body);
// The emulated runtime's sticky last error (fake_cudart.cc).
void SetLastError(cudaError_t err);

template <typename... Params, typename... Args>
void Launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t /*stream*/, bool barriers,
            void (*kernel)(Params...), Args&&... args) {
  if (const cudaError_t err = CheckConfiguration(grid, block, shared_bytes); err != cudaSuccess) {
    SetLastError(err);
    return;
  }
  // Arguments convert to the parameter types at the launch, as with <<<>>>.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  RunGrid(grid, block, barriers, [&] { std::apply(kernel, params); });
}

}  // namespace switchyard::emulator

#define threadIdx (::switchyard::emulator::g_thread_idx)
#define blockIdx (::switchyard::emulator::g_block_idx)
#define blockDim (::switchyard::emulator::g_block_dim)
#define gridDim (::switchyard::emulator::g_grid_dim)

inline void __syncthreads() { ::switchyard::emulator::SyncThreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  (void)width;  // whole warps only
  bits = ::switchyard::emulator::WarpShuffleXor(mask, bits, lane_mask);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Explicitly rounded float arithmetic: the empty asm keeps the compiler from
// fusing a product into a following add (no FMA contraction), as the
// intrinsics guarantee on the GPU.
inline float __fmul_rn(float a, float b) {
  float r = a * b;
  asm volatile("" : "+x"(r));
  return r;
}
inline float __fadd_rn(float a, float b) {
  float r = a + b;
  asm volatile("" : "+x"(r));
  return r;
}
inline float __fsub_rn(float a, float b) {
  float r = a - b;
  asm volatile("" : "+x"(r));
  return r;
}

// Device min/max overloads that CUDA code calls unqualified.
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

#endif  // SWITCHYARD_TESTS_CUDA_EMULATOR_DEVICE_EMULATION_H_
