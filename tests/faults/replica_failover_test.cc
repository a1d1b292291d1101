// Expert failures under load, with real switchyard-expert processes:
//  - one of two replicas of an expert is killed (SIGKILL) while 8 streams are
//    generating: the calls go to the other replica and every request
//    completes with exactly the tokens of a solo run on a healthy gateway;
//  - one of two replicas gets SIGTERM mid-stream (a rolling restart): it
//    drains and exits 0, and no request notices;
//  - the only replica of an expert is killed mid-stream: the requests in
//    flight end with UNAVAILABLE naming that expert, the gateway keeps
//    serving (and fails requests fast, naming the expert, while it is down),
//    and once the expert is restarted on the same port requests succeed again;
//  - failures stay contained (issue #16): with 40 requests in flight and the
//    only replica of an expert killed, only the requests with tokens routed
//    to it end (UNAVAILABLE naming the expert and its address); every other
//    request completes with exactly its solo run's tokens, and as many
//    succeed together as one at a time.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "gateway/gateway_server.h"
#include "gateway/local_model.h"
#include "gtest/gtest.h"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/faults/fault_util.h"

namespace switchyard {
namespace {

using faults::Clock;
using faults::ConcurrentStreams;
using faults::ServerProcess;

constexpr int kExperts = 8;
constexpr int kNewTokens = 200;
constexpr int kStreams = 8;
constexpr int kExpertTimeoutMs = 2000;

class ReplicaFailoverTest : public ::testing::Test {
 protected:
  // The healthy reference: a gateway with in-process experts.
  static void SetUpTestSuite() {
    GatewayOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.experts = "local";
    auto local = Gateway::Start(options);
    ASSERT_TRUE(local.ok()) << local.status();
    local_ = local->release();
  }
  static void TearDownTestSuite() {
    delete local_;
    local_ = nullptr;
  }

  void TearDown() override {
    gateway_.reset();  // before the experts, so no call is left hanging on them
    for (auto& [name, process] : experts_) {
      if (process->running()) {
        const int status = process->Kill(SIGTERM);
        EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
            << "expert " << name << " did not exit cleanly: wait status " << status;
      }
    }
  }

  // Starts one switchyard-expert per entry of `replicas` (expert -> number of
  // replica processes) and an in-process gateway over them.
  void StartCluster(const std::map<int, int>& replicas) {
    std::string spec;
    for (int e = 0; e < kExperts; ++e) {
      const int n = replicas.count(e) ? replicas.at(e) : 1;
      spec += std::to_string(e) + "=";
      for (int r = 0; r < n; ++r) {
        const std::string name = absl::StrCat(e, r == 0 ? "" : absl::StrCat("-", r));
        auto process = std::make_unique<ServerProcess>();
        auto address = process->Start(faults::ExpertArgv(std::to_string(e), "127.0.0.1:0"));
        ASSERT_TRUE(address.ok()) << address.status();
        addresses_[name] = *address;
        experts_[name] = std::move(process);
        spec += (r == 0 ? "" : "|") + *address;
      }
      spec += ";";
    }
    GatewayOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.experts = spec;
    options.expert_timeout_ms = kExpertTimeoutMs;
    auto gateway = Gateway::Start(options);
    ASSERT_TRUE(gateway.ok()) << gateway.status();
    gateway_ = *std::move(gateway);
    channel_ = faults::Dial(gateway_->address());
    std::printf("[ cluster  ] %s\n", spec.c_str());
  }

  // 8 requests of kNewTokens tokens over the reference prompts; two are
  // seeded sampling, the rest greedy.
  static std::vector<v1::GenerateRequest> Requests() {
    const std::vector<std::string> prompts = faults::ReferencePrompts();
    std::vector<v1::GenerateRequest> requests;
    for (int i = 0; i < kStreams; ++i) {
      v1::GenerateRequest r = faults::GreedyRequest(prompts[i % prompts.size()], kNewTokens);
      if (i % 4 == 3) faults::MakeSampled(&r, 7000 + i);
      requests.push_back(r);
    }
    return requests;
  }

  // What each request gives on its own on the healthy local gateway.
  static std::vector<std::vector<int32_t>> SoloTokens(
      const std::vector<v1::GenerateRequest>& requests) {
    auto channel = faults::Dial(local_->address());
    std::vector<std::vector<int32_t>> solo;
    for (const auto& r : requests) {
      faults::UnaryOutcome o = faults::Generate(channel, r);
      EXPECT_TRUE(o.status.ok()) << faults::Describe(o.status);
      solo.push_back(o.tokens);
    }
    return solo;
  }

