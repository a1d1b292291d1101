#include "expert_service/expert_server.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <map>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/fingerprint.h"
#include "core/status_macros.h"
#include "core/tensor_names.h"
#include "core/version.h"
#include "rpc/status.h"
#include "rpc/tensor_codec.h"

namespace switchyard {
namespace {

// The dtype a reply's output is sent in (Validate checked output_dtype).
v1::DType OutputDType(const v1::ForwardRequest& request) {
  return request.output_dtype() == v1::DTYPE_UNSPECIFIED ? request.hidden_states().dtype()
                                                         : request.output_dtype();
}

}  // namespace

int64_t ExpertServiceImpl::NowMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::vector<std::pair<int, int>> ShardDescription::Held() const {
  std::vector<std::pair<int, int>> held;
  for (int layer = layer_begin; layer < layer_end; ++layer) {
    for (int e : experts) held.emplace_back(layer, e);
  }
  std::sort(held.begin(), held.end());
  return held;
}

absl::StatusOr<ShardDescription> DescribeShard(const std::string& checkpoint_dir,
                                               const Checkpoint& checkpoint) {
  const ModelConfig& config = checkpoint.config();
  const WeightSelection& selection = checkpoint.selection();
  if (!selection.experts.has_value() || selection.experts->empty()) {
    return absl::InvalidArgumentError("an expert shard must select its experts explicitly");
  }
  ShardDescription shard;
  shard.experts = *selection.experts;
  std::sort(shard.experts.begin(), shard.experts.end());
  shard.experts.erase(std::unique(shard.experts.begin(), shard.experts.end()), shard.experts.end());
  shard.layer_begin = selection.layer_begin;
  shard.layer_end = selection.layer_end < 0 ? config.num_hidden_layers : selection.layer_end;
  if (shard.layer_begin >= shard.layer_end) {
    return absl::InvalidArgumentError(
        absl::StrCat("an expert shard must hold at least one layer, got [", shard.layer_begin, ", ",
                     shard.layer_end, ")"));
  }
  const bool all_layers = shard.layer_begin == 0 && shard.layer_end == config.num_hidden_layers;
  for (int e : shard.experts) {
    // The fingerprint spans every layer: with a partial layer range, read the
    // other layers' headers from the folder.
    SY_ASSIGN_OR_RETURN(shard.expert_weight_fingerprints[e],
                        all_layers ? ExpertWeightsFingerprint(checkpoint, e)
                                   : ExpertWeightsFingerprint(checkpoint_dir, e));
  }
  SY_ASSIGN_OR_RETURN(const TensorView v, checkpoint.View(names::Expert(
                                              shard.layer_begin, shard.experts.front(), "w1")));
  shard.weights_dtype = absl::AsciiStrToLower(std::string(DTypeName(v.dtype)));
  return shard;
}

ExpertServiceImpl::ExpertServiceImpl(const ModelConfig& config, ExpertBackend* backend,
                                     ShardDescription shard, ExpertServerOptions options)
    : config_(config),
      backend_(backend),
      shard_(std::move(shard)),
      options_(std::move(options)),
      config_fingerprint_(config.Fingerprint()),
      workers_({.threads = std::max(1, options_.workers)}) {
  for (const auto& key : shard_.Held()) counters_[key] = std::make_unique<ExpertCounters>();
}

ExpertServiceImpl::~ExpertServiceImpl() { Shutdown(); }

void ExpertServiceImpl::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  // Runs every queued call (each was accepted) before joining.
  workers_.Shutdown();
}

void ExpertServiceImpl::SetFrameEndpoint(FrameEndpoint endpoint) {
  frame_endpoint_ = std::move(endpoint);
}

bool ExpertServiceImpl::TakeInlineSlotLocked(bool own_thread) {
  if (!options_.inline_compute_when_idle ||
      (!own_thread && compute_average_micros_.load(std::memory_order_relaxed) >
                          options_.inline_compute_max_micros)) {
    return false;
  }
  return workers_.TryStartInline();
}

void ExpertServiceImpl::RecordComputeMicros(int64_t micros) {
  // Racy read-modify-write: a lost update only delays the average a little.
  const int64_t average = compute_average_micros_.load(std::memory_order_relaxed);
  compute_average_micros_.store((7 * average + micros) / 8, std::memory_order_relaxed);
}

