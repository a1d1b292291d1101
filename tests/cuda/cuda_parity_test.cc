// The CUDA backend on the tiny-mixtral fixture, against Hugging Face
// transformers' reference outputs (tests/data/tiny-mixtral), the CPU engine,
// and a CPU model of BF16 mode:
//   FP32 mode  logits and router within the HF tolerance, all 24 greedy tokens
//              of every prompt (as the CPU engine), the CPU engine's logits
//              within FP32 reordering;
//   BF16 mode  logits within the stated BF16 tolerance of HF and of the CPU
//              model of BF16 mode, greedy tokens equal up to the first
//              small-margin step;
//   a mixed batch (decode, prefill chunks, no-logits inputs) equals each
//   sequence alone; a sequence whose paged device cache grows block by block
//   equals one prefill; a prefix shared with another sequence's published
//   blocks equals computing it; forced preemption under eight scheduler
//   streams keeps every stream equal to its solo run; experts behind an ExpertBackend (the CPU's,
//   as a remote service would be) equal the all-GPU path; the GPU ExpertBackend equals the CPU
//   experts; errors match the CPU runner's; micro-batch
//   ping-pong (--micro-batches 2, 3, auto) gives the same bits as one micro-batch with
//   GPU experts, CPU experts and remote experts over real gRPC, and a failed
//   remote expert still ends only its sequences with overlap on.
// Built twice: cuda_parity_test skips every GPU test without a device;
// cuda_parity_emulated_test runs them on the CPU emulator
// (cuda/emulator/device_emulation.h). One CPU-only test checks the CPU
// model of BF16 mode that the BF16 tolerances were measured with.
#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/cpu_ops.h"
#include "core/safetensors.h"
#include "core/tensor_names.h"
#include "expert_service/expert_backend.h"
#include "expert_service/expert_ffn.h"
#include "expert_service/expert_server.h"
#include "gateway/cuda_model_runner.h"
#include "gateway/generate.h"
#include "gateway/local_model.h"
#include "gateway/remote_expert_backend.h"
#include "gateway/scheduler.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "rpc/server.h"
#include "tests/cuda/bf16_emulation.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/per_batch_backend.h"
#include "tests/test_util.h"
#include "tests/tolerances.h"

namespace switchyard {
namespace {

using testing::AllClose;
using testing::TinyMixtralDir;

constexpr int kPrompts = 4;

// Records one scheduler request's events; Wait blocks until it ends.
class RecordingSink : public GenerationSink {
 public:
  void OnTokens(const TokenEvent& e) override {
    std::lock_guard<std::mutex> lock(mu_);
    tokens.insert(tokens.end(), e.token_ids.begin(), e.token_ids.end());
  }
  void OnFinish(const FinishEvent& e) override { End(absl::OkStatus()); }
  void OnError(const absl::Status& s) override { End(s); }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_; });
  }
  std::vector<int32_t> tokens;
  absl::Status error;

 private:
  void End(absl::Status s) {
    std::lock_guard<std::mutex> lock(mu_);
    error = std::move(s);
    done_ = true;
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
};

// The Hugging Face reference fixture.
class Reference {
 public:
  Reference() {
    auto ref = SafetensorsFile::Open(TinyMixtralDir() + "/reference.safetensors");
    EXPECT_TRUE(ref.ok()) << ref.status();
    if (ref.ok()) file_ = std::move(*ref);
    json_ = nlohmann::json::parse(testing::ReadAll(TinyMixtralDir() + "/reference.json"));
  }
  const nlohmann::json& json() const { return json_; }
  std::vector<float> F32(const std::string& name) const {
    auto view = file_->View(name);
    EXPECT_TRUE(view.ok()) << view.status();
    if (!view.ok()) return {};
    std::vector<float> out(view->num_elements());
    ConvertToF32(view->dtype, view->data, out.size(), out.data());
    return out;
  }
  std::vector<int64_t> I64(const std::string& name) const {
    auto view = file_->View(name);
    EXPECT_TRUE(view.ok()) << view.status();
    if (!view.ok()) return {};
    std::vector<int64_t> out(view->num_elements());
    std::memcpy(out.data(), view->data, out.size() * sizeof(int64_t));
    return out;
  }
  std::vector<int32_t> InputIds(int p) const {
    std::vector<int32_t> ids;
    for (int64_t v : I64("p" + std::to_string(p) + ".input_ids"))
      ids.push_back(static_cast<int32_t>(v));
    return ids;
  }

 private:
  std::unique_ptr<SafetensorsFile> file_;
  nlohmann::json json_;
};

// Greedy steps of `got` equal to `want`, compared up to the first step whose
// margin is below `min_margin`; returns the number compared.
size_t CompareGreedy(const std::vector<int32_t>& got, const std::vector<int64_t>& want,
                     const std::vector<float>& margins, double min_margin,
                     const std::string& what) {
  size_t compared = 0;
  for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
    if (margins[i] < min_margin) break;
    EXPECT_EQ(got[i], want[i]) << what << ": greedy step " << i;
    ++compared;
  }
  std::printf("[ greedy ] %s: %zu of %zu steps compared\n", what.c_str(), compared, want.size());
  return compared;
}

class CudaParityTest : public testing::CudaTest {
 protected:
  // Loaded once, on first use by a test that has a device.
  struct Shared {
    std::unique_ptr<LocalModel> cpu;
    std::unique_ptr<Reference> ref;
    std::unique_ptr<StepRunner> gpu_f32, gpu_bf16, gpu_remote;
    std::unique_ptr<LocalExpertBackend> cpu_experts;
    // Device K/V (host_storage = false): the F32 runners' slab, and the BF16
    // runner's (a pool's slab has one element type).
    std::unique_ptr<KvCachePool> pool, bf16_pool;
    std::unique_ptr<testing::Bf16Emulation> emulation;
  };
  static Shared* shared_;

  void SetUp() override {
    testing::CudaTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    if (shared_ != nullptr) return;
    auto s = std::make_unique<Shared>();
    SY_ASSERT_OK_AND_ASSIGN(s->cpu, LocalModel::Load(TinyMixtralDir()));
    s->ref = std::make_unique<Reference>();
    SY_ASSERT_OK_AND_ASSIGN(auto ckpt, Checkpoint::Open(TinyMixtralDir()));
    SY_ASSERT_OK_AND_ASSIGN(s->gpu_f32,
                            cuda::MakeCudaRunner(*ckpt, cuda::Precision::kF32, nullptr));
    SY_ASSERT_OK_AND_ASSIGN(s->gpu_bf16,
                            cuda::MakeCudaRunner(*ckpt, cuda::Precision::kBF16, nullptr));
    s->cpu_experts = std::make_unique<LocalExpertBackend>(&s->cpu->experts());
    SY_ASSERT_OK_AND_ASSIGN(auto dense_only,
                            Checkpoint::Open(TinyMixtralDir(), WeightSelection::DenseOnly()));
    SY_ASSERT_OK_AND_ASSIGN(s->gpu_remote, cuda::MakeCudaRunner(*dense_only, cuda::Precision::kF32,
                                                                s->cpu_experts.get()));
    s->pool = std::make_unique<KvCachePool>(s->cpu->config(), 1 << 16, /*host_storage=*/false);
    s->bf16_pool = std::make_unique<KvCachePool>(s->cpu->config(), 1 << 16, /*host_storage=*/false);
    SY_ASSERT_OK_AND_ASSIGN(s->emulation, testing::Bf16Emulation::Load(TinyMixtralDir()));
    shared_ = s.release();
  }

