// The standard gRPC health service (grpc.health.v1.Health: Check and Watch),
// served by every Switchyard server in place of gRPC's built-in one.
//
// Why not the built-in one: it never ends a Watch, so one open watch (gRPC
// client-side health checking, a mesh's health checker) holds
// grpc::Server::Shutdown until its deadline and a process that has nothing
// left to do waits out its whole grace period. Here Shutdown() sends every
// watcher NOT_SERVING and then ends its stream with UNAVAILABLE.
//
// Names: "" is the whole server; others are registered at construction.
// Check answers NOT_FOUND for unknown names; Watch reports SERVICE_UNKNOWN
// for them (the protocol's rule), and every change after that.
//
// Thread-safety: thread-safe. Destroy after the grpc::Server it serves.
#ifndef SWITCHYARD_RPC_HEALTH_SERVICE_H_
#define SWITCHYARD_RPC_HEALTH_SERVICE_H_

#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"

namespace switchyard::rpc {

class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  // Every name in `names` and "" start NOT_SERVING.
  explicit HealthService(const std::vector<std::string>& names);
  ~HealthService() override;

  // Sets every known name to SERVING or NOT_SERVING and tells the watchers.
  // Ignored after Shutdown (which leaves everything NOT_SERVING).
  void SetServing(bool serving);
  // NOT_SERVING for everything, then ends every Watch (UNAVAILABLE) once its
  // last status is written, and ends new ones at once. Idempotent.
  void Shutdown();

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* context,
      const grpc::health::v1::HealthCheckRequest* request) override;

 private:
  class Watcher;
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  // Called by a watcher when gRPC is done with it.
  void Forget(Watcher* watcher);
  // The watchers, each with a reference the caller drops (Unref).
  std::vector<Watcher*> ReferencedWatchersLocked();
  // A name's status; SERVICE_UNKNOWN for names never registered.
  ServingStatus StatusOf(const std::string& name);

  std::mutex mu_;
  std::map<std::string, ServingStatus> statuses_;  // guarded by mu_
  std::set<Watcher*> watchers_;                    // guarded by mu_
  bool shut_down_ = false;                         // guarded by mu_
  std::condition_variable all_forgotten_;          // watchers_ became empty
};

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_HEALTH_SERVICE_H_