grpc::ServerUnaryReactor* ExpertServiceImpl::GetShardInfo(grpc::CallbackServerContext* context,
                                                          const v1::GetShardInfoRequest* request,
                                                          v1::ShardInfo* response) {
  const ModelConfig& c = config_;
  response->set_config_fingerprint(config_fingerprint_);
  for (const auto& [e, fp] : shard_.expert_weight_fingerprints) {
    (*response->mutable_expert_weight_fingerprints())[static_cast<uint32_t>(e)] = fp;
  }
  v1::ModelDims* dims = response->mutable_dims();
  dims->set_hidden_size(c.hidden_size);
  dims->set_intermediate_size(c.intermediate_size);
  dims->set_num_layers(c.num_hidden_layers);
  dims->set_num_experts(c.num_local_experts);
  dims->set_experts_per_token(c.num_experts_per_tok);
  for (int e : shard_.experts) response->add_experts(e);
  response->set_layer_begin(shard_.layer_begin);
  response->set_layer_end(shard_.layer_end);
  response->set_weights_dtype(shard_.weights_dtype);
  response->set_backend(options_.backend_name);
  response->set_version(Version());
  response->set_forward_stream(true);
  response->set_rows_independent_of_count(backend_->RowsIndependentOfCount());
  response->set_frame_port(frame_endpoint_.port);
  response->set_frame_unix_path(frame_endpoint_.unix_path);
  response->set_frame_token(frame_endpoint_.token);
  if (!frame_endpoint_.token.empty()) response->set_frame_version(frame_endpoint_.version);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::Reject(grpc::CallbackServerContext* context,
                                                    const absl::Status& s) {
  rejected_calls_.fetch_add(1, std::memory_order_relaxed);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(rpc::ToGrpcStatus(s));
  return reactor;
}

absl::StatusOr<ExpertCounters*> ExpertServiceImpl::Validate(
    const v1::ForwardRequest& request) const {
  if (!request.config_fingerprint().empty() &&
      request.config_fingerprint() != config_fingerprint_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "config fingerprint ", request.config_fingerprint(), " does not match this shard's ",
        config_fingerprint_, ": the caller and this expert shard serve different models"));
  }
  ExpertCounters* counters = nullptr;
  if (request.layer() < (1u << 30) && request.expert() < (1u << 30)) {
    const std::pair<int, int> key(static_cast<int>(request.layer()),
                                  static_cast<int>(request.expert()));
    if (auto it = counters_.find(key); it != counters_.end()) counters = it->second.get();
  }
  if (counters == nullptr) {
    return absl::NotFoundError(absl::StrCat("layer ", request.layer(), " expert ", request.expert(),
                                            " is not held by this shard (it holds experts [",
                                            absl::StrJoin(shard_.experts, ", "), "] of layers [",
                                            shard_.layer_begin, ", ", shard_.layer_end, "))"));
  }
  const v1::DType dtype = request.hidden_states().dtype();
  if (dtype != v1::DTYPE_F32 && dtype != v1::DTYPE_BF16) {
    return absl::InvalidArgumentError(absl::StrCat("hidden_states: unsupported dtype ",
                                                   v1::DType_Name(dtype),
                                                   " (expected DTYPE_F32 or DTYPE_BF16)"));
  }
  const v1::DType out_dtype = request.output_dtype();
  if (out_dtype != v1::DTYPE_UNSPECIFIED && out_dtype != v1::DTYPE_F32 &&
      out_dtype != v1::DTYPE_BF16) {
    return absl::InvalidArgumentError(absl::StrCat("output_dtype: unsupported dtype ",
                                                   v1::DType_Name(out_dtype),
                                                   " (expected DTYPE_F32 or DTYPE_BF16)"));
  }
  const v1::Tensor& x = request.hidden_states();
  if (x.shape_size() >= 1 && x.shape(0) > options_.max_forward_rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("hidden_states: ", x.shape(0), " rows, at most ", options_.max_forward_rows,
                     " per Forward call (the expert's --max-forward-rows)"));
  }
  return counters;
}

