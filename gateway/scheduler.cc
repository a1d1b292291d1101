#include "gateway/scheduler.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace switchyard {

struct Scheduler::Sequence {
  RequestId id = 0;
  GenerationRequest request;
  std::shared_ptr<GenerationSink> sink;
  std::unique_ptr<SequenceKv> kv;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<IncrementalDecoder> decoder;
  std::vector<int32_t> stop_ids;  // sorted, unique: a binary search per generated token
  std::vector<int32_t> output;
  // The prompt, then every generated token: what the cache must hold. After a
  // preemption the cache is gone and this is prefilled again.
  std::vector<int32_t> context;
  bool counted = false;    // prompt tokens counted in the metrics (first admission)
  bool preempted = false;  // lost its cache in this step's planning
  std::string held;        // decoded text held back: it may begin a stop string
  absl::Time submitted;
  absl::Time first_token;
  absl::Time last_token;
  bool cancelled = false;
  bool done = false;

  int prompt_size() const { return static_cast<int>(request.prompt_ids.size()); }
  int worst_case_tokens() const { return prompt_size() + request.options.max_new_tokens; }
  int context_size() const { return static_cast<int>(context.size()); }
  // Positions of `context` already in the cache.
  int cached() const { return kv == nullptr ? 0 : kv->length(); }
};

namespace {

// Index of the earliest stop string in `text`, or npos.
size_t FindStop(const std::string& text, const std::vector<std::string>& stops) {
  size_t best = std::string::npos;
  for (const std::string& s : stops) best = std::min(best, text.find(s));
  return best;
}

// Length of the longest suffix of `text` that is a proper prefix of a stop
// string: text that must be held back until we know it is not a stop.
size_t HeldSuffix(const std::string& text, const std::vector<std::string>& stops) {
  size_t keep = 0;
  for (const std::string& s : stops) {
    for (size_t n = std::min(text.size(), s.size() - 1); n > keep; --n) {
      if (text.compare(text.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
    }
  }
  return keep;
}

}  // namespace

Scheduler::Scheduler(StepRunner* runner, KvCachePool* kv_pool, const Tokenizer* tokenizer,
                     const SchedulerOptions& options, GatewayMetrics* metrics)
    : runner_(runner),
      kv_pool_(kv_pool),
      tokenizer_(tokenizer),
      options_(options),
      metrics_(metrics) {
  // Below 1 the loop could never make progress and would spin: the gateway
  // refuses such flags, and a scheduler built in code takes the least that works.
  options_.max_running = std::max(1, options_.max_running);
  options_.max_step_tokens = std::max(1, options_.max_step_tokens);
  stats_.kv_capacity_tokens = kv_pool_->capacity_tokens();
  if (metrics_ != nullptr) {
    metrics_->kv_capacity_tokens.Set(kv_pool_->capacity_tokens());
    metrics_->kv_capacity_bytes.Set(
        static_cast<double>(kv_pool_->capacity_tokens() * kv_pool_->bytes_per_token()));
  }
  thread_ = std::thread([this] { Loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
  const absl::Status gone = absl::UnavailableError("the gateway is shutting down");
  for (auto& seq : waiting_) seq->sink->OnError(gone);
  for (auto& seq : running_) {
    if (!seq->done) seq->sink->OnError(gone);
  }
}

absl::StatusOr<Scheduler::RequestId> Scheduler::Submit(GenerationRequest request,
                                                       std::shared_ptr<GenerationSink> sink) {
  auto seq = std::make_unique<Sequence>();
  seq->request = std::move(request);
  seq->sink = std::move(sink);
  seq->submitted = absl::Now();
  // The cache hands out whole blocks, so compare what Reserve will take: a
  // request that passed a check on the unrounded count could never be admitted.
  const int64_t slots = KvCachePool::SlotsFor(seq->worst_case_tokens());
  if (slots > kv_pool_->capacity_tokens()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "prompt plus max_new_tokens (", seq->prompt_size(), " + ",
        seq->request.options.max_new_tokens, " = ", seq->worst_case_tokens(), " tokens, ", slots,
        " slots in blocks of ", KvCachePool::kBlockTokens, ") exceeds the KV cache capacity of ",
        kv_pool_->capacity_tokens(), " token slots"));
  }
  const int V = runner_->config().vocab_size;
  for (int32_t id : seq->request.prompt_ids) {
    if (id < 0 || id >= V) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token id ", id, " is outside the vocabulary [0, ", V, ")"));
    }
  }
  seq->stop_ids = seq->request.options.stop_token_ids;
  std::sort(seq->stop_ids.begin(), seq->stop_ids.end());
  seq->stop_ids.erase(std::unique(seq->stop_ids.begin(), seq->stop_ids.end()), seq->stop_ids.end());
  seq->context = seq->request.prompt_ids;
  seq->sampler = std::make_unique<Sampler>(seq->request.options.sampling);
  seq->decoder = std::make_unique<IncrementalDecoder>(tokenizer_, seq->request.prompt_ids);
  RequestId id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || draining_) return absl::UnavailableError("the gateway is shutting down");
    if (static_cast<int>(waiting_.size()) >= options_.max_queue) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "admission queue is full (", options_.max_queue, " requests waiting); retry later"));
    }
    id = seq->id = next_id_++;
    waiting_.push_back(std::move(seq));
    ++busy_;
    stats_.waiting = static_cast<int>(waiting_.size());
  }
  wake_.notify_all();
  return id;
}