  std::string GatewayMetricLines(const std::string& prefix, const std::string& contains) {
    return faults::MetricLines(metrics::Serialize(gateway_->metrics_registry()), prefix, contains);
  }

  static Gateway* local_;
  std::unique_ptr<Gateway> gateway_;
  std::shared_ptr<grpc::Channel> channel_;
  std::map<std::string, std::unique_ptr<ServerProcess>> experts_;  // "3", "3-1", ...
  std::map<std::string, std::string> addresses_;
};

Gateway* ReplicaFailoverTest::local_ = nullptr;

TEST_F(ReplicaFailoverTest, KillingOneOfTwoReplicasMidStreamLosesNoRequest) {
  StartCluster({{3, 2}});
  const std::vector<v1::GenerateRequest> requests = Requests();
  const std::vector<std::vector<int32_t>> solo = SoloTokens(requests);

  const auto start = Clock::now();
  ConcurrentStreams streams(channel_, requests, /*min_tokens=*/3);
  ASSERT_TRUE(streams.WaitAllStarted(std::chrono::seconds(60)));
  const int finished_before_kill = streams.finished();
  const int status = experts_.at("3")->Kill(SIGKILL);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
  std::printf("[ fault    ] kill -9 expert 3 replica %s after %.2f s (%d of %d streams done)\n",
              addresses_.at("3").c_str(), faults::SecondsSince(start), finished_before_kill,
              kStreams);
  streams.Join();
  std::printf("[ done     ] all streams ended after %.2f s\n", faults::SecondsSince(start));
  EXPECT_LT(finished_before_kill, kStreams) << "the fault came after every stream had finished";

  for (int i = 0; i < kStreams; ++i) {
    const faults::StreamOutcome& o = streams.outcomes()[i];
    ASSERT_TRUE(o.status.ok()) << "stream " << i << ": " << faults::Describe(o.status);
    EXPECT_EQ(o.tokens.size(), static_cast<size_t>(kNewTokens)) << i;
    EXPECT_EQ(o.finish_reason, v1::FINISH_REASON_LENGTH) << i;
    EXPECT_TRUE(o.has_usage) << i;
    EXPECT_EQ(o.completion_tokens, static_cast<uint32_t>(kNewTokens)) << i;
    EXPECT_EQ(o.tokens, solo[i]) << "stream " << i << " differs from its solo run";
  }
  // The surviving replica keeps serving expert 3.
  faults::UnaryOutcome after = faults::Generate(channel_, requests[0]);
  ASSERT_TRUE(after.status.ok()) << faults::Describe(after.status);
  EXPECT_EQ(after.tokens, solo[0]);
  std::printf(
      "[ metrics  ] expert 3 failed attempts (each retried on the other replica):\n%s",
      GatewayMetricLines("switchyard_gateway_expert_call_errors_total", "expert=\"3\"").c_str());
}

// A rolling restart: SIGTERM to one of two replicas while streams run. It
// finishes the calls it holds and refuses new ones, which go to the other
// replica; it exits 0 and no request notices.
TEST_F(ReplicaFailoverTest, GracefulStopOfOneOfTwoReplicasMidStreamLosesNoRequest) {
  StartCluster({{6, 2}});
  const std::vector<v1::GenerateRequest> requests = Requests();
  const std::vector<std::vector<int32_t>> solo = SoloTokens(requests);

  ConcurrentStreams streams(channel_, requests, /*min_tokens=*/3);
  ASSERT_TRUE(streams.WaitAllStarted(std::chrono::seconds(60)));
  const int finished_before = streams.finished();
  ServerProcess& replica = *experts_.at("6-1");
  replica.Signal(SIGTERM);
  const std::optional<int> status = replica.WaitExit(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value()) << "the replica did not exit";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  streams.Join();
  std::printf("[ fault    ] SIGTERM expert 6 replica %s with %d of %d streams done\n",
              addresses_.at("6-1").c_str(), finished_before, kStreams);
  EXPECT_LT(finished_before, kStreams) << "the fault came after every stream had finished";
  for (int i = 0; i < kStreams; ++i) {
    const faults::StreamOutcome& o = streams.outcomes()[i];
    ASSERT_TRUE(o.status.ok()) << "stream " << i << ": " << faults::Describe(o.status);
    EXPECT_EQ(o.tokens, solo[i]) << "stream " << i << " differs from its solo run";
    EXPECT_EQ(o.finish_reason, v1::FINISH_REASON_LENGTH) << i;
  }
  std::printf(
      "[ metrics  ] expert 6 failed attempts (each retried on the other replica):\n%s",
      GatewayMetricLines("switchyard_gateway_expert_call_errors_total", "expert=\"6\"").c_str());
}

TEST_F(ReplicaFailoverTest, KillingTheOnlyReplicaFailsItsRequestsAndRecoversAfterRestart) {
  constexpr int kVictim = 5;
  StartCluster({});
  const std::vector<v1::GenerateRequest> requests = Requests();
  const std::vector<std::vector<int32_t>> solo = SoloTokens(requests);
  const std::string victim = std::to_string(kVictim);
  const std::string victim_address = addresses_.at(victim);
  const std::vector<std::string> victim_argv = experts_.at(victim)->argv();

  {
    ConcurrentStreams streams(channel_, requests, /*min_tokens=*/3);
    ASSERT_TRUE(streams.WaitAllStarted(std::chrono::seconds(60)));
    const int finished_before_kill = streams.finished();
    const auto kill_time = Clock::now();
    experts_.at(victim)->Kill(SIGKILL);
    streams.Join();
    std::printf(
        "[ fault    ] kill -9 expert %d (%s): %d of %d streams had finished; the rest "
        "ended %.3f s later\n",
        kVictim, victim_address.c_str(), finished_before_kill, kStreams,
        faults::SecondsSince(kill_time));
    int failed = 0;
    for (int i = 0; i < kStreams; ++i) {
      const faults::StreamOutcome& o = streams.outcomes()[i];
      // Whatever was streamed before the failure is right.
      EXPECT_TRUE(faults::IsPrefixOfSolo(o.tokens, solo[i])) << "stream " << i;
      if (o.status.ok()) {  // it finished before the kill reached it
        EXPECT_EQ(o.tokens.size(), static_cast<size_t>(kNewTokens));
        continue;
      }
      ++failed;
      EXPECT_EQ(o.status.error_code(), grpc::StatusCode::UNAVAILABLE) << faults::Describe(o.status);
      EXPECT_TRUE(faults::NamesExpert(o.status.error_message(), kVictim))
          << faults::Describe(o.status);
      EXPECT_EQ(o.finish_reason, v1::FINISH_REASON_UNSPECIFIED);
      if (i == 0) std::printf("[ error    ] %s\n", faults::Describe(o.status).c_str());
    }
    // Only streams with tokens routed to expert 5 after the kill end (see
    // AKilledExpertFailsOnlyTheRequestsRoutedToIt); over 200 tokens every
    // reference prompt's run routes to it, so every stream in flight fails.
    EXPECT_EQ(failed, kStreams - finished_before_kill)
        << "every stream in flight at the kill routes to expert 5, so must fail";
    EXPECT_GT(failed, 0);
  }

  // The gateway process is fine: calls that do not need experts work ...
  auto stub = v1::GenerationService::NewStub(channel_);
  {
    grpc::ClientContext ctx;
    v1::TokenizeRequest request;
    request.set_text("still here");
    v1::TokenizeResponse response;
    const grpc::Status s = stub->Tokenize(&ctx, request, &response);
    ASSERT_TRUE(s.ok()) << faults::Describe(s);
    EXPECT_GT(response.token_ids_size(), 0);
  }
  {
    grpc::ClientContext ctx;
    v1::ModelInfo response;
    const grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &response);
    ASSERT_TRUE(s.ok()) << faults::Describe(s);
  }
  // ... and generation fails fast, naming the missing expert, while it is down.
  for (int i = 0; i < 3; ++i) {
    faults::UnaryOutcome o = faults::Generate(channel_, requests[0], std::chrono::seconds(30));
    ASSERT_EQ(o.status.error_code(), grpc::StatusCode::UNAVAILABLE) << faults::Describe(o.status);
    EXPECT_TRUE(faults::NamesExpert(o.status.error_message(), kVictim))
        << faults::Describe(o.status);
    EXPECT_LT(o.seconds, 5.0) << "a request hung on the missing expert";
    std::printf("[ down     ] request %d failed in %.3f s: %s\n", i, o.seconds,
                faults::Describe(o.status).c_str());
  }

