// An ExpertBackend that runs experts on remote switchyard-expert shards over
// gRPC (protos/switchyard/v1/expert.proto).
//
// The topology maps every expert index to one or more replica targets. The
// backend keeps one long-lived channel per distinct target (keepalive on,
// round_robin load balancing, so a DNS name that resolves to several pods
// spreads calls over all of them). Connect checks every replica before the
// gateway serves: same model (config fingerprint), the mapped expert held for
// every layer, same dims, and the same expert weights as the gateway's own
// checkpoint folder (ExpertWeightsFingerprint).
//
// Transport: by default a replica whose shard offers a frame socket
// (ShardInfo.frame_port / frame_unix_path; rpc/frame_socket.h) gets its calls
// as frames there: the same ForwardStreamRequest / ForwardStreamResponse
// messages, length-prefixed on a plain socket, without gRPC's HTTP/2 path
// (~0.5 ms per layer under load, against ~0.05 ms for a socket round trip).
// Each RunLayer takes an idle connection to the replica (or dials one and
// checks the shard's greeting token), writes its request, and the same
// thread reads the reply in AwaitLayer (no thread hand-off); the connection
// goes back to the replica's pool once its reply is read whole, and one
// whose reply did not come in time is closed. A connection that breaks
// fails the batches in flight on it, UNAVAILABLE "frame connection to
// TARGET broke", retried like failed calls. A replica whose frame socket
// cannot be reached (a dial or greeting fails) uses gRPC for
// max_reconnect_backoff_ms, doubling with each failure in a row up to a
// minute, and a shard restarted with a new frame socket is found again
// through GetShardInfo. Frames are for one-address targets (HOST:PORT,
// unix:PATH; the gateway turns a dns:/// name into one such target per
// address, gateway/expert_dns.h), plaintext without `credentials`, TLS with
// them and `frame_tls` (the shard's frame socket then speaks TLS with its
// gRPC certificate; requests over tls_frames_max_bytes go on gRPC; without
// `frame_tls` a TLS backend stays on gRPC).
//
// Otherwise every replica that serves it (ShardInfo.forward_stream)
// gets one long-lived ForwardStream from this backend, opened on first use,
// on which every RunLayer multiplexes its calls (requests carry an id, replies
// are matched by it), so a layer costs no call setup. The batches of one layer
// that go to the same replica (a shard holding several experts) travel as one
// request (frame or stream, up to max_message_bytes) and run there as one
// layer. A stream that breaks (replica killed, connection lost) fails exactly
// the batches in flight on it, UNAVAILABLE "ForwardStream to TARGET broke",
// which are retried like failed calls; the next call opens a new stream. A
// target with several addresses (DNS mode), a shard without ForwardStream,
// and use_stream = false use one unary Forward call per batch instead.
// Replies are decoded straight into the batch outputs on the thread that
// receives them. A stream or frame attempt has no gRPC deadline of its own:
// the thread waiting for the layer sleeps until the earliest open attempt's
// deadline and fails those still unanswered then (DEADLINE_EXCEEDED, retried
// like a unary call's); a late reply is dropped.
//
// RunLayer issues one Forward call per batch, all concurrently, each to the
// expert's replica with the fewest calls outstanding (ties round-robin;
// skipping replicas whose channel is in TRANSIENT_FAILURE while another is
// usable), so a slow or overloaded replica gets fewer calls. A call that fails
// with UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED is retried once on another
// replica of the same expert, if there is one. The layer's calls share one
// deadline (call_deadline_ms from the start of the layer); with somewhere to
// retry, the first attempt gets half of it. A replica that just failed that
// way is passed over for max_reconnect_backoff_ms while another can serve.
//
// DNS mode: one target that stands for several addresses (`dns:///name:port`,
// e.g. a Kubernetes headless Service with one address per ready pod, or an
// `ipv4:a:p,b:p` list) is one channel whose round_robin policy keeps a
// subchannel per address and follows DNS as pods come and go. A failed call
// on such a target is retried on the same channel, whose picker sends it to
// the next ready address: a pod that died mid-call costs no request. The
// gateway uses this mode only where it leaves a name to gRPC (expert TLS,
// whose certificates name the Service, or --expert-dns-refresh-ms 0): by
// default it resolves dns:/// names itself and gives this backend one
// HOST:PORT replica per address, which gets frames or a stream, balancing by
// outstanding calls per pod, and topology changes as the answers change
// (gateway/expert_dns.h).
//
// Live topology changes: ApplyTopology swaps in a new set of replicas per
// expert while calls run (ExpertTopologyFileWatcher drives it from an
// `--experts @FILE` file). A new (expert, target) pair is checked as Connect
// checks it before it takes a call; if any check fails nothing changes. A
// removed replica is drained: it gets no new call once the swap is done,
// calls in flight on it (and their results) finish, and its channel closes
// when the last of them ends. Every expert always keeps at least one replica.
//
// Thread-safety: RunLayer, RunLayerPerBatch, Describe, stats() and
// ApplyTopology are thread-safe; several model runners may share one backend.
// ApplyTopology calls are serialized among themselves and never block
// RunLayer: each call picks its replica from an immutable snapshot of its
// expert's replica set, taken under a short per-expert lock.
#ifndef SWITCHYARD_GATEWAY_REMOTE_EXPERT_BACKEND_H_
#define SWITCHYARD_GATEWAY_REMOTE_EXPERT_BACKEND_H_

