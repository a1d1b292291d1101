// The gRPC ExpertService (protos/switchyard/v1/expert.proto) over an
// ExpertBackend that computes the shard's experts: LocalExpertBackend on the
// CPU, cuda::CudaExpertBackend on a GPU. What switchyard-expert serves.
//
// Forward calls (unary, or multiplexed on a ForwardStream) arrive on gRPC's
// callback threads and are validated there (cheap lookups only). When no call
// is queued and fewer than `workers` computations run, the call is computed
// right there on the callback thread (decode, backend, encode, reply): no
// thread hop at low load; only while calls compute quickly, see
// ExpertServerOptions::inline_compute_max_micros). Otherwise it is queued to the pool of worker
// threads, so under load at most `workers` computations run on their own
// threads and the queue (and its metrics) shows the backlog. Calls whose
// deadline passed while queued are dropped without compute.
//
// The same stream messages also come from a frame socket
// (expert_service/frame_server.h), through AcceptForwardRequest.
//
// A ForwardStream is one ServerBidiReactor per gateway connection: it keeps a
// read posted, hands each request to the same inline-or-queue path, and
// writes the responses one at a time in completion order. It ends when the
// caller half-closes or goes away, after its accepted requests are answered.
//
// Thread-safety: all methods are thread-safe. The backend must outlive the
// service; the service must outlive the grpc::Server it is registered with
// (shut the server down first, then call Shutdown()).
#ifndef SWITCHYARD_EXPERT_SERVICE_EXPERT_SERVER_H_
#define SWITCHYARD_EXPERT_SERVICE_EXPERT_SERVER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/checkpoint.h"
#include "core/model_config.h"
#include "core/worker_pool.h"
#include "expert_service/expert_backend.h"
#include "expert_service/expert_metrics.h"
#include "rpc/frame_socket.h"
#include "switchyard/v1/expert.grpc.pb.h"

namespace switchyard {

// What a shard holds, as reported by GetShardInfo.
struct ShardDescription {
  // Expert indices held, sorted (for every layer in [layer_begin, layer_end)).
  std::vector<int> experts;
  int layer_begin = 0;
  int layer_end = 0;
  // ExpertWeightsFingerprint of each held expert.
  std::map<int, std::string> expert_weight_fingerprints;
  // Stored dtype of the expert weights: "bf16", "f16" or "f32".
  std::string weights_dtype;