  // Restart it on the same port; the gateway reconnects on its own. Short
  // probes until one succeeds (a client deadline only guards against a hang).
  ASSERT_TRUE(faults::RestartOn(*experts_.at(victim), victim_argv, victim_address).ok());
  v1::GenerateRequest probe = requests[0];
  probe.mutable_stopping()->set_max_new_tokens(8);
  const std::vector<int32_t> probe_solo(solo[0].begin(), solo[0].begin() + 8);
  const faults::Recovery recovery =
      faults::GenerateUntilOk(channel_, probe, 20.0, std::chrono::milliseconds(100));
  EXPECT_TRUE(recovery.unexpected.empty()) << faults::Describe(recovery.unexpected.front());
  const faults::UnaryOutcome& recovered = recovery.last;
  ASSERT_TRUE(recovered.status.ok())
      << "no recovery within 20 s after the restart: " << faults::Describe(recovered.status);
  std::printf("[ recovery ] expert %d back on %s; requests succeed again after %.2f s (%d tries)\n",
              kVictim, victim_address.c_str(), recovery.seconds, recovery.attempts);
  EXPECT_EQ(recovered.tokens, probe_solo);
  faults::UnaryOutcome full = faults::Generate(channel_, requests[0]);
  ASSERT_TRUE(full.status.ok()) << faults::Describe(full.status);
  EXPECT_EQ(full.tokens, solo[0]);

