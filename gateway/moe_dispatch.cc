#include "gateway/moe_dispatch.h"

#include <algorithm>
#include <array>

#include "absl/strings/str_cat.h"

namespace switchyard {

absl::StatusOr<MoeDispatch> PlanMoeDispatch(absl::Span<const int32_t> experts,
                                            absl::Span<const float> weights, int tokens, int top_k,
                                            int num_experts) {
  const int T = tokens, K = top_k, E = num_experts, TK = T * K;
  if (static_cast<int>(experts.size()) < TK || static_cast<int>(weights.size()) < TK) {
    return absl::InternalError("MoE dispatch: routing has fewer than tokens * top_k entries");
  }
  MoeDispatch plan;
  plan.tokens = T;
  plan.top_k = K;
  plan.num_experts = E;
  plan.offset.assign(E + 1, 0);
  for (int i = 0; i < TK; ++i) {
    if (experts[i] < 0 || experts[i] >= E) {
      return absl::InternalError(absl::StrCat("router returned expert ", experts[i]));
    }
    ++plan.offset[experts[i] + 1];
  }
  for (int e = 0; e < E; ++e) plan.offset[e + 1] += plan.offset[e];

  plan.gather.resize(TK);
  plan.combine_rows.resize(TK);
  plan.combine_weights.resize(TK);
  std::vector<int> cursor(plan.offset.begin(), plan.offset.end() - 1);
  std::vector<std::array<int, 3>> mine(K);  // (expert, row, slot) of one token
  for (int t = 0; t < T; ++t) {
    for (int k = 0; k < K; ++k) {
      const int e = experts[t * K + k];
      const int row = cursor[e]++;
      plan.gather[row] = t;
      mine[k] = {e, row, k};
    }
    // The reference sums a token's expert outputs in expert-index order.
    std::sort(mine.begin(), mine.end());
    for (int k = 0; k < K; ++k) {
      plan.combine_rows[t * K + k] = mine[k][1];
      plan.combine_weights[t * K + k] = weights[t * K + mine[k][2]];
    }
  }
  return plan;
}

void GatherExpertRows(const MoeDispatch& plan, const float* x, int dim, float* grouped) {
  for (int i = 0; i < plan.total_rows(); ++i) {
    std::copy_n(x + static_cast<int64_t>(plan.gather[i]) * dim, dim,
                grouped + static_cast<int64_t>(i) * dim);
  }
}

std::vector<ExpertBatch> ExpertBatches(const MoeDispatch& plan, const float* grouped_in,
                                       float* grouped_out, int dim) {
  std::vector<ExpertBatch> batches;
  for (int e = 0; e < plan.num_experts; ++e) {
    const int n = plan.rows(e);
    if (n == 0) continue;
    const int64_t off = static_cast<int64_t>(plan.offset[e]) * dim;
    batches.push_back({e, n, grouped_in + off, grouped_out + off});
  }
  return batches;
}

void CombineExpertRows(const MoeDispatch& plan, const float* grouped_out, int dim, float* h) {
  const int K = plan.top_k;
  std::vector<float> acc(dim);  // [D]
  for (int t = 0; t < plan.tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int k = 0; k < K; ++k) {
      const float* src = grouped_out + static_cast<int64_t>(plan.combine_rows[t * K + k]) * dim;
      const float w = plan.combine_weights[t * K + k];
      for (int d = 0; d < dim; ++d) acc[d] += w * src[d];
    }
    float* dst = h + static_cast<int64_t>(t) * dim;
    for (int d = 0; d < dim; ++d) dst[d] += acc[d];
  }
}

}  // namespace switchyard
