// The Generation API over real gRPC, against an in-process gateway with
// in-process experts: unary and streaming agree, stop conditions, concurrent
// streams, cancellation and deadlines free the cache, bad input is refused.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/utf8.h"
#include "gateway/gateway_server.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/test_util.h"

namespace switchyard {
namespace {

class GatewayTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    GatewayOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.kv_cache_tokens = 16384;
    options.scheduler.max_step_tokens = 64;
    auto gateway = Gateway::Start(options);
    ASSERT_TRUE(gateway.ok()) << gateway.status();
    gateway_ = gateway->release();
    channel_ = new std::shared_ptr<grpc::Channel>(
        grpc::CreateChannel(gateway_->address(), grpc::InsecureChannelCredentials()));
    reference_ = new nlohmann::json(
        nlohmann::json::parse(testing::ReadAll(testing::TinyMixtralDir() + "/reference.json")));
  }
  static void TearDownTestSuite() {
    delete channel_;
    delete gateway_;
    delete reference_;
  }

  std::unique_ptr<v1::GenerationService::Stub> Stub() {
    return v1::GenerationService::NewStub(*channel_);
  }

  static v1::GenerateRequest Greedy(const std::string& text, int max_new) {
    v1::GenerateRequest r;
    r.set_text(text);
    r.mutable_stopping()->set_max_new_tokens(max_new);
    r.mutable_stopping()->set_ignore_eos(true);
    return r;
  }

  struct Streamed {
    grpc::Status status;
    std::vector<v1::GenerateStreamResponse> messages;
    std::string text;
    std::vector<int32_t> tokens;
  };
  Streamed Stream(const v1::GenerateRequest& request) {
    Streamed s;
    grpc::ClientContext ctx;
    auto reader = Stub()->GenerateStream(&ctx, request);
    v1::GenerateStreamResponse m;
    while (reader->Read(&m)) {
      s.text += m.text_delta();
      s.tokens.insert(s.tokens.end(), m.token_ids().begin(), m.token_ids().end());
      s.messages.push_back(m);
    }
    s.status = reader->Finish();
    return s;
  }

  static Gateway* gateway_;
  static std::shared_ptr<grpc::Channel>* channel_;
  static nlohmann::json* reference_;
};

Gateway* GatewayTest::gateway_ = nullptr;
std::shared_ptr<grpc::Channel>* GatewayTest::channel_ = nullptr;
nlohmann::json* GatewayTest::reference_ = nullptr;