  const Reference& ref() const { return *shared_->ref; }
  LocalModel& cpu() const { return *shared_->cpu; }
  KvCachePool& pool() const { return *shared_->pool; }
  KvCachePool& bf16_pool() const { return *shared_->bf16_pool; }
  KvCachePool& PoolFor(const StepRunner& runner) const {
    return &runner == shared_->gpu_bf16.get() ? bf16_pool() : pool();
  }
  int V() const { return cpu().config().vocab_size; }

  // Greedy decoding of prompt p for as many tokens as the HF reference has.
  absl::StatusOr<GenerateResult> GreedyAsHf(StepRunner& runner, int p) const {
    GenerateOptions options;
    options.max_new_tokens =
        static_cast<int>(ref().I64("p" + std::to_string(p) + ".greedy_ids").size());
    options.ignore_eos = true;
    return Generate(runner, PoolFor(runner), cpu().tokenizer(), ref().InputIds(p), options);
  }

  // One prefill of prompt p with logits for every position, with the trace.
  absl::StatusOr<StepOutput> Prefill(StepRunner& runner, int p, StepTrace* trace,
                                     KvCachePool& pool) const {
    const std::vector<int32_t> ids = ref().InputIds(p);
    auto kv = pool.NewSequence();
    StepInput input{kv.get(), ids, LogitsWanted::kAll};
    return runner.Step({&input, 1}, trace);
  }
};

CudaParityTest::Shared* CudaParityTest::shared_ = nullptr;

TEST_F(CudaParityTest, Fp32PrefillLogitsAndRouterMatchHf) {
  const ModelConfig& c = cpu().config();
  for (int p = 0; p < kPrompts; ++p) {
    SCOPED_TRACE("prompt " + std::to_string(p));
    const int T = static_cast<int>(ref().InputIds(p).size());
    StepTrace trace;
    SY_ASSERT_OK_AND_ASSIGN(StepOutput out, Prefill(*shared_->gpu_f32, p, &trace, pool()));
    const std::string prefix = "p" + std::to_string(p) + ".";
    EXPECT_TRUE(
        AllClose(absl::MakeConstSpan(out.logits).subspan(static_cast<size_t>(T - 1) * V(), V()),
                 ref().F32(prefix + "last_logits"), tolerance::kHfAbs, tolerance::kHfRel,
                 "gpu f32 " + prefix + "last_logits"));
    if (p == 0) {
      EXPECT_TRUE(AllClose(out.logits, ref().F32("p0.logits"), tolerance::kHfAbs, tolerance::kHfRel,
                           "gpu f32 p0.logits (every position)"));
    }
    EXPECT_EQ(out.expert_tokens,
              static_cast<int64_t>(T) * c.num_experts_per_tok * c.num_hidden_layers);
    ASSERT_EQ(trace.router_logits.size(), static_cast<size_t>(c.num_hidden_layers));
    for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
      const std::string lp = prefix + "layer" + std::to_string(layer) + ".";
      EXPECT_TRUE(AllClose(trace.router_logits[layer], ref().F32(lp + "router_logits"),
                           tolerance::kRouterAbs, tolerance::kRouterRel,
                           "gpu f32 " + lp + "router_logits"));
      const std::vector<int64_t> topk = ref().I64(lp + "topk_experts");  // [T, K]
      ASSERT_EQ(topk.size(), trace.routing[layer].experts.size());
      for (size_t i = 0; i < topk.size(); ++i) {
        EXPECT_EQ(trace.routing[layer].experts[i], topk[i]) << lp << "topk_experts entry " << i;
      }
    }
  }
}

TEST_F(CudaParityTest, Fp32LogitsMatchCpuEngine) {
  for (int p = 0; p < kPrompts; ++p) {
    SY_ASSERT_OK_AND_ASSIGN(StepOutput gpu, Prefill(*shared_->gpu_f32, p, nullptr, pool()));
    SY_ASSERT_OK_AND_ASSIGN(StepOutput cpu_out,
                            Prefill(cpu().runner(), p, nullptr, cpu().kv_pool()));
    EXPECT_TRUE(AllClose(gpu.logits, cpu_out.logits, tolerance::kReorderAbs, tolerance::kReorderRel,
                         "gpu f32 vs cpu, prompt " + std::to_string(p) + " every position"));
  }
}

TEST_F(CudaParityTest, Fp32GreedyMatchesHfAllSteps) {
  for (int p = 0; p < kPrompts; ++p) {
    const std::string prefix = "p" + std::to_string(p) + ".";
    const std::vector<int64_t> greedy = ref().I64(prefix + "greedy_ids");
    SY_ASSERT_OK_AND_ASSIGN(GenerateResult result, GreedyAsHf(*shared_->gpu_f32, p));
    ASSERT_EQ(result.token_ids.size(), greedy.size());
    const size_t compared =
        CompareGreedy(result.token_ids, greedy, ref().F32(prefix + "greedy_margins"),
                      tolerance::kGreedyMargin, "gpu f32 prompt " + std::to_string(p));
    // Every reference margin is above kGreedyMargin: all 24, as the CPU engine.
    EXPECT_EQ(compared, greedy.size());
    auto text = cpu().tokenizer().Decode(result.token_ids);
    ASSERT_TRUE(text.ok()) << text.status();
    EXPECT_EQ(*text, ref().json()["prompts"][p]["greedy_text"].get<std::string>());
  }
  EXPECT_EQ(pool().used_tokens(), 0) << "sequences freed, slots returned";
}

TEST_F(CudaParityTest, Bf16LogitsWithinStatedTolerance) {
  for (int p = 0; p < kPrompts; ++p) {
    SCOPED_TRACE("prompt " + std::to_string(p));
    const std::vector<int32_t> ids = ref().InputIds(p);
    const int T = static_cast<int>(ids.size());
    SY_ASSERT_OK_AND_ASSIGN(StepOutput out, Prefill(*shared_->gpu_bf16, p, nullptr, bf16_pool()));
    const std::string prefix = "p" + std::to_string(p) + ".";
    EXPECT_TRUE(
        AllClose(absl::MakeConstSpan(out.logits).subspan(static_cast<size_t>(T - 1) * V(), V()),
                 ref().F32(prefix + "last_logits"), tolerance::kGpuBf16LogitAbs,
                 tolerance::kGpuBf16LogitRel, "gpu bf16 vs hf " + prefix + "last_logits"));
    const std::vector<float> emulated =
        shared_->emulation->Forward(ids, /*round_activations=*/true);
    EXPECT_TRUE(AllClose(out.logits, emulated, tolerance::kGpuBf16EmulationAbs,
                         tolerance::kGpuBf16EmulationRel,
                         "gpu bf16 vs cpu model of bf16, " + prefix + " every position"));
  }
}

TEST_F(CudaParityTest, Bf16GreedyMatchesUpToSmallMargins) {
  for (int p = 0; p < kPrompts; ++p) {
    const std::string prefix = "p" + std::to_string(p) + ".";
    const std::vector<int64_t> greedy = ref().I64(prefix + "greedy_ids");
    SY_ASSERT_OK_AND_ASSIGN(GenerateResult result, GreedyAsHf(*shared_->gpu_bf16, p));
    ASSERT_EQ(result.token_ids.size(), greedy.size());
    EXPECT_GT(CompareGreedy(result.token_ids, greedy, ref().F32(prefix + "greedy_margins"),
                            tolerance::kGpuBf16GreedyMargin,
                            "gpu bf16 vs hf, prompt " + std::to_string(p)),
              0u);
    // Against the CPU model of BF16 mode, with its own margins.
    std::vector<float> margins;
    const std::vector<int32_t> emulated = shared_->emulation->Greedy(
        ref().InputIds(p), static_cast<int>(greedy.size()), /*round_activations=*/true, &margins);
    CompareGreedy(result.token_ids, std::vector<int64_t>(emulated.begin(), emulated.end()), margins,
                  tolerance::kGpuBf16GreedyMargin,
                  "gpu bf16 vs cpu model of bf16, prompt " + std::to_string(p));
  }
}

