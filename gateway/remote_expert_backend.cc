#include "gateway/remote_expert_backend.h"

#include <poll.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <fstream>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/checkpoint.h"
#include "core/fingerprint.h"
#include "core/host_port.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "rpc/frame_socket.h"
#include "rpc/status.h"
#include "rpc/tensor_codec.h"

namespace switchyard {
namespace {

constexpr char kRoundRobinServiceConfig[] = R"({"loadBalancingConfig":[{"round_robin":{}}]})";

int64_t NowMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string StatusText(const grpc::Status& s) {
  return absl::StrCat(rpc::GrpcCodeName(s.error_code()), ": ", s.error_message());
}

// A failure another replica may not have. CANCELLED counts: the gateway never
// cancels its own expert calls, so it comes from the server, whose shutdown
// cancels calls it had received but not yet started. Forward is idempotent.
bool IsRetryable(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::UNAVAILABLE ||
         s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
         s.error_code() == grpc::StatusCode::CANCELLED;
}

// Whether gRPC may resolve `target` to several addresses, each its own
// subchannel under round_robin: a dns: name (a Kubernetes headless Service
// gives one address per ready pod) or an ipv4:/ipv6: list. A retry of a
// failed call on the same channel then goes to another address: the picker
// takes the next READY subchannel in turn, and a connection that broke
// leaves READY at once.
bool MayHaveSeveralAddresses(const std::string& target) {
  if (absl::StartsWith(target, "dns:")) return true;
  if (absl::StartsWith(target, "ipv4:") || absl::StartsWith(target, "ipv6:")) {
    return target.find(',') != std::string::npos;
  }
  return false;
}

// Every expert 0..num_experts-1 mapped, with at least one non-empty target.
absl::Status ValidateTopology(const ExpertTopology& topology, int num_experts,
                              const std::string& where) {
  std::vector<int> missing;
  for (int e = 0; e < num_experts; ++e) {
    auto it = topology.replicas.find(e);
    if (it == topology.replicas.end() || it->second.empty()) missing.push_back(e);
  }
  for (const auto& [e, targets] : topology.replicas) {
    if (e < 0 || e >= num_experts) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "expert ", e, " is out of range: the model has ", num_experts, " experts"));
    }
    for (const std::string& t : targets) {
      if (t.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "expert ", e, " has an empty replica target"));
      }
    }
  }
  if (!missing.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "no replica given for expert", missing.size() > 1 ? "s " : " ",
                     absl::StrJoin(missing, ", "), " (the model has ", num_experts, " experts)"));
  }
  return absl::OkStatus();
}

// The host a target's TLS certificate must name by default: HOST of
// "HOST:PORT", "localhost" for unix:PATH (as gRPC's authority), else the
// target itself (a name gRPC resolves).
std::string TargetHost(const std::string& target) {
  if (absl::StartsWith(target, "unix:")) return "localhost";
  absl::StatusOr<HostPort> hp = SplitHostPort(target);
  return hp.ok() ? hp->host : target;
}

// Where to dial the frame socket a shard at `target` offers ("" for none):
// a unix target's socket path, or the host of a HOST:PORT target with the
// shard's frame port. Other target forms (dns:///, ipv4: lists) stay on gRPC.
std::string FrameAddress(const std::string& target, const v1::ShardInfo& info) {
  if (absl::StartsWith(target, "unix:")) {
    return info.frame_unix_path().empty() ? "" : absl::StrCat("unix:", info.frame_unix_path());
  }
  if (info.frame_port() == 0 || absl::StrContains(target, "://") ||
      absl::StartsWith(target, "dns:") || absl::StartsWith(target, "ipv4:") ||
      absl::StartsWith(target, "ipv6:")) {
    return "";
  }
  const size_t colon = target.rfind(':');
  if (colon == std::string::npos || colon == 0) return "";
  return absl::StrCat(target.substr(0, colon), ":", info.frame_port());
}

absl::StatusOr<int> ParseExpertIndex(const std::string& text, const std::string& where) {
  int e;
  if (!absl::SimpleAtoi(text, &e)) {
    return absl::InvalidArgumentError(absl::StrCat(where, "'", text, "' is not an expert index"));
  }
  return e;
}

// The file's bytes; nullopt when it cannot be read (being replaced, say).
std::optional<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<ExpertTopology> ParseExpertTopology(std::string_view spec, int num_experts) {
  const std::string where = "expert topology: ";
  ExpertTopology topology;
  for (absl::string_view raw_entry : absl::StrSplit(std::string(spec), ';')) {
    const std::string entry(absl::StripAsciiWhitespace(raw_entry));
    if (entry.empty()) continue;  // allows a trailing ';'
    const size_t eq = entry.find('=');
    if (eq == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "entry '", entry, "' is not EXPERT=TARGET[|TARGET...]"));
    }
    SY_ASSIGN_OR_RETURN(
        const int e, ParseExpertIndex(std::string(absl::StripAsciiWhitespace(entry.substr(0, eq))),
                                      absl::StrCat(where, "entry '", entry, "': ")));
    if (topology.replicas.count(e)) {
      return absl::InvalidArgumentError(absl::StrCat(where, "expert ", e, " is mapped twice"));
    }
    std::vector<std::string>& targets = topology.replicas[e];
    for (absl::string_view raw_target : absl::StrSplit(entry.substr(eq + 1), '|')) {
      const std::string target(absl::StripAsciiWhitespace(raw_target));
      if (target.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "entry '", entry, "' has an empty replica target"));
      }
      targets.push_back(target);
    }
  }
  SY_RETURN_IF_ERROR(ValidateTopology(topology, num_experts, where));
  return topology;
}

absl::StatusOr<ExpertTopology> ParseExpertTopologyFile(const std::string& path, int num_experts,
                                                       std::string* content) {
  std::optional<std::string> bytes = ReadWholeFile(path);
  if (!bytes.has_value()) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open expert topology file"));
  }
  absl::StatusOr<ExpertTopology> topology = ParseExpertTopologyJson(*bytes, path, num_experts);
  if (content != nullptr) *content = *std::move(bytes);
  return topology;
}

absl::StatusOr<ExpertTopology> ParseExpertTopologyJson(std::string_view json,
                                                       const std::string& path, int num_experts) {
  const std::string where = absl::StrCat(path, ": ");
  const nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, "not a valid JSON object"));
  }
  auto experts = j.find("experts");
  if (experts == j.end() || !experts->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, "missing 'experts' object"));
  }
  ExpertTopology topology;
  for (const auto& [key, value] : experts->items()) {
    SY_ASSIGN_OR_RETURN(const int e, ParseExpertIndex(key, absl::StrCat(where, "key ")));
    if (topology.replicas.count(e)) {
      return absl::InvalidArgumentError(absl::StrCat(where, "expert ", e, " is mapped twice"));
    }
    std::vector<std::string>& targets = topology.replicas[e];
    if (value.is_string()) {
      targets.push_back(value.get<std::string>());
    } else if (value.is_array()) {
      for (const auto& t : value) {
        if (!t.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, "expert ", key, ": replica targets must be strings"));
        }
        targets.push_back(t.get<std::string>());
      }
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "expert ", key, ": expected a target string or an array of them"));
    }
  }
  SY_RETURN_IF_ERROR(ValidateTopology(topology, num_experts, where));
  return topology;
}

