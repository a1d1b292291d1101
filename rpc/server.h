// Starting a gRPC server the Switchyard way: the services given, standard
// health checking (grpc.health.v1, rpc/health_service.h) and server
// reflection (grpc.reflection.v1, rpc/reflection_service.h, and gRPC's own
// grpc.reflection.v1alpha) on every server, message size limits, and
// optional connection max-age.
//
// Thread-safety: RunningServer methods are thread-safe.
#ifndef SWITCHYARD_RPC_SERVER_H_
#define SWITCHYARD_RPC_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "rpc/health_service.h"
#include "rpc/reflection_service.h"

namespace switchyard::rpc {

struct ServerOptions {
  // "HOST:PORT" (port 0 picks a free one) or "unix:/path". Required.
  std::string listen_address;
  // Largest request or response message. Default 256 MiB.
  int max_message_bytes = 256 << 20;
  // Largest request message, when smaller than max_message_bytes: size it to
  // the largest legal request so an oversized one is refused
  // (RESOURCE_EXHAUSTED) before it is read into memory. Default 0: the same
  // as max_message_bytes.
  int max_receive_message_bytes = 0;
  // Close connections older than this so clients re-resolve and discover new
  // replicas (Kubernetes scale-up). 0 (default): never.
  int max_connection_age_ms = 0;
  // Transport credentials. Default (nullptr): plaintext. For TLS and mutual
  // TLS from PEM files see rpc/tls.h (ServerCredentialsFromFiles).
  std::shared_ptr<grpc::ServerCredentials> credentials;
  // Fully qualified service names whose health is reported next to the
  // whole server's "" (e.g. "switchyard.v1.ExpertService"). Default: none.
  std::vector<std::string> health_service_names;
};

class RunningServer {
 public:
  // Builds and starts the server with `services` (not owned; they must outlive
  // it). Health starts as SERVING.
  static absl::StatusOr<std::unique_ptr<RunningServer>> Start(
      const ServerOptions& options, const std::vector<grpc::Service*>& services);
  ~RunningServer();

  // The bound port (0 for unix sockets).
  int port() const { return port_; }
  // Address clients can dial: "127.0.0.1:PORT"-style for TCP, the unix target otherwise.
  const std::string& address() const { return address_; }

  // Health for the whole server ("") and every service.
  void SetServing(bool serving);
  // Health NOT_SERVING (ending every health Watch), then stops accepting
  // calls and waits for calls in flight until `deadline`.
  void Shutdown(std::chrono::system_clock::time_point deadline);
  void Wait();

 private:
  RunningServer() = default;

  std::unique_ptr<HealthService> health_;               // outlives server_
  std::unique_ptr<ReflectionV1Service> reflection_v1_;  // outlives server_
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string address_;
};

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_SERVER_H_
