// CPU kernels against naive loops on awkward shapes.
#include "core/cpu_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "core/cpu_amx.h"
#include "core/dtype.h"
#include "core/huge_pages.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tests/tolerances.h"

namespace switchyard {
namespace {

using testing::AllClose;

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(rng() % 2001) / 1000.0f - 1.0f;
  return v;
}

// y[T, N] = x[T, K] · w[N, K]^T in double, rounded once.
std::vector<float> NaiveLinear(const std::vector<float>& x, const std::vector<float>& w, int T,
                               int K, int N) {
  std::vector<float> ref(static_cast<size_t>(T) * N);  // [T, N]
  for (int t = 0; t < T; ++t)
    for (int n = 0; n < N; ++n) {
      double s = 0;
      for (int k = 0; k < K; ++k) s += static_cast<double>(x[t * K + k]) * w[n * K + k];
      ref[t * N + n] = static_cast<float>(s);
    }
  return ref;
}

TEST(CpuOpsTest, LinearMatchesNaive) {
  for (auto [T, K, N] : {std::tuple{1, 33, 7}, {33, 17, 65}, {5, 64, 1}, {2, 1, 3}}) {
    const auto x = Random(static_cast<size_t>(T) * K, 1), w = Random(static_cast<size_t>(N) * K, 2);
    std::vector<float> y(static_cast<size_t>(T) * N);
    const std::vector<float> ref = NaiveLinear(x, w, T, K, N);
    cpu::Linear(x.data(), w.data(), T, K, N, y.data());
    EXPECT_TRUE(AllClose(y, ref, tolerance::kKernelAbs, tolerance::kKernelRel, "Linear"));
    // Accumulating adds onto what is there.
    std::vector<float> acc(y.size(), 1.0f), ref_acc(ref);
    for (float& v : ref_acc) v += 1.0f;
    cpu::Linear(x.data(), w.data(), T, K, N, acc.data(), /*accumulate=*/true);
    EXPECT_TRUE(AllClose(acc, ref_acc, tolerance::kKernelAbs, tolerance::kKernelRel, "Linear+="));
  }
}

// Products of many rows go through BLAS, which runs on the calling thread:
// OpenBLAS's own pool would wake on the same cores as every OpenMP thread
// that calls it, and its bits change with its thread count. The product
// still matches the naive loop, and computing it again from two threads at
// once gives the same bits.
TEST(CpuOpsTest, BlasProductsRunOnTheCallingThread) {
  if (std::getenv("OPENBLAS_NUM_THREADS") != nullptr) {
    GTEST_SKIP() << "OPENBLAS_NUM_THREADS is set: the user's choice stands";
  }
  constexpr int T = 64, K = 64, N = 1024;  // T > kSkinnyMaxTokens, FP32: BLAS
  const auto x = Random(static_cast<size_t>(T) * K, 3), w = Random(static_cast<size_t>(N) * K, 4);
  std::vector<float> y(static_cast<size_t>(T) * N);
  const std::vector<float> ref = NaiveLinear(x, w, T, K, N);
  cpu::Linear(x.data(), w.data(), T, K, N, y.data());
  EXPECT_EQ(openblas_get_num_threads(), 1);
  EXPECT_TRUE(AllClose(y, ref, tolerance::kKernelAbs, tolerance::kKernelRel, "BLAS Linear"));
  std::vector<float> a(y.size()), b(y.size());
  std::thread other([&] { cpu::Linear(x.data(), w.data(), T, K, N, b.data()); });
  cpu::Linear(x.data(), w.data(), T, K, N, a.data());
  other.join();
  EXPECT_EQ(std::memcmp(a.data(), y.data(), y.size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(b.data(), y.data(), y.size() * sizeof(float)), 0);
}

// Matrices of 2 MiB and more live in 2 MiB-aligned mappings (transparent
// huge pages, core/huge_pages.h); every way of making one keeps the values,
// and small ones still work from the heap.
TEST(CpuOpsTest, LargeMatricesAreHugePageAlignedAndKeepTheirValues) {
  const int rows = 1031, cols = 1024;  // 2.0 MiB of BF16, 4.0 MiB of FP32
  const auto wf = Random(static_cast<size_t>(rows) * cols, 77);
  std::vector<uint16_t> wb(wf.size());
  for (size_t i = 0; i < wf.size(); ++i) wb[i] = F32ToBf16(wf[i]);
  const cpu::Matrix b = cpu::Matrix::FromBf16(wb, rows, cols);
  const cpu::Matrix f = cpu::Matrix::FromF32(wf, rows, cols);
  const cpu::Matrix stored = cpu::Matrix::FromStored(DType::kF32, wf.data(), rows, cols);
  const cpu::Matrix stacked = cpu::Matrix::StackRows({&b, &b});
  const cpu::Matrix copy = b;  // NOLINT: the copy is what is tested
  const cpu::Matrix small = cpu::Matrix::FromF32(Random(33 * 7, 78), 33, 7);
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kHugePageBytes == 0; };
  EXPECT_TRUE(aligned(b.bf16()));
  EXPECT_TRUE(aligned(f.f32()));
  EXPECT_TRUE(aligned(stored.f32()));
  EXPECT_TRUE(aligned(stacked.bf16()));
  EXPECT_TRUE(aligned(copy.bf16()));
  EXPECT_EQ(0, std::memcmp(b.bf16(), wb.data(), wb.size() * 2));
  EXPECT_EQ(0, std::memcmp(copy.bf16(), wb.data(), wb.size() * 2));
  EXPECT_EQ(0, std::memcmp(f.f32(), wf.data(), wf.size() * 4));
  EXPECT_EQ(0, std::memcmp(stored.f32(), wf.data(), wf.size() * 4));
  EXPECT_EQ(stacked.rows(), 2 * rows);
  EXPECT_EQ(0, std::memcmp(stacked.bf16(), wb.data(), wb.size() * 2));
  EXPECT_EQ(0, std::memcmp(stacked.bf16() + wb.size(), wb.data(), wb.size() * 2));
  EXPECT_EQ(small.bytes(), 33u * 7 * 4);
  std::vector<float> row(7);
  small.RowToF32(32, row.data());
  EXPECT_EQ(row[6], small.f32()[32 * 7 + 6]);
}

// The skinny kernel (T <= kSkinnyMaxTokens) and the BLAS path (T above it),
// on FP32 and BF16 matrices, against a double-accumulated naive loop over the
// same (BF16-rounded) values; T = 33 covers the blocked BF16 -> GEMM path.
TEST(CpuOpsTest, MatrixLinearMatchesNaiveOnAwkwardShapes) {
  for (int T : {1, 3, 16, 33}) {
    for (int K : {17, 64, 1024}) {
      for (int N : {1, 7, 65}) {
        const auto x = Random(static_cast<size_t>(T) * K, 11);  // [T, K]
        auto wf = Random(static_cast<size_t>(N) * K, 12);       // [N, K]
        std::vector<uint16_t> wb(wf.size());                    // [N, K]
        for (size_t i = 0; i < wf.size(); ++i) {
          wb[i] = F32ToBf16(wf[i]);
          wf[i] = Bf16ToF32(wb[i]);  // the same values in both dtypes
        }
        std::vector<float> ref(static_cast<size_t>(T) * N);  // [T, N]
        for (int t = 0; t < T; ++t)
          for (int n = 0; n < N; ++n) {
            double s = 0;
            for (int k = 0; k < K; ++k) {
              s += static_cast<double>(x[t * K + k]) * wf[static_cast<size_t>(n) * K + k];
            }
            ref[t * N + n] = static_cast<float>(s);
          }
        const cpu::Matrix mats[] = {cpu::Matrix::FromF32(wf, N, K),
                                    cpu::Matrix::FromBf16(wb, N, K)};
        for (const cpu::Matrix& m : mats) {
          const char* what = m.is_bf16() ? "bf16" : "f32";
          std::vector<float> y(ref.size(), -7.0f);  // [T, N]
          cpu::Linear(x.data(), m, T, y.data());
          double max_diff = 0;
          for (size_t i = 0; i < y.size(); ++i) {
            max_diff = std::max(max_diff, std::abs(static_cast<double>(y[i]) - ref[i]));
          }
          std::printf("Linear %-4s T=%2d K=%4d N=%2d  max |diff| %.3g\n", what, T, K, N, max_diff);
          EXPECT_TRUE(AllClose(y, ref, tolerance::kLinearAbs, tolerance::kLinearRel, what))
              << "T=" << T << " K=" << K << " N=" << N;
          std::vector<float> acc(ref.size(), 1.0f), ref_acc(ref);  // [T, N]
          for (float& v : ref_acc) v += 1.0f;
          cpu::Linear(x.data(), m, T, acc.data(), /*accumulate=*/true);
          EXPECT_TRUE(AllClose(acc, ref_acc, tolerance::kLinearAbs, tolerance::kLinearRel, what))
              << "accumulate T=" << T << " K=" << K << " N=" << N;
        }
      }
    }
  }
}

// Each output's summation order depends only on K: a row computed in a batch
// of 16 is bitwise the row computed alone, for both dtypes.
TEST(CpuOpsTest, SkinnyLinearRowIndependentOfBatch) {
  const int T = 16, K = 1024, N = 4099;
  const auto x = Random(static_cast<size_t>(T) * K, 21);   // [T, K]
  const auto wf = Random(static_cast<size_t>(N) * K, 22);  // [N, K]
  std::vector<uint16_t> wb(wf.size());                     // [N, K]
  for (size_t i = 0; i < wf.size(); ++i) wb[i] = F32ToBf16(wf[i]);
  const cpu::Matrix mats[] = {cpu::Matrix::FromF32(wf, N, K), cpu::Matrix::FromBf16(wb, N, K)};
  for (const cpu::Matrix& m : mats) {
    std::vector<float> all(static_cast<size_t>(T) * N), one(N);  // [T, N], [N]
    cpu::Linear(x.data(), m, T, all.data());
    for (int t = 0; t < T; ++t) {
      cpu::Linear(x.data() + static_cast<size_t>(t) * K, m, 1, one.data());
      EXPECT_TRUE(std::equal(one.begin(), one.end(), all.begin() + static_cast<size_t>(t) * N))
          << (m.is_bf16() ? "bf16" : "f32") << " row " << t;
    }
  }
}

TEST(CpuOpsTest, StackRowsKeepsBf16OnlyWhenAllPartsAre) {
  const std::vector<float> a = {1.0f, 2.0f}, b = {3.0f, 4.5f};
  const cpu::Matrix fa = cpu::Matrix::FromF32(a, 1, 2);
  const cpu::Matrix bb = cpu::Matrix::FromBf16({F32ToBf16(b[0]), F32ToBf16(b[1])}, 1, 2);
  const cpu::Matrix bf = cpu::Matrix::StackRows({&bb, &bb});
  EXPECT_TRUE(bf.is_bf16());
  EXPECT_EQ(bf.rows(), 2);
  const cpu::Matrix mixed = cpu::Matrix::StackRows({&fa, &bb});
  ASSERT_FALSE(mixed.is_bf16());
  EXPECT_EQ(std::vector<float>(mixed.f32(), mixed.f32() + 4),
            (std::vector<float>{1.0f, 2.0f, 3.0f, 4.5f}));
}

TEST(CpuOpsTest, RmsNormMatchesNaive) {
  const int T = 3, D = 37;
  const auto x = Random(T * D, 3), w = Random(D, 4);
  std::vector<float> y(T * D), ref(T * D);
  for (int t = 0; t < T; ++t) {
    double ss = 0;
    for (int d = 0; d < D; ++d) ss += x[t * D + d] * x[t * D + d];
    const double r = 1.0 / std::sqrt(ss / D + 1e-5);
    for (int d = 0; d < D; ++d) ref[t * D + d] = static_cast<float>(w[d] * x[t * D + d] * r);
  }
  cpu::RmsNorm(x.data(), w.data(), T, D, 1e-5f, y.data());
  EXPECT_TRUE(AllClose(y, ref, tolerance::kKernelAbs, tolerance::kKernelRel, "RmsNorm"));
}

TEST(CpuOpsTest, RopeRotatesPairsHalfADimApart) {
  const int T = 3, H = 2, hd = 6;
  const std::vector<int32_t> pos = {0, 5, 1000};
  auto x = Random(T * H * hd, 5);
  std::vector<float> ref(x.size());
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < hd / 2; ++i) {
        const double freq = std::pow(1e6, -2.0 * i / hd);
        const double a = pos[t] * freq;
        const float* v = &x[(t * H + h) * hd];
        ref[(t * H + h) * hd + i] =
            static_cast<float>(v[i] * std::cos(a) - v[i + hd / 2] * std::sin(a));
        ref[(t * H + h) * hd + i + hd / 2] =
            static_cast<float>(v[i + hd / 2] * std::cos(a) + v[i] * std::sin(a));
      }
  cpu::RopeRotateHalf(x.data(), pos.data(), T, H, hd, 1e6);
  EXPECT_TRUE(AllClose(x, ref, 1e-4, 1e-4, "RoPE"));
  // Position 0 is the identity.
}

