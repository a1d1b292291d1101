#include "gateway/gateway_server.h"

#include <pthread.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "attention_service/attention_model.h"
#include "core/chat_template.h"
#include "core/checkpoint.h"
#include "core/status_macros.h"
#include "core/stop_signals.h"
#include "core/tokenizer.h"
#include "core/version.h"
#include "expert_service/expert_ffn.h"
#include "expert_service/expert_server.h"
#include "gateway/generation_service.h"
#include "gateway/model_runner.h"
#include "gateway/openai_http.h"
#ifdef SWITCHYARD_HAVE_CUDA
#include "attention_service/cuda_dense_model.h"
#include "gateway/cuda_model_runner.h"
#endif
#include "gateway/expert_dns.h"
#include "gateway/remote_expert_backend.h"
#include "metrics/http_exporter.h"
#include "rpc/auth.h"
#include "rpc/frame_socket.h"
#include "rpc/grpc_process.h"
#include "rpc/server.h"
#include "rpc/status.h"
#include "rpc/tls.h"

namespace switchyard {
namespace {

// The Generation API behind bearer-token auth: each method checks the call's
// token, then runs GenerationServiceImpl's (gRPC C++ server interceptors
// cannot refuse a call, see rpc/auth.h). A method added to generation.proto
// must be added here too, or it answers UNIMPLEMENTED when auth is on;
// tests/security/tls_test.cc checks every method of the service.
class AuthenticatedGenerationService final : public v1::GenerationService::CallbackService {
 public:
  AuthenticatedGenerationService(GenerationServiceImpl* inner,
                                 const rpc::BearerTokenAuthenticator* authenticator,
                                 metrics::Registry* registry)
      : inner_(inner),
        authenticator_(authenticator),
        refused_(metrics::AddCounter(*registry, "switchyard_gateway_unauthenticated_calls_total",
                                     "Generation API calls refused for a missing or invalid "
                                     "bearer token.")) {}

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context,
                                     const v1::GenerateRequest* request,
                                     v1::GenerateResponse* response) override {
    if (absl::Status s = Check(context, "Generate"); !s.ok()) {
      return rpc::FinishedUnaryReactor(context, s);
    }
    return inner_->Generate(context, request, response);
  }
  grpc::ServerWriteReactor<v1::GenerateStreamResponse>* GenerateStream(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override {
    if (absl::Status s = Check(context, "GenerateStream"); !s.ok()) {
      return rpc::FinishedWriteReactor<v1::GenerateStreamResponse>(s);
    }
    return inner_->GenerateStream(context, request);
  }
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override {
    if (absl::Status s = Check(context, "Tokenize"); !s.ok()) {
      return rpc::FinishedUnaryReactor(context, s);
    }
    return inner_->Tokenize(context, request, response);
  }
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override {
    if (absl::Status s = Check(context, "Detokenize"); !s.ok()) {
      return rpc::FinishedUnaryReactor(context, s);
    }
    return inner_->Detokenize(context, request, response);
  }
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override {
    if (absl::Status s = Check(context, "GetModelInfo"); !s.ok()) {
      return rpc::FinishedUnaryReactor(context, s);
    }
    return inner_->GetModelInfo(context, request, response);
  }

 private:
  absl::Status Check(grpc::CallbackServerContext* context, const char* method) {
    absl::Status status = authenticator_->Check(context->client_metadata());
    if (!status.ok()) refused_.Add({{"method", method}}).Increment();
    return status;
  }

  GenerationServiceImpl* const inner_;
  const rpc::BearerTokenAuthenticator* const authenticator_;
  metrics::Family<metrics::Counter>& refused_;
};

// What to check when experts do not answer, given the expert TLS options.
std::string ExpertSecurityHint(const GatewayOptions& o) {
  if (o.expert_tls_ca_file.empty()) {
    return "; if the experts serve TLS (--tls-cert), give --expert-tls-ca (and, for experts "
           "with --tls-client-ca, --expert-tls-cert and --expert-tls-key)";
  }
  if (o.expert_tls_cert_file.empty()) {
    return "; with --expert-tls-ca the experts must serve TLS with a certificate signed by that "
           "CA naming the host dialled; experts with --tls-client-ca also need --expert-tls-cert "
           "and --expert-tls-key";
  }
  return "; with mutual TLS the experts must serve TLS with a certificate signed by "
         "--expert-tls-ca naming the host dialled, and --expert-tls-cert must be signed by the "
         "CA of their --tls-client-ca";
}

}  // namespace

namespace {

// What GetModelInfo reports for remote experts.
std::vector<v1::ExpertRoute> ExpertRoutes(const ExpertTopology& topology) {
  std::vector<v1::ExpertRoute> routes;
  for (const auto& [e, replicas] : topology.replicas) {
    v1::ExpertRoute route;
    route.set_expert(e);
    route.set_target(absl::StrJoin(replicas, "|"));
    for (const std::string& r : replicas) route.add_replicas(r);
    routes.push_back(std::move(route));
  }
  return routes;
}

}  // namespace

struct Gateway::Parts {
  metrics::Registry registry;
  std::unique_ptr<GatewayMetrics> metrics;
  std::unique_ptr<metrics::HttpExporter> exporter;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<ChatTemplate> chat_template;  // null: messages prompts are refused
  std::unique_ptr<AttentionModel> attention;
  std::unique_ptr<ExpertStore> local_experts;  // --experts local only
  std::unique_ptr<ExpertBackend> backend;
  bool experts_off_host = false;  // some expert target is on another host (at start-up)
  std::unique_ptr<KvCachePool> kv_pool;
  std::string kv_sizing;  // how the KV budget was chosen, for the start-up line
  std::unique_ptr<StepRunner> runner;
  std::unique_ptr<Scheduler> scheduler;
  std::unique_ptr<GenerationServiceImpl> service;
  std::unique_ptr<rpc::BearerTokenAuthenticator> authenticator;           // --auth-token-file only
  std::unique_ptr<AuthenticatedGenerationService> authenticated_service;  // the same
  std::unique_ptr<rpc::RunningServer> server;
  std::unique_ptr<OpenAiHttpServer> http;  // --http-listen only
  // dns:/// targets resolved by the gateway (--expert-dns-refresh-ms), and
  // --experts @FILE reloads (which hand a new file to the refresher when
  // there is one); declared last, so they stop before the backend goes, the
  // watcher first.
  std::unique_ptr<ExpertDnsRefresher> dns_refresher;
  std::unique_ptr<ExpertTopologyFileWatcher> topology_watcher;

