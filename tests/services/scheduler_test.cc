// Continuous batching: many concurrent requests give what each gives alone;
// stop strings and stop ids end generation; cancellation frees the cache;
// queue and cache limits answer RESOURCE_EXHAUSTED.
#include "gateway/scheduler.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gateway/local_model.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace switchyard {
namespace {

// Records one request's events and lets a test wait for the end.
class RecordingSink : public GenerationSink {
 public:
  void OnTokens(const TokenEvent& e) override {
    std::lock_guard<std::mutex> lock(mu_);
    text += e.text_delta;
    deltas.push_back(e.text_delta);
    tokens.insert(tokens.end(), e.token_ids.begin(), e.token_ids.end());
    cv_.notify_all();
  }
  void OnFinish(const FinishEvent& e) override {
    std::lock_guard<std::mutex> lock(mu_);
    text += e.text_delta;
    finish = e;
    done = true;
    cv_.notify_all();
  }
  void OnError(const absl::Status& s) override {
    std::lock_guard<std::mutex> lock(mu_);
    error = s;
    done = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done; });
  }
  // False if the request has not ended within `timeout`.
  bool WaitFor(std::chrono::seconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return done; });
  }
  void WaitForTokens(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done || tokens.size() >= n; });
  }

  std::string text;
  std::vector<std::string> deltas;
  std::vector<int32_t> tokens;
  FinishEvent finish;
  absl::Status error;
  bool done = false;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
};

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    LocalModelOptions options;
    options.kv_cache_tokens = 8192;
    auto model = LocalModel::Load(testing::TinyMixtralDir(), options);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);
  }

  std::unique_ptr<Scheduler> MakeScheduler(SchedulerOptions options = {}) {
    return std::make_unique<Scheduler>(&model_->runner(), &model_->kv_pool(), &model_->tokenizer(),
                                       options);
  }

  GenerationRequest Request(const std::string& prompt, int max_new) {
    GenerationRequest r;
    r.prompt_ids = model_->tokenizer().Encode(prompt);
    r.options.max_new_tokens = max_new;
    r.options.ignore_eos = true;
    return r;
  }

  // The single-sequence reference loop.
  GenerateResult Solo(const GenerationRequest& r) {
    auto result =
        Generate(model_->runner(), model_->kv_pool(), model_->tokenizer(), r.prompt_ids, r.options);
    EXPECT_TRUE(result.ok()) << result.status();
    return *result;
  }

  void ForcedPreemptionUnderEightStreams(KvDtype dtype);

  std::unique_ptr<LocalModel> model_;
};

const char* kPrompts[] = {
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Mixture of experts routes every token to",
    "Über die Brücke gingen 3 Männer 🙂 und 猫.",
    "Hello",
    "A much longer prompt that keeps going so that its prefill needs several chunks "
    "when the per-step token budget is small, which is exactly the point of the test.",
};

TEST_F(SchedulerTest, SixteenConcurrentRequestsEachEqualTheirSoloRun) {
  SchedulerOptions options;
  options.max_step_tokens = 48;  // forces chunked prefill next to decodes
  auto scheduler = MakeScheduler(options);
  std::vector<GenerationRequest> requests;
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (int i = 0; i < 16; ++i) {
    GenerationRequest r = Request(kPrompts[i % 6], 4 + (i * 5) % 23);
    if (i % 4 == 3) {  // sampled requests with a seed among the greedy ones
      r.options.sampling.temperature = 0.8f;
      r.options.sampling.top_p = 0.9f;
      r.options.sampling.top_k = 50;
      r.options.sampling.seed = 100 + i;
    }
    if (i % 5 == 4) r.options.sampling.repetition_penalty = 1.3f;
    requests.push_back(r);
    sinks.push_back(std::make_shared<RecordingSink>());
    ASSERT_TRUE(scheduler->Submit(r, sinks.back()).ok());
  }
  for (int i = 0; i < 16; ++i) {
    sinks[i]->Wait();
    ASSERT_TRUE(sinks[i]->error.ok()) << sinks[i]->error;
    const GenerateResult solo = Solo(requests[i]);
    // Seeded sampling is repeatable too, so every request must equal its solo run.
    EXPECT_EQ(sinks[i]->tokens, solo.token_ids) << "request " << i;
    EXPECT_EQ(sinks[i]->text, solo.text) << "request " << i;
    EXPECT_EQ(sinks[i]->finish.reason, FinishReason::kLength);
    EXPECT_EQ(sinks[i]->finish.completion_tokens, requests[i].options.max_new_tokens);
    EXPECT_EQ(sinks[i]->finish.prompt_tokens, static_cast<int>(requests[i].prompt_ids.size()));
  }
  const SchedulerStats stats = scheduler->Stats();
  EXPECT_EQ(stats.requests_finished, 16);
  EXPECT_EQ(stats.kv_used_tokens, 0);
  EXPECT_LE(stats.step_tokens_total, stats.steps * 48);
}

