// The gateway's Prometheus metrics (names and meanings: docs/metrics.md).
// Children that the hot path touches are resolved once, here.
//
// Thread-safety: thread-safe (prometheus-cpp's metrics and families are).
#ifndef SWITCHYARD_GATEWAY_GATEWAY_METRICS_H_
#define SWITCHYARD_GATEWAY_GATEWAY_METRICS_H_

#include <array>
#include <string>
#include <string_view>
#include <vector>

#include "core/model_config.h"
#include "gateway/step_runner.h"
#include "metrics/metrics.h"

namespace switchyard {

struct GatewayMetrics : public RoutingObserver {
  GatewayMetrics(metrics::Registry* registry, const ModelConfig& config);

  // RoutingObserver: counts switchyard_gateway_routed_tokens_total.
  void OnExpertTokens(int layer, int expert, int tokens) override {
    RoutedTokens(layer, expert).Increment(tokens);
  }

  // outcome: ok, cancelled, invalid_argument, resource_exhausted, unavailable, error.
  metrics::Counter& Requests(const std::string& method, const std::string& outcome);
  metrics::Counter& RoutedTokens(int layer, int expert) {
    return *routed_tokens[layer * num_experts + expert];
  }
  // The call-latency histogram of `expert` (0..E-1, created up front: the
  // lookup on each call is a vector index, as prometheus-cpp's Family::Add
  // would build and drop a histogram every time).
  metrics::Histogram& ExpertCallDuration(int expert);
  // Splits one successful expert call's round trip (as the gateway timed it)
  // into the time the shard reported queueing and computing and the rest,
  // network = round trip - queue - compute (each clamped at 0), and observes
  // the three per-expert histograms.
  void ObserveExpertHop(int expert, double round_trip_seconds, double queue_seconds,
                        double compute_seconds);
  // Failed calls to `expert` with gRPC status code name `code` (UNAVAILABLE).
  metrics::Counter& ExpertCallErrors(int expert, const std::string& code);
  // Calls to `expert` (each attempt: a retry is a call of its own) that
  // travelled on `transport`, one of kExpertTransports.
  metrics::Counter& ExpertCalls(int expert, std::string_view transport);
  // The transport label values: a unary Forward, a ForwardStream message, a
  // frame on the shard's frame socket.
  static constexpr std::array<const char*, 3> kExpertTransports = {"unary", "stream", "frames"};

  metrics::Family<metrics::Counter>& requests;
  metrics::Counter& prompt_tokens;
  metrics::Counter& generated_tokens;
  metrics::Histogram& time_to_first_token;
  metrics::Histogram& inter_token_latency;
  metrics::Histogram& request_duration;
  metrics::Gauge& running_sequences;
  metrics::Gauge& waiting_requests;
  metrics::Gauge& kv_used_tokens;
  metrics::Gauge& kv_capacity_tokens;
  metrics::Gauge& kv_capacity_bytes;
  metrics::Counter& kv_preemptions;
  metrics::Counter& kv_prefix_hit_tokens;
  metrics::Family<metrics::Gauge>& kv_blocks;
  metrics::Gauge& kv_blocks_used;
  metrics::Gauge& kv_blocks_cached;
  metrics::Gauge& kv_blocks_free;
  metrics::Histogram& step_tokens;
  metrics::Family<metrics::Histogram>& expert_call_duration;
  metrics::Family<metrics::Counter>& expert_call_errors;
  metrics::Family<metrics::Counter>& expert_calls;
  metrics::Family<metrics::Histogram>& expert_network_duration;
  metrics::Family<metrics::Histogram>& expert_queue_duration;
  metrics::Family<metrics::Histogram>& expert_compute_duration;

 private:
  int num_experts;
  std::vector<metrics::Counter*> routed_tokens;              // [L * E]
  std::vector<metrics::Histogram*> expert_call_seconds;      // [E]
  std::vector<metrics::Counter*> expert_calls_by_transport;  // [E * kExpertTransports]
  // Per-expert hop breakdown, [E] each, created up front like the above.
  std::vector<metrics::Histogram*> expert_network_seconds;
  std::vector<metrics::Histogram*> expert_queue_seconds;
  std::vector<metrics::Histogram*> expert_compute_seconds;
};

// The outcome label for a gRPC/absl status code name.
std::string OutcomeLabel(int absl_status_code);

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_GATEWAY_METRICS_H_