  // The stages of Gateway::Start, in order.
  //
  // TLS credentials (server and expert side) and the bearer tokens.
  absl::Status LoadSecurity(const GatewayOptions& options);
  // Tokenizer and chat template: a template given by flag must load; the
  // model's own may be absent, and one outside the supported subset only
  // disables `messages` prompts.
  absl::Status LoadTokenizer(const GatewayOptions& options);
  // The dense weights on the CPU (the CUDA runner uploads its own), build
  // info, the gateway's metrics and their /metrics endpoint.
  absl::Status LoadDenseModelAndMetrics(const GatewayOptions& options,
                                        const Checkpoint& checkpoint);
  // The experts: in-process (--experts local) or remote expert services,
  // checked against this model; records their routes for GetModelInfo.
  absl::Status ConnectExperts(const GatewayOptions& options, const Checkpoint& checkpoint,
                              GenerationServiceOptions* service_options);
  // The StepRunner for --device and the KV cache pool it pairs with.
  absl::Status MakeRunner(const GatewayOptions& options, const Checkpoint& checkpoint);
  // Scheduler, Generation API service and the gRPC server.
  absl::Status StartServing(const GatewayOptions& options, const ModelConfig& config,
                            GenerationServiceOptions service_options);

  std::shared_ptr<grpc::ServerCredentials> server_credentials;   // null: plaintext
  std::shared_ptr<grpc::ChannelCredentials> expert_credentials;  // null: plaintext
  std::shared_ptr<const rpc::FrameTlsContext> expert_frame_tls;  // the same, for frames
};

namespace {

// The range of every numeric option, in the type it is stored in: a flag is
// checked against these before it is narrowed, so no value wraps into a
// different one (4294967296 into 0).
struct NumericRange {
  const char* flag;
  int64_t min;
  int64_t max;
};
static_assert(kMaxStepRows == kDefaultMaxForwardRows,
              "an expert with default settings must accept the gateway's largest step");
constexpr int64_t kMaxIntOption = std::numeric_limits<int32_t>::max();
constexpr int64_t kOneDayMs = int64_t{24} * 3600 * 1000;
constexpr NumericRange kKvCacheTokens{"kv-cache-tokens", KvCachePool::kBlockTokens, 1 << 30};
constexpr NumericRange kMaxQueue{"max-queue", 1, 1 << 20};
constexpr NumericRange kMaxRunning{"max-running", 1, kMaxStepRows};
constexpr NumericRange kMaxStepTokens{"max-step-tokens", 1, kMaxStepRows};
constexpr NumericRange kMaxNewTokensLimit{"max-new-tokens-limit", 0, kMaxIntOption};
constexpr NumericRange kExpertTimeoutMs{"expert-timeout-ms", 1, kOneDayMs};
constexpr NumericRange kGraceMs{"grace-ms", 0, kOneDayMs};
constexpr NumericRange kExpertsReloadMs{"experts-reload-ms", 0, kOneDayMs};
constexpr NumericRange kExpertDnsRefreshMs{"expert-dns-refresh-ms", 0, kOneDayMs};
constexpr NumericRange kMaxConnectionAgeMs{"max-connection-age-ms", 0, kMaxIntOption};
constexpr NumericRange kMicroBatches{"micro-batches", 0, 64};
constexpr NumericRange kFrameSpinUs{"frame-spin-us", 0, rpc::kMaxSpinUs};

absl::Status CheckRange(const NumericRange& r, int64_t value) {
  if (value < r.min || value > r.max) {
    return absl::InvalidArgumentError(absl::StrCat("--", r.flag, " must be an integer in [", r.min,
                                                   ", ", r.max, "], got ", value));
  }
  return absl::OkStatus();
}

// Reads a flag (or keeps *value) within its range.
template <typename T>
absl::Status ReadInRange(const Flags& f, const NumericRange& r, T* value) {
  SY_ASSIGN_OR_RETURN(int64_t v, f.IntInRange(r.flag, *value, r.min, r.max));
  *value = static_cast<T>(v);
  return absl::OkStatus();
}

absl::Status ParseNumericFlags(const Flags& f, GatewayOptions* o) {
  if (f.Has(kKvCacheTokens.flag)) {
    SY_RETURN_IF_ERROR(ReadInRange(f, kKvCacheTokens, &o->kv_cache_tokens));
  }
  SY_RETURN_IF_ERROR(ReadInRange(f, kMaxQueue, &o->scheduler.max_queue));
  SY_RETURN_IF_ERROR(ReadInRange(f, kMaxRunning, &o->scheduler.max_running));
  SY_RETURN_IF_ERROR(ReadInRange(f, kMaxStepTokens, &o->scheduler.max_step_tokens));
  SY_RETURN_IF_ERROR(ReadInRange(f, kMaxNewTokensLimit, &o->limits.max_new_tokens_limit));
  SY_RETURN_IF_ERROR(ReadInRange(f, kExpertTimeoutMs, &o->expert_timeout_ms));
  SY_RETURN_IF_ERROR(ReadInRange(f, kGraceMs, &o->grace_ms));
  SY_RETURN_IF_ERROR(ReadInRange(f, kExpertsReloadMs, &o->experts_reload_ms));
  SY_RETURN_IF_ERROR(ReadInRange(f, kExpertDnsRefreshMs, &o->expert_dns_refresh_ms));
  SY_RETURN_IF_ERROR(ReadInRange(f, kMaxConnectionAgeMs, &o->max_connection_age_ms));
  SY_RETURN_IF_ERROR(ReadInRange(f, kMicroBatches, &o->micro_batches));
  SY_RETURN_IF_ERROR(ReadInRange(f, kFrameSpinUs, &o->frame_spin_us));
  return absl::OkStatus();
}

// Without any KV size given and no MemAvailable to go by.
constexpr int64_t kFallbackKvTokens = 65536;

// The pool's token slots: --kv-cache-tokens as given, --kv-cache-memory
// converted at `dtype`'s bytes per token, or else `default_tokens`; capped to
// 2^30. INVALID_ARGUMENT when a byte budget holds less than one block.
absl::StatusOr<int64_t> KvCacheTokens(const GatewayOptions& o, const ModelConfig& config,
                                      KvDtype dtype, int64_t default_tokens) {
  if (o.kv_cache_tokens != 0) return o.kv_cache_tokens;
  int64_t tokens = default_tokens;
  if (o.kv_cache_memory != 0) {
    tokens = KvCachePool::TokensForBytes(config, dtype, o.kv_cache_memory);
    if (tokens < KvCachePool::kBlockTokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--kv-cache-memory ", o.kv_cache_memory, " bytes hold less than one block of ",
          KvCachePool::kBlockTokens, " tokens (", KvCachePool::BytesPerToken(config, dtype),
          " bytes per token with ", KvDtypeName(dtype), " K/V)"));
    }
  }
  return std::clamp<int64_t>(tokens, KvCachePool::kBlockTokens, kKvCacheTokens.max);
}