TEST_F(SchedulerTest, StopStringEndsGenerationWithoutTheStopText) {
  auto scheduler = MakeScheduler();
  GenerationRequest base = Request(kPrompts[0], 24);
  const GenerateResult solo = Solo(base);
  // Take a stop string from the middle of the greedy text.
  const size_t at = solo.text.find("Valentine");
  ASSERT_NE(at, std::string::npos) << solo.text;
  GenerationRequest r = base;
  r.stop = {"zzz-never", "Valentine"};
  auto sink = std::make_shared<RecordingSink>();
  ASSERT_TRUE(scheduler->Submit(r, sink).ok());
  sink->Wait();
  EXPECT_EQ(sink->finish.reason, FinishReason::kStopSequence);
  EXPECT_EQ(sink->text, solo.text.substr(0, at));
  for (const std::string& d : sink->deltas) EXPECT_EQ(d.find("Val"), std::string::npos) << d;
}

TEST_F(SchedulerTest, StopTokenIdEndsGenerationAndIsNotInText) {
  auto scheduler = MakeScheduler();
  GenerationRequest r = Request(kPrompts[2], 24);
  const GenerateResult solo = Solo(r);
  // A token whose first appearance is at step k >= 3.
  size_t k = 3;
  while (std::find(solo.token_ids.begin(), solo.token_ids.begin() + k, solo.token_ids[k]) !=
         solo.token_ids.begin() + k) {
    ++k;
  }
  r.options.stop_token_ids = {solo.token_ids[k]};
  auto sink = std::make_shared<RecordingSink>();
  ASSERT_TRUE(scheduler->Submit(r, sink).ok());
  sink->Wait();
  EXPECT_EQ(sink->finish.reason, FinishReason::kStopSequence);
  ASSERT_EQ(sink->tokens.size(), k + 1);
  EXPECT_EQ(sink->tokens.back(), solo.token_ids[k]);
  // The text is exactly that of the tokens before the stop token.
  GenerationRequest five = Request(kPrompts[2], static_cast<int>(k));
  EXPECT_EQ(sink->text, Solo(five).text);
}

TEST_F(SchedulerTest, EosEndsGenerationUnlessIgnored) {
  // The tiny model never emits </s> on its own, so declare the 4th greedy
  // token of a prompt to be EOS through tokenizer_config.json.
  GenerationRequest r = Request(kPrompts[0], 24);
  const GenerateResult solo = Solo(r);
  const std::string eos_token = *model_->tokenizer().IdToToken(solo.token_ids[3]);
  const std::string config = ::testing::TempDir() + "/eos_tokenizer_config.json";
  {
    std::ofstream out(config);
    out << nlohmann::json({{"add_bos_token", true}, {"bos_token", "<s>"}, {"eos_token", eos_token}})
               .dump();
  }
  auto tokenizer = Tokenizer::FromFiles(testing::TinyMixtralDir() + "/tokenizer.json", config);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  ASSERT_EQ((*tokenizer)->eos_id(), solo.token_ids[3]);
  Scheduler scheduler(&model_->runner(), &model_->kv_pool(), tokenizer->get(), {});

  r.options.ignore_eos = false;
  auto sink = std::make_shared<RecordingSink>();
  ASSERT_TRUE(scheduler.Submit(r, sink).ok());
  sink->Wait();
  EXPECT_EQ(sink->finish.reason, FinishReason::kEos);
  EXPECT_EQ(sink->tokens, std::vector<int32_t>(solo.token_ids.begin(), solo.token_ids.begin() + 4));

  r.options.ignore_eos = true;
  auto ignoring = std::make_shared<RecordingSink>();
  ASSERT_TRUE(scheduler.Submit(r, ignoring).ok());
  ignoring->Wait();
  EXPECT_EQ(ignoring->finish.reason, FinishReason::kLength);
  EXPECT_EQ(ignoring->tokens, solo.token_ids);
}

