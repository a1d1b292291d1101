#include "metrics/metrics.h"

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <set>

#include "prometheus/text_serializer.h"

namespace switchyard::metrics {
namespace {

// HELP text escaped as the text format requires (backslash and newline);
// prometheus-cpp 1.0.1's TextSerializer writes HELP as given.
std::string EscapeHelp(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

// Registers with `builder`; prometheus-cpp throws std::invalid_argument for a
// bad or clashing name, a programming error that ends the process here.
template <typename Builder>
auto& Register(Builder builder, Registry& registry, const std::string& name,
               const std::string& help, prometheus::MetricType type) {
  try {
    auto& family = builder.Name(name).Help(EscapeHelp(help)).Register(registry);
    registry.Announce(name, EscapeHelp(help), type);
    return family;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "metrics: cannot register %s: %s\n", name.c_str(), e.what());
    std::abort();
  }
}

}  // namespace

std::vector<prometheus::MetricFamily> Registry::Collect() const {
  std::vector<prometheus::MetricFamily> families = prometheus::Registry::Collect();
  std::set<std::string> present;
  for (const auto& family : families) present.insert(family.name);
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& family : announced_) {
    if (!present.count(family.name)) families.push_back(family);
  }
  return families;
}

void Registry::Announce(const std::string& name, const std::string& escaped_help,
                        prometheus::MetricType type) {
  prometheus::MetricFamily family;
  family.name = name;
  family.help = escaped_help;
  family.type = type;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& known : announced_) {
    if (known.name == name) return;  // the same family registered again (merged)
  }
  announced_.push_back(std::move(family));
}

Family<Counter>& AddCounter(Registry& registry, const std::string& name, const std::string& help) {
  return Register(prometheus::BuildCounter(), registry, name, help,
                  prometheus::MetricType::Counter);
}

Family<Gauge>& AddGauge(Registry& registry, const std::string& name, const std::string& help) {
  return Register(prometheus::BuildGauge(), registry, name, help, prometheus::MetricType::Gauge);
}

Family<Histogram>& AddHistogram(Registry& registry, const std::string& name,
                                const std::string& help) {
  return Register(prometheus::BuildHistogram(), registry, name, help,
                  prometheus::MetricType::Histogram);
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  std::vector<double> b;
  double v = start;
  for (int i = 0; i < count; ++i, v *= factor) b.push_back(v);
  return b;
}

const std::vector<double>& LatencyBuckets() {
  static const std::vector<double> buckets = ExponentialBuckets(1e-4, 2.0, 21);  // 100 µs .. 105 s
  return buckets;
}

std::string Serialize(const Registry& registry) {
  return prometheus::TextSerializer().Serialize(registry.Collect());
}

}  // namespace switchyard::metrics
