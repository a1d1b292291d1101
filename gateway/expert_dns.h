// The gateway's own resolution of dns:/// expert targets.
//
// Kubernetes gives each expert a headless Service whose name resolves to one
// address per ready pod. Handed to gRPC as one dns:/// target, those pods
// share one channel: each batch is a unary call (a stream would stay on one
// pod), calls are spread round-robin rather than to the pod with the fewest
// outstanding, and no call can use a shard's frame socket (its port and
// greeting token are per pod). So the gateway resolves such names itself:
// every address becomes a replica of its own (an "IP:PORT" target, which
// takes frames or a ForwardStream and is balanced by outstanding calls; with
// TLS its certificate must still name the Service, as it would for gRPC
// dialling the name: ExpertTopology::tls_names), and a refresher resolves
// the names again every period and applies what changed as a live topology
// change (RemoteExpertBackend::ApplyTopology: a new pod is checked before it
// takes a call, a pod that left is drained).
//
// A name that does not resolve keeps the addresses it had (a DNS hiccup or an
// expert scaled to zero for a moment must not drop live replicas); one that
// never resolved stays a dns:/// target, which gRPC resolves and keeps
// retrying as before. "dns://SERVER/NAME" (its own DNS server) is left to gRPC.
#ifndef SWITCHYARD_GATEWAY_EXPERT_DNS_H_
#define SWITCHYARD_GATEWAY_EXPERT_DNS_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/periodic_thread.h"
#include "gateway/remote_expert_backend.h"

namespace switchyard {

// Whether the gateway resolves `target` itself: "dns:///NAME:PORT".
bool IsExpandableDnsTarget(const std::string& target);

// The targets NAME:PORT stands for ("10.1.2.3:50061", "[fd00::5]:50061"), or
// UNAVAILABLE when the name does not resolve. Tests pass their own.
using ExpertTargetResolver =
    std::function<absl::StatusOr<std::vector<std::string>>(const std::string& host, int port)>;
// The system resolver (core/host_port.h ResolveTcp).
ExpertTargetResolver SystemExpertTargetResolver();

// One expansion of a topology's dns:/// targets.
struct DnsExpansion {
  // The topology with every expandable name replaced by its addresses (each
  // address once per expert, sorted), other targets as they were; each
  // address's tls_names entry is its name's host (the first name's, for an
  // address two names share).
  ExpertTopology topology;
  // What each name stood for in this expansion (its last addresses where it
  // did not resolve); names that never resolved are absent.
  std::map<std::string, std::vector<std::string>> addresses;
  // One line per name that did not resolve: "NAME: why (keeping N
  // addresses)" or "NAME: why (left to gRPC)".
  std::vector<std::string> problems;
};

// Expands `configured` with `resolve`; `last` is the previous expansion's
// `addresses` (empty at start-up).
DnsExpansion ExpandDnsTargets(const ExpertTopology& configured, const ExpertTargetResolver& resolve,
                              const std::map<std::string, std::vector<std::string>>& last);

// Keeps a backend's topology equal to the expansion of a configured one,
// resolving again every refresh period on a thread of its own.
//
// Thread-safety: SetConfigured and RefreshOnce may be called from any thread
// (they are serialised); the destructor stops the thread, waiting for a
// refresh in progress (at most the backend's connect timeout).
class ExpertDnsRefresher {
 public:
  // `applied` is the expansion the backend serves now (what Connect was
  // given). `backend` must outlive the refresher; `on_applied` (may be null)
  // runs after each applied change with the live topology.
  ExpertDnsRefresher(ExpertTopology configured, DnsExpansion applied, RemoteExpertBackend* backend,
                     int refresh_ms, ExpertTargetResolver resolve,
                     std::function<void(const ExpertTopology&)> on_applied);
  ~ExpertDnsRefresher() = default;

  ExpertDnsRefresher(const ExpertDnsRefresher&) = delete;
  ExpertDnsRefresher& operator=(const ExpertDnsRefresher&) = delete;

  // Replaces the configured topology (a reloaded --experts file) and applies
  // its expansion now; returns what ApplyTopology returns. On an error the
  // new configuration is still kept, and the next refresh tries it again.
  absl::StatusOr<std::string> SetConfigured(const ExpertTopology& configured);
  // Resolves again and applies the expansion if it differs from the one
  // served; returns whether a change was applied.
  bool RefreshOnce();

  // Changes applied and expansions refused (a new pod not answering yet, say).
  int applied() const { return applied_.load(); }
  int refused() const { return refused_.load(); }

 private:
  // Expands configured_ and applies it if it changed. Holds mu_.
  absl::StatusOr<std::string> ApplyLocked();

  RemoteExpertBackend* const backend_;
  const ExpertTargetResolver resolve_;
  const std::function<void(const ExpertTopology&)> on_applied_;
  std::mutex mu_;
  ExpertTopology configured_;  // guarded by mu_
  DnsExpansion served_;        // guarded by mu_: the expansion the backend serves
  std::string last_problems_;  // guarded by mu_: logged once until they change
  std::atomic<int> applied_{0};
  std::atomic<int> refused_{0};
  std::unique_ptr<PeriodicThread> thread_;  // last: stops before the rest goes
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_EXPERT_DNS_H_