TEST_F(GatewayTest, GreedyOverGrpcMatchesHuggingFace) {
  for (const auto& p : (*reference_)["prompts"]) {
    v1::GenerateResponse response;
    grpc::ClientContext ctx;
    grpc::Status status = Stub()->Generate(&ctx, Greedy(p["text"], 24), &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    const std::vector<int32_t> expected = p["greedy_new_ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(std::vector<int32_t>(response.token_ids().begin(), response.token_ids().end()),
              expected);
    EXPECT_EQ(std::vector<int32_t>(response.prompt_token_ids().begin(),
                                   response.prompt_token_ids().end()),
              p["input_ids"].get<std::vector<int32_t>>());
    EXPECT_EQ(response.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(response.usage().completion_tokens(), 24u);
    EXPECT_EQ(response.usage().prompt_tokens(), p["input_ids"].size());
    EXPECT_GT(response.total_micros(), 0);
  }
}

TEST_F(GatewayTest, StreamDeltasJoinedEqualTheUnaryResultAndAreValidUtf8) {
  for (const auto& p : (*reference_)["prompts"]) {
    v1::GenerateRequest request = Greedy(p["text"], 24);
    request.set_return_logprobs(true);
    request.set_top_logprobs(2);
    request.set_request_id("r-42");
    v1::GenerateResponse unary;
    grpc::ClientContext ctx;
    ASSERT_TRUE(Stub()->Generate(&ctx, request, &unary).ok());
    Streamed s = Stream(request);
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.text, unary.text());
    EXPECT_EQ(s.tokens, std::vector<int32_t>(unary.token_ids().begin(), unary.token_ids().end()));
    for (const auto& m : s.messages) {
      EXPECT_TRUE(IsValidUtf8(m.text_delta())) << m.text_delta();
      EXPECT_EQ(m.request_id(), "r-42");
    }
    EXPECT_EQ(
        std::vector<int32_t>(s.messages[0].prompt_token_ids().begin(),
                             s.messages[0].prompt_token_ids().end()),
        std::vector<int32_t>(unary.prompt_token_ids().begin(), unary.prompt_token_ids().end()));
    for (size_t i = 1; i < s.messages.size(); ++i) {
      EXPECT_EQ(s.messages[i].prompt_token_ids_size(), 0);
    }
    const auto& last = s.messages.back();
    EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(last.usage().completion_tokens(), 24u);
    for (size_t i = 0; i + 1 < s.messages.size(); ++i) {
      EXPECT_EQ(s.messages[i].finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
    }
    ASSERT_EQ(unary.logprobs_size(), 24);
    for (const auto& lp : unary.logprobs()) {
      ASSERT_EQ(lp.top_size(), 2);
      // Greedy: the chosen token is the most likely one.
      EXPECT_EQ(lp.token_id(), lp.top(0).token_id());
      EXPECT_FLOAT_EQ(lp.logprob(), lp.top(0).logprob());
      EXPECT_LE(lp.logprob(), 0.0f);
    }
  }
}

TEST_F(GatewayTest, StopStringsAndStopTokensEndWithTheRightReason) {
  const auto& p0 = (*reference_)["prompts"][0];
  v1::GenerateResponse full;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(Stub()->Generate(&ctx, Greedy(p0["text"], 24), &full).ok());
  }
  const size_t at = full.text().find("hotels");
  ASSERT_NE(at, std::string::npos) << full.text();
  v1::GenerateRequest request = Greedy(p0["text"], 24);
  request.mutable_stopping()->add_stop("hotels");
  Streamed s = Stream(request);
  ASSERT_TRUE(s.status.ok());
  EXPECT_EQ(s.text, full.text().substr(0, at));
  EXPECT_EQ(s.messages.back().finish_reason(), v1::FINISH_REASON_STOP_SEQUENCE);

  v1::GenerateRequest by_id = Greedy(p0["text"], 24);
  by_id.mutable_stopping()->add_stop_token_ids(full.token_ids(2));
  v1::GenerateResponse r;
  grpc::ClientContext ctx;
  ASSERT_TRUE(Stub()->Generate(&ctx, by_id, &r).ok());
  EXPECT_EQ(r.finish_reason(), v1::FINISH_REASON_STOP_SEQUENCE);
  ASSERT_EQ(r.token_ids_size(), 3);
  EXPECT_EQ(r.token_ids(2), full.token_ids(2));
}

TEST_F(GatewayTest, SixteenConcurrentStreamsAllFinishAndGreedyOnesEqualSolo) {
  struct Job {
    v1::GenerateRequest request;
    Streamed result;
  };
  std::vector<Job> jobs(16);
  const auto& prompts = (*reference_)["prompts"];
  for (int i = 0; i < 16; ++i) {
    jobs[i].request = Greedy(prompts[i % 4]["text"], 3 + (i * 7) % 29);
    if (i % 3 == 1) {
      auto* s = jobs[i].request.mutable_sampling();
      s->set_temperature(0.7f + 0.1f * (i % 4));
      s->set_top_p(0.95f);
      s->set_top_k(40);
      s->set_min_p(0.01f);
      s->set_seed(1000 + i);
    }
    if (i % 5 == 2) jobs[i].request.mutable_sampling()->set_presence_penalty(0.5f);
  }
  std::vector<std::thread> threads;
  for (auto& job : jobs) threads.emplace_back([&] { job.result = Stream(job.request); });
  for (auto& t : threads) t.join();
  for (int i = 0; i < 16; ++i) {
    ASSERT_TRUE(jobs[i].result.status.ok()) << i << ": " << jobs[i].result.status.error_message();
    EXPECT_EQ(jobs[i].result.tokens.size(), jobs[i].request.stopping().max_new_tokens()) << i;
    // Every request, greedy or seeded, equals its solo run.
    v1::GenerateResponse solo;
    grpc::ClientContext ctx;
    ASSERT_TRUE(Stub()->Generate(&ctx, jobs[i].request, &solo).ok());
    EXPECT_EQ(jobs[i].result.tokens,
              std::vector<int32_t>(solo.token_ids().begin(), solo.token_ids().end()))
        << "request " << i;
    EXPECT_EQ(jobs[i].result.text, solo.text()) << "request " << i;
  }
}

TEST_F(GatewayTest, CancellingAStreamFreesItsCache) {
  const SchedulerStats before = gateway_->scheduler().Stats();
  grpc::ClientContext ctx;
  v1::GenerateRequest request = Greedy("Cancel me halfway through", 4000);
  auto reader = Stub()->GenerateStream(&ctx, request);
  v1::GenerateStreamResponse m;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(reader->Read(&m));
  EXPECT_GT(gateway_->scheduler().Stats().kv_used_tokens, 0);
  ctx.TryCancel();
  while (reader->Read(&m)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  SchedulerStats after;
  for (int i = 0; i < 200; ++i) {  // the scheduler frees it at its next step
    after = gateway_->scheduler().Stats();
    if (after.kv_used_tokens == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(after.kv_used_tokens, 0);
  EXPECT_EQ(after.kv_live_sequences, 0);
  EXPECT_EQ(after.requests_cancelled, before.requests_cancelled + 1);
}

TEST_F(GatewayTest, DeadlineIsHonouredAndFreesTheSequence) {
  const SchedulerStats before = gateway_->scheduler().Stats();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(150));
  v1::GenerateResponse response;
  grpc::Status status = Stub()->Generate(&ctx, Greedy("Too slow", 4000), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  SchedulerStats after;
  for (int i = 0; i < 200; ++i) {
    after = gateway_->scheduler().Stats();
    if (after.kv_used_tokens == 0 && after.requests_cancelled > before.requests_cancelled) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(after.kv_used_tokens, 0);
  EXPECT_EQ(after.requests_cancelled, before.requests_cancelled + 1);
}

TEST_F(GatewayTest, BadRequestsNameTheFieldAndTheServerKeepsServing) {
  struct Case {
    const char* name;
    std::function<void(v1::GenerateRequest*)> mutate;
    const char* field;
  };
  const std::vector<Case> cases = {
      {"no prompt", [](auto* r) { r->clear_text(); }, "prompt"},
      {"empty text", [](auto* r) { r->set_text(""); }, "text"},
      {"empty ids", [](auto* r) { r->mutable_token_ids(); }, "token_ids"},
      {"id out of vocab", [](auto* r) { r->mutable_token_ids()->add_ids(32000); },
       "token_ids.ids[0]"},
      {"negative id", [](auto* r) { r->mutable_token_ids()->add_ids(-1); }, "token_ids.ids[0]"},
      {"max_new 0", [](auto* r) { r->mutable_stopping()->set_max_new_tokens(0); },
       "max_new_tokens"},
      {"max_new above limit", [](auto* r) { r->mutable_stopping()->set_max_new_tokens(1 << 20); },
       "max_new_tokens"},
      {"temperature < 0", [](auto* r) { r->mutable_sampling()->set_temperature(-1); },
       "temperature"},
      {"temperature nan", [](auto* r) { r->mutable_sampling()->set_temperature(NAN); },
       "temperature"},
      {"top_p 0", [](auto* r) { r->mutable_sampling()->set_top_p(0); }, "top_p"},
      {"top_p > 1", [](auto* r) { r->mutable_sampling()->set_top_p(1.5f); }, "top_p"},
      {"top_k < 0", [](auto* r) { r->mutable_sampling()->set_top_k(-3); }, "top_k"},
      {"min_p > 1", [](auto* r) { r->mutable_sampling()->set_min_p(2); }, "min_p"},
      {"presence", [](auto* r) { r->mutable_sampling()->set_presence_penalty(5); },
       "presence_penalty"},
      {"frequency", [](auto* r) { r->mutable_sampling()->set_frequency_penalty(-5); },
       "frequency_penalty"},
      {"repetition", [](auto* r) { r->mutable_sampling()->set_repetition_penalty(0); },
       "repetition_penalty"},
      {"too many stops",
       [](auto* r) {
         for (int i = 0; i < 17; ++i) r->mutable_stopping()->add_stop("x");
       },
       "stopping.stop"},
      {"long stop", [](auto* r) { r->mutable_stopping()->add_stop(std::string(300, 'a')); },
       "stopping.stop[0]"},
      {"empty stop", [](auto* r) { r->mutable_stopping()->add_stop(""); }, "stopping.stop[0]"},
      {"stop id", [](auto* r) { r->mutable_stopping()->add_stop_token_ids(99999); },
       "stop_token_ids[0]"},
      {"top_logprobs",
       [](auto* r) {
         r->set_return_logprobs(true);
         r->set_top_logprobs(50);
       },
       "top_logprobs"},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest request = Greedy("A valid prompt", 4);
    c.mutate(&request);
    v1::GenerateResponse response;
    grpc::ClientContext ctx;
    grpc::Status status = Stub()->Generate(&ctx, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name;
    EXPECT_NE(status.error_message().find(c.field), std::string::npos)
        << c.name << ": " << status.error_message();
    Streamed s = Stream(request);
    EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name;
  }
  v1::GenerateResponse ok;
  grpc::ClientContext ctx;
  EXPECT_TRUE(Stub()->Generate(&ctx, Greedy("Still serving", 4), &ok).ok());
  EXPECT_EQ(ok.token_ids_size(), 4);
}

TEST_F(GatewayTest, TokenizeDetokenizeModelInfoHealth) {
  v1::TokenizeRequest tr;
  tr.set_text("Hello world!");
  v1::TokenizeResponse tokens;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(Stub()->Tokenize(&ctx, tr, &tokens).ok());
  }
  EXPECT_EQ(std::vector<int32_t>(tokens.token_ids().begin(), tokens.token_ids().end()),
            (std::vector<int32_t>{1, 22557, 1526, 28808}));
  EXPECT_EQ(tokens.tokens(1), "▁Hello");
  v1::DetokenizeRequest dr;
  dr.mutable_token_ids()->CopyFrom(tokens.token_ids());
  v1::DetokenizeResponse text;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(Stub()->Detokenize(&ctx, dr, &text).ok());
  }
  EXPECT_EQ(text.text(), "Hello world!");
  dr.add_token_ids(40000);
  {
    grpc::ClientContext ctx;
    EXPECT_EQ(Stub()->Detokenize(&ctx, dr, &text).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  v1::ModelInfo info;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(Stub()->GetModelInfo(&ctx, {}, &info).ok());
  }
  EXPECT_EQ(info.vocab_size(), 32000u);
  EXPECT_EQ(info.num_experts(), 8u);
  EXPECT_EQ(info.experts_size(), 8);
  EXPECT_EQ(info.eos_token_id(), 2);

  auto health = grpc::health::v1::Health::NewStub(*channel_);
  grpc::health::v1::HealthCheckRequest hr;
  grpc::health::v1::HealthCheckResponse hs;
  grpc::ClientContext ctx;
  ASSERT_TRUE(health->Check(&ctx, hr, &hs).ok());
  EXPECT_EQ(hs.status(), grpc::health::v1::HealthCheckResponse::SERVING);
}

}  // namespace
}  // namespace switchyard
