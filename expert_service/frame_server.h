// The expert shard's frame socket (rpc/frame_socket.h): ForwardStream's
// requests and responses as length-prefixed frames on a TCP or unix socket,
// next to the gRPC server, for the gateway's hot path; TLS where the gRPC
// server has it (FrameServerOptions::tls).
//
// Each connection gets a thread of its own that reads a request, hands it to
// ExpertServiceImpl::AcceptForwardRequest and, when the shard is idle,
// computes it right there (no thread hop between the socket and the
// compute; the thread keeps its OpenMP team warm); under load the request
// queues to the service's workers like a gRPC one, and the reply is written
// by whichever thread finished it (writes serialised per connection). A
// connection ends when the gateway closes it, a write fails, or the server
// shuts down; it closes only after every request it accepted is answered.
//
// Thread-safety: Shutdown and the accessors may be called from any thread.
// The service must outlive the server.
#ifndef SWITCHYARD_EXPERT_SERVICE_FRAME_SERVER_H_
#define SWITCHYARD_EXPERT_SERVICE_FRAME_SERVER_H_

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "expert_service/expert_server.h"
#include "rpc/frame_socket.h"

namespace switchyard {

struct FrameServerOptions {
  // "HOST:PORT" (port 0 picks a free one) or "unix:PATH". Required.
  std::string listen;
  // Largest request frame accepted; a larger one closes the connection.
  // Default 256 MiB.
  size_t max_request_bytes = size_t{256} << 20;
  // How long a reply may wait for the gateway to read before the connection
  // is given up, in ms. Default 30000.
  int write_timeout_ms = 30000;
  // TLS for every connection (rpc/tls.h FrameServerTlsFromFiles, from the
  // gRPC server's files): the handshake comes before the greeting, and a
  // connection that fails it is closed. Null (default): plaintext.
  std::shared_ptr<const rpc::FrameTlsContext> tls;
  // How long a connection's thread polls for the next request without
  // sleeping before it blocks (rpc::PollSpinning), in us: a request that
  // comes within it costs no wake-up, at the price of a busy core meanwhile.
  // Pays where the shard has a core per connection to spare. Default 0.
  int request_spin_us = 0;
  // The frame version announced in ShardInfo.frame_version, 1 or 2: a
  // gateway sends version 2 frames only where it says 2. Either way the
  // server reads both and answers each request in its version. Default
  // rpc::kFrameVersion (2); 1 stands in for an older shard (tests, and
  // measuring what version 2 saves).
  int frame_version = rpc::kFrameVersion;
};

// Where a shard's frame socket listens by default, given its gRPC listen
// address: "HOST:0" (the same host, a free port) for "HOST:PORT", or
// "unix:PATH.frames" for "unix:PATH".
std::string DefaultFrameListen(const std::string& grpc_listen);

class ForwardFrameServer {
 public:
  // Listens and starts accepting; requests go to `service`.
  static absl::StatusOr<std::unique_ptr<ForwardFrameServer>> Start(ExpertServiceImpl* service,
                                                                   FrameServerOptions options);
  ~ForwardFrameServer();  // Shutdown()

  ForwardFrameServer(const ForwardFrameServer&) = delete;
  ForwardFrameServer& operator=(const ForwardFrameServer&) = delete;

  // What ShardInfo reports: the bound TCP port or unix path, and the token
  // every connection's greeting carries (random, per server).
  const FrameEndpoint& endpoint() const { return endpoint_; }

  // Stops accepting and reading; requests already read are answered, then
  // every connection closes (a gateway fails what it still waited for on it
  // UNAVAILABLE and retries elsewhere); joins every thread. Idempotent.
  // Call while the service's workers still run (before its Shutdown).
  void Shutdown();

  // Breaks every open connection at once, as a crash would: requests in
  // flight on them are never answered (their replies are dropped). The
  // server keeps accepting. For fault tests.
  void AbortConnections();

  // Connections accepted so far, and requests read over all of them.
  uint64_t connections_accepted() const { return connections_accepted_.load(); }
  uint64_t requests_read() const { return requests_read_.load(); }
  // Of those, the version 2 frames (rows after the message).
  uint64_t requests_with_tail_read() const { return requests_with_tail_read_.load(); }
  // Connections closed because their TLS handshake failed (the first one
  // is logged with its reason).
  uint64_t tls_failures() const { return tls_failures_.load(); }

 private:
  class Connection;
  ForwardFrameServer(ExpertServiceImpl* service, FrameServerOptions options,
                     rpc::FrameSocket listener, FrameEndpoint endpoint);
  void AcceptLoop();

  ExpertServiceImpl* const service_;
  const FrameServerOptions options_;
  rpc::FrameSocket listener_;
  const FrameEndpoint endpoint_;
  std::atomic<uint64_t> connections_accepted_{0};
  std::atomic<uint64_t> requests_read_{0};
  std::atomic<uint64_t> requests_with_tail_read_{0};
  std::atomic<uint64_t> tls_failures_{0};
  std::atomic<bool> tls_failure_logged_{false};
  std::mutex mu_;
  bool stopping_ = false;  // guarded by mu_
  // Live connections and their reader threads; finished ones are joined
  // and dropped as new ones come, the rest at Shutdown. Guarded by mu_.
  std::list<std::shared_ptr<Connection>> connections_;
  std::thread accept_thread_;
  std::once_flag shutdown_once_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_EXPERT_SERVICE_FRAME_SERVER_H_