absl::StatusOr<ExpertTopology> LoadExpertTopology(const std::string& spec_or_path,
                                                  int num_experts) {
  struct stat st;
  if (stat(spec_or_path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
    return ParseExpertTopologyFile(spec_or_path, num_experts);
  }
  return ParseExpertTopology(spec_or_path, num_experts);
}

std::string FormatExpertTopology(const ExpertTopology& topology) {
  std::vector<std::string> entries;
  for (const auto& [e, targets] : topology.replicas) {
    entries.push_back(absl::StrCat(e, "=", absl::StrJoin(targets, "|")));
  }
  return absl::StrJoin(entries, ";");
}

// ---------------------------------------------------------------------------

// One ForwardStream to one replica, shared by every call to it. Requests are
// written one at a time (the reactor allows one write in flight); a read is
// always posted, so a broken stream ends (OnDone) at once. Its replica holds
// it until OnDone has run and releases it on a thread of its own (never on a
// gRPC callback thread: see Replica::CloseStream); a Send while it ends is
// parked for OnDone to answer; after OnDone, Send refuses and the replica
// opens a new stream.
class RemoteExpertBackend::Stream final
    : public grpc::ClientBidiReactor<v1::ForwardStreamRequest, v1::ForwardStreamResponse> {
 public:
  Stream(RemoteExpertBackend* backend, Replica* replica) : backend_(backend), replica_(replica) {}

  // Binds the call to `stub`: once, right after make_shared, before anyone
  // else can Send (this gRPC's StartWrite needs the call bound).
  void Bind(v1::ExpertService::Stub* stub) { stub->async()->ForwardStream(&context_, this); }
  // Starts the bound call (Sends may come before: gRPC holds them until then).
  // Sends come from threads outside this stream's reactions, so a hold keeps
  // gRPC from ending the call (and running OnDone) until OnReadDone(false)
  // has closed Send: without it a Send could start a write on a call gRPC
  // had already torn down.
  void Start() {
    AddHold();
    StartRead(&read_);
    StartCall();
  }

  // Sends `request` (its id is set here) for the attempts `refs`, one per
  // batch in order. False when the stream has ended: nothing was sent.
  bool Send(std::shared_ptr<v1::ForwardStreamRequest> request, std::vector<AttemptRef> refs) {
    std::unique_lock<std::mutex> lock(mu_);
    // Once OnDone has taken the pending requests the caller decides (the
    // replica's use_stream already says whether the stream was unimplemented).
    if (collected_) return false;
    const uint64_t id = next_id_++;
    request->set_id(id);
    // Ending but OnDone not run yet: parked unsent, OnDone answers it with the
    // stream's outcome (unary calls if the shard lacks ForwardStream, else a
    // retryable failure), as it does the requests in flight.
    if (ended_) {
      pending_.emplace(id, Unanswered{std::move(refs), std::move(request)});
      return true;
    }
    writes_.push_back(request);
    pending_.emplace(id, Unanswered{std::move(refs), std::move(request)});
    if (writing_) return true;
    writing_ = true;
    // The write starts outside mu_ (its completion, OnWriteDone, takes mu_ on
    // a gRPC thread that would otherwise wake only to block on it), but
    // counted: OnReadDone(false) leaves the hold to the last Send still
    // starting a write, so gRPC cannot tear the call down under it.
    ++starting_writes_;
    const v1::ForwardStreamRequest* first = writes_.front().get();
    lock.unlock();
    StartWrite(first);
    lock.lock();
    const bool release = --starting_writes_ == 0 && hold_left_to_send_;
    if (release) hold_left_to_send_ = false;
    lock.unlock();
    if (release) RemoveHold();
    return true;
  }

  bool ended() const {
    std::lock_guard<std::mutex> lock(mu_);
    return ended_;
  }
  // OnDone has run: gRPC is done with the stream and so is this object.
  bool done() const {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }

  // Cancels the stream and waits until OnDone has run (its pending attempts
  // failed). Not from one of this stream's own callbacks.
  void Close() {
    context_.TryCancel();
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return done_; });
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    writes_.pop_front();
    // A failed write means the stream broke: OnDone follows (the posted read
    // fails too) and fails every pending attempt, the unsent ones included.
    if (!ok) writes_.clear();
    if (writes_.empty()) {
      writing_ = false;
      return;
    }
    const v1::ForwardStreamRequest* next = writes_.front().get();
    lock.unlock();
    StartWrite(next);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the stream ended: no more Sends; OnDone follows with the status
      bool release;
      {
        std::lock_guard<std::mutex> lock(mu_);
        ended_ = true;
        // A Send between its check and the end of its StartWrite releases
        // the hold when it is done (see Send).
        release = starting_writes_ == 0;
        hold_left_to_send_ = !release;
      }
      if (release) RemoveHold();
      return;
    }
    std::vector<AttemptRef> refs;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pending_.find(read_.id());
      if (it != pending_.end()) {
        refs = std::move(it->second.refs);
        pending_.erase(it);
      }
    }
    if (!refs.empty()) backend_->OnStreamReply(refs, read_);
    read_.Clear();
    StartRead(&read_);
  }

  void OnDone(const grpc::Status& status) override {
    // Before collecting: a Send refused from here on must see the fallback.
    if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED) MarkUnimplemented();
    std::vector<Unanswered> unanswered;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ended_ = true;
      collected_ = true;
      for (auto& [id, entry] : pending_) unanswered.push_back(std::move(entry));
      pending_.clear();
      writes_.clear();
    }
    backend_->OnStreamEnded(replica_, std::move(unanswered), status);
    // No reference is dropped here: the replica holds the stream until it
    // sees done_ (see Replica::GetStream).
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    done_cv_.notify_all();
  }

 private:
  RemoteExpertBackend* const backend_;
  Replica* const replica_;  // outlives the stream (~Replica closes and releases it)
  grpc::ClientContext context_;
  v1::ForwardStreamResponse read_;  // only touched by the read chain

  mutable std::mutex mu_;
  std::condition_variable done_cv_;
  uint64_t next_id_ = 1;                                          // guarded by mu_
  std::map<uint64_t, Unanswered> pending_;                        // guarded by mu_
  std::deque<std::shared_ptr<v1::ForwardStreamRequest>> writes_;  // front: being written
  bool writing_ = false;                                          // guarded by mu_
  bool ended_ = false;                                            // guarded by mu_
  bool done_ = false;                                             // OnDone finished; mu_
  int starting_writes_ = 0;         // Sends inside StartWrite; guarded by mu_
  bool hold_left_to_send_ = false;  // the read chain ended during one; mu_
  bool collected_ = false;          // OnDone took pending_; mu_

  // The replica's calls go unary from now on (defined after Replica).
  void MarkUnimplemented();
};

struct RemoteExpertBackend::Replica {
  std::string target;
  // The name its certificate must carry (TLS): ExpertTopology::tls_names.
  std::string tls_name;
  // The target may stand for several addresses (MayHaveSeveralAddresses).
  bool several_addresses = false;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::ExpertService::Stub> stub;
  // Until this time (NowMicros) the replica is passed over when another one
  // can take the call: it just failed with a retryable status. A cut
  // link sends no reset, so the channel alone would keep looking healthy.
  std::atomic<int64_t> avoid_until_micros{0};
  // Forward attempts sent to this target and not yet completed, over every
  // expert it serves: the load PickReplica balances.
  std::atomic<int> outstanding{0};
  // Attempts ever sent to this target (shared with calls_by_target_).
  std::shared_ptr<std::atomic<uint64_t>> calls;
  // Calls go on a ForwardStream: the shard serves it (its ShardInfo said so),
  // the backend's use_stream is on and the target is one address.
  std::atomic<bool> use_stream{false};
  // Hidden states go as BF16 (RemoteExpertOptions::bf16_inputs_to_bf16_shards).
  std::atomic<bool> bf16_inputs{false};
  // Its ShardInfo's rows_independent_of_count.
  std::atomic<bool> rows_independent_of_count{false};
  // Calls go on the shard's frame socket (RemoteExpertOptions::use_frames).
  std::atomic<bool> use_frames{false};
  // Until this time (NowMicros) calls skip the frame socket: the last dial
  // failed, so they go on gRPC meanwhile.
  std::atomic<int64_t> frames_retry_after_micros{0};
  // Dials failed in a row: each doubles the wait before the next (a
  // firewalled port costs a dial timeout per try).
  std::atomic<int> frames_failures{0};
  // The first failure to use the frame socket was logged.
  std::atomic<bool> frames_warned{false};

  // The newest frame version the shard reads (ShardInfo.frame_version):
  // 2 sends the rows after the message (rpc/frame_socket.h).
  std::atomic<int> frame_version{1};

  // Where the frame socket is, what its greeting must say, and its version.
  void SetFrameEndpoint(std::string address, std::string token, uint32_t version) {
    std::lock_guard<std::mutex> lock(frame_mu);
    frame_address = std::move(address);
    frame_token = std::move(token);
    frame_version.store(static_cast<int>(std::min<uint32_t>(version, rpc::kFrameVersion)),
                        std::memory_order_relaxed);
  }
  std::pair<std::string, std::string> FrameEndpoint() const {
    std::lock_guard<std::mutex> lock(frame_mu);
    return {frame_address, frame_token};
  }
  // An idle frame connection, or an invalid socket if there is none.
  rpc::FrameSocket TakeIdleFrame() {
    std::lock_guard<std::mutex> lock(frame_mu);
    if (idle_frames.empty()) return rpc::FrameSocket();
    rpc::FrameSocket socket = std::move(idle_frames.back());
    idle_frames.pop_back();
    return socket;
  }
  // Keeps a connection whose last reply was read whole for the next call
  // (a few; more are closed).
  void ReturnFrame(rpc::FrameSocket socket) {
    std::lock_guard<std::mutex> lock(frame_mu);
    if (idle_frames.size() < 16) idle_frames.push_back(std::move(socket));
  }

  // The live stream, opened if there is none or the last one ended.
  std::shared_ptr<Stream> GetStream(RemoteExpertBackend* backend) {
    std::shared_ptr<Stream> opened;
    std::vector<std::shared_ptr<Stream>> finished;  // released after the lock
    {
      std::lock_guard<std::mutex> lock(stream_mu);
      if (stream != nullptr && !stream->ended()) return stream;
      // An ended stream stays here until its OnDone has run, so that a
      // stream is never released (and its ClientContext's channel reference
      // never dropped) on a gRPC callback thread by the stream itself.
      if (stream != nullptr) ended.push_back(std::move(stream));
      for (auto& s : ended) {
        if (s->done()) finished.push_back(std::move(s));
      }
      ended.erase(std::remove(ended.begin(), ended.end(), nullptr), ended.end());
      stream = std::make_shared<Stream>(backend, this);
      stream->Bind(stub.get());
      opened = stream;
    }
    opened->Start();
    return opened;
  }
  // Ends the streams, the live one and those still ending, waiting for each
  // OnDone, and releases them on this thread (before the channel goes).
  // gRPC 1.51 runs callbacks on threads polling a callback CQ that the last
  // channel's destruction shuts down and frees: a channel destroyed on one
  // of those threads leaves it polling a freed CQ (a double free).
  void CloseStream() {
    std::vector<std::shared_ptr<Stream>> streams;
    {
      std::lock_guard<std::mutex> lock(stream_mu);
      streams = std::move(ended);
      ended.clear();
      if (stream != nullptr) streams.push_back(std::move(stream));
    }
    for (auto& s : streams) s->Close();
  }
  ~Replica() { CloseStream(); }

