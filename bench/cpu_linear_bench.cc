// cpu::Linear alone on the bench model's expert shapes (BF16 weights), at
// every kernel level and precision this CPU has: which kernel a decode step
// should use, and how far each is from the CPU's FMA / memory limits.
//
// Args: tokens, kernel (0 scalar, 1 avx2, 2 avx512, 3 avx512_bf16 with
// precision bf16, 4 avx512 with precision bf16 emulated in FP32, 5 amx with
// precision f32 (x as three BF16 terms), 6 amx with precision bf16), shape
// (0: w13 [2F=7168, D=1024], 1: w2 [D=1024, F=3584]).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "core/cpu_ops.h"
#include "core/dtype.h"

namespace switchyard {
namespace {

void BM_LinearBf16(benchmark::State& state) {
  const int T = static_cast<int>(state.range(0));
  const int kernel = static_cast<int>(state.range(1));
  const bool w13 = state.range(2) == 0;
  const int N = w13 ? 7168 : 1024, K = w13 ? 1024 : 3584;
  const cpu::CpuIsa want = kernel >= 5   ? cpu::CpuIsa::kAmx
                           : kernel == 3 ? cpu::CpuIsa::kAvx512Bf16
                           : kernel == 4 ? cpu::CpuIsa::kAvx512
                                         : static_cast<cpu::CpuIsa>(kernel);
  if (cpu::SetIsa(want) != want) {
    state.SkipWithError("this CPU lacks the kernel level");
    return;
  }
  const bool bf16 = kernel == 3 || kernel == 4 || kernel == 6;
  cpu::SetPrecision(bf16 ? cpu::MatmulPrecision::kBf16 : cpu::MatmulPrecision::kF32);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<uint16_t> w(static_cast<size_t>(N) * K);  // [N, K]
  for (auto& v : w) v = F32ToBf16(u(rng));
  std::vector<float> x(static_cast<size_t>(T) * K), y(static_cast<size_t>(T) * N);  // [T,K],[T,N]
  for (auto& v : x) v = u(rng);
  const cpu::Matrix m = cpu::Matrix::FromBf16(std::move(w), N, K);
  for (auto _ : state) {
    cpu::Linear(x.data(), m, T, y.data());
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * T * N * K * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["weight GB/s"] =
      benchmark::Counter(2.0 * N * K * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(cpu::CpuIsaName(cpu::ActiveIsa()));
  cpu::SetIsa(cpu::DetectedIsa());
  cpu::SetPrecision(cpu::MatmulPrecision::kF32);
}

BENCHMARK(BM_LinearBf16)
    ->ArgsProduct({{1, 4, 16, 64}, {1, 2, 3, 4, 5, 6}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace
}  // namespace switchyard

BENCHMARK_MAIN();
