// CPU kernels against naive loops on awkward shapes.
#include "core/cpu_ops.h"

#include <cmath>
#include <random>
#include <vector>

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

TEST(CpuOpsTest, LinearMatchesNaive) {
  for (auto [T, K, N] : {std::tuple{1, 33, 7}, {33, 17, 65}, {5, 64, 1}, {2, 1, 3}}) {
    const auto x = Random(static_cast<size_t>(T) * K, 1), w = Random(static_cast<size_t>(N) * K, 2);
    std::vector<float> y(static_cast<size_t>(T) * N), ref(y.size());
    for (int t = 0; t < T; ++t)
      for (int n = 0; n < N; ++n) {
        double s = 0;
        for (int k = 0; k < K; ++k) s += static_cast<double>(x[t * K + k]) * w[n * K + k];
        ref[t * N + n] = static_cast<float>(s);
      }
    cpu::Linear(x.data(), w.data(), T, K, N, y.data());
    EXPECT_TRUE(AllClose(y, ref, tolerance::kKernelAbs, tolerance::kKernelRel, "Linear"));
    // Accumulating adds onto what is there.
    std::vector<float> acc(y.size(), 1.0f), ref_acc(ref);
    for (float& v : ref_acc) v += 1.0f;
    cpu::Linear(x.data(), w.data(), T, K, N, acc.data(), /*accumulate=*/true);
    EXPECT_TRUE(AllClose(acc, ref_acc, tolerance::kKernelAbs, tolerance::kKernelRel, "Linear+="));
  }
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

}  // namespace
}  // namespace switchyard
