// Sustained load on the split cluster (one switchyard-expert process per
// expert, in-process gateway): 256 requests over 64 concurrent
// GenerateStream calls, 16 to 48 new tokens each, greedy and seeded sampling
// mixed. Zero failures; every stream ends with a finish reason and usage that
// match what it streamed. The only time limit is a generous safety bound;
// throughput is printed for information.
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gateway/gateway_server.h"
#include "gtest/gtest.h"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/faults/fault_util.h"

namespace switchyard {
namespace {

using faults::Clock;
using faults::ServerProcess;

// A final gRPC shutdown on main's thread, and no first-connect failure from
// a stale errno (rpc/grpc_process.h).
::testing::Environment* const kGrpcProcess =
    ::testing::AddGlobalTestEnvironment(new faults::GrpcProcessEnvironment);

constexpr int kExperts = 8;
constexpr int kRequests = 256;
constexpr int kConcurrency = 64;
constexpr double kSafetyBoundSeconds = 120;

TEST(LoadTest, SixtyFourConcurrentStreamsOverTheSplitClusterAllSucceed) {
  std::vector<std::unique_ptr<ServerProcess>> experts;
  std::string spec;
  for (int e = 0; e < kExperts; ++e) {
    experts.push_back(std::make_unique<ServerProcess>());
    auto address = experts.back()->Start(faults::ExpertArgv(std::to_string(e), "127.0.0.1:0"));
    ASSERT_TRUE(address.ok()) << address.status();
    spec += absl::StrCat(e, "=", *address, ";");
  }
  GatewayOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.experts = spec;
  options.scheduler.max_running = kConcurrency;
  options.scheduler.max_queue = kRequests;
  auto gateway = Gateway::Start(options);
  ASSERT_TRUE(gateway.ok()) << gateway.status();

  const std::vector<std::string> prompts = faults::ReferencePrompts();
  std::vector<v1::GenerateRequest> requests(kRequests);
  for (int i = 0; i < kRequests; ++i) {
    v1::GenerateRequest& r = requests[i];
    r.set_text(absl::StrCat(prompts[i % prompts.size()], i % 3 == 0 ? "" : " and then", " #", i));
    r.mutable_stopping()->set_max_new_tokens(16 + (i * 13) % 33);  // 16..48
    r.mutable_stopping()->set_ignore_eos(i % 4 != 1);              // some may stop at EOS
    r.set_request_id(absl::StrCat("load-", i));
    if (i % 2 == 1) {
      faults::MakeSampled(&r, 100 + i);
      r.mutable_sampling()->set_temperature(0.5f + 0.1f * (i % 8));
    }
  }

  // 64 client threads, each streaming requests off a shared cursor, each over
  // its own channel (connection), as independent clients would.
  std::vector<faults::StreamOutcome> outcomes(kRequests);
  std::atomic<int> next{0};
  const auto start = Clock::now();
  std::vector<std::thread> clients;
  for (int c = 0; c < kConcurrency; ++c) {
    clients.emplace_back([&] {
      auto channel = faults::Dial((*gateway)->address());
      for (int i = next++; i < kRequests; i = next++) {
        outcomes[i] = faults::Stream(channel, requests[i], nullptr,
                                     std::chrono::seconds(static_cast<int>(kSafetyBoundSeconds)));
      }
    });
  }
  for (auto& t : clients) t.join();
  const double seconds = faults::SecondsSince(start);

  int failures = 0;
  int64_t tokens = 0;
  for (int i = 0; i < kRequests; ++i) {
    const faults::StreamOutcome& o = outcomes[i];
    const uint32_t max_new = requests[i].stopping().max_new_tokens();
    if (!o.status.ok()) {
      ++failures;
      ADD_FAILURE() << "request " << i << ": " << faults::Describe(o.status);
      continue;
    }
    tokens += static_cast<int64_t>(o.tokens.size());
    EXPECT_NE(o.finish_reason, v1::FINISH_REASON_UNSPECIFIED) << "request " << i;
    ASSERT_TRUE(o.has_usage) << "request " << i;
    EXPECT_EQ(o.completion_tokens, o.tokens.size()) << "request " << i;
    EXPECT_GT(o.prompt_tokens, 0u) << "request " << i;
    EXPECT_LE(o.tokens.size(), max_new) << "request " << i;
    if (o.finish_reason == v1::FINISH_REASON_LENGTH) {
      EXPECT_EQ(o.tokens.size(), max_new) << "request " << i;
    } else {
      EXPECT_EQ(o.finish_reason, v1::FINISH_REASON_EOS) << "request " << i;
      EXPECT_FALSE(requests[i].stopping().ignore_eos()) << "request " << i;
    }
  }
  EXPECT_EQ(failures, 0);
  EXPECT_LT(seconds, kSafetyBoundSeconds) << "far slower than expected: something stalled";
  const SchedulerStats stats = (*gateway)->scheduler().Stats();
  EXPECT_EQ(stats.requests_failed, 0);
  EXPECT_EQ(stats.kv_used_tokens, 0) << "cache not freed";
  std::printf(
      "[ load     ] %d requests, %d concurrent streams: %lld tokens in %.2f s = %.0f "
      "tokens/s, %.1f requests/s (%lld steps, %.1f tokens per step)\n",
      kRequests, kConcurrency, static_cast<long long>(tokens), seconds, tokens / seconds,
      kRequests / seconds, static_cast<long long>(stats.steps),
      stats.steps ? static_cast<double>(stats.step_tokens_total) / stats.steps : 0.0);

  gateway->reset();
  for (auto& e : experts) {
    const int status = e->Kill(SIGTERM);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "wait status " << status;
  }
}

}  // namespace
}  // namespace switchyard