grpc::ServerUnaryReactor* ExpertServiceImpl::Forward(grpc::CallbackServerContext* context,
                                                     const v1::ForwardRequest* request,
                                                     v1::ForwardResponse* response) {
  const int64_t received = NowMicros();
  // Only cheap checks here; decoding happens where the call is computed.
  absl::StatusOr<ExpertCounters*> counters = Validate(*request);
  if (!counters.ok()) return Reject(context, counters.status());
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  bool run_inline = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      rejected_calls_.fetch_add(1, std::memory_order_relaxed);
      reactor->Finish(rpc::ToGrpcStatus(absl::UnavailableError("expert shard is shutting down")));
      return reactor;
    }
    if (const int queued = workers_.queued(); queued >= options_.max_queued_calls) {
      rejected_calls_.fetch_add(1, std::memory_order_relaxed);
      reactor->Finish(rpc::ToGrpcStatus(absl::ResourceExhaustedError(
          absl::StrCat("expert shard overloaded: ", queued, " calls queued"))));
      return reactor;
    }
    (*counters)->in_flight.fetch_add(1, std::memory_order_relaxed);
    if (options_.metrics != nullptr) options_.metrics->CallAccepted();
    run_inline = TakeInlineSlotLocked();
    if (!run_inline) {
      ExpertCounters* c = *counters;
      // Never refused: stopping_ is set (under mu_) before workers_ shut down.
      workers_.Submit([=, this] { RunForward(context, request, response, reactor, c, received); });
    }
  }
  if (run_inline) {
    // Idle shard: compute here, on gRPC's thread, instead of waking a worker.
    RunForward(context, request, response, reactor, *counters, received);
    workers_.FinishInline();
  }
  return reactor;
}

void ExpertServiceImpl::RunForward(grpc::CallbackServerContext* context,
                                   const v1::ForwardRequest* request, v1::ForwardResponse* response,
                                   grpc::ServerUnaryReactor* reactor, ExpertCounters* counters,
                                   int64_t enqueued_micros) {
  const int64_t start = NowMicros();
  absl::Status status;
  int64_t tokens = 0;
  int64_t compute_micros = 0;
  if (context->IsCancelled()) {
    // The caller gave up (deadline, cancellation) while this call was queued.
    status = absl::CancelledError("call cancelled before its compute started");
  } else {
    const int64_t d = config_.hidden_size;
    absl::StatusOr<std::vector<float>> x =
        rpc::DecodeMatrix(request->hidden_states(), d, "hidden_states");
    if (!x.ok()) {
      status = x.status();
    } else {
      tokens = static_cast<int64_t>(x->size()) / d;
      std::vector<float> out(x->size());  // [N, D]
      const int64_t compute_start = NowMicros();
      if (tokens > 0) {
        const ExpertBatch batch{.expert = static_cast<int>(request->expert()),
                                .tokens = static_cast<int>(tokens),
                                .input = x->data(),
                                .output = out.data()};
        status = backend_->RunLayer(static_cast<int>(request->layer()), {&batch, 1});
      }
      compute_micros = NowMicros() - compute_start;
      RecordComputeMicros(compute_micros);
      if (status.ok()) {
        response->set_compute_micros(compute_micros);
        response->set_queue_micros(start - enqueued_micros);
        rpc::EncodeMatrix(out.data(), tokens, d, OutputDType(*request), response->mutable_output());
      }
    }
  }
  if (!status.ok()) rejected_calls_.fetch_add(1, std::memory_order_relaxed);
  counters->calls.fetch_add(1, std::memory_order_relaxed);
  counters->tokens.fetch_add(static_cast<uint64_t>(tokens), std::memory_order_relaxed);
  counters->busy_micros.fetch_add(static_cast<uint64_t>(NowMicros() - start),
                                  std::memory_order_relaxed);
  counters->in_flight.fetch_sub(1, std::memory_order_relaxed);
  if (options_.metrics != nullptr) {
    options_.metrics->CallDone(static_cast<int>(request->layer()),
                               static_cast<int>(request->expert()), tokens,
                               (start - enqueued_micros) * 1e-6, compute_micros * 1e-6);
  }
  // Last: after Finish the request, response and context may be gone.
  reactor->Finish(rpc::ToGrpcStatus(status));
}

