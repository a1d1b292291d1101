#include "metrics/metrics.h"

#include <cmath>
#include <cstdio>
#include <regex>

#include "core/status_macros.h"

namespace switchyard::metrics {
namespace {

void AtomicAdd(std::atomic<double>& target, double by) {
  double current = target.load(std::memory_order_relaxed);
  while (!target.compare_exchange_weak(current, current + by, std::memory_order_relaxed)) {
  }
}

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

std::string EscapeLabel(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::string EscapeHelp(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

// {a="x",b="y"} plus an optional extra label (le for buckets).
std::string Labels(const std::vector<std::string>& names, const std::vector<std::string>& values,
                   const std::string& extra_name = "", const std::string& extra_value = "") {
  if (names.empty() && extra_name.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += ",";
    out += names[i] + "=\"" + EscapeLabel(values[i]) + "\"";
  }
  if (!extra_name.empty()) {
    if (!names.empty()) out += ",";
    out += extra_name + "=\"" + extra_value + "\"";
  }
  return out + "}";
}

void Header(std::string& out, const std::string& name, const std::string& help, const char* type) {
  out += "# HELP " + name + " " + EscapeHelp(help) + "\n";
  out += "# TYPE " + name + " " + type + "\n";
}

}  // namespace

void Counter::Increment(double by) {
  if (by < 0) return;  // counters only go up
  AtomicAdd(value_, by);
}
double Counter::Value() const { return value_.load(std::memory_order_relaxed); }

void Gauge::Increment(double by) { AtomicAdd(value_, by); }

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), buckets_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  for (size_t i = 0; i + 1 < bounds_.size(); ++i) SY_CHECK(bounds_[i] < bounds_[i + 1]);
  for (size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0);
}

void Histogram::Observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  AtomicAdd(sum_, v);
  count_.fetch_add(1, std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::CumulativeCounts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  uint64_t running = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    running += buckets_[i].load(std::memory_order_relaxed);
    out[i] = running;
  }
  return out;
}

double Histogram::Sum() const { return sum_.load(std::memory_order_relaxed); }

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  std::vector<double> b;
  double v = start;
  for (int i = 0; i < count; ++i, v *= factor) b.push_back(v);
  return b;
}

std::vector<double> LatencyBuckets() {
  return ExponentialBuckets(1e-4, 2.0, 21);
}  // 100 µs .. 105 s

void Registry::CheckNew(const std::string& name) {
  static const std::regex kName("[a-zA-Z_:][a-zA-Z0-9_:]*");
  SY_CHECK(std::regex_match(name, kName));
  SY_CHECK(!counters_.count(name) && !gauges_.count(name) && !histograms_.count(name));
  order_.push_back(name);
}

Family<Counter>& Registry::AddCounter(const std::string& name, const std::string& help,
                                      std::vector<std::string> label_names) {
  std::lock_guard<std::mutex> lock(mu_);
  CheckNew(name);
  auto& f = counters_[name];
  f.reset(new Family<Counter>(name, help, std::move(label_names), {}));
  return *f;
}

Family<Gauge>& Registry::AddGauge(const std::string& name, const std::string& help,
                                  std::vector<std::string> label_names) {
  std::lock_guard<std::mutex> lock(mu_);
  CheckNew(name);
  auto& f = gauges_[name];
  f.reset(new Family<Gauge>(name, help, std::move(label_names), {}));
  return *f;
}

Family<Histogram>& Registry::AddHistogram(const std::string& name, const std::string& help,
                                          std::vector<double> bounds,
                                          std::vector<std::string> label_names) {
  std::lock_guard<std::mutex> lock(mu_);
  CheckNew(name);
  auto& f = histograms_[name];
  f.reset(new Family<Histogram>(name, help, std::move(label_names), std::move(bounds)));
  return *f;
}

std::string Registry::Serialize() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  for (const std::string& name : order_) {
    if (auto it = counters_.find(name); it != counters_.end()) {
      const auto& f = *it->second;
      Header(out, name, f.help_, "counter");
      std::lock_guard<std::mutex> fl(f.mu_);
      for (const auto& [values, c] : f.children_) {
        out += name + Labels(f.label_names_, values) + " " + FormatValue(c->Value()) + "\n";
      }
    } else if (auto it = gauges_.find(name); it != gauges_.end()) {
      const auto& f = *it->second;
      Header(out, name, f.help_, "gauge");
      std::lock_guard<std::mutex> fl(f.mu_);
      for (const auto& [values, g] : f.children_) {
        out += name + Labels(f.label_names_, values) + " " + FormatValue(g->Value()) + "\n";
      }
    } else if (auto it = histograms_.find(name); it != histograms_.end()) {
      const auto& f = *it->second;
      Header(out, name, f.help_, "histogram");
      std::lock_guard<std::mutex> fl(f.mu_);
      for (const auto& [values, h] : f.children_) {
        // Read count first: buckets observed later can only be larger, and
        // the +Inf bucket is reported as the count for consistency.
        const std::vector<uint64_t> cumulative = h->CumulativeCounts();
        for (size_t i = 0; i < h->bounds().size(); ++i) {
          out += name + "_bucket" +
                 Labels(f.label_names_, values, "le", FormatValue(h->bounds()[i])) + " " +
                 std::to_string(cumulative[i]) + "\n";
        }
        out += name + "_bucket" + Labels(f.label_names_, values, "le", "+Inf") + " " +
               std::to_string(cumulative.back()) + "\n";
        out += name + "_sum" + Labels(f.label_names_, values) + " " + FormatValue(h->Sum()) + "\n";
        out += name + "_count" + Labels(f.label_names_, values) + " " +
               std::to_string(cumulative.back()) + "\n";
      }
    }
  }
  return out;
}

}  // namespace switchyard::metrics