TEST_F(SchedulerTest, CancelFreesTheCacheAtOnce) {
  auto scheduler = MakeScheduler();
  GenerationRequest r = Request(kPrompts[1], 2000);
  auto sink = std::make_shared<RecordingSink>();
  auto id = scheduler->Submit(r, sink);
  ASSERT_TRUE(id.ok());
  sink->WaitForTokens(3);
  EXPECT_GT(scheduler->Stats().kv_used_tokens, 0);
  scheduler->Cancel(*id);
  sink->Wait();
  EXPECT_EQ(sink->finish.reason, FinishReason::kCancelled);
  EXPECT_LT(sink->tokens.size(), 2000u);
  const SchedulerStats stats = scheduler->Stats();
  EXPECT_EQ(stats.kv_used_tokens, 0);
  EXPECT_EQ(stats.kv_live_sequences, 0);
  EXPECT_EQ(stats.requests_cancelled, 1);
}

TEST_F(SchedulerTest, FullQueueAndOversizedRequestsAreRefused) {
  SchedulerOptions options;
  options.max_queue = 2;
  options.max_running = 1;
  auto scheduler = MakeScheduler(options);
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  int refused = 0;
  for (int i = 0; i < 8; ++i) {
    sinks.push_back(std::make_shared<RecordingSink>());
    auto id = scheduler->Submit(Request(kPrompts[0], 200), sinks.back());
    if (!id.ok()) {
      EXPECT_EQ(id.status().code(), absl::StatusCode::kResourceExhausted) << id.status();
      ++refused;
      sinks.back()->done = true;
    }
  }
  EXPECT_GE(refused, 5);                                // one running, at most two waiting
  GenerationRequest huge = Request(kPrompts[0], 9000);  // cache holds 8192 slots
  auto status = scheduler->Submit(huge, std::make_shared<RecordingSink>());
  EXPECT_EQ(status.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(status.status().message().find("KV cache"), std::string::npos);
  for (auto& s : sinks) s->Wait();
}

TEST_F(SchedulerTest, WaitsForCacheInsteadOfFailing) {
  // Cache for about two requests at a time: the rest wait, then all finish.
  LocalModelOptions small;
  small.kv_cache_tokens = 96;
  auto model = LocalModel::Load(testing::TinyMixtralDir(), small);
  ASSERT_TRUE(model.ok());
  Scheduler scheduler(&(*model)->runner(), &(*model)->kv_pool(), &(*model)->tokenizer(), {});
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (int i = 0; i < 6; ++i) {
    sinks.push_back(std::make_shared<RecordingSink>());
    GenerationRequest r = Request(kPrompts[i % 3], 20);
    ASSERT_TRUE(scheduler.Submit(r, sinks.back()).ok());
  }
  for (auto& s : sinks) {
    s->Wait();
    EXPECT_TRUE(s->error.ok()) << s->error;
    EXPECT_EQ(s->tokens.size(), 20u);
  }
  EXPECT_EQ((*model)->kv_pool().used_tokens(), 0);
}

// Counts the sequences of each step, to see how many run at once.
class CountingRunner : public StepRunner {
 public:
  explicit CountingRunner(StepRunner* inner) : inner_(inner) {}
  absl::StatusOr<StepOutput> Step(absl::Span<const StepInput> inputs, StepTrace* trace) override {
    max_inputs = std::max(max_inputs.load(), static_cast<int>(inputs.size()));
    return inner_->Step(inputs, trace);
  }
  const ModelConfig& config() const override { return inner_->config(); }
  std::atomic<int> max_inputs{0};

 private:
  StepRunner* inner_;
};

// A cache far smaller than eight streams need at once: sequences are
// preempted (their cache freed, their context prefilled again later) many
// times, and still every stream, greedy and seeded, equals its solo run with
// nothing lost or repeated.
// With FP32 and with BF16 K/V (solo runs on the same dtype).
TEST_F(SchedulerTest, ForcedPreemptionUnderEightStreamsKeepsEveryStreamEqualToItsSoloRun) {
  for (KvDtype dtype : {KvDtype::kF32, KvDtype::kBf16}) {
    SCOPED_TRACE(KvDtypeName(dtype));
    ForcedPreemptionUnderEightStreams(dtype);
  }
}

void SchedulerTest::ForcedPreemptionUnderEightStreams(KvDtype dtype) {
  LocalModelOptions small;
  small.kv_cache_tokens = 160;
  small.kv_dtype = dtype;
  auto model = LocalModel::Load(testing::TinyMixtralDir(), small);
  ASSERT_TRUE(model.ok()) << model.status();
  SchedulerOptions options;
  options.max_step_tokens = 24;  // recomputed contexts are prefilled in chunks too
  auto scheduler = std::make_unique<Scheduler>(&(*model)->runner(), &(*model)->kv_pool(),
                                               &(*model)->tokenizer(), options);
  std::vector<GenerationRequest> requests;
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (int i = 0; i < 8; ++i) {
    GenerationRequest r = Request(kPrompts[i % 6], 40 + 7 * i);
    if (i % 2 == 1) {
      r.options.sampling.temperature = 0.9f;
      r.options.sampling.top_k = 40;
      r.options.sampling.seed = 7 + i;
    }
    if (i == 6) r.options.sampling.repetition_penalty = 1.2f;
    r.return_logprobs = true;
    requests.push_back(r);
    sinks.push_back(std::make_shared<RecordingSink>());
    ASSERT_TRUE(scheduler->Submit(r, sinks.back()).ok());
  }
  for (auto& s : sinks) ASSERT_TRUE(s->WaitFor(std::chrono::seconds(300))) << "wedged";
  const SchedulerStats stats = scheduler->Stats();
  scheduler.reset();
  EXPECT_GT(stats.preemptions, 0) << "the test no longer forces preemption";
  std::printf("%s K/V: preemptions: %lld\n", KvDtypeName(dtype),
              static_cast<long long>(stats.preemptions));
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(sinks[i]->error.ok()) << sinks[i]->error;
    GenerationRequest solo_request = requests[i];
    auto solo = Generate((*model)->runner(), (*model)->kv_pool(), (*model)->tokenizer(),
                         solo_request.prompt_ids, solo_request.options);
    ASSERT_TRUE(solo.ok()) << solo.status();
    EXPECT_EQ(sinks[i]->tokens, solo->token_ids) << "stream " << i;
    EXPECT_EQ(sinks[i]->text, solo->text) << "stream " << i;
    EXPECT_EQ(sinks[i]->finish.completion_tokens, requests[i].options.max_new_tokens);
  }
  EXPECT_EQ(stats.requests_finished, 8);
  EXPECT_EQ(stats.kv_used_tokens, 0);
  EXPECT_EQ(stats.kv_live_sequences, 0);
}