TEST(CpuOpsTest, SoftmaxAndSwiGlu) {
  std::vector<float> v = {1000.0f, 1001.0f, -5.0f};
  cpu::SoftmaxInPlace(v.data(), 3);
  EXPECT_NEAR(v[0] + v[1] + v[2], 1.0, 1e-6);
  EXPECT_NEAR(v[1] / v[0], std::exp(1.0), 1e-4);
  const std::vector<float> g = {0.0f, 2.0f, -3.0f}, u = {1.0f, 0.5f, 2.0f};
  std::vector<float> out(3);
  cpu::SwiGlu(g.data(), u.data(), 3, out.data());
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(out[i], g[i] / (1 + std::exp(-g[i])) * u[i], 1e-6);
  }
}

// ---- Kernel levels (issue #11) ----

// The levels this CPU can run, lowest first.
std::vector<cpu::CpuIsa> AvailableIsas() {
  std::vector<cpu::CpuIsa> out;
  for (cpu::CpuIsa isa : {cpu::CpuIsa::kScalar, cpu::CpuIsa::kAvx2, cpu::CpuIsa::kAvx512,
                          cpu::CpuIsa::kAvx512Bf16, cpu::CpuIsa::kAmx}) {
    if (isa <= cpu::DetectedIsa()) out.push_back(isa);
  }
  return out;
}

