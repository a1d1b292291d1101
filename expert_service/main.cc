// switchyard-expert: serves some experts of a Mixtral-style checkpoint over
// gRPC (switchyard.v1.ExpertService, plus grpc.health.v1 and reflection).
//
//   switchyard-expert --model DIR [--listen ADDR] [--experts 0,1] [--layers B:E]
//                     [--workers N] [--max-connection-age-ms MS] [--grace-ms MS]
//                     [--tls-cert F --tls-key F [--tls-client-ca F]]
//                     [--device cpu|cuda [--precision bf16|f32] [--gpu N]]
//
// --device cuda computes on GPU N (CUDA builds): weights in device memory in
// --precision (BF16 weights with FP32 accumulate by default), batches copied
// through pinned host buffers. --device cpu (default) computes in FP32.
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
#include "expert_service/expert_backend.h"
#include "expert_service/expert_ffn.h"
#include "expert_service/expert_server.h"
#include "metrics/http_exporter.h"
#include "metrics/metrics.h"
#include "rpc/server.h"
#include "rpc/tls.h"
#ifdef SWITCHYARD_HAVE_CUDA
#include "cuda/cuda_model.h"
#endif

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
    "          signed (mutual TLS)]\n"
    "         [--device cpu|cuda (default cpu)] [--precision bf16|f32 (cuda; default bf16)]\n"
    "         [--gpu N (cuda; default 0)]\n";

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

// The shard's compute, and the CPU weights when it runs on the CPU.
struct ShardCompute {
  std::unique_ptr<ExpertStore> store;  // --device cpu only
  std::unique_ptr<ExpertBackend> backend;
  std::string name;  // ShardInfo.backend: "cpu-f32", "cuda-bf16", ...
};

absl::StatusOr<ShardCompute> LoadCompute(const Checkpoint& checkpoint, const std::string& device,
                                         const std::string& precision, int64_t gpu) {
  ShardCompute compute;
  if (device == "cpu") {
    if (!precision.empty() && precision != "f32" && precision != "fp32") {
      return absl::InvalidArgumentError(absl::StrCat(
          "--precision ", precision, ": the CPU computes in f32 (bf16 is for --device cuda)"));
    }
    SY_ASSIGN_OR_RETURN(compute.store, ExpertStore::Load(checkpoint));
    compute.backend = std::make_unique<LocalExpertBackend>(compute.store.get());
    compute.name = "cpu-f32";
    return compute;
  }
  if (device != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("--device ", device, ": expected cpu or cuda"));
  }
#ifdef SWITCHYARD_HAVE_CUDA
  SY_ASSIGN_OR_RETURN(cuda::Precision p,
                      cuda::ParsePrecision(precision.empty() ? "bf16" : precision));
  if (gpu < 0 || gpu > 1023) return absl::InvalidArgumentError("--gpu must be a device index");
  SY_ASSIGN_OR_RETURN(compute.backend,
                      cuda::MakeCudaExpertBackend(checkpoint, p, static_cast<int>(gpu)));
  compute.name = absl::StrCat("cuda-", cuda::PrecisionName(p));
  return compute;
#else
  (void)gpu;
  return absl::FailedPreconditionError(
      "--device cuda: this build has no CUDA backend (configure with -DSWITCHYARD_CUDA=ON)");
#endif
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
  absl::StatusOr<cli::Flags> flags = cli::Flags::Parse(
      args,
      {"model", "listen", "experts", "layers", "workers", "max-connection-age-ms", "grace-ms",
       "metrics-listen", "tls-cert", "tls-key", "tls-client-ca", "device", "precision", "gpu"},
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

  const std::string device = flags->GetOr("device", "cpu");
  absl::StatusOr<int64_t> gpu = flags->Int("gpu", 0);
  if (!gpu.ok()) return Fail(gpu.status());

  const auto load_start = std::chrono::steady_clock::now();
  ShardCompute compute;
  ShardDescription shard;
  {
    // The checkpoint (memory map) is only needed while loading: the backend
    // keeps its own copies (FP32 on the CPU, device memory on a GPU).
    absl::StatusOr<std::unique_ptr<Checkpoint>> checkpoint = Checkpoint::Open(
        *model_dir, WeightSelection::ExpertsOnly(*experts, layers.first, layers.second));
    if (!checkpoint.ok()) return Fail(checkpoint.status());
    absl::StatusOr<ShardCompute> loaded =
        LoadCompute(**checkpoint, device, flags->GetOr("precision", ""), *gpu);
    if (!loaded.ok()) return Fail(loaded.status());
    compute = *std::move(loaded);
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
  ExpertMetrics expert_metrics(&registry, shard.Held());
  std::unique_ptr<metrics::HttpExporter> exporter;
  if (auto metrics_listen = flags->Get("metrics-listen")) {
    absl::StatusOr<std::unique_ptr<metrics::HttpExporter>> started =
        metrics::HttpExporter::Start(*metrics_listen, &registry);
    if (!started.ok()) return Fail(started.status());
    exporter = *std::move(started);
  }
  ExpertServiceImpl service(*config, compute.backend.get(), shard,
                            {.workers = static_cast<int>(*workers),
                             .metrics = &expert_metrics,
                             .backend_name = compute.name});
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
               "config %s) in %.2f s on %s, %d workers, %s\n",
               experts_text.c_str(), layers.first, layers.second, model_dir->c_str(),
               shard.weights_dtype.c_str(), config->Fingerprint().c_str(), load_s,
               compute.backend->Describe().c_str(), static_cast<int>(*workers),
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