// One ForwardStream: a read always posted while the caller sends, responses
// written one at a time in the order they complete. Deletes itself in OnDone,
// which gRPC calls only after Finish, so it finishes once reads ended, every
// accepted request is answered and the last write completed.
class ExpertServiceImpl::StreamReactor final
    : public grpc::ServerBidiReactor<v1::ForwardStreamRequest, v1::ForwardStreamResponse>,
      public ForwardReplySink {
 public:
  explicit StreamReactor(ExpertServiceImpl* service) : service_(service) { StartRead(&read_); }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the caller half-closed, went away, or the server is stopping
      std::unique_lock<std::mutex> lock(mu_);
      reads_done_ = true;
      MaybeFinish(lock);
      return;
    }
    const int64_t received = NowMicros();
    auto request = std::make_unique<v1::ForwardStreamRequest>(std::move(read_));
    bool ending;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++pending_;
      ending = ending_;
    }
    read_.Clear();
    // The next request may be read (and computed on another thread) while
    // this one computes here.
    if (!ending) StartRead(&read_);
    if (ending) {
      // Refused, so the caller retries it elsewhere.
      auto response = std::make_unique<v1::ForwardStreamResponse>();
      response->set_id(request->id());
      for (int i = 0; i < request->batches_size(); ++i) {
        v1::ForwardResult* r = response->add_results();
        r->set_code(static_cast<int>(absl::StatusCode::kUnavailable));
        r->set_error_message("expert shard is shutting down");
      }
      Reply(std::move(response), ReplyTail());
      return;
    }
    service_->AcceptForwardRequest(std::move(request), received, this, /*own_thread=*/false);
  }

  // Ends the stream once its accepted requests are answered (EndStreams);
  // returns whether the caller must call Finish now (nothing is pending).
  // Never calls into gRPC, so it may run under the service's streams_mu_.
  bool BeginEnd() {
    std::lock_guard<std::mutex> lock(mu_);
    ending_ = true;
    if (finished_ || pending_ > 0 || writing_) return false;
    finished_ = true;
    return true;
  }
  void FinishEnded() { Finish(EndedStatus()); }

  // Sends the answer to one accepted request (any thread).
  void Reply(std::unique_ptr<v1::ForwardStreamResponse> response, ReplyTail tail) override {
    // gRPC requests have no frame tail, so neither have their replies.
    SY_CHECK(!tail.present);
    std::unique_lock<std::mutex> lock(mu_);
    --pending_;
    if (broken_) {
      MaybeFinish(lock);
      return;
    }
    writes_.push_back(std::move(response));
    if (writing_) return;
    writing_ = true;
    const v1::ForwardStreamResponse* next = writes_.front().get();
    lock.unlock();
    StartWrite(next);
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    writes_.pop_front();
    if (!ok) {  // the stream broke: nothing more can be sent
      broken_ = true;
      writes_.clear();
    }
    if (writes_.empty()) {
      writing_ = false;
      MaybeFinish(lock);
      return;
    }
    const v1::ForwardStreamResponse* next = writes_.front().get();
    lock.unlock();
    StartWrite(next);
  }

  void OnDone() override {
    service_->ForgetStream(this);
    delete this;
  }

 private:
  static grpc::Status EndedStatus() {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "expert shard is shutting down");
  }
  // Finishes the stream once nothing is left to do; unlocks `lock`.
  void MaybeFinish(std::unique_lock<std::mutex>& lock) {
    const bool finish = (reads_done_ || ending_) && pending_ == 0 && !writing_ && !finished_;
    if (finish) finished_ = true;
    const bool ended = ending_ && !reads_done_;
    lock.unlock();
    if (finish) Finish(ended ? EndedStatus() : grpc::Status::OK);
  }

  ExpertServiceImpl* const service_;
  v1::ForwardStreamRequest read_;  // only touched by the read chain
  std::mutex mu_;
  std::deque<std::unique_ptr<v1::ForwardStreamResponse>> writes_;  // front: being written
  int pending_ = 0;          // requests accepted and not yet answered
  bool writing_ = false;     // a StartWrite is outstanding
  bool reads_done_ = false;  // no more requests will come
  bool broken_ = false;      // a write failed
  bool finished_ = false;
  bool ending_ = false;  // EndStreams: finish when idle, read no more
};