// Restores the process-wide level and precision when a test ends.
class KernelLevelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    isa_ = cpu::ActiveIsa();
    precision_ = cpu::ActivePrecision();
  }
  void TearDown() override {
    cpu::SetIsa(isa_);
    cpu::SetPrecision(precision_);
  }

 private:
  cpu::CpuIsa isa_ = cpu::CpuIsa::kScalar;
  cpu::MatmulPrecision precision_ = cpu::MatmulPrecision::kF32;
};

// Every level × precision × awkward shape (1 row, 1 column, Kin not a
// multiple of 8/16/32, N not a multiple of the row blocks, T past the 16-token
// chunks) against a double-accumulated loop over the values the precision
// promises to use: x itself (kF32) or x rounded to BF16 (kBf16). One table of
// max |diff| per level and precision is printed at the end.
TEST_F(KernelLevelTest, EveryLevelAndPrecisionMatchesOracleOnAwkwardShapes) {
  struct Shape {
    int T, K, N;
  };
  const Shape shapes[] = {{1, 1, 1},    {1, 15, 7},    {2, 31, 9},    {3, 33, 65},
                          {4, 47, 17},  {5, 100, 3},   {7, 1024, 13}, {16, 257, 33},
                          {17, 64, 66}, {33, 129, 71}, {64, 1000, 9}, {1, 3584, 24}};
  std::printf("%-12s %-5s %12s %12s\n", "level", "prec", "max |diff|", "bound used");
  for (cpu::CpuIsa isa : AvailableIsas()) {
    ASSERT_EQ(cpu::SetIsa(isa), isa);
    for (cpu::MatmulPrecision precision :
         {cpu::MatmulPrecision::kF32, cpu::MatmulPrecision::kBf16}) {
      cpu::SetPrecision(precision);
      const bool bf16 = precision == cpu::MatmulPrecision::kBf16;
      double worst = 0;
      for (const Shape& s : shapes) {
        const auto x = Random(static_cast<size_t>(s.T) * s.K, 31 + s.K);   // [T, K]
        const auto wf = Random(static_cast<size_t>(s.N) * s.K, 32 + s.N);  // [N, K]
        std::vector<uint16_t> wb(wf.size());                               // [N, K]
        for (size_t i = 0; i < wf.size(); ++i) wb[i] = F32ToBf16(wf[i]);
        std::vector<float> ref(static_cast<size_t>(s.T) * s.N);  // [T, N]
        for (int t = 0; t < s.T; ++t)
          for (int n = 0; n < s.N; ++n) {
            double sum = 0;
            for (int k = 0; k < s.K; ++k) {
              float xv = x[static_cast<size_t>(t) * s.K + k];
              if (bf16) xv = Bf16ToF32(F32ToBf16(xv));
              sum += static_cast<double>(xv) * Bf16ToF32(wb[static_cast<size_t>(n) * s.K + k]);
            }
            ref[static_cast<size_t>(t) * s.N + n] = static_cast<float>(sum);
          }
        const cpu::Matrix m = cpu::Matrix::FromBf16(wb, s.N, s.K);
        std::vector<float> y(ref.size(), -7.0f), acc(ref.size(), 0.5f);  // [T, N]
        cpu::Linear(x.data(), m, s.T, y.data());
        cpu::Linear(x.data(), m, s.T, acc.data(), /*accumulate=*/true);
        std::vector<float> ref_acc(ref);
        for (float& v : ref_acc) v += 0.5f;
        for (size_t i = 0; i < y.size(); ++i) {
          worst = std::max(worst, std::abs(static_cast<double>(y[i]) - ref[i]));
        }
        const std::string what = std::string(cpu::CpuIsaName(isa)) + (bf16 ? " bf16" : " f32") +
                                 " T=" + std::to_string(s.T) + " K=" + std::to_string(s.K) +
                                 " N=" + std::to_string(s.N);
        EXPECT_TRUE(AllClose(y, ref, tolerance::kLinearAbs, tolerance::kLinearRel, what)) << what;
        EXPECT_TRUE(AllClose(acc, ref_acc, tolerance::kLinearAbs, tolerance::kLinearRel, what))
            << "accumulate " << what;
      }
      std::printf("%-12s %-5s %12.3g %12.3g\n", cpu::CpuIsaName(isa), bf16 ? "bf16" : "f32", worst,
                  tolerance::kLinearAbs);
    }
  }
}