// "--kv-cache-tokens" or "--kv-cache-memory 2.0 GiB" (and whether it was capped).
std::string ExplicitKvSizing(const GatewayOptions& o, int64_t tokens) {
  if (o.kv_cache_tokens != 0) return "--kv-cache-tokens";
  return absl::StrCat("--kv-cache-memory ", FormatBytes(o.kv_cache_memory),
                      tokens == kKvCacheTokens.max ? ", capped at 2^30 tokens" : "");
}

}  // namespace

absl::Status ValidateNumericOptions(const GatewayOptions& o) {
  if (o.kv_cache_tokens != 0) SY_RETURN_IF_ERROR(CheckRange(kKvCacheTokens, o.kv_cache_tokens));
  if (o.kv_cache_memory < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-cache-memory must be a positive size, got ", o.kv_cache_memory));
  }
  if (o.kv_cache_tokens != 0 && o.kv_cache_memory != 0) {
    return absl::InvalidArgumentError(
        "--kv-cache-tokens and --kv-cache-memory both size the KV cache: give one of them");
  }
  SY_RETURN_IF_ERROR(CheckRange(kMaxQueue, o.scheduler.max_queue));
  SY_RETURN_IF_ERROR(CheckRange(kMaxRunning, o.scheduler.max_running));
  SY_RETURN_IF_ERROR(CheckRange(kMaxStepTokens, o.scheduler.max_step_tokens));
  SY_RETURN_IF_ERROR(CheckRange(kMaxNewTokensLimit, o.limits.max_new_tokens_limit));
  SY_RETURN_IF_ERROR(CheckRange(kExpertTimeoutMs, o.expert_timeout_ms));
  SY_RETURN_IF_ERROR(CheckRange(kGraceMs, o.grace_ms));
  SY_RETURN_IF_ERROR(CheckRange(kExpertsReloadMs, o.experts_reload_ms));
  SY_RETURN_IF_ERROR(CheckRange(kExpertDnsRefreshMs, o.expert_dns_refresh_ms));
  SY_RETURN_IF_ERROR(CheckRange(kMaxConnectionAgeMs, o.max_connection_age_ms));
  SY_RETURN_IF_ERROR(CheckRange(kMicroBatches, o.micro_batches));
  SY_RETURN_IF_ERROR(CheckRange(kFrameSpinUs, o.frame_spin_us));
  return absl::OkStatus();
}

bool ExpertTargetIsOnThisHost(std::string_view target) {
  auto loopback_host = [](std::string_view host) {
    if (host.starts_with('[') && host.ends_with(']')) host = host.substr(1, host.size() - 2);
    return host == "localhost" || host == "::1" || host.starts_with("127.");
  };
  // HOST:PORT (or [V6]:PORT) -> whether HOST is a loopback name or address.
  auto loopback_address = [&](std::string_view address) {
    const size_t colon = address.rfind(':');
    return colon != std::string_view::npos && loopback_host(address.substr(0, colon));
  };
  if (target.starts_with("unix:") || target.starts_with("unix-abstract:")) return true;
  for (std::string_view scheme : {"ipv4:", "ipv6:"}) {
    if (!target.starts_with(scheme)) continue;
    std::string_view list = target.substr(scheme.size());
    while (true) {
      const size_t comma = list.find(',');
      if (!loopback_address(list.substr(0, comma))) return false;
      if (comma == std::string_view::npos) return true;
      list = list.substr(comma + 1);
    }
  }
  if (target.find(":///") != std::string_view::npos) return false;  // dns:/// and other resolvers
  return loopback_address(target);
}

