#include "gateway/gateway_metrics.h"

#include <algorithm>

#include "absl/status/status.h"

namespace switchyard {
namespace {

// The per-hop histograms' buckets: factor 2 like metrics::LatencyBuckets but
// from 10 us (10 us .. 10.5 s), since a GPU expert's compute and a loopback
// hop are tens of microseconds, all in LatencyBuckets' first (100 us) bucket.
const std::vector<double>& HopBuckets() {
  static const std::vector<double> buckets = metrics::ExponentialBuckets(1e-5, 2.0, 21);
  return buckets;
}

}  // namespace

GatewayMetrics::GatewayMetrics(metrics::Registry* r, const ModelConfig& config)
    : requests(metrics::AddCounter(*r, "switchyard_gateway_requests_total",
                                   "Finished generation requests by method and outcome.")),
      prompt_tokens(metrics::AddCounter(*r, "switchyard_gateway_prompt_tokens_total",
                                        "Prompt tokens of admitted requests.")
                        .Add({})),
      generated_tokens(
          metrics::AddCounter(*r, "switchyard_gateway_generated_tokens_total", "Tokens generated.")
              .Add({})),
      time_to_first_token(metrics::AddHistogram(*r,
                                                "switchyard_gateway_time_to_first_token_seconds",
                                                "Admission to the first generated token.")
                              .Add({}, metrics::LatencyBuckets())),
      inter_token_latency(metrics::AddHistogram(*r,
                                                "switchyard_gateway_inter_token_latency_seconds",
                                                "Time between successive tokens of one request.")
                              .Add({}, metrics::LatencyBuckets())),
      request_duration(metrics::AddHistogram(*r, "switchyard_gateway_request_duration_seconds",
                                             "Admission to the end of a request.")
                           .Add({}, metrics::LatencyBuckets())),
      running_sequences(metrics::AddGauge(*r, "switchyard_gateway_running_sequences",
                                          "Sequences in the running batch.")
                            .Add({})),
      waiting_requests(metrics::AddGauge(*r, "switchyard_gateway_waiting_requests",
                                         "Requests in the admission queue.")
                           .Add({})),
      kv_used_tokens(metrics::AddGauge(*r, "switchyard_gateway_kv_cache_used_tokens",
                                       "KV cache token slots in use.")
                         .Add({})),
      kv_capacity_tokens(metrics::AddGauge(*r, "switchyard_gateway_kv_cache_capacity_tokens",
                                           "KV cache token slots in all.")
                             .Add({})),
      kv_capacity_bytes(metrics::AddGauge(*r, "switchyard_gateway_kv_cache_capacity_bytes",
                                          "Bytes of K/V storage the KV cache holds in all.")
                            .Add({})),
      kv_preemptions(metrics::AddCounter(*r, "switchyard_gateway_kv_cache_preemptions_total",
                                         "Sequences that gave up their KV cache to older ones "
                                         "when it ran out; their context is prefilled again.")
                         .Add({})),
      kv_prefix_hit_tokens(
          metrics::AddCounter(*r, "switchyard_gateway_kv_cache_prefix_hit_tokens_total",
                              "Prompt tokens taken from cached prefix blocks instead of "
                              "being prefilled.")
              .Add({})),
      kv_blocks(metrics::AddGauge(*r, "switchyard_gateway_kv_cache_blocks",
                                  "KV cache blocks by state: used (held by sequences), cached "
                                  "(a published prefix no sequence holds; evicted on demand), "
                                  "free.")),
      kv_blocks_used(kv_blocks.Add({{"state", "used"}})),
      kv_blocks_cached(kv_blocks.Add({{"state", "cached"}})),
      kv_blocks_free(kv_blocks.Add({{"state", "free"}})),
      step_tokens(metrics::AddHistogram(*r, "switchyard_gateway_step_tokens",
                                        "Tokens per scheduler step (decodes and prefill chunks).")
                      .Add({}, metrics::ExponentialBuckets(1, 2, 14))),
      expert_call_duration(
          metrics::AddHistogram(*r, "switchyard_gateway_expert_call_duration_seconds",
                                "Latency of expert calls as the gateway sees it.")),
      expert_call_errors(metrics::AddCounter(*r, "switchyard_gateway_expert_call_errors_total",
                                             "Failed expert calls by gRPC status code.")),
      expert_calls(metrics::AddCounter(*r, "switchyard_gateway_expert_calls_total",
                                       "Expert calls by the transport they went on: frames, "
                                       "stream (gRPC ForwardStream) or unary (gRPC Forward).")),
      expert_network_duration(metrics::AddHistogram(
          *r, "switchyard_gateway_expert_network_seconds",
          "Round trip of successful expert calls minus the shard's queue and compute time.")),
      expert_queue_duration(
          metrics::AddHistogram(*r, "switchyard_gateway_expert_queue_seconds",
                                "Queue time the expert shard reported for successful calls.")),
      expert_compute_duration(
          metrics::AddHistogram(*r, "switchyard_gateway_expert_compute_seconds",
                                "Compute time the expert shard reported for successful calls.")),
      num_experts(config.num_local_experts) {
  auto& routed = metrics::AddCounter(*r, "switchyard_gateway_routed_tokens_total",
                                     "Tokens the router sent to each (layer, expert).");
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    for (int e = 0; e < config.num_local_experts; ++e) {
      routed_tokens.push_back(
          &routed.Add({{"layer", std::to_string(l)}, {"expert", std::to_string(e)}}));
    }
  }
  // Make every per-expert series exist from the start, so dashboards and
  // scaling rules see zeros rather than nothing.
  for (int e = 0; e < config.num_local_experts; ++e) {
    expert_call_seconds.push_back(
        &expert_call_duration.Add({{"expert", std::to_string(e)}}, metrics::LatencyBuckets()));
    const metrics::Labels label = {{"expert", std::to_string(e)}};
    expert_network_seconds.push_back(&expert_network_duration.Add(label, HopBuckets()));
    expert_queue_seconds.push_back(&expert_queue_duration.Add(label, HopBuckets()));
    expert_compute_seconds.push_back(&expert_compute_duration.Add(label, HopBuckets()));
    for (const char* transport : kExpertTransports) {
      expert_calls_by_transport.push_back(
          &expert_calls.Add({{"expert", std::to_string(e)}, {"transport", transport}}));
    }
  }
  for (const char* method : {"Generate", "GenerateStream"}) Requests(method, "ok");
}