// Every row count 1..17 (the skinny kernels' register blocks, the 16-token
// tiles and the first row past them) with an odd Kin and N at every level and
// precision, against the same double-accumulated oracle.
TEST_F(KernelLevelTest, EveryLevelEveryRowCountUpTo17) {
  const int K = 99, N = 37;
  const auto wf = Random(static_cast<size_t>(N) * K, 52);  // [N, K]
  std::vector<uint16_t> wb(wf.size());                     // [N, K]
  for (size_t i = 0; i < wf.size(); ++i) wb[i] = F32ToBf16(wf[i]);
  const cpu::Matrix m = cpu::Matrix::FromBf16(wb, N, K);
  for (cpu::CpuIsa isa : AvailableIsas()) {
    ASSERT_EQ(cpu::SetIsa(isa), isa);
    for (cpu::MatmulPrecision precision :
         {cpu::MatmulPrecision::kF32, cpu::MatmulPrecision::kBf16}) {
      cpu::SetPrecision(precision);
      const bool bf16 = precision == cpu::MatmulPrecision::kBf16;
      for (int T = 1; T <= 17; ++T) {
        const auto x = Random(static_cast<size_t>(T) * K, 53 + T);  // [T, K]
        std::vector<float> ref(static_cast<size_t>(T) * N);         // [T, N]
        for (int t = 0; t < T; ++t)
          for (int n = 0; n < N; ++n) {
            double sum = 0;
            for (int k = 0; k < K; ++k) {
              float xv = x[static_cast<size_t>(t) * K + k];
              if (bf16) xv = Bf16ToF32(F32ToBf16(xv));
              sum += static_cast<double>(xv) * Bf16ToF32(wb[static_cast<size_t>(n) * K + k]);
            }
            ref[static_cast<size_t>(t) * N + n] = static_cast<float>(sum);
          }
        std::vector<float> y(ref.size(), -7.0f);  // [T, N]
        cpu::Linear(x.data(), m, T, y.data());
        const std::string what = std::string(cpu::CpuIsaName(isa)) + (bf16 ? " bf16" : " f32") +
                                 " T=" + std::to_string(T);
        EXPECT_TRUE(AllClose(y, ref, tolerance::kLinearAbs, tolerance::kLinearRel, what)) << what;
      }
    }
  }
}

