// One GPU decode step (CudaModelRunner, BF16 mode, experts on the same GPU)
// at batch 1, 16, 64 and 256, against the roofline of the weights it must
// read. Commands: bench/gpu/README.md.
//
// The model: SWITCHYARD_GPU_BENCH_MODEL, a checkpoint folder, normally
//   switchyard make-model --preset mixtral-8x7b --layers N --out DIR
// With --make-model-layers=N and no config.json in that folder, the benchmark
// writes it itself first (the same MakeModel, seed 1), so the GPU machine
// needs no `switchyard` binary. Without the variable, or without a GPU, every
// benchmark is skipped with a message.
//
// Each sequence holds a --context-token context (default 128), prefilled
// before timing; an iteration decodes one token per sequence and rewinds the
// caches, so every iteration is the same step. Second argument: 1 = logits of
// every sequence back to the host (LogitsWanted::kLast, what serving does),
// 0 = no logits (LogitsWanted::kNone: the GPU work alone).
//
// Counters per step:
//   weight_GB          bytes of weights the step must read: every dense
//                      layer weight (norms, q/k/v/o, router gate), the final
//                      norm, the embedding rows of the batch, the LM head when
//                      logits are wanted, and each (layer, expert) that the
//                      step's routing actually uses, once
//   distinct_experts   those (layer, expert) pairs
//   bandwidth_GBps     the roofline's bandwidth: 2 x memory clock x bus width / 8
//                      from the device, or --bandwidth=GB/s
//   roofline_ms        weight_GB / bandwidth_GBps
//   step_ms            measured wall time per step (Step synchronises)
//   ratio_to_roofline  step_ms / roofline_ms (1.0 = reading weights at peak)
//   kv_MB              K/V bytes the attention reads (not in the roofline)
//   tokens/s           decode tokens per second
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/checkpoint.h"
#include "core/make_model.h"
#include "cuda/device.h"
#include "gateway/cuda_model_runner.h"

