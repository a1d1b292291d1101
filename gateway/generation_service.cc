#include "gateway/generation_service.h"

#include <atomic>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "core/version.h"
#include "rpc/status.h"

namespace switchyard {
namespace {

v1::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case FinishReason::kStopSequence:
      return v1::FINISH_REASON_STOP_SEQUENCE;
    case FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

void FillLogprobs(const Tokenizer& tokenizer, const std::vector<TokenLogprobs>& in,
                  google::protobuf::RepeatedPtrField<v1::TokenLogprob>* out) {
  for (const TokenLogprobs& lp : in) {
    v1::TokenLogprob* p = out->Add();
    p->set_token_id(lp.id);
    p->set_token(tokenizer.IdToToken(lp.id).value_or(""));
    p->set_logprob(lp.logprob);
    for (const auto& [id, logprob] : lp.top) {
      v1::TopLogprob* t = p->add_top();
      t->set_token_id(id);
      t->set_token(tokenizer.IdToToken(id).value_or(""));
      t->set_logprob(logprob);
    }
  }
}

// Counts a finished request under its method and outcome.
void CountRequest(GatewayMetrics* metrics, const char* method, const std::string& outcome) {
  if (metrics != nullptr) metrics->Requests(method, outcome).Increment();
}

std::string FinishOutcome(FinishReason reason) {
  return reason == FinishReason::kCancelled ? "cancelled" : "ok";
}

// Cancels the scheduler request when the call is cancelled, whichever of
// "submitted" and "cancelled" happens first.
class CancelLink {
 public:
  explicit CancelLink(Scheduler* scheduler) : scheduler_(scheduler) {}
  void Submitted(Scheduler::RequestId id) {
    std::lock_guard<std::mutex> lock(mu_);
    id_ = id;
    if (cancelled_) scheduler_->Cancel(id);
  }
  void Cancel() {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    if (id_) scheduler_->Cancel(*id_);
  }

 private:
  Scheduler* scheduler_;
  std::mutex mu_;
  std::optional<Scheduler::RequestId> id_;
  bool cancelled_ = false;
};

// The lifetime of a generation call: gRPC holds one reference until OnDone
// and the scheduler's sink (if any) one until the scheduler drops it, so a
// late scheduler event never meets a deleted call. `Call` derives from this.
template <typename Call>
class SharedCall {
 public:
  void Ref() { refs_.fetch_add(1, std::memory_order_relaxed); }
  void Unref() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete static_cast<Call*>(this);
  }

 private:
  std::atomic<int> refs_{1};
};

// ---- Generate (unary) ----

// Lifetime: SharedCall; after OnDone the call ignores scheduler events (done_).
class UnaryCall final : public grpc::ServerUnaryReactor, public SharedCall<UnaryCall> {
 public:
  explicit UnaryCall(Scheduler* scheduler) : link(scheduler) {}
  void OnCancel() override { link.Cancel(); }
  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    Unref();
  }
  // Runs `fill` on the response and finishes with `status`, once, unless
  // gRPC is already done with the call.
  template <typename Fill>
  void FinishOnce(Fill fill, const grpc::Status& status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (done_ || finished_) return;
      finished_ = true;
      fill();
    }
    Finish(status);
  }

  CancelLink link;

 private:
  friend class SharedCall<UnaryCall>;
  ~UnaryCall() override = default;
  std::mutex mu_;
  bool finished_ = false;  // guarded by mu_
  bool done_ = false;      // guarded by mu_: OnDone ran, the response is gone
};

// Collects events into the response; finishes the call on the last one.
// Collects events into the response; finishes the call on the last one.
// Token events arrive on the scheduler thread, before the terminal one.
class UnarySink final : public GenerationSink {
 public:
  UnarySink(UnaryCall* call, v1::GenerateResponse* response, const Tokenizer* tokenizer,
            GatewayMetrics* metrics)
      : call_(call), response_(response), tokenizer_(tokenizer), metrics_(metrics) {
    call_->Ref();
  }
  ~UnarySink() override { call_->Unref(); }