#include <grpcpp/grpcpp.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/model_config.h"
#include "core/periodic_thread.h"
#include "expert_service/expert_backend.h"
#include "rpc/frame_socket.h"
#include "switchyard/v1/expert.grpc.pb.h"

namespace switchyard {

// Which replicas serve each expert: expert index -> gRPC targets
// ("HOST:PORT", "unix:/path", "dns:///name:port", ...).
struct ExpertTopology {
  std::map<int, std::vector<std::string>> replicas;
  // With TLS: the name a target's certificate must carry where it is not
  // the target's own host (each address of a dns:/// name the gateway
  // resolves must show a certificate for the name, as it would to gRPC).
  // Absent (the default): the target's host ("localhost" for unix:PATH).
  std::map<std::string, std::string> tls_names;
};

// Parses "0=HOST:PORT|HOST:PORT;1=unix:/tmp/e1.sock;..." (';' between experts,
// '|' between replicas of one expert; whitespace around items ignored).
// Every expert 0..num_experts-1 must be mapped exactly once; INVALID_ARGUMENT
// names the bad, duplicate or missing entries.
absl::StatusOr<ExpertTopology> ParseExpertTopology(std::string_view spec, int num_experts);

// Parses a JSON file {"experts": {"0": ["127.0.0.1:5001", "127.0.0.1:5002"],
// "1": ["dns:///expert-1.ns.svc:50061"]}} (a single target may also be given
// as a plain string). Same checks as ParseExpertTopology; errors name the file.
// `content` (may be null) receives the bytes parsed, read once.
absl::StatusOr<ExpertTopology> ParseExpertTopologyFile(const std::string& path, int num_experts,
                                                       std::string* content = nullptr);

// The same for the bytes of such a file, read from `path` already.
absl::StatusOr<ExpertTopology> ParseExpertTopologyJson(std::string_view json,
                                                       const std::string& path, int num_experts);

// A flag value that is either the path of an existing JSON file or a spec.
absl::StatusOr<ExpertTopology> LoadExpertTopology(const std::string& spec_or_path, int num_experts);

// The spec form of `topology` ("0=a|b;1=c").
std::string FormatExpertTopology(const ExpertTopology& topology);

struct RemoteExpertOptions {
  // Budget of one layer's expert calls (all attempts), in ms. Default 10000.
  int call_deadline_ms = 10000;
  // Element type of hidden states on the wire: DTYPE_F32 (default; exact) or
  // DTYPE_BF16 (half the bytes, rounds inputs and outputs to bf16).
  v1::DType wire_dtype = v1::DTYPE_F32;
  // How long Connect waits for every replica to answer GetShardInfo, in ms
  // (replicas may still be loading weights). Default 30000.
  int connect_timeout_ms = 30000;
  // Channel credentials. Default (nullptr): insecure (plaintext).
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Largest message sent or received. Default 256 MiB.
  int max_message_bytes = 256 << 20;
  // HTTP/2 keepalive ping interval on idle and busy channels, in ms.
  // Default 30000 (the server's default minimum ping interval is 5 min
  // without calls in flight, so pings are only sent while calls are active).
  int keepalive_time_ms = 30000;
  // Upper bound of the reconnect backoff, in ms, so a restarted replica is
  // used again soon. Default 5000.
  int max_reconnect_backoff_ms = 5000;
  // With wire_dtype F32: send BF16 hidden states to a replica that computes
  // in BF16 (ShardInfo.backend ends in "-bf16"; it rounds its GEMM inputs to
  // BF16, so its results are the same) and still get F32 outputs: half the
  // request bytes, exact. Default true. A replica computing in F32 (the
  // parity mode) always gets F32.
  bool bf16_inputs_to_bf16_shards = true;
  // Multiplex calls on one ForwardStream per replica (see above). Default
  // true; false: one unary Forward call per batch.
  bool use_stream = true;
  // Send calls on the shard's frame socket where it offers one (see above).
  // Default true; false: gRPC only.
  bool use_frames = true;
  // With `credentials`: TLS for the frame sockets (rpc/tls.h
  // FrameClientTlsFromFiles, from the same files as `credentials`), each
  // shard's certificate verified against the name gRPC verifies. Default
  // (nullptr): a TLS backend sends every call on gRPC.
  std::shared_ptr<const rpc::FrameTlsContext> frame_tls;
  // With frame_tls: a request whose hidden states, there and back, are over
  // this many bytes goes on gRPC instead. The thread running the layer
  // encrypts and decrypts its frames itself, where gRPC spreads that work
  // over its threads: bench/dispatch_bench's tls:1 cases (Mixtral shapes,
  // BF16 both ways, 2 experts, 2 vCPUs) had frames ahead up to 128 rows
  // (2 MiB) and 1.2-1.6x behind at 256. Default 2 MiB; 0: no limit.
  int64_t tls_frames_max_bytes = int64_t{2} << 20;
  // How long the thread running a layer polls its frame replies without
  // sleeping before it blocks (rpc::PollSpinning), in us. A reply that comes
  // within it costs no wake-up; the thread keeps its core busy meanwhile, so
  // this pays where the gateway has cores to spare (a GPU node), and costs
  // where it shares them with its experts. Default 0: block at once.
  int reply_spin_us = 0;
  // Called when each Forward attempt (one batch) completes, from the thread
  // that completed it (a gRPC thread, or RunLayer's own for frames): the
  // expert, seconds it took, its status code (0 = OK) and the transport it
  // went on ("frames", "stream" or "unary"). Default: none.
  std::function<void(int expert, double seconds, int code, std::string_view transport)>
      on_call_done;
  // Called after on_call_done for each OK Forward attempt, from the same
  // thread: the expert, the same round-trip seconds, and the queue and
  // compute seconds the shard put in its reply (per-hop timing). Default: none.
  std::function<void(int expert, double round_trip_seconds, double queue_seconds,
                     double compute_seconds)>
      on_reply_timing;
};

// Live per-expert counters. errors_by_code is indexed by grpc::StatusCode
// (0..16) and counts failed attempts, including those retried.
struct RemoteExpertCounters {
  std::atomic<uint64_t> calls{0};    // Forward attempts issued
  std::atomic<uint64_t> retries{0};  // attempts that were retries
  std::array<std::atomic<uint64_t>, 17> errors_by_code{};
  std::atomic<uint64_t> latency_micros_sum{0};  // over completed attempts, OK or not
  std::atomic<uint64_t> latency_count{0};
};

// A point-in-time copy for a metrics exporter.
struct RemoteExpertStats {
  struct PerExpert {
    int expert = 0;
    std::vector<std::string> targets;
    uint64_t calls = 0;
    uint64_t retries = 0;
    std::map<std::string, uint64_t> errors_by_code;  // "UNAVAILABLE" -> count; nonzero only
    uint64_t latency_micros_sum = 0;
    uint64_t latency_count = 0;
  };
  std::vector<PerExpert> experts;  // indexed by expert
  // Forward attempts sent to each target ever used, removed ones included
  // (over every expert it serves).
  std::map<std::string, uint64_t> calls_by_target;
};

class RemoteExpertBackend : public ExpertBackend {
 public:
  // Opens the channels, waits up to connect_timeout_ms for every replica to
  // answer GetShardInfo (UNAVAILABLE naming those that did not) and checks
  // each against `gateway_config` and the expert weights in `checkpoint_dir`
  // (FAILED_PRECONDITION naming expert, replica and what differs). An empty
  // `checkpoint_dir` skips the weight check (for a gateway folder without
  // expert weights); every Forward still carries the config fingerprint.
  static absl::StatusOr<std::unique_ptr<RemoteExpertBackend>> Connect(
      const ExpertTopology& topology, const ModelConfig& gateway_config,
      const std::string& checkpoint_dir, const RemoteExpertOptions& options);

