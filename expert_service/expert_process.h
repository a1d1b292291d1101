// One expert shard as a running process: its weights loaded onto the chosen
// device, the ExpertService with health and reflection on a gRPC server,
// and optionally /metrics. What switchyard-expert runs (expert_service/
// main.cc only turns flags into ExpertProcessOptions and waits for a
// signal); tests start it in-process.
//
// Thread-safety: Shutdown may be called from any thread, once; the
// accessors are safe at any time.
#ifndef SWITCHYARD_EXPERT_SERVICE_EXPERT_PROCESS_H_
#define SWITCHYARD_EXPERT_SERVICE_EXPERT_PROCESS_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/checkpoint.h"
#include "expert_service/expert_server.h"
#include "rpc/tls.h"

namespace switchyard {

struct ExpertProcessOptions {
  std::string model_dir;                 // required: a hub-layout checkpoint folder
  std::string listen = "0.0.0.0:50061";  // gRPC "HOST:PORT" (port 0 picks one) or "unix:PATH"
  std::string experts = "0";             // expert indices, "0,1,..."
  std::string layers;                    // "B:E" for layers [B, E); default "": all
  int workers = 2;                       // compute threads, [1, 256]
  int max_connection_age_ms = 0;         // recycle connections after this; default 0: never
  std::string metrics_listen;            // "HOST:PORT" for /metrics; default "": none
  rpc::TlsFiles tls;                     // cert + key: TLS; + ca: mutual TLS; default plaintext
  std::string device = "cpu";            // "cpu" (FP32) or "cuda" (CUDA builds)
  std::string precision;                 // cuda: "bf16" (default) or "f32"; cpu: "" or "f32"
  int gpu = 0;                           // cuda: device index
  // Rows one Forward call may carry, [1, 65536]; default 16384 (the gateway's
  // largest step). The server's max receive message size follows from it.
  int max_forward_rows = 16384;
  // The frame socket (expert_service/frame_server.h), the gateway's fast
  // data path: "HOST:PORT" or "unix:PATH"; default "": the host of `listen`
  // with a free port ("unix:PATH.frames" beside a unix `listen`); "off":
  // none. With `tls` the frame socket speaks TLS with the same certificate
  // and client-certificate rule as the gRPC port.
  std::string frame_listen;
  // How long each frame connection polls for the next request before it
  // sleeps, in us (FrameServerOptions::request_spin_us). Default 0.
  int frame_spin_us = 0;
  // The newest frame version offered (FrameServerOptions::frame_version):
  // 2, or 1 to measure what version 2 saves. Default rpc::kFrameVersion.
  int frame_version = rpc::kFrameVersion;
  // Reports while the weights load (core/checkpoint.h), last with
  // finished=true; called on the loading thread. Default: none.
  LoadProgressCallback load_progress;
};

class ExpertProcess {
 public:
  // Validates the options (INVALID_ARGUMENT naming the flag), loads the
  // shard's weights and starts serving; health is SERVING when it returns.
  static absl::StatusOr<std::unique_ptr<ExpertProcess>> Start(const ExpertProcessOptions& options);
  ~ExpertProcess();  // Shutdown(zero grace) if not shut down yet

  // The address clients dial ("127.0.0.1:PORT" for an all-interfaces listen).
  const std::string& address() const;
  // The frame socket's endpoint (port 0 and no path when off).
  FrameEndpoint frame_endpoint() const;
  // Requests read on the frame socket, and its connections that failed the
  // TLS handshake (both 0 when it is off).
  uint64_t frame_requests() const;
  uint64_t frame_tls_failures() const;
  // Where /metrics is served; "" when off.
  std::string metrics_address() const;
  const std::vector<int>& experts() const;
  std::pair<int, int> layers() const;  // [begin, end)
  // One line for the log: what was loaded, where, how fast, and the transport.
  const std::string& summary() const;

  // Health NOT_SERVING (ending health watches), stop taking calls, let calls
  // in flight finish within `grace`, finish every queued call, stop. Idempotent.
  void Shutdown(absl::Duration grace);

 private:
  struct Parts;
  explicit ExpertProcess(std::unique_ptr<Parts> parts);
  std::unique_ptr<Parts> parts_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_EXPERT_SERVICE_EXPERT_PROCESS_H_