 private:
  std::mutex stream_mu;
  std::shared_ptr<Stream> stream;              // guarded by stream_mu
  std::vector<std::shared_ptr<Stream>> ended;  // guarded by stream_mu; OnDone pending
  mutable std::mutex frame_mu;
  std::string frame_address;                  // guarded by frame_mu
  std::string frame_token;                    // guarded by frame_mu
  std::vector<rpc::FrameSocket> idle_frames;  // guarded by frame_mu
};

void RemoteExpertBackend::Stream::MarkUnimplemented() { replica_->use_stream.store(false); }

// One expert's replicas at one moment; never changed once published, so a
// call can use it without a lock while ApplyTopology publishes the next.
struct RemoteExpertBackend::ReplicaSet {
  std::vector<std::shared_ptr<Replica>> replicas;
  // A failed call can be retried elsewhere: several replicas, or one target
  // with several addresses.
  bool can_retry = false;
};

struct RemoteExpertBackend::ExpertState {
  int expert = 0;
  mutable std::atomic<uint64_t> next{0};  // tie-breaking cursor
  RemoteExpertCounters counters;

  std::shared_ptr<const ReplicaSet> Snapshot() const {
    std::lock_guard<std::mutex> lock(mu);
    return set;
  }
  void Publish(std::shared_ptr<const ReplicaSet> next_set) {
    std::lock_guard<std::mutex> lock(mu);
    set = std::move(next_set);
  }

 private:
  mutable std::mutex mu;
  std::shared_ptr<const ReplicaSet> set;  // guarded by mu; never null after Connect
};

// One batch's call: up to two attempts (the first and one retry).
struct RemoteExpertBackend::CallSlot {
  static constexpr int kMaxAttempts = 2;
  int expert = 0;
  int tokens = 0;
  const float* input = nullptr;  // the caller's rows, encoded at each attempt
  float* output = nullptr;       // the caller's buffer, decoded into on success
  // Attempts started; guarded by LayerCall::mu.
  int attempts = 0;
  // Held until the slot is done: a replica removed meanwhile stays open for it.
  std::array<std::shared_ptr<Replica>, kMaxAttempts> replica;
  std::array<grpc::Status, kMaxAttempts> statuses;
  std::array<int64_t, kMaxAttempts> start_micros{};
  // Per attempt, written under LayerCall::mu when it starts: its deadline and
  // whether it went on a stream (whose deadline AwaitLayer enforces).
  std::array<std::chrono::system_clock::time_point, kMaxAttempts> deadline{};
  std::array<bool, kMaxAttempts> on_stream{};
  // ... and whether it went on a frame socket (AwaitLayer reads its reply).
  std::array<bool, kMaxAttempts> on_frames{};
  // Set by whoever completes the attempt first (reply, stream end, deadline);
  // the others leave it alone.
  std::array<std::atomic<bool>, kMaxAttempts> claimed{};
  // A reply that did not decode (no retry).
  absl::Status bad_output;

  bool Claim(int attempt) { return !claimed[attempt].exchange(true, std::memory_order_acq_rel); }
};

// One request sent on a frame connection, awaiting its reply.
struct RemoteExpertBackend::FrameWait {
  std::shared_ptr<Replica> replica;
  rpc::FrameSocket socket;
  uint64_t id = 0;
  std::vector<AttemptRef> refs;  // by batch
  bool open = true;              // reply not read yet (or the socket given up)
};

// Everything one RunLayer shares with its callbacks; callbacks hold it by
// shared_ptr so it outlives the last of them.
struct RemoteExpertBackend::LayerCall {
  int layer = 0;
  // Every attempt of this layer ends by this time: the step's expert budget.
  std::chrono::system_clock::time_point deadline;
  std::vector<CallSlot> slots;
  std::mutex mu;
  std::condition_variable done_cv;  // a slot finished or an attempt started
  size_t pending = 0;               // guarded by mu
  // Frame requests sent and not yet answered; their replies are read by the
  // thread in AwaitLayer. Appended under mu; each one's fields are then only
  // touched by that thread. Cleared when the layer ends (its refs point
  // back here).
  std::vector<std::unique_ptr<FrameWait>> frame_waits;
};

RemoteExpertBackend::RemoteExpertBackend(const ModelConfig& config,
                                         const RemoteExpertOptions& options)
    : config_(config), options_(options), config_fingerprint_(config.Fingerprint()) {}

RemoteExpertBackend::~RemoteExpertBackend() {
  // Streams first: their callbacks use this backend.
  {
    std::lock_guard<std::mutex> lock(apply_mu_);
    for (auto& [target, replica] : channels_) replica->CloseStream();
    for (auto& replica : retired_) replica->CloseStream();
  }
  // Then unary calls (the fallback transport): each ends by its deadline at
  // the latest; while any is open the replicas, and so their channels, stay.
  std::unique_lock<std::mutex> lock(unary_mu_);
  unary_cv_.wait(lock, [this] { return unary_in_flight_ == 0; });
}

namespace {

// Checks that `topology` maps every expert and that `options` are usable.
absl::Status ValidateConnectArgs(const ExpertTopology& topology, int num_experts,
                                 const RemoteExpertOptions& options) {
  SY_RETURN_IF_ERROR(ValidateTopology(topology, num_experts, "expert topology: "));
  if (options.wire_dtype != v1::DTYPE_F32 && options.wire_dtype != v1::DTYPE_BF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("remote experts: wire dtype must be F32 or BF16, got ",
                     v1::DType_Name(options.wire_dtype)));
  }
  if (options.call_deadline_ms <= 0 || options.connect_timeout_ms < 0) {
    return absl::InvalidArgumentError(
        "remote experts: call deadline must be > 0 ms and connect timeout >= 0 ms");
  }
  if (options.reply_spin_us < 0 || options.reply_spin_us > rpc::kMaxSpinUs) {
    return absl::InvalidArgumentError(absl::StrCat("remote experts: reply spin must be 0..",
                                                   rpc::kMaxSpinUs, " us, got ",
                                                   options.reply_spin_us));
  }
  return absl::OkStatus();
}

// The expert weights the gateway's own checkpoint folder holds, by expert (all
// empty when `checkpoint_dir` is empty).
absl::StatusOr<std::vector<std::string>> LocalExpertFingerprints(
    const ModelConfig& gateway_config, const std::string& checkpoint_dir) {
  const int num_experts = gateway_config.num_local_experts;
  std::vector<std::string> local_fingerprints(num_experts);
  if (checkpoint_dir.empty()) return local_fingerprints;
  std::vector<int> all(num_experts);
  for (int e = 0; e < num_experts; ++e) all[e] = e;
  SY_ASSIGN_OR_RETURN(auto checkpoint,
                      Checkpoint::Open(checkpoint_dir, WeightSelection::ExpertsOnly(all)));
  if (checkpoint->config().Fingerprint() != gateway_config.Fingerprint()) {
    return absl::FailedPreconditionError(
        absl::StrCat("remote experts: the checkpoint at ", checkpoint_dir, " has config ",
                     checkpoint->config().Fingerprint(), " but the gateway runs config ",
                     gateway_config.Fingerprint()));
  }
  for (int e = 0; e < num_experts; ++e) {
    SY_ASSIGN_OR_RETURN(local_fingerprints[e], ExpertWeightsFingerprint(*checkpoint, e));
  }
  return local_fingerprints;
}

// Arguments of every expert channel: keepalive, reconnect backoff, message
// size limits and round_robin over a name's addresses.
grpc::ChannelArguments ExpertChannelArguments(const RemoteExpertOptions& options) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, options.keepalive_time_ms);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, options.max_reconnect_backoff_ms);
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  // Spreads calls over every address a DNS name resolves to.
  args.SetServiceConfigJSON(kRoundRobinServiceConfig);
  return args;
}