  // Every held (layer, expert), sorted.
  std::vector<std::pair<int, int>> Held() const;
};

// Builds the description of what `checkpoint` (opened from `checkpoint_dir`)
// selects: experts, layer range, weight fingerprints, stored dtype. The
// selection must name its experts explicitly (WeightSelection::ExpertsOnly).
// Fingerprints cover every layer of the folder, whatever layers are held.
absl::StatusOr<ShardDescription> DescribeShard(const std::string& checkpoint_dir,
                                               const Checkpoint& checkpoint);

// Default of ExpertServerOptions::max_forward_rows: the most rows a gateway
// step can send to one expert (the gateway caps --max-step-tokens and
// --max-running at this).
inline constexpr int kDefaultMaxForwardRows = 16384;

struct ExpertServerOptions {
  // Worker threads running expert compute. Default 2.
  int workers = 2;
  // Forward calls allowed to wait for a worker; beyond that calls fail with
  // RESOURCE_EXHAUSTED. Default 4096.
  int max_queued_calls = 4096;
  // Rows (tokens) one Forward call may carry; more is INVALID_ARGUMENT before
  // any decoding. Default kDefaultMaxForwardRows.
  int max_forward_rows = kDefaultMaxForwardRows;
  // Prometheus metrics to update. Default nullptr: none. Not owned.
  ExpertMetrics* metrics = nullptr;
  // Compute device and precision, reported as ShardInfo.backend. Default
  // "cpu-f32" (LocalExpertBackend's FP32 math).
  std::string backend_name = "cpu-f32";
  // Compute a call on the gRPC thread that received it when nothing is queued
  // and fewer than `workers` computations run (no worker hop). Default true;
  // false: every call goes through the worker queue.
  bool inline_compute_when_idle = true;
  // ... but only while the shard's recent compute time per call (a moving
  // average) is at most this many microseconds: longer compute (CPU experts
  // at large batches) goes to the workers, so it never holds gRPC's threads,
  // which also carry the shard's I/O. Default 200.
  int64_t inline_compute_max_micros = 200;
};

// Counters of one (layer, expert). Monotonic except in_flight.
struct ExpertCounters {
  std::atomic<uint64_t> calls{0};        // Forward calls that ran (OK or not)
  std::atomic<uint64_t> tokens{0};       // rows computed
  std::atomic<int64_t> in_flight{0};     // accepted and not yet finished
  std::atomic<uint64_t> busy_micros{0};  // worker time spent on its calls
};

// A point-in-time copy of the counters, for a metrics exporter.
struct ExpertServerStats {
  struct PerExpert {
    int layer = 0;
    int expert = 0;
    uint64_t calls = 0;
    uint64_t tokens = 0;
    int64_t in_flight = 0;
    uint64_t busy_micros = 0;
  };
  std::vector<PerExpert> experts;  // every held (layer, expert), sorted
  // Forward calls refused before compute (bad request, unknown layer/expert,
  // fingerprint mismatch, queue full, shutting down, deadline passed).
  uint64_t rejected_calls = 0;
  // Calls waiting for a worker right now.
  int64_t queued_calls = 0;
};

// The tail of a reply to a request that came in a version 2 frame
// (rpc/frame_socket.h): the reply goes in a version 2 frame too, its
// outputs' bytes (`bytes` of them, which `write` writes at the pointer it
// is given) after the message. Not present for every other reply.
struct ReplyTail {
  bool present = false;
  size_t bytes = 0;
  std::function<void(char*)> write;  // null when `bytes` is 0
};

// Where the answer to an accepted ForwardStreamRequest goes: a gRPC
// ForwardStream, or a frame socket connection. Reply is called exactly once
// per accepted request, from any thread; `tail` is present only for
// requests that came with a frame tail (so never on gRPC).
class ForwardReplySink {
 public:
  virtual ~ForwardReplySink() = default;
  virtual void Reply(std::unique_ptr<v1::ForwardStreamResponse> response, ReplyTail tail) = 0;
};

// Where a shard's frame socket is, for its ShardInfo (see expert.proto).
struct FrameEndpoint {
  uint32_t port = 0;      // TCP port; 0: none
  std::string unix_path;  // "": none
  std::string token;      // the greeting's payload
  // The newest frame version it reads (ShardInfo.frame_version).
  uint32_t version = rpc::kFrameVersion;
};

class ExpertServiceImpl final : public v1::ExpertService::CallbackService {
 public:
  // Serves the (layer, expert) pairs of `shard`, computed by `backend`,
  // which must hold all of them. `backend` is not owned and must outlive the
  // service; its RunLayer is called from several workers at once. Starts the
  // workers.
  ExpertServiceImpl(const ModelConfig& config, ExpertBackend* backend, ShardDescription shard,
                    ExpertServerOptions options = {});
  ~ExpertServiceImpl() override;  // calls Shutdown()

  ExpertServiceImpl(const ExpertServiceImpl&) = delete;
  ExpertServiceImpl& operator=(const ExpertServiceImpl&) = delete;

  grpc::ServerUnaryReactor* GetShardInfo(grpc::CallbackServerContext* context,
                                         const v1::GetShardInfoRequest* request,
                                         v1::ShardInfo* response) override;
  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* context,
                                    const v1::ForwardRequest* request,
                                    v1::ForwardResponse* response) override;
  grpc::ServerBidiReactor<v1::ForwardStreamRequest, v1::ForwardStreamResponse>* ForwardStream(
      grpc::CallbackServerContext* context) override;

  // Ends every open ForwardStream once the requests it accepted are answered
  // (status UNAVAILABLE "expert shard is shutting down"); requests read after
  // this are refused the same way, so callers retry elsewhere. Call before
  // the grpc::Server's graceful Shutdown, which otherwise waits its whole
  // deadline for the streams (they never end on their own).
  void EndStreams();

