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
#include "cli/flags.h"
#include "core/checkpoint.h"
#include "core/status_macros.h"
#include "gateway/gateway_server.h"

namespace {

constexpr char kUsage[] =
    "usage: switchyard-gateway --model DIR [--listen ADDR] [--experts local|SPEC|@FILE]\n"
    "  [--kv-cache-tokens N] [--max-queue N] [--max-running N] [--max-step-tokens N]\n"
    "  [--max-new-tokens-limit N] [--expert-timeout-ms N] [--wire-dtype f32|bf16]\n"
    "  [--grace-ms N] [--max-connection-age-ms N] [--metrics-listen HOST:PORT]\n"
    "SPEC: 0=HOST:PORT|HOST:PORT;1=unix:/path;... ('|' separates replicas); @FILE: JSON topology\n";

}  // namespace

int main(int argc, char** argv) {
  using switchyard::cli::Flags;
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && (args[0] == "--help" || args[0] == "-h")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  auto flags = Flags::Parse(args,
                            {"model", "listen", "experts", "kv-cache-tokens", "max-queue",
                             "max-running", "max-step-tokens", "max-new-tokens-limit",
                             "expert-timeout-ms", "wire-dtype", "grace-ms",
                             "max-connection-age-ms", "metrics-listen"},
                            {});
  auto options = flags.ok() ? switchyard::GatewayOptionsFromFlags(*flags)
                            : absl::StatusOr<switchyard::GatewayOptions>(flags.status());
  if (!options.ok()) {
    std::fprintf(stderr, "switchyard-gateway: %s\n%s", std::string(options.status().message()).c_str(),
                 kUsage);
    return 2;
  }
  return switchyard::RunGateway(*options);
}
