// One CPU decode step of the benchmark model (vocab 32000, hidden 1024, ffn
// 3584, 8 layers, 16 heads, 4 KV heads, 8 experts, top-2) at batch 1 and 16.
//
// The model comes from SWITCHYARD_BENCH_MODEL if set, else it is written once
// with `make-model --preset bench` into $TMPDIR/switchyard-bench-model.
// Each sequence holds a 64-token context; every iteration decodes one token
// per sequence and then rewinds the cache, so the context stays fixed.
// BM_CpuPrefill prefills 16 sequences of 64 tokens in one step.
// BM_CpuDecodeKvBudget decodes at a 2,048-token context from a 512 MiB KV
// cache of FP32 or BF16 K/V. BM_CpuMoeLayer runs one MoE layer's experts at
// batch 1 and 16 on teams of 1 to 64 threads.
// The kernel level and precision come from SWITCHYARD_CPU_ISA and
// SWITCHYARD_CPU_PRECISION (core/cpu_ops.h) and are printed in the context.
//
// Roofline: BM_Triad (run first) measures the STREAM triad bandwidth
// a[i] = b[i] + s c[i] with the OpenMP team (best of its iterations, 3 x 8
// bytes per element as STREAM and ../shared/tools/peers/stream.c count
// them, no write-allocate). Each decode step then reports
// weight_MB/token (the weights a step must read: every dense matrix, the LM
// head, and min(E, batch x K) experts per layer, divided by the batch),
// weight_GB/s (those bytes per wall-clock second over the whole loop) and
// triad_fraction (weight_GB/s over the triad bandwidth; absent when BM_Triad
// was filtered out).
#include <benchmark/benchmark.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <vector>

#include "core/cpu_ops.h"
#include "core/make_model.h"
#include "expert_service/expert_backend.h"
#include "gateway/local_model.h"

namespace switchyard {
namespace {

constexpr int kContext = 64;

// Best triad bandwidth of this run in bytes/s; 0 until BM_Triad ran.
double triad_bytes_per_s = 0;

void BM_Triad(benchmark::State& state) {
  const int64_t n = 80'000'000;  // doubles per array: 640 MB, far past the caches
  std::vector<double> a(n), b(n), c(n);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    a[i] = 0;
    b[i] = 1;
    c[i] = 2;
  }
  double best = 1e30;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    double* ap = a.data();
    const double *bp = b.data(), *cp = c.data();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) ap[i] = bp[i] + 3.0 * cp[i];
    best = std::min(
        best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    benchmark::DoNotOptimize(a.data());
  }
  triad_bytes_per_s = 3.0 * 8 * n / best;
  state.counters["best_GB/s"] = triad_bytes_per_s * 1e-9;
}

BENCHMARK(BM_Triad)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(10);

// Bytes of weights one decode step of `batch` sequences must read (see the
// file comment): BF16 or FP32 as the checkpoint stores them.
double WeightBytesPerStep(const ModelConfig& c, int batch) {
  const double elem = c.torch_dtype == "float32" ? 4.0 : 2.0;
  const double D = c.hidden_size, F = c.intermediate_size;
  const double dense = static_cast<double>(c.num_hidden_layers) *
                       (D * (c.q_dim() + 2.0 * c.kv_dim()) + c.q_dim() * D +
                        static_cast<double>(c.num_local_experts) * D);
  const double lm_head = static_cast<double>(c.vocab_size) * D;
  const int experts = std::min(c.num_local_experts, batch * c.num_experts_per_tok);
  const double expert = static_cast<double>(c.num_hidden_layers) * experts * 3.0 * D * F;
  return elem * (dense + lm_head + expert);
}

LocalModel* BenchModel() {
  static LocalModel* model = [] {
    std::string dir;
    if (const char* env = std::getenv("SWITCHYARD_BENCH_MODEL")) {
      dir = env;
    } else {
      dir = (std::filesystem::temp_directory_path() / "switchyard-bench-model").string();
      if (!std::filesystem::exists(dir + "/config.json")) {
        MakeModelOptions options;
        options.preset = "bench";
        options.out_dir = dir;
        options.seed = 1;
        if (absl::Status s = MakeModel(options); !s.ok()) {
          std::fprintf(stderr, "make-model failed: %s\n", s.ToString().c_str());
          std::exit(1);
        }
      }
    }
    LocalModelOptions options;
    options.load_tokenizer = false;
    auto loaded = LocalModel::Load(dir, options);
    if (!loaded.ok()) {
      std::fprintf(stderr, "loading %s failed: %s\n", dir.c_str(),
                   loaded.status().ToString().c_str());
      std::exit(1);
    }
    return loaded->release();
  }();
  return model;
}