// The AMX kernel's FP32 precision rests on x = hi + mid + lo with three BF16
// terms (core/cpu_amx.h). PackX is portable code, so this runs everywhere.
TEST(CpuAmxTest, ThreeBf16TermsSumExactlyToX) {
  // T 3: the terms side by side in one tile per chunk (3 x 3 columns); T 6:
  // a tile per term (3 x 6 columns would not fit 16).
  for (const int T : {3, 6}) {
    const int K = 70;  // two 32-column chunks and a 6-column tail
    std::vector<float> x = Random(static_cast<size_t>(T) * K, 61);  // [T, K]
    x[5] = 3.14159274f;
    x[6] = -1.0e-20f;
    x[7] = 65504.123f;
    x[8] = -std::numeric_limits<float>::infinity();
    cpu::amx::PackedX packed;
    cpu::amx::PackX(x.data(), T, K, /*terms=*/3, &packed);
    ASSERT_EQ(packed.chunks, 2);
    ASSERT_EQ(packed.tail.size(), static_cast<size_t>(T) * 6);
    int checked = 0;
    for (int t = 0; t < T; ++t) {
      for (int k = 0; k < 64; ++k) {
        const int kc = k / 32, pair = (k % 32) / 2, half = k % 2;
        float sum = 0;
        for (int p = 2; p >= 0; --p) {  // smallest first: every partial sum is exact
          // Chunk kc holds [16 pairs][3 terms][T][2] (shared) or
          // [3 terms][16 pairs][T][2] (a tile per term).
          const size_t in_chunk = 3 * T <= 16 ? (static_cast<size_t>(pair) * 3 + p) * T + t
                                              : (static_cast<size_t>(p) * 16 + pair) * T + t;
          const size_t at = static_cast<size_t>(kc) * 3 * 32 * T + in_chunk * 2 + half;
          sum += Bf16ToF32(packed.tiles[at]);
        }
        EXPECT_EQ(sum, x[static_cast<size_t>(t) * K + k]) << "T " << T << " t " << t << " k " << k;
        ++checked;
      }
      for (int k = 64; k < K; ++k) {
        EXPECT_EQ(packed.tail[static_cast<size_t>(t) * 6 + (k - 64)],
                  x[static_cast<size_t>(t) * K + k]);
      }
    }
    EXPECT_EQ(checked, T * 64);
  }
}

