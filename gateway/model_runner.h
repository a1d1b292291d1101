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
// Thread-safety: Step is thread-compatible; callers serialise steps (the
// scheduler runs one at a time). The model and backend may be shared.
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
  // `observer` (optional, not owned) is told the tokens routed per (layer, expert).
  ModelRunner(const AttentionModel* model, ExpertBackend* experts,
              RoutingObserver* observer = nullptr)
      : model_(model), experts_(experts), observer_(observer) {}

  absl::StatusOr<StepOutput> Step(absl::Span<const StepInput> inputs,
                                  StepTrace* trace = nullptr) override;
  const ModelConfig& config() const override { return model_->config(); }

 private:
  // One attempt at the step (StepAttempt, gateway/step_runner.h): stops at
  // the first layer where an expert call failed, committing nothing.
  absl::StatusOr<StepOutput> StepOnce(absl::Span<const StepInput> inputs, StepTrace* trace);
  // h[T, D] += Σ_k weight[t, k] · expert_k(x[t]), experts in index order as
  // the reference implementation sums them. When expert calls fail, fills
  // `sequence_status` (per slice) instead and leaves h unusable.
  absl::Status MoeBlock(int layer, const float* x, const Routing& routing,
                        absl::Span<const SequenceSlice> slices, float* h, int64_t* expert_tokens,
                        std::vector<absl::Status>* sequence_status);

  const AttentionModel* model_;
  ExpertBackend* experts_;
  RoutingObserver* observer_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_MODEL_RUNNER_H_
