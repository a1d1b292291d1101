// `switchyard bench`: a closed-loop load generator for a running gateway.
// C client threads each run one GenerateStream at a time until N requests
// are done. Prompts are random token ids in [3, vocab_size), deterministic
// from --seed and the request index; ignore_eos makes every request produce
// exactly --output-tokens tokens. Every connection is made before the clock
// starts (at most 30 s, else UNAVAILABLE). Reports throughput, time to first token
// (TTFT) and inter-token latency (ITL; a message carrying k tokens after a
// gap g counts as k gaps of g/k). With --metrics HOST:PORT (the gateway's
// --metrics-listen address) it scrapes the gateway's /metrics before and
// after the run and prints the per-hop breakdown of the run's expert calls:
// network, queue and compute time (docs/metrics.md, "Per-hop timing"),
// and the share of routed tokens each expert received during the run.
//
// --skew / --skew-experts E,...: a workload whose tokens the router sends
// mostly to the experts E (to measure autoscaling of hot experts). Chosen by
// what the served router does, not guessed: before the run, bench sends
// --skew-candidates one-token prompts (distinct token ids from --seed), one
// at a time, and reads from the gateway's /metrics
// (switchyard_gateway_routed_tokens_total) where each token was routed in
// every layer; the --skew-pool tokens with the largest share routed to E
// make up every prompt (drawn uniformly, deterministic from --seed and the
// request index). Generated tokens route wherever the model's output takes
// them, so fewer --output-tokens keep the skew sharper. Needs --metrics and
// a gateway that serves nobody else during the probes (checked: each probe
// must move the gateway's prompt-token counter by exactly one).
//
// --shared-prefix-tokens N: every prompt starts with the same N tokens, then
// its own --prompt-tokens; request 0 runs alone first (it prefills the
// prefix), then the rest. Reports TTFT of request 0 against the later ones
// and, with --metrics, the gateway's prefix-hit tokens for each part.
// --max-new-tokens M > --output-tokens: requests declare M and bench
// cancels each stream after --output-tokens tokens (clients that stop
// early); with --metrics, the peak of the gateway's running sequences.
#include <grpcpp/grpcpp.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cli/command_specs.h"
#include "cli/commands.h"
#include "cli/grpc_client.h"
#include "cli/metrics_scrape.h"
#include "core/flags.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "switchyard/v1/generation.grpc.pb.h"