  ~RemoteExpertBackend() override;

  // Errors: INVALID_ARGUMENT for a bad layer/expert/token count (caller bug);
  // UNAVAILABLE "expert E (layer L) unavailable: ..." when every attempt
  // failed with UNAVAILABLE or DEADLINE_EXCEEDED; otherwise the shard's code
  // with the expert, layer and replica prepended. Returns the error of the
  // first failing batch; all calls have finished when it returns.
  absl::Status RunLayer(int layer, absl::Span<const ExpertBatch> batches) override;
  // The same errors per batch: a batch whose call failed after its retries
  // gets that error ("expert E (layer L) unavailable: TARGET: ..."), the
  // others their outputs. Returns INVALID_ARGUMENT for a bad layer or batch.
  absl::Status RunLayerPerBatch(int layer, absl::Span<const ExpertBatch> batches,
                                std::vector<absl::Status>* batch_status) override;
  std::string Describe() const override;
  // True when every live replica's ShardInfo (asked when it joined) said
  // rows_independent_of_count.
  bool RowsIndependentOfCount() const override { return rows_independent_of_count_.load(); }

  // Makes `topology` the live one. Checks it like Connect (every expert
  // mapped, at least one replica each: INVALID_ARGUMENT; new replicas must
  // answer GetShardInfo within connect_timeout_ms and serve this model and
  // expert: UNAVAILABLE / FAILED_PRECONDITION); on any error nothing changes.
  // Otherwise returns what changed ("expert 3: +a -b; ..."; empty when
  // nothing did). Removed replicas are drained, never cut off; the channel of
  // one no expert uses any more is closed by a later ApplyTopology once its
  // last call has ended (or when the backend goes).
  absl::StatusOr<std::string> ApplyTopology(const ExpertTopology& topology);
  // The live topology.
  ExpertTopology topology() const;

