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
#include "gateway/expert_backend.h"
#include "gateway/gateway_metrics.h"

namespace switchyard {

enum class LogitsWanted { kNone, kLast, kAll };

// One sequence's part of a step: `tokens` are appended after the
// kv->length() positions already cached.
struct StepInput {
  SequenceKv* kv = nullptr;
  absl::Span<const int32_t> tokens;
  LogitsWanted logits = LogitsWanted::kLast;
};

struct StepOutput {
  std::vector<float> logits;         // [rows, V], sequences in input order
  std::vector<int> logits_row_begin;  // per input: first row in `logits` (-1 if none)
  int64_t expert_tokens = 0;          // token-expert pairs sent to experts, all layers
};

// Optional per-layer record of the routing, for tests and metrics.
struct StepTrace {
  std::vector<std::vector<float>> router_logits;  // [L][T, E]
  std::vector<Routing> routing;                   // [L]
};

class ModelRunner {
 public:
  // `metrics` (optional, not owned) receives the tokens routed per (layer, expert).
  ModelRunner(const AttentionModel* model, ExpertBackend* experts,
              GatewayMetrics* metrics = nullptr)
      : model_(model), experts_(experts), metrics_(metrics) {}

  // Runs one step. Validates token ids (INVALID_ARGUMENT) and reserves cache
  // (RESOURCE_EXHAUSTED) before any work; expert errors are returned as they
  // are. On success each sequence's cache has grown by its tokens; on error no
  // cache length changes.
  absl::StatusOr<StepOutput> Step(absl::Span<const StepInput> inputs,
                                  StepTrace* trace = nullptr);

  const ModelConfig& config() const { return model_->config(); }

 private:
  // h[T, D] += Σ_k weight[t, k] · expert_k(x[t]), experts in index order as
  // the reference implementation sums them.
  absl::Status MoeBlock(int layer, const float* x, const Routing& routing, float* h,
                        int64_t* expert_tokens);

  const AttentionModel* model_;
  ExpertBackend* experts_;
  GatewayMetrics* metrics_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_MODEL_RUNNER_H_