namespace switchyard::cli {
namespace {

using Clock = std::chrono::steady_clock;

// Streams per gRPC connection; more threads get more connections.
constexpr int kStreamsPerChannel = 32;

struct BenchOptions {
  std::string server;
  int concurrency = 8;
  int requests = 32;
  int prompt_tokens = 64;
  int output_tokens = 32;
  uint64_t seed = 0;
  int64_t timeout_ms = 0;
  bool json = false;
  // The gateway's metrics address for the per-hop breakdown. Default: none
  // (the breakdown is skipped with a note saying what to pass).
  std::string metrics;
  // The experts the skewed workload concentrates on; empty = random prompts.
  // --skew alone means expert 0.
  std::vector<int> skew_experts;
  // Token ids probed through the router for the skewed workload. Default 64.
  int skew_candidates = 64;
  // The hottest probed tokens that prompts draw from. Default 8.
  int skew_pool = 8;
  // Requests started per second (request i no earlier than i / rate after
  // the start), so the load does not depend on how fast the server is.
  // Default 0: closed loop, each client starts its next request at once.
  double request_rate = 0;
  // Tokens every prompt starts with (the same for all requests, from the
  // seed); --prompt-tokens distinct tokens follow. Default 0: no shared
  // prefix. With N > 0 request 0 runs alone first, so the later ones can
  // reuse its cached prefix.
  int shared_prefix_tokens = 0;
  // The max_new_tokens each request declares; when above --output-tokens,
  // bench cancels the stream once --output-tokens tokens arrived (a client
  // that stops early, as chat clients with a high max_tokens do). Default:
  // --output-tokens.
  int max_new_tokens = 0;
};

// What one request measured.
struct RequestResult {
  bool ok = false;
  std::string error;
  double ttft_ms = 0;
  double latency_ms = 0;
  std::vector<double> itl_ms;
  int64_t prompt_tokens = 0;
  int64_t output_tokens = 0;
};

absl::StatusOr<BenchOptions> ParseBenchOptions(const std::vector<std::string>& args) {
  SY_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, FormFlags("bench", false)));
  BenchOptions o;
  SY_ASSIGN_OR_RETURN(o.server, f.Required("server"));
  SY_RETURN_IF_ERROR(ConfigureClientSecurity(f));
  auto in_range = [&](const char* name, int64_t fallback, int64_t lo, int64_t hi,
                      int* out) -> absl::Status {
    SY_ASSIGN_OR_RETURN(int64_t v, f.Int(name, fallback));
    if (v < lo || v > hi) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " must be in [", lo, ", ", hi, "], got ", v));
    }
    *out = static_cast<int>(v);
    return absl::OkStatus();
  };
  SY_RETURN_IF_ERROR(in_range("concurrency", o.concurrency, 1, 4096, &o.concurrency));
  SY_RETURN_IF_ERROR(in_range("requests", o.requests, 1, 10000000, &o.requests));
  SY_RETURN_IF_ERROR(in_range("prompt-tokens", o.prompt_tokens, 1, 1 << 24, &o.prompt_tokens));
  SY_RETURN_IF_ERROR(in_range("output-tokens", o.output_tokens, 1, 1 << 24, &o.output_tokens));
  SY_RETURN_IF_ERROR(in_range("shared-prefix-tokens", 0, 0, 1 << 24, &o.shared_prefix_tokens));
  SY_RETURN_IF_ERROR(in_range("max-new-tokens", o.output_tokens, 1, 1 << 24, &o.max_new_tokens));
  if (o.max_new_tokens < o.output_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("--max-new-tokens (", o.max_new_tokens,
                                                   ") must be at least --output-tokens (",
                                                   o.output_tokens, ")"));
  }
  SY_ASSIGN_OR_RETURN(std::optional<uint64_t> seed, f.OptionalUint("seed"));
  o.seed = seed.value_or(0);
  SY_ASSIGN_OR_RETURN(o.timeout_ms, f.Int("timeout-ms", 0));
  if (o.timeout_ms < 0) return absl::InvalidArgumentError("--timeout-ms must be >= 0");
  o.json = f.Has("json");
  o.metrics = f.GetOr("metrics", "");
  if (f.Has("metrics") && (o.metrics.empty() || o.metrics.rfind(':') == std::string::npos)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--metrics must be HOST:PORT (the gateway's --metrics-listen), got '", o.metrics, "'"));
  }
  if (f.Has("skew-experts")) {
    const std::string list = f.GetOr("skew-experts", "");
    for (absl::string_view part : absl::StrSplit(list, ',')) {
      int e = -1;
      if (!absl::SimpleAtoi(part, &e) || e < 0 || e > 4096) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--skew-experts must be a comma-separated list of expert indices, got '", list, "'"));
      }
      if (std::find(o.skew_experts.begin(), o.skew_experts.end(), e) == o.skew_experts.end()) {
        o.skew_experts.push_back(e);
      }
    }
  } else if (f.Has("skew")) {
    o.skew_experts = {0};
  }
  SY_RETURN_IF_ERROR(in_range("skew-candidates", o.skew_candidates, 1, 100000, &o.skew_candidates));
  SY_RETURN_IF_ERROR(in_range("skew-pool", o.skew_pool, 1, 100000, &o.skew_pool));
  if (o.skew_pool > o.skew_candidates) {
    return absl::InvalidArgumentError(absl::StrCat("--skew-pool (", o.skew_pool,
                                                   ") must not exceed --skew-candidates (",
                                                   o.skew_candidates, ")"));
  }
  if (f.Has("request-rate")) {
    const std::string rate = f.GetOr("request-rate", "");
    if (!absl::SimpleAtod(rate, &o.request_rate) || !(o.request_rate >= 0) ||
        o.request_rate > 1e6) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--request-rate must be a number in [0, 1e6] (requests/s), got '", rate, "'"));
    }
  }
  if (!o.skew_experts.empty() && o.metrics.empty()) {
    return absl::InvalidArgumentError(
        "--skew needs --metrics HOST:PORT (the gateway's --metrics-listen): the prompts are "
        "chosen by the routing the gateway reports");
  }
  return o;
}

// The prompt of request `index`: the same for the same seed and index no
// matter which thread runs it.
std::vector<int32_t> RandomPrompt(uint64_t seed, int index, int length, uint32_t vocab_size) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(index)};
  std::mt19937_64 rng(seq);
  std::uniform_int_distribution<int32_t> dist(3, static_cast<int32_t>(vocab_size) - 1);
  std::vector<int32_t> ids(length);
  for (int32_t& id : ids) id = dist(rng);
  return ids;
}

// The prompt of request `index` with the shared prefix in front: the prefix
// is RandomPrompt's for index -1 (the same for every request).
std::vector<int32_t> WithSharedPrefix(uint64_t seed, int prefix_tokens, uint32_t vocab_size,
                                      std::vector<int32_t> suffix) {
  if (prefix_tokens == 0) return suffix;
  std::vector<int32_t> ids = RandomPrompt(seed, -1, prefix_tokens, vocab_size);
  ids.insert(ids.end(), suffix.begin(), suffix.end());
  return ids;
}

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

RequestResult RunOne(v1::GenerationService::Stub& stub, const BenchOptions& o,
                     const std::vector<int32_t>& prompt, int index) {
  v1::GenerateRequest request;
  request.mutable_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
  request.mutable_stopping()->set_max_new_tokens(static_cast<uint32_t>(o.max_new_tokens));
  request.mutable_stopping()->set_ignore_eos(true);
  request.set_request_id(absl::StrCat("bench-", index));

  RequestResult r;
  grpc::ClientContext context;
  PrepareContext(context);
  if (o.timeout_ms > 0) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(o.timeout_ms));
  }
  const auto start = Clock::now();
  auto last = start;
  bool first = true;
  auto reader = stub.GenerateStream(&context, request);
  v1::GenerateStreamResponse message;
  bool stopped_early = false;
  while (!stopped_early && reader->Read(&message)) {
    int k = message.token_ids_size();
    if (o.max_new_tokens > o.output_tokens && r.output_tokens + k >= o.output_tokens) {
      // The client has what it wanted: count up to --output-tokens and cancel.
      k = static_cast<int>(o.output_tokens - r.output_tokens);
      stopped_early = true;
      context.TryCancel();
    }
    if (message.has_usage()) r.prompt_tokens = message.usage().prompt_tokens();
    if (k == 0) continue;
    const auto now = Clock::now();
    if (first) {
      r.ttft_ms = Ms(now - start);
      r.itl_ms.insert(r.itl_ms.end(), k - 1, 0.0);
      first = false;
    } else {
      r.itl_ms.insert(r.itl_ms.end(), k, Ms(now - last) / k);
    }
    last = now;
    r.output_tokens += k;
  }
  if (stopped_early) {
    while (reader->Read(&message)) {
    }
  }
  grpc::Status status = reader->Finish();
  r.latency_ms = Ms(Clock::now() - start);
  if (stopped_early && status.error_code() == grpc::StatusCode::CANCELLED) status = grpc::Status();
  if (!status.ok()) {
    r.error = StatusLine(RpcError(status));
    return r;
  }
  if (r.prompt_tokens == 0) r.prompt_tokens = static_cast<int64_t>(prompt.size());
  r.ok = true;
  return r;
}

