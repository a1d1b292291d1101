#include "cli/scaling_rule.h"

#include <algorithm>
#include <climits>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace switchyard::cli::scaling {

int ReplicasForMetric(int current, const MetricReading& metric, double tolerance) {
  if (!(metric.target > 0) || !(metric.value >= 0) || current < 0) return current;
  switch (metric.kind) {
    case MetricKind::METRIC_KIND_PODS_AVERAGE_VALUE:
    case MetricKind::METRIC_KIND_EXTERNAL_VALUE: {
      // replica_calculator.go GetMetricReplicas / GetExternalMetricReplicas.
      const double ratio = metric.value / metric.target;
      if (std::abs(1.0 - ratio) <= tolerance) return current;
      return static_cast<int>(std::ceil(ratio * current));
    }
    case MetricKind::METRIC_KIND_EXTERNAL_AVERAGE_VALUE: {
      // GetExternalPerPodMetricReplicas: the ratio is against the target of
      // all current pods; the new count against one pod's target.
      if (current > 0) {
        const double ratio = metric.value / (metric.target * current);
        if (std::abs(1.0 - ratio) <= tolerance) return current;
      }
      return static_cast<int>(std::ceil(metric.value / metric.target));
    }
  }
  return current;
}

int ReplicasForMetrics(int current, const std::vector<MetricReading>& metrics, double tolerance) {
  if (metrics.empty()) return current;
  int best = INT_MIN;
  for (const MetricReading& m : metrics)
    best = std::max(best, ReplicasForMetric(current, m, tolerance));
  return best;
}

MetricReading KedaMetric(const KedaTrigger& trigger, const KedaFallback& fallback) {
  MetricReading m;
  m.kind = MetricKind::METRIC_KIND_EXTERNAL_AVERAGE_VALUE;
  m.target = trigger.threshold;
  m.value = trigger.query_value;
  if (fallback.failure_threshold > 0 &&
      trigger.consecutive_failures >= fallback.failure_threshold) {
    // KEDA's fallback.go: fallbackReplicas × target, so the HPA asks for
    // exactly that many.
    m.value = static_cast<double>(fallback.replicas) * trigger.threshold;
  }
  return m;
}

int HpaController::Stabilize(TimePoint now, int current, int recommended) {
  // stabilizeRecommendationWithBehaviors: up = the smallest recommendation
  // within the scale-up window, down = the largest within the scale-down
  // window (both including this one); the current count moves only as far
  // as both allow.
  const auto up_cutoff = now - std::chrono::seconds(spec_.scale_up.stabilization_window_seconds);
  const auto down_cutoff =
      now - std::chrono::seconds(spec_.scale_down.stabilization_window_seconds);
  int up = recommended, down = recommended;
  for (const Recommendation& r : recommendations_) {
    if (r.at > up_cutoff) up = std::min(up, r.replicas);
    if (r.at > down_cutoff) down = std::max(down, r.replicas);
  }
  recommendations_.push_back({now, recommended});
  const int longest = std::max(spec_.scale_up.stabilization_window_seconds,
                               spec_.scale_down.stabilization_window_seconds);
  while (!recommendations_.empty() &&
         recommendations_.front().at <= now - std::chrono::seconds(longest)) {
    recommendations_.pop_front();
  }
  int stabilized = current;
  if (stabilized < up) stabilized = up;
  if (stabilized > down) stabilized = down;
  return stabilized;
}

int HpaController::ChangeWithin(TimePoint now, int period_seconds, bool up) const {
  const auto cutoff = now - std::chrono::seconds(period_seconds);
  int sum = 0;
  for (const ScaleEvent& e : events_) {
    if (e.at > cutoff && (e.change > 0) == up) sum += std::abs(e.change);
  }
  return sum;
}

int HpaController::ScaleUpLimit(TimePoint now, int current) const {
  // calculateScaleUpLimitWithScalingRules: each policy allows growth from
  // the replica count at the start of its period; Max takes the most
  // permissive policy, Min the least.
  const ScalingRules& rules = spec_.scale_up;
  if (rules.select == ScalingRules::Select::SELECT_DISABLED) return current;
  const bool take_max = rules.select == ScalingRules::Select::SELECT_MAX;
  int result = take_max ? INT_MIN : INT_MAX;
  for (const ScalingPolicy& p : rules.policies) {
    const int start = current - ChangeWithin(now, p.period_seconds, true) +
                      ChangeWithin(now, p.period_seconds, false);
    const int proposed = p.type == ScalingPolicy::Type::TYPE_PODS
                             ? start + p.value
                             : static_cast<int>(std::ceil(start * (1.0 + p.value / 100.0)));
    result = take_max ? std::max(result, proposed) : std::min(result, proposed);
  }
  return rules.policies.empty() ? INT_MAX : result;
}