// Issue #15's example: eight requests of 10 prompt tokens that declare
// max_new_tokens 400 but could all start in a cache of 2048 slots. Reserving
// the worst case ran at most four at a time; admission on real use runs all
// eight at once, preempting when they outgrow the cache, and all complete.
TEST_F(SchedulerTest, AdmissionOnRealUseRunsMoreThanTheWorstCaseAllows) {
  LocalModelOptions small;
  small.kv_cache_tokens = 2048;
  auto model = LocalModel::Load(testing::TinyMixtralDir(), small);
  ASSERT_TRUE(model.ok()) << model.status();
  CountingRunner counting(&(*model)->runner());
  Scheduler scheduler(&counting, &(*model)->kv_pool(), &(*model)->tokenizer(), {});
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (int i = 0; i < 8; ++i) {
    GenerationRequest r;
    for (int t = 0; t < 10; ++t) r.prompt_ids.push_back(200 + 31 * i + t);
    r.options.max_new_tokens = 400;
    r.options.ignore_eos = true;
    sinks.push_back(std::make_shared<RecordingSink>());
    ASSERT_TRUE(scheduler.Submit(r, sinks.back()).ok());
  }
  for (auto& s : sinks) {
    ASSERT_TRUE(s->WaitFor(std::chrono::seconds(600))) << "wedged";
    EXPECT_TRUE(s->error.ok()) << s->error;
    EXPECT_EQ(s->tokens.size(), 400u);
  }
  std::printf("most sequences in one step: %d, preemptions: %lld\n", counting.max_inputs.load(),
              static_cast<long long>(scheduler.Stats().preemptions));
  EXPECT_EQ(counting.max_inputs.load(), 8);
  EXPECT_EQ((*model)->kv_pool().used_tokens(), 0);
}

