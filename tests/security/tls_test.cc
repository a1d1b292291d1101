// Transport security and token auth, in-process over real gRPC on loopback:
// TLS and mutual TLS on the gateway's public API, mutual TLS between the
// gateway and expert shards (gRPC and frame sockets, a dns:/// name's pods
// included), bearer-token auth of the Generation API, and the errors for bad
// certificate, key and token files.
//
// Certificates are made by the `openssl` command in a temporary folder: a CA
// with a server certificate (localhost, 127.0.0.1), a client certificate and
// a Kubernetes-style one naming only a Service, and an unrelated "wrong" CA
// with its own server and client certificates.
#include "rpc/tls.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/checkpoint.h"
#include "core/flags.h"
#include "expert_service/expert_process.h"
#include "gateway/gateway_server.h"
#include "gateway/remote_expert_backend.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "rpc/auth.h"
#include "rpc/server.h"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/security/test_gateway.h"
#include "tests/security/test_pki.h"
#include "tests/test_util.h"

namespace switchyard {
namespace {

using testing::ClientFiles;
using ::testing::HasSubstr;
using ::testing::Not;
using testing::Pki;
using testing::PkiDir;
using testing::ServerFiles;
using testing::StartGateway;
using testing::WriteFile;

constexpr char kToken[] = "s3cr3t-T0ken_for.switchyard~tests";
constexpr char kSecondToken[] = "second-token-0123456789";
constexpr char kWrongToken[] = "wr0ng-token-that-must-never-be-echoed";

// The bearer-token file of the token tests, beside the certificates.
const std::string& TokensFile() {
  static const std::string* path = [] {
    auto* p = new std::string(Pki("tokens.txt"));
    WriteFile(*p, absl::StrCat("\n  ", kToken, "  \r\n\n", kSecondToken, "\n"));
    return p;
  }();
  return *path;
}

std::shared_ptr<grpc::ChannelCredentials> ClientCredentials(const rpc::TlsFiles& files) {
  auto credentials = rpc::ChannelCredentialsFromFiles(files);
  EXPECT_TRUE(credentials.ok()) << credentials.status();
  return credentials.ok() ? *credentials : grpc::InsecureChannelCredentials();
}

v1::GenerateRequest Greedy(const std::string& text, int max_new) {
  v1::GenerateRequest r;
  r.set_text(text);
  r.mutable_stopping()->set_max_new_tokens(max_new);
  r.mutable_stopping()->set_ignore_eos(true);
  return r;
}

void SetDeadline(grpc::ClientContext* context, int ms = 10000) {
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(ms));
}

// One Generate call of 3 tokens over `channel`; `token` non-empty: sent as
// a bearer token.
grpc::Status Generate(const std::shared_ptr<grpc::Channel>& channel, const std::string& token = "",
                      v1::GenerateResponse* response_out = nullptr) {
  auto stub = v1::GenerationService::NewStub(channel);
  grpc::ClientContext context;
  SetDeadline(&context);
  if (!token.empty()) rpc::AddBearerToken(&context, token);
  v1::GenerateResponse response;
  grpc::Status status = stub->Generate(&context, Greedy("Hello", 3), &response);
  if (response_out != nullptr) *response_out = response;
  return status;
}

grpc::Status HealthCheck(const std::shared_ptr<grpc::Channel>& channel,
                         const std::string& service = "") {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  SetDeadline(&context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  if (status.ok() && response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    return grpc::Status(grpc::StatusCode::UNKNOWN, "not SERVING");
  }
  return status;
}

// ---------------------------------------------------------------------------
// Credentials from files: what goes wrong names the file.

class TlsFilesTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_FALSE(PkiDir().empty()); }
};

