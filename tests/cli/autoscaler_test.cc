// `switchyard up --autoscale`'s control loop (cli/autoscaler.h) with a fake
// clock, fake busy counters and a fake fleet: scale-up at once, tolerance,
// scale-down only after the delay, min/max clamps, GPU placement, and the
// loop's decisions against the HPA and KEDA formulas of cli/scaling_rule.h
// on the same metric series.
#include "cli/autoscaler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace switchyard::cli {
namespace {

using State = ReplicaView::State;
using std::chrono::milliseconds;
using std::chrono::seconds;

// Replicas in memory; started ones serve at the next Promote(), drained ones
// vanish at the next Reap(). Busy counters by metrics address.
class FakeFleet : public ReplicaFleet {
 public:
  std::vector<ReplicaView> Replicas() const override { return replicas_; }
  absl::StatusOr<int> StartReplica(int expert, int gpu) override {
    ReplicaView r;
    r.id = next_id_++;
    r.expert = expert;
    r.state = State::STATE_STARTING;
    r.metrics_address = absl::StrCat("replica-", r.id);
    r.gpu = gpu;
    replicas_.push_back(r);
    started.push_back({expert, gpu});
    return r.id;
  }
  absl::Status DrainReplica(int id) override {
    for (ReplicaView& r : replicas_) {
      if (r.id == id) {
        r.state = State::STATE_DRAINING;
        drained.push_back(id);
        return absl::OkStatus();
      }
    }
    return absl::NotFoundError("no such replica");
  }

  // A serving replica of `expert`; its id.
  int AddServing(int expert) {
    const int id = *StartReplica(expert, -1);
    started.pop_back();
    replicas_.back().state = State::STATE_SERVING;
    return id;
  }
  void Promote() {
    for (ReplicaView& r : replicas_) {
      if (r.state == State::STATE_STARTING) r.state = State::STATE_SERVING;
    }
  }
  void Reap() {
    std::erase_if(replicas_, [](const ReplicaView& r) { return r.state == State::STATE_DRAINING; });
  }
  int Count(int expert, State state) const {
    int n = 0;
    for (const ReplicaView& r : replicas_) n += r.expert == expert && r.state == state;
    return n;
  }
  int Active(int expert) const {
    return Count(expert, State::STATE_STARTING) + Count(expert, State::STATE_SERVING);
  }
  std::vector<int> ServingIds(int expert) const {
    std::vector<int> ids;
    for (const ReplicaView& r : replicas_) {
      if (r.expert == expert && r.state == State::STATE_SERVING) ids.push_back(r.id);
    }
    return ids;
  }

  // Adds `seconds` of busy time to replica `id`'s counter.
  void Work(int id, double seconds) { busy[absl::StrCat("replica-", id)] += seconds; }
  BusyReader Reader() {
    return [this](const std::string& address) -> absl::StatusOr<double> {
      auto it = busy.find(address);
      if (it == busy.end()) return 0.0;
      return it->second;
    };
  }

  std::map<std::string, double> busy;
  std::vector<std::pair<int, int>> started;  // (expert, gpu)
  std::vector<int> drained;

 private:
  std::vector<ReplicaView> replicas_;
  int next_id_ = 0;
};

class AutoscalerTest : public ::testing::Test {
 protected:
  // One expert (or `experts`), one serving replica each.
  void Make(AutoscalerOptions options, int experts = 1) {
    for (int e = 0; e < experts; ++e) fleet_.AddServing(e);
    scaler_ = std::make_unique<Autoscaler>(
        experts, options, &fleet_, fleet_.Reader(), nullptr, &registry_,
        [this](const std::string& line) { log_.push_back(line); });
  }
  // Advances the clock by `period` during which every serving replica of
  // `expert` was busy `ratio` seconds per second; then one Tick.
  AutoscaleDecision Period(int expert, double ratio, seconds period = seconds(1)) {
    for (int id : fleet_.ServingIds(expert)) fleet_.Work(id, ratio * period.count());
    now_ += period;
    return scaler_->Tick(now_)[expert];
  }