// Prefix reuse: a second request whose prompt starts with the first one's
// shares the first one's full cache blocks instead of prefilling them, and
// still gives exactly its solo run; so does a third that diverges inside a block.
TEST_F(SchedulerTest, ASharedPromptPrefixIsNotPrefilledTwice) {
  LocalModelOptions options;
  options.kv_cache_tokens = 1024;
  auto model = LocalModel::Load(testing::TinyMixtralDir(), options);
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_TRUE((*model)->kv_pool().prefix_caching());
  Scheduler scheduler(&(*model)->runner(), &(*model)->kv_pool(), &(*model)->tokenizer(), {});
  std::vector<int32_t> preamble;  // 70 tokens: 4 full blocks and 6 more
  for (int i = 0; i < 70; ++i) preamble.push_back(300 + (i * 37) % 5000);
  auto run = [&](std::vector<int32_t> prompt) {
    GenerationRequest r;
    r.prompt_ids = std::move(prompt);
    r.options.max_new_tokens = 12;
    r.options.ignore_eos = true;
    auto sink = std::make_shared<RecordingSink>();
    EXPECT_TRUE(scheduler.Submit(r, sink).ok());
    EXPECT_TRUE(sink->WaitFor(std::chrono::seconds(120)));
    EXPECT_TRUE(sink->error.ok()) << sink->error;
    auto solo = Generate((*model)->runner(), (*model)->kv_pool(), (*model)->tokenizer(),
                         r.prompt_ids, r.options);
    EXPECT_TRUE(solo.ok()) << solo.status();
    if (solo.ok()) {
      EXPECT_EQ(sink->tokens, solo->token_ids);
    }
    return scheduler.Stats();
  };
  const SchedulerStats first = run(preamble);
  EXPECT_EQ(first.prefix_hit_tokens, 0);
  EXPECT_GT((*model)->kv_pool().cached_blocks(), 0) << "finished blocks are kept cached";

  std::vector<int32_t> same = preamble;  // the same prompt: 4 blocks shared
  const SchedulerStats second = run(same);
  EXPECT_EQ(second.prefix_hit_tokens - first.prefix_hit_tokens, 64);
  // Prefill computed only what was not shared.
  EXPECT_EQ((second.step_tokens_total - first.step_tokens_total) + 64, first.step_tokens_total);

  std::vector<int32_t> diverging(preamble.begin(), preamble.begin() + 40);  // block 3 differs
  for (int i = 0; i < 30; ++i) diverging.push_back(7000 + i);
  const SchedulerStats third = run(diverging);
  EXPECT_EQ(third.prefix_hit_tokens - second.prefix_hit_tokens, 32);
  std::printf("prefix hit tokens: %lld\n", static_cast<long long>(third.prefix_hit_tokens));
  EXPECT_EQ((*model)->kv_pool().used_tokens(), 0);
}

