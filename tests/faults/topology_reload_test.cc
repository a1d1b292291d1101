// Replicas that join and leave a running gateway (issue #17, item 1), with
// real switchyard-expert processes and a gateway started with
// `--experts @FILE`: while 16 greedy streams generate, the file gains a
// second replica of expert 3, then loses the original one, then (refused)
// maps expert 3 to no replica at all. Every stream must equal its solo run
// on a gateway with in-process experts, none may fail, the added replica
// must serve calls and the removed one must get none after the change.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "gateway/gateway_server.h"
#include "gtest/gtest.h"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/faults/fault_util.h"
#include "tests/http_util.h"

namespace switchyard {
namespace {

using faults::Clock;
using faults::ConcurrentStreams;
using faults::ServerProcess;

constexpr int kExperts = 8;
constexpr int kHot = 3;  // the expert whose replicas change
constexpr int kStreams = 16;
constexpr int kNewTokens = 160;

// Writes `experts` (expert -> targets) as a topology file, atomically (a
// rename), as `switchyard up` writes its endpoints file.
void WriteTopology(const std::string& path,
                   const std::map<int, std::vector<std::string>>& experts) {
  nlohmann::json j;
  j["experts"] = nlohmann::json::object();
  for (const auto& [e, targets] : experts) j["experts"][std::to_string(e)] = targets;
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump(2) << "\n";
  }
  std::filesystem::rename(tmp, path);
}

// Sum of a counter's series in Prometheus text.
double SumCounter(const std::string& text, const std::string& name) {
  double sum = 0;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name, 0) != 0) continue;
    const std::string rest = line.substr(name.size());
    if (rest.empty() || (rest[0] != '{' && rest[0] != ' ')) continue;
    double v = 0;
    if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) sum += v;
  }
  return sum;
}

class TopologyReloadTest : public ::testing::Test {
 protected:
  void TearDown() override {
    gateway_.reset();
    for (auto& [name, process] : experts_) {
      if (process->running()) {
        const int status = process->Kill(SIGTERM);
        EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
            << "expert " << name << " did not exit cleanly: wait status " << status;
      }
    }
    std::filesystem::remove_all(dir_);
  }

  // Starts an expert process serving `experts` with /metrics; returns its address.
  std::string StartExpert(const std::string& name, const std::string& experts) {
    auto process = std::make_unique<ServerProcess>();
    auto address = process->Start(
        faults::ExpertArgv(experts, "127.0.0.1:0", {"--metrics-listen", "127.0.0.1:0"}));
    EXPECT_TRUE(address.ok()) << address.status();
    metrics_[name] = process->Field("metrics");
    experts_[name] = std::move(process);
    return address.ok() ? *address : "";
  }

  // Forward calls the expert process `name` has served.
  double ExpertCalls(const std::string& name) {
    return SumCounter(testing::HttpGetBody(metrics_.at(name), "/metrics"),
                      "switchyard_expert_calls_total");
  }

  // The gateway's replica gauge of `expert`.
  double ReplicaGauge(int expert) {
    const std::string lines = faults::MetricLines(metrics::Serialize(gateway_->metrics_registry()),
                                                  "switchyard_gateway_expert_replicas",
                                                  "expert=\"" + std::to_string(expert) + "\"");
    double v = -1;
    if (!lines.empty()) {
      std::string first = lines.substr(0, lines.find('\n'));
      (void)absl::SimpleAtod(first.substr(first.rfind(' ') + 1), &v);
    }
    return v;
  }

