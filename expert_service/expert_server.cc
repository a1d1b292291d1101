#include "expert_service/expert_server.h"

#include <algorithm>
#include <chrono>

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

int64_t NowMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

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
      config_fingerprint_(config.Fingerprint()) {
  for (const auto& key : shard_.Held()) counters_[key] = std::make_unique<ExpertCounters>();
  const int workers = std::max(1, options_.workers);
  for (int i = 0; i < workers; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ExpertServiceImpl::~ExpertServiceImpl() { Shutdown(); }

void ExpertServiceImpl::Shutdown() {
  std::lock_guard<std::mutex> join_lock(join_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
  workers_.clear();
}

void ExpertServiceImpl::WorkerLoop() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      // Drain the queue before exiting so every accepted call is finished.
      if (queue_.empty()) return;
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();
  }
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

grpc::ServerUnaryReactor* ExpertServiceImpl::Forward(grpc::CallbackServerContext* context,
                                                     const v1::ForwardRequest* request,
                                                     v1::ForwardResponse* response) {
  const int64_t received = NowMicros();
  // Only cheap checks here, on gRPC's thread; decoding happens on a worker.
  if (!request->config_fingerprint().empty() &&
      request->config_fingerprint() != config_fingerprint_) {
    return Reject(context, absl::FailedPreconditionError(absl::StrCat(
                               "config fingerprint ", request->config_fingerprint(),
                               " does not match this shard's ", config_fingerprint_,
                               ": the caller and this expert shard serve different models")));
  }
  ExpertCounters* counters = nullptr;
  if (request->layer() < (1u << 30) && request->expert() < (1u << 30)) {
    const std::pair<int, int> key(static_cast<int>(request->layer()),
                                  static_cast<int>(request->expert()));
    if (auto it = counters_.find(key); it != counters_.end()) counters = it->second.get();
  }
  if (counters == nullptr) {
    return Reject(context, absl::NotFoundError(absl::StrCat(
                               "layer ", request->layer(), " expert ", request->expert(),
                               " is not held by this shard (it holds experts [",
                               absl::StrJoin(shard_.experts, ", "), "] of layers [",
                               shard_.layer_begin, ", ", shard_.layer_end, "))")));
  }
  const v1::DType dtype = request->hidden_states().dtype();
  if (dtype != v1::DTYPE_F32 && dtype != v1::DTYPE_BF16) {
    return Reject(context, absl::InvalidArgumentError(absl::StrCat(
                               "hidden_states: unsupported dtype ", v1::DType_Name(dtype),
                               " (expected DTYPE_F32 or DTYPE_BF16)")));
  }
  const v1::Tensor& x = request->hidden_states();
  if (x.shape_size() >= 1 && x.shape(0) > options_.max_forward_rows) {
    return Reject(context,
                  absl::InvalidArgumentError(absl::StrCat(
                      "hidden_states: ", x.shape(0), " rows, at most ", options_.max_forward_rows,
                      " per Forward call (the expert's --max-forward-rows)")));
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      rejected_calls_.fetch_add(1, std::memory_order_relaxed);
      reactor->Finish(rpc::ToGrpcStatus(absl::UnavailableError("expert shard is shutting down")));
      return reactor;
    }
    if (static_cast<int64_t>(queue_.size()) >= options_.max_queued_calls) {
      rejected_calls_.fetch_add(1, std::memory_order_relaxed);
      reactor->Finish(rpc::ToGrpcStatus(absl::ResourceExhaustedError(
          absl::StrCat("expert shard overloaded: ", queue_.size(), " calls queued"))));
      return reactor;
    }
    counters->in_flight.fetch_add(1, std::memory_order_relaxed);
    if (options_.metrics != nullptr) options_.metrics->CallAccepted();
    queue_.push_back(
        [=, this] { RunForward(context, request, response, reactor, counters, received); });
  }
  work_cv_.notify_one();
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
      if (status.ok()) {
        response->set_compute_micros(compute_micros);
        response->set_queue_micros(start - enqueued_micros);
        rpc::EncodeMatrix(out.data(), tokens, d, request->hidden_states().dtype(),
                          response->mutable_output());
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
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats.queued_calls = static_cast<int64_t>(queue_.size());
  }
  return stats;
}

}  // namespace switchyard