TEST_F(SchedulerTest, ManyUnsortedStopTokenIdsStillStopAtTheFirstOneGenerated) {
  auto scheduler = MakeScheduler();
  GenerationRequest r = Request(kPrompts[2], 24);
  const GenerateResult solo = Solo(r);
  // The 6th greedy token (first occurrence) among 1000 other ids, some repeated.
  size_t k = 5;
  while (std::find(solo.token_ids.begin(), solo.token_ids.begin() + k, solo.token_ids[k]) !=
         solo.token_ids.begin() + k) {
    ++k;
  }
  for (int id = 31999; static_cast<int>(r.options.stop_token_ids.size()) < 1000; id -= 7) {
    if (std::find(solo.token_ids.begin(), solo.token_ids.end(), id) == solo.token_ids.end()) {
      r.options.stop_token_ids.push_back(id);
      r.options.stop_token_ids.push_back(id);
    }
  }
  r.options.stop_token_ids.insert(r.options.stop_token_ids.begin() + 501, solo.token_ids[k]);
  auto sink = std::make_shared<RecordingSink>();
  ASSERT_TRUE(scheduler->Submit(r, sink).ok());
  sink->Wait();
  EXPECT_EQ(sink->finish.reason, FinishReason::kStopSequence);
  EXPECT_EQ(sink->tokens,
            std::vector<int32_t>(solo.token_ids.begin(), solo.token_ids.begin() + k + 1));
}

TEST_F(SchedulerTest, ZeroStepBudgetOrBatchCannotWedgeTheLoop) {
  // What `--max-step-tokens 4294967296` used to become once narrowed to int.
  SchedulerOptions options;
  options.max_step_tokens = 0;
  options.max_running = 0;
  auto scheduler = MakeScheduler(options);
  auto sink = std::make_shared<RecordingSink>();
  GenerationRequest r = Request(kPrompts[0], 3);
  ASSERT_TRUE(scheduler->Submit(r, sink).ok());
  ASSERT_TRUE(sink->WaitFor(std::chrono::seconds(60))) << "the scheduler is wedged";
  EXPECT_TRUE(sink->error.ok()) << sink->error;
  EXPECT_EQ(sink->tokens, Solo(r).token_ids);
}

// The cache hands out blocks of 16 slots. With a capacity that is not a
// multiple of 16, a request whose prompt + max_new_tokens fits the capacity
// but not in whole blocks used to pass Submit and then never be admitted: the
// loop spun and everything behind it waited forever. Now it is refused up
// front, and the scheduler keeps serving.
TEST_F(SchedulerTest, CapacityNotAMultipleOfTheBlockRefusesUpFrontAndNeverWedges) {
  for (int capacity : {1000, 5000}) {
    SCOPED_TRACE(capacity);
    LocalModelOptions small;
    small.kv_cache_tokens = capacity;
    auto model = LocalModel::Load(testing::TinyMixtralDir(), small);
    ASSERT_TRUE(model.ok()) << model.status();
    Scheduler scheduler(&(*model)->runner(), &(*model)->kv_pool(), &(*model)->tokenizer(), {});
    const int context = (*model)->runner().config().max_position_embeddings;
    auto request = [](int prompt_tokens, int max_new) {
      GenerationRequest r;
      for (int i = 0; i < prompt_tokens; ++i) r.prompt_ids.push_back(100 + i % 1000);
      r.options.max_new_tokens = max_new;
      r.options.ignore_eos = true;
      return r;
    };

    // Exactly the capacity: fits the count, not the blocks.
    auto refused = scheduler.Submit(request(capacity - 8, 8), std::make_shared<RecordingSink>());
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_TRUE(absl::StrContains(refused.status().message(), absl::StrCat(capacity)))
        << refused.status();
    EXPECT_TRUE(absl::StrContains(refused.status().message(), "blocks of 16")) << refused.status();

    // The largest request whole blocks allow (within the model's context) runs.
    const int fits = std::min(capacity / 16 * 16, context);
    auto sink = std::make_shared<RecordingSink>();
    ASSERT_TRUE(scheduler.Submit(request(fits - 8, 8), sink).ok());
    ASSERT_TRUE(sink->WaitFor(std::chrono::seconds(120))) << "the scheduler is wedged";
    EXPECT_TRUE(sink->error.ok()) << sink->error;
    EXPECT_EQ(sink->tokens.size(), 8u);
    EXPECT_EQ((*model)->kv_pool().used_tokens(), 0);
  }
}

}  // namespace
}  // namespace switchyard