struct ExpertServiceImpl::StreamWork {
  std::unique_ptr<v1::ForwardStreamRequest> request;
  std::unique_ptr<v1::ForwardStreamResponse> response;
  std::vector<ExpertCounters*> counters;  // by batch; nullptr: refused
  int64_t received_micros = 0;
  ForwardReplySink* sink = nullptr;
  rpc::FrameTail tail;  // the request's; its tensors may point into it
  // The reply to a request without a tail, or the empty tail of one whose
  // batches were all refused.
  ReplyTail EmptyReplyTail() const { return ReplyTail{.present = tail.present}; }
};

grpc::ServerBidiReactor<v1::ForwardStreamRequest, v1::ForwardStreamResponse>*
ExpertServiceImpl::ForwardStream(grpc::CallbackServerContext* /*context*/) {
  auto* reactor = new StreamReactor(this);
  bool finish_now = false;
  {
    std::lock_guard<std::mutex> lock(streams_mu_);
    streams_.insert(reactor);
    if (streams_ending_) finish_now = reactor->BeginEnd();
  }
  if (finish_now) reactor->FinishEnded();
  return reactor;
}

void ExpertServiceImpl::ForgetStream(StreamReactor* reactor) {
  std::lock_guard<std::mutex> lock(streams_mu_);
  streams_.erase(reactor);
}

void ExpertServiceImpl::EndStreams() {
  // A reactor is deleted only after its Finish, so those not finished here
  // stay valid after the lock is released.
  std::vector<StreamReactor*> finish_now;
  {
    std::lock_guard<std::mutex> lock(streams_mu_);
    streams_ending_ = true;
    for (StreamReactor* reactor : streams_) {
      if (reactor->BeginEnd()) finish_now.push_back(reactor);
    }
  }
  for (StreamReactor* reactor : finish_now) reactor->FinishEnded();
}

void ExpertServiceImpl::AcceptForwardRequest(std::unique_ptr<v1::ForwardStreamRequest> request,
                                             int64_t received_micros, ForwardReplySink* sink,
                                             bool own_thread, rpc::FrameTail tail) {
  auto work = std::make_unique<StreamWork>();
  work->tail = std::move(tail);
  work->response = std::make_unique<v1::ForwardStreamResponse>();
  work->response->set_id(request->id());
  work->received_micros = received_micros;
  work->sink = sink;
  const int n = request->batches_size();
  work->counters.assign(n, nullptr);
  const auto refuse = [&](int i, const absl::Status& s) {
    rejected_calls_.fetch_add(1, std::memory_order_relaxed);
    v1::ForwardResult* r = work->response->mutable_results(i);
    r->set_code(static_cast<int>(s.code()));
    r->set_error_message(std::string(s.message()));
  };
  int accepted = 0;
  for (int i = 0; i < n; ++i) {
    work->response->add_results();
    absl::StatusOr<ExpertCounters*> c = Validate(request->batches(i));
    if (!c.ok()) {
      refuse(i, c.status());
      continue;
    }
    work->counters[i] = *c;
    ++accepted;
  }
  work->request = std::move(request);
  if (accepted == 0) {
    sink->Reply(std::move(work->response), work->EmptyReplyTail());
    return;
  }
  bool run_inline = false;
  {
    std::unique_lock<std::mutex> lock(mu_);
    absl::Status refused;
    if (stopping_) {
      refused = absl::UnavailableError("expert shard is shutting down");
    } else if (const int queued = workers_.queued(); queued >= options_.max_queued_calls) {
      refused = absl::ResourceExhaustedError(
          absl::StrCat("expert shard overloaded: ", queued, " calls queued"));
    }
    if (!refused.ok()) {
      lock.unlock();
      for (int i = 0; i < n; ++i) {
        if (work->counters[i] != nullptr) refuse(i, refused);
      }
      sink->Reply(std::move(work->response), work->EmptyReplyTail());
      return;
    }
    for (ExpertCounters* c : work->counters) {
      if (c == nullptr) continue;
      c->in_flight.fetch_add(1, std::memory_order_relaxed);
      if (options_.metrics != nullptr) options_.metrics->CallAccepted();
    }
    run_inline = TakeInlineSlotLocked(own_thread);
    if (!run_inline) {
      // std::function needs a copyable callable: hand the work over raw.
      StreamWork* queued = work.release();
      // Never refused: stopping_ is set (under mu_) before workers_ shut down.
      workers_.Submit([this, queued] { RunStreamWork(queued); });
    }
  }
  if (run_inline) {
    RunStreamWork(work.release());
    workers_.FinishInline();
  }
}