// At every level and precision a row computed in a batch of 16 (or in the
// 16-token chunks past it) is bitwise the row computed alone.
TEST_F(KernelLevelTest, EveryLevelRowIndependentOfBatch) {
  const int T = 20, K = 1000, N = 131;
  const auto x = Random(static_cast<size_t>(T) * K, 41);   // [T, K]
  const auto wf = Random(static_cast<size_t>(N) * K, 42);  // [N, K]
  std::vector<uint16_t> wb(wf.size());                     // [N, K]
  for (size_t i = 0; i < wf.size(); ++i) wb[i] = F32ToBf16(wf[i]);
  const cpu::Matrix m = cpu::Matrix::FromBf16(wb, N, K);
  for (cpu::CpuIsa isa : AvailableIsas()) {
    cpu::SetIsa(isa);
    for (cpu::MatmulPrecision precision :
         {cpu::MatmulPrecision::kF32, cpu::MatmulPrecision::kBf16}) {
      cpu::SetPrecision(precision);
      // T = 20 runs as one batch only where BF16 matrices skip BLAS.
      const int batch = isa >= cpu::CpuIsa::kAvx512 ? T : cpu::kSkinnyMaxTokens;
      std::vector<float> all(static_cast<size_t>(batch) * N), one(N);  // [batch, N], [N]
      cpu::Linear(x.data(), m, batch, all.data());
      for (int t = 0; t < batch; ++t) {
        cpu::Linear(x.data() + static_cast<size_t>(t) * K, m, 1, one.data());
        EXPECT_TRUE(std::equal(one.begin(), one.end(), all.begin() + static_cast<size_t>(t) * N))
            << cpu::CpuIsaName(isa) << " precision " << static_cast<int>(precision) << " row " << t;
      }
    }
  }
}

// Where RowsIndependentOfCount says so, a row computed in a product of 17,
// 33 or 100 rows (past the skinny kernel's 16) is bitwise the row computed
// alone; it says so at amx for BF16 matrices in both precisions, and never
// for FP32 matrices (BLAS past 16 rows).
TEST_F(KernelLevelTest, RowsIndependentOfCountHoldsForAnyRowCount) {
  const int K = 1000, N = 131, kMaxT = 100;
  const auto x = Random(static_cast<size_t>(kMaxT) * K, 43);  // [T, K]
  const auto wf = Random(static_cast<size_t>(N) * K, 44);     // [N, K]
  std::vector<uint16_t> wb(wf.size());                        // [N, K]
  for (size_t i = 0; i < wf.size(); ++i) wb[i] = F32ToBf16(wf[i]);
  const cpu::Matrix m = cpu::Matrix::FromBf16(wb, N, K);
  int checked = 0;
  for (cpu::CpuIsa isa : AvailableIsas()) {
    cpu::SetIsa(isa);
    for (cpu::MatmulPrecision precision :
         {cpu::MatmulPrecision::kF32, cpu::MatmulPrecision::kBf16}) {
      cpu::SetPrecision(precision);
      const std::string what = std::string(cpu::CpuIsaName(isa)) + " precision " +
                               std::to_string(static_cast<int>(precision));
      EXPECT_FALSE(cpu::RowsIndependentOfCount(/*bf16_weights=*/false)) << what;
      if (isa == cpu::CpuIsa::kAmx) {
        EXPECT_TRUE(cpu::RowsIndependentOfCount(true)) << what;
      }
      if (!cpu::RowsIndependentOfCount(true)) continue;
      std::vector<float> one(N);  // [N]
      for (int T : {17, 33, kMaxT}) {
        std::vector<float> all(static_cast<size_t>(T) * N);  // [T, N]
        cpu::Linear(x.data(), m, T, all.data());
        for (int t = 0; t < T; ++t) {
          cpu::Linear(x.data() + static_cast<size_t>(t) * K, m, 1, one.data());
          ASSERT_TRUE(std::equal(one.begin(), one.end(), all.begin() + static_cast<size_t>(t) * N))
              << what << " T " << T << " row " << t;
        }
      }
      ++checked;
    }
  }
  std::printf("row-count invariance checked at %d level x precision pairs\n", checked);
}