// Checks that the replica described by `info` (named `at`) serves `expert` of
// the gateway's model: config fingerprint, dims, the expert, all layers, and
// (when `checkpoint_dir` is set) the same expert weights.
absl::Status CheckShardInfo(const v1::ShardInfo& info, int expert, const std::string& at,
                            const ModelConfig& c, const std::string& want_config,
                            const std::string& checkpoint_dir,
                            const std::string& local_fingerprint) {
  const int e = expert;
  if (info.config_fingerprint() != want_config) {
    return absl::FailedPreconditionError(absl::StrCat(
        at, " serves model ", info.config_fingerprint(), " but the gateway loaded ", want_config));
  }
  const v1::ModelDims& d = info.dims();
  if (d.hidden_size() != static_cast<uint32_t>(c.hidden_size) ||
      d.intermediate_size() != static_cast<uint32_t>(c.intermediate_size) ||
      d.num_layers() != static_cast<uint32_t>(c.num_hidden_layers) ||
      d.num_experts() != static_cast<uint32_t>(c.num_local_experts) ||
      d.experts_per_token() != static_cast<uint32_t>(c.num_experts_per_tok)) {
    return absl::FailedPreconditionError(absl::StrCat(
        at, " has dims hidden=", d.hidden_size(), " ffn=", d.intermediate_size(),
        " layers=", d.num_layers(), " experts=", d.num_experts(), " top_k=", d.experts_per_token(),
        " but the gateway has hidden=", c.hidden_size, " ffn=", c.intermediate_size, " layers=",
        c.num_hidden_layers, " experts=", c.num_local_experts, " top_k=", c.num_experts_per_tok));
  }
  if (std::find(info.experts().begin(), info.experts().end(), static_cast<uint32_t>(e)) ==
      info.experts().end()) {
    return absl::FailedPreconditionError(absl::StrCat(at, " is wrong: that replica holds experts [",
                                                      absl::StrJoin(info.experts(), ", "), "] not ",
                                                      e));
  }
  if (info.layer_begin() != 0 || info.layer_end() != static_cast<uint32_t>(c.num_hidden_layers)) {
    return absl::FailedPreconditionError(
        absl::StrCat(at, " holds layers [", info.layer_begin(), ", ", info.layer_end(),
                     ") but the gateway needs all layers [0, ", c.num_hidden_layers, ")"));
  }
  if (!checkpoint_dir.empty()) {
    auto fp = info.expert_weight_fingerprints().find(static_cast<uint32_t>(e));
    const std::string remote =
        fp == info.expert_weight_fingerprints().end() ? "(none)" : fp->second;
    if (remote != local_fingerprint) {
      return absl::FailedPreconditionError(absl::StrCat(
          at, " has expert weights ", remote, " but the gateway's checkpoint ", checkpoint_dir,
          " has ", local_fingerprint, " (different checkpoint or dtype)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

// One GetShardInfo call to one replica.
struct RemoteExpertBackend::ShardInfoCall {
  grpc::ClientContext context;
  v1::ShardInfo info;
  grpc::Status status;
};

absl::StatusOr<std::unique_ptr<RemoteExpertBackend>> RemoteExpertBackend::Connect(
    const ExpertTopology& topology, const ModelConfig& gateway_config,
    const std::string& checkpoint_dir, const RemoteExpertOptions& options) {
  SY_RETURN_IF_ERROR(ValidateConnectArgs(topology, gateway_config.num_local_experts, options));
  SY_ASSIGN_OR_RETURN(const std::vector<std::string> local_fingerprints,
                      LocalExpertFingerprints(gateway_config, checkpoint_dir));
  auto backend =
      std::unique_ptr<RemoteExpertBackend>(new RemoteExpertBackend(gateway_config, options));
  backend->checkpoint_dir_ = checkpoint_dir;
  backend->local_fingerprints_ = local_fingerprints;
  for (int e = 0; e < gateway_config.num_local_experts; ++e) {
    auto state = std::make_unique<ExpertState>();
    state->expert = e;
    state->Publish(std::make_shared<ReplicaSet>());
    backend->experts_.push_back(std::move(state));
  }
  SY_RETURN_IF_ERROR(backend->ApplyTopology(topology).status());
  return backend;
}

std::shared_ptr<RemoteExpertBackend::Replica> RemoteExpertBackend::OpenReplica(
    const std::string& target, const std::string& tls_name) {
  const auto credentials =
      options_.credentials ? options_.credentials : grpc::InsecureChannelCredentials();
  auto replica = std::make_shared<Replica>();
  replica->target = target;
  replica->tls_name = tls_name.empty() ? TargetHost(target) : tls_name;
  replica->several_addresses = MayHaveSeveralAddresses(target);
  grpc::ChannelArguments args = ExpertChannelArguments(options_);
  // An address standing for a name: gRPC checks the certificate for the
  // name (and sends it as SNI) as it would had it dialled the name.
  if (options_.credentials != nullptr && !tls_name.empty()) {
    args.SetSslTargetNameOverride(tls_name);
  }
  replica->channel = grpc::CreateCustomChannel(target, credentials, args);
  replica->stub = v1::ExpertService::NewStub(replica->channel);
  std::lock_guard<std::mutex> lock(calls_mu_);
  auto& calls = calls_by_target_[target];
  if (calls == nullptr) calls = std::make_shared<std::atomic<uint64_t>>(0);
  replica->calls = calls;
  return replica;
}

absl::StatusOr<std::string> RemoteExpertBackend::ApplyTopology(const ExpertTopology& topology) {
  SY_RETURN_IF_ERROR(ValidateTopology(topology, config_.num_local_experts, "expert topology: "));
  std::lock_guard<std::mutex> lock(apply_mu_);
  // Close the channels of removed replicas no call holds any more (nothing
  // else can take a new reference to them).
  retired_.erase(
      std::remove_if(retired_.begin(), retired_.end(),
                     [](const std::shared_ptr<Replica>& r) { return r.use_count() == 1; }),
      retired_.end());
  // The next sets, reusing live channels; new ones are opened but not yet
  // published, so a failed check leaves everything as it was.
  std::map<std::string, std::shared_ptr<Replica>> next_channels;
  std::vector<std::shared_ptr<const ReplicaSet>> next_sets;
  std::vector<NewPair> new_pairs;
  std::vector<std::string> changes;
  for (const auto& state : experts_) {
    const int e = state->expert;
    const std::shared_ptr<const ReplicaSet> current = state->Snapshot();
    std::set<std::string> current_targets;
    for (const auto& r : current->replicas) current_targets.insert(r->target);
    auto next = std::make_shared<ReplicaSet>();
    std::set<std::string> next_targets;
    std::vector<std::string> added;
    for (const std::string& target : topology.replicas.at(e)) {
      if (!next_targets.insert(target).second) continue;  // listed twice: one replica
      std::shared_ptr<Replica>& replica = next_channels[target];
      if (replica == nullptr) {
        auto live = channels_.find(target);
        if (live != channels_.end()) {
          replica = live->second;
        } else {
          const auto name = topology.tls_names.find(target);
          replica = OpenReplica(target, name == topology.tls_names.end() ? "" : name->second);
        }
      }
      next->replicas.push_back(replica);
      if (!current_targets.count(target)) {
        new_pairs.emplace_back(e, replica);
        added.push_back(absl::StrCat("+", target));
      }
    }
    for (const std::string& target : current_targets) {
      if (!next_targets.count(target)) added.push_back(absl::StrCat("-", target));
    }
    next->can_retry = next->replicas.size() > 1 || next->replicas[0]->several_addresses;
    if (!added.empty())
      changes.push_back(absl::StrCat("expert ", e, ": ", absl::StrJoin(added, " ")));
    next_sets.push_back(std::move(next));
  }
  SY_RETURN_IF_ERROR(CheckPairs(new_pairs));
  bool rows_independent = !next_channels.empty();
  for (const auto& [target, replica] : next_channels) {
    rows_independent = rows_independent && replica->rows_independent_of_count.load();
  }
  // Cleared before a replica that needs small batches can take calls, set
  // only once every live one can take any.
  if (!rows_independent) rows_independent_of_count_.store(false);
  for (size_t e = 0; e < experts_.size(); ++e) experts_[e]->Publish(std::move(next_sets[e]));
  rows_independent_of_count_.store(rows_independent);
  for (auto& [target, replica] : channels_) {
    if (!next_channels.count(target)) retired_.push_back(std::move(replica));
  }
  channels_ = std::move(next_channels);
  return absl::StrJoin(changes, "; ");
}

ExpertTopology RemoteExpertBackend::topology() const {
  ExpertTopology topology;
  for (const auto& state : experts_) {
    std::vector<std::string>& targets = topology.replicas[state->expert];
    for (const auto& r : state->Snapshot()->replicas) targets.push_back(r->target);
  }
  return topology;
}

absl::Status RemoteExpertBackend::CheckPairs(const std::vector<NewPair>& pairs) const {
  // One GetShardInfo per distinct replica, all at once.
  std::map<const Replica*, std::unique_ptr<ShardInfoCall>> infos;
  std::map<const Replica*, std::vector<int>> mapped;  // replica -> experts, for messages
  for (const auto& [e, replica] : pairs) {
    infos[replica.get()];
    mapped[replica.get()].push_back(e);
  }
  if (infos.empty()) return absl::OkStatus();
  std::mutex mu;
  std::condition_variable cv;
  size_t pending = infos.size();
  const v1::GetShardInfoRequest info_request;
  const auto deadline =
      std::chrono::system_clock::now() + std::chrono::milliseconds(options_.connect_timeout_ms);
  for (auto& [replica, info] : infos) {
    info = std::make_unique<ShardInfoCall>();
    ShardInfoCall* call = info.get();
    call->context.set_wait_for_ready(true);
    call->context.set_deadline(deadline);
    replica->stub->async()->GetShardInfo(&call->context, &info_request, &call->info,
                                         [&, call](grpc::Status s) {
                                           call->status = std::move(s);
                                           std::lock_guard<std::mutex> lock(mu);
                                           if (--pending == 0) cv.notify_all();
                                         });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return pending == 0; });
  }
  // Targets that did not answer, with the experts mapped to them.
  std::vector<std::string> unreachable;
  for (const auto& [replica, info] : infos) {
    const grpc::Status& s = info->status;
    if (s.ok()) continue;
    const std::vector<int>& experts = mapped[replica];
    const std::string what = absl::StrCat(experts.size() == 1 ? "expert " : "experts ",
                                          absl::StrJoin(experts, ","), " at ", replica->target);
    if (!IsRetryable(s)) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": GetShardInfo failed: ", StatusText(s)));
    }
    unreachable.push_back(absl::StrCat(what, " (", StatusText(s), ")"));
  }
  if (!unreachable.empty()) {
    return absl::UnavailableError(absl::StrCat("no answer to GetShardInfo within ",
                                               options_.connect_timeout_ms, " ms from ",
                                               absl::StrJoin(unreachable, "; ")));
  }
  for (const auto& [replica, info] : infos) {
    const_cast<Replica*>(replica)->use_stream.store(
        options_.use_stream && !replica->several_addresses && info->info.forward_stream());
    const_cast<Replica*>(replica)->bf16_inputs.store(options_.bf16_inputs_to_bf16_shards &&
                                                     absl::EndsWith(info->info.backend(), "-bf16"));
    const_cast<Replica*>(replica)->rows_independent_of_count.store(
        info->info.rows_independent_of_count());
    // Frames: one address per target, and TLS on them where gRPC has it.
    const std::string frame_address = FrameAddress(replica->target, info->info);
    const_cast<Replica*>(replica)->SetFrameEndpoint(frame_address, info->info.frame_token(),
                                                    info->info.frame_version());
    const_cast<Replica*>(replica)->use_frames.store(
        options_.use_frames && (options_.credentials == nullptr || options_.frame_tls != nullptr) &&
        !replica->several_addresses && !frame_address.empty());
  }
  // Every (expert, replica) pair must serve this model and these weights.
  for (const auto& [e, replica] : pairs) {
    const std::string at = absl::StrCat("expert ", e, " at ", replica->target);
    SY_RETURN_IF_ERROR(CheckShardInfo(infos.at(replica.get())->info, e, at, config_,
                                      config_fingerprint_, checkpoint_dir_,
                                      local_fingerprints_[e]));
  }
  return absl::OkStatus();
}