  // Waits until the gauge of `expert` reads `want` (the change is live).
  bool WaitForReplicas(int expert, double want) {
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    while (Clock::now() < deadline) {
      if (ReplicaGauge(expert) == want) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  std::string dir_;
  std::unique_ptr<Gateway> gateway_;
  std::map<std::string, std::unique_ptr<ServerProcess>> experts_;
  std::map<std::string, std::string> metrics_;  // name -> metrics address
};

TEST_F(TopologyReloadTest, ReplicasJoinAndLeaveUnderLoadWithoutDroppingARequest) {
  // The reference: every request alone on a gateway with in-process experts.
  std::vector<v1::GenerateRequest> requests;
  const std::vector<std::string> prompts = faults::ReferencePrompts();
  for (int i = 0; i < kStreams; ++i) {
    std::string text = prompts[i % prompts.size()];
    for (int k = 0; k < i / static_cast<int>(prompts.size()); ++k) text += " and then";
    requests.push_back(faults::GreedyRequest(text, kNewTokens));
  }
  std::vector<std::vector<int32_t>> solo;
  {
    GatewayOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.experts = "local";
    auto local = Gateway::Start(options);
    ASSERT_TRUE(local.ok()) << local.status();
    auto channel = faults::Dial((*local)->address());
    for (const auto& r : requests) {
      faults::UnaryOutcome o = faults::Generate(channel, r);
      ASSERT_TRUE(o.status.ok()) << faults::Describe(o.status);
      solo.push_back(o.tokens);
    }
  }

  const std::string others = StartExpert("others", "0,1,2,4,5,6,7");
  const std::string original = StartExpert("original", std::to_string(kHot));
  const std::string added = StartExpert("added", std::to_string(kHot));
  ASSERT_FALSE(HasFailure());
  dir_ = testing::MakeTempDir();
  const std::string file = dir_ + "/experts.json";
  std::map<int, std::vector<std::string>> topology;
  for (int e = 0; e < kExperts; ++e) topology[e] = {e == kHot ? original : others};
  WriteTopology(file, topology);

  GatewayOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.experts = "@" + file;
  options.experts_reload_ms = 50;
  auto gateway = Gateway::Start(options);
  ASSERT_TRUE(gateway.ok()) << gateway.status();
  gateway_ = *std::move(gateway);
  ASSERT_EQ(ReplicaGauge(kHot), 1);

  ConcurrentStreams streams(faults::Dial(gateway_->address()), requests, /*min_tokens=*/3);
  ASSERT_TRUE(streams.WaitAllStarted(std::chrono::seconds(60)));
  const auto start = Clock::now();

  // Join: expert 3 gets a second replica, which must take calls.
  topology[kHot] = {original, added};
  WriteTopology(file, topology);
  ASSERT_TRUE(WaitForReplicas(kHot, 2)) << "the added replica never went live";
  const double added_before = ExpertCalls("added");
  const auto join_deadline = Clock::now() + std::chrono::seconds(30);
  while (ExpertCalls("added") == added_before && Clock::now() < join_deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const double added_served = ExpertCalls("added");
  std::printf("[ join     ] +%s live after %.2f s; it served %.0f calls by then\n", added.c_str(),
              faults::SecondsSince(start), added_served);
  EXPECT_GT(added_served, 0) << "the added replica served no call";

  // Leave: the original replica is drained, then gets no new call.
  topology[kHot] = {added};
  WriteTopology(file, topology);
  ASSERT_TRUE(WaitForReplicas(kHot, 1)) << "the removal never went live";
  const int finished_at_removal = streams.finished();
  {
    // GetModelInfo reports the live routes.
    auto stub = v1::GenerationService::NewStub(faults::Dial(gateway_->address()));
    grpc::ClientContext ctx;
    v1::GetModelInfoRequest request;
    v1::ModelInfo info;
    ASSERT_TRUE(stub->GetModelInfo(&ctx, request, &info).ok());
    ASSERT_EQ(info.experts_size(), kExperts);
    EXPECT_EQ(info.experts(kHot).target(), added);
    EXPECT_EQ(info.experts(0).target(), others);
  }
  // Calls picked just before the swap may still be on their way; they finish:
  // until the original has none in flight and its count holds for 250 ms.
  double original_after_drain = ExpertCalls("original");
  for (const auto drain_deadline = Clock::now() + std::chrono::seconds(30);
       Clock::now() < drain_deadline;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    const double now_calls = ExpertCalls("original");
    const double in_flight = SumCounter(testing::HttpGetBody(metrics_.at("original"), "/metrics"),
                                        "switchyard_expert_calls_in_flight");
    if (now_calls == original_after_drain && in_flight == 0) break;
    original_after_drain = now_calls;
  }
  const double added_at_removal = ExpertCalls("added");
  std::printf("[ leave    ] -%s live after %.2f s (%d of %d streams done); it had served %.0f\n",
              original.c_str(), faults::SecondsSince(start), finished_at_removal, kStreams,
              original_after_drain);

  // A file that leaves expert 3 with no replica is refused; nothing changes.
  topology[kHot] = {};
  WriteTopology(file, topology);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(ReplicaGauge(kHot), 1) << "a topology without a replica of expert 3 was applied";

  streams.Join();
  std::printf("[ done     ] all streams ended after %.2f s\n", faults::SecondsSince(start));
  EXPECT_LT(finished_at_removal, kStreams) << "the removal came after every stream had finished";
  for (int i = 0; i < kStreams; ++i) {
    const faults::StreamOutcome& o = streams.outcomes()[i];
    ASSERT_TRUE(o.status.ok()) << "stream " << i << ": " << faults::Describe(o.status);
    EXPECT_EQ(o.finish_reason, v1::FINISH_REASON_LENGTH) << i;
    EXPECT_EQ(o.tokens, solo[i]) << "stream " << i << " differs from its solo run";
  }
  const double original_final = ExpertCalls("original");
  const double added_final = ExpertCalls("added");
  std::printf(
      "[ calls    ] original %.0f (after removal: +%.0f), added %.0f (after removal: +%.0f)\n",
      original_final, original_final - original_after_drain, added_final,
      added_final - added_at_removal);
  EXPECT_EQ(original_final, original_after_drain) << "the removed replica got calls after it left";
  EXPECT_GT(added_final, added_at_removal) << "the remaining replica served nothing after removal";
  // The gateway never retried or failed an expert call along the way.
  EXPECT_EQ(faults::MetricLines(metrics::Serialize(gateway_->metrics_registry()),
                                "switchyard_gateway_expert_call_errors_total", ""),
            "");

  // The removed replica is still up, so the test shows it was drained, not lost.
  EXPECT_TRUE(experts_.at("original")->running());
}

}  // namespace
}  // namespace switchyard