absl::StatusOr<GatewayOptions> GatewayOptionsFromFlags(const Flags& f) {
  GatewayOptions o;
  SY_ASSIGN_OR_RETURN(o.model_dir, f.Required("model"));
  o.listen = f.GetOr("listen", o.listen);
  o.experts = f.GetOr("experts", o.experts);
  SY_RETURN_IF_ERROR(ParseNumericFlags(f, &o));
  if (f.Has("kv-cache-memory")) {
    SY_ASSIGN_OR_RETURN(o.kv_cache_memory,
                        ParseByteSize(f.GetOr("kv-cache-memory", ""), "kv-cache-memory"));
  }
  o.kv_cache_dtype = f.GetOr("kv-cache-dtype", o.kv_cache_dtype);
  SY_RETURN_IF_ERROR(ParseKvDtype(o.kv_cache_dtype).status());
  const std::string wire = f.GetOr("wire-dtype", "f32");
  if (wire != "f32" && wire != "bf16") {
    return absl::InvalidArgumentError("--wire-dtype must be f32 or bf16, got '" + wire + "'");
  }
  o.wire_bf16 = wire == "bf16";
  const std::string transport = f.GetOr("expert-transport", "frames");
  if (transport != "frames" && transport != "grpc") {
    return absl::InvalidArgumentError("--expert-transport must be frames or grpc, got '" +
                                      transport + "'");
  }
  o.expert_frames = transport == "frames";
  o.metrics_listen = f.GetOr("metrics-listen", "");
  o.http_listen = f.GetOr("http-listen", "");
  o.chat_template_file = f.GetOr("chat-template", "");
  o.device = f.GetOr("device", o.device);
  if (o.device != "cpu" && o.device != "cuda") {
    return absl::InvalidArgumentError("--device must be cpu or cuda, got '" + o.device + "'");
  }
  o.precision = f.GetOr("precision", o.precision);
  if (o.precision != "f32" && o.precision != "bf16") {
    return absl::InvalidArgumentError("--precision must be f32 or bf16, got '" + o.precision + "'");
  }
  o.tls_cert_file = f.GetOr("tls-cert", "");
  o.tls_key_file = f.GetOr("tls-key", "");
  o.tls_client_ca_file = f.GetOr("tls-client-ca", "");
  o.auth_token_file = f.GetOr("auth-token-file", "");
  o.expert_tls_ca_file = f.GetOr("expert-tls-ca", "");
  o.expert_tls_cert_file = f.GetOr("expert-tls-cert", "");
  o.expert_tls_key_file = f.GetOr("expert-tls-key", "");
  for (const char* name : {"tls-cert", "tls-key", "tls-client-ca", "auth-token-file",
                           "expert-tls-ca", "expert-tls-cert", "expert-tls-key"}) {
    if (f.Has(name) && f.GetOr(name, "").empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a file name"));
    }
  }
  SY_RETURN_IF_ERROR(ValidateSecurityOptions(o));
  SY_RETURN_IF_ERROR(ValidateNumericOptions(o));
  return o;
}

absl::Status ValidateSecurityOptions(const GatewayOptions& o) {
  if (o.tls_cert_file.empty() != o.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together: give both or neither");
  }
  if (!o.tls_client_ca_file.empty() && o.tls_cert_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls-client-ca needs TLS: give --tls-cert and --tls-key too");
  }
  if (o.expert_tls_cert_file.empty() != o.expert_tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "--expert-tls-cert and --expert-tls-key go together: give both or neither");
  }
  if (!o.expert_tls_cert_file.empty() && o.expert_tls_ca_file.empty()) {
    return absl::InvalidArgumentError(
        "--expert-tls-cert needs --expert-tls-ca (the CA that signed the experts' certificates)");
  }
  if (!o.expert_tls_ca_file.empty() && o.experts == "local") {
    return absl::InvalidArgumentError(
        "--expert-tls-ca, --expert-tls-cert and --expert-tls-key need remote experts (--experts "
        "SPEC or @FILE), not --experts local");
  }
  return absl::OkStatus();
}

absl::Status Gateway::Parts::LoadSecurity(const GatewayOptions& options) {
  if (!options.tls_cert_file.empty()) {
    SY_ASSIGN_OR_RETURN(server_credentials,
                        rpc::ServerCredentialsFromFiles({.cert_file = options.tls_cert_file,
                                                         .key_file = options.tls_key_file,
                                                         .ca_file = options.tls_client_ca_file},
                                                        !options.tls_client_ca_file.empty()));
  }
  if (!options.expert_tls_ca_file.empty()) {
    const rpc::TlsFiles files = {.cert_file = options.expert_tls_cert_file,
                                 .key_file = options.expert_tls_key_file,
                                 .ca_file = options.expert_tls_ca_file};
    SY_ASSIGN_OR_RETURN(expert_credentials, rpc::ChannelCredentialsFromFiles(files));
    SY_ASSIGN_OR_RETURN(expert_frame_tls, rpc::FrameClientTlsFromFiles(files));
  }
  if (!options.auth_token_file.empty()) {
    SY_ASSIGN_OR_RETURN(authenticator,
                        rpc::BearerTokenAuthenticator::FromFile(options.auth_token_file));
  }
  return absl::OkStatus();
}

absl::Status Gateway::Parts::LoadTokenizer(const GatewayOptions& options) {
  SY_ASSIGN_OR_RETURN(tokenizer, Tokenizer::FromDir(options.model_dir));
  absl::StatusOr<std::unique_ptr<ChatTemplate>> loaded =
      LoadChatTemplate(options.model_dir, options.chat_template_file);
  if (loaded.ok()) {
    chat_template = *std::move(loaded);
  } else if (!options.chat_template_file.empty()) {
    return loaded.status();
  } else if (!absl::IsNotFound(loaded.status())) {
    std::fprintf(stderr, "switchyard-gateway: chat template unusable, messages prompts off: %s\n",
                 std::string(loaded.status().message()).c_str());
  }
  return absl::OkStatus();
}