void ExpertServiceImpl::RunStreamWork(StreamWork* raw_work) {
  std::unique_ptr<StreamWork> work(raw_work);
  const int64_t start = NowMicros();
  const int64_t d = config_.hidden_size;
  const v1::ForwardStreamRequest& request = *work->request;
  v1::ForwardStreamResponse& response = *work->response;
  const int n = request.batches_size();
  const int64_t timeout = request.timeout_micros();
  const bool expired = timeout > 0 && start - work->received_micros > timeout;
  // Decode every accepted batch straight into one input buffer; batches of
  // one layer then run as one backend call.
  std::vector<int64_t> row_begin(n, 0), rows(n, 0);
  std::vector<absl::Status> status(n);
  int64_t total_rows = 0;
  for (int i = 0; i < n; ++i) {
    if (work->counters[i] == nullptr) continue;
    if (expired) {
      status[i] = absl::DeadlineExceededError(absl::StrCat("waited ", start - work->received_micros,
                                                           " us in the queue, over the ", timeout,
                                                           " us the caller waits"));
      continue;
    }
    const v1::Tensor& x = request.batches(i).hidden_states();
    rows[i] = x.shape_size() == 2 ? x.shape(0) : 0;
    row_begin[i] = total_rows;
    total_rows += std::max<int64_t>(rows[i], 0);
  }
  // Uninitialised: decoding writes every accepted batch's rows and the
  // backend fills its outputs (ExpertBackend's contract); the rows of a
  // batch that failed are never read. Zeroing them cost ~7% of a 256-row
  // call (issue #10).
  const size_t values = static_cast<size_t>(total_rows * d);
  std::unique_ptr<float[]> input = std::make_unique_for_overwrite<float[]>(values);
  std::unique_ptr<float[]> output = std::make_unique_for_overwrite<float[]>(values);
  std::map<int, std::vector<int>> by_layer;  // layer -> batch indices to run
  for (int i = 0; i < n; ++i) {
    if (work->counters[i] == nullptr || !status[i].ok()) continue;
    status[i] =
        rpc::DecodeMatrixInto(request.batches(i).hidden_states(), d, rows[i],
                              input.get() + row_begin[i] * d, "hidden_states", work->tail.view());
    if (status[i].ok()) by_layer[static_cast<int>(request.batches(i).layer())].push_back(i);
  }
  // The rows are decoded: the request frame's bytes go before the compute
  // (`present` stays, for the reply's version).
  work->tail.buffer.reset();
  work->tail.bytes = {};
  std::vector<int64_t> compute_micros(n, 0);  // the batch's whole backend call (in its reply)
  std::vector<int64_t> compute_share(n, 0);   // its rows' share of it (busy time, metrics)
  for (const auto& [layer, indices] : by_layer) {
    std::vector<ExpertBatch> batches;
    for (int i : indices) {
      batches.push_back({.expert = static_cast<int>(request.batches(i).expert()),
                         .tokens = static_cast<int>(rows[i]),
                         .input = input.get() + row_begin[i] * d,
                         .output = output.get() + row_begin[i] * d});
    }
    std::vector<absl::Status> batch_status;
    const int64_t compute_start = NowMicros();
    const absl::Status layer_status = backend_->RunLayerPerBatch(layer, batches, &batch_status);
    const int64_t elapsed = NowMicros() - compute_start;
    RecordComputeMicros(elapsed);
    int64_t layer_rows = 0;
    for (int i : indices) layer_rows += rows[i];
    for (size_t j = 0; j < indices.size(); ++j) {
      const int i = indices[j];
      compute_micros[i] = elapsed;
      compute_share[i] = layer_rows > 0 ? elapsed * rows[i] / layer_rows : elapsed;
      status[i] = !layer_status.ok()        ? layer_status
                  : j < batch_status.size() ? batch_status[j]
                                            : absl::OkStatus();
    }
  }
  const int64_t end = NowMicros();
  // A request in a version 2 frame gets its outputs in the reply's tail,
  // encoded straight from `output` when the reply is written.
  struct TailPiece {
    int64_t row_begin, rows;
    v1::DType dtype;
    size_t offset;
  };
  std::vector<TailPiece> tail_pieces;
  ReplyTail reply_tail = work->EmptyReplyTail();
  for (int i = 0; i < n; ++i) {
    ExpertCounters* counters = work->counters[i];
    if (counters == nullptr) continue;
    const v1::ForwardRequest& batch = request.batches(i);
    v1::ForwardResult* result = response.mutable_results(i);
    const int64_t tokens = status[i].ok() ? rows[i] : 0;
    if (status[i].ok()) {
      v1::ForwardResponse* r = result->mutable_response();
      r->set_compute_micros(compute_micros[i]);
      r->set_queue_micros(start - work->received_micros);
      if (reply_tail.present) {
        rpc::DescribeMatrixInFrameTail(rows[i], d, OutputDType(batch), reply_tail.bytes,
                                       r->mutable_output());
        tail_pieces.push_back({row_begin[i], rows[i], OutputDType(batch), reply_tail.bytes});
        reply_tail.bytes += rpc::EncodedMatrixBytes(rows[i], d, OutputDType(batch));
      } else {
        rpc::EncodeMatrix(output.get() + row_begin[i] * d, rows[i], d, OutputDType(batch),
                          r->mutable_output());
      }
    } else {
      rejected_calls_.fetch_add(1, std::memory_order_relaxed);
      result->set_code(static_cast<int>(status[i].code()));
      result->set_error_message(std::string(status[i].message()));
    }
    counters->calls.fetch_add(1, std::memory_order_relaxed);
    counters->tokens.fetch_add(static_cast<uint64_t>(tokens), std::memory_order_relaxed);
    // Several batches computed together share the time by their rows.
    const int64_t busy =
        total_rows > 0 ? (end - start) * std::max<int64_t>(rows[i], 0) / total_rows : 0;
    counters->busy_micros.fetch_add(static_cast<uint64_t>(busy), std::memory_order_relaxed);
    counters->in_flight.fetch_sub(1, std::memory_order_relaxed);
    if (options_.metrics != nullptr) {
      options_.metrics->CallDone(static_cast<int>(batch.layer()), static_cast<int>(batch.expert()),
                                 tokens, (start - work->received_micros) * 1e-6,
                                 compute_share[i] * 1e-6);
    }
  }
  if (!tail_pieces.empty()) {
    reply_tail.write = [output = std::shared_ptr<float[]>(std::move(output)),
                        pieces = std::move(tail_pieces), d](char* tail) {
      for (const TailPiece& p : pieces) {
        rpc::EncodeMatrixTo(output.get() + p.row_begin * d, p.rows, d, p.dtype, tail + p.offset);
      }
    };
  }
  work->sink->Reply(std::move(work->response), std::move(reply_tail));
}

const ExpertCounters* ExpertServiceImpl::counters(int layer, int expert) const {
  auto it = counters_.find({layer, expert});
  return it == counters_.end() ? nullptr : it->second.get();
}

ExpertServerStats ExpertServiceImpl::Stats() const {
  ExpertServerStats stats;
  for (const auto& [key, c] : counters_) {
    stats.experts.push_back({.layer = key.first,
                             .expert = key.second,
                             .calls = c->calls.load(std::memory_order_relaxed),
                             .tokens = c->tokens.load(std::memory_order_relaxed),
                             .in_flight = c->in_flight.load(std::memory_order_relaxed),
                             .busy_micros = c->busy_micros.load(std::memory_order_relaxed)});
  }
  stats.rejected_calls = rejected_calls_.load(std::memory_order_relaxed);
  stats.queued_calls = workers_.queued();
  return stats;
}

}  // namespace switchyard