// Nearest-rank percentile of `v` (sorted here); 0 when empty.
double Percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
  return v[std::clamp<size_t>(rank, 1, v.size()) - 1];
}

double Mean(const std::vector<double>& v) {
  return v.empty() ? 0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

// One histogram series: cumulative buckets by upper bound, sum and count.
struct HistogramSeries {
  std::map<double, double> buckets;  // le -> cumulative count
  double sum = 0;
  double count = 0;
};

// The value of label `name` in a Prometheus label text (a="1",b="2").
std::string LabelValue(const std::string& labels, const std::string& name) {
  const std::string key = name + "=\"";
  size_t at = labels.find(key);
  while (at != std::string::npos && at > 0 && labels[at - 1] != ',' && labels[at - 1] != '{') {
    at = labels.find(key, at + 1);
  }
  if (at == std::string::npos) return "";
  const size_t begin = at + key.size();
  return labels.substr(begin, labels.find('"', begin) - begin);
}

// The histogram `name`'s series by their `expert` label, from Prometheus text.
std::map<int, HistogramSeries> ExpertHistograms(const std::string& text, const std::string& name) {
  std::map<int, HistogramSeries> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.compare(0, name.size(), name) != 0) continue;
    const size_t open = line.find('{'), close = line.find('}');
    if (open == std::string::npos || close == std::string::npos || close < open) continue;
    const std::string suffix = line.substr(name.size(), open - name.size());
    const std::string labels = line.substr(open + 1, close - open - 1);
    const std::string expert = LabelValue(labels, "expert");
    double value = 0;
    try {
      value = std::stod(line.substr(close + 1));
    } catch (...) {
      continue;
    }
    if (expert.empty() || expert.find_first_not_of("0123456789") != std::string::npos) continue;
    HistogramSeries& h = out[std::stoi(expert)];
    if (suffix == "_sum") {
      h.sum = value;
    } else if (suffix == "_count") {
      h.count = value;
    } else if (suffix == "_bucket") {
      const std::string le = LabelValue(labels, "le");
      h.buckets[le == "+Inf" ? INFINITY : std::strtod(le.c_str(), nullptr)] = value;
    }
  }
  return out;
}

// after - before, bucket by bucket (the run's own observations).
HistogramSeries Delta(const HistogramSeries& after, const HistogramSeries& before) {
  HistogramSeries d = after;
  d.sum -= before.sum;
  d.count -= before.count;
  for (auto& [le, c] : d.buckets) {
    auto it = before.buckets.find(le);
    if (it != before.buckets.end()) c -= it->second;
  }
  return d;
}

// The q-quantile of a histogram, interpolated linearly inside its bucket as
// Prometheus' histogram_quantile does (the lowest bucket starts at 0; a
// quantile in the +Inf bucket is the highest finite bound).
double HistogramQuantile(const HistogramSeries& h, double q) {
  if (h.count <= 0 || h.buckets.empty()) return 0;
  const double rank = q * h.count;
  double lower = 0, below = 0, highest_finite = 0;
  for (const auto& [le, cumulative] : h.buckets) {
    if (std::isinf(le)) return highest_finite;
    if (cumulative >= rank) {
      const double in_bucket = cumulative - below;
      return in_bucket > 0 ? lower + (le - lower) * (rank - below) / in_bucket : le;
    }
    lower = highest_finite = le;
    below = cumulative;
  }
  return highest_finite;
}

// The per-hop histograms the gateway keeps (docs/metrics.md).
constexpr const char* kHopParts[] = {"network", "queue", "compute"};

std::map<int, std::array<HistogramSeries, 3>> HopHistograms(const std::string& text) {
  std::map<int, std::array<HistogramSeries, 3>> out;
  for (int k = 0; k < 3; ++k) {
    for (auto& [expert, h] : ExpertHistograms(
             text, absl::StrCat("switchyard_gateway_expert_", kHopParts[k], "_seconds"))) {
      out[expert][k] = std::move(h);
    }
  }
  return out;
}

// The run's breakdown per expert (only experts called during the run) and,
// under key -1, over all experts: [part] -> (mean, p50, p99) in microseconds,
// and the number of calls. The quantiles are interpolated within the
// histogram's buckets (factors of 2 apart), as Prometheus' histogram_quantile.
struct HopRow {
  double calls = 0;
  std::array<double, 3> mean_us{};
  std::array<double, 3> p50_us{};
  std::array<double, 3> p99_us{};
};