  // Live counters of `expert`; nullptr if out of range.
  const RemoteExpertCounters* counters(int expert) const;
  RemoteExpertStats stats() const;

 private:
  struct Replica;
  struct ReplicaSet;
  struct ExpertState;
  struct CallSlot;
  struct LayerCall;
  struct ShardInfoCall;
  struct FrameWait;
  class Stream;
  // One attempt of one batch: what a stream reply or failure completes.
  struct AttemptRef {
    std::shared_ptr<LayerCall> call;
    size_t slot = 0;
    int attempt = 0;
  };
  // An (expert, replica) pair to check before it serves.
  using NewPair = std::pair<int, std::shared_ptr<Replica>>;

  RemoteExpertBackend(const ModelConfig& config, const RemoteExpertOptions& options);
  // A new channel to `target`, whose certificate (with TLS) must name
  // `tls_name`.
  std::shared_ptr<Replica> OpenReplica(const std::string& target, const std::string& tls_name);
  // Asks every replica of `pairs` for its ShardInfo at once (once per distinct
  // replica); returns when all have answered or connect_timeout_ms has passed
  // (waiting for replicas still starting up). Then: FAILED_PRECONDITION if a
  // replica refused GetShardInfo, UNAVAILABLE naming those that did not
  // answer, FAILED_PRECONDITION if a pair's replica does not serve this model,
  // its expert and these weights.
  absl::Status CheckPairs(const std::vector<NewPair>& pairs) const;
  // The replica to try next from `set` (fewest calls outstanding), not
  // `exclude` when another exists.
  std::shared_ptr<Replica> PickReplica(const ExpertState& state, const ReplicaSet& set,
                                       const Replica* exclude) const;
  // Starts the next attempt of each of `slots` on `replica`: one stream
  // request carrying them all, or (unary) one call per slot.
  void StartAttempts(const std::shared_ptr<LayerCall>& call, const std::vector<size_t>& slots,
                     std::shared_ptr<Replica> replica);
  // Completes an attempt that its caller has claimed (CallSlot::Claim): on OK
  // decodes `reply` into the batch output; retries or counts the slot done.
  // `frame_tail`: the tail of the version 2 frame `reply` came in, which its
  // output may point into.
  void OnAttemptDone(const std::shared_ptr<LayerCall>& call, size_t slot, int attempt,
                     grpc::Status status, const v1::ForwardResponse* reply,
                     std::optional<std::string_view> frame_tail = std::nullopt);
  // Starts attempt `ref` as a unary Forward call of `request` on `replica`.
  void SendUnary(const AttemptRef& ref, Replica* replica,
                 std::unique_ptr<v1::ForwardRequest> request);
  // A stream request still unanswered when its stream ended.
  struct Unanswered {
    std::vector<AttemptRef> refs;  // by batch
    std::shared_ptr<v1::ForwardStreamRequest> request;
  };
  // A stream to `replica` ended with `status`, `unanswered` still in flight
  // on it: fails them (UNAVAILABLE, naming the stream), or, when the shard
  // does not implement ForwardStream, sends them as unary calls and keeps the
  // replica on unary calls.
  void OnStreamEnded(Replica* replica, std::vector<Unanswered> unanswered,
                     const grpc::Status& status);
  // Completes each of `refs` whose attempt is still open with `status`.
  void FailAttempts(const std::vector<AttemptRef>& refs, const grpc::Status& status);
  // Completes the attempts of `refs` from the results of a stream reply.
  void OnStreamReply(const std::vector<AttemptRef>& refs, const v1::ForwardStreamResponse& reply,
                     std::optional<std::string_view> frame_tail = std::nullopt);
  // The rows a version 2 request frame carries after its message: each
  // batch's [rows, D] input, encoded as `dtype` at `offset` of the tail.
  struct FrameTailRows {
    struct Batch {
      const float* input;
      int64_t rows;
      v1::DType dtype;
      size_t offset;
    };
    std::vector<Batch> batches;
    size_t bytes = 0;
  };
  // Waits until every slot of `call` is done, reading the replies of its
  // frame requests and failing stream and frame attempts whose deadline
  // passed (DEADLINE_EXCEEDED) so that no call waits past its budget.
  void AwaitLayer(const std::shared_ptr<LayerCall>& call);
  // A connection to `replica`'s frame socket whose greeting matched; asks
  // the shard (GetShardInfo) for a new endpoint when the known one fails.
  absl::StatusOr<rpc::FrameSocket> DialFrames(Replica& replica, absl::Time deadline);
  // Sends `request` (its id set here) for the attempts `refs` on a frame
  // connection to `replica` (an idle one, else a new one), for AwaitLayer
  // to read the reply: a version 2 frame with `tail` after the message
  // where it is given, else version 1. False when no connection could take
  // it (nothing sent; the replica then uses gRPC for a while, see above).
  bool SendFrames(const std::shared_ptr<LayerCall>& call, const std::vector<AttemptRef>& refs,
                  const std::shared_ptr<Replica>& replica, v1::ForwardStreamRequest& request,
                  const FrameTailRows* tail, absl::Time deadline);
  // Reads the reply `wait` awaits (its socket is readable) and completes its
  // attempts; a broken connection fails them UNAVAILABLE (retryable).
  void ReadFrameReply(FrameWait& wait, absl::Time deadline);
  // The outcome of slot `slot` once its attempts are done.
  absl::Status BatchResult(const LayerCall& call, size_t slot) const;

