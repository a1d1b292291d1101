// The replica counts Kubernetes' HorizontalPodAutoscaler (autoscaling/v2)
// and KEDA would set for an expert Deployment, as pure functions of the
// metric values and the clock: the rule the manifests in k8s/autoscaling
// configure, usable by a local controller (`switchyard up --autoscale`) and
// by tests that evaluate the manifests' queries against a real Prometheus.
//
// What it follows (kubernetes/pkg/controller/podautoscaler, v1.2x):
//  * per metric, desired = ceil(current × metric / target), unless the ratio
//    metric / target is within the tolerance (default 0.1) of 1: then the
//    current count stays. For a Pods metric (the HPA + prometheus-adapter
//    path) `metric` is the average over the pods; for an External metric with
//    an AverageValue target (every KEDA trigger here) it is the query's total
//    and desired = ceil(total / target);
//  * several metrics: the largest desired count wins;
//  * behavior: a recommendation is stabilized over a window (scale-up: the
//    smallest recommendation within scaleUp's window, 0 s = at once;
//    scale-down: the largest within scaleDown's window, e.g. 300 s), then
//    limited by the rate policies (Pods / Percent per period, selectPolicy),
//    then clamped to [min, max] replicas;
//  * KEDA's fallback: a trigger whose query failed `failure_threshold` times
//    in a row asks for exactly `fallback_replicas`.
// Not modelled: unready or missing pods (every replica reports), CPU
// resource metrics, scale to or from zero (KEDA activation).
//
// Thread-safety: the functions are pure; an HpaController is not
// thread-safe (one owner).
#ifndef SWITCHYARD_CLI_SCALING_RULE_H_
#define SWITCHYARD_CLI_SCALING_RULE_H_

#include <chrono>
#include <deque>
#include <string>
#include <vector>

