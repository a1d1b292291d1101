#include "gateway/model_runner.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "gateway/moe_dispatch.h"

namespace switchyard {

absl::StatusOr<StepOutput> ModelRunner::Step(absl::Span<const StepInput> inputs, StepTrace* trace) {
  return RunStepContainingExpertFailures(
      inputs, [&](absl::Span<const StepInput> live) { return StepOnce(live, trace); });
}

absl::StatusOr<StepOutput> ModelRunner::StepOnce(absl::Span<const StepInput> inputs,
                                                 StepTrace* trace) {
  const ModelConfig& c = model_->config();
  const int D = c.hidden_size, E = c.num_local_experts, V = c.vocab_size;

  SY_ASSIGN_OR_RETURN(StepLayout layout, PrepareStep(c, inputs));
  const int tokens = layout.tokens;
  const std::vector<SequenceSlice>& slices = layout.slices;

  StepOutput out;
  std::vector<float> h(static_cast<size_t>(tokens) * D);              // [T, D]
  std::vector<float> x(static_cast<size_t>(tokens) * D);              // [T, D]
  std::vector<float> router_logits(static_cast<size_t>(tokens) * E);  // [T, E]
  model_->Embed(layout.ids.data(), tokens, h.data());
  if (trace != nullptr) {
    trace->router_logits.assign(c.num_hidden_layers, {});
    trace->routing.assign(c.num_hidden_layers, {});
  }
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    model_->AttentionBlock(layer, h.data(), tokens, slices, layout.positions.data());
    model_->RouterInput(layer, h.data(), tokens, x.data(), router_logits.data());
    Routing routing = RouteTopK(router_logits.data(), tokens, E, c.num_experts_per_tok);
    SY_RETURN_IF_ERROR(MoeBlock(layer, x.data(), routing, slices, h.data(), &out.expert_tokens,
                                &out.sequence_status));
    if (!out.sequence_status.empty()) return out;  // nothing committed; see StepAttempt
    if (trace != nullptr) {
      trace->router_logits[layer] = router_logits;
      trace->routing[layer] = std::move(routing);
    }
  }

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

absl::Status ModelRunner::MoeBlock(int layer, const float* x, const Routing& routing,
                                   absl::Span<const SequenceSlice> slices, float* h,
                                   int64_t* expert_tokens,
                                   std::vector<absl::Status>* sequence_status) {
  const ModelConfig& c = model_->config();
  const int D = c.hidden_size, E = c.num_local_experts;
  SY_ASSIGN_OR_RETURN(MoeDispatch plan, PlanMoeDispatch(routing.experts, routing.weights,
                                                        routing.tokens, routing.top_k, E));
  const size_t n = static_cast<size_t>(plan.total_rows()) * D;
  std::vector<float> grouped_in(n), grouped_out(n);  // [T K, D]
  GatherExpertRows(plan, x, D, grouped_in.data());
  const std::vector<ExpertBatch> batches =
      ExpertBatches(plan, grouped_in.data(), grouped_out.data(), D);
  for (const ExpertBatch& b : batches) {
    *expert_tokens += b.tokens;
    if (observer_ != nullptr) observer_->OnExpertTokens(layer, b.expert, b.tokens);
  }
  std::vector<absl::Status> batch_status;
  SY_RETURN_IF_ERROR(experts_->RunLayerPerBatch(layer, batches, &batch_status));
  if (std::any_of(batch_status.begin(), batch_status.end(),
                  [](const absl::Status& s) { return !s.ok(); })) {
    *sequence_status = SequencesOfFailedBatches(plan, batches, batch_status, slices);
    return absl::OkStatus();
  }
  // h[T, D] += Σ_k w[t, k] · expert_k(x[t])
  CombineExpertRows(plan, grouped_out.data(), D, h);
  return absl::OkStatus();
}

}  // namespace switchyard