  const ModelConfig config_;
  const RemoteExpertOptions options_;
  const std::string config_fingerprint_;
  // Set once by Connect, before any other call.
  std::string checkpoint_dir_;
  std::vector<std::string> local_fingerprints_;        // by expert; empty strings: no weight check
  std::vector<std::unique_ptr<ExpertState>> experts_;  // indexed by expert; fixed size

  // Serializes ApplyTopology.
  std::mutex apply_mu_;
  // One channel per distinct live target, shared by the experts it serves.
  std::map<std::string, std::shared_ptr<Replica>> channels_;  // guarded by apply_mu_
  // Removed replicas, kept until no call holds them (then released by the
  // next ApplyTopology), so no channel is destroyed on one of its own
  // callback threads.
  std::vector<std::shared_ptr<Replica>> retired_;  // guarded by apply_mu_
  // RowsIndependentOfCount; written under apply_mu_.
  std::atomic<bool> rows_independent_of_count_{false};
  // Attempts per target ever used; a target that comes back keeps counting.
  mutable std::mutex calls_mu_;
  std::map<std::string, std::shared_ptr<std::atomic<uint64_t>>> calls_by_target_;  // calls_mu_
  // Unary calls started and whose callback state (ClientContext, so a
  // channel reference) gRPC has not freed yet: the destructor waits for
  // none, so the last channel reference is never dropped on a gRPC callback
  // thread (gRPC 1.51 frees the callback queue that thread is polling).
  std::mutex unary_mu_;
  std::condition_variable unary_cv_;
  int unary_in_flight_ = 0;  // guarded by unary_mu_
  std::atomic<uint64_t> next_frame_id_{1};
};

// Watches an `--experts @FILE` topology file and applies it to a backend when
// its content changes: it reads the file every poll_ms on its own thread; a
// file that does not parse, maps an expert to no replica, or names replicas
// that fail their check is logged (stderr) and ignored, and the current
// topology stays. A file that changes while it is being written is read
// again at the next poll, and so is one refused because a new replica did not
// answer (it may still be starting).
//
// Thread-safety: constructed and destroyed on one thread; the destructor
// stops the thread (waiting for a check in progress, at most
// connect_timeout_ms). `on_applied` runs on the watcher thread.
class ExpertTopologyFileWatcher {
 public:
  // What applying a topology read from the file means: by default
  // backend->ApplyTopology; the gateway passes ExpertDnsRefresher::SetConfigured
  // where it resolves dns:/// names itself (gateway/expert_dns.h).
  using ApplyFn = std::function<absl::StatusOr<std::string>(const ExpertTopology&)>;

