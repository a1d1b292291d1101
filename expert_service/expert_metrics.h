// The expert service's Prometheus metrics (names and meanings:
// docs/metrics.md). `switchyard_expert_tokens_total` is the per-expert load
// signal autoscaling reads.
//
// Thread-safety: thread-safe (prometheus-cpp's metrics and families are).
#ifndef SWITCHYARD_EXPERT_SERVICE_EXPERT_METRICS_H_
#define SWITCHYARD_EXPERT_SERVICE_EXPERT_METRICS_H_

#include <map>
#include <utility>
#include <vector>

#include "metrics/metrics.h"

namespace switchyard {

class ExpertMetrics {
 public:
  // Creates every series for the held (layer, expert) pairs up front, so
  // scrapes see zeros before the first call.
  ExpertMetrics(metrics::Registry* registry, const std::vector<std::pair<int, int>>& held);

  // A call was accepted (queued).
  void CallAccepted() { in_flight_.Increment(); }
  // A call finished: `tokens` rows computed (0 if it failed), times in seconds.
  void CallDone(int layer, int expert, int64_t tokens, double queue_seconds,
                double compute_seconds);

 private:
  struct PerExpert {
    metrics::Counter* tokens;
    metrics::Counter* calls;
  };
  std::map<std::pair<int, int>, PerExpert> per_expert_;
  metrics::Gauge& in_flight_;
  metrics::Histogram& queue_seconds_;
  metrics::Histogram& compute_seconds_;
  metrics::Counter& busy_seconds_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_EXPERT_SERVICE_EXPERT_METRICS_H_