std::shared_ptr<RemoteExpertBackend::Replica> RemoteExpertBackend::PickReplica(
    const ExpertState& state, const ReplicaSet& set, const Replica* exclude) const {
  const size_t n = set.replicas.size();
  if (n == 1) return set.replicas[0];
  // Least outstanding calls, so a slow or busy replica gets fewer and a new
  // one takes its share at once; ties go round-robin from a moving start.
  // Counts are read without a lock: a pick that races another may tie where
  // it would not have, which only costs balance, never correctness.
  const uint64_t start = state.next.fetch_add(1, std::memory_order_relaxed);
  const int64_t now = NowMicros();
  const auto least_loaded = [&](const auto& eligible) {
    const Replica* best = nullptr;
    size_t best_index = 0;
    int best_outstanding = 0;
    for (size_t i = 0; i < n; ++i) {
      const size_t index = (start + i) % n;
      const Replica* r = set.replicas[index].get();
      if (r == exclude || !eligible(*r)) continue;
      const int outstanding = r->outstanding.load(std::memory_order_relaxed);
      if (best == nullptr || outstanding < best_outstanding) {
        best = r;
        best_index = index;
        best_outstanding = outstanding;
      }
    }
    return best == nullptr ? -1 : static_cast<int>(best_index);
  };
  // Prefer a replica that has not failed lately and whose channel is not
  // known to be failing; then any other than `exclude`.
  int i = least_loaded([&](const Replica& r) {
    return r.avoid_until_micros.load(std::memory_order_relaxed) <= now &&
           r.channel->GetState(/*try_to_connect=*/false) != GRPC_CHANNEL_TRANSIENT_FAILURE;
  });
  if (i < 0) i = least_loaded([](const Replica&) { return true; });
  return set.replicas[i >= 0 ? static_cast<size_t>(i) : start % n];
}

void RemoteExpertBackend::StartAttempts(const std::shared_ptr<LayerCall>& call,
                                        const std::vector<size_t>& slots,
                                        std::shared_ptr<Replica> replica) {
  const v1::DType input_dtype =
      replica->bf16_inputs.load(std::memory_order_relaxed) ? v1::DTYPE_BF16 : options_.wire_dtype;
  bool frames = replica->use_frames.load(std::memory_order_relaxed) &&
                NowMicros() >= replica->frames_retry_after_micros.load(std::memory_order_relaxed);
  if (frames && options_.credentials != nullptr && options_.tls_frames_max_bytes > 0) {
    int64_t rows = 0;
    for (size_t slot : slots) rows += call->slots[slot].tokens;
    const int64_t bytes_per_row =
        int64_t{config_.hidden_size} *
        ((input_dtype == v1::DTYPE_BF16 ? 2 : 4) + (options_.wire_dtype == v1::DTYPE_BF16 ? 2 : 4));
    frames = rows * bytes_per_row <= options_.tls_frames_max_bytes;
  }
  const bool stream = frames || replica->use_stream.load(std::memory_order_relaxed);
  const auto now = std::chrono::system_clock::now();
  std::vector<AttemptRef> refs;
  auto latest_deadline = now;
  {
    std::lock_guard<std::mutex> lock(call->mu);
    for (size_t slot : slots) {
      CallSlot& s = call->slots[slot];
      const int attempt = s.attempts++;
      ExpertState& state = *experts_[s.expert];
      state.counters.calls.fetch_add(1, std::memory_order_relaxed);
      if (attempt > 0) state.counters.retries.fetch_add(1, std::memory_order_relaxed);
      replica->outstanding.fetch_add(1, std::memory_order_relaxed);
      replica->calls->fetch_add(1, std::memory_order_relaxed);
      s.replica[attempt] = replica;
      // With another replica (or address) to retry on, the first attempt gets
      // half of what is left of the layer's budget, so a retry still fits.
      auto deadline = call->deadline;
      if (attempt == 0 && state.Snapshot()->can_retry) deadline = now + (call->deadline - now) / 2;
      s.deadline[attempt] = deadline;
      s.on_stream[attempt] = stream;
      s.on_frames[attempt] = frames;
      s.start_micros[attempt] = NowMicros();
      latest_deadline = std::max(latest_deadline, deadline);
      refs.push_back({call, slot, attempt});
    }
  }
  // A retry started from a callback must be watched by AwaitLayer too.
  if (stream) call->done_cv.notify_all();
  // A version 2 frame carries the rows after the message, encoded there
  // when it is written; anything else carries them in the message.
  FrameTailRows tail;
  const bool frame_tail = frames && replica->frame_version.load(std::memory_order_relaxed) >= 2;
  const auto fill = [&](const CallSlot& s, v1::ForwardRequest* request) {
    request->set_layer(static_cast<uint32_t>(call->layer));
    request->set_expert(static_cast<uint32_t>(s.expert));
    request->set_config_fingerprint(config_fingerprint_);
    if (frame_tail) {
      rpc::DescribeMatrixInFrameTail(s.tokens, config_.hidden_size, input_dtype, tail.bytes,
                                     request->mutable_hidden_states());
      tail.batches.push_back({s.input, s.tokens, input_dtype, tail.bytes});
      tail.bytes += rpc::EncodedMatrixBytes(s.tokens, config_.hidden_size, input_dtype);
    } else {
      // Straight from the caller's rows into the message.
      rpc::EncodeMatrix(s.input, s.tokens, config_.hidden_size, input_dtype,
                        request->mutable_hidden_states());
    }
    request->set_output_dtype(options_.wire_dtype);
  };
  if (stream) {
    auto request = std::make_shared<v1::ForwardStreamRequest>();
    for (const AttemptRef& ref : refs) fill(call->slots[ref.slot], request->add_batches());
    request->set_timeout_micros(std::max<int64_t>(
        1, std::chrono::duration_cast<std::chrono::microseconds>(latest_deadline - now).count()));
    // The batches already encoded, as one unary call each.
    const auto send_unary = [&] {
      for (size_t i = 0; i < refs.size(); ++i) {
        SendUnary(refs[i], replica.get(),
                  std::make_unique<v1::ForwardRequest>(
                      std::move(*request->mutable_batches(static_cast<int>(i)))));
      }
    };
    if (frames) {
      if (SendFrames(call, refs, replica, *request, frame_tail ? &tail : nullptr,
                     absl::FromChrono(latest_deadline))) {
        return;
      }
      // No frame connection: these attempts go on gRPC after all, with
      // their rows in the message.
      for (size_t i = 0; i < tail.batches.size(); ++i) {
        const FrameTailRows::Batch& b = tail.batches[i];
        rpc::EncodeMatrix(b.input, b.rows, config_.hidden_size, b.dtype,
                          request->mutable_batches(static_cast<int>(i))->mutable_hidden_states());
      }
      {
        std::lock_guard<std::mutex> lock(call->mu);
        for (const AttemptRef& ref : refs) call->slots[ref.slot].on_frames[ref.attempt] = false;
      }
      if (!replica->use_stream.load()) {
        send_unary();
        return;
      }
    }
    // A stream that ended between GetStream and Send is replaced once.
    for (int tries = 0; tries < 2; ++tries) {
      if (replica->GetStream(this)->Send(request, refs)) return;
    }
    // It ended UNIMPLEMENTED (OnStreamEnded switched the replica to unary).
    if (!replica->use_stream.load()) {
      send_unary();
      return;
    }
    FailAttempts(refs, grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                    absl::StrCat("ForwardStream to ", replica->target,
                                                 " ended before the request could be sent")));
    return;
  }
  for (const AttemptRef& ref : refs) {
    auto request = std::make_unique<v1::ForwardRequest>();
    fill(call->slots[ref.slot], request.get());
    SendUnary(ref, replica.get(), std::move(request));
  }
}

