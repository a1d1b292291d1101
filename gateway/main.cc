// switchyard-gateway: the client-facing Generation API. Loads everything but
// the expert FFN weights, runs attention and routing, and sends each layer's
// routed tokens to the expert services (or runs them in-process with
// `--experts local`).
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/cpu_quota.h"
#include "core/flags.h"
#include "core/load_progress.h"
#include "core/malloc_tuning.h"
#include "core/status_macros.h"
#include "gateway/gateway_server.h"

namespace {

const switchyard::CommandSpec& Spec() {
  static const auto* spec = new switchyard::CommandSpec{
      "switchyard-gateway",
      "switchyard-gateway --model DIR [--listen ADDR] [--experts local|SPEC|@FILE] [FLAGS]",
      {
          {"model", true, "required", "model directory (config.json, tokenizer, weights)"},
          {"listen", true, "0.0.0.0:50051", "the Generation API address (port 0 picks one)"},
          {"experts", true, "local",
           "where the experts are: local (in this process), SPEC or @FILE (JSON topology)"},
          {"experts-reload-ms", true, "1000",
           "with --experts @FILE: re-read FILE this often and apply a changed topology live "
           "(0: never; 0..86400000)"},
          {"expert-dns-refresh-ms", true, "5000",
           "resolve dns:///NAME:PORT expert targets this often, each address a replica of its "
           "own (frames per pod; with --expert-tls-ca each pod's certificate must name NAME); "
           "0: leave names to gRPC (0..86400000)"},
          {"kv-cache-tokens", true, "from --kv-cache-memory",
           "KV cache size in tokens (16..2^30); not with --kv-cache-memory"},
          {"kv-cache-memory", true, "50% of MemAvailable (cuda: of free GPU memory)",
           "KV cache size in bytes, e.g. 2GiB or 512MiB (units B, KiB, MiB, GiB, TiB, KB, MB, "
           "GB, TB); not with --kv-cache-tokens"},
          {"kv-cache-dtype", true, "auto",
           "K/V storage: auto (bf16 when SWITCHYARD_CPU_PRECISION=bf16, else f32), bf16 or f32 "
           "(cuda: the --precision dtype)"},
          {"max-queue", true, "256", "requests waiting at most; more are refused (1..2^20)"},
          {"max-running", true, "64", "requests decoding at once (1..16384)"},
          {"max-step-tokens", true, "512", "tokens per scheduler step (1..16384)"},
          {"max-new-tokens-limit", true, "0: the model's context - 1",
           "largest max_new_tokens a request may ask for (0..2^31-1)"},
          {"expert-timeout-ms", true, "10000", "deadline of each expert call (1..86400000)"},
          {"wire-dtype", true, "f32", "activations to the experts as f32 or bf16"},
          {"expert-transport", true, "frames",
           "expert calls on each shard's frame socket (frames, TLS with --expert-tls-ca; gRPC "
           "where a shard offers none, and with TLS for requests over 2 MiB) or only on gRPC "
           "(grpc)"},
          {"frame-spin-us", true, "0",
           "poll for frame replies this many us before sleeping: saves a wake-up per layer "
           "where this process has a core to spare, costs where it shares its cores with "
           "experts (0..100000)"},
          {"micro-batches", true, "0: auto, 2 when an expert is on another host, else 1",
           "split a step of 2+ sequences (at most 16 tokens, any number with BF16 weights on "
           "amx/avx512 CPU kernels) into up to N micro-batches whose attention and expert calls "
           "overlap; results are the same bits (0..64)"},
          {"grace-ms", true, "5000", "on SIGTERM, time for requests in flight (0..86400000)"},
          {"max-connection-age-ms", true, "0: never",
           "close client connections after this age, so they rebalance"},
          {"metrics-listen", true, "none", "serve Prometheus /metrics on HOST:PORT"},
          {"http-listen", true, "none",
           "serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
           "/v1/chat/completions) on HOST:PORT"},
          {"device", true, "cpu", "where attention and local experts compute: cpu or cuda"},
          {"precision", true, "bf16", "cuda weights precision: bf16 or f32"},
          {"chat-template", true, "the model's tokenizer_config.json chat_template",
           "Jinja chat template file for messages prompts"},
          {"tls-cert", true, "plaintext", "serve over TLS with this certificate (PEM)"},
          {"tls-key", true, "", "the private key of --tls-cert (PEM)"},
          {"tls-client-ca", true, "", "also require client certificates signed by this CA"},
          {"auth-token-file", true, "no auth",
           "require 'authorization: Bearer TOKEN', TOKEN a line of the file"},
          {"expert-tls-ca", true, "plaintext",
           "TLS to the experts (gRPC and frames), verifying them against this CA"},
          {"expert-tls-cert", true, "", "client certificate for the experts (mutual TLS)"},
          {"expert-tls-key", true, "", "the private key of --expert-tls-cert"},
      },
      "SPEC: 0=HOST:PORT|HOST:PORT;1=unix:/path;... ('|' separates replicas)\n"
      "Health and reflection need no auth token.\n"};
  return *spec;
}

}  // namespace

int main(int argc, char** argv) {
  using switchyard::Flags;
  switchyard::TuneMallocForTransientBuffers();
  const std::string omp_fit = switchyard::FitOpenMpToCpuQuota();
  const std::vector<std::string> args(argv + 1, argv + argc);
  Flags parsed;
  if (std::optional<int> code = switchyard::HandleCommandLine(
          Spec().name, switchyard::HelpText(Spec()), Spec().flags, args, &parsed)) {
    return *code;
  }
  absl::StatusOr<switchyard::GatewayOptions> options = switchyard::GatewayOptionsFromFlags(parsed);
  if (!options.ok()) {
    std::fprintf(stderr, "switchyard-gateway: %s\nsee switchyard-gateway --help\n",
                 std::string(options.status().message()).c_str());
    return 2;
  }
  if (!omp_fit.empty()) std::fprintf(stderr, "switchyard-gateway: %s\n", omp_fit.c_str());
  // Loading progress on stderr: a bar on a terminal, lines in a log.
  auto meter = std::make_shared<switchyard::LoadProgressMeter>(
      "switchyard-gateway: loading weights", isatty(STDERR_FILENO) != 0);
  options->load_progress = [meter](const switchyard::LoadProgress& p) {
    const std::string text = meter->Update(p);
    std::fputs(text.c_str(), stderr);
  };
  return switchyard::RunGateway(*options);
}
