// switchyard-expert: serves some experts of a Mixtral-style checkpoint over
// gRPC (switchyard.v1.ExpertService, plus grpc.health.v1 and reflection).
//
//   switchyard-expert --model DIR [--listen ADDR] [--experts 0,1] [--layers B:E]
//                     [--workers N] [--max-connection-age-ms MS] [--grace-ms MS]
//                     [--tls-cert F --tls-key F [--tls-client-ca F]]
//
// --tls-cert/--tls-key serve over TLS; --tls-client-ca also requires every
// client (the gateway) to present a certificate signed by that CA (mutual
// TLS, enforced in the handshake, so GetShardInfo, Forward, health and
// reflection all need it).
//
// Prints one line to stdout once serving:
//   switchyard-expert listening on ADDR experts=0,1 layers=0:L
// SIGTERM/SIGINT: health NOT_SERVING, stop accepting, finish in-flight calls
// within --grace-ms, exit 0. Start-up errors: one line on stderr, exit 1.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cli/flags.h"
#include "core/checkpoint.h"
#include "core/status_macros.h"
#include "expert_service/expert_ffn.h"
#include "expert_service/expert_server.h"
#include "metrics/http_exporter.h"
#include "metrics/metrics.h"
#include "rpc/server.h"
#include "rpc/tls.h"

namespace switchyard {
namespace {

constexpr char kUsage[] =
    "usage: switchyard-expert --model DIR [--listen ADDR (default 0.0.0.0:50061)]\n"
    "         [--experts 0,1,... (default 0)] [--layers B:E (default all)]\n"
    "         [--workers N (default 2)] [--max-connection-age-ms MS (default 0: never)]\n"
    "         [--grace-ms MS (default 5000)]\n"
    "         [--metrics-listen HOST:PORT (default: no metrics; port 0 picks one)]\n"
    "         [--tls-cert FILE --tls-key FILE (default: plaintext): serve over TLS (PEM files)]\n"
    "         [--tls-client-ca FILE: with TLS, accept only clients whose certificate this CA\n"
    "          signed (mutual TLS)]\n";

absl::StatusOr<std::vector<int>> ParseExperts(const std::string& text, int num_experts) {
  std::vector<int> experts;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int e;
    if (!absl::SimpleAtoi(part, &e)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--experts: '", std::string(part), "' is not an expert index"));
    }
    if (e < 0 || e >= num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("--experts: expert ", e,
                                                     " out of range; the model has ", num_experts,
                                                     " experts (0..", num_experts - 1, ")"));
    }
    for (int seen : experts) {
      if (seen == e) {
        return absl::InvalidArgumentError(absl::StrCat("--experts: expert ", e, " listed twice"));
      }
    }
    experts.push_back(e);
  }
  return experts;
}

// "B:E" -> [B, E) within [0, num_layers).
absl::StatusOr<std::pair<int, int>> ParseLayers(const std::string& text, int num_layers) {
  std::vector<std::string> parts = absl::StrSplit(text, ':');
  int begin, end;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &begin) ||
      !absl::SimpleAtoi(parts[1], &end)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--layers: expected B:E (layers B to E-1), got '", text, "'"));
  }
  if (begin < 0 || begin >= end || end > num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("--layers: [", begin, ", ", end,
                                                   ") is not a non-empty range within [0, ",
                                                   num_layers, ")"));
  }
  return std::make_pair(begin, end);
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "switchyard-expert: %s\n", std::string(status.message()).c_str());
  return 1;
}