  // Accepts a ForwardStreamRequest read at `received_micros` (NowMicros, a
  // steady clock): answers refused batches, computes or queues the others,
  // and sends the response to `sink`, which must live until then.
  // `own_thread`: the caller's thread is its own (a frame connection's
  // reader, not one of gRPC's), so it computes there whenever the shard is
  // idle, however long compute takes. `tail`: the tail of the version 2
  // frame the request came in, which its tensors may point into (then the
  // reply carries its outputs the same way); not present otherwise.
  void AcceptForwardRequest(std::unique_ptr<v1::ForwardStreamRequest> request,
                            int64_t received_micros, ForwardReplySink* sink, bool own_thread,
                            rpc::FrameTail tail = {});
  // Reports `endpoint` in ShardInfo from now on. Call before serving.
  void SetFrameEndpoint(FrameEndpoint endpoint);
  // Microseconds on the clock AcceptForwardRequest's received_micros uses.
  static int64_t NowMicros();

  // Refuses new Forward calls (UNAVAILABLE), finishes every queued call and
  // joins the workers. Idempotent. Call after the grpc::Server stopped
  // accepting (RunningServer::Shutdown), so its in-flight calls complete.
  void Shutdown();

  // Live counters of a held (layer, expert); nullptr if not held.
  const ExpertCounters* counters(int layer, int expert) const;
  ExpertServerStats Stats() const;
  const ShardDescription& shard() const { return shard_; }

 private:
  class StreamReactor;
  // One ForwardStreamRequest being served: its batches' counters (nullptr
  // for batches refused at validation) and the response being built.
  struct StreamWork;

  // The counters of the (layer, expert) `request` names, after the cheap
  // checks (fingerprint, held, dtype, row limit); the error otherwise.
  absl::StatusOr<ExpertCounters*> Validate(const v1::ForwardRequest& request) const;
  // Under mu_: whether the caller may compute on its own thread now (then
  // counted as a running computation until it calls workers_.FinishInline()).
  // `own_thread`: the caller is not a gRPC thread (no compute-time limit).
  bool TakeInlineSlotLocked(bool own_thread = false);
  // Computes the accepted batches of `work` (decode, backend, encode).
  void RunStreamWork(StreamWork* work);
  // Called by a stream's OnDone.
  void ForgetStream(StreamReactor* reactor);
  // Runs one accepted Forward call on a worker thread and finishes it.
  void RunForward(grpc::CallbackServerContext* context, const v1::ForwardRequest* request,
                  v1::ForwardResponse* response, grpc::ServerUnaryReactor* reactor,
                  ExpertCounters* counters, int64_t enqueued_micros);
  grpc::ServerUnaryReactor* Reject(grpc::CallbackServerContext* context, const absl::Status& s);

  const ModelConfig config_;
  ExpertBackend* const backend_;
  const ShardDescription shard_;
  const ExpertServerOptions options_;
  const std::string config_fingerprint_;
  // Keys fixed at construction, so lookups need no lock.
  std::map<std::pair<int, int>, std::unique_ptr<ExpertCounters>> counters_;
  std::atomic<uint64_t> rejected_calls_{0};
  FrameEndpoint frame_endpoint_;  // set before serving

  // Serialises accepting a call: the stopping_ and queue-limit checks, the
  // accounting (in_flight, metrics) and the inline-or-queue choice happen
  // together, before a worker can start the call.
  std::mutex mu_;
  bool stopping_ = false;  // guarded by mu_
  std::mutex streams_mu_;
  std::set<StreamReactor*> streams_;  // open streams; guarded by streams_mu_
  bool streams_ending_ = false;       // guarded by streams_mu_
  // Moving average of compute time per call, in us (for inline_compute_max_micros).
  std::atomic<int64_t> compute_average_micros_{0};
  void RecordComputeMicros(int64_t micros);
  // `workers` threads (at least 1); counts inline computations too.
  WorkerPool workers_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_EXPERT_SERVICE_EXPERT_SERVER_H_