absl::Status Gateway::Parts::LoadDenseModelAndMetrics(const GatewayOptions& options,
                                                      const Checkpoint& checkpoint) {
  if (options.device != "cuda") {
    SY_ASSIGN_OR_RETURN(attention, AttentionModel::Load(checkpoint));
  }
  metrics::AddGauge(registry, "switchyard_build_info", "Always 1.")
      .Add({{"version", Version()}, {"role", "gateway"}})
      .Set(1);
  metrics = std::make_unique<GatewayMetrics>(&registry, checkpoint.config());
  if (!options.metrics_listen.empty()) {
    SY_ASSIGN_OR_RETURN(exporter, metrics::HttpExporter::Start(options.metrics_listen, &registry));
  }
  return absl::OkStatus();
}

absl::Status Gateway::Parts::ConnectExperts(const GatewayOptions& options,
                                            const Checkpoint& checkpoint,
                                            GenerationServiceOptions* service_options) {
  const ModelConfig& config = checkpoint.config();
  if (options.experts == "local") {
    // On the GPU the CUDA runner holds the experts itself.
    if (options.device != "cuda") {
      SY_ASSIGN_OR_RETURN(local_experts, ExpertStore::Load(checkpoint));
      backend = std::make_unique<LocalExpertBackend>(local_experts.get());
    }
    for (int e = 0; e < config.num_local_experts; ++e) {
      v1::ExpertRoute route;
      route.set_expert(e);
      route.set_target("local");
      service_options->expert_routes.push_back(route);
    }
    return absl::OkStatus();
  }
  std::string topology_file_content;  // what the file watcher starts from
  absl::StatusOr<ExpertTopology> topology =
      absl::StartsWith(options.experts, "@")
          ? ParseExpertTopologyFile(options.experts.substr(1), config.num_local_experts,
                                    &topology_file_content)
          : ParseExpertTopology(options.experts, config.num_local_experts);
  if (!topology.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--experts: ", topology.status().message()));
  }
  bool has_names = false;  // dns:/// names this gateway may resolve itself
  for (const auto& [expert, targets] : topology->replicas) {
    for (const std::string& target : targets) {
      if (!ExpertTargetIsOnThisHost(target)) experts_off_host = true;
      has_names |= IsExpandableDnsTarget(target);
    }
  }
  // dns:/// names resolved here, each address a replica (gateway/expert_dns.h).
  const bool resolve_names = options.expert_dns_refresh_ms > 0;
  const ExpertTargetResolver resolver = options.expert_target_resolver
                                            ? options.expert_target_resolver
                                            : SystemExpertTargetResolver();
  DnsExpansion expansion;
  if (resolve_names) {
    expansion = ExpandDnsTargets(*topology, resolver, {});
    for (const std::string& problem : expansion.problems) {
      std::fprintf(stderr, "switchyard-gateway: expert DNS: %s\n", problem.c_str());
    }
    for (const auto& [name, addresses] : expansion.addresses) {
      std::fprintf(stderr, "switchyard-gateway: expert DNS: %s is %s (every %d ms again)\n",
                   name.c_str(), absl::StrJoin(addresses, ", ").c_str(),
                   options.expert_dns_refresh_ms);
    }
  }
  const ExpertTopology& serving = resolve_names ? expansion.topology : *topology;
  RemoteExpertOptions remote;
  remote.call_deadline_ms = options.expert_timeout_ms;
  remote.wire_dtype = options.wire_bf16 ? v1::DTYPE_BF16 : v1::DTYPE_F32;
  remote.use_frames = options.expert_frames;
  remote.reply_spin_us = options.frame_spin_us;
  remote.credentials = expert_credentials;
  remote.frame_tls = expert_frame_tls;
  GatewayMetrics* gateway_metrics = metrics.get();
  remote.on_call_done = [gateway_metrics](int expert, double seconds, int code,
                                          std::string_view transport) {
    gateway_metrics->ExpertCallDuration(expert).Observe(seconds);
    gateway_metrics->ExpertCalls(expert, transport).Increment();
    if (code != 0) {
      gateway_metrics
          ->ExpertCallErrors(expert, rpc::GrpcCodeName(static_cast<grpc::StatusCode>(code)))
          .Increment();
    }
  };
  remote.on_reply_timing = [gateway_metrics](int expert, double round_trip, double queue,
                                             double compute) {
    gateway_metrics->ObserveExpertHop(expert, round_trip, queue, compute);
  };
  remote.connect_timeout_ms = options.expert_connect_timeout_ms;
  absl::StatusOr<std::unique_ptr<RemoteExpertBackend>> connected =
      RemoteExpertBackend::Connect(serving, config, options.model_dir, remote);
  if (!connected.ok() && connected.status().code() == absl::StatusCode::kUnavailable &&
      serving.replicas != topology->replicas) {
    // A pod the answers named is not serving (going away, say): start on the
    // names as gRPC resolves them (any ready pod does), and let the
    // refresher move to one replica per address once every one answers.
    std::fprintf(stderr,
                 "switchyard-gateway: expert DNS: not every address answered (%s); starting with "
                 "the names left to gRPC, resolving again every %d ms\n",
                 std::string(connected.status().message()).c_str(), options.expert_dns_refresh_ms);
    expansion = DnsExpansion();
    expansion.topology = *topology;
    connected = RemoteExpertBackend::Connect(serving, config, options.model_dir, remote);
  }
  if (!connected.ok()) {
    if (connected.status().code() != absl::StatusCode::kUnavailable) return connected.status();
    // Unreachable experts: a TLS mismatch looks the same as a dead replica
    // from here (the handshake error is only in gRPC's log), so say what
    // to check.
    return absl::UnavailableError(
        absl::StrCat(connected.status().message(), ExpertSecurityHint(options)));
  }
  service_options->expert_routes = ExpertRoutes(serving);
  // Replicas per expert, kept true across live topology changes.
  auto& replicas_gauge = metrics::AddGauge(
      registry, "switchyard_gateway_expert_replicas",
      "Replica targets the gateway sends each expert's calls to (each address of a dns:/// name "
      "the gateway resolves; a name left to gRPC counts as one).");
  std::vector<metrics::Gauge*> replica_gauges;
  for (int e = 0; e < config.num_local_experts; ++e) {
    replica_gauges.push_back(&replicas_gauge.Add({{"expert", std::to_string(e)}}));
  }
  auto set_replica_gauges = [replica_gauges](const ExpertTopology& live) {
    for (const auto& [e, targets] : live.replicas) {
      replica_gauges[e]->Set(static_cast<double>(targets.size()));
    }
  };
  set_replica_gauges(serving);
  RemoteExpertBackend* remote_backend = connected->get();
  backend = *std::move(connected);
  const bool reload_file = absl::StartsWith(options.experts, "@") && options.experts_reload_ms > 0;
  if (reload_file || (resolve_names && has_names)) {
    // The service goes before the backend (Parts' order), so this stays valid.
    service_options->live_expert_routes = [remote_backend] {
      return ExpertRoutes(remote_backend->topology());
    };
  }
  if (resolve_names && (reload_file || has_names)) {
    dns_refresher = std::make_unique<ExpertDnsRefresher>(
        *topology, std::move(expansion), remote_backend, options.expert_dns_refresh_ms, resolver,
        set_replica_gauges);
  }
  if (reload_file) {
    // With a refresher, a changed file goes through it, and it updates the
    // gauges.
    ExpertDnsRefresher* refresher = dns_refresher.get();
    topology_watcher = std::make_unique<ExpertTopologyFileWatcher>(
        options.experts.substr(1), std::move(topology_file_content), config.num_local_experts,
        remote_backend, options.experts_reload_ms,
        refresher == nullptr ? std::function<void(const ExpertTopology&)>(set_replica_gauges)
                             : nullptr,
        refresher == nullptr ? ExpertTopologyFileWatcher::ApplyFn()
                             : [refresher](const ExpertTopology& configured) {
                                 return refresher->SetConfigured(configured);
                               });
  }
  return absl::OkStatus();
}