void Scheduler::Cancel(RequestId id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_.push_back(id);
  }
  wake_.notify_all();
}

void Scheduler::StopAdmitting() {
  std::lock_guard<std::mutex> lock(mu_);
  draining_ = true;
}

absl::Status Scheduler::Drain(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  draining_ = true;
  const bool idle =
      wake_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return busy_ == 0; });
  if (!idle) {
    return absl::DeadlineExceededError(
        absl::StrCat(busy_, " requests still in flight after the drain timeout"));
  }
  return absl::OkStatus();
}

void Scheduler::AbortAll(absl::Status status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    draining_ = true;
    abort_status_ = std::move(status);
  }
  wake_.notify_all();
}

SchedulerStats Scheduler::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  SchedulerStats s = stats_;
  s.kv_used_tokens = kv_pool_->used_tokens();
  s.kv_live_sequences = kv_pool_->live_sequences();
  return s;
}

bool Scheduler::Admit() {
  while (static_cast<int>(running_.size()) < options_.max_running) {
    Sequence* next;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (waiting_.empty()) return true;
      // Only this thread removes from waiting_, so `next` stays the front.
      next = waiting_.front().get();
    }
    // Admit on what the sequence needs now (its context and the next
    // token), keeping one block of growth per running sequence free so that
    // a fresh admission does not force a preemption at the very next step.
    const int64_t need = KvCachePool::SlotsFor(next->context_size() + 1);
    const int64_t headroom = static_cast<int64_t>(running_.size()) * KvCachePool::kBlockTokens;
    if (kv_pool_->capacity_tokens() - kv_pool_->used_tokens() < need + headroom) {
      return false;  // FIFO: wait for running sequences to free their cache
    }
    // Reserving allocates: no lock held, so Submit and Cancel on gRPC
    // threads never wait behind it.
    std::unique_ptr<SequenceKv> kv = kv_pool_->NewSequence();
    // Blocks another sequence published for the same leading tokens are
    // shared, not prefilled again (a preempted sequence often finds its own).
    const int hit = kv->AttachCachedPrefix(next->context);
    if (!kv->Reserve(next->context_size()).ok()) return false;  // taken meanwhile
    if (hit > 0) {
      if (metrics_ != nullptr) metrics_->kv_prefix_hit_tokens.Increment(hit);
      std::lock_guard<std::mutex> lock(mu_);
      stats_.prefix_hit_tokens += hit;
    }
    next->kv = std::move(kv);
    next->preempted = false;
    if (metrics_ != nullptr && !next->counted) {
      metrics_->prompt_tokens.Increment(next->prompt_size());
    }
    next->counted = true;
    std::lock_guard<std::mutex> lock(mu_);
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    stats_.waiting = static_cast<int>(waiting_.size());
  }
  return true;
}