  void OnTokens(const TokenEvent& e) override {
    text_.append(e.text_delta);
    for (int32_t id : e.token_ids) ids_.push_back(id);
    for (const auto& lp : e.logprobs) logprobs_.push_back(lp);
  }
  void OnFinish(const FinishEvent& e) override {
    CountRequest(metrics_, "Generate", FinishOutcome(e.reason));
    call_->FinishOnce(
        [&] {
          response_->mutable_text()->append(text_);
          response_->mutable_text()->append(e.text_delta);
          for (int32_t id : ids_) response_->add_token_ids(id);
          FillLogprobs(*tokenizer_, logprobs_, response_->mutable_logprobs());
          response_->set_finish_reason(ToProto(e.reason));
          response_->mutable_usage()->set_prompt_tokens(e.prompt_tokens);
          response_->mutable_usage()->set_completion_tokens(e.completion_tokens);
          response_->set_time_to_first_token_micros(
              absl::ToInt64Microseconds(e.time_to_first_token));
          response_->set_total_micros(absl::ToInt64Microseconds(e.total));
        },
        grpc::Status::OK);
  }
  void OnError(const absl::Status& status) override {
    CountRequest(metrics_, "Generate", OutcomeLabel(static_cast<int>(status.code())));
    call_->FinishOnce([] {}, rpc::ToGrpcStatus(status));
  }

 private:
  UnaryCall* call_;
  v1::GenerateResponse* response_;  // gRPC's; written only inside FinishOnce
  const Tokenizer* tokenizer_;
  GatewayMetrics* metrics_;
  // Gathered on the scheduler thread until the terminal event.
  std::string text_;
  std::vector<int32_t> ids_;
  std::vector<TokenLogprobs> logprobs_;
};

// ---- GenerateStream (server streaming) ----

// Writes queued messages one at a time; finishes after the last.
// Lifetime: SharedCall; after OnDone the call ignores scheduler events (done_).
class StreamCall final : public grpc::ServerWriteReactor<v1::GenerateStreamResponse>,
                         public SharedCall<StreamCall> {
 public:
  // A reader that falls behind by more than `max_queued_messages` messages or
  // `max_queued_bytes` bytes has its request cancelled and its stream ended
  // with RESOURCE_EXHAUSTED: the scheduler cannot wait for one slow client,
  // and the gateway does not buffer without limit.
  StreamCall(Scheduler* scheduler, int max_queued_messages, int64_t max_queued_bytes)
      : link(scheduler),
        max_queued_messages_(max_queued_messages),
        max_queued_bytes_(max_queued_bytes) {}

  // Queues `message` (if any); `last` ends the stream with `status` once
  // everything queued is written.
  void Enqueue(std::optional<v1::GenerateStreamResponse> message, bool last,
               grpc::Status status = grpc::Status::OK) {
    Action action;
    bool overflow = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (overflowed_) return;  // already ending; the cancelled request's events are dropped
      if (message && !broken_) {
        const int64_t bytes = static_cast<int64_t>(message->ByteSizeLong());
        if (static_cast<int64_t>(queue_.size()) >= max_queued_messages_ ||
            queued_bytes_ + bytes > max_queued_bytes_) {
          overflow = overflowed_ = true;
          terminal_ = true;
          final_status_ = grpc::Status(
              grpc::StatusCode::RESOURCE_EXHAUSTED,
              absl::StrCat("the client is not reading the stream: ", queue_.size(), " messages (",
                           queued_bytes_, " bytes) wait to be sent, at most ", max_queued_messages_,
                           " messages and ", max_queued_bytes_,
                           " bytes are kept; the request was cancelled"));
          // Keep only the write in flight (gRPC still holds a pointer to it).
          while (queue_.size() > (writing_ ? 1u : 0u)) {
            queue_.pop_back();
            queued_bytes_ -= sizes_.back();
            sizes_.pop_back();
          }
        } else {
          queued_bytes_ += bytes;
          queue_.push_back(std::move(*message));
          sizes_.push_back(bytes);
        }
      }
      if (last && !overflow) {
        terminal_ = true;
        final_status_ = std::move(status);
      }
      action = NextLocked();
    }
    if (overflow) link.Cancel();
    Run(action);
  }

  void OnWriteDone(bool ok) override {
    Action action;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      queued_bytes_ -= sizes_.front();
      queue_.pop_front();
      sizes_.pop_front();
      if (!ok) {  // the client is gone: stop writing, end the request
        broken_ = true;
        queue_.clear();
        sizes_.clear();
        queued_bytes_ = 0;
      }
      action = NextLocked();
    }
    if (!ok) link.Cancel();
    Run(action);
  }
  void OnCancel() override { link.Cancel(); }
  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    Unref();
  }

  CancelLink link;

 private:
  friend class SharedCall<StreamCall>;
  ~StreamCall() override = default;

  // What to do next, decided in the same critical section as the state
  // change that prompted it. Only the thread that claims the write or the
  // finish touches the call afterwards: once it finishes, gRPC may delete
  // it (OnDone) at any moment.
  struct Action {
    const v1::GenerateStreamResponse* write = nullptr;
    bool finish = false;
    grpc::Status status;
  };
  Action NextLocked() {
    Action a;
    if (writing_ || finished_ || done_) return a;
    if (!queue_.empty()) {
      writing_ = true;
      a.write = &queue_.front();  // deque keeps it in place until OnWriteDone pops it
    } else if (terminal_) {
      finished_ = true;
      a.finish = true;
      a.status =
          broken_ ? grpc::Status(grpc::StatusCode::CANCELLED, "client went away") : final_status_;
    }
    return a;
  }
  void Run(const Action& a) {
    if (a.write != nullptr) StartWrite(a.write);
    if (a.finish) Finish(a.status);
  }

  const int max_queued_messages_;
  const int64_t max_queued_bytes_;
  std::mutex mu_;
  std::deque<v1::GenerateStreamResponse> queue_;  // front: the write in flight, if writing_
  std::deque<int64_t> sizes_;                     // serialized size of each queued message
  int64_t queued_bytes_ = 0;                      // their sum
  bool overflowed_ = false;                       // the reader fell too far behind
  bool writing_ = false;
  bool terminal_ = false;
  bool finished_ = false;
  bool broken_ = false;
  bool done_ = false;  // OnDone ran: gRPC is finished with the call
  grpc::Status final_status_;
};