std::map<int, HopRow> HopBreakdown(const std::string& before_text, const std::string& after_text) {
  const auto before = HopHistograms(before_text);
  const auto after = HopHistograms(after_text);
  std::map<int, HopRow> rows;
  std::array<HistogramSeries, 3> all;
  for (const auto& [expert, parts] : after) {
    auto b = before.find(expert);
    std::array<HistogramSeries, 3> d;
    for (int k = 0; k < 3; ++k) {
      d[k] = b == before.end() ? parts[k] : Delta(parts[k], b->second[k]);
      all[k].sum += d[k].sum;
      all[k].count += d[k].count;
      for (const auto& [le, c] : d[k].buckets) all[k].buckets[le] += c;
    }
    if (d[0].count <= 0) continue;
    HopRow& row = rows[expert];
    row.calls = d[0].count;
    for (int k = 0; k < 3; ++k) {
      row.mean_us[k] = d[k].count > 0 ? 1e6 * d[k].sum / d[k].count : 0;
      row.p50_us[k] = 1e6 * HistogramQuantile(d[k], 0.5);
      row.p99_us[k] = 1e6 * HistogramQuantile(d[k], 0.99);
    }
  }
  if (!rows.empty()) {
    HopRow& total = rows[-1];
    total.calls = all[0].count;
    for (int k = 0; k < 3; ++k) {
      total.mean_us[k] = all[k].count > 0 ? 1e6 * all[k].sum / all[k].count : 0;
      total.p50_us[k] = 1e6 * HistogramQuantile(all[k], 0.5);
      total.p99_us[k] = 1e6 * HistogramQuantile(all[k], 0.99);
    }
  }
  return rows;
}

// The samples of metric `name` (exactly that name, no suffix) in Prometheus
// text: (label text, value) per line.
std::vector<std::pair<std::string, double>> Samples(const std::string& text,
                                                    const std::string& name) {
  std::vector<std::pair<std::string, double>> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.compare(0, name.size(), name) != 0 || line.size() <= name.size()) continue;
    std::string labels;
    size_t value_at = name.size();
    if (line[name.size()] == '{') {
      const size_t close = line.find('}');
      if (close == std::string::npos) continue;
      labels = line.substr(name.size() + 1, close - name.size() - 1);
      value_at = close + 1;
    } else if (line[name.size()] != ' ') {
      continue;  // a longer name with this prefix
    }
    double value = 0;
    if (!absl::SimpleAtod(absl::StripAsciiWhitespace(line.substr(value_at)), &value)) continue;
    out.emplace_back(std::move(labels), value);
  }
  return out;
}

// The sum of metric `name`'s samples (0 when absent).
double SampleSum(const std::string& text, const std::string& name) {
  double sum = 0;
  for (const auto& [labels, value] : Samples(text, name)) sum += value;
  return sum;
}

// switchyard_gateway_routed_tokens_total summed over layers: expert -> tokens.
std::map<int, double> RoutedTokensByExpert(const std::string& text) {
  std::map<int, double> out;
  for (const auto& [labels, value] : Samples(text, "switchyard_gateway_routed_tokens_total")) {
    int expert = -1;
    if (absl::SimpleAtoi(LabelValue(labels, "expert"), &expert) && expert >= 0) {
      out[expert] += value;
    }
  }
  return out;
}

// after - before per expert (experts only in `after` count from 0).
std::map<int, double> RoutedDelta(const std::string& before, const std::string& after) {
  std::map<int, double> d = RoutedTokensByExpert(after);
  for (const auto& [expert, tokens] : RoutedTokensByExpert(before)) d[expert] -= tokens;
  return d;
}

// The share of `routed` that went to `experts`; 0 when nothing was routed.
double ShareOf(const std::map<int, double>& routed, const std::vector<int>& experts) {
  double hot = 0, all = 0;
  for (const auto& [expert, tokens] : routed) {
    all += tokens;
    if (std::find(experts.begin(), experts.end(), expert) != experts.end()) hot += tokens;
  }
  return all > 0 ? hot / all : 0;
}

// One probed token and the share of its routing (all layers) to the hot
// experts.
struct ProbedToken {
  int32_t token = 0;
  double share = 0;
};