void Scheduler::Preempt(Sequence& seq) {
  seq.kv.reset();  // its context is prefilled again when it is admitted again
  seq.preempted = true;
  if (metrics_ != nullptr) metrics_->kv_preemptions.Increment();
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.preemptions;
}

void Scheduler::RequeuePreempted() {
  std::vector<std::unique_ptr<Sequence>> preempted;
  for (auto& seq : running_) {
    if (seq->preempted && !seq->done) preempted.push_back(std::move(seq));
  }
  if (preempted.empty()) return;
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
  // Oldest first, ahead of every request that was never admitted.
  std::sort(preempted.begin(), preempted.end(),
            [](const auto& a, const auto& b) { return a->id < b->id; });
  std::lock_guard<std::mutex> lock(mu_);
  waiting_.insert(waiting_.begin(), std::make_move_iterator(preempted.begin()),
                  std::make_move_iterator(preempted.end()));
  stats_.waiting = static_cast<int>(waiting_.size());
}

void Scheduler::Loop() {
  bool admission_blocked = false;  // the queue's head did not fit and nothing runs
  while (true) {
    std::vector<std::unique_ptr<Sequence>> dropped;  // cancelled while waiting
    std::vector<std::unique_ptr<Sequence>> aborted;  // waiting when AbortAll ran
    absl::Status abort;
    {
      std::unique_lock<std::mutex> lock(mu_);
      const auto has_work = [&] {
        return stopping_ || (!waiting_.empty() && !admission_blocked) || !running_.empty() ||
               !cancelled_.empty();
      };
      if (admission_blocked) {
        // Only cache held outside this scheduler can block an idle queue
        // (Submit refuses what can never fit): poll for it, never spin.
        wake_.wait_for(lock, std::chrono::milliseconds(10), has_work);
      } else {
        wake_.wait(lock, has_work);
      }
      if (stopping_) return;
      for (RequestId id : cancelled_) {
        auto it = std::find_if(waiting_.begin(), waiting_.end(),
                               [&](const auto& s) { return s->id == id; });
        if (it != waiting_.end()) {
          dropped.push_back(std::move(*it));
          waiting_.erase(it);
          continue;
        }
        for (auto& seq : running_) {
          if (seq->id == id) seq->cancelled = true;
        }
      }
      cancelled_.clear();
      abort = abort_status_;
      if (!abort.ok()) {
        for (auto& seq : waiting_) aborted.push_back(std::move(seq));
        waiting_.clear();
      }
      stats_.waiting = static_cast<int>(waiting_.size());
    }
    for (auto& seq : dropped) Finish(*seq, FinishReason::kCancelled);
    for (auto& seq : running_) {
      if (seq->cancelled && !seq->done) Finish(*seq, FinishReason::kCancelled);
    }
    if (!abort.ok()) {
      for (auto& seq : aborted) Fail(*seq, abort);
      for (auto& seq : running_) {
        if (!seq->done) Fail(*seq, abort);
      }
    }
    admission_blocked = !Admit() && running_.empty();

    if (!running_.empty()) RunStep();
    RequeuePreempted();

    const size_t before = running_.size() + dropped.size() + aborted.size();
    running_.erase(
        std::remove_if(running_.begin(), running_.end(), [](const auto& s) { return s->done; }),
        running_.end());
    std::lock_guard<std::mutex> lock(mu_);
    stats_.running = static_cast<int>(running_.size());
    busy_ -= static_cast<int>(before - running_.size());
    if (metrics_ != nullptr) {
      metrics_->running_sequences.Set(static_cast<double>(running_.size()));
      metrics_->waiting_requests.Set(static_cast<double>(waiting_.size()));
      metrics_->kv_used_tokens.Set(static_cast<double>(kv_pool_->used_tokens()));
      const int64_t cached = kv_pool_->cached_blocks();
      metrics_->kv_blocks_used.Set(
          static_cast<double>(kv_pool_->total_blocks() - kv_pool_->free_blocks()));
      metrics_->kv_blocks_cached.Set(static_cast<double>(cached));
      metrics_->kv_blocks_free.Set(static_cast<double>(kv_pool_->free_blocks() - cached));
    }
    if (before != running_.size()) wake_.notify_all();
  }
}

