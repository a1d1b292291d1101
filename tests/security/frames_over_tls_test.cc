// A gateway whose expert calls go on TLS frames (rpc/frame_socket.h): to a
// mutual-TLS shard dialled by address (the same tokens as in-process
// experts; --expert-transport grpc sends none), with requests over the size
// limit on gRPC, and to the pod address of a dns:/// name whose certificate
// names only the Service (and not to a pod whose certificate names
// something else). The socket-level TLS tests: tests/rpc/frame_tls_test.cc.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/model_config.h"
#include "expert_service/expert_process.h"
#include "gateway/gateway_server.h"
#include "gateway/remote_expert_backend.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "rpc/tls.h"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/security/test_gateway.h"
#include "tests/security/test_pki.h"
#include "tests/test_util.h"
#include "tests/tolerances.h"

namespace switchyard {
namespace {

using testing::ClientFiles;
using testing::ClientTls;
using ::testing::HasSubstr;
using testing::Pki;
using testing::StartGateway;

// The greedy tokens of one 6-token generation, or none on an error.
std::vector<int32_t> Generate(const Gateway& gateway) {
  auto stub = v1::GenerationService::NewStub(
      grpc::CreateChannel(gateway.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::GenerateRequest request;
  request.set_text("Hello there");
  request.mutable_stopping()->set_max_new_tokens(6);
  request.mutable_stopping()->set_ignore_eos(true);
  v1::GenerateResponse response;
  const grpc::Status status = stub->Generate(&context, request, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return {response.token_ids().begin(), response.token_ids().end()};
}

// Every expert of tiny-mixtral in one mutual-TLS shard serving `cert`.
std::unique_ptr<ExpertProcess> StartShard(const std::string& cert) {
  ExpertProcessOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.experts = "0,1,2,3,4,5,6,7";
  options.tls = {
      .cert_file = Pki(cert + ".pem"), .key_file = Pki(cert + ".key"), .ca_file = Pki("ca.pem")};
  auto shard = ExpertProcess::Start(options);
  EXPECT_TRUE(shard.ok()) << shard.status();
  return shard.ok() ? *std::move(shard) : nullptr;
}

// Every expert mapped to `target`.
std::string AllTo(const std::string& target) {
  std::vector<std::string> entries;
  for (int e = 0; e < 8; ++e) entries.push_back(absl::StrCat(e, "=", target));
  return absl::StrJoin(entries, ";");
}

GatewayOptions WithExpertTls(const std::string& experts) {
  GatewayOptions options;
  options.experts = experts;
  options.expert_tls_ca_file = Pki("ca.pem");
  options.expert_tls_cert_file = Pki("client.pem");
  options.expert_tls_key_file = Pki("client.key");
  return options;
}

class FramesOverTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    local_ = StartGateway(GatewayOptions());
    ASSERT_NE(local_, nullptr);
    expected_ = Generate(*local_);
    ASSERT_EQ(expected_.size(), 6u);
  }
  std::unique_ptr<Gateway> local_;
  std::vector<int32_t> expected_;  // in-process experts' tokens
};

TEST_F(FramesOverTlsTest, ExpertCallsGoOnTlsFramesAndMatchLocal) {
  std::unique_ptr<ExpertProcess> shard = StartShard("server");
  ASSERT_NE(shard, nullptr);
  EXPECT_THAT(shard->summary(), HasSubstr("TLS frames on port"));
  std::unique_ptr<Gateway> gateway = StartGateway(WithExpertTls(AllTo(shard->address())));
  ASSERT_NE(gateway, nullptr);
  EXPECT_EQ(Generate(*gateway), expected_);
  std::printf("[ frames ] %llu requests on TLS frames, %llu failed handshakes\n",
              static_cast<unsigned long long>(shard->frame_requests()),
              static_cast<unsigned long long>(shard->frame_tls_failures()));
  EXPECT_GT(shard->frame_requests(), 0u);
  EXPECT_EQ(shard->frame_tls_failures(), 0u);

  // --expert-transport grpc: the same tokens, and no frame.
  GatewayOptions grpc_only = WithExpertTls(AllTo(shard->address()));
  grpc_only.expert_frames = false;
  std::unique_ptr<Gateway> over_grpc = StartGateway(grpc_only);
  ASSERT_NE(over_grpc, nullptr);
  const uint64_t before = shard->frame_requests();
  EXPECT_EQ(Generate(*over_grpc), expected_);
  EXPECT_EQ(shard->frame_requests(), before);
}

// Large requests go on gRPC with TLS (RemoteExpertOptions::
// tls_frames_max_bytes), small ones on frames; both give the same rows.
TEST_F(FramesOverTlsTest, RequestsOverTheTlsFrameLimitGoOnGrpc) {
  std::unique_ptr<ExpertProcess> shard = StartShard("server");
  ASSERT_NE(shard, nullptr);
  auto config = LoadModelConfig(testing::TinyMixtralDir());
  ASSERT_TRUE(config.ok()) << config.status();
  auto topology = ParseExpertTopology(AllTo(shard->address()), 8);
  ASSERT_TRUE(topology.ok()) << topology.status();
  auto credentials = rpc::ChannelCredentialsFromFiles(ClientFiles());
  ASSERT_TRUE(credentials.ok()) << credentials.status();
  RemoteExpertOptions options;
  options.connect_timeout_ms = 5000;
  options.credentials = *credentials;
  options.frame_tls = ClientTls(ClientFiles());
  // F32 both ways (the CPU shard computes in F32): 8 bytes per hidden value
  // and row, so 4 rows fit and 8 do not.
  const int d = config->hidden_size;
  options.tls_frames_max_bytes = 4 * d * 8;
  auto backend =
      RemoteExpertBackend::Connect(*topology, *config, testing::TinyMixtralDir(), options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  std::vector<float> x(8 * d);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>(i % 97) - 0.4f;
  std::vector<float> four(4 * d), eight(8 * d);
  const uint64_t before = shard->frame_requests();
  ASSERT_TRUE(
      (*backend)
          ->RunLayer(1, {{.expert = 3, .tokens = 4, .input = x.data(), .output = four.data()}})
          .ok());
  EXPECT_EQ(shard->frame_requests(), before + 1);  // on frames
  ASSERT_TRUE(
      (*backend)
          ->RunLayer(1, {{.expert = 3, .tokens = 8, .input = x.data(), .output = eight.data()}})
          .ok());
  EXPECT_EQ(shard->frame_requests(), before + 1);  // on gRPC
  float max_diff = 0;
  for (size_t i = 0; i < four.size(); ++i)
    max_diff = std::max(max_diff, std::abs(four[i] - eight[i]));
  std::printf("[ rows ] max |frames - gRPC| over the first 4 rows: %g\n", max_diff);
  // The same rows; only the GEMM's row count differs.
  EXPECT_LE(max_diff, tolerance::kReorderAbs);
}

// Kubernetes: the gateway resolves a headless Service's name to pod
// addresses and dials each, but the pod's certificate names the Service.
TEST_F(FramesOverTlsTest, APodAddressIsVerifiedAgainstItsServiceName) {
  constexpr char kService[] = "switchyard-expert-0.switchyard.svc.cluster.local";
  std::unique_ptr<ExpertProcess> pod = StartShard("service");
  ASSERT_NE(pod, nullptr);
  const std::string port = pod->address().substr(pod->address().rfind(':') + 1);
  GatewayOptions options = WithExpertTls(AllTo(absl::StrCat("dns:///", kService, ":", port)));
  std::vector<std::string> asked;
  options.expert_target_resolver = [&](const std::string& host,
                                       int p) -> absl::StatusOr<std::vector<std::string>> {
    asked.push_back(host);
    return std::vector<std::string>{absl::StrCat("127.0.0.1:", p)};
  };
  std::unique_ptr<Gateway> gateway = StartGateway(options);
  ASSERT_NE(gateway, nullptr);
  EXPECT_EQ(Generate(*gateway), expected_);
  EXPECT_GT(pod->frame_requests(), 0u);
  EXPECT_EQ(pod->frame_tls_failures(), 0u);
  ASSERT_FALSE(asked.empty());
  EXPECT_EQ(asked.front(), kService);

  // A pod whose certificate names something else (localhost) is refused.
  std::unique_ptr<ExpertProcess> impostor = StartShard("server");
  ASSERT_NE(impostor, nullptr);
  const std::string impostor_port = impostor->address().substr(impostor->address().rfind(':') + 1);
  GatewayOptions wrong =
      WithExpertTls(AllTo(absl::StrCat("dns:///", kService, ":", impostor_port)));
  wrong.expert_target_resolver = options.expert_target_resolver;
  wrong.model_dir = testing::TinyMixtralDir();
  wrong.listen = "127.0.0.1:0";
  wrong.kv_cache_tokens = 4096;
  wrong.expert_connect_timeout_ms = 1000;
  const auto refused = Gateway::Start(wrong);
  ASSERT_FALSE(refused.ok());
  std::printf("[ impostor ] %s\n", refused.status().ToString().c_str());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(impostor->frame_requests(), 0u);
}

}  // namespace
}  // namespace switchyard