class StreamSink final : public GenerationSink {
 public:
  StreamSink(StreamCall* call, const Tokenizer* tokenizer, std::string request_id,
             std::vector<int32_t> prompt_ids, GatewayMetrics* metrics)
      : call_(call),
        tokenizer_(tokenizer),
        request_id_(std::move(request_id)),
        prompt_ids_(std::move(prompt_ids)),
        metrics_(metrics) {
    call_->Ref();
  }
  ~StreamSink() override { call_->Unref(); }

  void OnTokens(const TokenEvent& e) override {
    v1::GenerateStreamResponse m;
    AddPromptOnce(m);
    m.set_text_delta(e.text_delta);
    for (int32_t id : e.token_ids) m.add_token_ids(id);
    FillLogprobs(*tokenizer_, e.logprobs, m.mutable_logprobs());
    m.set_request_id(request_id_);
    call_->Enqueue(std::move(m), /*last=*/false);
  }
  void OnFinish(const FinishEvent& e) override {
    v1::GenerateStreamResponse m;
    AddPromptOnce(m);
    m.set_text_delta(e.text_delta);
    m.set_finish_reason(ToProto(e.reason));
    m.mutable_usage()->set_prompt_tokens(e.prompt_tokens);
    m.mutable_usage()->set_completion_tokens(e.completion_tokens);
    m.set_request_id(request_id_);
    CountRequest(metrics_, "GenerateStream", FinishOutcome(e.reason));
    call_->Enqueue(std::move(m), /*last=*/true);
  }
  void OnError(const absl::Status& status) override {
    CountRequest(metrics_, "GenerateStream", OutcomeLabel(static_cast<int>(status.code())));
    call_->Enqueue(std::nullopt, /*last=*/true, rpc::ToGrpcStatus(status));
  }

 private:
  // The first message carries the prompt's token ids.
  void AddPromptOnce(v1::GenerateStreamResponse& m) {
    if (prompt_sent_) return;
    prompt_sent_ = true;
    for (int32_t id : prompt_ids_) m.add_prompt_token_ids(id);
  }

  StreamCall* call_;
  const Tokenizer* tokenizer_;
  std::string request_id_;
  std::vector<int32_t> prompt_ids_;
  bool prompt_sent_ = false;  // scheduler thread only
  GatewayMetrics* metrics_;
};

}  // namespace

GenerationServiceImpl::GenerationServiceImpl(Scheduler* scheduler, const Tokenizer* tokenizer,
                                             const ModelConfig& config,
                                             GenerationServiceOptions options)
    : scheduler_(scheduler), tokenizer_(tokenizer), config_(config), options_(std::move(options)) {}

grpc::ServerUnaryReactor* GenerationServiceImpl::Generate(grpc::CallbackServerContext* context,
                                                          const v1::GenerateRequest* request,
                                                          v1::GenerateResponse* response) {
  auto* call = new UnaryCall(scheduler_);
  absl::StatusOr<GenerationRequest> validated = ValidateGenerateRequest(
      *request, *tokenizer_, config_, options_.limits, options_.chat_template);
  if (!validated.ok()) {
    CountRequest(options_.metrics, "Generate",
                 OutcomeLabel(static_cast<int>(validated.status().code())));
    call->Finish(rpc::ToGrpcStatus(validated.status()));
    return call;
  }
  response->set_request_id(request->request_id());
  for (int32_t id : validated->prompt_ids) response->add_prompt_token_ids(id);
  auto sink = std::make_shared<UnarySink>(call, response, tokenizer_, options_.metrics);
  absl::StatusOr<Scheduler::RequestId> id = scheduler_->Submit(*std::move(validated), sink);
  if (!id.ok()) {
    CountRequest(options_.metrics, "Generate", OutcomeLabel(static_cast<int>(id.status().code())));
    call->Finish(rpc::ToGrpcStatus(id.status()));
    return call;
  }
  call->link.Submitted(*id);
  return call;
}

