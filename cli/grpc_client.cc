#include "cli/grpc_client.h"

#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "rpc/auth.h"
#include "rpc/status.h"
#include "rpc/tls.h"

namespace switchyard::cli {

namespace {

// Written once by ConfigureClientSecurity before any channel exists.
std::shared_ptr<grpc::ChannelCredentials>& Credentials() {
  static auto* credentials = new std::shared_ptr<grpc::ChannelCredentials>();
  return *credentials;
}
std::string& Token() {
  static auto* token = new std::string();
  return *token;
}

}  // namespace

absl::Status ConfigureClientSecurity(const Flags& flags) {
  const auto ca = flags.Get("tls-ca"), cert = flags.Get("tls-cert"), key = flags.Get("tls-key");
  if (ca || cert || key) {
    if (cert.has_value() != key.has_value()) {
      return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
    }
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
        rpc::ChannelCredentialsFromFiles({.cert_file = cert.value_or(""),
                                          .key_file = key.value_or(""),
                                          .ca_file = ca.value_or("")});
    if (!credentials.ok()) return credentials.status();
    Credentials() = *std::move(credentials);
  }
  if (auto path = flags.Get("auth-token-file")) {
    absl::StatusOr<std::string> token = rpc::ReadBearerTokenFile(*path);
    if (!token.ok()) return token.status();
    Token() = *std::move(token);
  }
  return absl::OkStatus();
}

void PrepareContext(grpc::ClientContext& context) {
  if (!Token().empty()) rpc::AddBearerToken(&context, Token());
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, bool own_connection) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  if (own_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  auto credentials = Credentials() ? Credentials() : grpc::InsecureChannelCredentials();
  return grpc::CreateCustomChannel(target, credentials, args);
}

const char* ProtoFinishReasonName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_EOS:
      return "eos";
    case v1::FINISH_REASON_STOP_SEQUENCE:
      return "stop";
    case v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    default:
      return "unspecified";
  }
}

absl::Status RpcError(const grpc::Status& status) { return rpc::FromGrpcStatus(status); }

std::string StatusLine(const absl::Status& status) {
  return absl::StrCat(
      rpc::GrpcCodeName(static_cast<grpc::StatusCode>(static_cast<int>(status.code()))), ": ",
      std::string(status.message()));
}

absl::StatusOr<bool> IsServing(const std::shared_ptr<grpc::Channel>& channel,
                               const std::string& service, std::chrono::milliseconds timeout) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return RpcError(status);
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

}  // namespace switchyard::cli
