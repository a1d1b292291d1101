#include "expert_service/frame_server.h"

#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <random>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace switchyard {
namespace {

// 128 random bits as hex: unique to this server for its callers' purposes.
std::string RandomToken() {
  std::random_device random;
  std::string token;
  for (int i = 0; i < 4; ++i) absl::StrAppendFormat(&token, "%08x", random());
  return token;
}

}  // namespace

std::string DefaultFrameListen(const std::string& grpc_listen) {
  if (absl::StartsWith(grpc_listen, "unix:")) return grpc_listen + ".frames";
  return grpc_listen.substr(0, grpc_listen.rfind(':')) + ":0";
}

class ForwardFrameServer::Connection final : public ForwardReplySink {
 public:
  Connection(ForwardFrameServer* server, rpc::FrameSocket socket)
      : server_(server), socket_(std::move(socket)) {}

  void Start() {
    thread_ = std::thread([this] { Run(); });
  }
  // Makes the reader see the end of the stream (it then finishes what it
  // accepted and closes).
  void StopReading() {
    std::lock_guard<std::mutex> lock(socket_mu_);
    if (socket_.valid()) shutdown(socket_.fd(), SHUT_RD);
  }
  // Breaks the connection: nothing more is read or written.
  void Abort() {
    std::lock_guard<std::mutex> lock(socket_mu_);
    broken_ = true;
    if (socket_.valid()) shutdown(socket_.fd(), SHUT_RDWR);
  }
  bool finished() const { return finished_.load(); }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }

  void Reply(std::unique_ptr<v1::ForwardStreamResponse> response, ReplyTail tail) override {
    {
      std::lock_guard<std::mutex> lock(socket_mu_);
      if (!broken_ && socket_.valid()) {
        const absl::Time deadline =
            absl::Now() + absl::Milliseconds(server_->options_.write_timeout_ms);
        // In the request's frame version; outputs encoded straight into the frame.
        const absl::Status written = tail.present
                                         ? rpc::WriteMessageFrameWithTail(
                                               socket_, *response, tail.bytes,
                                               [&](char* bytes) {
                                                 if (tail.write) tail.write(bytes);
                                               },
                                               deadline)
                                         : rpc::WriteMessageFrame(socket_, *response, deadline);
        if (!written.ok()) {
          // The gateway is gone or stopped reading: end the connection; the
          // gateway fails what it waits for on it and retries elsewhere.
          broken_ = true;
          shutdown(socket_.fd(), SHUT_RDWR);
        }
      }
    }
    std::lock_guard<std::mutex> lock(pending_mu_);
    --pending_;
    pending_cv_.notify_all();
  }

 private:
  void Run() {
    // No reply can be written before the first request, so the handshake
    // and the greeting need no lock.
    bool ok = true;
    if (server_->options_.tls != nullptr) {
      const absl::Status handshake =
          rpc::StartServerTls(socket_, *server_->options_.tls, absl::Now() + absl::Seconds(5));
      if (!handshake.ok()) {
        ok = false;
        server_->tls_failures_.fetch_add(1, std::memory_order_relaxed);
        if (!server_->tls_failure_logged_.exchange(true)) {
          std::fprintf(stderr,
                       "switchyard-expert: frame socket: a connection failed TLS (%s); later "
                       "failures are counted, not logged\n",
                       std::string(handshake.message()).c_str());
        }
      }
    }
    ok = ok &&
         rpc::WriteFrame(socket_, server_->endpoint_.token, absl::Now() + absl::Seconds(5)).ok();
    while (ok) {
      // No deadline between requests: a gateway keeps its connections.
      if (!rpc::WaitReadable(socket_, absl::InfiniteFuture(),
                             absl::Microseconds(server_->options_.request_spin_us))) {
        break;
      }
      auto request = std::make_unique<v1::ForwardStreamRequest>();
      rpc::FrameTail tail;
      // Once a frame starts, the rest of it is on its way.
      if (!rpc::ReadMessageFrame(socket_, server_->options_.max_request_bytes,
                                 absl::Now() + absl::Seconds(30), request.get(), &tail)
               .ok()) {
        break;
      }
      const int64_t received = ExpertServiceImpl::NowMicros();
      server_->requests_read_.fetch_add(1, std::memory_order_relaxed);
      if (tail.present) server_->requests_with_tail_read_.fetch_add(1, std::memory_order_relaxed);
      {
        std::lock_guard<std::mutex> lock(pending_mu_);
        ++pending_;
      }
      server_->service_->AcceptForwardRequest(std::move(request), received, this,
                                              /*own_thread=*/true, std::move(tail));
    }
    // Every accepted request is answered before the socket closes.
    {
      std::unique_lock<std::mutex> lock(pending_mu_);
      pending_cv_.wait(lock, [this] { return pending_ == 0; });
    }
    {
      std::lock_guard<std::mutex> lock(socket_mu_);
      socket_.Close();
    }
    finished_.store(true);
  }

  ForwardFrameServer* const server_;
  std::mutex socket_mu_;     // serialises replies; guards closing
  rpc::FrameSocket socket_;  // guarded by socket_mu_ once Run started
  bool broken_ = false;      // a reply failed; guarded by socket_mu_
  std::mutex pending_mu_;
  std::condition_variable pending_cv_;
  int pending_ = 0;  // requests accepted and not yet answered; pending_mu_
  std::atomic<bool> finished_{false};
  std::thread thread_;
};