TEST_F(TlsFilesTest, GoodFilesMakeCredentials) {
  EXPECT_TRUE(rpc::ServerCredentialsFromFiles(ServerFiles(), true).ok());
  EXPECT_TRUE(rpc::ServerCredentialsFromFiles(ServerFiles(), false).ok());
  EXPECT_TRUE(
      rpc::ServerCredentialsFromFiles({Pki("server.pem"), Pki("server.key"), ""}, false).ok());
  EXPECT_TRUE(rpc::ChannelCredentialsFromFiles(ClientFiles()).ok());
  EXPECT_TRUE(rpc::ChannelCredentialsFromFiles({.ca_file = Pki("ca.pem")}).ok());
}

TEST_F(TlsFilesTest, MissingFilesAreNamed) {
  const std::string missing = Pki("no-such-file.pem");
  for (rpc::TlsFiles files : {rpc::TlsFiles{missing, Pki("server.key"), ""},
                              rpc::TlsFiles{Pki("server.pem"), missing, ""},
                              rpc::TlsFiles{Pki("server.pem"), Pki("server.key"), missing}}) {
    auto server = rpc::ServerCredentialsFromFiles(files, !files.ca_file.empty());
    ASSERT_FALSE(server.ok());
    EXPECT_EQ(server.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(server.status().message(), HasSubstr("'" + missing + "' does not exist"));
  }
  auto client = rpc::ChannelCredentialsFromFiles({.ca_file = missing});
  ASSERT_FALSE(client.ok());
  EXPECT_THAT(client.status().message(), HasSubstr("TLS CA file '" + missing + "'"));
}

TEST_F(TlsFilesTest, EmptyNotPemAndWrongKindOfFileAreNamed) {
  const std::string empty = Pki("empty.pem"), text = Pki("text.pem");
  WriteFile(empty, "");
  WriteFile(text, "this is not a certificate\n");
  auto s = rpc::ServerCredentialsFromFiles({empty, Pki("server.key"), ""}, false);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("TLS certificate file '" + empty + "' is empty"));
  s = rpc::ServerCredentialsFromFiles({text, Pki("server.key"), ""}, false);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("'" + text + "' is not a PEM file"));
  // A key where the certificate belongs, and the other way round.
  s = rpc::ServerCredentialsFromFiles({Pki("server.key"), Pki("server.key"), ""}, false);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(),
              HasSubstr("TLS certificate file '" + Pki("server.key") + "' has no PEM certificate"));
  s = rpc::ServerCredentialsFromFiles({Pki("server.pem"), Pki("server.pem"), ""}, false);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(),
              HasSubstr("TLS key file '" + Pki("server.pem") + "' has no PEM private key"));
  // A CA file with only a key in it.
  auto c = rpc::ChannelCredentialsFromFiles({.ca_file = Pki("ca.key")});
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("TLS CA file '" + Pki("ca.key") + "'"));
}

TEST_F(TlsFilesTest, EndlessFileIsRefused) {
  auto s = rpc::ServerCredentialsFromFiles({"/dev/zero", Pki("server.key"), ""}, false);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("'/dev/zero' is larger than 1 MiB"));
  auto t = rpc::ReadBearerTokens("/dev/zero");
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(t.status().message(), HasSubstr("'/dev/zero' is larger than 1 MiB"));
}

TEST_F(TlsFilesTest, KeyOfAnotherCertificateIsRefusedWithoutShowingTheKey) {
  auto s = rpc::ServerCredentialsFromFiles({Pki("server.pem"), Pki("client.key"), ""}, false);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(),
              HasSubstr("TLS key file '" + Pki("client.key") +
                        "' does not match the certificate in TLS certificate file '" +
                        Pki("server.pem") + "'"));
  // No line of the key file (its base64 body) is in the message.
  std::istringstream key(testing::ReadAll(Pki("client.key")));
  for (std::string line; std::getline(key, line);) {
    if (line.rfind("-----", 0) == 0 || line.size() < 8) continue;
    EXPECT_THAT(s.status().message(), Not(HasSubstr(line)));
  }
}