// RoundToBf16 (the KV cache's BF16 storage and the wire's BF16 encoding) at
// every level is bitwise F32ToBf16, on lengths around the 8- and 16-lane
// blocks and on NaNs (quiet, signalling, negative, with payloads),
// infinities, signed zeros, subnormals, ties that round to even or odd, and
// the largest finite value (which rounds to infinity).
TEST_F(KernelLevelTest, RoundToBf16IsExactAtEveryLevel) {
  auto from_bits = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  };
  const std::vector<float> specials = {
      std::numeric_limits<float>::quiet_NaN(),
      -std::numeric_limits<float>::infinity(),
      1.0f + 0x1p-8f,          // a tie: rounds to even (1.0)
      from_bits(0x7f800001u),  // signalling NaN: made quiet
      from_bits(0xffc12345u),  // negative NaN with a payload
      -0.0f,
      std::numeric_limits<float>::denorm_min(),
      from_bits(0x00018000u),  // a subnormal tie
      std::numeric_limits<float>::max(),
      from_bits(0x3f818000u),  // a tie that rounds up (odd)
      std::numeric_limits<float>::infinity(),
      -1.0f - 0x1p-8f,
  };
  for (cpu::CpuIsa isa : AvailableIsas()) {
    ASSERT_EQ(cpu::SetIsa(isa), isa);
    for (int n : {1, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 64, 100, 128, 4099}) {
      SCOPED_TRACE(std::string(cpu::CpuIsaName(isa)) + " n=" + std::to_string(n));
      std::vector<float> y = Random(n, 29 + n);
      // The special values at the start, and again inside the second block.
      for (size_t i = 0; i < specials.size() && static_cast<int>(i) < n; ++i) y[i] = specials[i];
      for (size_t i = 0; i < specials.size() && static_cast<int>(i + 19) < n; ++i) {
        y[i + 19] = specials[i];
      }
      std::vector<uint16_t> yb(n);
      cpu::RoundToBf16(y.data(), n, yb.data());
      for (int i = 0; i < n; ++i) ASSERT_EQ(yb[i], F32ToBf16(y[i])) << i;
    }
  }
}

// The wire codec's BF16 -> F32 widening at every level is bitwise Bf16ToF32,
// for every one of the 65,536 bit patterns (NaN, infinities, subnormals) read
// from an odd address, and on lengths around the 8-lane block.
TEST_F(KernelLevelTest, WidenBf16IsBitwiseAtEveryLevel) {
  std::vector<uint8_t> bytes(1 + 2 * 65536);
  for (uint32_t v = 0; v < 65536; ++v) {
    bytes[1 + 2 * v] = static_cast<uint8_t>(v & 0xff);
    bytes[2 + 2 * v] = static_cast<uint8_t>(v >> 8);
  }
  for (cpu::CpuIsa isa : AvailableIsas()) {
    ASSERT_EQ(cpu::SetIsa(isa), isa);
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{9}, int64_t{65536}}) {
      std::vector<float> out(static_cast<size_t>(n));
      cpu::WidenBf16(bytes.data() + 1, n, out.data());
      for (int64_t i = 0; i < n; ++i) {
        const float want = Bf16ToF32(static_cast<uint16_t>(i));
        ASSERT_EQ(std::memcmp(&out[i], &want, sizeof(float)), 0)
            << cpu::CpuIsaName(isa) << " n=" << n << " bits " << i;
      }
    }
  }
}