// A sequence fed a few tokens at a time reserves its cache in blocks, so its
// device block table grows (16, 32, 48 positions) with chunks that straddle
// block boundaries: every cached position is read back through the table, so
// its logits equal one whole prefill's.
TEST_F(CudaParityTest, GrowingDeviceCacheKeepsEveryPosition) {
  StepRunner& gpu = *shared_->gpu_f32;
  std::vector<int32_t> ids = ref().InputIds(1);
  for (int i = 0; static_cast<int>(ids.size()) < 45; ++i) ids.push_back(200 + 37 * i);
  auto whole_kv = pool().NewSequence();
  StepInput whole{whole_kv.get(), ids, LogitsWanted::kLast};
  SY_ASSERT_OK_AND_ASSIGN(StepOutput want, gpu.Step({&whole, 1}));

  auto kv = pool().NewSequence();
  StepOutput got;
  for (size_t begin = 0; begin < ids.size(); begin += 3) {
    const std::vector<int32_t> chunk(ids.begin() + begin,
                                     ids.begin() + std::min(ids.size(), begin + 3));
    StepInput in{kv.get(), chunk, LogitsWanted::kLast};
    SY_ASSERT_OK_AND_ASSIGN(got, gpu.Step({&in, 1}));
  }
  EXPECT_EQ(kv->length(), static_cast<int>(ids.size()));
  EXPECT_GE(kv->reserved(), 48);
  EXPECT_TRUE(AllClose(got.logits, want.logits, tolerance::kReorderAbs, tolerance::kReorderRel,
                       "45 tokens 3 at a time vs one prefill"));
}

// Prefix reuse on the device: sequence a (43 tokens) publishes its two full
// blocks; sequence b, whose context starts with the same 40 tokens, attaches
// them (the same pool blocks, so the same slab blocks) and computes only its
// positions 32..44. Its logits there, and after a decode step, equal a
// sequence that computed all of b's context itself: b read a's K/V through
// its block table.
TEST_F(CudaParityTest, SharedPrefixBlocksEqualComputingThem) {
  StepRunner& gpu = *shared_->gpu_f32;
  // A pool of its own: nothing published by other tests.
  KvCachePool own(cpu().config(), 1024, /*host_storage=*/false);
  ASSERT_TRUE(own.prefix_caching());
  std::vector<int32_t> prefix = ref().InputIds(2);
  for (int i = 0; static_cast<int>(prefix.size()) < 40; ++i) prefix.push_back(300 + 29 * i);
  prefix.resize(40);
  std::vector<int32_t> a_ctx = prefix, b_ctx = prefix;
  a_ctx.insert(a_ctx.end(), {11, 12, 13});
  b_ctx.insert(b_ctx.end(), {21, 22, 23, 24, 25});

  auto kv_a = own.NewSequence();
  StepInput a{kv_a.get(), a_ctx, LogitsWanted::kLast};
  SY_ASSERT_OK(gpu.Step({&a, 1}).status());
  kv_a->Publish(a_ctx);

  auto kv_b = own.NewSequence();
  ASSERT_EQ(kv_b->AttachCachedPrefix(b_ctx), 32);
  ASSERT_EQ(kv_b->block_table().size(), 2u);
  EXPECT_EQ(kv_b->block_table()[0], kv_a->block_table()[0]);
  EXPECT_EQ(kv_b->block_table()[1], kv_a->block_table()[1]);
  const std::vector<int32_t> b_rest(b_ctx.begin() + 32, b_ctx.end());
  StepInput b{kv_b.get(), b_rest, LogitsWanted::kAll};
  SY_ASSERT_OK_AND_ASSIGN(StepOutput got, gpu.Step({&b, 1}));

  auto kv_c = pool().NewSequence();
  StepInput c{kv_c.get(), b_ctx, LogitsWanted::kAll};
  SY_ASSERT_OK_AND_ASSIGN(StepOutput want, gpu.Step({&c, 1}));
  EXPECT_TRUE(AllClose(got.logits, absl::MakeConstSpan(want.logits).subspan(32 * V()),
                       tolerance::kReorderAbs, tolerance::kReorderRel,
                       "positions 32..44 over an attached prefix vs computed"));

  // a is gone (its blocks stay cached: b still holds the shared two); a
  // decode step reads them again.
  kv_a.reset();
  const std::vector<int32_t> next = {77};
  StepInput b2{kv_b.get(), next, LogitsWanted::kLast}, c2{kv_c.get(), next, LogitsWanted::kLast};
  SY_ASSERT_OK_AND_ASSIGN(StepOutput got2, gpu.Step({&b2, 1}));
  SY_ASSERT_OK_AND_ASSIGN(StepOutput want2, gpu.Step({&c2, 1}));
  EXPECT_TRUE(AllClose(got2.logits, want2.logits, tolerance::kReorderAbs, tolerance::kReorderRel,
                       "decode after an attached prefix vs computed"));
}

// A scheduler over the GPU runner with a device cache far smaller than eight
// streams need at once: sequences are preempted (their blocks freed, their
// context prefilled again later into other blocks), and still every stream,
// greedy and seeded, equals its solo run with nothing lost or repeated.
TEST_F(CudaParityTest, ForcedPreemptionUnderEightStreamsKeepsEachEqualToItsSoloRun) {
  StepRunner& gpu = *shared_->gpu_f32;
  // Four blocks: every request fits alone (prompt + max_new_tokens <= 64),
  // not all of them at once.
  KvCachePool small(cpu().config(), 64, /*host_storage=*/false);
  SchedulerOptions options;
  options.max_step_tokens = 24;  // recomputed contexts are prefilled in chunks too
  auto scheduler = std::make_unique<Scheduler>(&gpu, &small, &cpu().tokenizer(), options);
  std::vector<GenerationRequest> requests;
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (int i = 0; i < 8; ++i) {
    GenerationRequest r;
    r.prompt_ids = ref().InputIds(i % kPrompts);
    r.options.max_new_tokens = 20 + 3 * i;
    r.options.ignore_eos = true;
    if (i % 2 == 1) {
      r.options.sampling.temperature = 0.9f;
      r.options.sampling.top_k = 40;
      r.options.sampling.seed = 7 + i;
    }
    requests.push_back(r);
    sinks.push_back(std::make_shared<RecordingSink>());
    SY_ASSERT_OK(scheduler->Submit(r, sinks.back()).status());
  }
  for (auto& s : sinks) s->Wait();
  const SchedulerStats stats = scheduler->Stats();
  scheduler.reset();
  EXPECT_GT(stats.preemptions, 0) << "the test no longer forces preemption";
  std::printf("preemptions: %lld\n", static_cast<long long>(stats.preemptions));
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(sinks[i]->error.ok()) << sinks[i]->error;
    SY_ASSERT_OK_AND_ASSIGN(
        GenerateResult solo,
        Generate(gpu, pool(), cpu().tokenizer(), requests[i].prompt_ids, requests[i].options));
    EXPECT_EQ(sinks[i]->tokens, solo.token_ids) << "stream " << i;
  }
  EXPECT_EQ(stats.requests_finished, 8);
  EXPECT_EQ(small.used_tokens(), 0);
}