  FakeFleet fleet_;
  metrics::Registry registry_;
  std::vector<std::string> log_;
  std::unique_ptr<Autoscaler> scaler_;
  Autoscaler::TimePoint now_ = Autoscaler::TimePoint() + seconds(1000);
};

TEST_F(AutoscalerTest, MetricsShowTheFleetBeforeTheFirstTick) {
  fleet_.AddServing(1);  // expert 1 starts with two replicas
  Make({.min_replicas = 1, .max_replicas = 4, .target_busy = 0.5}, /*experts=*/2);
  const std::string text = metrics::Serialize(registry_);
  for (const auto& [expert, count] : {std::pair{0, 1}, std::pair{1, 2}}) {
    for (const char* name :
         {"switchyard_autoscaler_desired_replicas", "switchyard_autoscaler_current_replicas"}) {
      EXPECT_NE(text.find(absl::StrFormat("%s{expert=\"%d\"} %d\n", name, expert, count)),
                std::string::npos)
          << name << " of expert " << expert << " in\n"
          << text;
    }
  }
}

TEST_F(AutoscalerTest, FirstTickHasNoRateAndDecidesNothing) {
  Make({.min_replicas = 1, .max_replicas = 4, .target_busy = 0.5});
  fleet_.Work(0, 100);  // a counter that has been running: no rate from one sample
  const AutoscaleDecision d = scaler_->Tick(now_)[0];
  EXPECT_FALSE(d.decided);
  EXPECT_EQ(d.desired, 1);
  EXPECT_TRUE(fleet_.started.empty());
}

TEST_F(AutoscalerTest, ScalesUpAtOnceAndLogsTheDecision) {
  Make({.min_replicas = 1, .max_replicas = 4, .target_busy = 0.5});
  scaler_->Tick(now_);
  const AutoscaleDecision d = Period(0, 1.0);  // busy 1.0 against 0.5: ceil(1 x 2) = 2
  EXPECT_TRUE(d.decided);
  EXPECT_NEAR(d.busy, 1.0, 1e-9);
  EXPECT_EQ(d.current, 1);
  EXPECT_EQ(d.desired, 2);
  ASSERT_EQ(fleet_.started.size(), 1u);
  EXPECT_EQ(fleet_.started[0].first, 0);
  EXPECT_EQ(fleet_.Active(0), 2);
  ASSERT_FALSE(log_.empty());
  EXPECT_EQ(log_.back(), "autoscaler: expert 0 busy 1.0000 current 1 desired 2: scale up");
  const std::string text = metrics::Serialize(registry_);
  EXPECT_NE(text.find("switchyard_autoscaler_desired_replicas{expert=\"0\"} 2"), std::string::npos)
      << text;
  EXPECT_NE(text.find("switchyard_autoscaler_current_replicas{expert=\"0\"} 2"), std::string::npos)
      << text;
  EXPECT_NE(text.find("switchyard_autoscaler_scale_events_total{direction=\"up\",expert=\"0\"} 1"),
            std::string::npos)
      << text;
}

// The busy ratio is the delta since the last period over the period, not a
// rate over a longer window: after a minute of idle 15 s periods, one busy
// period gives that period's ratio and scales up in the same Tick (a 1m
// window would average it with the idle 45 s before: 0.25, no scale-up).
TEST_F(AutoscalerTest, BusyRatioIsPerPeriodSoOneBusyPeriodScalesUp) {
  Make({.min_replicas = 1, .max_replicas = 4, .target_busy = 0.7});
  scaler_->Tick(now_);
  for (int i = 0; i < 4; ++i) {
    const AutoscaleDecision idle = Period(0, 0.0, seconds(15));
    EXPECT_NEAR(idle.busy, 0.0, 1e-9);
    EXPECT_EQ(idle.desired, 1);
  }
  const AutoscaleDecision d = Period(0, 1.0, seconds(15));
  EXPECT_NEAR(d.busy, 1.0, 1e-9);
  EXPECT_EQ(d.desired, 2);  // ceil(1 x 1.0 / 0.7)
  EXPECT_EQ(fleet_.started.size(), 1u);
}

TEST_F(AutoscalerTest, StartingReplicasCountAsIdleSoOneSpikeStartsOneReplica) {
  Make({.min_replicas = 1, .max_replicas = 8, .target_busy = 0.5});
  scaler_->Tick(now_);
  EXPECT_EQ(Period(0, 1.0).desired, 2);
  // The new replica is still starting: the same load is now 1.0 / 2 = 0.5
  // per replica, on target; no third replica.
  const AutoscaleDecision d = Period(0, 1.0);
  EXPECT_EQ(d.current, 2);
  EXPECT_NEAR(d.busy, 0.5, 1e-9);
  EXPECT_EQ(d.desired, 2);
  EXPECT_EQ(fleet_.started.size(), 1u);
}

TEST_F(AutoscalerTest, ToleranceKeepsTheCountWithinTenPercent) {
  Make({.min_replicas = 1, .max_replicas = 4, .target_busy = 0.7});
  scaler_->Tick(now_);
  EXPECT_EQ(Period(0, 0.76).desired, 1);  // 0.76 / 0.7 = 1.086: within 10%
  EXPECT_TRUE(fleet_.started.empty());
  EXPECT_EQ(Period(0, 0.78).desired, 2);  // 1.114: ceil(1.114) = 2
  EXPECT_EQ(fleet_.started.size(), 1u);
}

TEST_F(AutoscalerTest, ScalesDownOnlyAfterTheDelayAndDrainsTheNewestReplica) {
  Make({.min_replicas = 1, .max_replicas = 4, .target_busy = 0.5, .scale_down_delay_s = 10});
  scaler_->Tick(now_);
  EXPECT_EQ(Period(0, 1.0).desired, 2);
  fleet_.Promote();
  const std::vector<int> ids = fleet_.ServingIds(0);
  ASSERT_EQ(ids.size(), 2u);
  Period(0, 0.5);  // the new replica's first sample: no rate from it yet
  Period(0, 0.5);  // at target with two: the last recommendation of 2 is at now_
  const auto last_high = now_;
  // Idle from here: the rule recommends 1, the window holds 2 until the
  // recommendation of 2 is more than 10 s old.
  while (now_ + seconds(1) < last_high + seconds(10)) {
    const AutoscaleDecision d = Period(0, 0.0);
    EXPECT_EQ(d.desired, 2) << "scaled down " << (now_ - last_high).count() << " ns after";
    EXPECT_EQ(d.reason, "scale-down held by the 10 s stabilization window");
  }
  EXPECT_TRUE(fleet_.drained.empty());
  const AutoscaleDecision d = Period(0, 0.0);
  EXPECT_GE(now_ - last_high, seconds(10));
  EXPECT_EQ(d.desired, 1);
  ASSERT_EQ(fleet_.drained.size(), 1u);
  EXPECT_EQ(fleet_.drained[0], std::max(ids[0], ids[1]));  // the newest
  EXPECT_EQ(fleet_.Active(0), 1);
  // The draining replica is no longer counted; nothing more is drained.
  EXPECT_EQ(Period(0, 0.0).current, 1);
  EXPECT_EQ(fleet_.drained.size(), 1u);
}

TEST_F(AutoscalerTest, ClampsToMaxAndMin) {
  Make({.min_replicas = 2, .max_replicas = 3, .target_busy = 0.1, .scale_down_delay_s = 0});
  scaler_->Tick(now_);
  // Below min at start: brought up to min.
  AutoscaleDecision d = Period(0, 0.0);
  EXPECT_EQ(d.desired, 2);
  EXPECT_EQ(d.reason, "below min replicas");
  fleet_.Promote();
  d = Period(0, 5.0);  // asks for ceil(2 x 50) = 100
  EXPECT_EQ(d.desired, 3);
  EXPECT_EQ(d.reason, "capped at max replicas");
  fleet_.Promote();
  EXPECT_EQ(fleet_.Active(0), 3);
  d = Period(0, 0.0, seconds(20));  // idle, no delay: down to min, not below
  EXPECT_EQ(d.desired, 2);
  EXPECT_EQ(d.reason, "held at min replicas");
  fleet_.Reap();
  d = Period(0, 0.0, seconds(20));
  EXPECT_EQ(d.desired, 2);
  EXPECT_EQ(fleet_.Active(0), 2);
}

TEST_F(AutoscalerTest, ExpertsAreScaledIndependently) {
  Make({.min_replicas = 1, .max_replicas = 4, .target_busy = 0.5}, /*experts=*/3);
  scaler_->Tick(now_);
  for (int id : fleet_.ServingIds(1)) fleet_.Work(id, 1.6);  // expert 1 hot
  for (int id : fleet_.ServingIds(2)) fleet_.Work(id, 0.1);
  now_ += seconds(1);
  const std::vector<AutoscaleDecision> d = scaler_->Tick(now_);
  EXPECT_EQ(d[0].desired, 1);
  EXPECT_EQ(d[1].desired, 4);  // ceil(1.6 / 0.5)
  EXPECT_EQ(d[2].desired, 1);
  EXPECT_EQ(fleet_.Active(1), 4);
  EXPECT_EQ(fleet_.Active(0) + fleet_.Active(2), 2);
}

TEST_F(AutoscalerTest, CounterResetCountsFromZero) {
  Make({.min_replicas = 1, .max_replicas = 4, .target_busy = 0.5});
  fleet_.Work(0, 50);
  scaler_->Tick(now_);
  fleet_.busy["replica-0"] = 0.2;  // the process restarted
  now_ += seconds(1);
  EXPECT_NEAR(scaler_->Tick(now_)[0].busy, 0.2, 1e-9);
}

TEST_F(AutoscalerTest, NeverDrainsTheLastServingReplica) {
  // Two starting replicas and one serving; the rule asks for 1: both
  // starting ones go, the serving one stays.
  Make({.min_replicas = 1, .max_replicas = 4, .target_busy = 0.5, .scale_down_delay_s = 0});
  scaler_->Tick(now_);
  EXPECT_EQ(Period(0, 1.4).desired, 3);
  const AutoscaleDecision d = Period(0, 0.0, seconds(20));
  EXPECT_EQ(d.desired, 1);
  EXPECT_EQ(fleet_.drained.size(), 2u);
  EXPECT_EQ(fleet_.Count(0, State::STATE_SERVING), 1);
}

TEST(PickGpuTest, MostFreeMemoryAmongTheCandidates) {
  const std::map<int, int64_t> free = {{0, 10}, {1, 40}, {2, 30}, {3, 99}};
  EXPECT_EQ(PickGpu({0, 1, 2}, free), 1);
  EXPECT_EQ(PickGpu({0, 2}, free), 2);
  EXPECT_EQ(PickGpu({2, 1}, {{1, 5}, {2, 5}}), 2);  // tie: the first listed
  EXPECT_EQ(PickGpu({5, 6}, free), -1);
  EXPECT_EQ(PickGpu({}, free), -1);
}

TEST(PickGpuTest, NewReplicasGoWhereMostMemoryIsFree) {
  FakeFleet fleet;
  fleet.AddServing(0);
  std::map<int, int64_t> free = {{0, 1000}, {1, 5000}, {2, 3000}};
  AutoscalerOptions options{.min_replicas = 1, .max_replicas = 8, .target_busy = 0.5};
  options.gpus = {0, 1, 2};
  Autoscaler scaler(
      1, options, &fleet, fleet.Reader(),
      [&free]() -> absl::StatusOr<std::map<int, int64_t>> { return free; }, nullptr,
      [](const std::string&) {});
  auto now = Autoscaler::TimePoint() + seconds(100);
  scaler.Tick(now);
  fleet.Work(0, 1.0);
  scaler.Tick(now += seconds(1));
  ASSERT_EQ(fleet.started.size(), 1u);
  EXPECT_EQ(fleet.started[0].second, 1);
  free[1] = 100;  // the replica took GPU 1's memory
  fleet.Promote();
  for (int id : fleet.ServingIds(0)) fleet.Work(id, 1.5);  // 1.5 per replica: ceil(2 x 3) = 6
  scaler.Tick(now += seconds(1));
  ASSERT_GE(fleet.started.size(), 2u);
  EXPECT_EQ(fleet.started[1].second, 2);
  // Without a working query: the first GPU.
  Autoscaler blind(
      1, options, &fleet, fleet.Reader(),
      []() -> absl::StatusOr<std::map<int, int64_t>> { return absl::UnavailableError("no smi"); },
      nullptr, [](const std::string&) {});
  EXPECT_EQ(blind.PlaceNewReplica(), 0);
}

TEST(NvidiaSmiTest, ParsesFreeMemoryInMiB) {
  auto free = ParseNvidiaSmiFreeMemory("0, 80000\n1, 1024\n");
  ASSERT_TRUE(free.ok()) << free.status();
  EXPECT_EQ(free->at(0), int64_t{80000} << 20);
  EXPECT_EQ(free->at(1), int64_t{1024} << 20);
  auto bad = ParseNvidiaSmiFreeMemory("0, 80000\nGPU 1: N/A\n");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("GPU 1: N/A"), std::string::npos);
}