// Grouped-query attention (cpu::Attend: each K/V row read once per head group,
// vector kernels, OpenMP over (row, kv head)) against the scalar per-head
// oracle (cpu::AttendReference) at every level, FP32 and BF16 K/V, on
// contexts around the lane blocks, with and without a sliding window, groups
// H/Hkv of 1, 4 and 8 and a head dim that is not a multiple of 8. Every row of
// a batched call must also equal, bitwise, the same row computed alone (the
// batched calls here are large enough to run on a team, the solo ones not).
TEST_F(KernelLevelTest, GroupedAttentionMatchesThePerHeadOracle) {
  struct Heads {
    int H, Hkv;
  };
  const Heads heads[] = {{2, 2}, {8, 2}, {8, 1}};
  for (cpu::CpuIsa isa : AvailableIsas()) {
    ASSERT_EQ(cpu::SetIsa(isa), isa);
    double worst_f32 = 0, worst_bf16 = 0;
    for (int context : {1, 15, 17, 100, 600}) {
      for (int window : {0, 16}) {
        for (const Heads& g : heads) {
          for (int hd : {20, 64}) {
            SCOPED_TRACE(std::string(cpu::CpuIsaName(isa)) + " context=" + std::to_string(context) +
                         " window=" + std::to_string(window) + " H=" + std::to_string(g.H) +
                         " Hkv=" + std::to_string(g.Hkv) + " hd=" + std::to_string(hd));
            const cpu::AttentionShape shape{
                .heads = g.H, .kv_heads = g.Hkv, .head_dim = hd, .sliding_window = window};
            const int kv_dim = g.Hkv * hd, q_dim = g.H * hd;
            const int tokens = std::min(context, 9), start = context - tokens;
            std::vector<float> q = Random(static_cast<size_t>(tokens) * q_dim, 7 + context);
            for (float& v : q) v *= 3.0f;  // peakier softmax
            const auto kf = Random(static_cast<size_t>(context) * kv_dim, 8 + hd);
            const auto vf = Random(static_cast<size_t>(context) * kv_dim, 9 + hd);
            std::vector<uint16_t> kb(kf.size()), vb(vf.size());
            cpu::RoundToBf16(kf.data(), kf.size(), kb.data());
            cpu::RoundToBf16(vf.data(), vf.size(), vb.data());
            std::vector<const float*> kr(context), vr(context);
            std::vector<const uint16_t*> kbr(context), vbr(context);
            for (int p = 0; p < context; ++p) {
              kr[p] = kf.data() + static_cast<size_t>(p) * kv_dim;
              vr[p] = vf.data() + static_cast<size_t>(p) * kv_dim;
              kbr[p] = kb.data() + static_cast<size_t>(p) * kv_dim;
              vbr[p] = vb.data() + static_cast<size_t>(p) * kv_dim;
            }
            auto check = [&](const auto& krows, const auto& vrows, double& worst) {
              const size_t n = static_cast<size_t>(tokens) * q_dim;
              std::vector<float> got(n), want(n);
              cpu::Attend(shape, q.data(), tokens, start, krows.data(), vrows.data(), got.data());
              cpu::AttendReference(shape, q.data(), tokens, start, krows.data(), vrows.data(),
                                   want.data());
              EXPECT_TRUE(
                  AllClose(got, want, tolerance::kKernelAbs, tolerance::kKernelRel, "attend"));
              for (size_t i = 0; i < n; ++i) {
                worst = std::max(worst, static_cast<double>(std::fabs(got[i] - want[i])));
              }
              // The same rows as a batch of two jobs (as the engine batches sequences).
              using W = std::remove_const_t<
                  std::remove_pointer_t<typename std::decay_t<decltype(krows)>::value_type>>;
              std::vector<float> split(n);
              const int half = tokens / 2;
              const cpu::AttentionRows<W> jobs[] = {
                  {q.data(), half, start, krows.data(), vrows.data(), split.data()},
                  {q.data() + static_cast<size_t>(half) * q_dim, tokens - half, start + half,
                   krows.data(), vrows.data(), split.data() + static_cast<size_t>(half) * q_dim}};
              cpu::Attend(shape, absl::MakeConstSpan(jobs));
              EXPECT_TRUE(split == got) << "a batch of two jobs differs from one call";
              for (int t = 0; t < tokens; ++t) {
                std::vector<float> solo(q_dim);
                cpu::Attend(shape, q.data() + static_cast<size_t>(t) * q_dim, 1, start + t,
                            krows.data(), vrows.data(), solo.data());
                ASSERT_TRUE(std::equal(solo.begin(), solo.end(),
                                       got.begin() + static_cast<size_t>(t) * q_dim))
                    << "row " << t << " differs when computed alone";
              }
            };
            check(kr, vr, worst_f32);
            check(kbr, vbr, worst_bf16);
          }
        }
      }
    }
    std::printf(
        "grouped attention, %s: max |diff| vs per-head oracle: FP32 K/V %g, BF16 K/V %g "
        "(bound %g + %g |ref|)\n",
        cpu::CpuIsaName(isa), worst_f32, worst_bf16, tolerance::kKernelAbs, tolerance::kKernelRel);
  }
}

TEST_F(KernelLevelTest, SetIsaClampsToTheCpuAndNamesTheLevel) {
  EXPECT_EQ(cpu::SetIsa(cpu::CpuIsa::kAmx), cpu::DetectedIsa());
  EXPECT_EQ(cpu::ActiveIsa(), cpu::DetectedIsa());
  EXPECT_EQ(cpu::SetIsa(cpu::CpuIsa::kScalar), cpu::CpuIsa::kScalar);
  EXPECT_STREQ(cpu::CpuIsaName(cpu::CpuIsa::kAvx512Bf16), "avx512_bf16");
  EXPECT_STREQ(cpu::CpuIsaName(cpu::CpuIsa::kAmx), "amx");
  cpu::SetPrecision(cpu::MatmulPrecision::kBf16);
  EXPECT_NE(cpu::KernelDescription().find("scalar"), std::string::npos) << cpu::KernelDescription();
  EXPECT_NE(cpu::KernelDescription().find("bf16 precision"), std::string::npos);
}

// SWITCHYARD_CPU_ISA caps the level at start-up; ctest runs this binary a
// second time with SWITCHYARD_CPU_ISA=avx2 (cpu_ops_test_avx2).
TEST(CpuOpsEnvTest, EnvironmentCapsTheLevel) {
  const char* env = std::getenv("SWITCHYARD_CPU_ISA");
  if (env == nullptr) GTEST_SKIP() << "SWITCHYARD_CPU_ISA is not set";
  std::printf("SWITCHYARD_CPU_ISA=%s: %s\n", env, cpu::KernelDescription().c_str());
  EXPECT_LE(cpu::ActiveIsa(), cpu::DetectedIsa());
  if (std::string(env) == "avx2") {
    EXPECT_LE(cpu::ActiveIsa(), cpu::CpuIsa::kAvx2);
  }
  if (std::string(env) == "scalar") {
    EXPECT_EQ(cpu::ActiveIsa(), cpu::CpuIsa::kScalar);
  }
}

}  // namespace
}  // namespace switchyard