// The device slab belongs to its pool: a runner of another precision is
// refused (its K/V would not be the slab's type), as is a pool with host
// storage; a slab too large for the device is RESOURCE_EXHAUSTED naming its
// bytes, and nothing is committed.
TEST_F(CudaParityTest, DeviceSlabMismatchesAreClearErrors) {
  const std::vector<int32_t> ids = ref().InputIds(0);
  KvCachePool f32_pool(cpu().config(), 256, /*host_storage=*/false);
  {
    auto kv = f32_pool.NewSequence();
    StepInput in{kv.get(), ids, LogitsWanted::kLast};
    SY_ASSERT_OK(shared_->gpu_f32->Step({&in, 1}).status());
  }
  auto kv = f32_pool.NewSequence();
  StepInput in{kv.get(), ids, LogitsWanted::kLast};
  auto s = shared_->gpu_bf16->Step({&in, 1});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition) << s.status();
  EXPECT_NE(s.status().message().find("FP32"), std::string::npos) << s.status();
  EXPECT_EQ(kv->length(), 0);

  KvCachePool host(cpu().config(), 256);
  auto host_kv = host.NewSequence();
  StepInput host_in{host_kv.get(), ids, LogitsWanted::kLast};
  auto hs = shared_->gpu_f32->Step({&host_in, 1});
  EXPECT_EQ(hs.status().code(), absl::StatusCode::kFailedPrecondition) << hs.status();

  KvCachePool huge(cpu().config(), int64_t{1} << 40, /*host_storage=*/false);
  auto huge_kv = huge.NewSequence();
  StepInput huge_in{huge_kv.get(), ids, LogitsWanted::kLast};
  auto big = shared_->gpu_f32->Step({&huge_in, 1});
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted) << big.status();
  EXPECT_NE(big.status().message().find("bytes"), std::string::npos) << big.status();
  EXPECT_EQ(huge_kv->length(), 0);
  // Sizing from free memory: whole blocks, half the bytes per slot in BF16.
  SY_ASSERT_OK_AND_ASSIGN(int64_t f32_fit, cuda::DeviceKvTokensThatFit(cpu().config(), 0.5));
  SY_ASSERT_OK_AND_ASSIGN(int64_t bf16_fit,
                          cuda::DeviceKvTokensThatFit(cpu().config(), 0.5, cuda::KvDType::kBF16));
  EXPECT_GT(f32_fit, 0);
  EXPECT_EQ(f32_fit % KvCachePool::kBlockTokens, 0);
  EXPECT_EQ(bf16_fit % KvCachePool::kBlockTokens, 0);
  EXPECT_NEAR(static_cast<double>(bf16_fit), 2.0 * static_cast<double>(f32_fit),
              2.0 * KvCachePool::kBlockTokens);
  // The runner still works afterwards.
  auto ok_kv = pool().NewSequence();
  StepInput ok_in{ok_kv.get(), ids, LogitsWanted::kLast};
  SY_ASSERT_OK(shared_->gpu_f32->Step({&ok_in, 1}).status());
}

// One batched step holding a decode token, a whole prompt with every
// position's logits, the second chunk of a chunked prefill, and a prompt with
// no logits; then a step where all four decode. Each input's logits equal the
// same sequence stepped alone.
TEST_F(CudaParityTest, MixedBatchEqualsEachAlone) {
  StepRunner& gpu = *shared_->gpu_f32;
  std::vector<std::vector<int32_t>> prompts;
  for (int p = 0; p < kPrompts; ++p) prompts.push_back(ref().InputIds(p));
  const int split = 6;  // prompt 2's first chunk
  ASSERT_GT(static_cast<int>(prompts[2].size()), split);
  const std::vector<int32_t> p2a(prompts[2].begin(), prompts[2].begin() + split);
  const std::vector<int32_t> p2b(prompts[2].begin() + split, prompts[2].end());
  const std::vector<int32_t> dec0 = {100}, dec1 = {101}, dec2 = {102}, dec3 = {103}, dec0b = {104};

  // What each sequence's steps give alone.
  auto alone = [&](const std::vector<std::pair<std::vector<int32_t>, LogitsWanted>>& steps) {
    auto kv = pool().NewSequence();
    std::vector<std::vector<float>> logits;
    for (const auto& [tokens, wanted] : steps) {
      StepInput in{kv.get(), tokens, wanted};
      auto out = gpu.Step({&in, 1});
      EXPECT_TRUE(out.ok()) << out.status();
      logits.push_back(out.ok() ? out->logits : std::vector<float>{});
    }
    return logits;
  };
  const auto a0 = alone({{prompts[0], LogitsWanted::kLast},
                         {dec0, LogitsWanted::kLast},
                         {dec0b, LogitsWanted::kLast}});
  const auto a1 = alone({{prompts[1], LogitsWanted::kAll}, {dec1, LogitsWanted::kLast}});
  const auto a2 =
      alone({{p2a, LogitsWanted::kNone}, {p2b, LogitsWanted::kLast}, {dec2, LogitsWanted::kLast}});
  const auto a3 = alone({{prompts[3], LogitsWanted::kNone}, {dec3, LogitsWanted::kLast}});

  // Batched: earlier steps for sequences 0 and 2, then the mixed step.
  auto kv0 = pool().NewSequence(), kv1 = pool().NewSequence(), kv2 = pool().NewSequence(),
       kv3 = pool().NewSequence();
  {
    std::vector<StepInput> first = {{kv0.get(), prompts[0], LogitsWanted::kLast},
                                    {kv2.get(), p2a, LogitsWanted::kNone}};
    SY_ASSERT_OK_AND_ASSIGN(StepOutput out, gpu.Step(first));
    EXPECT_TRUE(AllClose(out.logits, a0[0], tolerance::kReorderAbs, tolerance::kReorderRel,
                         "seq 0 prefill (batched with a no-logits chunk)"));
    EXPECT_EQ(out.logits_row_begin, (std::vector<int>{0, -1}));
  }
  std::vector<StepInput> mixed = {{kv0.get(), dec0, LogitsWanted::kLast},
                                  {kv1.get(), prompts[1], LogitsWanted::kAll},
                                  {kv2.get(), p2b, LogitsWanted::kLast},
                                  {kv3.get(), prompts[3], LogitsWanted::kNone}};
  SY_ASSERT_OK_AND_ASSIGN(StepOutput out, gpu.Step(mixed));
  const int n1 = static_cast<int>(prompts[1].size());
  ASSERT_EQ(out.logits_row_begin, (std::vector<int>{0, 1, 1 + n1, -1}));
  ASSERT_EQ(out.logits.size(), static_cast<size_t>(2 + n1) * V());
  auto rows = [&](const StepOutput& o, int begin, int count) {
    return std::vector<float>(o.logits.begin() + static_cast<size_t>(begin) * V(),
                              o.logits.begin() + static_cast<size_t>(begin + count) * V());
  };
  EXPECT_TRUE(AllClose(rows(out, 0, 1), a0[1], tolerance::kReorderAbs, tolerance::kReorderRel,
                       "seq 0 decode"));
  EXPECT_TRUE(AllClose(rows(out, 1, n1), a1[0], tolerance::kReorderAbs, tolerance::kReorderRel,
                       "seq 1 prefill, all rows"));
  EXPECT_TRUE(AllClose(rows(out, 1 + n1, 1), a2[1], tolerance::kReorderAbs, tolerance::kReorderRel,
                       "seq 2 second chunk"));

  std::vector<StepInput> decode = {{kv0.get(), dec0b, LogitsWanted::kLast},
                                   {kv1.get(), dec1, LogitsWanted::kLast},
                                   {kv2.get(), dec2, LogitsWanted::kLast},
                                   {kv3.get(), dec3, LogitsWanted::kLast}};
  SY_ASSERT_OK_AND_ASSIGN(StepOutput dec, gpu.Step(decode));
  ASSERT_EQ(dec.logits.size(), static_cast<size_t>(4) * V());
  EXPECT_TRUE(AllClose(rows(dec, 0, 1), a0[2], tolerance::kReorderAbs, tolerance::kReorderRel,
                       "seq 0 second decode"));
  EXPECT_TRUE(AllClose(rows(dec, 1, 1), a1[1], tolerance::kReorderAbs, tolerance::kReorderRel,
                       "seq 1 decode"));
  EXPECT_TRUE(AllClose(rows(dec, 2, 1), a2[2], tolerance::kReorderAbs, tolerance::kReorderRel,
                       "seq 2 decode"));
  EXPECT_TRUE(AllClose(rows(dec, 3, 1), a3[1], tolerance::kReorderAbs, tolerance::kReorderRel,
                       "seq 3 decode (after a no-logits prefill)"));
  EXPECT_EQ(kv1->length(), n1 + 1);
}