  // `backend` must outlive the watcher. `applied_content` is the file's
  // bytes that the current topology came from (ParseExpertTopologyFile's
  // `content`), so a change written between that read and this watcher's
  // first poll is applied too.
  ExpertTopologyFileWatcher(std::string path, std::string applied_content, int num_experts,
                            RemoteExpertBackend* backend, int poll_ms,
                            std::function<void(const ExpertTopology&)> on_applied,
                            ApplyFn apply = nullptr);
  ~ExpertTopologyFileWatcher() = default;

  // Reads the file once now (what the thread does each poll); returns
  // whether a new topology was applied. For tests and the thread.
  bool PollOnce();
  // Topology changes applied and files refused so far.
  int applied() const { return applied_.load(); }
  int refused() const { return refused_.load(); }

 private:
  const std::string path_;
  const int num_experts_;
  RemoteExpertBackend* const backend_;
  const std::function<void(const ExpertTopology&)> on_applied_;
  const ApplyFn apply_;
  std::mutex poll_mu_;        // one PollOnce at a time
  std::string last_content_;  // guarded by poll_mu_
  std::atomic<int> applied_{0};
  std::atomic<int> refused_{0};
  std::unique_ptr<PeriodicThread> thread_;  // last: stops before the rest goes
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_REMOTE_EXPERT_BACKEND_H_