int HpaController::ScaleDownLimit(TimePoint now, int current) const {
  // calculateScaleDownLimitWithBehaviors: Max = the policy that removes the
  // most (the smallest limit); Percent truncates, so 10% of 72 removes 8.
  const ScalingRules& rules = spec_.scale_down;
  if (rules.select == ScalingRules::Select::SELECT_DISABLED) return current;
  const bool most_change = rules.select == ScalingRules::Select::SELECT_MAX;
  int result = most_change ? INT_MAX : INT_MIN;
  for (const ScalingPolicy& p : rules.policies) {
    const int start = current + ChangeWithin(now, p.period_seconds, false) -
                      ChangeWithin(now, p.period_seconds, true);
    const int proposed = p.type == ScalingPolicy::Type::TYPE_PODS
                             ? start - p.value
                             : static_cast<int>(start * (1.0 - p.value / 100.0));
    result = most_change ? std::min(result, proposed) : std::max(result, proposed);
  }
  return rules.policies.empty() ? INT_MIN : result;
}

ScalingDecision HpaController::Reconcile(TimePoint now, int current,
                                         const std::vector<MetricReading>& metrics) {
  ScalingDecision d;
  d.current = current;
  if (current == 0 && spec_.min_replicas != 0) {
    // horizontal.go: a target scaled to zero by hand disables autoscaling.
    d.recommended = d.stabilized = d.desired = 0;
    d.reason = "scaled to zero: autoscaling disabled";
    return d;
  }
  if (current > spec_.max_replicas || current < spec_.min_replicas) {
    d.recommended = d.stabilized = d.desired =
        std::clamp(current, spec_.min_replicas, spec_.max_replicas);
    d.reason = current > spec_.max_replicas ? "above max replicas" : "below min replicas";
  } else {
    d.recommended = ReplicasForMetrics(current, metrics, spec_.tolerance);
    d.stabilized = Stabilize(now, current, d.recommended);
    d.desired = d.stabilized;
    if (d.stabilized > current) {
      const int limit = std::min(spec_.max_replicas, std::max(current, ScaleUpLimit(now, current)));
      if (d.desired > limit) {
        d.desired = limit;
        d.reason = limit == spec_.max_replicas ? "capped at max replicas"
                                               : "scale-up limited by the rate policies";
      }
    } else if (d.stabilized < current) {
      const int limit =
          std::max(spec_.min_replicas, std::min(current, ScaleDownLimit(now, current)));
      if (d.desired < limit) {
        d.desired = limit;
        d.reason = limit == spec_.min_replicas ? "held at min replicas"
                                               : "scale-down limited by the rate policies";
      }
    }
    if (d.reason.empty()) {
      if (d.recommended < current && d.stabilized > d.recommended) {
        const int window = spec_.scale_down.stabilization_window_seconds;
        if (d.desired < current) {
          d.reason =
              absl::StrCat("scale down to the largest recommendation of the last ", window, " s");
        } else if (current == spec_.min_replicas) {
          d.reason = "held at min replicas";  // as when the window holds nothing higher
        } else {
          d.reason = absl::StrCat("scale-down held by the ", window, " s stabilization window");
        }
      } else if (d.recommended > current && d.stabilized < d.recommended) {
        d.reason =
            absl::StrCat("scale-up held by the ", spec_.scale_up.stabilization_window_seconds,
                         " s stabilization window");
      } else if (d.desired == current) {
        d.reason = "within tolerance or at the recommendation";
      } else {
        d.reason = d.desired > current ? "scale up" : "scale down";
      }
    }
  }
  if (d.desired != current) {
    events_.push_back({now, d.desired - current});
    int longest = 0;
    for (const auto* rules : {&spec_.scale_up, &spec_.scale_down}) {
      for (const ScalingPolicy& p : rules->policies) longest = std::max(longest, p.period_seconds);
    }
    while (!events_.empty() && events_.front().at <= now - std::chrono::seconds(longest)) {
      events_.pop_front();
    }
  }
  return d;
}

}  // namespace switchyard::cli::scaling
