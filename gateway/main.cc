// switchyard-gateway: the client-facing Generation API. Loads everything but
// the expert FFN weights, runs attention and routing, and sends each layer's
// routed tokens to the expert services (or runs them in-process with
// `--experts local`).
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/flags.h"
#include "core/status_macros.h"
#include "gateway/gateway_server.h"

namespace {

constexpr char kUsage[] =
    "usage: switchyard-gateway --model DIR [--listen ADDR] [--experts local|SPEC|@FILE]\n"
    "  [--kv-cache-tokens N] [--max-queue N] [--max-running N] [--max-step-tokens N]\n"
    "  [--max-new-tokens-limit N] [--expert-timeout-ms N] [--wire-dtype f32|bf16]\n"
    "  [--grace-ms N] [--max-connection-age-ms N] [--metrics-listen HOST:PORT]\n"
    "  [--device cpu|cuda] [--precision bf16|f32 (cuda only)] [--chat-template FILE]\n"
    "  [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]] [--auth-token-file FILE]\n"
    "  [--expert-tls-ca FILE [--expert-tls-cert FILE --expert-tls-key FILE]]\n"
    "--chat-template FILE: the Jinja chat template for messages prompts (default: the\n"
    "  model's tokenizer_config.json chat_template)\n"
    "SPEC: 0=HOST:PORT|HOST:PORT;1=unix:/path;... ('|' separates replicas); @FILE: JSON topology\n"
    "Ranges: --kv-cache-tokens 16..2^30 (default 65536), --max-queue 1..2^20 (256),\n"
    "  --max-running 1..16384 (64), --max-step-tokens 1..16384 (512),\n"
    "  --max-new-tokens-limit 0..2^31-1 (0: the model's context - 1), --expert-timeout-ms\n"
    "  1..86400000 (10000), --grace-ms 0..86400000 (5000), --max-connection-age-ms 0..2^31-1\n"
    "Security (PEM files; default: plaintext, no auth):\n"
    "  --tls-cert/--tls-key    serve the Generation API over TLS with this certificate and key\n"
    "  --tls-client-ca         also require client certificates signed by this CA (mutual TLS)\n"
    "  --auth-token-file       require 'authorization: Bearer TOKEN' on Generation API calls,\n"
    "                          TOKEN a line of the file (health and reflection need no token)\n"
    "  --expert-tls-ca         TLS to the experts, verifying their certificates against this CA\n"
    "  --expert-tls-cert/-key  present this client certificate to the experts (mutual TLS)\n";

}  // namespace

int main(int argc, char** argv) {
  using switchyard::Flags;
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && (args[0] == "--help" || args[0] == "-h")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  auto flags = Flags::Parse(args,
                            {"model",
                             "listen",
                             "experts",
                             "kv-cache-tokens",
                             "max-queue",
                             "max-running",
                             "max-step-tokens",
                             "max-new-tokens-limit",
                             "expert-timeout-ms",
                             "wire-dtype",
                             "grace-ms",
                             "max-connection-age-ms",
                             "metrics-listen",
                             "device",
                             "precision",
                             "chat-template",
                             "tls-cert",
                             "tls-key",
                             "tls-client-ca",
                             "auth-token-file",
                             "expert-tls-ca",
                             "expert-tls-cert",
                             "expert-tls-key"},
                            {});
  auto options = flags.ok() ? switchyard::GatewayOptionsFromFlags(*flags)
                            : absl::StatusOr<switchyard::GatewayOptions>(flags.status());
  if (!options.ok()) {
    std::fprintf(stderr, "switchyard-gateway: %s\n%s",
                 std::string(options.status().message()).c_str(), kUsage);
    return 2;
  }
  return switchyard::RunGateway(*options);
}