namespace switchyard {
namespace {

int g_context = 128;
double g_bandwidth_override_gbps = 0.0;  // 0: from the device
int g_make_model_layers = 0;             // > 0: write the model when missing

struct BenchModel {
  std::string skip_reason;  // non-empty: skip every benchmark with this
  std::unique_ptr<StepRunner> runner;
  const cuda::CudaModelRunner* cuda_runner = nullptr;
  std::unique_ptr<KvCachePool> pool;
  double bandwidth = 0.0;  // bytes/s
};

BenchModel* Model() {
  static BenchModel* model = [] {
    auto* m = new BenchModel();
    const char* dir = std::getenv("SWITCHYARD_GPU_BENCH_MODEL");
    if (dir == nullptr || *dir == '\0') {
      m->skip_reason =
          "SWITCHYARD_GPU_BENCH_MODEL is not set (a folder from `switchyard make-model --preset "
          "mixtral-8x7b --layers N`)";
      return m;
    }
    if (!cuda::HasDevice()) {
      m->skip_reason = "no CUDA device";
      return m;
    }
    if (g_make_model_layers > 0 && !std::filesystem::exists(std::string(dir) + "/config.json")) {
      std::fprintf(stderr,
                   "writing make-model --preset mixtral-8x7b --layers %d --seed 1 to %s...\n",
                   g_make_model_layers, dir);
      MakeModelOptions options;
      options.preset = "mixtral-8x7b";
      options.out_dir = dir;
      options.layers = g_make_model_layers;
      options.seed = 1;
      if (absl::Status s = MakeModel(options); !s.ok()) {
        m->skip_reason = "make-model failed: " + s.ToString();
        return m;
      }
    }
    auto ckpt = Checkpoint::Open(dir);
    if (!ckpt.ok()) {
      m->skip_reason = "opening the model failed: " + ckpt.status().ToString();
      return m;
    }
    std::fprintf(stderr, "loading %s (%.2f GB stored) onto the GPU in BF16...\n", dir,
                 static_cast<double>((*ckpt)->selected_bytes()) / 1e9);
    auto runner = cuda::MakeCudaRunner(**ckpt, cuda::Precision::kBF16, nullptr);
    if (!runner.ok()) {
      m->skip_reason = "loading the model onto the GPU failed: " + runner.status().ToString();
      return m;
    }
    m->runner = std::move(*runner);
    m->cuda_runner = static_cast<const cuda::CudaModelRunner*>(m->runner.get());
    const ModelConfig& c = m->runner->config();
    // Room for the largest batch at the context plus the decode token.
    const int64_t per_seq = (g_context + 1 + KvCachePool::kBlockTokens) /
                            KvCachePool::kBlockTokens * KvCachePool::kBlockTokens;
    m->pool = std::make_unique<KvCachePool>(c, 256 * per_seq, /*host_storage=*/false);
    if (g_bandwidth_override_gbps > 0) {
      m->bandwidth = g_bandwidth_override_gbps * 1e9;
    } else {
      auto bw = cuda::PeakMemoryBandwidth();
      if (!bw.ok()) {
        m->skip_reason = "reading the memory bandwidth failed: " + bw.status().ToString();
        return m;
      }
      m->bandwidth = *bw;
    }
    auto device = cuda::DescribeDevice();
    std::fprintf(stderr, "device %s, roofline bandwidth %.0f GB/s%s\n",
                 device.ok() ? device->c_str() : "?", m->bandwidth / 1e9,
                 g_bandwidth_override_gbps > 0 ? " (--bandwidth)" : "");
    return m;
  }();
  return model;
}

void BM_GpuDecodeStep(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const bool want_logits = state.range(1) != 0;
  BenchModel* m = Model();
  if (!m->skip_reason.empty()) {
    state.SkipWithError(m->skip_reason.c_str());
    return;
  }
  StepRunner& runner = *m->runner;
  const ModelConfig& c = runner.config();
  const int V = c.vocab_size;

  // Prefill every sequence's context, up to 2048 tokens per step.
  std::vector<std::unique_ptr<SequenceKv>> caches;
  std::vector<std::vector<int32_t>> prompts(batch);
  for (int b = 0; b < batch; ++b) {
    caches.push_back(m->pool->NewSequence());
    prompts[b].resize(g_context);
    for (int i = 0; i < g_context; ++i) prompts[b][i] = 1 + (b * 7919 + i * 104729) % (V - 1);
  }
  const int per_step = std::max(1, 2048 / g_context);
  for (int b0 = 0; b0 < batch; b0 += per_step) {
    std::vector<StepInput> chunk;
    for (int b = b0; b < std::min(batch, b0 + per_step); ++b) {
      chunk.push_back({caches[b].get(), prompts[b], LogitsWanted::kNone});
    }
    if (auto s = runner.Step(chunk); !s.ok()) {
      state.SkipWithError(("prefill failed: " + s.status().ToString()).c_str());
      return;
    }
  }
  std::vector<std::vector<int32_t>> next(batch);
  std::vector<StepInput> inputs;
  for (int b = 0; b < batch; ++b) {
    next[b] = {static_cast<int32_t>(100 + b % (V - 100))};
    inputs.push_back(
        {caches[b].get(), next[b], want_logits ? LogitsWanted::kLast : LogitsWanted::kNone});
  }
  auto rewind = [&] {
    for (auto& kv : caches) kv->Truncate(g_context);
  };

  // One traced step (untimed): the routing, hence the experts the step reads.
  // Every iteration is the same step, so the routing is the same.
  StepTrace trace;
  if (auto s = runner.Step(inputs, &trace); !s.ok()) {
    state.SkipWithError(("decode step failed: " + s.status().ToString()).c_str());
    return;
  }
  rewind();
  int64_t distinct = 0;
  for (const Routing& r : trace.routing) {
    distinct += static_cast<int64_t>(std::set<int32_t>(r.experts.begin(), r.experts.end()).size());
  }
  const cuda::CudaDenseModel& dense = m->cuda_runner->dense();
  const cuda::CudaExpertStore& experts = *m->cuda_runner->experts();
  const double esize = cuda::DeviceDTypeSize(dense.embed().dtype);
  const double weight_bytes =
      static_cast<double>(dense.layer_bytes()) * c.num_hidden_layers +
      static_cast<double>(c.hidden_size) * sizeof(float) +                  // final norm
      static_cast<double>(batch) * c.hidden_size * esize +                  // embedding rows
      (want_logits ? static_cast<double>(dense.lm_head().bytes()) : 0.0) +  // LM head
      static_cast<double>(distinct) * static_cast<double>(experts.expert_bytes());
  const double kv_elem = m->cuda_runner->kv_dtype() == cuda::KvDType::kBF16 ? 2.0 : 4.0;
  const double kv_bytes = static_cast<double>(batch) * (g_context + 1) * 2.0 * c.num_hidden_layers *
                          c.kv_dim() * kv_elem;
  const double roofline_s = weight_bytes / m->bandwidth;

  for (int i = 0; i < 3; ++i) {  // warm-up: cuBLAS heuristics, allocations
    if (auto s = runner.Step(inputs); !s.ok()) {
      state.SkipWithError(s.status().ToString().c_str());
      return;
    }
    rewind();
  }

  double elapsed = 0.0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    auto out = runner.Step(inputs);
    const auto t1 = std::chrono::steady_clock::now();
    if (!out.ok()) {
      state.SkipWithError(out.status().ToString().c_str());
      return;
    }
    benchmark::DoNotOptimize(out->logits.data());
    elapsed += std::chrono::duration<double>(t1 - t0).count();
    state.PauseTiming();
    rewind();
    state.ResumeTiming();
  }
  const double step_s = elapsed / static_cast<double>(state.iterations());
  state.counters["weight_GB"] = weight_bytes / 1e9;
  state.counters["distinct_experts"] = static_cast<double>(distinct);
  state.counters["bandwidth_GBps"] = m->bandwidth / 1e9;
  state.counters["roofline_ms"] = roofline_s * 1e3;
  state.counters["step_ms"] = step_s * 1e3;
  state.counters["ratio_to_roofline"] = step_s / roofline_s;
  state.counters["kv_MB"] = kv_bytes / 1e6;
  state.counters["tokens/s"] = static_cast<double>(batch) / step_s;
}

BENCHMARK(BM_GpuDecodeStep)
    ->ArgNames({"batch", "logits"})
    ->ArgsProduct({{1, 16, 64, 256}, {1, 0}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace switchyard

// Google Benchmark's flags plus --bandwidth=GB/s (roofline bandwidth
// override), --context=N (cached tokens per sequence, default 128) and
// --make-model-layers=N (write the model first when the folder has none).
int main(int argc, char** argv) {
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--bandwidth=", 12) == 0) {
      switchyard::g_bandwidth_override_gbps = std::atof(argv[i] + 12);
    } else if (std::strncmp(argv[i], "--context=", 10) == 0) {
      switchyard::g_context = std::max(1, std::atoi(argv[i] + 10));
    } else if (std::strncmp(argv[i], "--make-model-layers=", 20) == 0) {
      switchyard::g_make_model_layers = std::atoi(argv[i] + 20);
    } else {
      rest.push_back(argv[i]);
    }
  }
  int rest_argc = static_cast<int>(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