void RemoteExpertBackend::SendUnary(const AttemptRef& ref, Replica* replica,
                                    std::unique_ptr<v1::ForwardRequest> request) {
  // Counts the call in unary_in_flight_ until its state is freed. First in
  // UnaryCall, so destroyed last: after the ClientContext and its channel
  // reference.
  struct InFlight {
    explicit InFlight(RemoteExpertBackend* backend) : backend(backend) {
      std::lock_guard<std::mutex> lock(backend->unary_mu_);
      ++backend->unary_in_flight_;
    }
    ~InFlight() {
      std::lock_guard<std::mutex> lock(backend->unary_mu_);
      if (--backend->unary_in_flight_ == 0) backend->unary_cv_.notify_all();
    }
    RemoteExpertBackend* const backend;
  };
  // Everything the call uses lives as long as its callback.
  struct UnaryCall {
    explicit UnaryCall(RemoteExpertBackend* backend) : in_flight(backend) {}
    InFlight in_flight;
    grpc::ClientContext context;
    std::unique_ptr<v1::ForwardRequest> request;
    v1::ForwardResponse response;
  };
  auto unary = std::make_shared<UnaryCall>(this);
  unary->request = std::move(request);
  unary->context.set_deadline(ref.call->slots[ref.slot].deadline[ref.attempt]);
  UnaryCall* raw = unary.get();
  replica->stub->async()->Forward(
      &raw->context, raw->request.get(), &raw->response,
      [this, ref, unary = std::move(unary)](grpc::Status status) {
        if (!ref.call->slots[ref.slot].Claim(ref.attempt)) return;
        const v1::ForwardResponse* reply = status.ok() ? &unary->response : nullptr;
        OnAttemptDone(ref.call, ref.slot, ref.attempt, std::move(status), reply);
      });
}

void RemoteExpertBackend::OnStreamEnded(Replica* replica, std::vector<Unanswered> unanswered,
                                        const grpc::Status& status) {
  if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
    // The shard said it serves ForwardStream but does not (a proxy or an
    // older build behind the same address): unary calls from now on, and
    // the requests already encoded go that way.
    replica->use_stream.store(false);
    for (Unanswered& u : unanswered) {
      for (size_t i = 0; i < u.refs.size(); ++i) {
        auto request = std::make_unique<v1::ForwardRequest>(
            std::move(*u.request->mutable_batches(static_cast<int>(i))));
        SendUnary(u.refs[i], replica, std::move(request));
      }
    }
    return;
  }
  // Broken mid-flight: the attempts on it fail with a status that says so;
  // UNAVAILABLE, so they are retried on another replica where there is one.
  const grpc::Status failed(
      grpc::StatusCode::UNAVAILABLE,
      absl::StrCat("ForwardStream to ", replica->target, " broke with ", unanswered.size(),
                   " request(s) in flight: ", StatusText(status)));
  for (const Unanswered& u : unanswered) FailAttempts(u.refs, failed);
}

void RemoteExpertBackend::FailAttempts(const std::vector<AttemptRef>& refs,
                                       const grpc::Status& status) {
  for (const AttemptRef& ref : refs) {
    if (ref.call->slots[ref.slot].Claim(ref.attempt)) {
      OnAttemptDone(ref.call, ref.slot, ref.attempt, status, nullptr);
    }
  }
}

void RemoteExpertBackend::OnStreamReply(const std::vector<AttemptRef>& refs,
                                        const v1::ForwardStreamResponse& reply,
                                        std::optional<std::string_view> frame_tail) {
  for (size_t i = 0; i < refs.size(); ++i) {
    const AttemptRef& ref = refs[i];
    if (!ref.call->slots[ref.slot].Claim(ref.attempt)) continue;  // timed out meanwhile
    if (i >= static_cast<size_t>(reply.results_size())) {
      OnAttemptDone(ref.call, ref.slot, ref.attempt,
                    grpc::Status(grpc::StatusCode::INTERNAL,
                                 absl::StrCat("ForwardStream reply has ", reply.results_size(),
                                              " results for ", refs.size(), " batches")),
                    nullptr);
      continue;
    }
    const v1::ForwardResult& result = reply.results(static_cast<int>(i));
    if (result.code() == 0) {
      OnAttemptDone(ref.call, ref.slot, ref.attempt, grpc::Status::OK, &result.response(),
                    frame_tail);
    } else {
      const int code = result.code() > 0 && result.code() <= 16 ? result.code() : 2;  // UNKNOWN
      OnAttemptDone(ref.call, ref.slot, ref.attempt,
                    grpc::Status(static_cast<grpc::StatusCode>(code), result.error_message()),
                    nullptr);
    }
  }
}

void RemoteExpertBackend::OnAttemptDone(const std::shared_ptr<LayerCall>& call, size_t slot,
                                        int attempt, grpc::Status status,
                                        const v1::ForwardResponse* reply,
                                        std::optional<std::string_view> frame_tail) {
  CallSlot& s = call->slots[slot];
  ExpertState& state = *experts_[s.expert];
  RemoteExpertCounters& counters = state.counters;
  Replica& replica = *s.replica[attempt];
  replica.outstanding.fetch_sub(1, std::memory_order_relaxed);
  // One reading serves every consumer, so the call-duration histogram and the
  // per-hop breakdown describe the same round trip.
  const int64_t round_trip_micros = NowMicros() - s.start_micros[attempt];
  counters.latency_micros_sum.fetch_add(static_cast<uint64_t>(round_trip_micros),
                                        std::memory_order_relaxed);
  counters.latency_count.fetch_add(1, std::memory_order_relaxed);
  if (options_.on_call_done) {
    options_.on_call_done(s.expert, round_trip_micros * 1e-6, static_cast<int>(status.error_code()),
                          s.on_frames[attempt]   ? "frames"
                          : s.on_stream[attempt] ? "stream"
                                                 : "unary");
  }
  if (status.ok()) {
    if (options_.on_reply_timing) {
      options_.on_reply_timing(s.expert, round_trip_micros * 1e-6, reply->queue_micros() * 1e-6,
                               reply->compute_micros() * 1e-6);
    }
    // Straight into the caller's output; a reply that does not fit is an
    // error of this batch (the shard is broken, so no retry).
    absl::Status decoded = rpc::DecodeMatrixInto(reply->output(), config_.hidden_size, s.tokens,
                                                 s.output, "expert output", frame_tail);
    if (!decoded.ok()) {
      s.bad_output = absl::InternalError(
          absl::StrCat("expert ", s.expert, " (layer ", call->layer, ") at ", replica.target,
                       " returned a bad output: ", decoded.message()));
    }
  }
  if (!status.ok()) {
    const int code = static_cast<int>(status.error_code());
    if (code >= 0 && code < static_cast<int>(counters.errors_by_code.size())) {
      counters.errors_by_code[code].fetch_add(1, std::memory_order_relaxed);
    }
    // A target with several addresses stays in use: round_robin passes over
    // the address that failed, not the others.
    if (IsRetryable(status) && !replica.several_addresses) {
      replica.avoid_until_micros.store(
          NowMicros() + int64_t{1000} * options_.max_reconnect_backoff_ms,
          std::memory_order_relaxed);
    }
  }
  // One target with several addresses retries on itself: its round_robin
  // picker sends the retry to the next ready address (DNS mode).
  // The retry picks from the live set: after a topology change, a new replica.
  const std::shared_ptr<const ReplicaSet> set = state.Snapshot();
  const bool retry =
      !status.ok() && IsRetryable(status) && attempt + 1 < CallSlot::kMaxAttempts && set->can_retry;
  s.statuses[attempt] = std::move(status);
  if (retry) {
    // Starting a call from a callback is fine: it does not block.
    StartAttempts(call, {slot}, PickReplica(state, *set, s.replica[attempt].get()));
    return;
  }
  bool last;
  {
    std::lock_guard<std::mutex> lock(call->mu);
    last = --call->pending == 0;
  }
  // After unlocking, so the waiter does not wake only to block on call->mu
  // (`call` is held by the caller, so the condition variable outlives this).
  if (last) call->done_cv.notify_all();
}

namespace {

// Connects to a frame socket (with `tls`, a TLS session whose certificate
// names `tls_name`) and checks its greeting names `token`.
absl::StatusOr<rpc::FrameSocket> DialAndGreet(const std::string& address, const std::string& token,
                                              const rpc::FrameTlsContext* tls,
                                              const std::string& tls_name, absl::Time deadline) {
  absl::StatusOr<rpc::FrameSocket> socket = rpc::DialFrames(address, deadline);
  if (!socket.ok()) return socket.status();
  if (tls != nullptr) SY_RETURN_IF_ERROR(rpc::StartClientTls(*socket, *tls, tls_name, deadline));
  std::string greeting;
  SY_RETURN_IF_ERROR(rpc::ReadFrame(*socket, 256, deadline, &greeting));
  if (greeting != token) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the frame socket at ", address, " belongs to another shard process than the one asked"));
  }
  return socket;
}