absl::Status Gateway::Parts::MakeRunner(const GatewayOptions& options,
                                        const Checkpoint& checkpoint) {
  const ModelConfig& config = checkpoint.config();
  const int micro_batches = ResolveMicroBatches(options.micro_batches, experts_off_host);
  // A larger step splits too on the CPU where every product keeps a row's
  // bits whatever the row count (ModelRunner asks per step).
  const std::string split =
      micro_batches <= 1 ? "no overlap"
      : options.device == "cuda"
          ? absl::StrCat("a step of 2+ sequences and at most ", kMaxMicroBatchedStepTokens,
                         " tokens splits by whole sequences")
          : absl::StrCat("a step of 2+ sequences splits by whole sequences if it has at most ",
                         kMaxMicroBatchedStepTokens,
                         " tokens, or any number where the weights are BF16 and the CPU kernels "
                         "of the gateway and of every expert keep rows independent of their "
                         "count (amx, avx512, or bf16 precision)");
  std::fprintf(stderr, "switchyard-gateway: micro-batches %d (%s): %s\n", micro_batches,
               options.micro_batches > 0    ? "--micro-batches"
               : experts_off_host           ? "auto: experts on another host"
               : options.experts == "local" ? "auto: local experts"
                                            : "auto: every expert on this host",
               split.c_str());
  if (options.device == "cuda") {
#ifdef SWITCHYARD_HAVE_CUDA
    SY_ASSIGN_OR_RETURN(cuda::Precision precision, cuda::ParsePrecision(options.precision));
    SY_ASSIGN_OR_RETURN(runner, cuda::MakeCudaRunner(checkpoint, precision, backend.get(),
                                                     metrics.get(), /*device=*/0, micro_batches));
    // The K/V tensors live on the device, in one slab of the pool's blocks
    // allocated now (so a budget the device cannot hold fails at startup),
    // stored in the compute precision; the pool hands out its block ids.
    const cuda::KvDType kv_dtype = cuda::DeviceKvDType(precision);
    const KvDtype pool_dtype = kv_dtype == cuda::KvDType::kBF16 ? KvDtype::kBf16 : KvDtype::kF32;
    int64_t tokens = 0;
    if (options.kv_cache_tokens == 0 && options.kv_cache_memory == 0) {
      // After the weights: the budget is what they left free.
      SY_ASSIGN_OR_RETURN(
          tokens, cuda::DeviceKvTokensThatFit(config, kDefaultHostKvMemoryFraction, kv_dtype));
      kv_sizing = absl::StrCat("default: ", kDefaultHostKvMemoryFraction * 100,
                               "% of the GPU's free memory");
    }
    SY_ASSIGN_OR_RETURN(tokens, KvCacheTokens(options, config, pool_dtype, tokens));
    if (kv_sizing.empty()) kv_sizing = ExplicitKvSizing(options, tokens);
    kv_pool = std::make_unique<KvCachePool>(config, tokens, /*host_storage=*/false,
                                            KvLayout::kPaged, pool_dtype);
    auto slab = cuda::AttachDeviceKvSlab(*kv_pool, kv_dtype, /*device=*/0);
    if (!slab.ok()) {
      auto fit = cuda::DeviceKvTokensThatFit(config, 0.9, kv_dtype);
      return absl::Status(slab.status().code(),
                          absl::StrCat(slab.status().message(), " (", kv_sizing, ": ", tokens,
                                       " token slots; about ", fit.ok() ? absl::StrCat(*fit) : "?",
                                       " would fit in 90% of the free device memory)"));
    }
    std::fprintf(stderr, "switchyard-gateway: device KV slab of %lld blocks, %.1f MiB (%s)\n",
                 static_cast<long long>((*slab)->blocks),
                 static_cast<double>((*slab)->storage.bytes()) / (1 << 20),
                 kv_dtype == cuda::KvDType::kBF16 ? "BF16" : "FP32");
    return absl::OkStatus();
#else
    return absl::FailedPreconditionError(
        "--device cuda: this build has no CUDA backend (configure with -DSWITCHYARD_CUDA=ON)");
#endif
  }
  SY_ASSIGN_OR_RETURN(const KvDtype dtype, ParseKvDtype(options.kv_cache_dtype));
  int64_t tokens = 0;
  if (options.kv_cache_tokens == 0 && options.kv_cache_memory == 0) {
    // Measured now, with the weights loaded: the budget is what they left.
    absl::StatusOr<int64_t> available = HostMemAvailableBytes();
    if (available.ok()) {
      tokens = KvCachePool::TokensForBytes(
          config, dtype, static_cast<int64_t>(*available * kDefaultHostKvMemoryFraction));
      kv_sizing = absl::StrCat("default: ", kDefaultHostKvMemoryFraction * 100,
                               "% of available memory ", FormatBytes(*available));
    } else {
      tokens = kFallbackKvTokens;
      kv_sizing = absl::StrCat("default: ", available.status().message(), ", so ",
                               kFallbackKvTokens, " tokens");
    }
  }
  SY_ASSIGN_OR_RETURN(tokens, KvCacheTokens(options, config, dtype, tokens));
  if (kv_sizing.empty()) kv_sizing = ExplicitKvSizing(options, tokens);
  kv_pool =
      std::make_unique<KvCachePool>(config, tokens, /*host_storage=*/true, KvLayout::kPaged, dtype);
  runner =
      std::make_unique<ModelRunner>(attention.get(), backend.get(), metrics.get(), micro_batches);
  return absl::OkStatus();
}

