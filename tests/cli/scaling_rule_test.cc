// The HPA / KEDA scaling rule against cases worked by hand from the
// Kubernetes documentation ("Horizontal Pod Autoscaling": algorithm details,
// configurable scaling behavior; the HPA walkthrough) and KEDA's
// ScaledObject fallback docs.
#include "cli/scaling_rule.h"

#include <gtest/gtest.h>

namespace switchyard::cli::scaling {
namespace {

using std::chrono::seconds;
using Kind = MetricKind;

MetricReading Pods(double average, double target) {
  return {Kind::METRIC_KIND_PODS_AVERAGE_VALUE, average, target};
}

TEST(ScalingRuleTest, DocsAlgorithmDoublesAndHalves) {
  // "if the current metric value is 200m, and the desired value is 100m, the
  // number of replicas will be doubled ... 50m: halve".
  EXPECT_EQ(ReplicasForMetric(3, Pods(0.200, 0.100)), 6);
  EXPECT_EQ(ReplicasForMetric(4, Pods(0.050, 0.100)), 2);
  // desiredReplicas = ceil[currentReplicas * (currentMetricValue / desiredMetricValue)]
  EXPECT_EQ(ReplicasForMetric(3, Pods(0.150, 0.100)), 5);  // ceil(4.5)
}

TEST(ScalingRuleTest, DocsWalkthroughCpu305PercentOnTarget50Gives7) {
  // HPA walkthrough: one php-apache pod at 305% CPU, target 50% -> 7 replicas.
  EXPECT_EQ(ReplicasForMetric(1, Pods(305, 50)), 7);
}

TEST(ScalingRuleTest, ToleranceKeepsTheCountNearTheTarget) {
  // Within 10% of the target either way: no change.
  EXPECT_EQ(ReplicasForMetric(4, Pods(1.09, 1.0)), 4);
  EXPECT_EQ(ReplicasForMetric(4, Pods(0.91, 1.0)), 4);
  EXPECT_EQ(ReplicasForMetric(4, Pods(1.15, 1.0)), 5);   // ceil(4.6)
  EXPECT_EQ(ReplicasForMetric(4, Pods(0.85, 1.0)), 4);   // ceil(3.4) = 4
  EXPECT_EQ(ReplicasForMetric(10, Pods(0.85, 1.0)), 9);  // ceil(8.5)
  EXPECT_EQ(ReplicasForMetric(4, Pods(1.15, 1.0), /*tolerance=*/0.2), 4);
}

TEST(ScalingRuleTest, ExternalAverageValueDividesTheTotalByThePerPodTarget) {
  // KEDA's triggers: the query's total over the per-replica threshold.
  const auto ext = [](double total, double target) {
    return MetricReading{Kind::METRIC_KIND_EXTERNAL_AVERAGE_VALUE, total, target};
  };
  EXPECT_EQ(ReplicasForMetric(1, ext(1250, 500)), 3);  // ceil(2.5)
  EXPECT_EQ(ReplicasForMetric(3, ext(1250, 500)), 3);  // ceil(2.5) = 3
  EXPECT_EQ(ReplicasForMetric(4, ext(1250, 500)), 3);  // ratio 0.625 -> ceil(2.5)
  EXPECT_EQ(ReplicasForMetric(2, ext(1050, 500)), 2);  // ratio 1.05: tolerance
  EXPECT_EQ(ReplicasForMetric(1, ext(0, 500)), 0);     // the HPA clamps to min later
  // Value targets compare the whole: ceil(current * value / target).
  EXPECT_EQ(ReplicasForMetric(2, {Kind::METRIC_KIND_EXTERNAL_VALUE, 30, 10}), 6);
}

TEST(ScalingRuleTest, SeveralMetricsTakeTheLargest) {
  EXPECT_EQ(ReplicasForMetrics(2, {Pods(50, 100), Pods(300, 100), Pods(100, 100)}), 6);
  EXPECT_EQ(ReplicasForMetrics(2, {}), 2);
}

TEST(ScalingRuleTest, BadTargetsLeaveTheCount) {
  EXPECT_EQ(ReplicasForMetric(3, Pods(5, 0)), 3);
  EXPECT_EQ(ReplicasForMetric(3, Pods(-1, 1)), 3);
}

TEST(ScalingRuleTest, KedaFallbackAsksForExactlyTheFallbackReplicas) {
  KedaFallback fallback{3, 2};
  MetricReading m = KedaMetric({/*query_value=*/5000, /*threshold=*/500, 3}, fallback);
  EXPECT_EQ(m.kind, Kind::METRIC_KIND_EXTERNAL_AVERAGE_VALUE);
  EXPECT_EQ(ReplicasForMetric(1, m), 2);
  EXPECT_EQ(ReplicasForMetric(7, m), 2);
  // Two failures are not yet three: the value stands.
  EXPECT_EQ(ReplicasForMetric(1, KedaMetric({5000, 500, 2}, fallback)), 10);
}

HpaSpec ExpertSpec() {  // the manifests' behavior (k8s/generate-experts.py)
  HpaSpec spec;
  spec.min_replicas = 1;
  spec.max_replicas = 8;
  spec.scale_up = {
      0,
      ScalingRules::Select::SELECT_MAX,
      {{ScalingPolicy::Type::TYPE_PERCENT, 100, 15}, {ScalingPolicy::Type::TYPE_PODS, 4, 15}}};
  spec.scale_down = {
      300,
      ScalingRules::Select::SELECT_MAX,
      {{ScalingPolicy::Type::TYPE_PODS, 1, 60}, {ScalingPolicy::Type::TYPE_PERCENT, 10, 60}}};
  return spec;
}

const HpaController::TimePoint kT0 = HpaController::TimePoint{} + seconds(100000);

TEST(ScalingRuleTest, ScalesUpAtOnceWithinTheRatePolicy) {
  HpaController hpa(ExpertSpec());
  // Busy 3.0 against 1.4 per replica at 1 replica: ceil(2.14) = 3 at once
  // (+100% of 1 = 2 or +4 pods = 5: Max allows 5).
  ScalingDecision d = hpa.Reconcile(kT0, 1, {Pods(3.0, 1.4)});
  EXPECT_EQ(d.recommended, 3);
  EXPECT_EQ(d.desired, 3) << d.reason;
  // Demand for 20 within the same 15 s period: from 1 at the period's start,
  // at most max(2, 1 + 4) = 5.
  d = hpa.Reconcile(kT0 + seconds(5), 3, {Pods(9.33, 1.4)});
  EXPECT_EQ(d.recommended, 20);
  EXPECT_EQ(d.desired, 5) << d.reason;
  // A new period: max(5 * 2, 5 + 4) = 10, capped at max replicas 8.
  d = hpa.Reconcile(kT0 + seconds(25), 5, {Pods(4.0, 1.0)});
  EXPECT_EQ(d.recommended, 20);
  EXPECT_EQ(d.desired, 8) << d.reason;
}

TEST(ScalingRuleTest, ScaleDownWaitsForTheStabilizationWindow) {
  // "stabilizationWindowSeconds: 300": the largest recommendation of the
  // last 5 minutes wins, so a dip does not remove replicas.
  HpaController hpa(ExpertSpec());
  EXPECT_EQ(hpa.Reconcile(kT0, 4, {Pods(1.4, 1.4)}).desired, 4);
  for (int t = 15; t < 300; t += 15) {
    ScalingDecision d = hpa.Reconcile(kT0 + seconds(t), 4, {Pods(0.35, 1.4)});
    EXPECT_EQ(d.recommended, 1);
    EXPECT_EQ(d.desired, 4) << "t=" << t << " " << d.reason;
  }
  // 300 s after the last recommendation of 4, the window holds only 1s:
  // down, one pod per minute (Pods 1 vs 10% of 4 = 0.4 -> 3: Max = 1 pod).
  ScalingDecision d = hpa.Reconcile(kT0 + seconds(300), 4, {Pods(0.35, 1.4)});
  EXPECT_EQ(d.stabilized, 1);
  EXPECT_EQ(d.desired, 3) << d.reason;
  EXPECT_EQ(hpa.Reconcile(kT0 + seconds(330), 3, {Pods(0.47, 1.4)}).desired, 3);
  EXPECT_EQ(hpa.Reconcile(kT0 + seconds(360), 3, {Pods(0.47, 1.4)}).desired, 2);
  // The window still remembers the recommendation of 2 at 360 s ...
  EXPECT_EQ(hpa.Reconcile(kT0 + seconds(420), 2, {Pods(0.7, 1.4)}).desired, 2);
  // ... until 300 s later; then down to the minimum, never below it.
  EXPECT_EQ(hpa.Reconcile(kT0 + seconds(661), 2, {Pods(0.1, 1.4)}).desired, 1);
  EXPECT_EQ(hpa.Reconcile(kT0 + seconds(1000), 1, {Pods(0, 1.4)}).desired, 1);
}

TEST(ScalingRuleTest, DocsScaleDownPolicyExample80To72To64) {
  // Docs, "Scaling policies": Pods 4 / 60 s and Percent 10 / 60 s; from 80
  // to 10 the first step removes 8, at 72 "10% ... is 7.2 but the number is
  // rounded up to 8"; below 40 the Pods policy (4) removes more.
  HpaSpec spec;
  spec.min_replicas = 1;
  spec.max_replicas = 100;
  spec.scale_down = {
      0,
      ScalingRules::Select::SELECT_MAX,
      {{ScalingPolicy::Type::TYPE_PODS, 4, 60}, {ScalingPolicy::Type::TYPE_PERCENT, 10, 60}}};
  HpaController hpa(spec);
  const MetricReading to_10 = Pods(0.125, 1);  // 80 * 0.125 = 10
  EXPECT_EQ(hpa.Reconcile(kT0, 80, {to_10}).desired, 72);
  EXPECT_EQ(hpa.Reconcile(kT0 + seconds(30), 72, {Pods(10.0 / 72, 1)}).desired, 72);  // same period
  EXPECT_EQ(hpa.Reconcile(kT0 + seconds(60), 72, {Pods(10.0 / 72, 1)}).desired, 64);
  HpaController small(spec);
  EXPECT_EQ(small.Reconcile(kT0, 30, {Pods(0.2, 1)}).desired, 26);  // 4 pods > 10% (27)
}

TEST(ScalingRuleTest, MinAndMaxClampAndZeroDisables) {
  HpaSpec spec = ExpertSpec();
  HpaController hpa(spec);
  EXPECT_EQ(hpa.Reconcile(kT0, 12, {Pods(1, 1)}).desired, 8);
  EXPECT_EQ(hpa.Reconcile(kT0, 0, {Pods(100, 1)}).desired, 0);
  HpaSpec two = spec;
  two.min_replicas = 2;
  HpaController floor(two);
  EXPECT_EQ(floor.Reconcile(kT0, 1, {Pods(0, 1)}).desired, 2);
}

TEST(ScalingRuleTest, DisabledScaleDownNeverRemoves) {
  HpaSpec spec = ExpertSpec();
  spec.scale_down.select = ScalingRules::Select::SELECT_DISABLED;
  spec.scale_down.stabilization_window_seconds = 0;
  HpaController hpa(spec);
  EXPECT_EQ(hpa.Reconcile(kT0, 5, {Pods(0.1, 1)}).desired, 5);
}

}  // namespace
}  // namespace switchyard::cli::scaling
