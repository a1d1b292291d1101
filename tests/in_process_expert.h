// In-process expert servers for tests and bench/dispatch_bench: the real
// ExpertServiceImpl on a real gRPC server (rpc::RunningServer), optionally
// behind an ObservedExpertService that counts and timestamps the calls, and
// owning what the service computes with (the store loaded from a checkpoint,
// the backend chain). Set up and torn down by one thread; the servers
// themselves take calls from any thread.
#ifndef SWITCHYARD_TESTS_IN_PROCESS_EXPERT_H_
#define SWITCHYARD_TESTS_IN_PROCESS_EXPERT_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/checkpoint.h"
#include "core/model_config.h"
#include "expert_service/expert_backend.h"
#include "expert_service/expert_ffn.h"
#include "expert_service/expert_server.h"
#include "expert_service/frame_server.h"
#include "rpc/server.h"
#include "switchyard/v1/expert.grpc.pb.h"

namespace switchyard::testing {

// Forwards every RPC to the real service, counting unary Forward calls and
// streams and recording (steady clock, ns) when the last Forward reached it.
class ObservedExpertService final : public v1::ExpertService::CallbackService {
 public:
  explicit ObservedExpertService(ExpertServiceImpl* real) : real_(real) {}
  grpc::ServerUnaryReactor* GetShardInfo(grpc::CallbackServerContext* context,
                                         const v1::GetShardInfoRequest* request,
                                         v1::ShardInfo* response) override {
    return real_->GetShardInfo(context, request, response);
  }
  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* context,
                                    const v1::ForwardRequest* request,
                                    v1::ForwardResponse* response) override {
    forward_received_ns.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::steady_clock::now().time_since_epoch())
                                  .count(),
                              std::memory_order_relaxed);
    unary_calls.fetch_add(1);
    return real_->Forward(context, request, response);
  }
  grpc::ServerBidiReactor<v1::ForwardStreamRequest, v1::ForwardStreamResponse>* ForwardStream(
      grpc::CallbackServerContext* context) override {
    streams.fetch_add(1);
    return real_->ForwardStream(context);
  }

  std::atomic<int> unary_calls{0};
  std::atomic<int> streams{0};
  std::atomic<int64_t> forward_received_ns{0};

 private:
  ExpertServiceImpl* real_;
};

// A running expert server and everything its service uses. Members are torn
// down in reverse order: the server first (so no call reaches a dead
// service), then the service, then the compute it called.
struct InProcessExpert {
  std::unique_ptr<ExpertStore> store;  // loaded by LoadCheckpointExperts, else null
  // The backend chain the service computes with; the last one is the one it
  // calls (each may wrap the one before it).
  std::vector<std::unique_ptr<ExpertBackend>> compute;
  std::unique_ptr<ExpertServiceImpl> service;
  std::unique_ptr<ObservedExpertService> observed;  // in front of `service` when observed
  std::unique_ptr<ForwardFrameServer> frames;       // ServeFrames; else null
  std::unique_ptr<rpc::RunningServer> server;
  // What Stop() and the destructor give calls in flight before cancelling
  // them. Default 2 s.
  std::chrono::milliseconds stop_grace{2000};

  std::string address() const { return server->address(); }

  // Stops the server (calls still running after `grace` are cancelled), then
  // the service. Idempotent.
  void Stop(std::chrono::milliseconds grace) {
    StopFrames();
    if (server) {
      server->Shutdown(std::chrono::system_clock::now() + grace);
      server.reset();
    }
    if (service) service->Shutdown();
  }
  void Stop() { Stop(stop_grace); }

  // Starts a frame socket on `listen` for the running service (TLS with
  // `tls`) and reports it in ShardInfo (a new one replaces the last: a shard
  // restarted with its gRPC address kept), announcing `frame_version`.
  absl::Status ServeFrames(const std::string& listen = "127.0.0.1:0",
                           std::shared_ptr<const rpc::FrameTlsContext> tls = nullptr,
                           int request_spin_us = 0, int frame_version = rpc::kFrameVersion) {
    StopFrames();
    auto started = ForwardFrameServer::Start(service.get(), {.listen = listen,
                                                             .tls = std::move(tls),
                                                             .request_spin_us = request_spin_us,
                                                             .frame_version = frame_version});
    if (!started.ok()) return started.status();
    frames = *std::move(started);
    service->SetFrameEndpoint(frames->endpoint());
    return absl::OkStatus();
  }
  // Closes the frame socket and its connections (ShardInfo still names it).
  void StopFrames() {
    if (frames) frames->Shutdown();
  }
  ~InProcessExpert() { Stop(); }

  // Appends a backend to the chain and returns it (typed).
  template <typename B>
  B* AddCompute(std::unique_ptr<B> backend) {
    B* raw = backend.get();
    compute.push_back(std::move(backend));
    return raw;
  }

  // Loads experts `experts` (all layers) of the checkpoint in `dir` into
  // `store`, adds a LocalExpertBackend on it to `compute` and returns what
  // the shard serves.
  absl::StatusOr<ShardDescription> LoadCheckpointExperts(const std::string& dir,
                                                         const std::vector<int>& experts) {
    auto checkpoint = Checkpoint::Open(dir, WeightSelection::ExpertsOnly(experts));
    if (!checkpoint.ok()) return checkpoint.status();
    auto loaded = ExpertStore::Load(**checkpoint);
    if (!loaded.ok()) return loaded.status();
    store = *std::move(loaded);
    AddCompute(std::make_unique<LocalExpertBackend>(store.get()));
    return DescribeShard(dir, **checkpoint);
  }

  // Starts the service over the last backend of `compute` and a server on
  // `listen` ("127.0.0.1:0": a free port; "unix:/path"), behind an
  // ObservedExpertService when `observe`; TLS with `credentials`.
  absl::Status Serve(const ModelConfig& config, ShardDescription description,
                     ExpertServerOptions options, const std::string& listen = "127.0.0.1:0",
                     bool observe = false,
                     std::shared_ptr<grpc::ServerCredentials> credentials = nullptr) {
    if (compute.empty()) return absl::FailedPreconditionError("InProcessExpert: no compute");
    service = std::make_unique<ExpertServiceImpl>(config, compute.back().get(),
                                                  std::move(description), std::move(options));
    grpc::Service* front = service.get();
    if (observe) {
      observed = std::make_unique<ObservedExpertService>(service.get());
      front = observed.get();
    }
    rpc::ServerOptions server_options;
    server_options.listen_address = listen;
    server_options.credentials = std::move(credentials);
    auto started = rpc::RunningServer::Start(server_options, {front});
    if (!started.ok()) return started.status();
    server = *std::move(started);
    return absl::OkStatus();
  }
};

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_IN_PROCESS_EXPERT_H_