grpc::ServerWriteReactor<v1::GenerateStreamResponse>* GenerationServiceImpl::GenerateStream(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto* call = new StreamCall(scheduler_, options_.limits.max_stream_queued_messages,
                              options_.limits.max_stream_queued_bytes);
  absl::StatusOr<GenerationRequest> validated = ValidateGenerateRequest(
      *request, *tokenizer_, config_, options_.limits, options_.chat_template);
  if (!validated.ok()) {
    CountRequest(options_.metrics, "GenerateStream",
                 OutcomeLabel(static_cast<int>(validated.status().code())));
    call->Enqueue(std::nullopt, /*last=*/true, rpc::ToGrpcStatus(validated.status()));
    return call;
  }
  auto sink = std::make_shared<StreamSink>(call, tokenizer_, request->request_id(),
                                           validated->prompt_ids, options_.metrics);
  absl::StatusOr<Scheduler::RequestId> id = scheduler_->Submit(*std::move(validated), sink);
  if (!id.ok()) {
    CountRequest(options_.metrics, "GenerateStream",
                 OutcomeLabel(static_cast<int>(id.status().code())));
    call->Enqueue(std::nullopt, /*last=*/true, rpc::ToGrpcStatus(id.status()));
    return call;
  }
  call->link.Submitted(*id);
  return call;
}

grpc::ServerUnaryReactor* GenerationServiceImpl::Tokenize(grpc::CallbackServerContext* context,
                                                          const v1::TokenizeRequest* request,
                                                          v1::TokenizeResponse* response) {
  auto* reactor = context->DefaultReactor();
  if (static_cast<int>(request->text().size()) > options_.limits.max_prompt_bytes) {
    reactor->Finish(grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("text: ", request->text().size(), " bytes, more than the limit of ",
                     options_.limits.max_prompt_bytes)));
    return reactor;
  }
  const bool special = request->has_add_special_tokens() ? request->add_special_tokens() : true;
  for (int32_t id : tokenizer_->Encode(request->text(), special)) {
    response->add_token_ids(id);
    response->add_tokens(tokenizer_->IdToToken(id).value_or(""));
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationServiceImpl::Detokenize(grpc::CallbackServerContext* context,
                                                            const v1::DetokenizeRequest* request,
                                                            v1::DetokenizeResponse* response) {
  auto* reactor = context->DefaultReactor();
  const bool skip = request->has_skip_special_tokens() ? request->skip_special_tokens() : true;
  std::vector<int32_t> ids(request->token_ids().begin(), request->token_ids().end());
  absl::StatusOr<std::string> text = tokenizer_->Decode(ids, skip);
  if (!text.ok()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 absl::StrCat("token_ids: ", text.status().message())));
    return reactor;
  }
  response->set_text(*text);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationServiceImpl::GetModelInfo(
    grpc::CallbackServerContext* context, const v1::GetModelInfoRequest* request,
    v1::ModelInfo* response) {
  response->set_model(options_.model_name);
  response->set_architecture("MixtralForCausalLM");
  response->set_vocab_size(config_.vocab_size);
  response->set_hidden_size(config_.hidden_size);
  response->set_num_layers(config_.num_hidden_layers);
  response->set_num_experts(config_.num_local_experts);
  response->set_experts_per_token(config_.num_experts_per_tok);
  response->set_max_context_tokens(config_.max_position_embeddings);
  response->set_max_new_tokens_limit(EffectiveMaxNewTokensLimit(options_.limits, config_));
  response->set_bos_token_id(tokenizer_->bos_id());
  response->set_eos_token_id(tokenizer_->eos_id());
  response->set_config_fingerprint(config_.Fingerprint());
  const std::vector<v1::ExpertRoute> routes =
      options_.live_expert_routes ? options_.live_expert_routes() : options_.expert_routes;
  for (const v1::ExpertRoute& r : routes) *response->add_experts() = r;
  response->set_version(Version());
  auto* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace switchyard