TEST_F(TlsFilesTest, UnreadableFileIsNamed) {
  if (geteuid() == 0) GTEST_SKIP() << "root reads files regardless of their mode";
  const std::string locked = Pki("locked.key");
  std::filesystem::copy_file(Pki("server.key"), locked,
                             std::filesystem::copy_options::overwrite_existing);
  chmod(locked.c_str(), 0);
  auto s = rpc::ServerCredentialsFromFiles({Pki("server.pem"), locked, ""}, false);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("TLS key file '" + locked + "' cannot be read"));
}

TEST_F(TlsFilesTest, MissingArgumentsAreInvalid) {
  EXPECT_EQ(rpc::ServerCredentialsFromFiles({Pki("server.pem"), "", ""}, false).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(rpc::ServerCredentialsFromFiles({Pki("server.pem"), Pki("server.key"), ""}, true)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(rpc::ChannelCredentialsFromFiles({.cert_file = Pki("client.pem")}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------
// Gateway flags and start-up errors.

absl::StatusOr<GatewayOptions> OptionsFromArgs(std::vector<std::string> args) {
  args.insert(args.begin(), {"--model", testing::TinyMixtralDir()});
  auto flags =
      Flags::Parse(args,
                   {"model", "experts", "tls-cert", "tls-key", "tls-client-ca", "auth-token-file",
                    "expert-tls-ca", "expert-tls-cert", "expert-tls-key"},
                   {});
  if (!flags.ok()) return flags.status();
  return GatewayOptionsFromFlags(*flags);
}

TEST(GatewaySecurityFlagsTest, ParsesEveryFlag) {
  auto o = OptionsFromArgs({"--experts", "0=a:1;1=a:1;2=a:1;3=a:1;4=a:1;5=a:1;6=a:1;7=a:1",
                            "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca",
                            "ca.pem", "--auth-token-file", "t.txt", "--expert-tls-ca", "eca.pem",
                            "--expert-tls-cert", "ec.pem", "--expert-tls-key", "ek.pem"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->tls_cert_file, "c.pem");
  EXPECT_EQ(o->tls_key_file, "k.pem");
  EXPECT_EQ(o->tls_client_ca_file, "ca.pem");
  EXPECT_EQ(o->auth_token_file, "t.txt");
  EXPECT_EQ(o->expert_tls_ca_file, "eca.pem");
  EXPECT_EQ(o->expert_tls_cert_file, "ec.pem");
  EXPECT_EQ(o->expert_tls_key_file, "ek.pem");
  auto plain = OptionsFromArgs({});
  ASSERT_TRUE(plain.ok());
  EXPECT_TRUE(plain->tls_cert_file.empty() && plain->auth_token_file.empty() &&
              plain->expert_tls_ca_file.empty());
}

TEST(GatewaySecurityFlagsTest, InconsistentFlagsAreRefused) {
  const std::string remote = "0=a:1;1=a:1;2=a:1;3=a:1;4=a:1;5=a:1;6=a:1;7=a:1";
  struct Case {
    std::vector<std::string> args;
    std::string error;
  };
  for (const Case& c : std::vector<Case>{
           {{"--tls-cert", "c.pem"}, "--tls-cert and --tls-key go together"},
           {{"--tls-key", "k.pem"}, "--tls-cert and --tls-key go together"},
           {{"--tls-client-ca", "ca.pem"}, "--tls-client-ca needs TLS"},
           {{"--tls-cert", "", "--tls-key", "k.pem"}, "--tls-cert needs a file name"},
           {{"--experts", remote, "--expert-tls-cert", "c", "--expert-tls-key", "k"},
            "--expert-tls-cert needs --expert-tls-ca"},
           {{"--experts", remote, "--expert-tls-ca", "ca", "--expert-tls-cert", "c"},
            "--expert-tls-cert and --expert-tls-key go together"},
           {{"--expert-tls-ca", "ca.pem"}, "need remote experts"},
       }) {
    auto o = OptionsFromArgs(c.args);
    ASSERT_FALSE(o.ok()) << absl::StrJoin(c.args, " ");
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(o.status().message(), HasSubstr(c.error));
  }
}

TEST(GatewaySecurityStartTest, BadFilesAreNamedAtStartUp) {
  const std::string missing = Pki("missing-cert.pem");
  GatewayOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.tls_cert_file = missing;
  options.tls_key_file = Pki("server.key");
  auto gateway = Gateway::Start(options);
  ASSERT_FALSE(gateway.ok());
  EXPECT_THAT(gateway.status().message(), HasSubstr("'" + missing + "' does not exist"));

  options = GatewayOptions();
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.auth_token_file = Pki("missing-tokens.txt");
  gateway = Gateway::Start(options);
  ASSERT_FALSE(gateway.ok());
  EXPECT_THAT(gateway.status().message(),
              HasSubstr("auth token file '" + Pki("missing-tokens.txt") + "' does not exist"));
}

// ---------------------------------------------------------------------------
// Token files and the authenticator.

TEST(BearerTokenTest, TokenFileErrorsNameFileAndLineButNotTheToken) {
  const std::string empty = Pki("empty-tokens.txt"), bad = Pki("bad-tokens.txt");
  WriteFile(empty, "\n  \n");
  WriteFile(bad, absl::StrCat(kToken, "\nhalf secret\n"));
  auto e = rpc::ReadBearerTokens(empty);
  ASSERT_FALSE(e.ok());
  EXPECT_THAT(e.status().message(), HasSubstr("auth token file '" + empty + "' has no token"));
  auto b = rpc::BearerTokenAuthenticator::FromFile(bad);
  ASSERT_FALSE(b.ok());
  EXPECT_THAT(b.status().message(), HasSubstr("'" + bad + "': the token on line 2"));
  EXPECT_THAT(b.status().message(), Not(HasSubstr("secret")));
  auto m = rpc::ReadBearerTokenFile(Pki("nope.txt"));
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(), HasSubstr("'" + Pki("nope.txt") + "' does not exist"));
}

TEST(BearerTokenTest, ReadsEveryTokenTrimmed) {
  auto tokens = rpc::ReadBearerTokens(TokensFile());
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(*tokens, (std::vector<std::string>{kToken, kSecondToken}));
  auto first = rpc::ReadBearerTokenFile(TokensFile());
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(*first, kToken);
}

TEST(BearerTokenTest, AcceptsExactlyTheTokens) {
  auto auth = rpc::BearerTokenAuthenticator::FromTokens({kToken, kSecondToken});
  ASSERT_TRUE(auth.ok()) << auth.status();
  const auto& a = **auth;
  EXPECT_TRUE(a.AcceptsAuthorizationValue(absl::StrCat("Bearer ", kToken)));
  EXPECT_TRUE(a.AcceptsAuthorizationValue(absl::StrCat("bearer  ", kSecondToken, " ")));
  EXPECT_TRUE(a.AcceptsAuthorizationValue(absl::StrCat("BEARER ", kToken)));
  EXPECT_FALSE(a.AcceptsAuthorizationValue(kToken));  // no scheme
  EXPECT_FALSE(a.AcceptsAuthorizationValue(absl::StrCat("Basic ", kToken)));
  EXPECT_FALSE(a.AcceptsAuthorizationValue(absl::StrCat("Bearer", kToken)));
  EXPECT_FALSE(a.AcceptsAuthorizationValue(absl::StrCat("Bearer ", kToken, "x")));
  EXPECT_FALSE(a.AcceptsAuthorizationValue(
      absl::StrCat("Bearer ", std::string(kToken).substr(0, sizeof(kToken) - 2))));
  EXPECT_FALSE(a.AcceptsAuthorizationValue("Bearer "));
  EXPECT_FALSE(a.AcceptsAuthorizationValue(""));
  EXPECT_FALSE(rpc::BearerTokenAuthenticator::FromTokens({}).ok());
  EXPECT_FALSE(rpc::BearerTokenAuthenticator::FromTokens({"has space"}).ok());
}

// ---------------------------------------------------------------------------
// (a) The gateway's public API over TLS.

class GatewayTlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    GatewayOptions options;
    options.tls_cert_file = Pki("server.pem");
    options.tls_key_file = Pki("server.key");
    gateway_ = StartGateway(options).release();
    ASSERT_NE(gateway_, nullptr);
  }
  static void TearDownTestSuite() {
    delete gateway_;
    gateway_ = nullptr;
  }
  static std::shared_ptr<grpc::Channel> Channel(
      const std::shared_ptr<grpc::ChannelCredentials>& credentials) {
    return grpc::CreateChannel(gateway_->address(), credentials);
  }
  static Gateway* gateway_;
};
Gateway* GatewayTlsTest::gateway_ = nullptr;

TEST_F(GatewayTlsTest, ClientTrustingTheCaGenerates) {
  ASSERT_NE(gateway_, nullptr);
  v1::GenerateResponse response;
  grpc::Status status =
      Generate(Channel(ClientCredentials({.ca_file = Pki("ca.pem")})), "", &response);
  ASSERT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
  EXPECT_EQ(response.token_ids_size(), 3);
  // "localhost" is in the certificate too.
  const std::string localhost =
      "localhost:" + gateway_->address().substr(gateway_->address().rfind(':') + 1);
  EXPECT_TRUE(
      Generate(grpc::CreateChannel(localhost, ClientCredentials({.ca_file = Pki("ca.pem")}))).ok());
  EXPECT_TRUE(HealthCheck(Channel(ClientCredentials({.ca_file = Pki("ca.pem")}))).ok());
}

TEST_F(GatewayTlsTest, PlaintextClientFails) {
  ASSERT_NE(gateway_, nullptr);
  grpc::Status status = Generate(Channel(grpc::InsecureChannelCredentials()));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_FALSE(HealthCheck(Channel(grpc::InsecureChannelCredentials())).ok());
}

TEST_F(GatewayTlsTest, ClientTrustingAnotherCaFails) {
  ASSERT_NE(gateway_, nullptr);
  grpc::Status status = Generate(Channel(ClientCredentials({.ca_file = Pki("wrong-ca.pem")})));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
}

// With --tls-client-ca: mutual TLS on the public API.
TEST(GatewayMutualTlsTest, OnlyClientsWithACertificateFromTheCa) {
  GatewayOptions options;
  options.tls_cert_file = Pki("server.pem");
  options.tls_key_file = Pki("server.key");
  options.tls_client_ca_file = Pki("ca.pem");
  std::unique_ptr<Gateway> gateway = StartGateway(options);
  ASSERT_NE(gateway, nullptr);
  auto channel = [&](const rpc::TlsFiles& files) {
    return grpc::CreateChannel(gateway->address(), ClientCredentials(files));
  };
  grpc::Status ok = Generate(channel(ClientFiles()));
  EXPECT_TRUE(ok.ok()) << ok.error_message();
  EXPECT_TRUE(HealthCheck(channel(ClientFiles())).ok());
  EXPECT_EQ(Generate(channel({.ca_file = Pki("ca.pem")})).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Generate(channel({.cert_file = Pki("wrong-client.pem"),
                              .key_file = Pki("wrong-client.key"),
                              .ca_file = Pki("ca.pem")}))
                .error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Generate(grpc::CreateChannel(gateway->address(), grpc::InsecureChannelCredentials()))
                .error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

// ---------------------------------------------------------------------------
// (b) Mutual TLS between the gateway and the experts.

class ExpertMutualTlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Every expert of tiny-mixtral in one shard that requires client certificates.
    ExpertProcessOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.experts = "0,1,2,3,4,5,6,7";
    options.tls = ServerFiles();  // with a CA: mutual TLS
    auto shard = ExpertProcess::Start(options);
    ASSERT_TRUE(shard.ok()) << shard.status();
    shard_ = shard->release();
    auto config = LoadModelConfig(testing::TinyMixtralDir());
    ASSERT_TRUE(config.ok());
    config_ = new ModelConfig(*config);
  }
  static void TearDownTestSuite() {
    delete shard_;
    delete config_;
    shard_ = nullptr;
    config_ = nullptr;
  }

  // Every expert mapped to the one shard.
  static std::string Spec() {
    std::vector<std::string> entries;
    for (int e = 0; e < 8; ++e) entries.push_back(absl::StrCat(e, "=", shard_->address()));
    return absl::StrJoin(entries, ";");
  }

  static absl::StatusOr<std::unique_ptr<RemoteExpertBackend>> Connect(
      std::shared_ptr<grpc::ChannelCredentials> credentials) {
    auto topology = ParseExpertTopology(Spec(), 8);
    EXPECT_TRUE(topology.ok()) << topology.status();
    RemoteExpertOptions options;
    options.connect_timeout_ms = 2000;
    options.credentials = std::move(credentials);
    return RemoteExpertBackend::Connect(*topology, *config_, testing::TinyMixtralDir(), options);
  }

  static ExpertProcess* shard_;
  static ModelConfig* config_;
};
ExpertProcess* ExpertMutualTlsTest::shard_ = nullptr;
ModelConfig* ExpertMutualTlsTest::config_ = nullptr;

TEST_F(ExpertMutualTlsTest, GatewayCertificateIsAccepted) {
  ASSERT_NE(shard_, nullptr);
  auto backend = Connect(ClientCredentials(ClientFiles()));
  ASSERT_TRUE(backend.ok()) << backend.status();
}

TEST_F(ExpertMutualTlsTest, PlaintextIsRefused) {
  ASSERT_NE(shard_, nullptr);
  auto backend = Connect(grpc::InsecureChannelCredentials());
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(backend.status().message(), HasSubstr("no answer to GetShardInfo within 2000 ms"));
  EXPECT_THAT(backend.status().message(), HasSubstr(shard_->address()));
}

TEST_F(ExpertMutualTlsTest, CertificateFromAnotherCaIsRefused) {
  ASSERT_NE(shard_, nullptr);
  auto backend = Connect(ClientCredentials({.cert_file = Pki("wrong-client.pem"),
                                            .key_file = Pki("wrong-client.key"),
                                            .ca_file = Pki("ca.pem")}));
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(backend.status().message(), HasSubstr("no answer to GetShardInfo"));
}

TEST_F(ExpertMutualTlsTest, TlsWithoutClientCertificateIsRefused) {
  ASSERT_NE(shard_, nullptr);
  auto backend = Connect(ClientCredentials({.ca_file = Pki("ca.pem")}));
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(ExpertMutualTlsTest, ServerCertificateFromAnotherCaIsRefused) {
  ASSERT_NE(shard_, nullptr);
  auto backend = Connect(ClientCredentials({.cert_file = Pki("client.pem"),
                                            .key_file = Pki("client.key"),
                                            .ca_file = Pki("wrong-ca.pem")}));
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(ExpertMutualTlsTest, GatewayWithExpertTlsFlagsGenerates) {
  ASSERT_NE(shard_, nullptr);
  GatewayOptions options;
  options.experts = Spec();
  options.expert_tls_ca_file = Pki("ca.pem");
  options.expert_tls_cert_file = Pki("client.pem");
  options.expert_tls_key_file = Pki("client.key");
  std::unique_ptr<Gateway> gateway = StartGateway(options);
  ASSERT_NE(gateway, nullptr);
  v1::GenerateResponse remote;
  grpc::Status status = Generate(
      grpc::CreateChannel(gateway->address(), grpc::InsecureChannelCredentials()), "", &remote);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(remote.token_ids_size(), 3);

  // The same tokens as with in-process experts.
  std::unique_ptr<Gateway> local = StartGateway(GatewayOptions());
  ASSERT_NE(local, nullptr);
  v1::GenerateResponse expected;
  ASSERT_TRUE(Generate(grpc::CreateChannel(local->address(), grpc::InsecureChannelCredentials()),
                       "", &expected)
                  .ok());
  EXPECT_EQ(std::vector<int32_t>(remote.token_ids().begin(), remote.token_ids().end()),
            std::vector<int32_t>(expected.token_ids().begin(), expected.token_ids().end()));
}

TEST_F(ExpertMutualTlsTest, GatewayWithoutTheRightExpertTlsFlagsDoesNotStartAndSaysWhy) {
  ASSERT_NE(shard_, nullptr);
  GatewayOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.experts = Spec();
  options.expert_connect_timeout_ms = 1000;
  auto plaintext = Gateway::Start(options);
  ASSERT_FALSE(plaintext.ok());
  EXPECT_EQ(plaintext.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(plaintext.status().message(), HasSubstr("no answer to GetShardInfo"));
  EXPECT_THAT(plaintext.status().message(), HasSubstr("give --expert-tls-ca"));

  options.expert_tls_ca_file = Pki("ca.pem");
  auto no_client_cert = Gateway::Start(options);
  ASSERT_FALSE(no_client_cert.ok());
  EXPECT_THAT(no_client_cert.status().message(),
              HasSubstr("experts with --tls-client-ca also need --expert-tls-cert"));

  options.expert_tls_cert_file = Pki("wrong-client.pem");
  options.expert_tls_key_file = Pki("wrong-client.key");
  auto wrong_cert = Gateway::Start(options);
  ASSERT_FALSE(wrong_cert.ok());
  EXPECT_THAT(wrong_cert.status().message(),
              HasSubstr("--expert-tls-cert must be signed by the CA of their --tls-client-ca"));
}

// ---------------------------------------------------------------------------
// (c), (d) Bearer-token auth on the Generation API.

class TokenAuthTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    GatewayOptions options;
    options.auth_token_file = TokensFile();
    gateway_ = StartGateway(options).release();
    ASSERT_NE(gateway_, nullptr);
  }
  static void TearDownTestSuite() {
    delete gateway_;
    gateway_ = nullptr;
  }
  static std::shared_ptr<grpc::Channel> Channel() {
    return grpc::CreateChannel(gateway_->address(), grpc::InsecureChannelCredentials());
  }
  static Gateway* gateway_;
};
Gateway* TokenAuthTest::gateway_ = nullptr;

TEST_F(TokenAuthTest, NoTokenIsUnauthenticated) {
  ASSERT_NE(gateway_, nullptr);
  grpc::Status status = Generate(Channel());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(status.error_message(), rpc::kInvalidBearerTokenMessage);
}

TEST_F(TokenAuthTest, WrongTokenIsUnauthenticatedAndNotEchoed) {
  ASSERT_NE(gateway_, nullptr);
  grpc::Status status = Generate(Channel(), kWrongToken);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(status.error_message(), rpc::kInvalidBearerTokenMessage);
  EXPECT_THAT(status.error_message(), Not(HasSubstr(kWrongToken)));
  EXPECT_THAT(status.error_details(), Not(HasSubstr(kWrongToken)));
  // A prefix of a right token is wrong too.
  EXPECT_EQ(Generate(Channel(), std::string(kToken).substr(0, 10)).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  // Refusals are counted; no token appears in the metrics.
  const std::string metrics = switchyard::metrics::Serialize(gateway_->metrics_registry());
  EXPECT_THAT(metrics, HasSubstr("switchyard_gateway_unauthenticated_calls_total"));
  EXPECT_THAT(metrics, Not(HasSubstr(kWrongToken)));
  EXPECT_THAT(metrics, Not(HasSubstr(kToken)));
}

TEST_F(TokenAuthTest, EveryTokenOfTheFileWorks) {
  ASSERT_NE(gateway_, nullptr);
  v1::GenerateResponse response;
  grpc::Status status = Generate(Channel(), kToken, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.token_ids_size(), 3);
  status = Generate(Channel(), kSecondToken);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(TokenAuthTest, StreamingIsGuardedToo) {
  ASSERT_NE(gateway_, nullptr);
  auto stub = v1::GenerationService::NewStub(Channel());
  for (const std::string token : {"", kWrongToken}) {
    grpc::ClientContext context;
    SetDeadline(&context);
    if (!token.empty()) rpc::AddBearerToken(&context, token);
    auto reader = stub->GenerateStream(&context, Greedy("Hello", 3));
    v1::GenerateStreamResponse message;
    int messages = 0;
    while (reader->Read(&message)) ++messages;
    grpc::Status status = reader->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(messages, 0);
  }
  grpc::ClientContext context;
  SetDeadline(&context);
  rpc::AddBearerToken(&context, kToken);
  auto reader = stub->GenerateStream(&context, Greedy("Hello", 3));
  v1::GenerateStreamResponse message;
  while (reader->Read(&message)) {
  }
  grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(TokenAuthTest, HealthNeedsNoToken) {
  ASSERT_NE(gateway_, nullptr);
  EXPECT_TRUE(HealthCheck(Channel()).ok());
  EXPECT_TRUE(HealthCheck(Channel(), v1::GenerationService::service_full_name()).ok());
}

// Calls `method` of the Generation API with an empty request message.
grpc::Status RawCall(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                     const std::string& token) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  SetDeadline(&context);
  if (!token.empty()) rpc::AddBearerToken(&context, token);
  grpc::CompletionQueue cq;
  grpc::ByteBuffer request, response;
  grpc::Slice empty("");
  request = grpc::ByteBuffer(&empty, 1);
  auto call = stub.PrepareUnaryCall(&context, method, request, &cq);
  call->StartCall();
  grpc::Status status;
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag;
  bool ok;
  EXPECT_TRUE(cq.Next(&tag, &ok));
  return status;
}

// Guards against a method added to generation.proto but not to the gateway's
// authenticating wrapper (it would answer UNIMPLEMENTED with auth on).
TEST_F(TokenAuthTest, EveryMethodOfTheServiceIsGuardedAndReachable) {
  ASSERT_NE(gateway_, nullptr);
  const google::protobuf::ServiceDescriptor* service =
      google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
          v1::GenerationService::service_full_name());
  ASSERT_NE(service, nullptr);
  ASSERT_GT(service->method_count(), 0);
  for (int i = 0; i < service->method_count(); ++i) {
    const std::string method =
        absl::StrCat("/", service->full_name(), "/", service->method(i)->name());
    grpc::Status denied = RawCall(Channel(), method, "");
    EXPECT_EQ(denied.error_code(), grpc::StatusCode::UNAUTHENTICATED) << method;
    grpc::Status allowed = RawCall(Channel(), method, kToken);
    EXPECT_NE(allowed.error_code(), grpc::StatusCode::UNAUTHENTICATED) << method;
    EXPECT_NE(allowed.error_code(), grpc::StatusCode::UNIMPLEMENTED)
        << method << " is not forwarded by the gateway's AuthenticatedGenerationService";
  }
}

// TLS and a token together, the token sent as call credentials.
TEST(TokenAuthOverTlsTest, CallCredentialsCarryTheToken) {
  GatewayOptions options;
  options.tls_cert_file = Pki("server.pem");
  options.tls_key_file = Pki("server.key");
  options.auth_token_file = TokensFile();
  std::unique_ptr<Gateway> gateway = StartGateway(options);
  ASSERT_NE(gateway, nullptr);
  auto tls = ClientCredentials({.ca_file = Pki("ca.pem")});
  auto with_token = grpc::CreateChannel(
      gateway->address(),
      grpc::CompositeChannelCredentials(tls, rpc::BearerTokenCredentials(kSecondToken)));
  grpc::Status status = Generate(with_token);
  EXPECT_TRUE(status.ok()) << status.error_message();
  auto wrong = grpc::CreateChannel(
      gateway->address(),
      grpc::CompositeChannelCredentials(tls, rpc::BearerTokenCredentials(kWrongToken)));
  status = Generate(wrong);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(status.error_message(), Not(HasSubstr(kWrongToken)));
  EXPECT_EQ(Generate(grpc::CreateChannel(gateway->address(), tls)).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(HealthCheck(grpc::CreateChannel(gateway->address(), tls)).ok());
}

}  // namespace
}  // namespace switchyard