TEST_F(CudaParityTest, RemoteExpertBackendEqualsAllGpu) {
  for (int p = 0; p < kPrompts; ++p) {
    const std::string what = "prompt " + std::to_string(p);
    auto kv_a = pool().NewSequence(), kv_b = pool().NewSequence();
    std::vector<int32_t> tokens = ref().InputIds(p);
    for (int step = 0; step < 3; ++step) {
      StepInput a{kv_a.get(), tokens, LogitsWanted::kAll};
      StepInput b{kv_b.get(), tokens, LogitsWanted::kAll};
      SY_ASSERT_OK_AND_ASSIGN(StepOutput gpu, shared_->gpu_f32->Step({&a, 1}));
      SY_ASSERT_OK_AND_ASSIGN(StepOutput remote, shared_->gpu_remote->Step({&b, 1}));
      EXPECT_TRUE(AllClose(remote.logits, gpu.logits, tolerance::kReorderAbs,
                           tolerance::kReorderRel, what + " step " + std::to_string(step)));
      EXPECT_EQ(remote.expert_tokens, gpu.expert_tokens);
      tokens = {static_cast<int32_t>(200 + step)};
    }
  }
}

// The CPU experts, except that while `down` every call to `failing` fails
// (as a dead remote expert's would after its retries), with NaN outputs.
class OneExpertDownBackend final : public ExpertBackend {
 public:
  OneExpertDownBackend(const ExpertStore* store, int failing, int dim)
      : local_(store), failing_(failing), dim_(dim) {}
  absl::Status RunLayer(int layer, absl::Span<const ExpertBatch> batches) override {
    return testing::RunLayerThroughPerBatch(*this, layer, batches);
  }
  absl::Status RunLayerPerBatch(int layer, absl::Span<const ExpertBatch> batches,
                                std::vector<absl::Status>* batch_status) override {
    batch_status->assign(batches.size(), absl::OkStatus());
    for (size_t i = 0; i < batches.size(); ++i) {
      const ExpertBatch& b = batches[i];
      if (down && b.expert == failing_) {
        std::fill_n(b.output, static_cast<size_t>(b.tokens) * dim_,
                    std::numeric_limits<float>::quiet_NaN());
        (*batch_status)[i] = absl::UnavailableError(
            absl::StrCat("expert ", b.expert, " (layer ", layer, ") unavailable: test"));
        continue;
      }
      if (absl::Status s = local_.RunLayer(layer, {&b, 1}); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  std::string Describe() const override { return "one expert down"; }
  bool down = true;

 private:
  LocalExpertBackend local_;
  int failing_;
  int dim_;
};

// With remote experts, a failed expert ends only the sequences with a token
// routed to it (their device cache does not grow); the others get the logits
// the all-GPU runner gives them alone, and their device caches stay right:
// the next decode step, with the expert back, equals the all-GPU runner's.
TEST_F(CudaParityTest, RemoteExpertFailureEndsOnlyItsSequences) {
  constexpr int kSequences = 6;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kSequences; ++i) {
    std::vector<int32_t> ids = {1};
    for (int t = 0; t < 1 + i % 3; ++t) ids.push_back(300 + 977 * i + 131 * t);
    prompts.push_back(ids);
  }
  std::vector<std::vector<bool>> uses(kSequences, std::vector<bool>(8, false));
  for (int i = 0; i < kSequences; ++i) {
    auto kv = cpu().kv_pool().NewSequence();
    StepInput in{kv.get(), prompts[i], LogitsWanted::kLast};
    StepTrace trace;
    SY_ASSERT_OK_AND_ASSIGN(StepOutput out, cpu().runner().Step({&in, 1}, &trace));
    for (const Routing& r : trace.routing) {
      for (int32_t e : r.experts) uses[i][e] = true;
    }
  }
  int failing = -1;
  for (int e = 0; e < 8 && failing < 0; ++e) {
    int users = 0;
    for (int i = 0; i < kSequences; ++i) users += uses[i][e];
    if (users > 0 && users < kSequences) failing = e;
  }
  ASSERT_GE(failing, 0) << "every expert is used by all or none of the prompts";

  OneExpertDownBackend backend(&cpu().experts(), failing, cpu().config().hidden_size);
  SY_ASSERT_OK_AND_ASSIGN(auto dense_only,
                          Checkpoint::Open(TinyMixtralDir(), WeightSelection::DenseOnly()));
  SY_ASSERT_OK_AND_ASSIGN(auto runner,
                          cuda::MakeCudaRunner(*dense_only, cuda::Precision::kF32, &backend));
  std::vector<std::unique_ptr<SequenceKv>> kvs, alone_kvs;
  std::vector<StepInput> inputs;
  for (int i = 0; i < kSequences; ++i) {
    kvs.push_back(pool().NewSequence());
    alone_kvs.push_back(pool().NewSequence());
    inputs.push_back({kvs.back().get(), prompts[i], LogitsWanted::kLast});
  }
  SY_ASSERT_OK_AND_ASSIGN(StepOutput out, runner->Step(inputs));
  ASSERT_EQ(out.sequence_status.size(), static_cast<size_t>(kSequences));
  int failed = 0;
  std::vector<int32_t> next(kSequences, 0);
  std::vector<StepInput> decode, alone_decode;
  for (int i = 0; i < kSequences; ++i) {
    // The all-GPU runner, alone: the reference for this sequence.
    StepInput solo{alone_kvs[i].get(), prompts[i], LogitsWanted::kLast};
    SY_ASSERT_OK_AND_ASSIGN(StepOutput want, shared_->gpu_f32->Step({&solo, 1}));
    if (uses[i][failing]) {
      ++failed;
      EXPECT_EQ(out.sequence_status[i].code(), absl::StatusCode::kUnavailable) << i;
      EXPECT_EQ(out.logits_row_begin[i], -1) << i;
      EXPECT_EQ(kvs[i]->length(), 0) << "a failed sequence's cache grew";
      continue;
    }
    ASSERT_TRUE(out.sequence_status[i].ok()) << i << ": " << out.sequence_status[i];
    const auto row = absl::MakeConstSpan(out.logits)
                         .subspan(static_cast<size_t>(out.logits_row_begin[i]) * V(), V());
    EXPECT_TRUE(AllClose(row, want.logits, tolerance::kReorderAbs, tolerance::kReorderRel,
                         "sequence " + std::to_string(i) + " beside a failed expert"));
    next[i] = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
    decode.push_back({kvs[i].get(), absl::MakeConstSpan(&next[i], 1), LogitsWanted::kLast});
    alone_decode.push_back(
        {alone_kvs[i].get(), absl::MakeConstSpan(&next[i], 1), LogitsWanted::kLast});
  }
  ASSERT_GT(failed, 0);
  ASSERT_LT(failed, kSequences);
  backend.down = false;
  SY_ASSERT_OK_AND_ASSIGN(StepOutput got2, runner->Step(decode));
  SY_ASSERT_OK_AND_ASSIGN(StepOutput want2, shared_->gpu_f32->Step(alone_decode));
  EXPECT_TRUE(AllClose(got2.logits, want2.logits, tolerance::kReorderAbs, tolerance::kReorderRel,
                       "survivors' decode after the failure"));
  std::printf("[ contain ] expert %d down: %d of %d sequences ended\n", failing, failed,
              kSequences);
}

// ---------------------------------------------------------------------------
// Micro-batch ping-pong (gateway/cuda_model_runner.h): the same bits as one
// micro-batch.

// Six sequences greedily: a 13-token prefill step, four decode steps of 6,
// then a step that adds two 10-token prompts (26 tokens: one micro-batch).
// Every step's logits and greedy tokens, in order.
std::pair<std::vector<float>, std::vector<int32_t>> MicroBatchWorkload(StepRunner& runner,
                                                                       KvCachePool& pool) {
  const int V = runner.config().vocab_size;
  auto prompt = [](int seed, int length) {
    std::vector<int32_t> p = {1};
    uint32_t x = 777u + 131u * seed;
    while (static_cast<int>(p.size()) < length) {
      x = x * 1664525u + 1013904223u;
      p.push_back(3 + static_cast<int32_t>((x >> 8) % 31990));
    }
    return p;
  };
  const std::vector<int> lengths = {2, 3, 2, 1, 3, 2};
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::unique_ptr<SequenceKv>> kvs;
  for (size_t i = 0; i < lengths.size(); ++i) {
    ids.push_back(prompt(static_cast<int>(i), lengths[i]));
    kvs.push_back(pool.NewSequence());
  }
  std::vector<float> logits;
  std::vector<int32_t> tokens, next(ids.size());
  for (int step = 0; step < 6; ++step) {
    std::vector<StepInput> inputs;
    for (size_t i = 0; i < ids.size(); ++i) {
      inputs.push_back({kvs[i].get(),
                        step == 0 ? absl::MakeConstSpan(ids[i]) : absl::MakeConstSpan(&next[i], 1),
                        LogitsWanted::kLast});
    }
    std::vector<std::vector<int32_t>> extra;
    std::vector<std::unique_ptr<SequenceKv>> extra_kvs;
    if (step == 5) {
      for (int j = 0; j < 2; ++j) {
        extra.push_back(prompt(20 + j, 10));
        extra_kvs.push_back(pool.NewSequence());
      }
      for (int j = 0; j < 2; ++j) inputs.push_back({extra_kvs[j].get(), extra[j]});
    }
    auto out = runner.Step(inputs);
    EXPECT_TRUE(out.ok()) << out.status();
    if (!out.ok()) return {};
    EXPECT_TRUE(out->sequence_status.empty());
    logits.insert(logits.end(), out->logits.begin(), out->logits.end());
    for (size_t i = 0; i < ids.size(); ++i) {
      const float* row = out->logits.data() + static_cast<size_t>(out->logits_row_begin[i]) * V;
      next[i] = static_cast<int32_t>(std::max_element(row, row + V) - row);
      tokens.push_back(next[i]);
    }
  }
  return {logits, tokens};
}

// An in-process expert service over real gRPC on loopback, every expert.
struct GrpcExperts {
  std::unique_ptr<ExpertStore> store;
  std::unique_ptr<LocalExpertBackend> compute;
  std::unique_ptr<ExpertServiceImpl> service;
  std::unique_ptr<rpc::RunningServer> server;
  std::unique_ptr<RemoteExpertBackend> client;
  ~GrpcExperts() {
    client.reset();
    if (server) server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server.reset();
    if (service) service->Shutdown();
  }
};

absl::StatusOr<std::unique_ptr<GrpcExperts>> StartGrpcExperts(const ModelConfig& config) {
  auto g = std::make_unique<GrpcExperts>();
  std::vector<int> all(config.num_local_experts);
  for (int e = 0; e < config.num_local_experts; ++e) all[e] = e;
  SY_ASSIGN_OR_RETURN(auto ckpt,
                      Checkpoint::Open(TinyMixtralDir(), WeightSelection::ExpertsOnly(all)));
  SY_ASSIGN_OR_RETURN(g->store, ExpertStore::Load(*ckpt));
  SY_ASSIGN_OR_RETURN(ShardDescription description, DescribeShard(TinyMixtralDir(), *ckpt));
  g->compute = std::make_unique<LocalExpertBackend>(g->store.get());
  g->service = std::make_unique<ExpertServiceImpl>(g->store->config(), g->compute.get(),
                                                   description, ExpertServerOptions{.workers = 2});
  rpc::ServerOptions server_options;
  server_options.listen_address = "127.0.0.1:0";
  SY_ASSIGN_OR_RETURN(g->server, rpc::RunningServer::Start(server_options, {g->service.get()}));
  std::string spec;
  for (int e : all) spec += absl::StrCat(e, "=", g->server->address(), ";");
  spec.pop_back();
  SY_ASSIGN_OR_RETURN(ExpertTopology topology, ParseExpertTopology(spec, config.num_local_experts));
  RemoteExpertOptions remote;
  remote.connect_timeout_ms = 10000;
  SY_ASSIGN_OR_RETURN(g->client,
                      RemoteExpertBackend::Connect(topology, config, TinyMixtralDir(), remote));
  return g;
}

TEST_F(CudaParityTest, MicroBatchesGiveTheSameBitsAsOne) {
  SY_ASSERT_OK_AND_ASSIGN(auto full, Checkpoint::Open(TinyMixtralDir()));
  SY_ASSERT_OK_AND_ASSIGN(auto dense_only,
                          Checkpoint::Open(TinyMixtralDir(), WeightSelection::DenseOnly()));
  SY_ASSERT_OK_AND_ASSIGN(std::unique_ptr<GrpcExperts> grpc, StartGrpcExperts(cpu().config()));
  struct Case {
    std::string name;
    ExpertBackend* remote;  // nullptr: experts on the GPU
    cuda::Precision precision;
  };
  const std::vector<Case> cases = {
      {"GPU experts f32", nullptr, cuda::Precision::kF32},
      {"GPU experts bf16", nullptr, cuda::Precision::kBF16},
      {"CPU experts (ExpertBackend)", shared_->cpu_experts.get(), cuda::Precision::kF32},
      {"remote experts (gRPC)", grpc->client.get(), cuda::Precision::kF32},
      {"remote experts (gRPC) bf16", grpc->client.get(), cuda::Precision::kBF16},
  };
  for (const Case& c : cases) {
    const Checkpoint& ckpt = c.remote == nullptr ? *full : *dense_only;
    SY_ASSERT_OK_AND_ASSIGN(auto one, cuda::MakeCudaRunner(ckpt, c.precision, c.remote, nullptr,
                                                           /*device=*/0, 1));
    // A pool's device slab has one dtype: the f32 and bf16 runners each get theirs.
    KvCachePool& kv_pool = c.precision == cuda::Precision::kBF16 ? bf16_pool() : pool();
    const auto want = MicroBatchWorkload(*one, kv_pool);
    ASSERT_FALSE(want.first.empty()) << c.name;
    for (int flag : {2, 3, 0}) {
      const int m = ResolveMicroBatches(flag, c.remote != nullptr);
      SY_ASSERT_OK_AND_ASSIGN(
          auto runner, cuda::MakeCudaRunner(ckpt, c.precision, c.remote, nullptr, /*device=*/0, m));
      const auto got = MicroBatchWorkload(*runner, kv_pool);
      ASSERT_EQ(got.first.size(), want.first.size()) << c.name;
      double max_diff = 0;
      for (size_t i = 0; i < got.first.size(); ++i) {
        max_diff = std::max(max_diff, std::fabs(static_cast<double>(got.first[i]) - want.first[i]));
      }
      std::printf("[ micro-batch ] %s, --micro-batches %d (%d) vs 1: %zu logits, max |diff| %g\n",
                  c.name.c_str(), flag, m, got.first.size(), max_diff);
      EXPECT_EQ(max_diff, 0.0) << c.name << " " << flag;
      EXPECT_EQ(std::memcmp(got.first.data(), want.first.data(), got.first.size() * sizeof(float)),
                0)
          << c.name << " " << flag << ": the logits' bits differ";
      EXPECT_EQ(got.second, want.second) << c.name << " " << flag;
    }
  }
}

// A failed remote expert with two micro-batches: the same sequences end as
// with one, and the survivors get the same bits.
TEST_F(CudaParityTest, RemoteExpertFailureWithMicroBatchesEndsOnlyItsSequences) {
  constexpr int kSequences = 6;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kSequences; ++i) prompts.push_back({1, 300 + 17 * i});  // 12 tokens: splits
  SY_ASSERT_OK_AND_ASSIGN(auto dense_only,
                          Checkpoint::Open(TinyMixtralDir(), WeightSelection::DenseOnly()));
  const int V = cpu().config().vocab_size;
  int tried = 0;
  for (int failing = 0; failing < 8; ++failing) {
    OneExpertDownBackend backend(&cpu().experts(), failing, cpu().config().hidden_size);
    StepOutput outs[2];
    std::vector<std::unique_ptr<SequenceKv>> kvs[2];
    for (int m = 1; m <= 2; ++m) {
      SY_ASSERT_OK_AND_ASSIGN(auto runner, cuda::MakeCudaRunner(*dense_only, cuda::Precision::kF32,
                                                                &backend, nullptr, 0, m));
      std::vector<StepInput> inputs;
      for (const auto& p : prompts) {
        kvs[m - 1].push_back(pool().NewSequence());
        inputs.push_back({kvs[m - 1].back().get(), p, LogitsWanted::kLast});
      }
      SY_ASSERT_OK_AND_ASSIGN(outs[m - 1], runner->Step(inputs));
    }
    int failed = 0;
    for (int i = 0; i < kSequences; ++i) failed += !outs[0].ok(i);
    if (failed == 0 || failed == kSequences) continue;
    ++tried;
    for (int i = 0; i < kSequences; ++i) {
      ASSERT_EQ(outs[1].ok(i), outs[0].ok(i)) << "expert " << failing << " sequence " << i;
      EXPECT_EQ(kvs[1][i]->length(), kvs[0][i]->length()) << i;
      if (!outs[0].ok(i)) {
        EXPECT_EQ(outs[1].sequence_status[i].code(), absl::StatusCode::kUnavailable);
        EXPECT_EQ(outs[1].logits_row_begin[i], -1);
        continue;
      }
      EXPECT_EQ(
          std::memcmp(outs[1].logits.data() + static_cast<size_t>(outs[1].logits_row_begin[i]) * V,
                      outs[0].logits.data() + static_cast<size_t>(outs[0].logits_row_begin[i]) * V,
                      V * sizeof(float)),
          0)
          << "survivor " << i << " with expert " << failing << " down";
    }
    std::printf(
        "[ micro-batch ] expert %d down, 2 micro-batches: %d of %d sequences ended, the "
        "rest the same bits as 1\n",
        failing, failed, kSequences);
  }
  EXPECT_GT(tried, 0) << "every expert is used by all or none of the prompts";
}

TEST_F(CudaParityTest, CudaExpertBackendMatchesCpuExperts) {
  SY_ASSERT_OK_AND_ASSIGN(auto ckpt,
                          Checkpoint::Open(TinyMixtralDir(), WeightSelection::ExpertsOnly({0, 3})));
  const int D = cpu().config().hidden_size, F = cpu().config().intermediate_size;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<float> x0(5 * D), x3(1 * D);
  for (float& v : x0) v = dist(rng);
  for (float& v : x3) v = dist(rng);
  // The CPU experts of the same selection (0 and 3), as the GPU backend's.
  SY_ASSERT_OK_AND_ASSIGN(std::unique_ptr<ExpertStore> cpu_store, ExpertStore::Load(*ckpt));
  LocalExpertBackend cpu_backend(cpu_store.get());
  std::vector<float> ref0(x0.size()), ref3(x3.size());
  std::vector<ExpertBatch> ref_batches = {{0, 5, x0.data(), ref0.data()},
                                          {3, 1, x3.data(), ref3.data()}};
  SY_ASSERT_OK(cpu_backend.RunLayer(1, ref_batches));

  for (cuda::Precision precision : {cuda::Precision::kF32, cuda::Precision::kBF16}) {
    const std::string name = cuda::PrecisionName(precision);
    SY_ASSERT_OK_AND_ASSIGN(auto backend, cuda::MakeCudaExpertBackend(*ckpt, precision));
    std::printf("backend: %s\n", backend->Describe().c_str());
    std::vector<float> out0(x0.size()), out3(x3.size());
    std::vector<ExpertBatch> batches = {{0, 5, x0.data(), out0.data()},
                                        {3, 1, x3.data(), out3.data()}};
    SY_ASSERT_OK(backend->RunLayer(1, batches));
    if (precision == cuda::Precision::kF32) {
      EXPECT_TRUE(
          AllClose(out0, ref0, tolerance::kReorderAbs, tolerance::kReorderRel, name + " expert 0"));
      EXPECT_TRUE(
          AllClose(out3, ref3, tolerance::kReorderAbs, tolerance::kReorderRel, name + " expert 3"));
    } else {
      // The CPU model of one BF16 expert: rounded input and activation.
      auto model = [&](const std::vector<float>& x, int expert, int n) {
        auto w1 = ckpt->ReadF32(names::Expert(1, expert, "w1"));
        auto w3 = ckpt->ReadF32(names::Expert(1, expert, "w3"));
        auto w2 = ckpt->ReadF32(names::Expert(1, expert, "w2"));
        std::vector<float> xr = x, g(static_cast<size_t>(n) * F), u(g.size()), act(g.size()),
                           y(static_cast<size_t>(n) * D);
        testing::Bf16Emulation::RoundToBf16(xr);
        testing::Bf16Emulation::RoundToBf16(*w1);
        testing::Bf16Emulation::RoundToBf16(*w3);
        testing::Bf16Emulation::RoundToBf16(*w2);
        cpu::Linear(xr.data(), w1->data(), n, D, F, g.data());
        cpu::Linear(xr.data(), w3->data(), n, D, F, u.data());
        cpu::SwiGlu(g.data(), u.data(), g.size(), act.data());
        testing::Bf16Emulation::RoundToBf16(act);
        cpu::Linear(act.data(), w2->data(), n, F, D, y.data());
        return y;
      };
      EXPECT_TRUE(AllClose(out0, model(x0, 0, 5), tolerance::kGpuBf16ExpertAbs,
                           tolerance::kGpuBf16ExpertRel, name + " expert 0 vs cpu model"));
      EXPECT_TRUE(AllClose(out3, model(x3, 3, 1), tolerance::kGpuBf16ExpertAbs,
                           tolerance::kGpuBf16ExpertRel, name + " expert 3 vs cpu model"));
    }
    // An expert this process does not hold: NOT_FOUND, as the CPU backend.
    std::vector<ExpertBatch> missing = {{1, 5, x0.data(), out0.data()}};
    const absl::Status s = backend->RunLayer(1, missing);
    EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
    EXPECT_EQ(s.message(), cpu_backend.RunLayer(1, missing).message());
  }
}

TEST_F(CudaParityTest, ErrorsMatchCpuRunnerAndLeaveCachesAlone) {
  StepRunner& gpu = *shared_->gpu_f32;
  auto check_same = [&](std::vector<int32_t> tokens, const std::string& what) {
    auto kv_g = pool().NewSequence();
    auto kv_c = cpu().kv_pool().NewSequence();
    StepInput g{kv_g.get(), tokens, LogitsWanted::kLast},
        c{kv_c.get(), tokens, LogitsWanted::kLast};
    auto sg = gpu.Step({&g, 1});
    auto sc = cpu().runner().Step({&c, 1});
    ASSERT_FALSE(sg.ok()) << what;
    ASSERT_FALSE(sc.ok()) << what;
    EXPECT_EQ(sg.status().code(), sc.status().code()) << what;
    EXPECT_EQ(sg.status().message(), sc.status().message()) << what;
    EXPECT_EQ(kv_g->length(), 0) << what;
  };
  check_same({1, V(), 3}, "token id out of vocabulary");
  check_same({1, -1}, "negative token id");
  check_same({}, "no tokens");
  check_same(std::vector<int32_t>(cpu().config().max_position_embeddings + 1, 5), "too long");

  // A pool too small for the prompt: RESOURCE_EXHAUSTED, nothing committed.
  KvCachePool tiny(cpu().config(), KvCachePool::kBlockTokens, /*host_storage=*/false);
  auto kv = tiny.NewSequence();
  const std::vector<int32_t> ids(KvCachePool::kBlockTokens + 1, 5);
  StepInput in{kv.get(), ids, LogitsWanted::kLast};
  auto s = gpu.Step({&in, 1});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kResourceExhausted) << s.status();
  EXPECT_EQ(kv->length(), 0);
  // The runner still works afterwards.
  const std::vector<int32_t> ok_ids(KvCachePool::kBlockTokens, 5);
  StepInput ok_in{kv.get(), ok_ids, LogitsWanted::kLast};
  SY_ASSERT_OK_AND_ASSIGN(StepOutput out, gpu.Step({&ok_in, 1}));
  EXPECT_EQ(out.logits.size(), static_cast<size_t>(V()));
  EXPECT_EQ(kv->length(), KvCachePool::kBlockTokens);
  // An empty batch is an empty step.
  SY_ASSERT_OK_AND_ASSIGN(StepOutput empty, gpu.Step({}));
  EXPECT_TRUE(empty.logits.empty());

