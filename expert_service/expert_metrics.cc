#include "expert_service/expert_metrics.h"

#include <string>

namespace switchyard {

ExpertMetrics::ExpertMetrics(metrics::Registry* r, const std::vector<std::pair<int, int>>& held)
    : in_flight_(
          metrics::AddGauge(*r, "switchyard_expert_calls_in_flight", "Calls queued or computing.")
              .Add({})),
      queue_seconds_(metrics::AddHistogram(*r, "switchyard_expert_queue_seconds",
                                           "Wait from arrival to compute start.")
                         .Add({}, metrics::LatencyBuckets())),
      compute_seconds_(
          metrics::AddHistogram(*r, "switchyard_expert_compute_seconds", "Compute time per call.")
              .Add({}, metrics::LatencyBuckets())),
      busy_seconds_(metrics::AddCounter(*r, "switchyard_expert_busy_seconds_total",
                                        "Seconds spent computing (its rate is the utilisation).")
                        .Add({})) {
  auto& tokens =
      metrics::AddCounter(*r, "switchyard_expert_tokens_total",
                          "Tokens run through each (layer, expert): the scaling signal.");
  auto& calls = metrics::AddCounter(*r, "switchyard_expert_calls_total",
                                    "Forward calls served per (layer, expert).");
  for (const auto& [layer, expert] : held) {
    const metrics::Labels labels = {{"layer", std::to_string(layer)},
                                    {"expert", std::to_string(expert)}};
    per_expert_[{layer, expert}] = {&tokens.Add(labels), &calls.Add(labels)};
  }
}

void ExpertMetrics::CallDone(int layer, int expert, int64_t tokens, double queue_seconds,
                             double compute_seconds) {
  in_flight_.Decrement();
  if (auto it = per_expert_.find({layer, expert}); it != per_expert_.end()) {
    it->second.calls->Increment();
    it->second.tokens->Increment(static_cast<double>(tokens));
  }
  queue_seconds_.Observe(queue_seconds);
  compute_seconds_.Observe(compute_seconds);
  busy_seconds_.Increment(compute_seconds);
}

}  // namespace switchyard