  // Full service again: every request, concurrently, equals its solo run.
  ConcurrentStreams again(channel_, requests, /*min_tokens=*/1);
  again.Join();
  EXPECT_TRUE(faults::AllMatchSolo(again.outcomes(), solo));
  std::printf("[ metrics  ] expert %d failed attempts:\n%s", kVictim,
              GatewayMetricLines("switchyard_gateway_expert_call_errors_total",
                                 absl::StrCat("expert=\"", kVictim, "\""))
                  .c_str());
}

}  // namespace
}  // namespace switchyard

namespace switchyard {
namespace {

// 40 short, distinct prompts (the case): greedy, except every fifth
// seeded sampling.
std::vector<v1::GenerateRequest> FortyRequests(int max_new_tokens) {
  const char* subjects[] = {"The cat",  "A river", "My friend", "The market", "Our team",
                            "The moon", "A robot", "The city",  "Her book",   "The storm"};
  const char* verbs[] = {"sees", "builds", "carries", "remembers"};
  std::vector<v1::GenerateRequest> requests;
  for (int i = 0; i < 40; ++i) {
    v1::GenerateRequest r =
        faults::GreedyRequest(absl::StrCat(subjects[i % 10], " ", verbs[i / 10]), max_new_tokens);
    if (i % 5 == 4) faults::MakeSampled(&r, 9000 + i);
    requests.push_back(r);
  }
  return requests;
}

// Per request: the experts its tokens route to (any layer) over its whole
// run (prompt plus every generated token fed back: the first `fed_tokens` of
// `outputs`), computed in-process on the tiny model.
std::vector<std::set<int>> ExpertsUsed(const std::vector<v1::GenerateRequest>& requests,
                                       const std::vector<std::vector<int32_t>>& outputs,
                                       size_t fed_tokens) {
  auto model = LocalModel::Load(testing::TinyMixtralDir());
  EXPECT_TRUE(model.ok()) << model.status();
  std::vector<std::set<int>> used(requests.size());
  if (!model.ok()) return used;
  for (size_t i = 0; i < requests.size(); ++i) {
    std::vector<int32_t> ids = (*model)->tokenizer().Encode(requests[i].text());
    ids.insert(ids.end(), outputs[i].begin(),
               outputs[i].begin() + std::min(fed_tokens, outputs[i].size()));
    auto kv = (*model)->kv_pool().NewSequence();
    StepInput in{kv.get(), ids, LogitsWanted::kNone};
    StepTrace trace;
    auto out = (*model)->runner().Step({&in, 1}, &trace);
    EXPECT_TRUE(out.ok()) << out.status();
    for (const Routing& r : trace.routing) used[i].insert(r.experts.begin(), r.experts.end());
  }
  return used;
}

// The only replica of an expert dies while 40 streams are generating. Only
// the streams with tokens routed to it after that end, with UNAVAILABLE
// naming the expert and its address, having streamed the start of their solo
// run; every stream whose whole run avoids the expert completes with its solo
// run's tokens. Then the exact case: 40 one-token requests together
// succeed for exactly the requests that succeed one at a time (and that the
// routing says avoid the expert).
TEST_F(ReplicaFailoverTest, AKilledExpertFailsOnlyTheRequestsRoutedToIt) {
  constexpr int kTokens = 12;
  const std::vector<v1::GenerateRequest> requests = FortyRequests(kTokens);
  const std::vector<v1::GenerateRequest> one_token = FortyRequests(1);
  const std::vector<std::vector<int32_t>> solo = SoloTokens(requests);
  const size_t n = requests.size();
  // Every prompt starts with BOS, so the experts BOS routes to serve every
  // request: the victim is the expert that the most whole runs avoid, among
  // those that some but not all one-token requests avoid.
  const std::vector<std::set<int>> used = ExpertsUsed(requests, solo, kTokens - 1);
  const std::vector<std::set<int>> used_one = ExpertsUsed(one_token, solo, 0);
  int victim = -1;
  size_t best = 0;
  for (int e = 0; e < kExperts; ++e) {
    size_t avoid = 0, avoid_one = 0;
    for (size_t i = 0; i < n; ++i) {
      avoid += used[i].count(e) == 0;
      avoid_one += used_one[i].count(e) == 0;
    }
    if (avoid_one > 0 && avoid_one < n && avoid > best) victim = e, best = avoid;
  }
  ASSERT_GE(victim, 0) << "no expert is avoided by some requests and used by others";

  StartCluster({});
  const std::string victim_address = addresses_.at(std::to_string(victim));
  ConcurrentStreams streams(channel_, requests, /*min_tokens=*/2);
  ASSERT_TRUE(streams.WaitAllStarted(std::chrono::seconds(60)));
  const int finished_before_kill = streams.finished();
  const int status = experts_.at(std::to_string(victim))->Kill(SIGKILL);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
  streams.Join();

  int failed = 0, avoiding = 0;
  for (size_t i = 0; i < n; ++i) {
    const faults::StreamOutcome& o = streams.outcomes()[i];
    const bool avoids_victim = used[i].count(victim) == 0;
    EXPECT_TRUE(faults::IsPrefixOfSolo(o.tokens, solo[i])) << "stream " << i;
    if (avoids_victim) ++avoiding;
    if (o.status.ok()) {
      EXPECT_EQ(o.tokens, solo[i]) << "stream " << i << " differs from its solo run";
      continue;
    }
    ++failed;
    EXPECT_FALSE(avoids_victim) << "stream " << i << " never routes to expert " << victim
                                << " but failed: " << faults::Describe(o.status);
    EXPECT_EQ(o.status.error_code(), grpc::StatusCode::UNAVAILABLE) << faults::Describe(o.status);
    EXPECT_TRUE(faults::NamesExpert(o.status.error_message(), victim))
        << faults::Describe(o.status);
    EXPECT_NE(o.status.error_message().find(victim_address), std::string::npos)
        << "the error does not name the expert's address " << victim_address << ": "
        << faults::Describe(o.status);
    if (failed == 1) std::printf("[ error    ] %s\n", faults::Describe(o.status).c_str());
  }
  std::printf(
      "[ fault    ] kill -9 expert %d (%s) with %d of %zu streams done: %d failed, %zu "
      "completed; %d of the %zu never route to it\n",
      victim, victim_address.c_str(), finished_before_kill, n, failed, n - failed, avoiding, n);
  EXPECT_GT(failed, 0) << "the kill reached no stream";
  // More streams avoid the expert than had finished, so some were in flight.
  EXPECT_GT(avoiding, finished_before_kill) << "no stream in flight at the kill avoids the "
                                               "expert: the test shows nothing";

  // The case: 40 one-token requests with the expert down.
  std::set<size_t> alone_ok, predicted_ok;
  for (size_t i = 0; i < n; ++i) {
    if (used_one[i].count(victim) == 0) predicted_ok.insert(i);
    faults::UnaryOutcome o = faults::Generate(channel_, one_token[i], std::chrono::seconds(30));
    if (o.status.ok()) alone_ok.insert(i);
  }
  EXPECT_EQ(alone_ok, predicted_ok)
      << "one at a time, exactly the requests that avoid expert " << victim << " succeed";
  ConcurrentStreams together(channel_, one_token, /*min_tokens=*/1);
  together.Join();
  std::set<size_t> together_ok;
  for (size_t i = 0; i < n; ++i) {
    const faults::StreamOutcome& o = together.outcomes()[i];
    if (o.status.ok()) {
      together_ok.insert(i);
      EXPECT_EQ(o.tokens, std::vector<int32_t>(solo[i].begin(), solo[i].begin() + 1)) << i;
    } else {
      EXPECT_EQ(o.status.error_code(), grpc::StatusCode::UNAVAILABLE) << faults::Describe(o.status);
      EXPECT_TRUE(faults::NamesExpert(o.status.error_message(), victim))
          << faults::Describe(o.status);
    }
  }
  std::printf(
      "[ contain  ] one-token requests with expert %d down: %zu of %zu succeed alone, %zu "
      "together\n",
      victim, alone_ok.size(), n, together_ok.size());
  EXPECT_EQ(together_ok, alone_ok);
  EXPECT_GT(alone_ok.size(), 0u);
  EXPECT_LT(alone_ok.size(), n);
}

}  // namespace
}  // namespace switchyard
