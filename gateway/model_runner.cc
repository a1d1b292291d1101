#include "gateway/model_runner.h"

#include <algorithm>
#include <future>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "gateway/moe_dispatch.h"

namespace switchyard {
namespace {

// One micro-batch of a step: whole sequences, rows [row_begin, row_begin +
// tokens) of the step, and its layer's MoE work while its experts run.
struct MicroBatch {
  int row_begin = 0;
  int tokens = 0;
  int slice_begin = 0;                // its first input
  std::vector<SequenceSlice> slices;  // row_begin relative to the micro-batch
  std::vector<float> x;               // [tokens, D]
  std::vector<float> router_logits;   // [tokens, E]
  MoeDispatch plan;
  std::vector<float> grouped_in, grouped_out;  // [tokens K, D]
  std::vector<ExpertBatch> batches;
  std::vector<absl::Status> batch_status;
  std::future<absl::Status> experts;  // valid while its expert calls may run
};

std::future<absl::Status> Ready(absl::Status status) {
  std::promise<absl::Status> done;
  done.set_value(std::move(status));
  return done.get_future();
}

}  // namespace

absl::StatusOr<StepOutput> ModelRunner::Step(absl::Span<const StepInput> inputs, StepTrace* trace) {
  return RunStepContainingExpertFailures(
      inputs, [&](absl::Span<const StepInput> live) { return StepOnce(live, trace); });
}

absl::StatusOr<StepOutput> ModelRunner::StepOnce(absl::Span<const StepInput> inputs,
                                                 StepTrace* trace) {
  const ModelConfig& c = model_->config();
  const int D = c.hidden_size, E = c.num_local_experts, V = c.vocab_size;
  const int K = c.num_experts_per_tok;

  SY_ASSIGN_OR_RETURN(StepLayout layout, PrepareStep(c, inputs));
  const int tokens = layout.tokens;
  const std::vector<SequenceSlice>& slices = layout.slices;

  // Past 16 tokens only where every product keeps rows independent of their
  // count (asked per step: the kernel level may change, remote shards join).
  const int max_split_tokens = max_micro_batches_ > 1 && tokens > kMaxMicroBatchedStepTokens
                                   ? MaxSplitStepTokens(model_->RowsIndependentOfCount() &&
                                                        experts_->RowsIndependentOfCount())
                                   : kMaxMicroBatchedStepTokens;
  const std::vector<int> bounds =
      SplitIntoMicroBatches(slices, tokens, max_micro_batches_, max_split_tokens);
  const int M = static_cast<int>(bounds.size()) - 1;
  const bool overlap = M > 1;
  std::vector<MicroBatch> mbs(M);
  for (int m = 0; m < M; ++m) {
    MicroBatch& mb = mbs[m];
    mb.slice_begin = bounds[m];
    mb.row_begin = bounds[m] < static_cast<int>(slices.size()) ? slices[bounds[m]].row_begin : 0;
    for (int b = bounds[m]; b < bounds[m + 1]; ++b) {
      SequenceSlice s = slices[b];
      s.row_begin -= mb.row_begin;
      mb.tokens += s.tokens;
      mb.slices.push_back(s);
    }
    if (M == 1) mb.tokens = tokens;
    mb.x.resize(static_cast<size_t>(mb.tokens) * D);
    mb.router_logits.resize(static_cast<size_t>(mb.tokens) * E);
  }

  StepOutput out;
  std::vector<float> h(static_cast<size_t>(tokens) * D);  // [T, D]
  model_->Embed(layout.ids.data(), tokens, h.data());
  if (trace != nullptr) {
    trace->router_logits.assign(c.num_hidden_layers,
                                std::vector<float>(static_cast<size_t>(tokens) * E));
    trace->routing.assign(c.num_hidden_layers, {});
    for (Routing& r : trace->routing) {
      r.tokens = tokens;
      r.top_k = K;
      r.experts.resize(static_cast<size_t>(tokens) * K);
      r.weights.resize(static_cast<size_t>(tokens) * K);
    }
  }

  // Waits for micro-batch `mb`'s expert calls; on success adds them to its
  // rows of h (h[t] += Σ_k w[t, k] · expert_k(x[t]), experts in index order
  // as the reference sums them); when calls failed, records the sequences
  // they carried in out.sequence_status and leaves h unusable.
  auto finish = [&](MicroBatch& mb) -> absl::Status {
    absl::Status status = mb.experts.get();
    mb.experts = {};
    SY_RETURN_IF_ERROR(status);
    if (std::any_of(mb.batch_status.begin(), mb.batch_status.end(),
                    [](const absl::Status& s) { return !s.ok(); })) {
      const std::vector<absl::Status> failed =
          SequencesOfFailedBatches(mb.plan, mb.batches, mb.batch_status, mb.slices);
      out.sequence_status.resize(slices.size());
      for (size_t i = 0; i < failed.size(); ++i) {
        if (!failed[i].ok()) out.sequence_status[mb.slice_begin + i] = failed[i];
      }
      return absl::OkStatus();
    }
    CombineExpertRows(mb.plan, mb.grouped_out.data(), D,
                      h.data() + static_cast<int64_t>(mb.row_begin) * D);
    return absl::OkStatus();
  };
  // Attention and routing of micro-batch `mb` for `layer`, then its expert
  // calls: in the background when micro-batches overlap.
  auto start = [&](MicroBatch& mb, int layer) -> absl::Status {
    float* hm = h.data() + static_cast<int64_t>(mb.row_begin) * D;
    model_->AttentionBlock(layer, hm, mb.tokens, mb.slices, layout.positions.data() + mb.row_begin);
    model_->RouterInput(layer, hm, mb.tokens, mb.x.data(), mb.router_logits.data());
    Routing routing = RouteTopK(mb.router_logits.data(), mb.tokens, E, K);
    if (trace != nullptr) {
      std::copy(mb.router_logits.begin(), mb.router_logits.end(),
                trace->router_logits[layer].begin() + static_cast<int64_t>(mb.row_begin) * E);
      Routing& r = trace->routing[layer];
      std::copy(routing.experts.begin(), routing.experts.end(),
                r.experts.begin() + static_cast<int64_t>(mb.row_begin) * K);
      std::copy(routing.weights.begin(), routing.weights.end(),
                r.weights.begin() + static_cast<int64_t>(mb.row_begin) * K);
    }
    SY_ASSIGN_OR_RETURN(mb.plan,
                        PlanMoeDispatch(routing.experts, routing.weights, mb.tokens, K, E));
    const size_t n = static_cast<size_t>(mb.plan.total_rows()) * D;
    mb.grouped_in.resize(n);
    mb.grouped_out.resize(n);
    GatherExpertRows(mb.plan, mb.x.data(), D, mb.grouped_in.data());
    mb.batches = ExpertBatches(mb.plan, mb.grouped_in.data(), mb.grouped_out.data(), D);
    for (const ExpertBatch& b : mb.batches) {
      out.expert_tokens += b.tokens;
      if (observer_ != nullptr) observer_->OnExpertTokens(layer, b.expert, b.tokens);
    }
    if (overlap) {
      mb.experts = experts_->StartLayerPerBatch(layer, mb.batches, &mb.batch_status);
    } else {
      mb.experts = Ready(experts_->RunLayerPerBatch(layer, mb.batches, &mb.batch_status));
    }
    return absl::OkStatus();
  };

  // Per layer, each micro-batch in turn: finish its previous layer, start
  // this one. An error or a failed expert stops the step (nothing committed,
  // see StepAttempt) once every call in flight is done with the buffers.
  absl::Status status;
  for (int layer = 0; layer < c.num_hidden_layers && status.ok(); ++layer) {
    for (MicroBatch& mb : mbs) {
      if (mb.experts.valid()) status = finish(mb);
      if (!status.ok() || !out.sequence_status.empty()) break;
      status = start(mb, layer);
      if (!status.ok()) break;
    }
    if (!out.sequence_status.empty()) break;
  }
  for (MicroBatch& mb : mbs) {
    if (!mb.experts.valid()) continue;
    if (status.ok()) {
      status = finish(mb);  // also records the failures of calls still in flight
    } else {
      mb.experts.wait();  // its buffers go away with the step
    }
  }
  SY_RETURN_IF_ERROR(status);
  if (!out.sequence_status.empty()) return out;  // nothing committed; see StepAttempt

  // Gather the rows whose logits are wanted, then one LM-head GEMM.
  const int logit_rows = static_cast<int>(layout.logit_rows.size());
  std::vector<float> rows(static_cast<size_t>(logit_rows) * D);  // [rows, D]
  for (int r = 0; r < logit_rows; ++r) {
    std::copy_n(h.data() + static_cast<int64_t>(layout.logit_rows[r]) * D, D,
                rows.data() + static_cast<int64_t>(r) * D);
  }
  out.logits_row_begin = layout.logits_row_begin;
  out.logits.resize(static_cast<size_t>(logit_rows) * V);
  model_->Logits(rows.data(), logit_rows, out.logits.data());

  for (const SequenceSlice& s : slices) s.kv->Commit(s.tokens);
  return out;
}

}  // namespace switchyard
