// The Generation API over real gRPC, against an in-process gateway with
// in-process experts: unary and streaming agree, stop conditions, concurrent
// streams, cancellation and deadlines free the cache, bad input is refused.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "attention_service/kv_cache.h"
#include "core/utf8.h"
#include "gateway/gateway_server.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "metrics/metrics.h"
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
  // The scheduler frees it at its next step, then counts it.
  for (int i = 0; i < 3000; ++i) {
    after = gateway_->scheduler().Stats();
    if (after.kv_used_tokens == 0 && after.requests_cancelled > before.requests_cancelled) break;
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
  for (int i = 0; i < 3000; ++i) {
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
      {"too many stop ids",
       [](auto* r) {
         for (int i = 0; i < 1025; ++i) r->mutable_stopping()->add_stop_token_ids(i);
       },
       "stopping.stop_token_ids"},
      {"long request_id", [](auto* r) { r->set_request_id(std::string(257, 'r')); }, "request_id"},
      {"unprintable request_id", [](auto* r) { r->set_request_id("id\nwith newline"); },
       "request_id"},
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

TEST_F(GatewayTest, LimitsAreTheLargestLegalValuesAndOversizedRequestsAreRefusedUnread) {
  // The advertised max_new_tokens limit is usable: context - 1 with a
  // one-token prompt; the check is prompt + max_new_tokens <= context.
  v1::ModelInfo info;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(Stub()->GetModelInfo(&ctx, {}, &info).ok());
  }
  EXPECT_EQ(info.max_new_tokens_limit(), info.max_context_tokens() - 1);
  v1::GenerateRequest longest;
  longest.mutable_token_ids()->add_ids(1);
  longest.mutable_stopping()->set_max_new_tokens(info.max_new_tokens_limit());
  longest.mutable_stopping()->set_ignore_eos(true);
  {
    grpc::ClientContext ctx;  // accepted: it runs until the deadline cuts it
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
    v1::GenerateResponse r;
    EXPECT_EQ(Stub()->Generate(&ctx, longest, &r).error_code(),
              grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  longest.mutable_token_ids()->add_ids(1);  // one token more than the context
  {
    grpc::ClientContext ctx;
    v1::GenerateResponse r;
    grpc::Status status = Stub()->Generate(&ctx, longest, &r);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(status.error_message().find("exceeds the context"), std::string::npos)
        << status.error_message();
  }

  // A request larger than any legal one is refused by gRPC before it is
  // read (limits_test checks the server's memory against a real process).
  v1::GenerateRequest huge = Greedy("Hello", 4);
  huge.set_request_id(std::string(8 << 20, 'x'));
  {
    grpc::ClientContext ctx;
    v1::GenerateResponse r;
    EXPECT_EQ(Stub()->Generate(&ctx, huge, &r).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  }
  Streamed streamed = Stream(huge);
  EXPECT_EQ(streamed.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(streamed.messages.empty());
  v1::GenerateResponse ok;
  grpc::ClientContext ctx;
  EXPECT_TRUE(Stub()->Generate(&ctx, Greedy("Still serving", 4), &ok).ok());
}

TEST_F(GatewayTest, MalformedAndNonUtf8RequestsAreRefusedAndTheServerKeepsServing) {
  // Bytes that are not a GenerateRequest at all, and a request whose text
  // (a proto3 `string`) is not UTF-8, sent as raw bytes: protobuf refuses to
  // parse both before the service sees them, so the answer is gRPC's (gRPC
  // C++ 1.51: UNIMPLEMENTED with an empty message; documented in
  // generation.proto). Clients generated from the .proto cannot send either.
  grpc::GenericStub generic(*channel_);
  v1::GenerateRequest valid = Greedy("A valid prompt", 4);
  std::string non_utf8 = valid.SerializeAsString();
  const size_t at = non_utf8.find("valid");
  ASSERT_NE(at, std::string::npos);
  non_utf8[at] = '\xff';
  for (const std::string& bytes : {std::string("\xff\xff\xff\xff"), non_utf8}) {
    for (const char* method : {"/switchyard.v1.GenerationService/Generate",
                               "/switchyard.v1.GenerationService/GenerateStream"}) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      grpc::Slice slice(bytes);
      grpc::ByteBuffer request(&slice, 1), response;
      std::mutex mu;
      std::condition_variable cv;
      bool done = false;
      grpc::Status status;
      generic.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &response,
                        [&](grpc::Status s) {
                          std::lock_guard<std::mutex> lock(mu);
                          status = s;
                          done = true;
                          cv.notify_all();
                        });
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return done; });
      std::printf("%s, %zu bytes: %d '%s'\n", method, bytes.size(), status.error_code(),
                  status.error_message().c_str());
      EXPECT_FALSE(status.ok());
    }
  }
  v1::GenerateResponse ok;
  grpc::ClientContext ctx;
  EXPECT_TRUE(Stub()->Generate(&ctx, Greedy("Still serving", 4), &ok).ok());
}

TEST(GatewayOptionsTest, NumericFlagsAreCheckedInTheirRealRange) {
  struct Case {
    std::vector<std::string> args;
    const char* flag;
  };
  // Values that used to pass a 64-bit ">= 1" check and then wrap when
  // narrowed to int (4294967296 -> 0: a scheduler that spins; a queue of 0).
  const std::vector<Case> cases = {
      {{"--max-step-tokens", "4294967296"}, "--max-step-tokens"},
      {{"--max-queue", "4294967296"}, "--max-queue"},
      {{"--max-running", "4294967297"}, "--max-running"},
      {{"--max-new-tokens-limit", "4294967296"}, "--max-new-tokens-limit"},
      {{"--expert-timeout-ms", "4294967296"}, "--expert-timeout-ms"},
      {{"--grace-ms", "-1"}, "--grace-ms"},
      {{"--max-connection-age-ms", "2147483648"}, "--max-connection-age-ms"},
      {{"--kv-cache-tokens", "8"}, "--kv-cache-tokens"},
      {{"--max-step-tokens", "0"}, "--max-step-tokens"},
      {{"--max-queue", "ten"}, "--max-queue"},
      {{"--kv-cache-memory", "2XB"}, "--kv-cache-memory"},
      {{"--kv-cache-memory", "-1GiB"}, "--kv-cache-memory"},
      {{"--kv-cache-memory", "0"}, "--kv-cache-memory"},
      {{"--kv-cache-memory", "1GiB", "--kv-cache-tokens", "4096"}, "--kv-cache-memory"},
      {{"--kv-cache-dtype", "fp8"}, "--kv-cache-dtype"},
      {{"--micro-batches", "-1"}, "--micro-batches"},
      {{"--micro-batches", "65"}, "--micro-batches"},
      {{"--micro-batches", "two"}, "--micro-batches"},
      {{"--expert-dns-refresh-ms", "-1"}, "--expert-dns-refresh-ms"},
      {{"--expert-dns-refresh-ms", "86400001"}, "--expert-dns-refresh-ms"},
      {{"--frame-spin-us", "-1"}, "--frame-spin-us"},
      {{"--frame-spin-us", "100001"}, "--frame-spin-us"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> args = {"--model", "m"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    auto flags =
        Flags::Parse(args,
                     {"model", "kv-cache-tokens", "max-queue", "max-running", "max-step-tokens",
                      "max-new-tokens-limit", "expert-timeout-ms", "grace-ms",
                      "max-connection-age-ms", "kv-cache-memory", "kv-cache-dtype", "micro-batches",
                      "expert-dns-refresh-ms", "frame-spin-us"},
                     {});
    ASSERT_TRUE(flags.ok()) << flags.status();
    auto options = GatewayOptionsFromFlags(*flags);
    ASSERT_FALSE(options.ok()) << c.args[0] << " " << c.args[1];
    EXPECT_EQ(options.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(options.status().message().find(c.flag), std::string::npos) << options.status();
  }
  auto flags =
      Flags::Parse({"--model", "m", "--max-step-tokens", "16384", "--max-queue", "1048576",
                    "--kv-cache-tokens", "1000", "--micro-batches", "3", "--frame-spin-us", "250"},
                   {"model", "max-step-tokens", "max-queue", "kv-cache-tokens", "micro-batches",
                    "frame-spin-us"},
                   {});
  ASSERT_TRUE(flags.ok());
  auto options = GatewayOptionsFromFlags(*flags);
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->scheduler.max_step_tokens, 16384);
  EXPECT_EQ(options->scheduler.max_queue, 1048576);
  EXPECT_EQ(options->micro_batches, 3);
  EXPECT_EQ(GatewayOptions().micro_batches, 0) << "the default is auto";
  EXPECT_EQ(options->frame_spin_us, 250);
  EXPECT_EQ(GatewayOptions().frame_spin_us, 0) << "no polling by default";

  // Options built in code are checked by Start, before the model loads.
  GatewayOptions zero_step;
  zero_step.model_dir = testing::TinyMixtralDir();
  zero_step.listen = "127.0.0.1:0";
  zero_step.scheduler.max_step_tokens = 0;
  auto gateway = Gateway::Start(zero_step);
  ASSERT_FALSE(gateway.ok());
  EXPECT_EQ(gateway.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(gateway.status().message().find("--max-step-tokens"), std::string::npos);
}

// The value of the unlabelled series `name` in Prometheus text, or -1.
double GaugeValue(const std::string& text, const std::string& name) {
  size_t at = 0;
  while ((at = text.find(name, at)) != std::string::npos) {
    const bool line_start = at == 0 || text[at - 1] == '\n';
    const size_t end = text.find('\n', at);
    const std::string line = text.substr(at, end - at);
    at += name.size();
    if (!line_start || line.size() <= name.size() ||
        (line[name.size()] != ' ' && line[name.size()] != '{')) {
      continue;
    }
    return std::stod(line.substr(line.rfind(' ') + 1));
  }
  return -1;
}

// --kv-cache-memory sizes the pool in bytes of its K/V dtype: the same budget
// holds twice the tokens as BF16, and the gauges say both. Without a size the
// pool takes half of MemAvailable.
TEST(GatewayKvSizingTest, MemoryBudgetIsConvertedAtTheCacheDtypeAndReported) {
  int64_t bf16_tokens = 0;
  for (const char* dtype : {"f32", "bf16"}) {
    SCOPED_TRACE(dtype);
    GatewayOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.kv_cache_memory = int64_t{1} << 20;
    options.kv_cache_dtype = dtype;
    auto gateway = Gateway::Start(options);
    ASSERT_TRUE(gateway.ok()) << gateway.status();
    const SchedulerStats stats = (*gateway)->scheduler().Stats();
    const std::string text = metrics::Serialize((*gateway)->metrics_registry());
    EXPECT_EQ(GaugeValue(text, "switchyard_gateway_kv_cache_capacity_bytes"), 1 << 20);
    EXPECT_EQ(GaugeValue(text, "switchyard_gateway_kv_cache_capacity_tokens"),
              stats.kv_capacity_tokens);
    if (std::string(dtype) == "bf16") {
      bf16_tokens = stats.kv_capacity_tokens;
    } else {
      EXPECT_EQ(stats.kv_capacity_tokens, 2048);  // 512 bytes per token
    }
    (*gateway)->Shutdown(absl::ZeroDuration());
  }
  EXPECT_EQ(bf16_tokens, 4096);

  GatewayOptions by_default;
  by_default.model_dir = testing::TinyMixtralDir();
  by_default.listen = "127.0.0.1:0";
  auto gateway = Gateway::Start(by_default);
  ASSERT_TRUE(gateway.ok()) << gateway.status();
  absl::StatusOr<int64_t> available = HostMemAvailableBytes();
  ASSERT_TRUE(available.ok());
  const int64_t tokens = (*gateway)->scheduler().Stats().kv_capacity_tokens;
  // Half of MemAvailable at start-up, within what other processes moved since.
  std::printf("default KV cache: %lld tokens, MemAvailable now %lld bytes\n",
              static_cast<long long>(tokens), static_cast<long long>(*available));
  EXPECT_GT(tokens * 512, *available / 4);
  EXPECT_LT(tokens * 512, *available);
  (*gateway)->Shutdown(absl::ZeroDuration());
}

// A gateway of its own: a small per-stream queue bound, and a shutdown.
class GatewayLifecycleTest : public ::testing::Test {
 protected:
  std::unique_ptr<Gateway> StartGateway(const RequestLimits& limits) {
    GatewayOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.kv_cache_tokens = 8192;
    options.limits = limits;
    auto gateway = Gateway::Start(options);
    EXPECT_TRUE(gateway.ok()) << gateway.status();
    return gateway.ok() ? *std::move(gateway) : nullptr;
  }
  static v1::GenerateRequest Long() {
    v1::GenerateRequest r;
    r.set_text("The capital of France is");
    r.set_request_id("a-request-id-that-every-message-repeats");
    r.mutable_stopping()->set_max_new_tokens(4000);
    r.mutable_stopping()->set_ignore_eos(true);
    r.set_return_logprobs(true);
    r.set_top_logprobs(20);  // large messages: the transport's window fills quickly
    return r;
  }
};

TEST_F(GatewayLifecycleTest, AStreamWhoseClientStopsReadingIsCancelledNotBuffered) {
  RequestLimits limits;
  limits.max_stream_queued_messages = 16;
  auto gateway = StartGateway(limits);
  ASSERT_NE(gateway, nullptr);
  // No BDP probing, so the client's flow-control window stays small and a
  // reader that does not read soon stops the server's writes.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  auto channel =
      grpc::CreateCustomChannel(gateway->address(), grpc::InsecureChannelCredentials(), args);
  auto stub = v1::GenerationService::NewStub(channel);
  grpc::ClientContext ctx;
  auto reader = stub->GenerateStream(&ctx, Long());
  // Not reading: the scheduler must end the request long before 4000 tokens.
  SchedulerStats stats;
  for (int i = 0; i < 6000; ++i) {
    stats = gateway->scheduler().Stats();
    if (stats.requests_cancelled == 1 && stats.kv_used_tokens == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(stats.requests_cancelled, 1);
  EXPECT_EQ(stats.kv_used_tokens, 0);
  v1::GenerateStreamResponse m;
  int tokens = 0;
  while (reader->Read(&m)) tokens += m.token_ids_size();
  grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_NE(status.error_message().find("not reading"), std::string::npos)
      << status.error_message();
  EXPECT_LT(tokens, 4000);
}

TEST_F(GatewayLifecycleTest, ADrainThatCutsAStreamSaysTheGatewayIsShuttingDown) {
  auto gateway = StartGateway({});
  ASSERT_NE(gateway, nullptr);
  auto stub = v1::GenerationService::NewStub(
      grpc::CreateChannel(gateway->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  v1::GenerateRequest request = Long();
  request.set_return_logprobs(false);
  request.set_top_logprobs(0);
  auto reader = stub->GenerateStream(&ctx, request);
  v1::GenerateStreamResponse m;
  ASSERT_TRUE(reader->Read(&m));  // running
  std::thread drain([&] { gateway->Shutdown(absl::Milliseconds(100)); });
  int tokens = m.token_ids_size();
  while (reader->Read(&m)) tokens += m.token_ids_size();
  grpc::Status status = reader->Finish();
  drain.join();
  EXPECT_LT(tokens, 4000);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_NE(status.error_message().find("shutting down"), std::string::npos)
      << status.error_message();
}

// --micro-batches auto overlaps only when some expert is on another host.
TEST(GatewayOptionsTest, ExpertTargetsOnThisHostAreRecognised) {
  for (const char* local :
       {"127.0.0.1:5000", "localhost:5000", "127.1.2.3:1", "[::1]:5000", "unix:/tmp/e.sock",
        "unix-abstract:e", "ipv4:127.0.0.1:1,127.0.0.2:2", "ipv6:[::1]:1"}) {
    EXPECT_TRUE(ExpertTargetIsOnThisHost(local)) << local;
  }
  for (const char* remote :
       {"10.0.0.7:50061", "expert-3.svc:50051", "dns:///experts.default.svc:50051",
        "ipv4:127.0.0.1:1,10.0.0.2:2", "[fe80::1]:5000", "127.0.0.1"}) {
    EXPECT_FALSE(ExpertTargetIsOnThisHost(remote)) << remote;
  }
}

}  // namespace
}  // namespace switchyard
