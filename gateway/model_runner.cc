#include "gateway/model_runner.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace switchyard {

absl::StatusOr<StepOutput> ModelRunner::Step(absl::Span<const StepInput> inputs, StepTrace* trace) {
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
    SY_RETURN_IF_ERROR(MoeBlock(layer, x.data(), routing, h.data(), &out.expert_tokens));
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

absl::Status ModelRunner::MoeBlock(int layer, const float* x, const Routing& routing, float* h,
                                   int64_t* expert_tokens) {
  const ModelConfig& c = model_->config();
  const int D = c.hidden_size, E = c.num_local_experts, K = routing.top_k;
  const int T = routing.tokens;

  // Group (token, slot) pairs by expert.
  std::vector<std::vector<int>> rows_of(E);  // [E][N_e] token indices
  std::vector<std::vector<float>> weight_of(E);
  for (int t = 0; t < T; ++t) {
    for (int k = 0; k < K; ++k) {
      const int e = routing.experts[t * K + k];
      rows_of[e].push_back(t);
      weight_of[e].push_back(routing.weights[t * K + k]);
    }
  }
  std::vector<std::vector<float>> inputs(E), outputs(E);  // [E][N_e, D]
  std::vector<ExpertBatch> batches;
  for (int e = 0; e < E; ++e) {
    const int n = static_cast<int>(rows_of[e].size());
    if (n == 0) continue;
    inputs[e].resize(static_cast<size_t>(n) * D);
    outputs[e].resize(static_cast<size_t>(n) * D);
    for (int i = 0; i < n; ++i) {
      std::copy_n(x + static_cast<int64_t>(rows_of[e][i]) * D, D,
                  inputs[e].data() + static_cast<int64_t>(i) * D);
    }
    batches.push_back({e, n, inputs[e].data(), outputs[e].data()});
    *expert_tokens += n;
    if (metrics_ != nullptr) metrics_->RoutedTokens(layer, e).Increment(n);
  }
  SY_RETURN_IF_ERROR(experts_->RunLayer(layer, batches));

  std::vector<float> moe(static_cast<size_t>(T) * D, 0.0f);  // [T, D]
  for (int e = 0; e < E; ++e) {
    for (size_t i = 0; i < rows_of[e].size(); ++i) {
      float* dst = moe.data() + static_cast<int64_t>(rows_of[e][i]) * D;
      const float* src = outputs[e].data() + static_cast<int64_t>(i) * D;
      const float w = weight_of[e][i];
      for (int d = 0; d < D; ++d) dst[d] += w * src[d];
    }
  }
  for (int64_t i = 0; i < static_cast<int64_t>(T) * D; ++i) h[i] += moe[i];
  return absl::OkStatus();
}

}  // namespace switchyard