bool Scheduler::MakeRoom(Sequence& seq, int length, std::vector<PlannedInput>& plan) {
  while (!seq.kv->Reserve(length).ok()) {
    // Preempt the newest sequence that holds cache: the oldest always
    // progresses, and Submit made sure each request fits the cache alone.
    Sequence* victim = nullptr;
    for (auto& other : running_) {
      if (other->done || other->kv == nullptr) continue;
      if (victim == nullptr || other->id > victim->id) victim = other.get();
    }
    Preempt(*victim);
    plan.erase(std::remove_if(plan.begin(), plan.end(),
                              [&](const PlannedInput& p) { return p.seq == victim; }),
               plan.end());
    if (victim == &seq) return false;
  }
  return true;
}

void Scheduler::RunStep() {
  // Oldest first: when the cache runs out, the newest give theirs up.
  std::vector<Sequence*> order;
  for (auto& seq : running_) {
    if (!seq->done) order.push_back(seq.get());
  }
  std::sort(order.begin(), order.end(), [](Sequence* a, Sequence* b) { return a->id < b->id; });

  // Decodes first (one token each), then prompt chunks (a preempted
  // sequence's whole context counts as prompt), within the budget.
  std::vector<PlannedInput> plan;
  int budget = options_.max_step_tokens;
  for (Sequence* seq : order) {
    if (seq->kv == nullptr || seq->context_size() - seq->cached() != 1 || seq->output.empty()) {
      continue;
    }
    if (!MakeRoom(*seq, seq->cached() + 1, plan)) continue;
    plan.push_back({seq, 1});
    --budget;
  }
  for (Sequence* seq : order) {
    if (budget <= 0) break;
    if (seq->kv == nullptr) continue;
    const int pending = seq->context_size() - seq->cached();
    if (pending == 0 || (pending == 1 && !seq->output.empty())) continue;
    const int chunk = std::min(budget, pending);
    if (!MakeRoom(*seq, seq->cached() + chunk, plan)) continue;
    plan.push_back({seq, chunk});
    budget -= chunk;
  }
  if (plan.empty()) return;

  std::vector<StepInput> inputs;
  for (const PlannedInput& p : plan) {
    const bool completes = p.seq->cached() + p.tokens == p.seq->context_size();
    inputs.push_back({p.seq->kv.get(),
                      absl::MakeConstSpan(p.seq->context).subspan(p.seq->cached(), p.tokens),
                      completes ? LogitsWanted::kLast : LogitsWanted::kNone});
  }
  absl::StatusOr<StepOutput> out = runner_->Step(inputs);
  int step_tokens = 0;
  for (const StepInput& in : inputs) step_tokens += static_cast<int>(in.tokens.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.steps;
    stats_.step_tokens_total += step_tokens;
  }
  if (metrics_ != nullptr) metrics_->step_tokens.Observe(step_tokens);
  if (!out.ok()) {
    for (const PlannedInput& p : plan) Fail(*p.seq, out.status());
    return;
  }
  const int V = runner_->config().vocab_size;
  for (size_t i = 0; i < plan.size(); ++i) {
    Sequence& seq = *plan[i].seq;
    if (!out->ok(i)) {  // an expert call carrying its tokens failed: it alone ends
      Fail(seq, out->sequence_status[i]);
      continue;
    }
    // Full blocks become reusable by later requests with the same prefix.
    seq.kv->Publish(seq.context);
    if (inputs[i].logits == LogitsWanted::kNone) continue;
    Advance(seq, out->logits.data() + static_cast<int64_t>(out->logits_row_begin[i]) * V);
  }
}