absl::Status Gateway::Parts::StartServing(const GatewayOptions& options, const ModelConfig& config,
                                          GenerationServiceOptions service_options) {
  std::fprintf(stderr,
               "switchyard-gateway: KV cache %lld token slots in %lld blocks of %d, %s of %s K/V "
               "(%lld bytes per token; %s; %s)\n",
               static_cast<long long>(kv_pool->capacity_tokens()),
               static_cast<long long>(kv_pool->total_blocks()), KvCachePool::kBlockTokens,
               FormatBytes(kv_pool->capacity_bytes()).c_str(), KvDtypeName(kv_pool->dtype()),
               static_cast<long long>(kv_pool->bytes_per_token()), kv_sizing.c_str(),
               options.device == "cuda" ? "a budget for device memory" : "host memory, paged");
  scheduler = std::make_unique<Scheduler>(runner.get(), kv_pool.get(), tokenizer.get(),
                                          options.scheduler, metrics.get());
  service = std::make_unique<GenerationServiceImpl>(scheduler.get(), tokenizer.get(), config,
                                                    std::move(service_options));
  rpc::ServerOptions server_options;
  server_options.listen_address = options.listen;
  server_options.max_connection_age_ms = options.max_connection_age_ms;
  server_options.max_receive_message_bytes =
      static_cast<int>(std::min<int64_t>(MaxLegalRequestBytes(options.limits, config), 1 << 30));
  server_options.health_service_names = {v1::GenerationService::service_full_name()};
  server_options.credentials = server_credentials;
  grpc::Service* public_service = service.get();
  if (authenticator != nullptr) {
    authenticated_service = std::make_unique<AuthenticatedGenerationService>(
        service.get(), authenticator.get(), &registry);
    public_service = authenticated_service.get();
  }
  SY_ASSIGN_OR_RETURN(server, rpc::RunningServer::Start(server_options, {public_service}));
  if (!options.http_listen.empty()) {
    OpenAiHttpOptions http_options;
    http_options.listen = options.http_listen;
    // The model's id: its folder's name ("tiny-mixtral").
    http_options.model_id = std::filesystem::path(options.model_dir).lexically_normal().string();
    while (http_options.model_id.size() > 1 && http_options.model_id.back() == '/') {
      http_options.model_id.pop_back();
    }
    http_options.model_id = std::filesystem::path(http_options.model_id).filename().string();
    http_options.limits = options.limits;
    http_options.chat_template = chat_template.get();
    http_options.authenticator = authenticator.get();
    http_options.metrics = metrics.get();
    SY_ASSIGN_OR_RETURN(http, OpenAiHttpServer::Start(std::move(http_options), scheduler.get(),
                                                      tokenizer.get(), config));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Gateway>> Gateway::Start(const GatewayOptions& options) {
  // Settings first: a bad value or file fails before the model loads.
  SY_RETURN_IF_ERROR(ValidateNumericOptions(options));
  SY_RETURN_IF_ERROR(ValidateSecurityOptions(options));
  SY_RETURN_IF_ERROR(ParseKvDtype(options.kv_cache_dtype).status());
  if (options.device == "cuda" && options.kv_cache_dtype != "auto") {
    // The device slab stores K/V in the compute precision.
    const std::string device_kv = options.precision == "bf16" ? "bf16" : "f32";
    if (options.kv_cache_dtype != device_kv) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--kv-cache-dtype ", options.kv_cache_dtype,
          ": with --device cuda the K/V are stored in ", "the compute precision (--precision ",
          options.precision, " stores ", device_kv, "; use auto or ", device_kv, ")"));
    }
  }
#ifndef SWITCHYARD_HAVE_CUDA
  if (options.device == "cuda") {
    return absl::FailedPreconditionError(
        "--device cuda: this build has no CUDA backend (configure with -DSWITCHYARD_CUDA=ON)");
  }
