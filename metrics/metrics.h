// A small Prometheus metrics module in the spirit of prometheus-cpp (which
// Debian 12 does not package): counter, gauge and histogram families with
// labels, and the text exposition format.
//
// Hot path: look a child up once (Family::Add returns a stable reference) and
// keep it; Increment/Set/Observe are lock-free atomics.
//
// Thread-safety: everything here is thread-safe.
#ifndef SWITCHYARD_METRICS_METRICS_H_
#define SWITCHYARD_METRICS_METRICS_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "core/status_macros.h"

namespace switchyard::metrics {

class Counter {
 public:
  void Increment(double by = 1.0);  // by >= 0
  double Value() const;

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Increment(double by = 1.0);
  void Decrement(double by = 1.0) { Increment(-by); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  // `bounds`: upper bounds of the buckets, increasing; +Inf is implicit.
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);

  const std::vector<double>& bounds() const { return bounds_; }
  // Cumulative counts per bound, then the +Inf count.
  std::vector<uint64_t> CumulativeCounts() const;
  double Sum() const;
  uint64_t Count() const { return count_.load(std::memory_order_relaxed); }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // per bucket, not cumulative
  std::atomic<double> sum_{0.0};
  std::atomic<uint64_t> count_{0};
};

// Bucket helpers: `count` bounds start, start*factor, ...
std::vector<double> ExponentialBuckets(double start, double factor, int count);
// Latency buckets from 100 µs to ~100 s, for *_seconds histograms.
std::vector<double> LatencyBuckets();

enum class MetricType { kCounter, kGauge, kHistogram };

// A metric name with one child per distinct label value tuple.
template <typename T>
class Family {
 public:
  // The child for `label_values` (one per label name), created on first use.
  // The reference stays valid for the life of the family.
  T& Add(const std::vector<std::string>& label_values);

  const std::string& name() const { return name_; }

 private:
  friend class Registry;
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::vector<double> bounds)
      : name_(std::move(name)),
        help_(std::move(help)),
        label_names_(std::move(label_names)),
        bounds_(std::move(bounds)) {}

  std::string name_;
  std::string help_;
  std::vector<std::string> label_names_;
  std::vector<double> bounds_;  // histograms only
  mutable std::mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<T>> children_;
};

// Owns families and renders them. Names must match [a-zA-Z_:][a-zA-Z0-9_:]*
// and be unique (checked with SY_CHECK: a programming error, not input).
class Registry {
 public:
  Family<Counter>& AddCounter(const std::string& name, const std::string& help,
                              std::vector<std::string> label_names = {});
  Family<Gauge>& AddGauge(const std::string& name, const std::string& help,
                          std::vector<std::string> label_names = {});
  Family<Histogram>& AddHistogram(const std::string& name, const std::string& help,
                                  std::vector<double> bounds,
                                  std::vector<std::string> label_names = {});

  // Prometheus text exposition format 0.0.4.
  std::string Serialize() const;

 private:
  void CheckNew(const std::string& name);

  mutable std::mutex mu_;
  std::vector<std::string> order_;
  std::map<std::string, std::unique_ptr<Family<Counter>>> counters_;
  std::map<std::string, std::unique_ptr<Family<Gauge>>> gauges_;
  std::map<std::string, std::unique_ptr<Family<Histogram>>> histograms_;
};

template <typename T>
T& Family<T>::Add(const std::vector<std::string>& label_values) {
  SY_CHECK(label_values.size() == label_names_.size());
  std::lock_guard<std::mutex> lock(mu_);
  auto& child = children_[label_values];
  if (!child) {
    if constexpr (std::is_same_v<T, Histogram>) {
      child = std::make_unique<T>(bounds_);
    } else {
      child = std::make_unique<T>();
    }
  }
  return *child;
}

}  // namespace switchyard::metrics

#endif  // SWITCHYARD_METRICS_METRICS_H_
