#include "gateway/model_runner.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace switchyard {

absl::StatusOr<StepOutput> ModelRunner::Step(absl::Span<const StepInput> inputs,
                                             StepTrace* trace) {
  const ModelConfig& c = model_->config();
  const int D = c.hidden_size, E = c.num_local_experts, V = c.vocab_size;

  // Validate and lay out the batch before any work.
  std::vector<SequenceSlice> slices;
  int tokens = 0;
  int logit_rows = 0;
  for (size_t b = 0; b < inputs.size(); ++b) {
    const StepInput& in = inputs[b];
    if (in.kv == nullptr || in.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("step input ", b, " has no tokens"));
    }
    for (int32_t id : in.tokens) {
      if (id < 0 || id >= V) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " is outside the vocabulary [0, ", V, ")"));
      }
    }
    const int start = in.kv->length();
    const int end = start + static_cast<int>(in.tokens.size());
    if (end > c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence length ", end,
                                                     " exceeds the model's context of ",
                                                     c.max_position_embeddings, " tokens"));
    }
    slices.push_back({tokens, static_cast<int>(in.tokens.size()), start, in.kv});
    tokens += static_cast<int>(in.tokens.size());
    logit_rows += in.logits == LogitsWanted::kAll    ? static_cast<int>(in.tokens.size())
                  : in.logits == LogitsWanted::kLast ? 1
                                                     : 0;
  }
  for (const SequenceSlice& s : slices) {
    SY_RETURN_IF_ERROR(s.kv->Reserve(s.start_pos + s.tokens));
  }

  std::vector<int32_t> ids(tokens);        // [T]
  std::vector<int32_t> positions(tokens);  // [T]
  for (size_t b = 0; b < inputs.size(); ++b) {
    const SequenceSlice& s = slices[b];
    std::copy(inputs[b].tokens.begin(), inputs[b].tokens.end(), ids.begin() + s.row_begin);
    for (int i = 0; i < s.tokens; ++i) positions[s.row_begin + i] = s.start_pos + i;
  }

  StepOutput out;
  std::vector<float> h(static_cast<size_t>(tokens) * D);              // [T, D]
  std::vector<float> x(static_cast<size_t>(tokens) * D);              // [T, D]
  std::vector<float> router_logits(static_cast<size_t>(tokens) * E);  // [T, E]
  model_->Embed(ids.data(), tokens, h.data());
  if (trace != nullptr) {
    trace->router_logits.assign(c.num_hidden_layers, {});
    trace->routing.assign(c.num_hidden_layers, {});
  }
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    model_->AttentionBlock(layer, h.data(), tokens, slices, positions.data());
    model_->RouterInput(layer, h.data(), tokens, x.data(), router_logits.data());
    Routing routing = RouteTopK(router_logits.data(), tokens, E, c.num_experts_per_tok);
    SY_RETURN_IF_ERROR(MoeBlock(layer, x.data(), routing, h.data(), &out.expert_tokens));
    if (trace != nullptr) {
      trace->router_logits[layer] = router_logits;
      trace->routing[layer] = std::move(routing);
    }
  }

  // Gather the rows whose logits are wanted, then one LM-head GEMM.
  std::vector<float> rows(static_cast<size_t>(logit_rows) * D);  // [rows, D]
  int r = 0;
  out.logits_row_begin.assign(inputs.size(), -1);
  for (size_t b = 0; b < inputs.size(); ++b) {
    const SequenceSlice& s = slices[b];
    int first = 0, count = 0;
    if (inputs[b].logits == LogitsWanted::kAll) {
      first = s.row_begin, count = s.tokens;
    } else if (inputs[b].logits == LogitsWanted::kLast) {
      first = s.row_begin + s.tokens - 1, count = 1;
    }
    if (count == 0) continue;
    out.logits_row_begin[b] = r;
    std::copy_n(h.data() + static_cast<int64_t>(first) * D, static_cast<int64_t>(count) * D,
                rows.data() + static_cast<int64_t>(r) * D);
    r += count;
  }
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