// The timed loop every step benchmark shares: one Step of `inputs` per
// iteration, each cache cut back to `keep` positions after it so every
// iteration sees the same context. False (the error reported) if a step fails.
bool TimeSteps(benchmark::State& state, LocalModel* model, const std::vector<StepInput>& inputs,
               const std::vector<std::unique_ptr<SequenceKv>>& caches, int keep) {
  for (auto _ : state) {
    auto out = model->runner().Step(inputs);
    if (!out.ok()) {
      state.SkipWithError(out.status().ToString().c_str());
      return false;
    }
    benchmark::DoNotOptimize(out->logits.data());
    for (auto& kv : caches) kv->Truncate(keep);
  }
  return true;
}

void BM_CpuDecodeStep(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  LocalModel* model = BenchModel();
  const int V = model->config().vocab_size;
  std::vector<std::unique_ptr<SequenceKv>> caches;
  std::vector<std::vector<int32_t>> next(batch);
  for (int b = 0; b < batch; ++b) {
    caches.push_back(model->kv_pool().NewSequence());
    std::vector<int32_t> prompt(kContext);
    for (int i = 0; i < kContext; ++i) prompt[i] = 1 + (b * 7919 + i * 104729) % (V - 1);
    StepInput in{caches.back().get(), prompt, LogitsWanted::kNone};
    if (auto s = model->runner().Step({&in, 1}); !s.ok()) {
      state.SkipWithError(s.status().ToString().c_str());
      return;
    }
    next[b] = {static_cast<int32_t>(100 + b)};
  }
  std::vector<StepInput> inputs;
  for (int b = 0; b < batch; ++b) inputs.push_back({caches[b].get(), next[b], LogitsWanted::kLast});
  const auto start = std::chrono::steady_clock::now();
  if (!TimeSteps(state, model, inputs, caches, kContext)) return;
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
  const double bytes = WeightBytesPerStep(model->config(), batch);
  const double bytes_per_s = bytes * static_cast<double>(state.iterations()) / seconds;
  state.counters["weight_MB/token"] = bytes / batch * 1e-6;
  state.counters["weight_GB/s"] = bytes_per_s * 1e-9;
  if (triad_bytes_per_s > 0) state.counters["triad_fraction"] = bytes_per_s / triad_bytes_per_s;
}

BENCHMARK(BM_CpuDecodeStep)->Arg(1)->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();

