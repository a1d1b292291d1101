#include "gateway/gateway_metrics.h"

#include "absl/status/status.h"

namespace switchyard {

GatewayMetrics::GatewayMetrics(metrics::Registry* r, const ModelConfig& config)
    : requests(r->AddCounter("switchyard_gateway_requests_total",
                             "Finished generation requests by method and outcome.",
                             {"method", "outcome"})),
      prompt_tokens(r->AddCounter("switchyard_gateway_prompt_tokens_total",
                                  "Prompt tokens of admitted requests.")
                        .Add({})),
      generated_tokens(
          r->AddCounter("switchyard_gateway_generated_tokens_total", "Tokens generated.").Add({})),
      time_to_first_token(r->AddHistogram("switchyard_gateway_time_to_first_token_seconds",
                                          "Admission to the first generated token.",
                                          metrics::LatencyBuckets())
                              .Add({})),
      inter_token_latency(r->AddHistogram("switchyard_gateway_inter_token_latency_seconds",
                                          "Time between successive tokens of one request.",
                                          metrics::LatencyBuckets())
                              .Add({})),
      request_duration(r->AddHistogram("switchyard_gateway_request_duration_seconds",
                                       "Admission to the end of a request.",
                                       metrics::LatencyBuckets())
                           .Add({})),
      running_sequences(
          r->AddGauge("switchyard_gateway_running_sequences", "Sequences in the running batch.")
              .Add({})),
      waiting_requests(
          r->AddGauge("switchyard_gateway_waiting_requests", "Requests in the admission queue.")
              .Add({})),
      kv_used_tokens(
          r->AddGauge("switchyard_gateway_kv_cache_used_tokens", "KV cache token slots in use.")
              .Add({})),
      kv_capacity_tokens(
          r->AddGauge("switchyard_gateway_kv_cache_capacity_tokens", "KV cache token slots in all.")
              .Add({})),
      step_tokens(r->AddHistogram("switchyard_gateway_step_tokens",
                                  "Tokens per scheduler step (decodes and prefill chunks).",
                                  metrics::ExponentialBuckets(1, 2, 14))
                      .Add({})),
      expert_call_duration(r->AddHistogram("switchyard_gateway_expert_call_duration_seconds",
                                           "Latency of expert calls as the gateway sees it.",
                                           metrics::LatencyBuckets(), {"expert"})),
      expert_call_errors(r->AddCounter("switchyard_gateway_expert_call_errors_total",
                                       "Failed expert calls by gRPC status code.",
                                       {"expert", "code"})),
      num_experts(config.num_local_experts) {
  auto& routed =
      r->AddCounter("switchyard_gateway_routed_tokens_total",
                    "Tokens the router sent to each (layer, expert).", {"layer", "expert"});
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    for (int e = 0; e < config.num_local_experts; ++e) {
      routed_tokens.push_back(&routed.Add({std::to_string(l), std::to_string(e)}));
    }
  }
  // Make every per-expert series exist from the start, so dashboards and
  // scaling rules see zeros rather than nothing.
  for (int e = 0; e < config.num_local_experts; ++e) {
    expert_call_duration.Add({std::to_string(e)});
  }
  for (const char* method : {"Generate", "GenerateStream"}) Requests(method, "ok");
}

metrics::Counter& GatewayMetrics::Requests(const std::string& method, const std::string& outcome) {
  return requests.Add({method, outcome});
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
