// The MoE dispatch plan both runners share (gateway/moe_dispatch.h): rows
// grouped by expert in token order, and a combine that sums each token's
// experts in expert-index order, as the reference does.
#include "gateway/moe_dispatch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "absl/status/status.h"
#include "attention_service/router.h"
#include "gtest/gtest.h"

namespace switchyard {
namespace {

// Legend: T tokens, K experts per token, E experts, D hidden.
constexpr int T = 7, K = 2, E = 5, D = 3;

Routing AwkwardRouting() {
  // Experts best first (not in index order), expert 4 unused, expert 0 hot.
  Routing r;
  r.tokens = T;
  r.top_k = K;
  r.experts = {3, 0, 0, 1, 2, 0, 0, 3, 1, 3, 0, 2, 3, 1};  // [T, K]
  r.weights = {.7f, .3f, .6f, .4f, .55f, .45f, .9f, .1f, .5f, .5f, .8f, .2f, .65f, .35f};
  return r;
}

TEST(MoeDispatchTest, GroupsRowsByExpertInTokenOrder) {
  const Routing r = AwkwardRouting();
  auto plan = PlanMoeDispatch(r.experts, r.weights, T, K, E);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<int> expected_rows(E, 0);
  for (int32_t e : r.experts) ++expected_rows[e];
  for (int e = 0; e < E; ++e) {
    EXPECT_EQ(plan->rows(e), expected_rows[e]) << "expert " << e;
    for (int i = plan->offset[e] + 1; i < plan->offset[e + 1]; ++i) {
      EXPECT_LT(plan->gather[i - 1], plan->gather[i]) << "tokens out of order in expert " << e;
    }
  }
  EXPECT_EQ(plan->offset[E], T * K);
  // Each token's combine rows are its own, in expert-index order, with the
  // weight the router gave that expert.
  for (int t = 0; t < T; ++t) {
    int last_expert = -1;
    for (int k = 0; k < K; ++k) {
      const int row = plan->combine_rows[t * K + k];
      EXPECT_EQ(plan->gather[row], t);
      int expert = 0;
      while (plan->offset[expert + 1] <= row) ++expert;
      EXPECT_GT(expert, last_expert) << "token " << t << " not in expert-index order";
      last_expert = expert;
      float weight = -1;
      for (int j = 0; j < K; ++j) {
        if (r.experts[t * K + j] == expert) weight = r.weights[t * K + j];
      }
      EXPECT_EQ(plan->combine_weights[t * K + k], weight);
    }
  }
  const std::vector<ExpertBatch> batches = ExpertBatches(*plan, nullptr, nullptr, D);
  ASSERT_EQ(batches.size(), 4u);  // expert 4 has no rows and no batch
  for (const ExpertBatch& b : batches) EXPECT_EQ(b.tokens, expected_rows[b.expert]);
}

TEST(MoeDispatchTest, GatherAndCombineEqualTheReferenceSumBitwise) {
  const Routing r = AwkwardRouting();
  auto plan = PlanMoeDispatch(r.experts, r.weights, T, K, E);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<float> x(T * D), h(T * D);  // [T, D]
  for (int i = 0; i < T * D; ++i) {
    x[i] = 0.1f * i - 1.3f;
    h[i] = 0.01f * i * i;
  }
  // A stand-in "expert e": y = (e + 1) · x + e.
  std::vector<float> in(T * K * D), out(T * K * D);  // [T K, D]
  GatherExpertRows(*plan, x.data(), D, in.data());
  for (const ExpertBatch& b : ExpertBatches(*plan, in.data(), out.data(), D)) {
    for (int i = 0; i < b.tokens * D; ++i) b.output[i] = (b.expert + 1) * b.input[i] + b.expert;
  }
  std::vector<float> got = h;
  CombineExpertRows(*plan, out.data(), D, got.data());

  // The reference: per token, experts in index order summed from zero, then added to h.
  float max_diff = 0;
  for (int t = 0; t < T; ++t) {
    for (int d = 0; d < D; ++d) {
      float acc = 0.0f;
      for (int e = 0; e < E; ++e) {
        for (int k = 0; k < K; ++k) {
          if (r.experts[t * K + k] != e) continue;
          acc += r.weights[t * K + k] * ((e + 1) * x[t * D + d] + e);
        }
      }
      const float want = h[t * D + d] + acc;
      max_diff = std::max(max_diff, std::abs(want - got[t * D + d]));
      EXPECT_EQ(got[t * D + d], want) << "token " << t << " dim " << d;
    }
  }
  std::printf("max |diff| vs reference sum: %g (bitwise expected)\n", max_diff);
}

TEST(MoeDispatchTest, ExpertOutsideTheModelIsAnInternalError) {
  const std::vector<int32_t> experts = {0, 5};
  const std::vector<float> weights = {0.5f, 0.5f};
  auto plan = PlanMoeDispatch(experts, weights, 1, 2, 5);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInternal);
  EXPECT_NE(plan.status().message().find("expert 5"), std::string::npos) << plan.status();
}

}  // namespace
}  // namespace switchyard
