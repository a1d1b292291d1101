// One forward step of the whole model over a batch of sequences.
//
// A step mixes prompt chunks and single decode tokens from many sequences,
// each with its own KV cache. Per layer the runner runs attention, routes
// every token to its top-K experts, sends each expert its rows through the
// ExpertBackend, and combines the outputs with the router weights.
//
// Legend: T tokens in the step, D hidden, E experts, K experts per token,
// V vocabulary.
//
// With max_micro_batches > 1 a step of several sequences runs as
// micro-batches that ping-pong (gateway/step_runner.h,
// SplitIntoMicroBatches): per layer, micro-batch i waits for its experts of
// the previous layer, combines them, computes attention and routing and
// starts its expert calls (ExpertBackend::StartLayerPerBatch) before
// micro-batch i + 1 does the same, so the gateway computes while the
// experts of the others are in flight and the experts of all micro-batches
// overlap. Results are bit-for-bit those of one micro-batch.
//
// Thread-safety: Step is thread-compatible; callers serialise steps (the
// scheduler runs one at a time). The model and backend may be shared (the
// backend must accept concurrent calls, as ExpertBackend promises).
#ifndef SWITCHYARD_GATEWAY_MODEL_RUNNER_H_
#define SWITCHYARD_GATEWAY_MODEL_RUNNER_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "attention_service/attention_model.h"
#include "attention_service/kv_cache.h"
#include "attention_service/router.h"
#include "expert_service/expert_backend.h"
#include "gateway/step_runner.h"

namespace switchyard {

// The CPU implementation of StepRunner.
class ModelRunner : public StepRunner {
 public:
  // `observer` (optional, not owned) is told the tokens routed per (layer,
  // expert). `max_micro_batches` (>= 1; default 1, no overlap): the most
  // micro-batches a step is split into (ResolveMicroBatches gives the
  // gateway's --micro-batches default).
  ModelRunner(const AttentionModel* model, ExpertBackend* experts,
              RoutingObserver* observer = nullptr, int max_micro_batches = 1)
      : model_(model),
        experts_(experts),
        observer_(observer),
        max_micro_batches_(max_micro_batches < 1 ? 1 : max_micro_batches) {}

  absl::StatusOr<StepOutput> Step(absl::Span<const StepInput> inputs,
                                  StepTrace* trace = nullptr) override;
  const ModelConfig& config() const override { return model_->config(); }

 private:
  // One attempt at the step (StepAttempt, gateway/step_runner.h): stops at
  // the first layer where an expert call failed, committing nothing.
  absl::StatusOr<StepOutput> StepOnce(absl::Span<const StepInput> inputs, StepTrace* trace);

  const AttentionModel* model_;
  ExpertBackend* experts_;
  RoutingObserver* observer_;
  int max_micro_batches_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_MODEL_RUNNER_H_
