// The split cluster: a gateway with one real switchyard-expert process per
// expert over loopback TCP gives the same greedy tokens as in-process experts
// and as Hugging Face; the metrics of gateway and experts agree on the
// routed tokens and pass promtool; the per-hop timing splits each expert
// call's duration; two gateways share one expert pool under load.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <latch>
#include <map>
#include <memory>
#include <mutex>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gateway/gateway_server.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/faults/fault_util.h"
#include "tests/http_util.h"
#include "tests/process_util.h"
#include "tests/test_util.h"

namespace switchyard {
namespace {

constexpr int kExperts = 8;

// Sum of a counter's series whose labels match `label_filter` (regex on the
// label text), from Prometheus text.
double SumSeries(const std::string& text, const std::string& name,
                 const std::string& label_filter) {
  double sum = 0;
  std::istringstream in(text);
  std::string line;
  const std::regex re("^" + name + "\\{([^}]*)\\} (\\S+)$");
  const std::regex filter(label_filter);
  while (std::getline(in, line)) {
    std::smatch m;
    if (std::regex_match(line, m, re) && std::regex_search(m[1].str(), filter)) {
      sum += std::stod(m[2].str());
    }
  }
  return sum;
}

bool PromtoolAccepts(const std::string& text, std::string* output) {
  const std::string path = ::testing::TempDir() + "/metrics.txt";
  std::ofstream(path) << text;
  FILE* p = popen(("promtool check metrics < " + path + " 2>&1").c_str(), "r");
  if (p == nullptr) return false;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) output->append(buf, n);
  return pclose(p) == 0;
}

class ClusterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string spec;
    for (int e = 0; e < kExperts; ++e) {
      experts_[e] = new testing::ChildProcess();
      auto line =
          experts_[e]->Start({testing::BinaryDir() + "/switchyard-expert", "--model",
                              testing::TinyMixtralDir(), "--experts", std::to_string(e), "--listen",
                              "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"});
      ASSERT_TRUE(line.ok()) << line.status();
      expert_addresses_[e] = *line;
      expert_metrics_[e] = experts_[e]->Field("metrics");
      ASSERT_FALSE(expert_metrics_[e].empty());
      spec += std::to_string(e) + "=" + *line + ";";
    }
    expert_spec_ = spec;
    GatewayOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.experts = spec;
    options.metrics_listen = "127.0.0.1:0";
    auto split = Gateway::Start(options);
    ASSERT_TRUE(split.ok()) << split.status();
    split_ = split->release();
    options.experts = "local";
    options.metrics_listen = "";
    auto local = Gateway::Start(options);
    ASSERT_TRUE(local.ok()) << local.status();
    local_ = local->release();
  }
  static void TearDownTestSuite() {
    delete split_;
    delete local_;
    for (auto* e : experts_) {
      if (e != nullptr) {
        EXPECT_EQ(e->Kill(SIGTERM), 0) << "expert did not exit cleanly";
      }
      delete e;
    }
  }

  static std::string ExpertMetrics(int e) {
    return testing::HttpGetBody(expert_metrics_[e], "/metrics");
  }

  static v1::GenerateResponse Generate(Gateway* gateway, const v1::GenerateRequest& request) {
    auto stub = v1::GenerationService::NewStub(
        grpc::CreateChannel(gateway->address(), grpc::InsecureChannelCredentials()));
    v1::GenerateResponse response;
    grpc::ClientContext ctx;
    grpc::Status status = stub->Generate(&ctx, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  static Gateway* split_;
  static Gateway* local_;
  static testing::ChildProcess* experts_[kExperts];
  static std::string expert_addresses_[kExperts];
  static std::string expert_metrics_[kExperts];
  static std::string expert_spec_;  // the --experts spec of split_
};

Gateway* ClusterTest::split_ = nullptr;
Gateway* ClusterTest::local_ = nullptr;
testing::ChildProcess* ClusterTest::experts_[kExperts] = {};
std::string ClusterTest::expert_addresses_[kExperts];
std::string ClusterTest::expert_metrics_[kExperts];
std::string ClusterTest::expert_spec_;

TEST_F(ClusterTest, SplitEqualsLocalEqualsHuggingFace) {
  const nlohmann::json reference =
      nlohmann::json::parse(testing::ReadAll(testing::TinyMixtralDir() + "/reference.json"));
  for (const auto& p : reference["prompts"]) {
    v1::GenerateRequest request;
    request.mutable_token_ids()->mutable_ids()->Add(p["input_ids"].begin(), p["input_ids"].end());
    request.mutable_stopping()->set_max_new_tokens(24);
    request.mutable_stopping()->set_ignore_eos(true);
    const v1::GenerateResponse split = Generate(split_, request);
    const v1::GenerateResponse local = Generate(local_, request);
    const std::vector<int32_t> split_ids(split.token_ids().begin(), split.token_ids().end());
    const std::vector<int32_t> local_ids(local.token_ids().begin(), local.token_ids().end());
    EXPECT_EQ(split_ids, p["greedy_new_ids"].get<std::vector<int32_t>>());
    EXPECT_EQ(split_ids, local_ids);
    EXPECT_EQ(split.text(), local.text());
  }
}

// Experts named by dns:/// targets, as in Kubernetes: the gateway resolves
// them itself (--expert-dns-refresh-ms, on by default), so each address is a
// replica of its own; with 0 the names stay with gRPC. Both give the local
// tokens.
TEST_F(ClusterTest, DnsTargetsAreResolvedByTheGatewayUnlessTurnedOff) {
  std::string spec;
  for (int e = 0; e < kExperts; ++e) {
    spec += std::to_string(e) + "=dns:///" + expert_addresses_[e] + ";";
  }
  v1::GenerateRequest request;
  request.set_text("Mixture of experts routes every token to");
  request.mutable_stopping()->set_max_new_tokens(12);
  request.mutable_stopping()->set_ignore_eos(true);
  const v1::GenerateResponse local = Generate(local_, request);
  for (int refresh_ms : {5000, 0}) {
    SCOPED_TRACE(refresh_ms);
    GatewayOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.experts = spec;
    options.expert_dns_refresh_ms = refresh_ms;
    auto gateway = Gateway::Start(options);
    ASSERT_TRUE(gateway.ok()) << gateway.status();
    const v1::GenerateResponse r = Generate(gateway->get(), request);
    EXPECT_EQ(std::vector<int32_t>(r.token_ids().begin(), r.token_ids().end()),
              std::vector<int32_t>(local.token_ids().begin(), local.token_ids().end()));
    auto stub = v1::GenerationService::NewStub(
        grpc::CreateChannel((*gateway)->address(), grpc::InsecureChannelCredentials()));
    v1::ModelInfo info;
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
    ASSERT_EQ(info.experts_size(), kExperts);
    for (const v1::ExpertRoute& route : info.experts()) {
      const std::string& address = expert_addresses_[route.expert()];
      EXPECT_EQ(route.target(), refresh_ms > 0 ? address : "dns:///" + address);
    }
  }
}

// An address in the answers that does not serve (a pod going away): the
// gateway starts on the names as gRPC resolves them, and moves to one
// replica per address once every address answers.
TEST_F(ClusterTest, AnAddressThatDoesNotAnswerLeavesTheNamesToGrpcUntilItGoes) {
  std::mutex mu;
  bool with_dead_pod = true;  // guarded by mu
  GatewayOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.expert_connect_timeout_ms = 1000;
  options.expert_dns_refresh_ms = 100;
  options.expert_target_resolver = [&](const std::string& host,
                                       int port) -> absl::StatusOr<std::vector<std::string>> {
    std::lock_guard<std::mutex> lock(mu);
    std::vector<std::string> out = {host + ":" + std::to_string(port)};
    if (with_dead_pod) out.push_back("127.0.0.1:1");  // refuses connections
    return out;
  };
  options.experts.clear();  // "local" by default
  for (int e = 0; e < kExperts; ++e) {
    options.experts += std::to_string(e) + "=dns:///" + expert_addresses_[e] + ";";
  }
  auto gateway = Gateway::Start(options);
  ASSERT_TRUE(gateway.ok()) << gateway.status();
  auto routes = [&] {
    auto stub = v1::GenerationService::NewStub(
        grpc::CreateChannel((*gateway)->address(), grpc::InsecureChannelCredentials()));
    v1::ModelInfo info;
    grpc::ClientContext ctx;
    EXPECT_TRUE(stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
    std::string out;
    for (const v1::ExpertRoute& route : info.experts()) out += route.target() + ";";
    return out;
  };
  std::string names, addresses;
  for (int e = 0; e < kExperts; ++e) {
    names += "dns:///" + expert_addresses_[e] + ";";
    addresses += expert_addresses_[e] + ";";
  }
  EXPECT_EQ(routes(), names);
  v1::GenerateRequest request;
  request.set_text("Mixture of experts routes every token to");
  request.mutable_stopping()->set_max_new_tokens(8);
  request.mutable_stopping()->set_ignore_eos(true);
  const v1::GenerateResponse local = Generate(local_, request);
  const v1::GenerateResponse before = Generate(gateway->get(), request);
  EXPECT_EQ(before.text(), local.text());
  {
    std::lock_guard<std::mutex> lock(mu);
    with_dead_pod = false;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (routes() != addresses && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(routes(), addresses);
  const v1::GenerateResponse after = Generate(gateway->get(), request);
  EXPECT_EQ(after.text(), local.text());
}

TEST_F(ClusterTest, RoutedTokensOnTheGatewayEqualWhatExpertsCounted) {
  const std::string before_gateway = testing::HttpGetBody(split_->metrics_address(), "/metrics");
  std::vector<double> expert_before(kExperts);
  for (int e = 0; e < kExperts; ++e) {
    expert_before[e] = SumSeries(ExpertMetrics(e), "switchyard_expert_tokens_total", "");
  }
  v1::GenerateRequest request;
  request.set_text("Mixture of experts routes every token to");
  request.mutable_stopping()->set_max_new_tokens(10);
  request.mutable_stopping()->set_ignore_eos(true);
  const v1::GenerateResponse r = Generate(split_, request);
  ASSERT_EQ(r.token_ids_size(), 10);

  const std::string gateway = testing::HttpGetBody(split_->metrics_address(), "/metrics");
  double gateway_total = 0;
  for (int e = 0; e < kExperts; ++e) {
    const std::string label = "expert=\"" + std::to_string(e) + "\"";
    const double routed =
        SumSeries(gateway, "switchyard_gateway_routed_tokens_total", label) -
        SumSeries(before_gateway, "switchyard_gateway_routed_tokens_total", label);
    const double counted =
        SumSeries(ExpertMetrics(e), "switchyard_expert_tokens_total", "") - expert_before[e];
    EXPECT_EQ(routed, counted) << "expert " << e;
    gateway_total += routed;
  }
  // Every token that goes through the model visits K experts in each of L
  // layers. The last generated token is sampled but never fed back, so the
  // model saw prompt + generated - 1 tokens.
  const int K = 2, L = 2;
  const double fed = r.usage().prompt_tokens() + r.usage().completion_tokens() - 1;
  EXPECT_EQ(gateway_total, fed * K * L);
  std::printf(
      "[ metrics ] %g token-expert pairs routed = (%u prompt + %u generated - 1) x %d x %d\n",
      gateway_total, r.usage().prompt_tokens(), r.usage().completion_tokens(), K, L);
}

// The per-hop histograms: one observation per successful expert call, each
// part >= 0, and network + queue + compute adds up to the call duration the
// gateway measured (the same reading; rounding slack only).
TEST_F(ClusterTest, PerHopTimingSplitsEachExpertCallsDuration) {
  auto series = [](const std::string& text, const std::string& metric, const std::string& suffix,
                   int e) {
    return SumSeries(text, "switchyard_gateway_expert_" + metric + suffix,
                     "expert=\"" + std::to_string(e) + "\"");
  };
  const char* kParts[] = {"network_seconds", "queue_seconds", "compute_seconds"};
  const std::string before = testing::HttpGetBody(split_->metrics_address(), "/metrics");
  v1::GenerateRequest request;
  request.set_text("Per-hop timing splits every expert call into");
  request.mutable_stopping()->set_max_new_tokens(8);
  request.mutable_stopping()->set_ignore_eos(true);
  for (int i = 0; i < 2; ++i) ASSERT_EQ(Generate(split_, request).token_ids_size(), 8);
  const std::string after = testing::HttpGetBody(split_->metrics_address(), "/metrics");

  double total_calls = 0;
  int called_experts = 0;
  for (int e = 0; e < kExperts; ++e) {
    const double calls = series(after, "call_duration_seconds", "_count", e) -
                         series(before, "call_duration_seconds", "_count", e);
    const double call_seconds = series(after, "call_duration_seconds", "_sum", e) -
                                series(before, "call_duration_seconds", "_sum", e);
    const double errors = SumSeries(after, "switchyard_gateway_expert_call_errors_total",
                                    "expert=\"" + std::to_string(e) + "\"") -
                          SumSeries(before, "switchyard_gateway_expert_call_errors_total",
                                    "expert=\"" + std::to_string(e) + "\"");
    ASSERT_EQ(errors, 0) << "expert " << e;
    total_calls += calls;
    if (calls > 0) ++called_experts;
    double parts_seconds = 0;
    double part_seconds[3];
    for (int k = 0; k < 3; ++k) {
      // Every expert's series exists from the start, called or not.
      EXPECT_NE(after.find("switchyard_gateway_expert_" + std::string(kParts[k]) +
                           "_count{expert=\"" + std::to_string(e) + "\"}"),
                std::string::npos)
          << kParts[k] << " expert " << e;
      const double count =
          series(after, kParts[k], "_count", e) - series(before, kParts[k], "_count", e);
      EXPECT_EQ(count, calls) << kParts[k] << " expert " << e;
      part_seconds[k] = series(after, kParts[k], "_sum", e) - series(before, kParts[k], "_sum", e);
      EXPECT_GE(part_seconds[k], 0) << kParts[k] << " expert " << e;
      parts_seconds += part_seconds[k];
    }
    // Per call, network = round trip - queue - compute unless the shard
    // reports more than the round trip; microsecond rounding of the three
    // parts gives at most ~1 us per call of slack.
    const double slack = 2e-6 * calls + 1e-9;
    EXPECT_LE(parts_seconds, call_seconds + slack) << "expert " << e;
    EXPECT_GE(parts_seconds, call_seconds - slack) << "expert " << e;
    if (calls > 0) {
      // The shard really did report compute time.
      EXPECT_GT(part_seconds[2], 0) << "expert " << e;
      std::printf(
          "[ hop ] expert %d: %g calls, mean call %.1f us = network %.1f + queue %.1f + "
          "compute %.1f us\n",
          e, calls, 1e6 * call_seconds / calls, 1e6 * part_seconds[0] / calls,
          1e6 * part_seconds[1] / calls, 1e6 * part_seconds[2] / calls);
    }
  }
  // 2 generations of a prompt through 2 layers: every layer calls at least
  // one expert per step, so there are many calls and at least K experts.
  EXPECT_GE(called_experts, 2);
  EXPECT_GE(total_calls, 2 * 8 * 2);
}

// switchyard_gateway_expert_calls_total{expert, transport} counts every
// call by the way it went: frames by default, ForwardStream messages with
// --expert-transport grpc, unary calls for dns:/// names left to gRPC
// (--expert-dns-refresh-ms 0). Each gateway's calls are all on one
// transport, as many as its call-duration histogram counted; every
// (expert, transport) series exists from the start.
TEST_F(ClusterTest, ExpertCallsAreCountedByTheTransportTheyWentOn) {
  std::string dns_spec;
  for (int e = 0; e < kExperts; ++e) {
    dns_spec += std::to_string(e) + "=dns:///" + expert_addresses_[e] + ";";
  }
  struct Case {
    const char* transport;
    bool frames;
    std::string experts;
    int dns_refresh_ms;
  };
  const Case cases[] = {{"frames", true, expert_spec_, 5000},
                        {"stream", false, expert_spec_, 5000},
                        {"unary", true, dns_spec, 0}};
  v1::GenerateRequest request;
  request.set_text("Every expert call goes on one of three transports");
  request.mutable_stopping()->set_max_new_tokens(6);
  request.mutable_stopping()->set_ignore_eos(true);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.transport);
    GatewayOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.experts = c.experts;
    options.expert_frames = c.frames;
    options.expert_dns_refresh_ms = c.dns_refresh_ms;
    options.metrics_listen = "127.0.0.1:0";
    auto gateway = Gateway::Start(options);
    ASSERT_TRUE(gateway.ok()) << gateway.status();
    ASSERT_EQ(Generate(gateway->get(), request).token_ids_size(), 6);
    const std::string text = testing::HttpGetBody((*gateway)->metrics_address(), "/metrics");
    const double calls =
        SumSeries(text, "switchyard_gateway_expert_call_duration_seconds_count", "");
    EXPECT_GE(calls, 2 * 6);
    for (const char* transport : {"frames", "stream", "unary"}) {
      const std::string label = std::string("transport=\"") + transport + "\"";
      const double counted = SumSeries(text, "switchyard_gateway_expert_calls_total", label);
      EXPECT_EQ(counted, transport == std::string(c.transport) ? calls : 0) << transport;
      for (int e = 0; e < kExperts; ++e) {
        EXPECT_NE(text.find("switchyard_gateway_expert_calls_total{expert=\"" + std::to_string(e) +
                            "\"," + label + "}"),
                  std::string::npos)
            << transport << " expert " << e;
      }
    }
    std::printf("[ transport ] %s: %g calls\n", c.transport, calls);
  }
}

// `switchyard bench --metrics` prints the run's per-hop breakdown: one row
// per called expert and an "all" row whose call count is the number of
// expert calls the gateway counted during the run.
TEST_F(ClusterTest, BenchPrintsThePerHopBreakdown) {
  const std::string before = testing::HttpGetBody(split_->metrics_address(), "/metrics");
  const std::string command = testing::BinaryDir() + "/switchyard bench --server " +
                              split_->address() + " --concurrency 2 --requests 4 " +
                              "--prompt-tokens 8 --output-tokens 4 --json --metrics " +
                              split_->metrics_address() + " 2>&1";
  FILE* p = popen(command.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string output;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) output.append(buf, n);
  ASSERT_EQ(pclose(p), 0) << output;
  const std::string after = testing::HttpGetBody(split_->metrics_address(), "/metrics");
  const nlohmann::json out = nlohmann::json::parse(output);
  ASSERT_TRUE(out.contains("expert_hops")) << output;
  const nlohmann::json& hops = out["expert_hops"];
  const double calls =
      SumSeries(after, "switchyard_gateway_expert_call_duration_seconds_count", "") -
      SumSeries(before, "switchyard_gateway_expert_call_duration_seconds_count", "");
  ASSERT_GT(calls, 0);
  EXPECT_EQ(hops["all"]["calls"].get<double>(), calls) << output;
  double per_expert_calls = 0;
  for (const auto& [name, row] : hops.items()) {
    for (const char* part : {"network_us", "queue_us", "compute_us"}) {
      EXPECT_GE(row[part]["mean"].get<double>(), 0) << name << " " << part;
      EXPECT_GE(row[part]["p50"].get<double>(), 0) << name << " " << part;
      EXPECT_GE(row[part]["p99"].get<double>(), row[part]["p50"].get<double>())
          << name << " " << part;
    }
    if (name != "all") per_expert_calls += row["calls"].get<double>();
  }
  EXPECT_EQ(per_expert_calls, calls);
  std::printf("[ bench ] %s\n", hops["all"].dump().c_str());
}

// Several gateways, one expert pool: a second gateway over the same eight
// expert processes, and 8 concurrent greedy streams on each gateway at once.
// Every stream completes with exactly its solo run's tokens, every expert
// served tokens for both gateways, and what the experts counted is what the
// two gateways routed together.
TEST_F(ClusterTest, TwoGatewaysShareOneExpertPoolUnderLoad) {
  GatewayOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.experts = expert_spec_;
  options.metrics_listen = "127.0.0.1:0";
  auto second_or = Gateway::Start(options);
  ASSERT_TRUE(second_or.ok()) << second_or.status();
  std::unique_ptr<Gateway> second = std::move(*second_or);
  Gateway* gateways[2] = {split_, second.get()};

  constexpr int kPerGateway = 8;
  constexpr int kNewTokens = 16;
  constexpr int kStreams = 2 * kPerGateway;
  std::vector<v1::GenerateRequest> requests;
  for (int i = 0; i < kStreams; ++i) {
    requests.push_back(faults::GreedyRequest("Request " + std::to_string(i) + " of gateway " +
                                                 std::to_string(i % 2) +
                                                 ": the shared experts of layer one say that",
                                             kNewTokens));
  }

  // Solo runs: each request alone on the first gateway.
  const auto first_channel = faults::Dial(split_->address());
  std::vector<std::vector<int32_t>> solo(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    const faults::StreamOutcome o =
        faults::Stream(first_channel, requests[i], nullptr, std::chrono::seconds(60));
    ASSERT_TRUE(o.status.ok()) << "solo " << i << ": " << faults::Describe(o.status);
    ASSERT_EQ(o.tokens.size(), static_cast<size_t>(kNewTokens)) << "solo " << i;
    solo[i] = o.tokens;
  }

  std::string gateway_before[2];
  for (int g = 0; g < 2; ++g) {
    gateway_before[g] = testing::HttpGetBody(gateways[g]->metrics_address(), "/metrics");
  }
  std::vector<std::string> expert_before(kExperts);
  for (int e = 0; e < kExperts; ++e) expert_before[e] = ExpertMetrics(e);

  // Load: stream i goes to gateway i % 2; all 16 calls are released together
  // (one channel per stream, each with its own deadline).
  std::vector<faults::StreamOutcome> outcomes(kStreams);
  std::vector<double> first_token_s(kStreams, -1), end_s(kStreams, -1);
  {
    std::latch go(kStreams);
    std::vector<std::thread> threads;
    const auto start = faults::Clock::now();
    for (int i = 0; i < kStreams; ++i) {
      threads.emplace_back([&, i] {
        const auto channel = faults::Dial(gateways[i % 2]->address());
        go.arrive_and_wait();
        outcomes[i] = faults::Stream(
            channel, requests[i],
            [&](size_t tokens) {
              if (first_token_s[i] < 0 && tokens > 0)
                first_token_s[i] = faults::SecondsSince(start);
            },
            std::chrono::seconds(120));
        end_s[i] = faults::SecondsSince(start);
      });
    }
    for (auto& t : threads) t.join();
  }
  // For information: how much the streams overlapped in time.
  std::printf(
      "[ two gateways ] %d streams: last first token at %.0f ms, first stream ended at %.0f ms, "
      "last at %.0f ms\n",
      kStreams, 1e3 * *std::max_element(first_token_s.begin(), first_token_s.end()),
      1e3 * *std::min_element(end_s.begin(), end_s.end()),
      1e3 * *std::max_element(end_s.begin(), end_s.end()));
  EXPECT_TRUE(faults::AllMatchSolo(outcomes, solo));
  for (int i = 0; i < kStreams; ++i) {
    EXPECT_EQ(outcomes[i].finish_reason, v1::FINISH_REASON_LENGTH) << "stream " << i;
  }

  std::string gateway_after[2];
  for (int g = 0; g < 2; ++g) {
    gateway_after[g] = testing::HttpGetBody(gateways[g]->metrics_address(), "/metrics");
    EXPECT_EQ(SumSeries(gateway_after[g], "switchyard_gateway_expert_call_errors_total", "") -
                  SumSeries(gateway_before[g], "switchyard_gateway_expert_call_errors_total", ""),
              0)
        << "gateway " << g;
  }
  for (int e = 0; e < kExperts; ++e) {
    const std::string label = "expert=\"" + std::to_string(e) + "\"";
    auto gateway_delta = [&](int g, const std::string& name) {
      return SumSeries(gateway_after[g], name, label) - SumSeries(gateway_before[g], name, label);
    };
    double routed[2], calls[2];
    for (int g = 0; g < 2; ++g) {
      routed[g] = gateway_delta(g, "switchyard_gateway_routed_tokens_total");
      calls[g] = gateway_delta(g, "switchyard_gateway_expert_call_duration_seconds_count");
      EXPECT_GT(calls[g], 0) << "expert " << e << " served no call of gateway " << g;
      EXPECT_GT(routed[g], 0) << "expert " << e << " served no token of gateway " << g;
    }
    const std::string expert_after = ExpertMetrics(e);
    auto expert_delta = [&](const std::string& name) {
      return SumSeries(expert_after, name, "") - SumSeries(expert_before[e], name, "");
    };
    // What the expert process counted is what the two gateways sent it.
    EXPECT_EQ(expert_delta("switchyard_expert_tokens_total"), routed[0] + routed[1])
        << "expert " << e;
    EXPECT_EQ(expert_delta("switchyard_expert_calls_total"), calls[0] + calls[1]) << "expert " << e;
    std::printf(
        "[ two gateways ] expert %d: %g tokens in %g calls from gateway 0, %g tokens in %g calls "
        "from gateway 1\n",
        e, routed[0], calls[0], routed[1], calls[1]);
  }
}

TEST_F(ClusterTest, PromtoolAcceptsEveryProcesssMetrics) {
  std::string output;
  const std::string gateway = testing::HttpGetBody(split_->metrics_address(), "/metrics");
  ASSERT_FALSE(gateway.empty());
  EXPECT_TRUE(PromtoolAccepts(gateway, &output)) << output;
  for (int e = 0; e < kExperts; ++e) {
    const std::string text = ExpertMetrics(e);
    ASSERT_FALSE(text.empty()) << "expert " << e;
    output.clear();
    EXPECT_TRUE(PromtoolAccepts(text, &output)) << "expert " << e << ": " << output;
  }
}

}  // namespace
}  // namespace switchyard