TEST(MetricSumTest, SumsTheSeriesOfOneName) {
  const std::string text =
      "# HELP switchyard_expert_busy_seconds_total Seconds spent computing.\n"
      "# TYPE switchyard_expert_busy_seconds_total counter\n"
      "switchyard_expert_busy_seconds_total 1.5\n"
      "switchyard_expert_busy_seconds_total_other 7\n"
      "switchyard_expert_tokens_total{layer=\"0\",expert=\"3\"} 10\n"
      "switchyard_expert_tokens_total{layer=\"1\",expert=\"3\"} 5\n";
  EXPECT_DOUBLE_EQ(*MetricSum(text, "switchyard_expert_busy_seconds_total"), 1.5);
  EXPECT_DOUBLE_EQ(*MetricSum(text, "switchyard_expert_tokens_total"), 15);
  EXPECT_EQ(MetricSum(text, "switchyard_missing").status().code(), absl::StatusCode::kNotFound);
}

// The same busy series through the loop and through the two formulas of
// cli/scaling_rule.h that the Kubernetes path uses: the HPA with a Pods
// AverageValue metric (prometheus-adapter: busy per pod) and KEDA's
// External AverageValue trigger (the query's total busy, threshold = the
// target per replica). Each period's replica count must be the same.
TEST(AutoscalerFormulaTest, DecisionsEqualTheHpaAndKedaFormulasOnTheSameSeries) {
  const AutoscalerOptions options{
      .min_replicas = 1, .max_replicas = 6, .target_busy = 0.7, .scale_down_delay_s = 30};
  // Total busy seconds per second of the expert, one value per 5 s period:
  // a ramp up, a plateau near the target, a spike, and the load going away.
  // (No total is a multiple of the target, where the two formulas' floating
  // point could round to different sides of an integer.)
  const std::vector<double> total = {0.2, 0.5, 0.75, 0.8, 1.2,  1.45, 1.5, 2.9, 3.0, 4.5,
                                     4.4, 4.6, 2.0,  1.0, 0.65, 0.3,  0.0, 0.0, 0.0, 0.0,
                                     0.0, 0.0, 0.0,  0.0, 0.0,  0.1,  0.9, 0.9, 0.9, 0.0,
                                     0.0, 0.0, 0.0,  0.0, 0.0,  0.0,  0.0};
  FakeFleet fleet;
  fleet.AddServing(0);
  Autoscaler scaler(1, options, &fleet, fleet.Reader(), nullptr, nullptr,
                    [](const std::string&) {});
  scaling::HpaController hpa(Autoscaler::SpecFor(options));
  scaling::HpaSpec keda_spec = Autoscaler::SpecFor(options);  // KEDA's HPA: same behavior
  scaling::HpaController keda(keda_spec);

  auto now = Autoscaler::TimePoint() + seconds(1000);
  scaler.Tick(now);
  int changes = 0;
  // The replicas the loop sampled at the last tick and still routes to: the
  // load of a period falls on them (a replica that became serving after the
  // tick has no rate until its second sample, as a new pod has none).
  std::vector<int> serving = fleet.ServingIds(0);
  for (size_t i = 0; i < total.size(); ++i) {
    for (int id : serving) fleet.Work(id, total[i] * 5 / serving.size());
    now += seconds(5);
    const int current = fleet.Active(0);
    const AutoscaleDecision d = scaler.Tick(now)[0];
    ASSERT_TRUE(d.decided) << i;
    const scaling::ScalingDecision by_hpa = hpa.Reconcile(
        now, current,
        {{scaling::MetricKind::METRIC_KIND_PODS_AVERAGE_VALUE, total[i] / current, 0.7}});
    const scaling::ScalingDecision by_keda = keda.Reconcile(
        now, current, {scaling::KedaMetric({.query_value = total[i], .threshold = 0.7})});
    EXPECT_EQ(d.current, current) << i;
    EXPECT_EQ(d.desired, by_hpa.desired) << "period " << i << " total " << total[i];
    EXPECT_EQ(d.desired, by_keda.desired) << "period " << i << " total " << total[i];
    EXPECT_EQ(fleet.Active(0), d.desired) << i;
    changes += d.desired != current;
    fleet.Reap();
    serving = fleet.ServingIds(0);
    fleet.Promote();
  }
  // The series moved the count both ways, and ended at the minimum.
  EXPECT_GE(changes, 4);
  EXPECT_EQ(fleet.Active(0), 1);
}

}  // namespace
}  // namespace switchyard::cli
