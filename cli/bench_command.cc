// `switchyard bench`: a closed-loop load generator for a running gateway.
// C client threads each run one GenerateStream at a time until N requests
// are done. Prompts are random token ids in [3, vocab_size), deterministic
// from --seed and the request index; ignore_eos makes every request produce
// exactly --output-tokens tokens. Reports throughput, time to first token
// (TTFT) and inter-token latency (ITL; a message carrying k tokens after a
// gap g counts as k gaps of g/k).
#include <grpcpp/grpcpp.h>

#include <algorithm>
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
#include "absl/strings/str_cat.h"
#include "cli/command_specs.h"
#include "cli/commands.h"
#include "cli/grpc_client.h"
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
  SY_ASSIGN_OR_RETURN(std::optional<uint64_t> seed, f.OptionalUint("seed"));
  o.seed = seed.value_or(0);
  SY_ASSIGN_OR_RETURN(o.timeout_ms, f.Int("timeout-ms", 0));
  if (o.timeout_ms < 0) return absl::InvalidArgumentError("--timeout-ms must be >= 0");
  o.json = f.Has("json");
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

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

RequestResult RunOne(v1::GenerationService::Stub& stub, const BenchOptions& o,
                     const std::vector<int32_t>& prompt, int index) {
  v1::GenerateRequest request;
  request.mutable_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
  request.mutable_stopping()->set_max_new_tokens(static_cast<uint32_t>(o.output_tokens));
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
  while (reader->Read(&message)) {
    const int k = message.token_ids_size();
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
  grpc::Status status = reader->Finish();
  r.latency_ms = Ms(Clock::now() - start);
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
      static_cast<uint32_t>(o.output_tokens) > info.max_new_tokens_limit()) {
    return absl::InvalidArgumentError(absl::StrCat("--output-tokens ", o.output_tokens,
                                                   " exceeds the server's max_new_tokens_limit ",
                                                   info.max_new_tokens_limit()));
  }
  if (info.max_context_tokens() > 0 &&
      static_cast<uint64_t>(o.prompt_tokens) + o.output_tokens > info.max_context_tokens()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--prompt-tokens + --output-tokens exceeds the server's max_context_tokens ",
                     info.max_context_tokens()));
  }

  std::vector<RequestResult> results(o.requests);
  std::atomic<int> next{0};
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < std::min(o.concurrency, o.requests); ++t) {
    threads.emplace_back([&, t] {
      auto stub = v1::GenerationService::NewStub(channels[t / kStreamsPerChannel]);
      for (int i; (i = next.fetch_add(1)) < o.requests;) {
        results[i] =
            RunOne(*stub, o, RandomPrompt(o.seed, i, o.prompt_tokens, info.vocab_size()), i);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  const double wall_s = std::chrono::duration<double>(Clock::now() - start).count();

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
        {"wall_s", wall_s},
        {"prompt_tokens", prompt_total},
        {"output_tokens", output_total},
        {"output_tokens_per_s", out_tps},
        {"total_tokens_per_s", total_tps},
        {"ttft_ms", {{"p50", ttft_p50}, {"p99", ttft_p99}, {"mean", ttft_mean}}},
        {"itl_ms", {{"p50", itl_p50}, {"p99", itl_p99}, {"mean", itl_mean}}},
        {"latency_ms", {{"p50", lat_p50}, {"p99", lat_p99}, {"mean", latency_mean}}},
        {"error_messages", std::move(errors_json)}};
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  } else {
    std::printf("switchyard bench: %s (model %s)\n", o.server.c_str(), info.model().c_str());
    std::printf("  %-22s %d (concurrency %d, prompt %d tokens, output %d tokens, seed %llu)\n",
                "requests", o.requests, o.concurrency, o.prompt_tokens, o.output_tokens,
                static_cast<unsigned long long>(o.seed));
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
    for (const auto& [message, count] : error_counts) {
      std::printf("  error x%d: %s\n", count, message.c_str());
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
