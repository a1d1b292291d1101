// The gateway process: model (dense part), experts (in-process or remote),
// KV cache, scheduler, and the Generation API server, wired together.
// `switchyard-gateway` is a thin main over RunGateway; tests start a Gateway
// in-process.
//
// Thread-safety: Gateway methods are thread-safe.
#ifndef SWITCHYARD_GATEWAY_GATEWAY_SERVER_H_
#define SWITCHYARD_GATEWAY_GATEWAY_SERVER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/checkpoint.h"
#include "core/flags.h"
#include "gateway/expert_dns.h"
#include "gateway/request_validation.h"
#include "gateway/scheduler.h"
#include "metrics/metrics.h"

namespace switchyard {

struct GatewayOptions {
  std::string model_dir;                 // required
  std::string listen = "0.0.0.0:50051";  // "127.0.0.1:0" picks a free port
  std::string experts = "local";         // "local", a topology spec, or "@file.json"
  // With "@file.json": how often the file is re-read, in ms; when its content
  // changes the new topology is applied live (ExpertTopologyFileWatcher,
  // gateway/remote_expert_backend.h). Default 1000; 0: never re-read.
  int experts_reload_ms = 1000;
  // How often the gateway resolves the dns:///NAME:PORT targets of the
  // topology itself, in ms, making each address a replica of its own (frames
  // or a ForwardStream per pod, balanced by outstanding calls;
  // gateway/expert_dns.h). Default 5000; 0: leave the names to gRPC (one
  // channel per name, unary calls). With --expert-tls-ca each pod's
  // certificate must still name the Service, as for gRPC dialling the name.
  int expert_dns_refresh_ms = 5000;
  // Resolves those names; null (the default): the system resolver. For tests.
  ExpertTargetResolver expert_target_resolver;
  // The KV cache budget, at most one of:
  //   kv_cache_tokens: token slots, [16, 2^30];
  //   kv_cache_memory: bytes of K/V (in the cache's dtype), at least one
  //     block's worth; more than 2^30 slots' worth is capped there.
  // Neither (both 0, the default): kDefaultHostKvMemoryFraction of the host's
  // MemAvailable once the weights are loaded (CPU runner), or that fraction
  // of the GPU's free memory (cuda, DeviceKvTokensThatFit).
  int64_t kv_cache_tokens = 0;
  int64_t kv_cache_memory = 0;
  // How the host KV cache stores K/V: "auto" (default: "bf16" when the CPU
  // precision is BF16, SWITCHYARD_CPU_PRECISION=bf16; else "f32", exact),
  // "bf16" or "f32". The CUDA runner keeps FP32 K/V: auto means f32 there
  // and bf16 is refused.
  std::string kv_cache_dtype = "auto";
  SchedulerOptions scheduler;             // queue, batch and step-token limits
  RequestLimits limits;                   // request validation limits
  int expert_timeout_ms = 10000;          // deadline of each expert call
  int expert_connect_timeout_ms = 30000;  // start-up wait for every expert to answer
  bool wire_bf16 = false;                 // send expert tensors as BF16 (default F32, exact)
  // Expert calls on a shard's frame socket where it offers one (TLS with
  // the expert TLS files below), else gRPC streams. Default true
  // (--expert-transport frames); false: gRPC only (--expert-transport grpc).
  bool expert_frames = true;
  // --frame-spin-us: how long the thread running a layer polls for its frame
  // replies before it sleeps (RemoteExpertOptions::reply_spin_us). Default
  // 0; worth it only with cores to spare. [0, 100000].
  int frame_spin_us = 0;
  // --micro-batches: the most micro-batches a step splits into so that
  // attention and routing of one overlap the expert calls of another
  // (gateway/step_runner.h). 0 (default): auto, 2 when an expert is on
  // another host (ExpertTargetIsOnThisHost, at start-up), else 1
  // (ResolveMicroBatches). [0, 64].
  int micro_batches = 0;
  int grace_ms = 5000;            // shutdown grace for in-flight requests
  int max_connection_age_ms = 0;  // 0: connections are never recycled
  std::string metrics_listen;     // "HOST:PORT" for /metrics; empty (default): off
  // "HOST:PORT" for the OpenAI-compatible HTTP API (gateway/openai_http.h);
  // empty (default): off. Plaintext; bearer-token auth as the gRPC API's.
  std::string http_listen;
  std::string device = "cpu";      // "cpu" or "cuda" (CUDA builds only)
  std::string precision = "bf16";  // on cuda: "bf16" (BF16 weights, FP32 accumulate) or "f32"
  // Chat template for `messages` prompts (--chat-template): a file whose
  // text is the template. Empty (default): the model's tokenizer_config.json
  // chat_template, if it has one.
  std::string chat_template_file;
  // Reports while the weights load (core/checkpoint.h), last with
  // finished=true; called on the loading thread. Default: none.
  LoadProgressCallback load_progress;

