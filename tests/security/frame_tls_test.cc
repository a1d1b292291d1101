// TLS on the expert frame sockets (rpc/frame_socket.h, rpc/tls.h): frames
// inside mutual TLS over real TCP with a reader and a writer at once, every
// way a handshake fails and what it says, and a gateway whose expert calls go
// on TLS frames, to a shard dialled by address and to the pod address of a
// dns:/// name whose certificate names only the Service.
#include <grpcpp/grpcpp.h>
#include <sys/socket.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/model_config.h"
#include "expert_service/expert_process.h"
#include "gateway/gateway_server.h"
#include "gateway/remote_expert_backend.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "rpc/frame_socket.h"
#include "rpc/tls.h"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/security/test_pki.h"
#include "tests/test_util.h"
#include "tests/tolerances.h"

namespace switchyard {
namespace {

using testing::ClientFiles;
using ::testing::HasSubstr;
using testing::Pki;
using testing::ServerFiles;

absl::Time In(absl::Duration d) { return absl::Now() + d; }

// What a server's status says until its connection ran.
absl::Status NotRun() { return absl::UnknownError("the server's side never ran"); }

std::shared_ptr<const rpc::FrameTlsContext> ServerTls(const rpc::TlsFiles& files,
                                                      bool require_client_cert) {
  auto tls = rpc::FrameServerTlsFromFiles(files, require_client_cert);
  EXPECT_TRUE(tls.ok()) << tls.status();
  return tls.ok() ? *tls : nullptr;
}

std::shared_ptr<const rpc::FrameTlsContext> ClientTls(const rpc::TlsFiles& files) {
  auto tls = rpc::FrameClientTlsFromFiles(files);
  EXPECT_TRUE(tls.ok()) << tls.status();
  return tls.ok() ? *tls : nullptr;
}

// A TCP frame listener whose first accepted connection runs `serve` on a
// thread of its own.
class OneConnectionServer {
 public:
  explicit OneConnectionServer(std::function<void(rpc::FrameSocket&)> serve) {
    int port = 0;
    absl::StatusOr<rpc::FrameSocket> listener = rpc::ListenFrames("127.0.0.1:0", &port);
    EXPECT_TRUE(listener.ok()) << listener.status();
    if (!listener.ok()) return;
    listener_ = std::move(*listener);
    address_ = absl::StrCat("127.0.0.1:", port);
    thread_ = std::thread([this, serve = std::move(serve)] {
      absl::StatusOr<rpc::FrameSocket> accepted = rpc::AcceptFrames(listener_.fd());
      if (accepted.ok()) serve(*accepted);
    });
  }
  ~OneConnectionServer() {
    // Wakes an accept no client came to (a test that failed early).
    if (listener_.valid() && thread_.joinable()) shutdown(listener_.fd(), SHUT_RDWR);
    if (thread_.joinable()) thread_.join();
  }
  // Waits until `serve` has run (a client must have dialled).
  void Join() { thread_.join(); }
  const std::string& address() const { return address_; }