namespace switchyard::cli::scaling {

// Kubernetes' --horizontal-pod-autoscaler-tolerance default.
inline constexpr double kDefaultTolerance = 0.1;

// How a metric's value relates to its target.
enum class MetricKind {
  // autoscaling/v2 `type: Pods`, target AverageValue: `value` is the
  // average over the current pods (prometheus-adapter's per-pod metric).
  METRIC_KIND_PODS_AVERAGE_VALUE,
  // `type: External`, target AverageValue: `value` is the total over all
  // pods (a KEDA Prometheus trigger with metricType AverageValue: the
  // query's result); the target is per pod.
  METRIC_KIND_EXTERNAL_AVERAGE_VALUE,
  // `type: External` (or Object), target Value: `value` is compared with
  // the target as a whole, desired = ceil(current × value / target).
  METRIC_KIND_EXTERNAL_VALUE,
};

struct MetricReading {
  MetricKind kind = MetricKind::METRIC_KIND_PODS_AVERAGE_VALUE;
  // The measured value (>= 0). Default 0.
  double value = 0;
  // The target (> 0). Default 1.
  double target = 1;
};

// The desired replica count for one metric at `current` (>= 1) replicas,
// before behavior and min/max: `current` when |value/target... - 1| <=
// tolerance, else the HPA's ceil formula (see MetricKind). A target <= 0
// or a negative value leaves `current`.
int ReplicasForMetric(int current, const MetricReading& metric,
                      double tolerance = kDefaultTolerance);

// The largest ReplicasForMetric over `metrics`; `current` when empty.
int ReplicasForMetrics(int current, const std::vector<MetricReading>& metrics,
                       double tolerance = kDefaultTolerance);

// One KEDA Prometheus trigger (metricType AverageValue, as every
// ScaledObject in k8s/ uses): the external metric it hands the HPA.
struct KedaTrigger {
  // The query's value (KEDA's prometheus scaler sums a vector result; an
  // empty result is 0). Default 0.
  double query_value = 0;
  // The trigger's `threshold` (> 0): per-replica target. Default 1.
  double threshold = 1;
  // Consecutive failed polls of this trigger's query. Default 0.
  int consecutive_failures = 0;
};

// KEDA's ScaledObject `fallback`: when a trigger failed this many polls in
// a row, it reports fallback_replicas × threshold so the HPA asks for
// exactly fallback_replicas. failure_threshold 0 = no fallback.
struct KedaFallback {
  int failure_threshold = 0;  // default 0: no fallback
  int replicas = 0;           // default 0
};

// The HPA metric a KEDA trigger becomes (External, AverageValue).
MetricReading KedaMetric(const KedaTrigger& trigger, const KedaFallback& fallback = {});

// autoscaling/v2 HPAScalingPolicy.
struct ScalingPolicy {
  enum class Type { TYPE_PODS, TYPE_PERCENT };
  Type type = Type::TYPE_PODS;
  int value = 1;  // pods, or percent of the replicas at the period's start
  int period_seconds = 60;
};

// autoscaling/v2 HPAScalingRules.
struct ScalingRules {
  enum class Select { SELECT_MAX, SELECT_MIN, SELECT_DISABLED };
  int stabilization_window_seconds = 0;
  Select select = Select::SELECT_MAX;
  std::vector<ScalingPolicy> policies;
};

// An HPA (or the HPA KEDA creates from a ScaledObject). Defaults are
// Kubernetes' defaults when `behavior` is omitted.
struct HpaSpec {
  int min_replicas = 1;  // default 1 (KEDA: minReplicaCount)
  int max_replicas = 1;  // default 1 (KEDA: maxReplicaCount, default 100)
  double tolerance = kDefaultTolerance;
  // Default: at once, the larger of +100% or +4 pods per 15 s.
  ScalingRules scale_up{
      0,
      ScalingRules::Select::SELECT_MAX,
      {{ScalingPolicy::Type::TYPE_PERCENT, 100, 15}, {ScalingPolicy::Type::TYPE_PODS, 4, 15}}};
  // Default: the largest recommendation of the last 300 s, up to -100% per
  // 15 s.
  ScalingRules scale_down{
      300, ScalingRules::Select::SELECT_MAX, {{ScalingPolicy::Type::TYPE_PERCENT, 100, 15}}};
};

// Why a decision came out as it did (for logs and tests).
struct ScalingDecision {
  int current = 0;      // replicas before
  int recommended = 0;  // from the metrics alone
  int stabilized = 0;   // after the stabilization windows
  int desired = 0;      // after rate policies and [min, max]: the count to set
  std::string reason;   // e.g. "scale-down held by the 300 s stabilization window"
};

// One HPA's reconcile loop: remembers its recommendations (for the
// stabilization windows) and its scale events (for the rate policies).
//
// Thread-safety: not thread-safe; one owner.
class HpaController {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;

  explicit HpaController(HpaSpec spec) : spec_(std::move(spec)) {}

  // One reconcile at `now` with `current` replicas (>= 0; 0 = scaled to
  // zero, which the HPA leaves alone) and this period's metric readings.
  // Records the recommendation and, when desired != current, the scale
  // event, as if the caller then set `desired` replicas.
  ScalingDecision Reconcile(TimePoint now, int current, const std::vector<MetricReading>& metrics);

  const HpaSpec& spec() const { return spec_; }

 private:
  struct Recommendation {
    TimePoint at;
    int replicas;
  };
  struct ScaleEvent {
    TimePoint at;
    int change;  // > 0 up, < 0 down
  };

  int Stabilize(TimePoint now, int current, int recommended);
  int ChangeWithin(TimePoint now, int period_seconds, bool up) const;
  int ScaleUpLimit(TimePoint now, int current) const;
  int ScaleDownLimit(TimePoint now, int current) const;

  HpaSpec spec_;
  std::deque<Recommendation> recommendations_;
  std::deque<ScaleEvent> events_;
};

}  // namespace switchyard::cli::scaling

#endif  // SWITCHYARD_CLI_SCALING_RULE_H_
