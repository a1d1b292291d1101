// The CPU emulator of the CUDA backend checks itself: barriers and warp
// shuffles keep their meaning, what a GPU refuses it refuses, and its cuBLAS
// is cuBLAS's column-major GEMM with cuBLAS's argument checks. Kernels here
// are written as in a .cu file and launched as cu_to_cc.py rewrites
// launches.
#include "cuda/emulator/device_emulation.h"

#include <cuda_runtime_api.h>

#include <numeric>
#include <random>
#include <vector>

#include "cuda/cublas_api.h"
#include "gtest/gtest.h"

namespace switchyard {
namespace {

using emulator::Launch;

// Each warp's lanes sum with shuffles; every lane writes its warp's total.
__global__ void WarpSumKernel(const float* x, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = x[i];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[i] = v;
}

// A block-wide reversal through shared memory: wrong without the barrier.
__global__ void ReverseKernel(const int* x, int* out) {
  __shared__ int s[256];
  s[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

// Half a warp in a full-warp shuffle: undefined on a GPU, a launch failure
// here rather than a hang.
__global__ void DivergentShuffleKernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Threads that exit early do not hold up a barrier (sm_70 and later).
__global__ void EarlyExitKernel(int* out) {
  if (threadIdx.x >= 40) return;
  __syncthreads();
  out[threadIdx.x] = 2;
}

__global__ void FillKernel(int* out, int value) { out[threadIdx.x] = value; }

TEST(DeviceEmulationTest, WarpShufflesSumEachWarp) {
  std::vector<float> x(128), out(128);
  std::iota(x.begin(), x.end(), 1.0f);
  Launch(2, 64, 0, nullptr, true, WarpSumKernel, x.data(), out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (int i = 0; i < 128; ++i) {
    const int w = i / 32;
    const float want = 32.0f * (32 * w + 1) + 31.0f * 32.0f / 2.0f;  // Σ of 32 consecutive ints
    EXPECT_EQ(out[i], want) << i;
  }
}

TEST(DeviceEmulationTest, SyncthreadsOrdersSharedMemory) {
  std::vector<int> x(3 * 256), out(x.size());
  std::iota(x.begin(), x.end(), 0);
  Launch(3, 256, 0, nullptr, true, ReverseKernel, x.data(), out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (int b = 0; b < 3; ++b) {
    for (int t = 0; t < 256; ++t) EXPECT_EQ(out[b * 256 + t], b * 256 + 255 - t);
  }
}

TEST(DeviceEmulationTest, ShuffleWithMissingLanesIsALaunchFailureNotAHang) {
  std::vector<float> out(32, 0.0f);
  Launch(1, 32, 0, nullptr, true, DivergentShuffleKernel, out.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << "cudaGetLastError resets the error";
  // The emulator is usable afterwards.
  std::vector<float> x(32, 1.0f), sums(32);
  Launch(1, 32, 0, nullptr, true, WarpSumKernel, x.data(), sums.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(sums[0], 32.0f);
}

TEST(DeviceEmulationTest, ExitedThreadsDoNotHoldUpABarrier) {
  std::vector<int> out(64, 0);
  Launch(1, 64, 0, nullptr, true, EarlyExitKernel, out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (int t = 0; t < 64; ++t) EXPECT_EQ(out[t], t < 40 ? 2 : 0) << t;
}

TEST(DeviceEmulationTest, InvalidConfigurationsFailAsOnAGpu) {
  std::vector<int> out(1024, 0);
  Launch(0, 32, 0, nullptr, false, FillKernel, out.data(), 1);  // empty grid
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  Launch(1, 1025, 0, nullptr, false, FillKernel, out.data(), 1);  // too many threads
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  Launch(dim3(1, 65536), 32, 0, nullptr, false, FillKernel, out.data(), 1);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(out[0], 0) << "a refused launch ran";
  Launch(1, 1024, 0, nullptr, false, FillKernel, out.data(), 7);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(out[1023], 7);
}

TEST(DeviceEmulationTest, AllocationsArePoisonedAndBounded) {
  void* p = nullptr;
  ASSERT_EQ(cudaMalloc(&p, 16), cudaSuccess);
  float f;
  std::memcpy(&f, p, sizeof f);
  EXPECT_TRUE(std::isnan(f)) << "fresh device memory reads as NaN";
  EXPECT_EQ(cudaFree(p), cudaSuccess);
  EXPECT_EQ(cudaMalloc(&p, size_t{1} << 50), cudaErrorMemoryAllocation);
  EXPECT_EQ(cudaGetLastError(), cudaErrorMemoryAllocation);
}

// The emulated cuBLAS against a naive row-major product, every op(A)/op(B).
TEST(FakeCublasTest, SgemmIsColumnMajorWithTransposes) {
  auto api = cuda::Cublas();
  ASSERT_TRUE(api.ok()) << api.status();
  cublasHandle_t handle;
  ASSERT_EQ((*api)->create(&handle), CUBLAS_STATUS_SUCCESS);
  const int m = 5, n = 3, k = 7;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  // Column-major logical matrices A (m × k), B (k × n); stored per op.
  std::vector<float> a(m * k), b(k * n);
  for (float& v : a) v = dist(rng);
  for (float& v : b) v = dist(rng);
  auto A = [&](int i, int l) { return a[i + l * m]; };
  auto B = [&](int l, int j) { return b[l + j * k]; };
  for (cublasOperation_t ta : {CUBLAS_OP_N, CUBLAS_OP_T}) {
    for (cublasOperation_t tb : {CUBLAS_OP_N, CUBLAS_OP_T}) {
      // Store op^-1 so that op(stored) is A / B; leading dims padded by 2.
      const int lda = (ta == CUBLAS_OP_N ? m : k) + 2, ldb = (tb == CUBLAS_OP_N ? k : n) + 2;
      std::vector<float> sa(lda * (ta == CUBLAS_OP_N ? k : m)),
          sb(ldb * (tb == CUBLAS_OP_N ? n : k));
      for (int i = 0; i < m; ++i) {
        for (int l = 0; l < k; ++l)
          (ta == CUBLAS_OP_N ? sa[i + l * lda] : sa[l + i * lda]) = A(i, l);
      }
      for (int l = 0; l < k; ++l) {
        for (int j = 0; j < n; ++j)
          (tb == CUBLAS_OP_N ? sb[l + j * ldb] : sb[j + l * ldb]) = B(l, j);
      }
      const int ldc = m + 1;
      std::vector<float> c(ldc * n, 1.0f);
      const float alpha = 2.0f, beta = 0.5f;
      ASSERT_EQ((*api)->sgemm(handle, ta, tb, m, n, k, &alpha, sa.data(), lda, sb.data(), ldb,
                              &beta, c.data(), ldc),
                CUBLAS_STATUS_SUCCESS);
      for (int i = 0; i < m; ++i) {
        for (int j = 0; j < n; ++j) {
          double want = 0;
          for (int l = 0; l < k; ++l) want += static_cast<double>(A(i, l)) * B(l, j);
          EXPECT_NEAR(c[i + j * ldc], 2.0 * want + 0.5, 1e-5) << ta << tb << " " << i << "," << j;
        }
      }
    }
  }
  // cuBLAS's argument checks: lda below the rows of the stored A.
  float alpha = 1.0f, beta = 0.0f;
  std::vector<float> c(m * n);
  EXPECT_EQ((*api)->sgemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, a.data(), m - 1,
                          b.data(), k, &beta, c.data(), m),
            CUBLAS_STATUS_INVALID_VALUE);
  // No GEMM with A and B of different types.
  EXPECT_EQ((*api)->gemm_ex(handle, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, a.data(),
                            CUDA_R_16BF, m, b.data(), CUDA_R_32F, k, &beta, c.data(), CUDA_R_32F, m,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_EQ((*api)->destroy(handle), CUBLAS_STATUS_SUCCESS);
}

}  // namespace
}  // namespace switchyard
