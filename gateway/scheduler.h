// Continuous batching over one StepRunner (CPU or CUDA).
//
// Requests join and leave at step boundaries. Each step carries one decode
// token for every sequence past its prompt, then prompt chunks of admitted
// sequences (oldest first) until the per-step token budget is spent, so a
// long prompt is prefilled over several steps without stalling decodes.
//
// KV cache policy: a request is admitted when the cache has room for what
// it needs now (its prompt and first token, rounded up to whole blocks) plus
// one block of growth per running sequence; its cache then grows block by
// block as it generates. When a step cannot grow a sequence's cache, the
// newest sequences are preempted: their cache is freed and they go back to
// the front of the queue, keeping the tokens they have generated (and their
// sampler's state). Readmitted, they prefill prompt + generated tokens again
// and go on exactly where they stopped: nothing is sent twice or lost, and
// every request still gives exactly the tokens of a solo run. The oldest
// running sequence is never preempted, and a request whose worst case
// (prompt + max_new_tokens in whole blocks) exceeds the whole cache is
// refused at once with RESOURCE_EXHAUSTED, so every admitted request
// completes. Requests wait in a FIFO queue of bounded length
// (RESOURCE_EXHAUSTED past it). The cache is reserved on the scheduler
// thread without the lock, so Submit and Cancel never wait for it.
//
// Prefix reuse: after each step a sequence's full cache blocks are published
// under the hash of their token prefix, and an admitted sequence whose
// context starts with published blocks shares them instead of prefilling
// those tokens (see KvCachePool; host and device storage alike).
//
// A cancelled request (client gone, deadline passed) leaves at the next step
// boundary and frees its cache at once. If an expert call fails after its
// retries, only the requests with tokens in it end, with its error (e.g.
// UNAVAILABLE naming the expert and its address), and free their cache; the
// others in the step go on as if those had not been in it
// (StepOutput::sequence_status). A step that fails as a whole ends every
// request in it.
//
// Thread-safety: Submit, Cancel and Stats are thread-safe. Sink callbacks run
// on the scheduler thread, in order per request; they must not block.
#ifndef SWITCHYARD_GATEWAY_SCHEDULER_H_
#define SWITCHYARD_GATEWAY_SCHEDULER_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "attention_service/kv_cache.h"
#include "core/tokenizer.h"
#include "gateway/gateway_metrics.h"
#include "gateway/generate.h"
#include "gateway/sampler.h"
#include "gateway/step_runner.h"

namespace switchyard {

// Each at least 1 (the gateway checks its flags, gateway_server.h; the
// Scheduler raises max_running and max_step_tokens below 1 to 1).
struct SchedulerOptions {
  int max_queue = 256;        // waiting requests before RESOURCE_EXHAUSTED
  int max_running = 64;       // sequences in one step
  int max_step_tokens = 512;  // tokens in one step (decodes + prefill chunks)
};

// A validated generation request.
struct GenerationRequest {
  std::vector<int32_t> prompt_ids;  // non-empty, ids < V
  GenerateOptions options;          // max_new_tokens, sampling, stop ids, ignore_eos
  std::vector<std::string> stop;    // stop strings (non-empty, valid UTF-8)
  bool return_logprobs = false;
  int top_logprobs = 0;
  std::string request_id;  // for logs
};

struct TokenLogprobs {
  int32_t id = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;
};

// What one scheduler step produced for one request.
struct TokenEvent {
  std::string text_delta;  // whole UTF-8 characters; may be empty
  std::vector<int32_t> token_ids;
  std::vector<TokenLogprobs> logprobs;  // parallel to token_ids when requested
};

struct FinishEvent {
  FinishReason reason = FinishReason::kLength;
  std::string text_delta;  // text released at the end (held-back stop-string prefix etc.)
  int prompt_tokens = 0;
  int completion_tokens = 0;
  absl::Duration time_to_first_token;  // from submission
  absl::Duration total;                // from submission
};

// Receives one request's events; exactly one OnFinish or OnError ends them.
class GenerationSink {
 public:
  virtual ~GenerationSink() = default;
  virtual void OnTokens(const TokenEvent& event) = 0;
  virtual void OnFinish(const FinishEvent& event) = 0;
  virtual void OnError(const absl::Status& status) = 0;
};

// Counters for introspection and metrics; a consistent snapshot.
struct SchedulerStats {
  int waiting = 0;
  int running = 0;
  int64_t kv_used_tokens = 0;
  int64_t kv_capacity_tokens = 0;
  int64_t kv_live_sequences = 0;
  int64_t steps = 0;
  int64_t step_tokens_total = 0;
  int64_t requests_finished = 0;
  int64_t requests_cancelled = 0;
  int64_t requests_failed = 0;
  int64_t preemptions = 0;        // sequences that gave up their cache to older ones
  int64_t prefix_hit_tokens = 0;  // prompt positions taken from cached prefix blocks
};

class Scheduler {
 public:
  using RequestId = uint64_t;

