#include "rpc/health_service.h"

#include <atomic>
#include <utility>

namespace switchyard::rpc {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// One Watch call. Writes one status at a time; a status that changes while a
// write is in flight is written after it (only the newest).
//
// No lock is held while calling into gRPC (StartWrite, Finish): their
// reactions may run inline on the calling thread and take the same locks.
// Lifetime: gRPC holds one reference until OnDone, and the service takes one
// for each Update it makes outside its lock, so the watcher outlives both.
class HealthService::Watcher final : public grpc::ServerWriteReactor<HealthCheckResponse> {
 public:
  Watcher(HealthService* service, std::string name) : service_(service), name_(std::move(name)) {}

  const std::string& name() const { return name_; }
  void Ref() { refs_.fetch_add(1, std::memory_order_relaxed); }
  void Unref() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  // Queues `status` for writing; with `end`, finishes the call once written.
  void Update(ServingStatus status, bool end) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cancelled_) return;  // nobody to tell
      if (status != last_queued_) {
        pending_ = status;
        has_pending_ = true;
        last_queued_ = status;
      }
      end_ = end_ || end;
    }
    Pump();
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok) {  // the client went away: nothing more to write
        cancelled_ = true;
        end_ = true;
        has_pending_ = false;
      }
    }
    Pump();
  }

  void OnCancel() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
      end_ = true;
      has_pending_ = false;
      // A write claimed by Pump may not have been started yet: finishing now
      // could let it start after Finish. Its OnWriteDone finishes instead.
      if (finished_ || writing_) return;
      finished_ = true;
    }
    Finish(grpc::Status::CANCELLED);
  }

  void OnDone() override {
    service_->Forget(this);
    Unref();
  }

 private:
  ~Watcher() override = default;

  // Starts the next write, or the finish, if it is due and nothing is in
  // flight. The decision and its claim (writing_ or finished_) are made in one
  // critical section, so at most one thread acts on the call at a time and
  // nothing is started after Finish.
  void Pump() {
    enum { kNothing, kWrite, kFinish } action = kNothing;
    bool cancelled = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_ || writing_) return;
      if (has_pending_) {
        response_.set_status(pending_);
        has_pending_ = false;
        writing_ = true;
        action = kWrite;
      } else if (end_) {
        finished_ = true;
        cancelled = cancelled_;
        action = kFinish;
      }
    }
    if (action == kWrite) StartWrite(&response_);
    if (action == kFinish) {
      Finish(cancelled ? grpc::Status::CANCELLED
                       : grpc::Status(grpc::StatusCode::UNAVAILABLE, "server shutting down"));
    }
  }

  HealthService* const service_;
  const std::string name_;
  std::atomic<int> refs_{1};  // gRPC's, dropped in OnDone
  std::mutex mu_;
  HealthCheckResponse response_;  // the write in flight; touched only by the writer
  ServingStatus pending_ = HealthCheckResponse::UNKNOWN;
  ServingStatus last_queued_ = HealthCheckResponse::UNKNOWN;
  bool has_pending_ = false;
  bool writing_ = false;
  bool end_ = false;
  bool cancelled_ = false;  // the client cancelled or went away
  bool finished_ = false;
};

HealthService::HealthService(const std::vector<std::string>& names) {
  statuses_[""] = HealthCheckResponse::NOT_SERVING;
  for (const std::string& name : names) statuses_[name] = HealthCheckResponse::NOT_SERVING;
}

HealthService::~HealthService() {
  Shutdown();
  std::unique_lock<std::mutex> lock(mu_);
  all_forgotten_.wait(lock, [this] { return watchers_.empty(); });
}

void HealthService::SetServing(bool serving) {
  const ServingStatus status =
      serving ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
  std::vector<Watcher*> watchers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return;
    for (auto& [name, s] : statuses_) s = status;
    watchers = ReferencedWatchersLocked();
  }
  for (Watcher* w : watchers) {
    w->Update(StatusOf(w->name()), /*end=*/false);  // unknown names stay SERVICE_UNKNOWN
    w->Unref();
  }
}

void HealthService::Shutdown() {
  std::vector<Watcher*> watchers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
    for (auto& [name, s] : statuses_) s = HealthCheckResponse::NOT_SERVING;
    watchers = ReferencedWatchersLocked();
  }
  for (Watcher* w : watchers) {
    w->Update(StatusOf(w->name()), /*end=*/true);
    w->Unref();
  }
}

std::vector<HealthService::Watcher*> HealthService::ReferencedWatchersLocked() {
  std::vector<Watcher*> out(watchers_.begin(), watchers_.end());
  for (Watcher* w : out) w->Ref();
  return out;
}

HealthService::ServingStatus HealthService::StatusOf(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = statuses_.find(name);
  return it == statuses_.end() ? HealthCheckResponse::SERVICE_UNKNOWN : it->second;
}

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* context,
                                               const HealthCheckRequest* request,
                                               HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = statuses_.find(request->service());
  if (it == statuses_.end()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                 "health: unknown service '" + request->service() + "'"));
  } else {
    response->set_status(it->second);
    reactor->Finish(grpc::Status::OK);
  }
  return reactor;
}

grpc::ServerWriteReactor<HealthCheckResponse>* HealthService::Watch(
    grpc::CallbackServerContext* /*context*/, const HealthCheckRequest* request) {
  auto* watcher = new Watcher(this, request->service());
  bool shut_down;
  {
    std::lock_guard<std::mutex> lock(mu_);
    watchers_.insert(watcher);
    shut_down = shut_down_;
  }
  // No reaction can run before this handler returns, so no reference needed.
  watcher->Update(StatusOf(request->service()), /*end=*/shut_down);
  return watcher;
}

void HealthService::Forget(Watcher* watcher) {
  std::lock_guard<std::mutex> lock(mu_);
  watchers_.erase(watcher);
  if (watchers_.empty()) all_forgotten_.notify_all();
}

}  // namespace switchyard::rpc