// Whether an idle connection was closed (or broken) by the shard meanwhile:
// it has something to read (the end of the stream) though no request is
// out. A write into it could still succeed, and only the reply would fail.
bool IdleFrameIsStale(int fd) {
  pollfd p{.fd = fd, .events = POLLIN | POLLRDHUP, .revents = 0};
  return poll(&p, 1, 0) != 0;
}

}  // namespace

absl::StatusOr<rpc::FrameSocket> RemoteExpertBackend::DialFrames(Replica& replica,
                                                                 absl::Time deadline) {
  const auto [address, token] = replica.FrameEndpoint();
  const rpc::FrameTlsContext* tls = options_.credentials ? options_.frame_tls.get() : nullptr;
  absl::StatusOr<rpc::FrameSocket> socket =
      DialAndGreet(address, token, tls, replica.tls_name, deadline);
  if (socket.ok()) return socket;
  // The shard may have restarted with a new frame socket: ask it where.
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(deadline));
  v1::ShardInfo info;
  if (!replica.stub->GetShardInfo(&context, v1::GetShardInfoRequest(), &info).ok()) return socket;
  const std::string fresh = FrameAddress(replica.target, info);
  if (fresh.empty() || (fresh == address && info.frame_token() == token)) return socket;
  replica.SetFrameEndpoint(fresh, info.frame_token(), info.frame_version());
  return DialAndGreet(fresh, info.frame_token(), tls, replica.tls_name, deadline);
}

bool RemoteExpertBackend::SendFrames(const std::shared_ptr<LayerCall>& call,
                                     const std::vector<AttemptRef>& refs,
                                     const std::shared_ptr<Replica>& replica,
                                     v1::ForwardStreamRequest& request, const FrameTailRows* tail,
                                     absl::Time deadline) {
  request.set_id(next_frame_id_.fetch_add(1, std::memory_order_relaxed));
  rpc::FrameSocket socket = replica->TakeIdleFrame();
  while (socket.valid() && IdleFrameIsStale(socket.fd())) socket = replica->TakeIdleFrame();
  absl::Status sent = absl::OkStatus();
  if (!socket.valid()) {
    // A dial is quick where the shard is up; where it is not, gRPC says so.
    absl::StatusOr<rpc::FrameSocket> dialed =
        DialFrames(*replica, std::min(deadline, absl::Now() + absl::Seconds(1)));
    if (dialed.ok()) {
      socket = std::move(*dialed);
    } else {
      sent = dialed.status();
    }
  }
  if (sent.ok() && tail != nullptr) {
    // The rows straight from the caller's buffers into the frame.
    sent = rpc::WriteMessageFrameWithTail(
        socket, request, tail->bytes,
        [&](char* bytes) {
          for (const FrameTailRows::Batch& b : tail->batches) {
            rpc::EncodeMatrixTo(b.input, b.rows, config_.hidden_size, b.dtype, bytes + b.offset);
          }
        },
        deadline);
  } else if (sent.ok()) {
    sent = rpc::WriteMessageFrame(socket, request, deadline);
  }
  if (!sent.ok()) {
    // gRPC carries this replica's calls until the next try: after
    // max_reconnect_backoff_ms, doubling with each failure in a row up to a minute.
    const int failures = replica->frames_failures.fetch_add(1, std::memory_order_relaxed);
    const int64_t wait_ms = std::min<int64_t>(
        int64_t{options_.max_reconnect_backoff_ms} << std::min(failures, 16), 60000);
    replica->frames_retry_after_micros.store(NowMicros() + 1000 * wait_ms,
                                             std::memory_order_relaxed);
    if (!replica->frames_warned.exchange(true)) {
      std::fprintf(stderr,
                   "switchyard-gateway: expert %s: frame socket unusable (%s); its calls go on "
                   "gRPC, and the frame socket is tried again after %lld ms, then less often\n",
                   replica->target.c_str(), std::string(sent.message()).c_str(),
                   static_cast<long long>(wait_ms));
    }
    return false;
  }
  replica->frames_failures.store(0, std::memory_order_relaxed);
  auto wait = std::make_unique<FrameWait>();
  wait->replica = replica;
  wait->socket = std::move(socket);
  wait->id = request.id();
  wait->refs = refs;
  {
    std::lock_guard<std::mutex> lock(call->mu);
    call->frame_waits.push_back(std::move(wait));
  }
  // A retry started from a callback: the waiting thread must watch it.
  call->done_cv.notify_all();
  return true;
}

void RemoteExpertBackend::ReadFrameReply(FrameWait& wait, absl::Time deadline) {
  wait.open = false;
  v1::ForwardStreamResponse reply;
  rpc::FrameTail tail;
  absl::Status read = rpc::ReadMessageFrame(
      wait.socket, static_cast<size_t>(options_.max_message_bytes), deadline, &reply, &tail);
  if (read.ok() && reply.id() != wait.id) {
    read = absl::DataLossError(
        absl::StrCat("reply for request ", reply.id(), " while waiting for ", wait.id));
  }
  if (!read.ok()) {
    wait.socket.Close();
    FailAttempts(wait.refs, grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                         absl::StrCat("frame connection to ", wait.replica->target,
                                                      " broke: ", read.message())));
    return;
  }
  wait.replica->ReturnFrame(std::move(wait.socket));
  OnStreamReply(wait.refs, reply, tail.view());
}

void RemoteExpertBackend::AwaitLayer(const std::shared_ptr<LayerCall>& call) {
  std::unique_lock<std::mutex> lock(call->mu);
  while (call->pending > 0) {
    // The earliest deadline of a stream or frame attempt still open (unary
    // calls have gRPC's own deadline), and whether any open attempt is on
    // gRPC (then its completion wakes done_cv, which a poll cannot see).
    auto earliest = std::chrono::system_clock::time_point::max();
    bool on_grpc = false;
    for (const CallSlot& s : call->slots) {
      for (int a = 0; a < s.attempts; ++a) {
        if (s.claimed[a].load(std::memory_order_acquire)) continue;
        if (s.on_stream[a]) earliest = std::min(earliest, s.deadline[a]);
        if (!s.on_frames[a]) on_grpc = true;
      }
    }
    std::vector<FrameWait*> waits;
    for (const auto& w : call->frame_waits) {
      if (w->open) waits.push_back(w.get());
    }
    bool timed_out = false;
    if (waits.empty()) {
      if (earliest == std::chrono::system_clock::time_point::max()) {
        call->done_cv.wait(lock);
        continue;
      }
      timed_out = call->done_cv.wait_until(lock, earliest) == std::cv_status::timeout;
      if (!timed_out) continue;
      lock.unlock();
    } else {
      // Frame replies are read right here, by the thread that needs them.
      lock.unlock();
      std::vector<pollfd> fds;
      // A TLS reply already decrypted, which poll cannot see: per wait, and any.
      std::vector<bool> has_buffered;
      bool buffered = false;
      for (FrameWait* w : waits) {
        fds.push_back({.fd = w->socket.fd(), .events = POLLIN, .revents = 0});
        has_buffered.push_back(w->socket.HasBufferedInput());
        buffered = buffered || has_buffered.back();
      }
      int timeout_ms = -1;
      if (earliest != std::chrono::system_clock::time_point::max()) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(
            earliest - std::chrono::system_clock::now());
        timeout_ms = static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1 << 30));
      }
      // With gRPC attempts open too, look at done_cv's condition every ms.
      if (on_grpc && (timeout_ms < 0 || timeout_ms > 1)) timeout_ms = 1;
      if (buffered) timeout_ms = 0;
      const int ready = rpc::PollSpinning(absl::MakeSpan(fds), timeout_ms,
                                          absl::Microseconds(options_.reply_spin_us));
      for (size_t i = 0; (ready > 0 || buffered) && i < fds.size(); ++i) {
        if (fds[i].revents != 0 || has_buffered[i]) {
          ReadFrameReply(*waits[i], absl::FromChrono(call->deadline));
        }
      }
      timed_out = std::chrono::system_clock::now() >= earliest;
    }
    if (timed_out) {
      std::vector<AttemptRef> expired_stream, expired_frames;
      const auto now = std::chrono::system_clock::now();
      lock.lock();
      for (size_t i = 0; i < call->slots.size(); ++i) {
        const CallSlot& s = call->slots[i];
        for (int a = 0; a < s.attempts; ++a) {
          if (s.on_stream[a] && s.deadline[a] <= now &&
              !s.claimed[a].load(std::memory_order_acquire)) {
            (s.on_frames[a] ? expired_frames : expired_stream).push_back({call, i, a});
          }
        }
      }
      lock.unlock();
      // The reply may still come: the stream drops it (the attempt is
      // claimed); a frame connection is closed below.
      FailAttempts(expired_stream,
                   grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                "no reply on the ForwardStream before the deadline"));
      FailAttempts(expired_frames,
                   grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                "no reply on the frame connection before the deadline"));
    }
    lock.lock();
    // A frame connection whose attempts all ended without its reply (timed
    // out) is closed: the reply may still come and must not be read as the
    // next request's.
    for (const auto& w : call->frame_waits) {
      if (!w->open) continue;
      const bool all_claimed = std::all_of(w->refs.begin(), w->refs.end(), [](const AttemptRef& r) {
        return r.call->slots[r.slot].claimed[r.attempt].load(std::memory_order_acquire);
      });
      if (all_claimed) {
        w->open = false;
        w->socket.Close();
      }
    }
  }
  // The refs point back at `call`: drop them, closing any socket still open.
  call->frame_waits.clear();
}

