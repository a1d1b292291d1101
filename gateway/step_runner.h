// The seam between scheduling and compute: one forward step over a batch of
// sequences. ModelRunner runs it on the CPU; the CUDA runner on a GPU. The
// scheduler and the generation loop only see this interface.
//
// Thread-safety: Step is thread-compatible (callers serialise steps).
#ifndef SWITCHYARD_GATEWAY_STEP_RUNNER_H_
#define SWITCHYARD_GATEWAY_STEP_RUNNER_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "attention_service/kv_cache.h"
#include "attention_service/router.h"
#include "core/model_config.h"
#include "expert_service/expert_backend.h"
#include "gateway/moe_dispatch.h"

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
  // Per input: OK, or why the step ended that sequence: an expert call that
  // carried one of its tokens failed after the backend's retries (e.g.
  // UNAVAILABLE "expert 3 (layer 1) unavailable: 10.0.0.7:50061: ..."). A
  // failed sequence's cache did not grow and it has no logits
  // (logits_row_begin -1); every other sequence got exactly what a step
  // without the failed ones gives. Empty when every sequence succeeded.
  std::vector<absl::Status> sequence_status;

  bool ok(size_t input) const { return sequence_status.empty() || sequence_status[input].ok(); }
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

// Micro-batch ping-pong (the --micro-batches flag): a step's sequences split
// into micro-batches so that while one micro-batch's expert calls are in
// flight the runner computes attention and routing of the next, and the
// experts of both run at once (MegaScale-Infer, SGLang two-batch overlap).
//
// Results are bit-for-bit those of one micro-batch: every row's attention,
// norm, router and combine depend on that row (and its own sequence's cache)
// alone, and the FP32/BF16 CPU products (core/cpu_ops.h) give every output
// row the same bits whatever the number of rows as long as that number is at
// most kSkinnyMaxTokens; above it some kernel paths switch to a BLAS GEMM
// with another summation order. So a step splits only when its tokens (hence
// every micro-batch's rows and every expert batch's rows, in the gateway and
// in a CPU expert service) stay at most kMaxMicroBatchedStepTokens: a step
// of decode tokens of up to 16 sequences, the latency-bound case where the
// hop to the experts matters most. A larger step runs as one micro-batch,
// except where every product is row-count invariant for any number of rows
// (cpu::RowsIndependentOfCount: BF16 weights on the AMX or AVX-512 kernels or
// in bf16 precision; the CPU runner asks its model and its ExpertBackend,
// which for remote experts asks every shard): then any step of 2+ sequences
// splits (MaxSplitStepTokens).
inline constexpr int kMaxMicroBatchedStepTokens = 16;  // == cpu::kSkinnyMaxTokens

// The most tokens a step may have and still split: no limit (INT_MAX) when
// `rows_independent_of_count` (every product of the step, in the gateway and
// in the experts, gives a row the same bits for any row count), else
// kMaxMicroBatchedStepTokens.
int MaxSplitStepTokens(bool rows_independent_of_count);

// The micro-batches of a step: boundaries b[0] = 0 < b[1] < ... < b[M] =
// slices.size() over the inputs (whole sequences, in input order), M at most
// `max_micro_batches` (>= 1) and at most the number of sequences, the
// micro-batches balanced by tokens. M = 1 when the step has more than
// `max_split_tokens` tokens (MaxSplitStepTokens; see above).
std::vector<int> SplitIntoMicroBatches(absl::Span<const SequenceSlice> slices, int tokens,
                                       int max_micro_batches,
                                       int max_split_tokens = kMaxMicroBatchedStepTokens);

// The gateway's --micro-batches: 0 (auto, the default) is 2 when some
// expert is on another host (a network round trip worth hiding) and 1 for
// local experts or experts on this host (the wait is the same cores
// computing: overlap measured 0.6-0.9x on 2 shared cores, README); N >= 1
// is at most N. Each step then splits as SplitIntoMicroBatches says (so a
// single sequence is always one).
int ResolveMicroBatches(int flag_value, bool experts_off_host);

// Per input (slices): the first error among the failed expert batches that
// carried one of its tokens; OK for sequences none of whose tokens were in a
// failed batch. `batches` are those ExpertBatches(plan, ...) built, with
// `batch_status` from ExpertBackend::RunLayerPerBatch.
std::vector<absl::Status> SequencesOfFailedBatches(const MoeDispatch& plan,
                                                   absl::Span<const ExpertBatch> batches,
                                                   absl::Span<const absl::Status> batch_status,
                                                   absl::Span<const SequenceSlice> slices);

// One attempt at a step over `inputs`: either a full StepOutput (every cache
// committed), an error for the whole step, or, when expert calls failed for
// some sequences, a StepOutput whose sequence_status names them and whose
// step committed nothing (no cache length changed, logits unusable).
using StepAttempt = std::function<absl::StatusOr<StepOutput>(absl::Span<const StepInput>)>;

// Contains expert failures: runs `attempt` over `inputs`; while an attempt
// reports failed sequences, drops them and runs the step again over the
// others, until an attempt succeeds for every sequence still in (at most one
// attempt per input). Returns the last attempt's output with sequence_status
// and logits_row_begin over all `inputs`.
//
// Why run the survivors again rather than finish the attempt without the
// failed ones: an attempt stops at the first layer with a failed expert, when
// the survivors' hidden states are half done and every layer before it has
// written K/V at the new positions of every sequence. Nothing was committed,
// so a fresh attempt from the survivors' committed lengths overwrites those
// positions and is exactly a step without the failed sequences, on any
// runner, with no partial layer left in a surviving cache. It costs the
// layers before the failure again, only when an expert call fails.
absl::StatusOr<StepOutput> RunStepContainingExpertFailures(absl::Span<const StepInput> inputs,
                                                           const StepAttempt& attempt);

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
  // (RESOURCE_EXHAUSTED) before any work. An expert call that fails ends only
  // the sequences whose tokens it carried (StepOutput::sequence_status); the
  // others complete the step. On success each surviving sequence's cache has
  // grown by its tokens; on error (the whole step) no cache length changes.
  virtual absl::StatusOr<StepOutput> Step(absl::Span<const StepInput> inputs,
                                          StepTrace* trace = nullptr) = 0;
  virtual const ModelConfig& config() const = 0;
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_STEP_RUNNER_H_