absl::StatusOr<std::unique_ptr<ForwardFrameServer>> ForwardFrameServer::Start(
    ExpertServiceImpl* service, FrameServerOptions options) {
  if (options.request_spin_us < 0 || options.request_spin_us > rpc::kMaxSpinUs) {
    return absl::InvalidArgumentError(absl::StrCat("frame socket: request spin must be 0..",
                                                   rpc::kMaxSpinUs, " us, got ",
                                                   options.request_spin_us));
  }
  if (options.frame_version < 1 || options.frame_version > rpc::kFrameVersion) {
    return absl::InvalidArgumentError(absl::StrCat("frame socket: frame version must be 1..",
                                                   rpc::kFrameVersion, ", got ",
                                                   options.frame_version));
  }
  int port = 0;
  absl::StatusOr<rpc::FrameSocket> listener = rpc::ListenFrames(options.listen, &port);
  if (!listener.ok()) return listener.status();
  FrameEndpoint endpoint;
  endpoint.port = static_cast<uint32_t>(port);
  if (absl::StartsWith(options.listen, "unix:")) endpoint.unix_path = options.listen.substr(5);
  endpoint.token = RandomToken();
  endpoint.version = static_cast<uint32_t>(options.frame_version);
  std::unique_ptr<ForwardFrameServer> server(new ForwardFrameServer(
      service, std::move(options), std::move(*listener), std::move(endpoint)));
  server->accept_thread_ = std::thread([s = server.get()] { s->AcceptLoop(); });
  return server;
}

ForwardFrameServer::ForwardFrameServer(ExpertServiceImpl* service, FrameServerOptions options,
                                       rpc::FrameSocket listener, FrameEndpoint endpoint)
    : service_(service),
      options_(std::move(options)),
      listener_(std::move(listener)),
      endpoint_(std::move(endpoint)) {}

ForwardFrameServer::~ForwardFrameServer() { Shutdown(); }

void ForwardFrameServer::AcceptLoop() {
  for (;;) {
    absl::StatusOr<rpc::FrameSocket> socket = rpc::AcceptFrames(listener_.fd());
    std::list<std::shared_ptr<Connection>> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      if (!socket.ok()) {
        // Out of descriptors, say: let connections close before trying again.
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        continue;
      }
      for (auto it = connections_.begin(); it != connections_.end();) {
        if ((*it)->finished()) {
          done.push_back(std::move(*it));
          it = connections_.erase(it);
        } else {
          ++it;
        }
      }
      connections_accepted_.fetch_add(1, std::memory_order_relaxed);
      auto connection = std::make_shared<Connection>(this, std::move(*socket));
      connection->Start();
      connections_.push_back(std::move(connection));
    }
    for (auto& c : done) c->Join();
  }
}

void ForwardFrameServer::AbortConnections() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& c : connections_) c->Abort();
}

void ForwardFrameServer::Shutdown() {
  std::call_once(shutdown_once_, [this] {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    // Wakes the accept (it then sees stopping_).
    shutdown(listener_.fd(), SHUT_RDWR);
    accept_thread_.join();
    listener_.Close();
    if (!endpoint_.unix_path.empty()) unlink(endpoint_.unix_path.c_str());
    std::list<std::shared_ptr<Connection>> connections;
    {
      std::lock_guard<std::mutex> lock(mu_);
      connections.swap(connections_);
    }
    for (auto& c : connections) c->StopReading();
    for (auto& c : connections) c->Join();
  });
}

}  // namespace switchyard
