#include "cli/autoscaler.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace switchyard::cli {

int PickGpu(const std::vector<int>& candidates, const std::map<int, int64_t>& free) {
  int best = -1;
  int64_t best_free = 0;
  for (int gpu : candidates) {
    auto it = free.find(gpu);
    if (it == free.end()) continue;
    if (best < 0 || it->second > best_free) {
      best = gpu;
      best_free = it->second;
    }
  }
  return best;
}

absl::StatusOr<double> MetricSum(const std::string& text, const std::string& name) {
  double sum = 0;
  bool found = false;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    if (line.substr(0, name.size()) != name || line.size() == name.size()) continue;
    size_t value_at;
    if (line[name.size()] == ' ') {
      value_at = name.size() + 1;
    } else if (line[name.size()] == '{') {
      const size_t close = line.find('}');
      if (close == std::string_view::npos) continue;
      value_at = close + 1;
    } else {
      continue;  // another metric whose name starts with `name`
    }
    const std::string value(line.substr(value_at));
    char* parsed_end = nullptr;
    const double v = std::strtod(value.c_str(), &parsed_end);
    if (parsed_end == value.c_str()) continue;
    sum += v;
    found = true;
  }
  if (!found) return absl::NotFoundError(absl::StrCat("no ", name, " samples"));
  return sum;
}

absl::StatusOr<std::map<int, int64_t>> ParseNvidiaSmiFreeMemory(const std::string& text) {
  std::map<int, int64_t> free;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipWhitespace())) {
    std::vector<absl::string_view> fields = absl::StrSplit(line, ',');
    int index = 0;
    int64_t mib = 0;
    if (fields.size() != 2 || !absl::SimpleAtoi(absl::StripAsciiWhitespace(fields[0]), &index) ||
        !absl::SimpleAtoi(absl::StripAsciiWhitespace(fields[1]), &mib) || index < 0 || mib < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("nvidia-smi: expected 'INDEX, FREE_MIB', got '", line, "'"));
    }
    free[index] = mib * (int64_t{1} << 20);
  }
  return free;
}

absl::StatusOr<std::map<int, int64_t>> NvidiaSmiFreeMemory() {
  FILE* pipe = popen(
      "nvidia-smi --query-gpu=index,memory.free --format=csv,noheader,nounits 2>/dev/null", "r");
  if (pipe == nullptr) return absl::UnavailableError("cannot run nvidia-smi");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  const int status = pclose(pipe);
  if (status != 0) {
    return absl::UnavailableError(absl::StrCat("nvidia-smi failed (wait status ", status, ")"));
  }
  return ParseNvidiaSmiFreeMemory(out);
}

scaling::HpaSpec Autoscaler::SpecFor(const AutoscalerOptions& options) {
  scaling::HpaSpec spec;  // the HPA's default rate policies
  spec.min_replicas = options.min_replicas;
  spec.max_replicas = options.max_replicas;
  spec.tolerance = options.tolerance;
  spec.scale_up.stabilization_window_seconds = 0;
  spec.scale_down.stabilization_window_seconds = options.scale_down_delay_s;
  return spec;
}

Autoscaler::Autoscaler(int num_experts, AutoscalerOptions options, ReplicaFleet* fleet,
                       BusyReader busy, FreeGpuMemory free_gpu_memory, metrics::Registry* registry,
                       std::function<void(const std::string&)> log)
    : num_experts_(num_experts),
      options_(std::move(options)),
      fleet_(fleet),
      busy_(std::move(busy)),
      free_gpu_memory_(std::move(free_gpu_memory)),
      log_(std::move(log)) {
  for (int e = 0; e < num_experts_; ++e) controllers_.emplace_back(SpecFor(options_));
  if (registry == nullptr) return;
  auto& desired = metrics::AddGauge(*registry, "switchyard_autoscaler_desired_replicas",
                                    "Replicas the autoscaler's HPA rule asks for, per expert.");
  auto& current =
      metrics::AddGauge(*registry, "switchyard_autoscaler_current_replicas",
                        "Replicas of each expert that are starting or serving (not draining).");
  auto& busy_ratio = metrics::AddGauge(
      *registry, "switchyard_autoscaler_busy_ratio",
      "The expert's busy seconds per second per replica at the last decision (the metric).");
  auto& scale_events =
      metrics::AddCounter(*registry, "switchyard_autoscaler_scale_events_total",
                          "Replica count changes the autoscaler made, by direction (up, down).");
  for (int e = 0; e < num_experts_; ++e) {
    const std::string label = std::to_string(e);
    desired_gauges_.push_back(&desired.Add({{"expert", label}}));
    current_gauges_.push_back(&current.Add({{"expert", label}}));
    busy_gauges_.push_back(&busy_ratio.Add({{"expert", label}}));
    up_counters_.push_back(&scale_events.Add({{"expert", label}, {"direction", "up"}}));
    down_counters_.push_back(&scale_events.Add({{"expert", label}, {"direction", "down"}}));
  }
  // Scrapes before the first Tick see the fleet as it is, not zeros.
  const std::vector<int> counts = ActiveCounts();
  for (int e = 0; e < num_experts_; ++e) {
    current_gauges_[e]->Set(counts[e]);
    desired_gauges_[e]->Set(counts[e]);
  }
}

std::vector<int> Autoscaler::ActiveCounts() const {
  std::vector<int> counts(num_experts_, 0);
  for (const ReplicaView& r : fleet_->Replicas()) {
    if (r.expert >= 0 && r.expert < num_experts_ && r.state != ReplicaView::State::STATE_DRAINING) {
      ++counts[r.expert];
    }
  }
  return counts;
}

