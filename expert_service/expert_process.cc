#include "expert_service/expert_process.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <mutex>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/checkpoint.h"
#include "core/status_macros.h"
#include "core/version.h"
#include "expert_service/expert_backend.h"
#include "expert_service/expert_ffn.h"
#include "expert_service/expert_metrics.h"
#include "expert_service/expert_server.h"
#include "expert_service/frame_server.h"
#include "metrics/http_exporter.h"
#include "metrics/metrics.h"
#include "rpc/frame_socket.h"
#include "rpc/server.h"
#ifdef SWITCHYARD_HAVE_CUDA
#include "expert_service/cuda_experts.h"
#endif

namespace switchyard {
namespace {

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

constexpr int kMaxForwardRowsLimit = 65536;

absl::Status ValidateTls(const rpc::TlsFiles& tls) {
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together: give both or neither");
  }
  if (!tls.ca_file.empty() && tls.cert_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls-client-ca needs TLS: give --tls-cert and --tls-key too");
  }
  return absl::OkStatus();
}

// Where the frame socket listens; "" for none (see
// ExpertProcessOptions::frame_listen).
std::string FrameListenAddress(const ExpertProcessOptions& options) {
  if (options.frame_listen == "off") return "";
  if (!options.frame_listen.empty()) return options.frame_listen;
  return DefaultFrameListen(options.listen);
}

std::string FrameSummary(const ForwardFrameServer* frames, bool tls, int spin_us) {
  if (frames == nullptr) return ", no frame socket";
  const FrameEndpoint& e = frames->endpoint();
  return absl::StrCat(
      tls ? ", TLS frames on " : ", frames on ",
      e.unix_path.empty() ? absl::StrCat("port ", e.port) : absl::StrCat("unix:", e.unix_path),
      spin_us > 0 ? absl::StrCat(" (polling ", spin_us, " us)") : "",
      e.version < rpc::kFrameVersion ? absl::StrCat(", frame version ", e.version) : "");
}

}  // namespace

// Destroyed in reverse: server first (no call reaches a dead service), the
// frame socket, then the service (drains its workers), the exporter, metrics
// and weights.
struct ExpertProcess::Parts {
  ShardCompute compute;
  ShardDescription shard;
  std::vector<int> experts;
  std::pair<int, int> layers;
  metrics::Registry registry;
  std::unique_ptr<ExpertMetrics> expert_metrics;
  std::unique_ptr<metrics::HttpExporter> exporter;
  std::unique_ptr<ExpertServiceImpl> service;
  std::unique_ptr<ForwardFrameServer> frames;  // null when off
  std::unique_ptr<rpc::RunningServer> server;
  std::string summary;
  std::once_flag shutdown_once;
};

