// The control loop behind `switchyard up --autoscale`: every period it reads
// each expert replica's busy seconds (switchyard_expert_busy_seconds_total),
// turns them into the expert's busy ratio, asks the Kubernetes HPA rule
// (cli/scaling_rule.h) for the replica count, and starts or drains replicas
// through a ReplicaFleet to reach it.
//
// The metric is the HPA's Pods/AverageValue one: the busy seconds per second
// of all of an expert's replicas divided by the replica count, where a
// replica that is still starting (or has no second sample yet) counts as 0,
// as the HPA counts unready pods when it scales up. So desired =
// ceil(current × busy / target) = ceil(total busy / target), unless busy /
// target is within the tolerance of 1; scale-up at once (up to +100% or +4
// per 15 s, the HPA default), scale-down to the largest recommendation of
// the last scale_down_delay_s seconds, clamped to [min, max].
//
// Everything with side effects is injected (the clock is the `now` of each
// Tick, the metrics come from a BusyReader, processes from a ReplicaFleet,
// GPU memory from a FreeGpuMemory function), so the loop is unit-tested
// without processes (tests/cli/autoscaler_test.cc).
//
// Thread-safety: an Autoscaler is not thread-safe (one owner calls Tick);
// its metrics registry may be scraped from any thread.
#ifndef SWITCHYARD_CLI_AUTOSCALER_H_
#define SWITCHYARD_CLI_AUTOSCALER_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cli/scaling_rule.h"
#include "metrics/metrics.h"

namespace switchyard::cli {

struct AutoscalerOptions {
  // Replicas per expert never go below / above these. Defaults 1 and 1.
  int min_replicas = 1;
  int max_replicas = 1;
  // The busy ratio (busy seconds per second, averaged over the replicas)
  // each expert is scaled towards. Default 0.7.
  double target_busy = 0.7;
  // A scale-down takes the largest recommendation of this many seconds.
  // Default 300 (the HPA's default scale-down stabilization window).
  int scale_down_delay_s = 300;
  // |busy / target - 1| within this leaves the count alone. Default 0.1.
  double tolerance = scaling::kDefaultTolerance;
  // GPUs new replicas may go on (--gpus); empty: no GPU placement (CPU, or
  // the process's default device). Default empty.
  std::vector<int> gpus;
};

// One replica process of one expert as the controller sees it.
struct ReplicaView {
  enum class State {
    STATE_STARTING,  // started, not yet in the gateway's topology
    STATE_SERVING,   // in the topology, taking calls
    STATE_DRAINING,  // out of the topology; terminated once drained
  };
  int id = 0;  // unique within the fleet, never reused
  int expert = 0;
  State state = State::STATE_STARTING;
  std::string metrics_address;  // HOST:PORT of its /metrics ("" while unknown)
  int gpu = -1;                 // -1: no GPU placement
};

// The processes the controller scales: `switchyard up`'s supervisor, or a
// fake in tests. Start and Drain return at once; the fleet carries them out
// (a started replica joins the topology once healthy; a drained one leaves
// the topology at once and is terminated after the gateway stopped using it).
class ReplicaFleet {
 public:
  virtual ~ReplicaFleet() = default;
  // Every replica not yet terminated (draining ones included).
  virtual std::vector<ReplicaView> Replicas() const = 0;
  // Starts one more replica of `expert` on `gpu` (-1: no placement); its id.
  virtual absl::StatusOr<int> StartReplica(int expert, int gpu) = 0;
  // Takes replica `id` out of service (see above).
  virtual absl::Status DrainReplica(int id) = 0;
};

// switchyard_expert_busy_seconds_total of the replica at a metrics address.
using BusyReader = std::function<absl::StatusOr<double>(const std::string& metrics_address)>;

// Free memory of each GPU in bytes, by device index.
using FreeGpuMemory = std::function<absl::StatusOr<std::map<int, int64_t>>()>;

// The GPU of `candidates` with the most free memory in `free` (ties: the
// first in `candidates`); -1 when none of them is in `free`.
int PickGpu(const std::vector<int>& candidates, const std::map<int, int64_t>& free);

// The sum of the samples of `name` (without labels or with any) in
// Prometheus text; NOT_FOUND when it has none.
absl::StatusOr<double> MetricSum(const std::string& text, const std::string& name);

// Parses `nvidia-smi --query-gpu=index,memory.free --format=csv,noheader,nounits`
// output ("0, 80000" per line, MiB) into bytes by index; INVALID_ARGUMENT
// naming a line that does not parse.
absl::StatusOr<std::map<int, int64_t>> ParseNvidiaSmiFreeMemory(const std::string& text);

// Runs that nvidia-smi query (the real FreeGpuMemory); UNAVAILABLE when
// nvidia-smi cannot run or fails.
absl::StatusOr<std::map<int, int64_t>> NvidiaSmiFreeMemory();

// One expert's outcome of a Tick (for logs, metrics and tests).
struct AutoscaleDecision {
  int expert = 0;
  double busy = 0;       // the metric: busy seconds per second per replica
  int current = 0;       // replicas before (starting + serving)
  int desired = 0;       // what the HPA rule asks for
  std::string reason;    // the rule's reason, or why nothing was decided
  bool decided = false;  // false: no metrics yet, nothing changed
};

class Autoscaler {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;

  // `num_experts` experts, 0..num_experts-1. `registry` (may be null)
  // receives the switchyard_autoscaler_* metrics (docs/metrics.md), with
  // the desired and current replicas set to the fleet's counts from the start;
  // `log` receives one line per decision that changes a count or whose
  // reason changed (null: stderr). `free_gpu_memory` is needed only with
  // options.gpus.
  Autoscaler(int num_experts, AutoscalerOptions options, ReplicaFleet* fleet, BusyReader busy,
             FreeGpuMemory free_gpu_memory, metrics::Registry* registry,
             std::function<void(const std::string&)> log = nullptr);

  // One control period at `now`: reads every serving replica, decides per
  // expert and starts or drains replicas. The decisions, one per expert.
  std::vector<AutoscaleDecision> Tick(TimePoint now);

  // Where a new replica goes: PickGpu over options.gpus with the current
  // free memory; -1 without --gpus or when the query fails (then options.gpus[0]).
  int PlaceNewReplica();

  const AutoscalerOptions& options() const { return options_; }
  // The HPA spec each expert's controller runs.
  static scaling::HpaSpec SpecFor(const AutoscalerOptions& options);

 private:
  struct Sample {
    TimePoint at;
    double busy_seconds;
  };

  void Log(const AutoscaleDecision& d);
  // Replicas per expert that are starting or serving (not draining).
  std::vector<int> ActiveCounts() const;

  const int num_experts_;
  const AutoscalerOptions options_;
  ReplicaFleet* const fleet_;
  const BusyReader busy_;
  const FreeGpuMemory free_gpu_memory_;
  const std::function<void(const std::string&)> log_;
  std::vector<scaling::HpaController> controllers_;  // one per expert
  std::map<int, Sample> last_sample_;                // by replica id
  std::map<int, std::string> last_logged_reason_;    // by expert
  // Metrics (null without a registry).
  std::vector<metrics::Gauge*> desired_gauges_, current_gauges_, busy_gauges_;
  std::vector<metrics::Counter*> up_counters_, down_counters_;
};

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_AUTOSCALER_H_