metrics::Counter& GatewayMetrics::Requests(const std::string& method, const std::string& outcome) {
  return requests.Add({{"method", method}, {"outcome", outcome}});
}

metrics::Histogram& GatewayMetrics::ExpertCallDuration(int expert) {
  if (expert >= 0 && expert < static_cast<int>(expert_call_seconds.size())) {
    return *expert_call_seconds[expert];
  }
  return expert_call_duration.Add({{"expert", std::to_string(expert)}}, metrics::LatencyBuckets());
}

void GatewayMetrics::ObserveExpertHop(int expert, double round_trip_seconds, double queue_seconds,
                                      double compute_seconds) {
  const double queue = std::max(0.0, queue_seconds);
  const double compute = std::max(0.0, compute_seconds);
  const double network = std::max(0.0, round_trip_seconds - queue - compute);
  if (expert >= 0 && expert < static_cast<int>(expert_network_seconds.size())) {
    expert_network_seconds[expert]->Observe(network);
    expert_queue_seconds[expert]->Observe(queue);
    expert_compute_seconds[expert]->Observe(compute);
    return;
  }
  const metrics::Labels label = {{"expert", std::to_string(expert)}};
  expert_network_duration.Add(label, HopBuckets()).Observe(network);
  expert_queue_duration.Add(label, HopBuckets()).Observe(queue);
  expert_compute_duration.Add(label, HopBuckets()).Observe(compute);
}

metrics::Counter& GatewayMetrics::ExpertCallErrors(int expert, const std::string& code) {
  return expert_call_errors.Add({{"expert", std::to_string(expert)}, {"code", code}});
}

metrics::Counter& GatewayMetrics::ExpertCalls(int expert, std::string_view transport) {
  for (size_t t = 0; t < kExpertTransports.size(); ++t) {
    if (transport == kExpertTransports[t] && expert >= 0 && expert < num_experts) {
      return *expert_calls_by_transport[expert * kExpertTransports.size() + t];
    }
  }
  return expert_calls.Add(
      {{"expert", std::to_string(expert)}, {"transport", std::string(transport)}});
}

std::string OutcomeLabel(int code) {
  switch (static_cast<absl::StatusCode>(code)) {
    case absl::StatusCode::kOk:
      return "ok";
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kDeadlineExceeded:
      return "cancelled";
    case absl::StatusCode::kInvalidArgument:
      return "invalid_argument";
    case absl::StatusCode::kResourceExhausted:
      return "resource_exhausted";
    case absl::StatusCode::kUnavailable:
      return "unavailable";
    default:
      return "error";
  }
}

}  // namespace switchyard