void Scheduler::Advance(Sequence& seq, const float* logits) {
  const GenerationRequest& r = seq.request;
  const int V = runner_->config().vocab_size;
  SampledToken next = seq.sampler->Sample(absl::MakeConstSpan(logits, V), r.prompt_ids, seq.output,
                                          r.return_logprobs ? r.top_logprobs : 0);
  const absl::Time now = absl::Now();
  if (seq.output.empty()) {
    seq.first_token = now;
    if (metrics_ != nullptr) {
      metrics_->time_to_first_token.Observe(absl::ToDoubleSeconds(now - seq.submitted));
    }
  } else if (metrics_ != nullptr) {
    metrics_->inter_token_latency.Observe(absl::ToDoubleSeconds(now - seq.last_token));
  }
  seq.last_token = now;
  seq.output.push_back(next.id);
  seq.context.push_back(next.id);
  if (metrics_ != nullptr) metrics_->generated_tokens.Increment();

  TokenEvent event;
  event.token_ids.push_back(next.id);
  if (r.return_logprobs) event.logprobs.push_back({next.id, next.logprob, std::move(next.top)});

  const bool eos = !r.options.ignore_eos && next.id == tokenizer_->eos_id();
  const bool stop_id = std::binary_search(seq.stop_ids.begin(), seq.stop_ids.end(), next.id);
  if (eos || stop_id) {
    seq.sink->OnTokens(event);
    Finish(seq, eos ? FinishReason::kEos : FinishReason::kStopSequence);
    return;
  }
  absl::StatusOr<std::string> piece = seq.decoder->Push(next.id);
  if (!piece.ok()) {  // not reachable for a sampled id; never crash on it
    seq.sink->OnError(piece.status());
    seq.done = true;
    seq.kv.reset();
    return;
  }
  seq.held += *piece;
  if (size_t at = FindStop(seq.held, r.stop); at != std::string::npos) {
    event.text_delta = seq.held.substr(0, at);
    seq.held.clear();
    seq.sink->OnTokens(event);
    Finish(seq, FinishReason::kStopSequence);
    return;
  }
  const size_t keep = HeldSuffix(seq.held, r.stop);
  event.text_delta = seq.held.substr(0, seq.held.size() - keep);
  seq.held.erase(0, seq.held.size() - keep);
  seq.sink->OnTokens(event);
  if (static_cast<int>(seq.output.size()) >= r.options.max_new_tokens) {
    Finish(seq, FinishReason::kLength);
  }
}

void Scheduler::Fail(Sequence& seq, const absl::Status& status) {
  seq.done = true;
  seq.kv.reset();
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.requests_failed;
  }
  seq.sink->OnError(status);
}

void Scheduler::Finish(Sequence& seq, FinishReason reason) {
  FinishEvent event;
  if (reason != FinishReason::kStopSequence) {
    // Release held text and whatever the decoder still holds, unless it
    // completes a stop string after all.
    std::string tail = seq.held + seq.decoder->Finish();
    if (size_t at = FindStop(tail, seq.request.stop); at != std::string::npos) {
      tail.resize(at);
      if (reason != FinishReason::kCancelled) reason = FinishReason::kStopSequence;
    }
    event.text_delta = std::move(tail);
  }
  seq.held.clear();
  event.reason = reason;
  event.prompt_tokens = seq.prompt_size();
  event.completion_tokens = static_cast<int>(seq.output.size());
  const absl::Time now = absl::Now();
  event.total = now - seq.submitted;
  event.time_to_first_token =
      seq.output.empty() ? absl::ZeroDuration() : seq.first_token - seq.submitted;
  if (metrics_ != nullptr) metrics_->request_duration.Observe(absl::ToDoubleSeconds(event.total));
  seq.done = true;
  seq.kv.reset();  // free the cache and count the request before telling anyone
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.requests_finished;
    if (reason == FinishReason::kCancelled) ++stats_.requests_cancelled;
  }
  seq.sink->OnFinish(event);
}

}  // namespace switchyard
