#include "rpc/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace switchyard::rpc {

absl::StatusOr<std::unique_ptr<RunningServer>> RunningServer::Start(
    const ServerOptions& options, const std::vector<grpc::Service*>& services) {
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  auto server = std::unique_ptr<RunningServer>(new RunningServer());
  server->health_ = std::make_unique<HealthService>(options.health_service_names);
  server->reflection_v1_ = std::make_unique<ReflectionV1Service>();
  grpc::ServerBuilder builder;
  int selected_port = 0;
  auto credentials = options.credentials ? options.credentials : grpc::InsecureServerCredentials();
  builder.AddListeningPort(options.listen_address, credentials, &selected_port);
  // Without this gRPC sets SO_REUSEPORT and a second server on a busy port
  // silently shares it instead of failing.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes > 0
                                       ? options.max_receive_message_bytes
                                       : options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  if (options.max_connection_age_ms > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, options.max_connection_age_ms);
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, 30000);
  }
  builder.RegisterService(server->health_.get());
  AddReflectionV1(builder, server->reflection_v1_.get());
  for (grpc::Service* s : services) builder.RegisterService(s);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr) {
    return absl::UnavailableError(absl::StrCat(
        "could not listen on ", options.listen_address,
        options.credentials ? " (address in use or invalid, or TLS credentials refused)"
                            : " (address in use or invalid)"));
  }
  const bool is_unix = absl::StartsWith(options.listen_address, "unix:");
  if (!is_unix && selected_port == 0) {
    return absl::UnavailableError(absl::StrCat("could not bind ", options.listen_address));
  }
  server->port_ = is_unix ? 0 : selected_port;
  if (is_unix) {
    server->address_ = options.listen_address;
  } else {
    std::string host = options.listen_address.substr(0, options.listen_address.rfind(':'));
    if (host.empty() || host == "0.0.0.0" || host == "[::]") host = "127.0.0.1";
    server->address_ = absl::StrCat(host, ":", selected_port);
  }
  server->SetServing(true);
  return server;
}

RunningServer::~RunningServer() {
  health_->Shutdown();
  if (server_) {
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
  }
}

void RunningServer::SetServing(bool serving) { health_->SetServing(serving); }

void RunningServer::Shutdown(std::chrono::system_clock::time_point deadline) {
  // NOT_SERVING to every watcher, and their streams end, so an open Watch
  // does not hold the server until the deadline.
  health_->Shutdown();
  server_->Shutdown(deadline);
}

void RunningServer::Wait() { server_->Wait(); }

}  // namespace switchyard::rpc
