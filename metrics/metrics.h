// Prometheus metrics through prometheus-cpp's core library (Debian 12:
// prometheus-cpp-dev 1.0.1): its Registry, Family, Counter, Gauge, Histogram
// and TextSerializer. Only the core is used; prometheus-cpp's pull exposer
// (civetweb, fixed 100 KB thread stacks) is not, because the static
// thread-local storage of OpenBLAS and cuBLAS overflows those stacks; the
// /metrics endpoint is metrics/http_exporter.h.
//
// This header gives the project's names for prometheus-cpp's types and a few
// helpers that keep call sites short: registration (which escapes HELP text,
// which prometheus-cpp 1.0.1 writes verbatim), bucket layouts and the text
// exposition. Registry is prometheus::Registry plus one thing: families that
// have no child yet are still exposed (HELP and TYPE, no samples), so a
// scrape shows every metric the process has, e.g. an error counter before
// the first error; prometheus-cpp alone leaves them out.
//
// Hot path: look a child up once (Family::Add returns a reference that stays
// valid for the life of the family) and keep it.
//
// Thread-safety: everything here is thread-safe (prometheus-cpp's metrics and
// families are).
#ifndef SWITCHYARD_METRICS_METRICS_H_
#define SWITCHYARD_METRICS_METRICS_H_

#include <mutex>
#include <string>
#include <vector>

#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/labels.h"
#include "prometheus/metric_family.h"
#include "prometheus/registry.h"

namespace switchyard::metrics {

// prometheus::Registry that also reports its families without children (see
// above). Families are registered with AddCounter/AddGauge/AddHistogram.
class Registry final : public prometheus::Registry {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override;

  // Remembers a family for Collect() to report while it has no child (the
  // Add* helpers below call this).
  void Announce(const std::string& name, const std::string& escaped_help,
                prometheus::MetricType type);

 private:
  mutable std::mutex mu_;
  std::vector<prometheus::MetricFamily> announced_;  // without samples
};

using Counter = prometheus::Counter;
using Gauge = prometheus::Gauge;
using Histogram = prometheus::Histogram;
template <typename T>
using Family = prometheus::Family<T>;
// Label name -> value of one child.
using Labels = prometheus::Labels;

// Register a family under `name`, which must match [a-zA-Z_:][a-zA-Z0-9_:]*
// and not be registered as another type (else the process aborts with a
// message: a programming error, not input). Registering a name again with
// the same type and help returns the same family.
// Children come from Family::Add(labels) (histograms: Add(labels, bounds)).
Family<Counter>& AddCounter(Registry& registry, const std::string& name, const std::string& help);
Family<Gauge>& AddGauge(Registry& registry, const std::string& name, const std::string& help);
Family<Histogram>& AddHistogram(Registry& registry, const std::string& name,
                                const std::string& help);

// Bucket helpers: `count` upper bounds start, start*factor, ... (+Inf is
// implicit).
std::vector<double> ExponentialBuckets(double start, double factor, int count);
// Latency buckets from 100 µs to ~100 s, for *_seconds histograms.
const std::vector<double>& LatencyBuckets();

// The registry in the Prometheus text exposition format 0.0.4
// (prometheus::TextSerializer).
std::string Serialize(const Registry& registry);

}  // namespace switchyard::metrics

#endif  // SWITCHYARD_METRICS_METRICS_H_