absl::Status RemoteExpertBackend::RunLayer(int layer, absl::Span<const ExpertBatch> batches) {
  std::vector<absl::Status> batch_status;
  SY_RETURN_IF_ERROR(RunLayerPerBatch(layer, batches, &batch_status));
  for (const absl::Status& s : batch_status) SY_RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

absl::Status RemoteExpertBackend::RunLayerPerBatch(int layer, absl::Span<const ExpertBatch> batches,
                                                   std::vector<absl::Status>* batch_status) {
  batch_status->assign(batches.size(), absl::OkStatus());
  if (layer < 0 || layer >= config_.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "remote experts: layer ", layer, " out of range [0, ", config_.num_hidden_layers, ")"));
  }
  for (const ExpertBatch& b : batches) {
    if (b.expert < 0 || b.expert >= static_cast<int>(experts_.size()) || b.tokens < 1 ||
        b.input == nullptr || b.output == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("remote experts: bad batch for expert ",
                                                     b.expert, " with ", b.tokens,
                                                     " tokens (layer ", layer, ")"));
    }
  }
  if (batches.empty()) return absl::OkStatus();

  auto call = std::make_shared<LayerCall>();
  call->layer = layer;
  call->deadline =
      std::chrono::system_clock::now() + std::chrono::milliseconds(options_.call_deadline_ms);
  call->slots = std::vector<CallSlot>(batches.size());
  call->pending = batches.size();
  // Batches bound for the same replica go together (one stream request), as
  // long as the request and its reply stay within the message size limit
  // (counted as F32 both ways, plus room for the framing).
  struct Group {
    std::shared_ptr<Replica> replica;
    std::vector<size_t> slots;
    int64_t bytes = 0;
  };
  std::vector<Group> groups;
  const int64_t group_budget =
      std::max<int64_t>(int64_t{options_.max_message_bytes} - (64 << 10), 0);
  for (size_t i = 0; i < batches.size(); ++i) {
    const ExpertBatch& b = batches[i];
    CallSlot& s = call->slots[i];
    s.expert = b.expert;
    s.tokens = b.tokens;
    s.input = b.input;
    s.output = b.output;
    const ExpertState& state = *experts_[b.expert];
    std::shared_ptr<Replica> replica = PickReplica(state, *state.Snapshot(), /*exclude=*/nullptr);
    const int64_t bytes = int64_t{b.tokens} * config_.hidden_size * 4 + 64;
    auto group = std::find_if(groups.begin(), groups.end(), [&](const Group& g) {
      return g.replica == replica && g.bytes + bytes <= group_budget;
    });
    if (group != groups.end() && (replica->use_stream.load(std::memory_order_relaxed) ||
                                  replica->use_frames.load(std::memory_order_relaxed))) {
      group->slots.push_back(i);
      group->bytes += bytes;
    } else {
      groups.push_back({std::move(replica), std::vector<size_t>{i}, bytes});
    }
  }
  for (Group& g : groups) StartAttempts(call, g.slots, g.replica);
  AwaitLayer(call);

  for (size_t i = 0; i < batches.size(); ++i) (*batch_status)[i] = BatchResult(*call, i);
  return absl::OkStatus();
}

absl::Status RemoteExpertBackend::BatchResult(const LayerCall& call, size_t slot) const {
  const CallSlot& s = call.slots[slot];
  const int last = s.attempts - 1;
  const grpc::Status& status = s.statuses[last];
  const std::string where = absl::StrCat("expert ", s.expert, " (layer ", call.layer, ")");
  if (!status.ok()) {
    if (IsRetryable(status)) {
      std::vector<std::string> tried;
      for (int a = 0; a < s.attempts; ++a) {
        tried.push_back(absl::StrCat(s.replica[a]->target, ": ", StatusText(s.statuses[a])));
      }
      return absl::UnavailableError(
          absl::StrCat(where, " unavailable: ", absl::StrJoin(tried, "; ")));
    }
    return absl::Status(
        static_cast<absl::StatusCode>(status.error_code()),
        absl::StrCat(where, " at ", s.replica[last]->target, ": ", status.error_message()));
  }
  return s.bad_output;
}

std::string RemoteExpertBackend::Describe() const {
  std::vector<std::string> entries;
  for (const auto& state : experts_) {
    std::vector<std::string> targets;
    for (const auto& r : state->Snapshot()->replicas) targets.push_back(r->target);
    entries.push_back(absl::StrCat(state->expert, "=", absl::StrJoin(targets, "|")));
  }
  return absl::StrCat("remote (", options_.use_frames ? "frames where offered, else " : "", "gRPC",
                      options_.use_stream ? " streams" : "", ", ",
                      options_.wire_dtype == v1::DTYPE_BF16 ? "bf16" : "f32", " wire, ",
                      options_.call_deadline_ms, " ms deadline): ", absl::StrJoin(entries, ";"));
}

const RemoteExpertCounters* RemoteExpertBackend::counters(int expert) const {
  if (expert < 0 || expert >= static_cast<int>(experts_.size())) return nullptr;
  return &experts_[expert]->counters;
}

RemoteExpertStats RemoteExpertBackend::stats() const {
  RemoteExpertStats stats;
  for (const auto& state : experts_) {
    RemoteExpertStats::PerExpert p;
    p.expert = state->expert;
    for (const auto& r : state->Snapshot()->replicas) p.targets.push_back(r->target);
    const RemoteExpertCounters& c = state->counters;
    p.calls = c.calls.load(std::memory_order_relaxed);
    p.retries = c.retries.load(std::memory_order_relaxed);
    for (size_t code = 0; code < c.errors_by_code.size(); ++code) {
      const uint64_t count = c.errors_by_code[code].load(std::memory_order_relaxed);
      if (count > 0) {
        p.errors_by_code[rpc::GrpcCodeName(static_cast<grpc::StatusCode>(code))] = count;
      }
    }
    p.latency_micros_sum = c.latency_micros_sum.load(std::memory_order_relaxed);
    p.latency_count = c.latency_count.load(std::memory_order_relaxed);
    stats.experts.push_back(std::move(p));
  }
  std::lock_guard<std::mutex> lock(calls_mu_);
  for (const auto& [target, calls] : calls_by_target_) {
    stats.calls_by_target[target] = calls->load(std::memory_order_relaxed);
  }
  return stats;
}

// ---------------------------------------------------------------------------

ExpertTopologyFileWatcher::ExpertTopologyFileWatcher(
    std::string path, std::string applied_content, int num_experts, RemoteExpertBackend* backend,
    int poll_ms, std::function<void(const ExpertTopology&)> on_applied, ApplyFn apply)
    : path_(std::move(path)),
      num_experts_(num_experts),
      backend_(backend),
      on_applied_(std::move(on_applied)),
      apply_(std::move(apply)),
      last_content_(std::move(applied_content)) {
  thread_ = std::make_unique<PeriodicThread>(poll_ms, [this] { PollOnce(); });
}

bool ExpertTopologyFileWatcher::PollOnce() {
  std::lock_guard<std::mutex> lock(poll_mu_);
  const std::optional<std::string> content = ReadWholeFile(path_);
  // Unreadable (mid-rename) or unchanged: nothing to do; the old topology stays.
  if (!content.has_value() || *content == last_content_) return false;
  last_content_ = *content;
  // The bytes just compared, not a second read that could see a newer file.
  absl::StatusOr<ExpertTopology> topology = ParseExpertTopologyJson(*content, path_, num_experts_);
  if (!topology.ok()) {
    refused_.fetch_add(1);
    std::fprintf(stderr,
                 "switchyard-gateway: expert topology file changed but is refused, keeping the "
                 "current topology: %s\n",
                 std::string(topology.status().message()).c_str());
    return false;
  }
  absl::StatusOr<std::string> changed =
      apply_ ? apply_(*topology) : backend_->ApplyTopology(*topology);
  if (!changed.ok()) {
    refused_.fetch_add(1);
    // A replica that did not answer may still be starting: try again next poll.
    if (changed.status().code() == absl::StatusCode::kUnavailable) last_content_.clear();
    std::fprintf(stderr,
                 "switchyard-gateway: %s changed but is refused, keeping the current topology: "
                 "%s\n",
                 path_.c_str(), changed.status().ToString().c_str());
    return false;
  }
  if (changed->empty()) return false;
  applied_.fetch_add(1);
  std::fprintf(stderr, "switchyard-gateway: expert topology from %s applied: %s\n", path_.c_str(),
               changed->c_str());
  if (on_applied_) on_applied_(backend_->topology());
  return true;
}

}  // namespace switchyard