  // `metrics` (optional, not owned) receives token counts, latencies, queue
  // and cache gauges.
  Scheduler(StepRunner* runner, KvCachePool* kv_pool, const Tokenizer* tokenizer,
            const SchedulerOptions& options, GatewayMetrics* metrics = nullptr);
  ~Scheduler();  // stops the loop; unfinished requests end with UNAVAILABLE

  // Queues a request. RESOURCE_EXHAUSTED if the queue is full or the request
  // can never fit the KV cache. The sink gets every event of the request.
  absl::StatusOr<RequestId> Submit(GenerationRequest request, std::shared_ptr<GenerationSink> sink);
  // Ends the request at the next step boundary with FinishReason::kCancelled.
  // Unknown or finished ids are ignored.
  void Cancel(RequestId id);

  // From now on Submit refuses new requests with UNAVAILABLE.
  void StopAdmitting();
  // Refuses new requests (UNAVAILABLE) and waits up to `timeout` for queued
  // and running ones to finish. DEADLINE_EXCEEDED if some are still going.
  absl::Status Drain(absl::Duration timeout);

  // Ends every queued and running request with `status` (an error) at the
  // next step boundary, and refuses new ones: what a drain whose grace ran
  // out does, so clients learn why rather than seeing a cut connection.
  void AbortAll(absl::Status status);

  SchedulerStats Stats() const;
  const SchedulerOptions& options() const { return options_; }

 private:
  struct Sequence;
  struct PlannedInput {
    Sequence* seq;
    int tokens;
  };

  void Loop();
  // Moves waiting requests into the running set while the cache allows;
  // false when the queue's head does not fit now. Takes mu_ only briefly:
  // the cache is reserved (allocated and zeroed) without it.
  bool Admit();
  // Plans one step (making room in the cache, preempting if it must) and runs it.
  void RunStep();
  // Grows `seq`'s cache to `length` positions, preempting the newest
  // sequences (and dropping them from `plan`) until it fits. False if `seq`
  // itself was preempted.
  bool MakeRoom(Sequence& seq, int length, std::vector<PlannedInput>& plan);
  // Frees `seq`'s cache; RequeuePreempted then moves it to the queue's front.
  void Preempt(Sequence& seq);
  void RequeuePreempted();
  // Samples, detokenizes and checks stop conditions after a step.
  void Advance(Sequence& seq, const float* logits);
  void Finish(Sequence& seq, FinishReason reason);
  // Ends `seq` with an error and frees its cache.
  void Fail(Sequence& seq, const absl::Status& status);

  StepRunner* runner_;
  KvCachePool* kv_pool_;
  const Tokenizer* tokenizer_;
  SchedulerOptions options_;
  GatewayMetrics* metrics_;

  mutable std::mutex mu_;
  std::condition_variable wake_;
  bool stopping_ = false;
  bool draining_ = false;
  absl::Status abort_status_;  // guarded by mu_; an error once AbortAll ran
  int busy_ = 0;               // waiting + running, guarded by mu_
  RequestId next_id_ = 1;
  std::deque<std::unique_ptr<Sequence>> waiting_;   // guarded by mu_
  std::vector<RequestId> cancelled_;                // guarded by mu_
  std::vector<std::unique_ptr<Sequence>> running_;  // scheduler thread only
  SchedulerStats stats_;                            // guarded by mu_
  std::thread thread_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_SCHEDULER_H_
