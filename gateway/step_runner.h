// The seam between scheduling and compute: one forward step over a batch of
// sequences. ModelRunner runs it on the CPU; the CUDA runner on a GPU. The
// scheduler and the generation loop only see this interface.
//
// Thread-safety: Step is thread-compatible (callers serialise steps).
#ifndef SWITCHYARD_GATEWAY_STEP_RUNNER_H_
#define SWITCHYARD_GATEWAY_STEP_RUNNER_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "attention_service/kv_cache.h"
#include "attention_service/router.h"
#include "core/model_config.h"

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
  std::vector<float> logits;          // [rows, V], sequences in input order
  std::vector<int> logits_row_begin;  // per input: first row in `logits` (-1 if none)
  int64_t expert_tokens = 0;          // token-expert pairs sent to experts, all layers
};

// Optional per-layer record of the routing, for tests and metrics.
struct StepTrace {
  std::vector<std::vector<float>> router_logits;  // [L][T, E]
  std::vector<Routing> routing;                   // [L]
};

// A validated step, laid out row by row: what every StepRunner needs before
// it computes anything.
struct StepLayout {
  int tokens = 0;                     // T
  std::vector<SequenceSlice> slices;  // per input
  std::vector<int32_t> ids;           // [T]
  std::vector<int32_t> positions;     // [T]
  std::vector<int> logit_rows;        // rows of the step whose logits are wanted, in order
  std::vector<int> logits_row_begin;  // per input: first index into logit_rows (-1 if none)
};

// Validates `inputs` (INVALID_ARGUMENT: empty input, token id outside the
// vocabulary, sequence beyond the context) and reserves their cache
// (RESOURCE_EXHAUSTED), before any work. Cache lengths do not change.
absl::StatusOr<StepLayout> PrepareStep(const ModelConfig& config,
                                       absl::Span<const StepInput> inputs);

// Told what each step routes, e.g. to count tokens per (layer, expert) for
// metrics. Called on the thread that runs the step, before the experts run.
class RoutingObserver {
 public:
  virtual ~RoutingObserver() = default;
  virtual void OnExpertTokens(int layer, int expert, int tokens) = 0;
};

class StepRunner {
 public:
  virtual ~StepRunner() = default;

  // Runs one step. Validates token ids (INVALID_ARGUMENT) and reserves cache
  // (RESOURCE_EXHAUSTED) before any work; expert errors are returned as they
  // are. On success each sequence's cache has grown by its tokens; on error no
  // cache length changes.
  virtual absl::StatusOr<StepOutput> Step(absl::Span<const StepInput> inputs,
                                          StepTrace* trace = nullptr) = 0;
  virtual const ModelConfig& config() const = 0;
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_STEP_RUNNER_H_