int Run(int argc, char** argv) {
  // Block the shutdown signals before any thread starts, so every thread
  // inherits the mask and only sigwait below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  std::vector<std::string> args(argv + 1, argv + argc);
  absl::StatusOr<cli::Flags> flags =
      cli::Flags::Parse(args,
                        {"model", "listen", "experts", "layers", "workers", "max-connection-age-ms",
                         "grace-ms", "metrics-listen", "tls-cert", "tls-key", "tls-client-ca"},
                        {"help"});
  if (!flags.ok()) {
    std::fputs(kUsage, stderr);
    return Fail(flags.status());
  }
  if (flags->Has("help")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  absl::StatusOr<std::string> model_dir = flags->Required("model");
  if (!model_dir.ok()) return Fail(model_dir.status());
  const std::string listen = flags->GetOr("listen", "0.0.0.0:50061");
  absl::StatusOr<int64_t> workers = flags->Int("workers", 2);
  if (!workers.ok()) return Fail(workers.status());
  if (*workers < 1 || *workers > 256) {
    return Fail(absl::InvalidArgumentError("--workers must be in [1, 256]"));
  }
  absl::StatusOr<int64_t> max_age = flags->Int("max-connection-age-ms", 0);
  if (!max_age.ok()) return Fail(max_age.status());
  if (*max_age < 0 || *max_age > (int64_t{1} << 31) - 1) {
    return Fail(absl::InvalidArgumentError("--max-connection-age-ms must be >= 0"));
  }
  absl::StatusOr<int64_t> grace_ms = flags->Int("grace-ms", 5000);
  if (!grace_ms.ok()) return Fail(grace_ms.status());
  if (*grace_ms < 0) return Fail(absl::InvalidArgumentError("--grace-ms must be >= 0"));

  // Transport security, checked before the (slow) weight load.
  const rpc::TlsFiles tls{.cert_file = flags->GetOr("tls-cert", ""),
                          .key_file = flags->GetOr("tls-key", ""),
                          .ca_file = flags->GetOr("tls-client-ca", "")};
  for (const char* name : {"tls-cert", "tls-key", "tls-client-ca"}) {
    if (flags->Has(name) && flags->GetOr(name, "").empty()) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--", name, " needs a file name")));
    }
  }
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    return Fail(
        absl::InvalidArgumentError("--tls-cert and --tls-key go together: give both or neither"));
  }
  if (!tls.ca_file.empty() && tls.cert_file.empty()) {
    return Fail(
        absl::InvalidArgumentError("--tls-client-ca needs TLS: give --tls-cert and --tls-key too"));
  }
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (!tls.cert_file.empty()) {
    absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> built =
        rpc::ServerCredentialsFromFiles(tls, /*require_client_cert=*/!tls.ca_file.empty());
    if (!built.ok()) return Fail(built.status());
    credentials = *std::move(built);
  }

  absl::StatusOr<ModelConfig> config = LoadModelConfig(*model_dir);
  if (!config.ok()) return Fail(config.status());
  absl::StatusOr<std::vector<int>> experts =
      ParseExperts(flags->GetOr("experts", "0"), config->num_local_experts);
  if (!experts.ok()) return Fail(experts.status());
  std::pair<int, int> layers(0, config->num_hidden_layers);
  if (auto text = flags->Get("layers")) {
    absl::StatusOr<std::pair<int, int>> parsed = ParseLayers(*text, config->num_hidden_layers);
    if (!parsed.ok()) return Fail(parsed.status());
    layers = *parsed;
  }

  const auto load_start = std::chrono::steady_clock::now();
  std::unique_ptr<ExpertStore> store;
  ShardDescription shard;
  {
    // The checkpoint (memory map) is only needed while loading: the store
    // keeps FP32 copies.
    absl::StatusOr<std::unique_ptr<Checkpoint>> checkpoint = Checkpoint::Open(
        *model_dir, WeightSelection::ExpertsOnly(*experts, layers.first, layers.second));
    if (!checkpoint.ok()) return Fail(checkpoint.status());
    absl::StatusOr<std::unique_ptr<ExpertStore>> loaded = ExpertStore::Load(**checkpoint);
    if (!loaded.ok()) return Fail(loaded.status());
    store = *std::move(loaded);
    absl::StatusOr<ShardDescription> described = DescribeShard(*model_dir, **checkpoint);
    if (!described.ok()) return Fail(described.status());
    shard = *std::move(described);
  }
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();

  metrics::Registry registry;
  registry.AddGauge("switchyard_build_info", "Always 1.", {"version", "role"})
      .Add({"0.1.0", "expert"})
      .Set(1);
  ExpertMetrics expert_metrics(&registry, store->Held());
  std::unique_ptr<metrics::HttpExporter> exporter;
  if (auto metrics_listen = flags->Get("metrics-listen")) {
    absl::StatusOr<std::unique_ptr<metrics::HttpExporter>> started =
        metrics::HttpExporter::Start(*metrics_listen, &registry);
    if (!started.ok()) return Fail(started.status());
    exporter = *std::move(started);
  }
  ExpertServiceImpl service(store.get(), shard,
                            {.workers = static_cast<int>(*workers), .metrics = &expert_metrics});
  rpc::ServerOptions server_options;
  server_options.health_service_names = {v1::ExpertService::service_full_name()};
  server_options.listen_address = listen;
  server_options.max_connection_age_ms = static_cast<int>(*max_age);
  server_options.credentials = credentials;
  absl::StatusOr<std::unique_ptr<rpc::RunningServer>> server =
      rpc::RunningServer::Start(server_options, {&service});
  if (!server.ok()) return Fail(server.status());

  const std::string experts_text = absl::StrJoin(*experts, ",");
  std::fprintf(stderr,
               "switchyard-expert: loaded experts [%s] layers [%d, %d) of %s (%s weights, "
               "config %s) in %.2f s, %d workers, %s\n",
               experts_text.c_str(), layers.first, layers.second, model_dir->c_str(),
               shard.weights_dtype.c_str(), config->Fingerprint().c_str(), load_s,
               static_cast<int>(*workers),
               tls.cert_file.empty() ? "plaintext"
               : tls.ca_file.empty() ? "TLS"
                                     : "mutual TLS (client certificates required)");
  std::printf("switchyard-expert listening on %s experts=%s layers=%d:%d metrics=%s\n",
              (*server)->address().c_str(), experts_text.c_str(), layers.first, layers.second,
              exporter ? exporter->address().c_str() : "none");
  std::fflush(stdout);

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::fprintf(stderr, "switchyard-expert: %s, draining (grace %lld ms)\n",
               signal_number == SIGTERM ? "SIGTERM" : "SIGINT", static_cast<long long>(*grace_ms));
  // Health first (so balancers stop routing here), then stop accepting and
  // let in-flight calls finish until the deadline, then drain the workers.
  (*server)->SetServing(false);
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(*grace_ms));
  service.Shutdown();
  server->reset();
  std::fprintf(stderr, "switchyard-expert: stopped\n");
  return 0;
}

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) { return switchyard::Run(argc, argv); }
