// Sampling: greedy, seeded repeatability, truncation rules, penalties,
// validation, and the sampled distribution itself.
#include "gateway/sampler.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"

namespace switchyard {
namespace {

const std::vector<float> kLogits = {1.0f, 3.0f, 2.5f, -1.0f, 0.5f, 2.9f};

TEST(SamplerTest, GreedyIsArgmaxAndReportsLogprobs) {
  Sampler s({});
  SampledToken t = s.Sample(kLogits, {}, {}, /*top_logprobs=*/3);
  EXPECT_EQ(t.id, 1);
  double z = 0;
  for (float l : kLogits) z += std::exp(l);
  EXPECT_NEAR(t.logprob, 3.0 - std::log(z), 1e-5);
  ASSERT_EQ(t.top.size(), 3u);
  EXPECT_EQ(t.top[0].first, 1);
  EXPECT_EQ(t.top[1].first, 5);
  EXPECT_EQ(t.top[2].first, 2);
}

TEST(SamplerTest, SameSeedSameTokensOtherSeedDiffers) {
  SamplingParams p;
  p.temperature = 1.5f;
  p.seed = 42;
  Sampler a(p), b(p);
  p.seed = 43;
  Sampler c(p);
  std::vector<int32_t> ta, tb, tc;
  for (int i = 0; i < 64; ++i) {
    ta.push_back(a.Sample(kLogits, {}, {}).id);
    tb.push_back(b.Sample(kLogits, {}, {}).id);
    tc.push_back(c.Sample(kLogits, {}, {}).id);
  }
  EXPECT_EQ(ta, tb);
  EXPECT_NE(ta, tc);
}

TEST(SamplerTest, TopKOneAndTinyTopPAreGreedy) {
  SamplingParams p;
  p.temperature = 5.0f;
  p.seed = 1;
  p.top_k = 1;
  Sampler k1(p);
  p.top_k = 0;
  p.top_p = 1e-6f;
  Sampler tiny_p(p);
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(k1.Sample(kLogits, {}, {}).id, 1);
    EXPECT_EQ(tiny_p.Sample(kLogits, {}, {}).id, 1);
  }
}

TEST(SamplerTest, TruncationKeepsOnlyTheAllowedSet) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 7;
  p.top_k = 3;  // {1, 5, 2}
  Sampler s(p);
  for (int i = 0; i < 500; ++i) {
    const int id = s.Sample(kLogits, {}, {}).id;
    EXPECT_TRUE(id == 1 || id == 5 || id == 2) << id;
  }
  p.top_k = 0;
  p.min_p = 0.5f;  // p >= 0.5 p_max: logits within ln 2 of 3.0 -> {1, 5, 2}
  Sampler m(p);
  for (int i = 0; i < 500; ++i) {
    const int id = m.Sample(kLogits, {}, {}).id;
    EXPECT_TRUE(id == 1 || id == 5 || id == 2) << id;
  }
}

TEST(SamplerTest, DrawsFollowTheSoftmax) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 2024;
  Sampler s(p);
  constexpr int kDraws = 20000;
  std::map<int, int> counts;
  for (int i = 0; i < kDraws; ++i) ++counts[s.Sample(kLogits, {}, {}).id];
  double z = 0;
  for (float l : kLogits) z += std::exp(l);
  double max_err = 0;
  for (size_t i = 0; i < kLogits.size(); ++i) {
    const double expected = std::exp(kLogits[i]) / z;
    const double observed = static_cast<double>(counts[static_cast<int>(i)]) / kDraws;
    max_err = std::max(max_err, std::fabs(observed - expected));
    // 5 standard deviations of a binomial proportion.
    EXPECT_NEAR(observed, expected, 5 * std::sqrt(expected * (1 - expected) / kDraws)) << i;
  }
  std::printf("[ sampler ] max |observed - softmax| = %.4f over %d draws\n", max_err, kDraws);
}

TEST(SamplerTest, PenaltiesDemoteRepeatedTokens) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;  // 3.0 -> 1.5 for token 1
  Sampler rep(p);
  const std::vector<int32_t> prompt = {1};
  EXPECT_EQ(rep.Sample(kLogits, prompt, {}).id, 5);
  SamplingParams q;
  q.frequency_penalty = 0.1f;  // token 1 seen twice: 3.0 - 0.2 = 2.8 < 2.9
  Sampler freq(q);
  const std::vector<int32_t> output = {1, 1};
  EXPECT_EQ(freq.Sample(kLogits, {}, output).id, 5);
  SamplingParams r;
  r.presence_penalty = 0.05f;  // 3.0 - 0.05 > 2.9: still token 1
  Sampler presence(r);
  EXPECT_EQ(presence.Sample(kLogits, {}, output).id, 1);
}

TEST(SamplerTest, ValidationNamesTheField) {
  struct Case {
    SamplingParams params;
    const char* field;
  };
  std::vector<Case> cases;
  SamplingParams p;
  p.temperature = -1;
  cases.push_back({p, "temperature"});
  p = {};
  p.temperature = NAN;
  cases.push_back({p, "temperature"});
  p = {};
  p.top_p = 0;
  cases.push_back({p, "top_p"});
  p = {};
  p.top_p = 1.5f;
  cases.push_back({p, "top_p"});
  p = {};
  p.top_k = -2;
  cases.push_back({p, "top_k"});
  p = {};
  p.min_p = 2;
  cases.push_back({p, "min_p"});
  p = {};
  p.repetition_penalty = 0;
  cases.push_back({p, "repetition_penalty"});
  p = {};
  p.presence_penalty = 3;
  cases.push_back({p, "presence_penalty"});
  p = {};
  p.frequency_penalty = -3;
  cases.push_back({p, "frequency_penalty"});
  for (const Case& c : cases) {
    absl::Status s = ValidateSamplingParams(c.params);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_NE(s.message().find(c.field), std::string::npos) << s;
  }
  EXPECT_TRUE(ValidateSamplingParams({}).ok());
}

}  // namespace
}  // namespace switchyard