 private:
  rpc::FrameSocket listener_;
  std::string address_;
  std::thread thread_;
};

// Frame i of the round-trip test: over four TLS records (16 KiB each).
std::string Payload(int i) { return std::string(70000 + i, static_cast<char>('a' + i % 26)); }

TEST(FrameTlsTest, FramesCrossMutualTlsWithAReaderAndAWriterAtOnce) {
  const auto server_tls = ServerTls(ServerFiles(), /*require_client_cert=*/true);
  const auto client_tls = ClientTls(ClientFiles());
  ASSERT_NE(server_tls, nullptr);
  ASSERT_NE(client_tls, nullptr);
  constexpr int kFrames = 24;
  // The certificate names both; an IP is checked against its IP entries.
  for (const std::string host : {"localhost", "127.0.0.1"}) {
    SCOPED_TRACE(host);
    absl::Status server_handshake = NotRun();
    int server_matched = 0;
    int matched = 0;
    {
      OneConnectionServer server([&](rpc::FrameSocket& s) {
        server_handshake = rpc::StartServerTls(s, *server_tls, In(absl::Seconds(10)));
        if (!server_handshake.ok()) return;
        // Replies written by another thread while this one reads: how the
        // expert's frame server uses a connection under load.
        std::thread writer([&] {
          for (int i = 0; i < kFrames; ++i) {
            ASSERT_TRUE(rpc::WriteFrame(s, Payload(i), In(absl::Seconds(10))).ok());
          }
        });
        for (int i = 0; i < kFrames; ++i) {
          std::string got;
          if (!rpc::ReadFrame(s, 1 << 20, In(absl::Seconds(10)), &got).ok()) break;
          server_matched += got == Payload(i);
        }
        writer.join();
      });
      absl::StatusOr<rpc::FrameSocket> socket =
          rpc::DialFrames(server.address(), In(absl::Seconds(5)));
      ASSERT_TRUE(socket.ok()) << socket.status();
      EXPECT_FALSE(socket->tls());
      const absl::Status handshake =
          rpc::StartClientTls(*socket, *client_tls, host, In(absl::Seconds(10)));
      ASSERT_TRUE(handshake.ok()) << handshake;
      EXPECT_TRUE(socket->tls());
      std::thread writer([&] {
        for (int i = 0; i < kFrames; ++i) {
          ASSERT_TRUE(rpc::WriteFrame(*socket, Payload(i), In(absl::Seconds(10))).ok());
        }
      });
      for (int i = 0; i < kFrames; ++i) {
        ASSERT_TRUE(rpc::WaitReadable(*socket, In(absl::Seconds(10))));
        std::string got;
        const absl::Status read = rpc::ReadFrame(*socket, 1 << 20, In(absl::Seconds(10)), &got);
        EXPECT_TRUE(read.ok()) << read;
        if (!read.ok()) break;
        matched += got == Payload(i);
      }
      writer.join();
      // A frame read whole leaves nothing decrypted behind.
      EXPECT_FALSE(socket->HasBufferedInput());
      server.Join();
    }
    EXPECT_TRUE(server_handshake.ok()) << server_handshake;
    EXPECT_EQ(matched, kFrames);
    EXPECT_EQ(server_matched, kFrames);
  }
}

// What each end of a failed handshake says.
struct HandshakeOutcome {
  absl::Status client;  // StartClientTls, then reading the greeting
  absl::Status server;  // StartServerTls
};

// A server with `server_tls` (a greeting after its handshake) and a client
// with `client_tls` verifying `host`.
HandshakeOutcome Handshake(const rpc::FrameTlsContext& server_tls,
                           const rpc::FrameTlsContext& client_tls, const std::string& host) {
  HandshakeOutcome out{.client = NotRun(), .server = NotRun()};
  OneConnectionServer server([&](rpc::FrameSocket& s) {
    out.server = rpc::StartServerTls(s, server_tls, In(absl::Seconds(5)));
    if (out.server.ok()) out.server = rpc::WriteFrame(s, "hello", In(absl::Seconds(5)));
  });
  absl::StatusOr<rpc::FrameSocket> socket = rpc::DialFrames(server.address(), In(absl::Seconds(5)));
  if (!socket.ok()) {
    out.client = socket.status();
    return out;
  }
  out.client = rpc::StartClientTls(*socket, client_tls, host, In(absl::Seconds(5)));
  std::string greeting;
  if (out.client.ok()) out.client = rpc::ReadFrame(*socket, 64, In(absl::Seconds(5)), &greeting);
  if (out.client.ok() && greeting != "hello") out.client = absl::DataLossError(greeting);
  socket->Close();
  server.Join();
  return out;
}

TEST(FrameTlsTest, FailedHandshakesSayWhy) {
  const auto mutual = ServerTls(ServerFiles(), /*require_client_cert=*/true);
  const auto client = ClientTls(ClientFiles());
  ASSERT_NE(mutual, nullptr);
  ASSERT_NE(client, nullptr);
  {  // the server's certificate from a CA the client does not trust
    const auto trusts_other_ca = ClientTls({.cert_file = Pki("client.pem"),
                                            .key_file = Pki("client.key"),
                                            .ca_file = Pki("wrong-ca.pem")});
    const HandshakeOutcome o = Handshake(*mutual, *trusts_other_ca, "localhost");
    std::printf("[ other CA ] client: %s\n", o.client.ToString().c_str());
    EXPECT_EQ(o.client.code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(o.client.message(), HasSubstr("certificate verify failed"));
    EXPECT_FALSE(o.server.ok());
  }
  {  // a certificate that does not name the host dialled
    const HandshakeOutcome o =
        Handshake(*mutual, *client, "switchyard-expert-0.switchyard.svc.cluster.local");
    std::printf("[ other name ] client: %s\n", o.client.ToString().c_str());
    EXPECT_EQ(o.client.code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(o.client.message(), HasSubstr("hostname mismatch"));
    const HandshakeOutcome ip = Handshake(*mutual, *client, "10.0.0.1");
    EXPECT_THAT(ip.client.message(), HasSubstr("IP address mismatch"));
  }
  {  // mutual TLS: a client without a certificate, and one from another CA
    const auto anonymous = ClientTls({.ca_file = Pki("ca.pem")});
    const HandshakeOutcome o = Handshake(*mutual, *anonymous, "localhost");
    std::printf("[ no client cert ] server: %s; client: %s\n", o.server.ToString().c_str(),
                o.client.ToString().c_str());
    EXPECT_EQ(o.server.code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(o.server.message(), HasSubstr("certificate"));
    EXPECT_FALSE(o.client.ok());  // TLS 1.3: refused after the client finished
    const auto foreign = ClientTls({.cert_file = Pki("wrong-client.pem"),
                                    .key_file = Pki("wrong-client.key"),
                                    .ca_file = Pki("ca.pem")});
    const HandshakeOutcome f = Handshake(*mutual, *foreign, "localhost");
    EXPECT_THAT(f.server.message(), HasSubstr("certificate verify failed"));
    EXPECT_FALSE(f.client.ok());
    // Without mutual TLS the anonymous client is welcome.
    const auto one_way = ServerTls({.cert_file = Pki("server.pem"), .key_file = Pki("server.key")},
                                   /*require_client_cert=*/false);
    const HandshakeOutcome w = Handshake(*one_way, *anonymous, "localhost");
    EXPECT_TRUE(w.client.ok()) << w.client;
    EXPECT_TRUE(w.server.ok()) << w.server;
  }
}

TEST(FrameTlsTest, PlaintextAndTlsDoNotMixAndContextsKeepTheirSide) {
  const auto server_tls = ServerTls(ServerFiles(), /*require_client_cert=*/true);
  const auto client_tls = ClientTls(ClientFiles());
  ASSERT_NE(server_tls, nullptr);
  ASSERT_NE(client_tls, nullptr);
  {  // a TLS client at a plaintext frame socket (which greets at once)
    OneConnectionServer server(
        [](rpc::FrameSocket& s) { (void)rpc::WriteFrame(s, "token", In(absl::Seconds(5))); });
    auto socket = rpc::DialFrames(server.address(), In(absl::Seconds(5)));
    ASSERT_TRUE(socket.ok()) << socket.status();
    const absl::Status s =
        rpc::StartClientTls(*socket, *client_tls, "localhost", In(absl::Seconds(5)));
    std::printf("[ TLS client, plaintext server ] %s\n", s.ToString().c_str());
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(s.message(), HasSubstr("TLS handshake failed"));
    EXPECT_FALSE(socket->tls());
  }
  {  // a plaintext client at a TLS frame socket
    absl::Status handshake = NotRun();
    {
      OneConnectionServer server([&](rpc::FrameSocket& s) {
        handshake = rpc::StartServerTls(s, *server_tls, In(absl::Seconds(5)));
      });
      auto socket = rpc::DialFrames(server.address(), In(absl::Seconds(5)));
      ASSERT_TRUE(socket.ok()) << socket.status();
      ASSERT_TRUE(rpc::WriteFrame(*socket, "a request", In(absl::Seconds(5))).ok());
      server.Join();
    }
    std::printf("[ plaintext client, TLS server ] %s\n", handshake.ToString().c_str());
    EXPECT_EQ(handshake.code(), absl::StatusCode::kUnavailable);
  }
  {  // a peer that never speaks: the handshake's deadline
    absl::Status handshake = NotRun();
    {
      OneConnectionServer server([&](rpc::FrameSocket& s) {
        handshake = rpc::StartServerTls(s, *server_tls, In(absl::Milliseconds(100)));
      });
      auto socket = rpc::DialFrames(server.address(), In(absl::Seconds(5)));
      ASSERT_TRUE(socket.ok()) << socket.status();
      server.Join();  // the socket stays open and silent meanwhile
    }
    EXPECT_EQ(handshake.code(), absl::StatusCode::kDeadlineExceeded) << handshake;
  }
  {  // after the handshake, the peer closing reads as closed, and writes fail without SIGPIPE
    absl::Status handshake = NotRun();
    OneConnectionServer server([&](rpc::FrameSocket& s) {
      handshake = rpc::StartServerTls(s, *server_tls, In(absl::Seconds(5)));
      s.Close();
    });
    auto socket = rpc::DialFrames(server.address(), In(absl::Seconds(5)));
    ASSERT_TRUE(socket.ok()) << socket.status();
    ASSERT_TRUE(rpc::StartClientTls(*socket, *client_tls, "localhost", In(absl::Seconds(5))).ok());
    std::string payload;
    const absl::Status read = rpc::ReadFrame(*socket, 64, In(absl::Seconds(5)), &payload);
    EXPECT_EQ(read.code(), absl::StatusCode::kUnavailable) << read;
    EXPECT_THAT(read.message(), HasSubstr("closed by the peer"));
    absl::Status write;
    for (int i = 0; i < 100 && write.ok(); ++i) {
      write = rpc::WriteFrame(*socket, std::string(4096, 'x'), In(absl::Seconds(5)));
    }
    EXPECT_EQ(write.code(), absl::StatusCode::kUnavailable) << write;
    server.Join();
    EXPECT_TRUE(handshake.ok()) << handshake;
  }
  rpc::FrameSocket unused;
  EXPECT_EQ(rpc::StartClientTls(unused, *server_tls, "localhost", In(absl::Seconds(1))).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(rpc::StartServerTls(unused, *client_tls, In(absl::Seconds(1))).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(FrameTlsFilesTest, BadFilesAreNamedAsForGrpc) {
  const auto missing_key = rpc::FrameServerTlsFromFiles(
      {.cert_file = Pki("server.pem"), .key_file = Pki("missing.key")}, false);
  EXPECT_EQ(missing_key.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(missing_key.status().message(), HasSubstr(Pki("missing.key")));
  const auto other_key = rpc::FrameServerTlsFromFiles(
      {.cert_file = Pki("server.pem"), .key_file = Pki("client.key")}, false);
  EXPECT_THAT(other_key.status().message(), HasSubstr("does not match the certificate"));
  EXPECT_EQ(rpc::FrameServerTlsFromFiles(
                {.cert_file = Pki("server.pem"), .key_file = Pki("server.key")}, true)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);  // client certificates without a CA
  EXPECT_EQ(rpc::FrameClientTlsFromFiles({.cert_file = Pki("client.pem"), .ca_file = Pki("ca.pem")})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);  // a certificate without its key
  const auto not_a_ca = rpc::FrameClientTlsFromFiles({.ca_file = Pki("server.key")});
  EXPECT_EQ(not_a_ca.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(not_a_ca.status().message(), HasSubstr("TLS CA file"));
}

// ---------------------------------------------------------------------------
// A gateway's expert calls on TLS frames.

std::unique_ptr<Gateway> StartGateway(GatewayOptions options) {
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.kv_cache_tokens = 4096;
  auto gateway = Gateway::Start(options);
  EXPECT_TRUE(gateway.ok()) << gateway.status();
  return gateway.ok() ? *std::move(gateway) : nullptr;
}

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