absl::StatusOr<std::unique_ptr<ExpertProcess>> ExpertProcess::Start(
    const ExpertProcessOptions& options) {
  if (options.model_dir.empty()) return absl::InvalidArgumentError("--model is required");
  if (options.workers < 1 || options.workers > 256) {
    return absl::InvalidArgumentError("--workers must be in [1, 256]");
  }
  if (options.max_connection_age_ms < 0) {
    return absl::InvalidArgumentError("--max-connection-age-ms must be >= 0");
  }
  if (options.gpu < 0 || options.gpu > 1023) {
    return absl::InvalidArgumentError("--gpu must be a device index");
  }
  if (options.max_forward_rows < 1 || options.max_forward_rows > kMaxForwardRowsLimit) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-forward-rows must be in [1, ", kMaxForwardRowsLimit, "]"));
  }
  if (options.frame_spin_us < 0 || options.frame_spin_us > rpc::kMaxSpinUs) {
    return absl::InvalidArgumentError(
        absl::StrCat("--frame-spin-us must be in [0, ", rpc::kMaxSpinUs, "]"));
  }
  if (options.frame_version < 1 || options.frame_version > rpc::kFrameVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("--frame-version must be in [1, ", rpc::kFrameVersion, "]"));
  }
  // Transport security, checked before the (slow) weight load.
  SY_RETURN_IF_ERROR(ValidateTls(options.tls));
  std::shared_ptr<grpc::ServerCredentials> credentials;
  std::shared_ptr<const rpc::FrameTlsContext> frame_tls;  // the same files, for frames
  if (!options.tls.cert_file.empty()) {
    const bool require_client_cert = !options.tls.ca_file.empty();
    SY_ASSIGN_OR_RETURN(credentials,
                        rpc::ServerCredentialsFromFiles(options.tls, require_client_cert));
    if (FrameListenAddress(options) != "") {
      SY_ASSIGN_OR_RETURN(frame_tls,
                          rpc::FrameServerTlsFromFiles(options.tls, require_client_cert));
    }
  }

  auto p = std::make_unique<Parts>();
  SY_ASSIGN_OR_RETURN(const ModelConfig config, LoadModelConfig(options.model_dir));
  // The largest legal Forward: max_forward_rows F32 rows, plus headers.
  const int64_t max_request_bytes = std::min<int64_t>(
      int64_t{options.max_forward_rows} * config.hidden_size * 4 + (1 << 16), int64_t{1} << 30);
  SY_ASSIGN_OR_RETURN(p->experts, ParseExperts(options.experts, config.num_local_experts));
  p->layers = {0, config.num_hidden_layers};
  if (!options.layers.empty()) {
    SY_ASSIGN_OR_RETURN(p->layers, ParseLayers(options.layers, config.num_hidden_layers));
  }

  const auto load_start = std::chrono::steady_clock::now();
  {
    // The checkpoint (memory map) is only needed while loading: the backend
    // keeps its own copies (FP32 on the CPU, device memory on a GPU).
    SY_ASSIGN_OR_RETURN(
        std::unique_ptr<Checkpoint> checkpoint,
        Checkpoint::Open(options.model_dir, WeightSelection::ExpertsOnly(
                                                p->experts, p->layers.first, p->layers.second)));
    if (options.load_progress) checkpoint->SetLoadProgressCallback(options.load_progress);
    SY_ASSIGN_OR_RETURN(p->compute,
                        LoadCompute(*checkpoint, options.device, options.precision, options.gpu));
    SY_ASSIGN_OR_RETURN(p->shard, DescribeShard(options.model_dir, *checkpoint));
    if (options.load_progress) {
      checkpoint->SetLoadProgressCallback(nullptr);
      options.load_progress({checkpoint->bytes_read(), checkpoint->selected_bytes(), true});
    }
  }
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();

  metrics::AddGauge(p->registry, "switchyard_build_info", "Always 1.")
      .Add({{"version", Version()}, {"role", "expert"}})
      .Set(1);
  p->expert_metrics = std::make_unique<ExpertMetrics>(&p->registry, p->shard.Held());
  if (!options.metrics_listen.empty()) {
    SY_ASSIGN_OR_RETURN(p->exporter,
                        metrics::HttpExporter::Start(options.metrics_listen, &p->registry));
  }
  p->service = std::make_unique<ExpertServiceImpl>(config, p->compute.backend.get(), p->shard,
                                                   ExpertServerOptions{
                                                       .workers = options.workers,
                                                       .max_forward_rows = options.max_forward_rows,
                                                       .metrics = p->expert_metrics.get(),
                                                       .backend_name = p->compute.name,
                                                   });
  const std::string frame_listen = FrameListenAddress(options);
  if (!frame_listen.empty()) {
    absl::StatusOr<std::unique_ptr<ForwardFrameServer>> frames = ForwardFrameServer::Start(
        p->service.get(), {.listen = frame_listen,
                           .max_request_bytes = static_cast<size_t>(max_request_bytes),
                           .tls = frame_tls,
                           .request_spin_us = options.frame_spin_us,
                           .frame_version = options.frame_version});
    if (!frames.ok()) {
      return absl::Status(frames.status().code(),
                          absl::StrCat("--frame-listen: ", frames.status().message()));
    }
    p->frames = std::move(*frames);
    p->service->SetFrameEndpoint(p->frames->endpoint());
  }
  rpc::ServerOptions server_options;
  server_options.health_service_names = {v1::ExpertService::service_full_name()};
  server_options.listen_address = options.listen;
  server_options.max_connection_age_ms = options.max_connection_age_ms;
  server_options.max_receive_message_bytes = static_cast<int>(max_request_bytes);
  server_options.credentials = credentials;
  SY_ASSIGN_OR_RETURN(p->server, rpc::RunningServer::Start(server_options, {p->service.get()}));

  char line[1024];
  std::snprintf(line, sizeof(line),
                "loaded experts [%s] layers [%d, %d) of %s (%s weights, config %s) in %.2f s on "
                "%s, %d workers, %s%s",
                absl::StrJoin(p->experts, ",").c_str(), p->layers.first, p->layers.second,
                options.model_dir.c_str(), p->shard.weights_dtype.c_str(),
                config.Fingerprint().c_str(), load_s, p->compute.backend->Describe().c_str(),
                options.workers,
                options.tls.cert_file.empty() ? "plaintext"
                : options.tls.ca_file.empty() ? "TLS"
                                              : "mutual TLS (client certificates required)",
                FrameSummary(p->frames.get(), frame_tls != nullptr, options.frame_spin_us).c_str());
  p->summary = line;
  return std::unique_ptr<ExpertProcess>(new ExpertProcess(std::move(p)));
}

ExpertProcess::ExpertProcess(std::unique_ptr<Parts> parts) : parts_(std::move(parts)) {}

ExpertProcess::~ExpertProcess() { Shutdown(absl::ZeroDuration()); }

const std::string& ExpertProcess::address() const { return parts_->server->address(); }

FrameEndpoint ExpertProcess::frame_endpoint() const {
  return parts_->frames ? parts_->frames->endpoint() : FrameEndpoint{};
}

uint64_t ExpertProcess::frame_requests() const {
  return parts_->frames ? parts_->frames->requests_read() : 0;
}

uint64_t ExpertProcess::frame_tls_failures() const {
  return parts_->frames ? parts_->frames->tls_failures() : 0;
}

std::string ExpertProcess::metrics_address() const {
  return parts_->exporter ? parts_->exporter->address() : "";
}

const std::vector<int>& ExpertProcess::experts() const { return parts_->experts; }

std::pair<int, int> ExpertProcess::layers() const { return parts_->layers; }

const std::string& ExpertProcess::summary() const { return parts_->summary; }

void ExpertProcess::Shutdown(absl::Duration grace) {
  std::call_once(parts_->shutdown_once, [&] {
    // Health first (so balancers stop routing here), then stop accepting and
    // let in-flight calls finish until the deadline, then drain the workers.
    parts_->server->SetServing(false);
    // Gateways' ForwardStreams would keep the server busy until the deadline:
    // end each once its accepted requests are answered.
    parts_->service->EndStreams();
    if (parts_->frames) parts_->frames->Shutdown();
    parts_->server->Shutdown(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(grace));
    parts_->service->Shutdown();
  });
}

}  // namespace switchyard