// Prompt processing: one step prefills `batch` sequences of 64 tokens each
// (llama-batched-bench's S_PP with -npp 64 -npl 16), then the caches rewind.
void BM_CpuPrefill(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  LocalModel* model = BenchModel();
  const int V = model->config().vocab_size;
  std::vector<std::unique_ptr<SequenceKv>> caches;
  std::vector<std::vector<int32_t>> prompts(batch);
  std::vector<StepInput> inputs;
  for (int b = 0; b < batch; ++b) {
    caches.push_back(model->kv_pool().NewSequence());
    prompts[b].resize(kContext);
    for (int i = 0; i < kContext; ++i) prompts[b][i] = 1 + (b * 7919 + i * 104729) % (V - 1);
  }
  for (int b = 0; b < batch; ++b) {
    inputs.push_back({caches[b].get(), prompts[b], LogitsWanted::kLast});
  }
  if (!TimeSteps(state, model, inputs, caches, 0)) return;
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(batch) * kContext,
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK(BM_CpuPrefill)->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();

// One MoE layer's experts on an OpenMP team of a given size (issue #11): at
// batch 1 two experts get one token each, at batch 16 all 8 experts get 4
// (the 32 routed tokens spread evenly). Each iteration runs the next layer's
// experts, so the weights come from memory as in a decode step. With more
// threads than active experts LocalExpertBackend splits the experts' output
// rows over the team; before, batch 1 kept 2 threads busy whatever the team,
// as the threads=2 case still does. Args: batch, threads (skipped past the
// CPUs this process may use). Counters: weight_GB/s, triad_fraction.
void BM_CpuMoeLayer(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const int threads = static_cast<int>(state.range(1));
#ifdef _OPENMP
  if (threads > omp_get_num_procs()) {
    state.SkipWithError("more threads than CPUs");
    return;
  }
#endif
  LocalModel* model = BenchModel();
  const ModelConfig& c = model->config();
  const int D = c.hidden_size;
  const int experts = batch == 1 ? c.num_experts_per_tok : c.num_local_experts;
  const int tokens = batch == 1 ? 1 : batch * c.num_experts_per_tok / experts;
  std::vector<float> input(static_cast<size_t>(tokens) * D), output(input.size() * experts);
  for (size_t i = 0; i < input.size(); ++i) input[i] = 0.01f * static_cast<float>(i % 97) - 0.5f;
  LocalExpertBackend backend(&model->experts());
  std::vector<ExpertBatch> batches(experts);
#ifdef _OPENMP
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(threads);
#endif
  int layer = 0;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    for (int j = 0; j < experts; ++j) {
      // Batch 1: experts (layer, layer + 3) mod E, so layers differ.
      const int e = (layer + 3 * j) % c.num_local_experts;
      batches[j] = {e, tokens, input.data(), output.data() + static_cast<size_t>(j) * tokens * D};
    }
    if (absl::Status s = backend.RunLayer(layer, batches); !s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      break;
    }
    benchmark::DoNotOptimize(output.data());
    layer = (layer + 1) % c.num_hidden_layers;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
#ifdef _OPENMP
  omp_set_num_threads(saved_threads);
#endif
  const double elem = c.torch_dtype == "float32" ? 4.0 : 2.0;
  const double bytes = elem * experts * 3.0 * D * c.intermediate_size;  // per layer
  const double bytes_per_s = bytes * static_cast<double>(state.iterations()) / seconds;
  state.counters["weight_GB/s"] = bytes_per_s * 1e-9;
  if (triad_bytes_per_s > 0) state.counters["triad_fraction"] = bytes_per_s / triad_bytes_per_s;
}

BENCHMARK(BM_CpuMoeLayer)
    ->ArgNames({"batch", "threads"})
    ->ArgsProduct({{1, 16}, {1, 2, 4, 8, 16, 32, 64}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Decode at a long context from a KV cache of a fixed byte budget, K/V stored
// as FP32 or BF16 (issue #15): BF16 holds twice the tokens in the same
// memory. Args: dtype (0 f32, 1 bf16), context, batch (0: as many sequences
// of context + 1 tokens as the budget holds). The caches are filled with
// random K/V (prefilling long contexts would take minutes on a small
// machine; the attention reads the same bytes either way), then every
// iteration decodes one token per sequence and rewinds. Counters: tokens/s,
// `sequences` decoded per step, `max_sequences` the budget holds.
constexpr int64_t kKvBudgetBytes = int64_t{512} << 20;

void BM_CpuDecodeKvBudget(benchmark::State& state) {
  const KvDtype dtype = state.range(0) == 1 ? KvDtype::kBf16 : KvDtype::kF32;
  const int context = static_cast<int>(state.range(1));
  LocalModel* model = BenchModel();
  const ModelConfig& c = model->config();
  KvCachePool pool(c, KvCachePool::TokensForBytes(c, dtype, kKvBudgetBytes),
                   /*host_storage=*/true, KvLayout::kPaged, dtype);
  const int64_t max_sequences = pool.capacity_tokens() / KvCachePool::SlotsFor(context + 1);
  const int batch =
      state.range(2) > 0 ? static_cast<int>(state.range(2)) : static_cast<int>(max_sequences);
  std::vector<std::unique_ptr<SequenceKv>> caches;
  uint32_t x = 12345;
  auto random = [&x] {  // in [-2, 2)
    x = x * 1664525u + 1013904223u;
    return static_cast<float>(x >> 8) / static_cast<float>(1 << 24) * 4.0f - 2.0f;
  };
  std::vector<float> row(c.kv_dim());
  for (int b = 0; b < batch; ++b) {
    caches.push_back(pool.NewSequence());
    SequenceKv& kv = *caches.back();
    if (absl::Status s = kv.Reserve(context + 1); !s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      return;
    }
    for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
      for (int pos = 0; pos < context; ++pos) {
        for (int plane = 0; plane < 2; ++plane) {
          for (float& v : row) v = random();
          if (dtype == KvDtype::kBf16) {
            cpu::RoundToBf16(row.data(), c.kv_dim(),
                             plane == 0 ? kv.key_bf16(layer, pos) : kv.value_bf16(layer, pos));
          } else {
            std::copy(row.begin(), row.end(),
                      plane == 0 ? kv.key(layer, pos) : kv.value(layer, pos));
          }
        }
      }
    }
    kv.Commit(context);
  }
  std::vector<std::vector<int32_t>> next(batch);
  std::vector<StepInput> inputs;
  for (int b = 0; b < batch; ++b) {
    next[b] = {static_cast<int32_t>(100 + b)};
    inputs.push_back({caches[b].get(), next[b], LogitsWanted::kLast});
  }
  if (!TimeSteps(state, model, inputs, caches, context)) return;
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["sequences"] = batch;
  state.counters["max_sequences"] = static_cast<double>(max_sequences);
  state.SetLabel(KvDtypeName(dtype));
}

BENCHMARK(BM_CpuDecodeKvBudget)
    ->ArgNames({"bf16", "context", "batch"})
    ->Args({0, 2048, 8})
    ->Args({1, 2048, 8})
    ->Args({0, 2048, 0})
    ->Args({1, 2048, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("kernels", switchyard::cpu::KernelDescription());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