#endif
  auto p = std::make_unique<Parts>();
  SY_RETURN_IF_ERROR(p->LoadSecurity(options));
  const WeightSelection selection =
      options.experts == "local" ? WeightSelection::All() : WeightSelection::DenseOnly();
  SY_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint,
                      Checkpoint::Open(options.model_dir, selection));
  const ModelConfig config = checkpoint->config();  // a copy: the checkpoint is freed below
  if (options.load_progress) checkpoint->SetLoadProgressCallback(options.load_progress);
  SY_RETURN_IF_ERROR(p->LoadTokenizer(options));
  SY_RETURN_IF_ERROR(p->LoadDenseModelAndMetrics(options, *checkpoint));

  GenerationServiceOptions service_options;
  service_options.model_name = options.model_dir;
  service_options.limits = options.limits;
  service_options.metrics = p->metrics.get();
  service_options.chat_template = p->chat_template.get();
  SY_RETURN_IF_ERROR(p->ConnectExperts(options, *checkpoint, &service_options));
  SY_RETURN_IF_ERROR(p->MakeRunner(options, *checkpoint));
  if (options.load_progress) {
    checkpoint->SetLoadProgressCallback(nullptr);
    options.load_progress({checkpoint->bytes_read(), checkpoint->selected_bytes(), true});
  }
  checkpoint.reset();  // weights are copied; drop the mappings
  SY_RETURN_IF_ERROR(p->StartServing(options, config, std::move(service_options)));
  return std::unique_ptr<Gateway>(new Gateway(std::move(p)));
}

Gateway::Gateway(std::unique_ptr<Parts> parts) : parts_(std::move(parts)) {}

Gateway::~Gateway() {
  // No topology change while stopping; then the servers (no new calls), then
  // the scheduler (ends what is left).
  parts_->topology_watcher.reset();
  parts_->dns_refresher.reset();
  parts_->http.reset();
  parts_->server.reset();
  parts_->scheduler.reset();
}

const std::string& Gateway::address() const { return parts_->server->address(); }
std::string Gateway::metrics_address() const {
  return parts_->exporter ? parts_->exporter->address() : "";
}
std::string Gateway::http_address() const { return parts_->http ? parts_->http->address() : ""; }
const metrics::Registry& Gateway::metrics_registry() const { return parts_->registry; }
Scheduler& Gateway::scheduler() { return *parts_->scheduler; }

namespace {

// Ends what the drain left running with UNAVAILABLE and a reason, before the
// server cancels those calls with a bare "Cancelling all calls".
void EndUnfinishedRequests(Scheduler& scheduler, absl::Duration grace) {
  scheduler.AbortAll(absl::UnavailableError(
      absl::StrCat("the gateway is shutting down: the request did not finish within the ",
                   absl::FormatDuration(grace), " drain grace period; retry on another gateway")));
  // The loop ends them at its next step boundary (after an expert call in
  // flight at most); the server's deadline below covers a slower one.
  (void)scheduler.Drain(absl::Seconds(1));
}

}  // namespace

void Gateway::Shutdown(absl::Duration grace) {
  // Stop admitting before health says NOT_SERVING, so no request that sees
  // NOT_SERVING can still be admitted.
  parts_->scheduler->StopAdmitting();
  parts_->server->SetServing(false);
  const absl::Time deadline = absl::Now() + grace;
  absl::Status drained = parts_->scheduler->Drain(grace);
  if (!drained.ok()) {
    std::fprintf(stderr, "switchyard-gateway: %s\n", std::string(drained.message()).c_str());
    EndUnfinishedRequests(*parts_->scheduler, grace);
  }
  if (parts_->http) parts_->http->Stop();
  // A moment past the grace for the ended requests' last messages to go out.
  parts_->server->Shutdown(
      absl::ToChronoTime(std::max(deadline, absl::Now()) + absl::Milliseconds(500)));
}

int RunGateway(const GatewayOptions& options) {
  // Block the stop signals in every thread; this one waits for them.
  const sigset_t stop_signals = BlockStopSignals();
  // After the mask, which gRPC's threads inherit; outlives `gateway`.
  const rpc::GrpcProcess grpc_process;

  absl::StatusOr<std::unique_ptr<Gateway>> gateway = Gateway::Start(options);
  if (!gateway.ok()) {
    std::fprintf(stderr, "switchyard-gateway: cannot start: %s\n",
                 gateway.status().ToString().c_str());
    return 1;
  }
  const std::string metrics = (*gateway)->metrics_address();
  std::fprintf(stderr, "switchyard-gateway: Generation API %s, %s; expert channels %s\n",
               options.tls_cert_file.empty()        ? "plaintext"
               : options.tls_client_ca_file.empty() ? "TLS"
                                                    : "mutual TLS (client certificates required)",
               options.auth_token_file.empty() ? "no token auth" : "bearer-token auth",
               options.experts == "local"             ? "none (local experts)"
               : options.expert_tls_ca_file.empty()   ? "plaintext"
               : options.expert_tls_cert_file.empty() ? "TLS"
                                                      : "mutual TLS");
  const std::string http = (*gateway)->http_address();
  std::printf("switchyard-gateway listening on %s metrics=%s http=%s\n",
              (*gateway)->address().c_str(), metrics.empty() ? "none" : metrics.c_str(),
              http.empty() ? "none" : http.c_str());
  std::fflush(stdout);
  int signal = 0;
  sigwait(&stop_signals, &signal);
  std::fprintf(stderr, "switchyard-gateway: signal %d, draining (grace %d ms)\n", signal,
               options.grace_ms);
  (*gateway)->Shutdown(absl::Milliseconds(options.grace_ms));
  gateway->reset();
  return 0;
}

}  // namespace switchyard