  // Dense weights and GPU experts in different precisions are refused.
  SY_ASSERT_OK_AND_ASSIGN(auto ckpt, Checkpoint::Open(TinyMixtralDir()));
  SY_ASSERT_OK_AND_ASSIGN(auto ctx, cuda::CudaContext::Create());
  SY_ASSERT_OK_AND_ASSIGN(auto dense, cuda::CudaDenseModel::Load(*ckpt, cuda::Precision::kF32));
  SY_ASSERT_OK_AND_ASSIGN(auto experts, cuda::CudaExpertStore::Load(*ckpt, cuda::Precision::kBF16));
  auto mixed =
      cuda::CudaModelRunner::Create(std::move(ctx), std::move(dense), std::move(experts), nullptr);
  EXPECT_EQ(mixed.status().code(), absl::StatusCode::kInvalidArgument) << mixed.status();
  EXPECT_NE(mixed.status().message().find("bf16"), std::string::npos) << mixed.status();
}

// CPU only (runs without a GPU): the CPU model of BF16 mode that the BF16
// tolerances in tests/tolerances.h were measured with. Without rounding it is
// the FP32 model and matches HF as tightly as the CPU engine; with rounding it
// stays within the stated BF16 tolerance; and FP32 summation order alone
// moves it by no more than the GPU-vs-model tolerance.
TEST(Bf16EmulationOnCpu, ModelOfBf16ModeIsWithinStatedTolerances) {
  auto emulation = testing::Bf16Emulation::Load(TinyMixtralDir());
  ASSERT_TRUE(emulation.ok()) << emulation.status();
  auto reordered = testing::Bf16Emulation::Load(TinyMixtralDir());
  ASSERT_TRUE(reordered.ok()) << reordered.status();
  (*reordered)->set_double_accumulation(true);
  Reference ref;
  const int V = (*emulation)->config().vocab_size;
  for (int p = 0; p < kPrompts; ++p) {
    const std::string prefix = "p" + std::to_string(p) + ".";
    const std::vector<int32_t> ids = ref.InputIds(p);
    const size_t last = (ids.size() - 1) * static_cast<size_t>(V);
    const std::vector<float> want = ref.F32(prefix + "last_logits");
    const std::vector<float> f32 = (*emulation)->Forward(ids, /*round_activations=*/false);
    EXPECT_TRUE(AllClose(absl::MakeConstSpan(f32).subspan(last, V), want, tolerance::kHfAbs,
                         tolerance::kHfRel,
                         "cpu model, no rounding, vs hf " + prefix + "last_logits"));
    const std::vector<float> bf16 = (*emulation)->Forward(ids, /*round_activations=*/true);
    EXPECT_TRUE(AllClose(absl::MakeConstSpan(bf16).subspan(last, V), want,
                         tolerance::kGpuBf16LogitAbs, tolerance::kGpuBf16LogitRel,
                         "cpu model of bf16 vs hf " + prefix + "last_logits"));
    const std::vector<float> bf16_reordered = (*reordered)->Forward(ids, true);
    EXPECT_TRUE(AllClose(bf16_reordered, bf16, tolerance::kGpuBf16EmulationAbs,
                         tolerance::kGpuBf16EmulationRel,
                         "cpu model of bf16, double vs float sums, " + prefix + " every position"));
    std::vector<float> margins;
    const std::vector<int64_t> greedy = ref.I64(prefix + "greedy_ids");
    const std::vector<int32_t> tokens =
        (*emulation)->Greedy(ids, static_cast<int>(greedy.size()), true, &margins);
    EXPECT_GT(CompareGreedy(tokens, greedy, ref.F32(prefix + "greedy_margins"),
                            tolerance::kGpuBf16GreedyMargin, "cpu model of bf16 vs hf, " + prefix),
              0u);
  }
}

}  // namespace
}  // namespace switchyard