// Sends each candidate token alone as a prompt (one token generated: the
// prefill's routing only) and measures where the gateway's router sent it.
// Returns the candidates, hottest first.
absl::StatusOr<std::vector<ProbedToken>> ProbeRouting(v1::GenerationService::Stub& stub,
                                                      const BenchOptions& o,
                                                      const v1::ModelInfo& info) {
  for (int e : o.skew_experts) {
    if (static_cast<uint32_t>(e) >= info.num_experts()) {
      return absl::InvalidArgumentError(absl::StrCat("--skew-experts names expert ", e,
                                                     " but the model has ", info.num_experts(),
                                                     " experts"));
    }
  }
  const int available = static_cast<int>(info.vocab_size()) - 3;
  if (o.skew_candidates > available) {
    return absl::InvalidArgumentError(absl::StrCat("--skew-candidates ", o.skew_candidates,
                                                   " exceeds the ", available,
                                                   " token ids that can be probed"));
  }
  // Distinct candidate ids in [3, vocab), deterministic from the seed.
  std::seed_seq seq{static_cast<uint32_t>(o.seed), static_cast<uint32_t>(o.seed >> 32), 0x5e3du};
  std::mt19937_64 rng(seq);
  std::uniform_int_distribution<int32_t> dist(3, static_cast<int32_t>(info.vocab_size()) - 1);
  std::vector<int32_t> candidates;
  while (static_cast<int>(candidates.size()) < o.skew_candidates) {
    const int32_t id = dist(rng);
    if (std::find(candidates.begin(), candidates.end(), id) == candidates.end()) {
      candidates.push_back(id);
    }
  }
  std::vector<ProbedToken> probed;
  SY_ASSIGN_OR_RETURN(std::string before, ScrapeMetrics(o.metrics, "--metrics "));
  for (int32_t token : candidates) {
    bool measured = false;
    for (int attempt = 0; attempt < 3 && !measured; ++attempt) {
      v1::GenerateRequest request;
      request.mutable_token_ids()->add_ids(token);
      request.mutable_stopping()->set_max_new_tokens(1);
      request.mutable_stopping()->set_ignore_eos(true);
      request.set_request_id(absl::StrCat("bench-skew-probe-", token));
      v1::GenerateResponse response;
      grpc::ClientContext context;
      PrepareContext(context);
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      grpc::Status status = stub.Generate(&context, request, &response);
      if (!status.ok()) return RpcError(status);
      SY_ASSIGN_OR_RETURN(std::string after, ScrapeMetrics(o.metrics, "--metrics "));
      // Exactly our one prompt token: nobody else's traffic is in the delta.
      const double prompt_delta = SampleSum(after, "switchyard_gateway_prompt_tokens_total") -
                                  SampleSum(before, "switchyard_gateway_prompt_tokens_total");
      const std::map<int, double> routed = RoutedDelta(before, after);
      double routed_total = 0;
      for (const auto& [expert, tokens] : routed) routed_total += tokens;
      before = std::move(after);
      if (prompt_delta == 1 && routed_total > 0) {
        probed.push_back({token, ShareOf(routed, o.skew_experts)});
        measured = true;
      }
    }
    if (!measured) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--skew: could not measure token ", token,
          "'s routing in 3 tries: the gateway at --metrics ", o.metrics,
          " served other traffic meanwhile, or reports no switchyard_gateway_routed_tokens_total "
          "(is it the --metrics-listen of the gateway at --server?)"));
    }
  }
  std::stable_sort(probed.begin(), probed.end(),
                   [](const ProbedToken& a, const ProbedToken& b) { return a.share > b.share; });
  return probed;
}

// A skewed prompt: `length` tokens drawn from `pool`, deterministic from the
// seed and the request index.
std::vector<int32_t> PoolPrompt(uint64_t seed, int index, int length,
                                const std::vector<ProbedToken>& pool) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(index), 0x5e3du};
  std::mt19937_64 rng(seq);
  std::uniform_int_distribution<size_t> dist(0, pool.size() - 1);
  std::vector<int32_t> ids(length);
  for (int32_t& id : ids) id = pool[dist(rng)].token;
  return ids;
}