  // Transport security of the public Generation API (and of health and
  // reflection on the same port). Both empty (default): plaintext. Both set:
  // TLS with this certificate chain and unencrypted private key (PEM).
  std::string tls_cert_file;
  std::string tls_key_file;
  // With TLS: a CA (PEM); clients must present a certificate signed by it
  // (mutual TLS, for every call, health checks included). Empty (default):
  // no client certificates.
  std::string tls_client_ca_file;
  // Bearer-token auth of the Generation API: a file with one accepted token
  // per line (rpc/auth.h); calls without "authorization: Bearer <token>"
  // naming one get UNAUTHENTICATED. Health and reflection need no token.
  // Empty (default): no token auth. Read once at start-up.
  std::string auth_token_file;
  // Channels and frame connections to remote experts. expert_tls_ca_file
  // set: TLS, verifying the experts' certificates against this CA (their
  // subjectAltName must match the host in --experts). Plus
  // expert_tls_cert_file and expert_tls_key_file (both or neither): mutual
  // TLS, presenting this client certificate.
  // All empty (default): plaintext. Only with remote experts.
  std::string expert_tls_ca_file;
  std::string expert_tls_cert_file;
  std::string expert_tls_key_file;
};

// The most rows (tokens) one step can send to one expert is the larger of
// max_step_tokens and max_running, so both are capped here; an expert's
// --max-forward-rows (default the same) must be at least that large.
inline constexpr int kMaxStepRows = 16384;

absl::StatusOr<GatewayOptions> GatewayOptionsFromFlags(const Flags& flags);

// Checks every numeric option against its range (INVALID_ARGUMENT naming the
// flag and the range), so no setting can wedge the scheduler (a zero step
// budget) or refuse everything. GatewayOptionsFromFlags and Gateway::Start
// call it.
absl::Status ValidateNumericOptions(const GatewayOptions& options);

// Whether a gRPC expert target is on this host: unix sockets, localhost,
// 127.0.0.0/8 and ::1 (also in ipv4:/ipv6: lists); anything else, a
// dns:/// name included, counts as another host. --micro-batches auto
// overlaps only when some expert is on another host: on one host the
// expert "wait" is the same cores computing, with nothing to hide.
bool ExpertTargetIsOnThisHost(std::string_view target);

// Checks the transport-security options for consistency (files that must
// come in pairs, TLS-only options without TLS, expert TLS with local
// experts); INVALID_ARGUMENT names the flags. Gateway::Start calls it.
absl::Status ValidateSecurityOptions(const GatewayOptions& options);

class Gateway {
 public:
  // Loads the model, connects to (and verifies) the expert services, and
  // starts serving.
  static absl::StatusOr<std::unique_ptr<Gateway>> Start(const GatewayOptions& options);
  ~Gateway();

  // The address clients dial.
  const std::string& address() const;
  // Where /metrics is served ("" when off).
  std::string metrics_address() const;
  // Where the OpenAI-compatible HTTP API is served ("" when off).
  std::string http_address() const;
  // The metrics registry (for tests and embedding).
  const metrics::Registry& metrics_registry() const;
  Scheduler& scheduler();
  // Health NOT_SERVING, stop taking calls, let in-flight requests finish
  // within `grace`, then stop.
  void Shutdown(absl::Duration grace);

 private:
  struct Parts;
  explicit Gateway(std::unique_ptr<Parts> parts);
  std::unique_ptr<Parts> parts_;
};

// Runs a gateway until SIGINT or SIGTERM; returns the process exit code.
int RunGateway(const GatewayOptions& options);

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_GATEWAY_SERVER_H_
