// Test tool: the replica counts the HPA or KEDA would set, computed with
// cli/scaling_rule.h from metric values a test measured (tests/ops/
// autoscale_prometheus_test.py feeds it what Prometheus answered for the
// rendered manifests' queries).
//
// stdin: {"objects": [{"name": "...", "current": 1, "min": 1, "max": 8,
//          "tolerance": 0.1 (optional),
//          "scale_up" / "scale_down": {"window": S, "select": "Max|Min|Disabled",
//                                      "policies": [{"type": "Pods|Percent",
//                                                    "value": N, "period": S}]} (optional),
//          "fallback": {"failure_threshold": N, "replicas": N} (KEDA, optional),
//          "triggers": [{"value": X, "threshold": T, "failures": 0}]       (KEDA) or
//          "metrics": [{"kind": "pods_average_value|external_average_value|external_value",
//                       "value": X, "target": T, "spread": false}]}, ...]}  (HPA)
//         or, for a sequence of reconciles, "polls": [{"t": SECONDS, "triggers": [...]
//         or "metrics": [...]}, ...] instead of triggers/metrics: each poll starts from
//         the replicas the previous one set; a metric with "spread": true is a total
//         that the current replicas share evenly (its per-pod average is value / current).
// stdout: {"NAME": {"recommended": N, "desired": N, "reason": "..."}, ...}, with polls
//         {"NAME": {"timeline": [{"t": S, "current": N, "recommended": N, "desired": N,
//                                 "reason": "..."}, ...]}}
// Exit 2 with a message on malformed input.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>

#include "cli/scaling_rule.h"
#include "nlohmann/json.hpp"

namespace scaling = switchyard::cli::scaling;
using nlohmann::json;

namespace {

scaling::ScalingRules Rules(const json& j, scaling::ScalingRules rules) {
  if (j.is_null()) return rules;
  rules.stabilization_window_seconds = j.value("window", rules.stabilization_window_seconds);
  const std::string select = j.value("select", std::string("Max"));
  rules.select = select == "Min"        ? scaling::ScalingRules::Select::SELECT_MIN
                 : select == "Disabled" ? scaling::ScalingRules::Select::SELECT_DISABLED
                                        : scaling::ScalingRules::Select::SELECT_MAX;
  if (j.contains("policies")) {
    rules.policies.clear();
    for (const json& p : j.at("policies")) {
      rules.policies.push_back({p.at("type").get<std::string>() == "Percent"
                                    ? scaling::ScalingPolicy::Type::TYPE_PERCENT
                                    : scaling::ScalingPolicy::Type::TYPE_PODS,
                                p.at("value").get<int>(), p.at("period").get<int>()});
    }
  }
  return rules;
}

scaling::MetricKind Kind(const std::string& name) {
  if (name == "external_average_value") {
    return scaling::MetricKind::METRIC_KIND_EXTERNAL_AVERAGE_VALUE;
  }
  if (name == "external_value") return scaling::MetricKind::METRIC_KIND_EXTERNAL_VALUE;
  if (name == "pods_average_value") return scaling::MetricKind::METRIC_KIND_PODS_AVERAGE_VALUE;
  throw std::invalid_argument("unknown metric kind '" + name + "'");
}

}  // namespace

int main() {
  try {
    const json in = json::parse(std::string(std::istreambuf_iterator<char>(std::cin), {}));
    json out = json::object();
    for (const json& o : in.at("objects")) {
      scaling::HpaSpec spec;
      spec.min_replicas = o.at("min").get<int>();
      spec.max_replicas = o.at("max").get<int>();
      spec.tolerance = o.value("tolerance", scaling::kDefaultTolerance);
      spec.scale_up = Rules(o.value("scale_up", json()), spec.scale_up);
      spec.scale_down = Rules(o.value("scale_down", json()), spec.scale_down);
      scaling::KedaFallback fallback;
      if (o.contains("fallback")) {
        fallback.failure_threshold = o["fallback"].at("failure_threshold").get<int>();
        fallback.replicas = o["fallback"].at("replicas").get<int>();
      }
      // The readings of one poll at `current` replicas.
      auto readings = [&](const json& poll, int current) {
        std::vector<scaling::MetricReading> metrics;
        for (const json& t : poll.value("triggers", json::array())) {
          metrics.push_back(
              scaling::KedaMetric({t.at("value").get<double>(), t.at("threshold").get<double>(),
                                   t.value("failures", 0)},
                                  fallback));
        }
        for (const json& m : poll.value("metrics", json::array())) {
          double value = m.at("value").get<double>();
          if (m.value("spread", false) && current > 0) value /= current;
          metrics.push_back(
              {Kind(m.at("kind").get<std::string>()), value, m.at("target").get<double>()});
        }
        return metrics;
      };
      scaling::HpaController hpa(spec);
      const auto t0 = std::chrono::steady_clock::now();
      int current = o.at("current").get<int>();
      if (!o.contains("polls")) {
        const scaling::ScalingDecision d = hpa.Reconcile(t0, current, readings(o, current));
        out[o.at("name").get<std::string>()] = {
            {"recommended", d.recommended}, {"desired", d.desired}, {"reason", d.reason}};
        continue;
      }
      json timeline = json::array();
      for (const json& poll : o.at("polls")) {
        const auto at = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                 std::chrono::duration<double>(poll.at("t").get<double>()));
        const scaling::ScalingDecision d = hpa.Reconcile(at, current, readings(poll, current));
        timeline.push_back({{"t", poll.at("t")},
                            {"current", current},
                            {"recommended", d.recommended},
                            {"desired", d.desired},
                            {"reason", d.reason}});
        current = d.desired;  // as if the Deployment followed at once
      }
      out[o.at("name").get<std::string>()] = {{"timeline", std::move(timeline)}};
    }
    std::cout << out.dump(1) << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "scaling_rule_eval: bad input: %s\n", e.what());
    return 2;
  }
}