absl::Status Bench(const std::vector<std::string>& args, int* exit_code) {
  SY_ASSIGN_OR_RETURN(BenchOptions o, ParseBenchOptions(args));

  std::vector<std::shared_ptr<grpc::Channel>> channels;
  const int num_channels = (o.concurrency + kStreamsPerChannel - 1) / kStreamsPerChannel;
  for (int i = 0; i < num_channels; ++i) channels.push_back(MakeChannel(o.server, true));

  v1::ModelInfo info;
  {
    auto stub = v1::GenerationService::NewStub(channels[0]);
    grpc::ClientContext context;
    PrepareContext(context);
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    grpc::Status status = stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
    if (!status.ok()) return RpcError(status);
  }
  if (info.vocab_size() <= 3) {
    return absl::FailedPreconditionError(
        absl::StrCat("the server's vocab_size is ", info.vocab_size(), "; need more than 3"));
  }
  if (info.max_new_tokens_limit() > 0 &&
      static_cast<uint32_t>(o.max_new_tokens) > info.max_new_tokens_limit()) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.max_new_tokens > o.output_tokens ? "--max-new-tokens " : "--output-tokens ",
                     o.max_new_tokens, " exceeds the server's max_new_tokens_limit ",
                     info.max_new_tokens_limit()));
  }
  if (info.max_context_tokens() > 0 &&
      static_cast<uint64_t>(o.shared_prefix_tokens) + o.prompt_tokens + o.max_new_tokens >
          info.max_context_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--shared-prefix-tokens + --prompt-tokens + --max-new-tokens (or --output-tokens) "
        "exceeds the server's max_context_tokens ",
        info.max_context_tokens()));
  }

  // The skewed workload's token pool, by probing the router.
  std::vector<ProbedToken> probed, pool;
  double pool_share = 0;
  if (!o.skew_experts.empty()) {
    auto stub = v1::GenerationService::NewStub(channels[0]);
    SY_ASSIGN_OR_RETURN(probed, ProbeRouting(*stub, o, info));
    pool.assign(probed.begin(), probed.begin() + o.skew_pool);
    for (const ProbedToken& p : pool) pool_share += p.share / static_cast<double>(pool.size());
  }

  // Every channel connected before the clock starts: connecting is not
  // serving time, and a first connect attempt that fails spuriously (gRPC
  // 1.51 can report one from a stale errno: rpc/grpc_process.h) is retried
  // after gRPC's reconnect backoff instead of failing the streams that share
  // the channel, which would otherwise fail fast for the backoff's length.
  for (size_t i = 0; i < channels.size(); ++i) {
    if (!channels[i]->WaitForConnected(std::chrono::system_clock::now() +
                                       std::chrono::seconds(30))) {
      return absl::UnavailableError(absl::StrCat("connection ", i + 1, " of ", channels.size(),
                                                 " to ", o.server, " not ready within 30 s"));
    }
  }

  // Scraped before the run so the breakdown covers this run's calls only;
  // a wrong --metrics fails here, before any load is sent.
  std::string metrics_before;
  if (!o.metrics.empty()) {
    SY_ASSIGN_OR_RETURN(metrics_before, ScrapeMetrics(o.metrics, "--metrics "));
  }

  auto prompt_of = [&](int i) {
    return WithSharedPrefix(o.seed, o.shared_prefix_tokens, info.vocab_size(),
                            pool.empty()
                                ? RandomPrompt(o.seed, i, o.prompt_tokens, info.vocab_size())
                                : PoolPrompt(o.seed, i, o.prompt_tokens, pool));
  };

  // Peak of the gateway's running-sequences gauge, sampled every 200 ms
  // while the run lasts (with --metrics).
  std::atomic<bool> run_done{false};
  std::atomic<int> peak_running{-1};
  std::thread sampler;
  if (!o.metrics.empty()) {
    sampler = std::thread([&] {
      while (!run_done.load()) {
        if (absl::StatusOr<std::string> text = ScrapeMetrics(o.metrics, "--metrics "); text.ok()) {
          const int running =
              static_cast<int>(SampleSum(*text, "switchyard_gateway_running_sequences"));
          if (running > peak_running.load()) peak_running.store(running);
        }
        for (int k = 0; k < 20 && !run_done.load(); ++k) {
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
      }
    });
  }

  std::vector<RequestResult> results(o.requests);
  std::atomic<int> next{0};
  const auto start = Clock::now();
  // With a shared prefix, request 0 runs alone first: it prefills the prefix
  // (a miss) and publishes it; the others may reuse it.
  std::string metrics_after_first;
  if (o.shared_prefix_tokens > 0) {
    auto stub = v1::GenerationService::NewStub(channels[0]);
    results[0] = RunOne(*stub, o, prompt_of(0), 0);
    next.store(1);
    if (!o.metrics.empty()) {
      if (absl::StatusOr<std::string> text = ScrapeMetrics(o.metrics, "--metrics "); text.ok()) {
        metrics_after_first = *std::move(text);
      }
    }
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < std::min(o.concurrency, o.requests - next.load()); ++t) {
    threads.emplace_back([&, t] {
      auto stub = v1::GenerationService::NewStub(channels[t / kStreamsPerChannel]);
      for (int i; (i = next.fetch_add(1)) < o.requests;) {
        if (o.request_rate > 0) {
          std::this_thread::sleep_until(start +
                                        std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(i / o.request_rate)));
        }
        results[i] = RunOne(*stub, o, prompt_of(i), i);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  const double wall_s = std::chrono::duration<double>(Clock::now() - start).count();
  run_done.store(true);
  if (sampler.joinable()) sampler.join();

  int ok = 0, errors = 0, short_requests = 0;
  int64_t prompt_total = 0, output_total = 0;
  std::vector<double> ttft, itl, latency;
  std::map<std::string, int> error_counts;
  // Throughput counts completed requests only.
  for (RequestResult& r : results) {
    if (!r.ok) {
      ++errors;
      ++error_counts[r.error];
      continue;
    }
    ++ok;
    prompt_total += r.prompt_tokens;
    output_total += r.output_tokens;
    if (r.output_tokens != o.output_tokens) ++short_requests;
    if (r.output_tokens > 0) ttft.push_back(r.ttft_ms);
    latency.push_back(r.latency_ms);
    itl.insert(itl.end(), r.itl_ms.begin(), r.itl_ms.end());
  }
  const double out_tps = wall_s > 0 ? output_total / wall_s : 0;
  const double total_tps = wall_s > 0 ? (prompt_total + output_total) / wall_s : 0;
  const double ttft_mean = Mean(ttft), itl_mean = Mean(itl), latency_mean = Mean(latency);
  const double ttft_p50 = Percentile(ttft, 50), ttft_p99 = Percentile(ttft, 99);
  const double itl_p50 = Percentile(itl, 50), itl_p99 = Percentile(itl, 99);
  const double lat_p50 = Percentile(latency, 50), lat_p99 = Percentile(latency, 99);

  // The per-hop breakdown, or a note saying why there is none.
  std::map<int, HopRow> hops;
  std::map<int, double> routed;  // expert -> tokens routed during the run
  std::string hops_note;
  std::string metrics_after;
  if (o.metrics.empty()) {
    hops_note =
        "per-hop breakdown needs --metrics HOST:PORT (the gateway's --metrics-listen address)";
  } else if (absl::StatusOr<std::string> after = ScrapeMetrics(o.metrics, "--metrics ");
             !after.ok()) {
    hops_note = absl::StrCat("per-hop breakdown unavailable: ", after.status().message());
  } else {
    metrics_after = *after;
    routed = RoutedDelta(metrics_before, *after);
    hops = HopBreakdown(metrics_before, *after);
    if (hops.empty()) {
      hops_note =
          "per-hop breakdown: no remote expert calls in this run (in-process experts, or not a "
          "gateway's metrics address?)";
    }
  }

  // The shared prefix: TTFT of request 0 (alone, cold) against the later
  // requests, and the gateway's prefix-hit tokens for each part (-1: unknown).
  const double ttft_first = results[0].ok ? results[0].ttft_ms : 0;
  std::vector<double> ttft_later;
  for (int i = 1; i < o.requests; ++i) {
    if (results[i].ok && results[i].output_tokens > 0) ttft_later.push_back(results[i].ttft_ms);
  }
  const double ttft_later_mean = Mean(ttft_later), ttft_later_p50 = Percentile(ttft_later, 50);
  double hits_first = -1, hits_later = -1;
  if (!metrics_after_first.empty() && !metrics_after.empty()) {
    const std::string kHits = "switchyard_gateway_kv_cache_prefix_hit_tokens_total";
    hits_first = SampleSum(metrics_after_first, kHits) - SampleSum(metrics_before, kHits);
    hits_later = SampleSum(metrics_after, kHits) - SampleSum(metrics_after_first, kHits);
  }
  const int peak = peak_running.load();

  // Routed-token shares per expert; "x mean" is the share over the share of
  // an even spread (1 / experts).
  double routed_total = 0;
  for (const auto& [expert, tokens] : routed) routed_total += tokens;
  const double num_experts =
      info.num_experts() > 0 ? info.num_experts() : static_cast<double>(routed.size());
  const double run_hot_share = ShareOf(routed, o.skew_experts);

  if (o.json) {
    nlohmann::json errors_json = nlohmann::json::array();
    for (const auto& [message, count] : error_counts) {
      errors_json.push_back({{"error", message}, {"count", count}});
    }
    nlohmann::json out = {
        {"server", o.server},
        {"model", info.model()},
        {"concurrency", o.concurrency},
        {"requests", o.requests},
        {"succeeded", ok},
        {"errors", errors},
        {"short_requests", short_requests},
        {"prompt_tokens_per_request", o.prompt_tokens},
        {"output_tokens_per_request", o.output_tokens},
        {"seed", o.seed},
        {"request_rate", o.request_rate},
        {"wall_s", wall_s},
        {"prompt_tokens", prompt_total},
        {"output_tokens", output_total},
        {"output_tokens_per_s", out_tps},
        {"total_tokens_per_s", total_tps},
        {"ttft_ms", {{"p50", ttft_p50}, {"p99", ttft_p99}, {"mean", ttft_mean}}},
        {"itl_ms", {{"p50", itl_p50}, {"p99", itl_p99}, {"mean", itl_mean}}},
        {"latency_ms", {{"p50", lat_p50}, {"p99", lat_p99}, {"mean", latency_mean}}},
        {"error_messages", std::move(errors_json)}};
    if (o.max_new_tokens != o.output_tokens) out["max_new_tokens_declared"] = o.max_new_tokens;
    if (peak >= 0) out["peak_running_sequences"] = peak;
    if (o.shared_prefix_tokens > 0) {
      nlohmann::json shared = {
          {"tokens", o.shared_prefix_tokens},
          {"first_ttft_ms", ttft_first},
          {"later_ttft_ms", {{"p50", ttft_later_p50}, {"mean", ttft_later_mean}}},
          {"first_over_later_p50", ttft_later_p50 > 0 ? ttft_first / ttft_later_p50 : 0}};
      if (hits_first >= 0) {
        shared["prefix_hit_tokens"] = {{"first", hits_first}, {"later", hits_later}};
      }
      out["shared_prefix"] = std::move(shared);
    }
    if (!hops.empty()) {
      nlohmann::json hops_json = nlohmann::json::object();
      for (const auto& [expert, row] : hops) {
        nlohmann::json entry = {{"calls", row.calls}};
        for (int k = 0; k < 3; ++k) {
          entry[absl::StrCat(kHopParts[k], "_us")] = {
              {"mean", row.mean_us[k]}, {"p50", row.p50_us[k]}, {"p99", row.p99_us[k]}};
        }
        hops_json[expert < 0 ? "all" : std::to_string(expert)] = std::move(entry);
      }
      out["expert_hops"] = std::move(hops_json);
    } else {
      out["expert_hops_note"] = hops_note;
    }
    if (routed_total > 0) {
      nlohmann::json tokens = nlohmann::json::object(), shares = nlohmann::json::object();
      for (const auto& [expert, n] : routed) {
        tokens[std::to_string(expert)] = n;
        shares[std::to_string(expert)] = n / routed_total;
      }
      out["routed_tokens"] = {{"tokens", std::move(tokens)}, {"share", std::move(shares)}};
    }
    if (!o.skew_experts.empty()) {
      nlohmann::json pool_json = nlohmann::json::array();
      for (const ProbedToken& p : pool) {
        pool_json.push_back({{"token", p.token}, {"probe_share", p.share}});
      }
      out["skew"] = {{"experts", o.skew_experts},
                     {"candidates", static_cast<int>(probed.size())},
                     {"pool", std::move(pool_json)},
                     {"pool_probe_share", pool_share},
                     {"run_share", run_hot_share},
                     {"run_share_over_mean",
                      run_hot_share * num_experts / static_cast<double>(o.skew_experts.size())}};
    }
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  } else {
    std::printf("switchyard bench: %s (model %s)\n", o.server.c_str(), info.model().c_str());
    std::printf("  %-22s %d (concurrency %d, prompt %d tokens, output %d tokens, seed %llu)\n",
                "requests", o.requests, o.concurrency, o.prompt_tokens, o.output_tokens,
                static_cast<unsigned long long>(o.seed));
    if (o.request_rate > 0) std::printf("  %-22s %.2f\n", "request rate /s", o.request_rate);
    std::printf("  %-22s %d\n", "errors", errors);
    if (short_requests > 0) std::printf("  %-22s %d\n", "short requests", short_requests);
    std::printf("  %-22s %.3f\n", "wall seconds", wall_s);
    std::printf("  %-22s %.1f\n", "output tokens/s", out_tps);
    std::printf("  %-22s %.1f\n", "total tokens/s", total_tps);
    std::printf("  %-22s %10s %10s %10s\n", "", "p50", "p99", "mean");
    std::printf("  %-22s %10.2f %10.2f %10.2f\n", "TTFT ms", ttft_p50, ttft_p99, ttft_mean);
    std::printf("  %-22s %10.2f %10.2f %10.2f\n", "ITL ms", itl_p50, itl_p99, itl_mean);
    std::printf("  %-22s %10.2f %10.2f %10.2f\n", "request latency ms", lat_p50, lat_p99,
                latency_mean);
    if (o.max_new_tokens != o.output_tokens) {
      std::printf("  %-22s %d (streams cancelled after %d tokens)\n", "declared max_new",
                  o.max_new_tokens, o.output_tokens);
    }
    if (peak >= 0) std::printf("  %-22s %d (sampled every 200 ms)\n", "peak running seqs", peak);
    if (o.shared_prefix_tokens > 0) {
      std::printf(
          "  shared prefix %d tokens: TTFT first request %.2f ms (run alone), later p50 "
          "%.2f ms, mean %.2f ms (%.2fx lower at p50)\n",
          o.shared_prefix_tokens, ttft_first, ttft_later_p50, ttft_later_mean,
          ttft_later_p50 > 0 ? ttft_first / ttft_later_p50 : 0);
      if (hits_first >= 0) {
        std::printf("  prefix-hit tokens (gateway): first request %.0f, later requests %.0f\n",
                    hits_first, hits_later);
      } else {
        std::printf(
            "  prefix-hit tokens: pass --metrics HOST:PORT to read the gateway's counter\n");
      }
    }
    for (const auto& [message, count] : error_counts) {
      std::printf("  error x%d: %s\n", count, message.c_str());
    }
    if (hops.empty()) {
      std::printf("  %s\n", hops_note.c_str());
    } else {
      std::printf(
          "  expert call breakdown, us per call (gateway %s; p50/p99 interpolated in the "
          "histogram's buckets):\n",
          o.metrics.c_str());
      std::printf("  %-8s %8s %10s %10s %10s %10s %10s %10s %10s\n", "expert", "calls", "net mean",
                  "net p50", "queue mean", "queue p50", "queue p99", "comp mean", "comp p50");
      auto print_row = [](const std::string& name, const HopRow& row) {
        std::printf("  %-8s %8.0f %10.1f %10.1f %10.1f %10.1f %10.1f %10.1f %10.1f\n", name.c_str(),
                    row.calls, row.mean_us[0], row.p50_us[0], row.mean_us[1], row.p50_us[1],
                    row.p99_us[1], row.mean_us[2], row.p50_us[2]);
      };
      for (const auto& [expert, row] : hops) {
        if (expert >= 0) print_row(std::to_string(expert), row);
      }
      print_row("all", hops.at(-1));
    }
    if (routed_total > 0) {
      std::printf("  routed tokens per expert (all layers, this run):\n");
      std::printf("  %-8s %10s %8s %8s\n", "expert", "tokens", "share", "x mean");
      for (const auto& [expert, n] : routed) {
        const bool hot =
            std::find(o.skew_experts.begin(), o.skew_experts.end(), expert) != o.skew_experts.end();
        std::printf("  %-8s %10.0f %8.3f %8.2f\n", absl::StrCat(expert, hot ? " *" : "").c_str(), n,
                    n / routed_total, n / routed_total * num_experts);
      }
    }
    if (!o.skew_experts.empty()) {
      std::printf(
          "  skew: experts %s (*); prompts from the %zu of %zu probed tokens routed most to them "
          "(%.3f of their routing); this run sent them %.3f of its routed tokens, %.2fx an even "
          "share\n",
          absl::StrJoin(o.skew_experts, ",").c_str(), pool.size(), probed.size(), pool_share,
          run_hot_share, run_hot_share * num_experts / static_cast<double>(o.skew_experts.size()));
      if (pool_share * num_experts <= static_cast<double>(o.skew_experts.size())) {
        std::printf(
            "  note: no probed token favours these experts more than an even spread would; try "
            "more --skew-candidates\n");
      }
    }
  }
  std::fflush(stdout);
  *exit_code = errors > 0 ? 1 : 0;
  return absl::OkStatus();
}

}  // namespace

int RunBench(const std::vector<std::string>& args) {
  int exit_code = 0;
  absl::Status status = Bench(args, &exit_code);
  if (!status.ok()) {
    std::fprintf(stderr, "switchyard bench: %s\n", StatusLine(status).c_str());
    return 1;
  }
  return exit_code;
}

}  // namespace switchyard::cli