int Autoscaler::PlaceNewReplica() {
  if (options_.gpus.empty()) return -1;
  if (free_gpu_memory_) {
    absl::StatusOr<std::map<int, int64_t>> free = free_gpu_memory_();
    if (free.ok()) {
      const int gpu = PickGpu(options_.gpus, *free);
      if (gpu >= 0) return gpu;
    } else if (log_) {
      log_(absl::StrCat("autoscaler: cannot read free GPU memory (", free.status().message(),
                        "); placing on GPU ", options_.gpus[0]));
    }
  }
  return options_.gpus[0];
}

void Autoscaler::Log(const AutoscaleDecision& d) {
  const std::string line =
      absl::StrFormat("autoscaler: expert %d busy %.4f current %d desired %d: %s", d.expert, d.busy,
                      d.current, d.desired, d.reason);
  if (log_) {
    log_(line);
  } else {
    std::fprintf(stderr, "switchyard up: %s\n", line.c_str());
    std::fflush(stderr);
  }
}

std::vector<AutoscaleDecision> Autoscaler::Tick(TimePoint now) {
  const std::vector<ReplicaView> replicas = fleet_->Replicas();
  std::vector<std::vector<const ReplicaView*>> active(num_experts_);  // starting + serving
  std::set<int> alive;
  for (const ReplicaView& r : replicas) {
    alive.insert(r.id);
    if (r.expert < 0 || r.expert >= num_experts_) continue;
    if (r.state != ReplicaView::State::STATE_DRAINING) active[r.expert].push_back(&r);
  }
  for (auto it = last_sample_.begin(); it != last_sample_.end();) {
    it = alive.count(it->first) ? std::next(it) : last_sample_.erase(it);
  }

  std::vector<AutoscaleDecision> decisions;
  for (int e = 0; e < num_experts_; ++e) {
    AutoscaleDecision d;
    d.expert = e;
    d.current = static_cast<int>(active[e].size());
    d.desired = d.current;
    // Busy seconds per second of each serving replica since its last sample.
    double total_rate = 0;
    int rated = 0;
    for (const ReplicaView* r : active[e]) {
      if (r->state != ReplicaView::State::STATE_SERVING || r->metrics_address.empty()) continue;
      absl::StatusOr<double> busy = busy_(r->metrics_address);
      if (!busy.ok()) continue;  // counts as 0, as a pod without metrics
      auto last = last_sample_.find(r->id);
      if (last != last_sample_.end() && now > last->second.at) {
        const double seconds = std::chrono::duration<double>(now - last->second.at).count();
        // A counter that went down was reset (the process restarted).
        const double delta =
            *busy >= last->second.busy_seconds ? *busy - last->second.busy_seconds : *busy;
        total_rate += delta / seconds;
        ++rated;
      }
      last_sample_[r->id] = Sample{now, *busy};
    }
    if (d.current == 0 || rated == 0) {
      d.reason = d.current == 0 ? "no replicas" : "no busy rate yet (needs two samples)";
      decisions.push_back(d);
      continue;
    }
    d.busy = total_rate / d.current;
    const scaling::ScalingDecision rule = controllers_[e].Reconcile(
        now, d.current,
        {{scaling::MetricKind::METRIC_KIND_PODS_AVERAGE_VALUE, d.busy, options_.target_busy}});
    d.desired = rule.desired;
    d.reason = rule.reason;
    d.decided = true;
    if (d.desired != d.current || last_logged_reason_[e] != d.reason) {
      Log(d);
      last_logged_reason_[e] = d.reason;
    }

    if (d.desired > d.current) {
      for (int i = d.current; i < d.desired; ++i) {
        absl::StatusOr<int> id = fleet_->StartReplica(e, PlaceNewReplica());
        if (!id.ok()) {
          d.reason = absl::StrCat(d.reason, "; start failed: ", id.status().message());
          Log(d);
          break;
        }
      }
      if (!up_counters_.empty()) up_counters_[e]->Increment();
    } else if (d.desired < d.current) {
      // Drain starting replicas first (they serve nothing yet), then the
      // newest serving ones; the first replica stays.
      std::vector<const ReplicaView*> order = active[e];
      std::sort(order.begin(), order.end(), [](const ReplicaView* a, const ReplicaView* b) {
        const bool a_starting = a->state == ReplicaView::State::STATE_STARTING;
        const bool b_starting = b->state == ReplicaView::State::STATE_STARTING;
        if (a_starting != b_starting) return a_starting;
        return a->id > b->id;
      });
      int serving_left = 0;
      for (const ReplicaView* r : order) {
        serving_left += r->state == ReplicaView::State::STATE_SERVING;
      }
      for (int i = 0; i < d.current - d.desired; ++i) {
        const ReplicaView* r = order[i];
        // Never leave the expert without a serving replica.
        if (r->state == ReplicaView::State::STATE_SERVING && serving_left <= 1) break;
        if (absl::Status s = fleet_->DrainReplica(r->id); !s.ok()) {
          d.reason = absl::StrCat(d.reason, "; drain failed: ", s.message());
          Log(d);
          break;
        }
        serving_left -= r->state == ReplicaView::State::STATE_SERVING;
      }
      if (!down_counters_.empty()) down_counters_[e]->Increment();
    }
    if (!desired_gauges_.empty()) {
      desired_gauges_[e]->Set(d.desired);
      busy_gauges_[e]->Set(d.busy);
    }
    decisions.push_back(d);
  }
  // The counts after this period's starts and drains.
  if (!current_gauges_.empty()) {
    const std::vector<int> counts = ActiveCounts();
    for (int e = 0; e < num_experts_; ++e) {
      current_gauges_[e]->Set(counts[e]);
      if (!decisions[e].decided) desired_gauges_[e]->Set(counts[e]);
    }
  }
  return decisions;
}

}  // namespace switchyard::cli
