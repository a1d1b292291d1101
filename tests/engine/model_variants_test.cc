// Checkpoints written by make-model: sharded and unsharded give the same
// model output; sliding_window in config.json is honoured.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "core/make_model.h"
#include "gateway/local_model.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"
#include "tests/tolerances.h"

namespace switchyard {
namespace {

namespace fs = std::filesystem;
using testing::AllClose;

std::string MakeTiny(const std::string& name, uint64_t shard_bytes, int layers = -1) {
  const std::string dir = ::testing::TempDir() + "/switchyard-" + name;
  fs::remove_all(dir);
  MakeModelOptions options;
  options.preset = "tiny";
  options.out_dir = dir;
  options.seed = 7;
  options.layers = layers;
  options.shard_bytes = shard_bytes;
  options.tokenizer_dir = testing::DataDir() + "/mistral-tokenizer";
  absl::Status s = MakeModel(options);
  EXPECT_TRUE(s.ok()) << s;
  return dir;
}

std::vector<float> AllLogits(const std::string& dir, const std::vector<int32_t>& ids) {
  auto model = LocalModel::Load(dir);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  auto kv = (*model)->kv_pool().NewSequence();
  StepInput in{kv.get(), ids, LogitsWanted::kAll};
  auto out = (*model)->runner().Step({&in, 1});
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? out->logits : std::vector<float>();
}

TEST(ModelVariantsTest, ShardedAndUnshardedMakeModelOutputsAreIdentical) {
  const std::string whole = MakeTiny("whole", 0);
  const std::string sharded = MakeTiny("sharded", 1 << 20);  // ~1 MiB shards
  EXPECT_TRUE(fs::exists(whole + "/model.safetensors"));
  EXPECT_TRUE(fs::exists(sharded + "/model.safetensors.index.json"));
  int shards = 0;
  for (const auto& entry : fs::directory_iterator(sharded)) {
    if (entry.path().filename().string().find("-of-") != std::string::npos) ++shards;
  }
  EXPECT_GE(shards, 3);
  const std::vector<int32_t> ids = {1, 415, 5565, 302, 4843, 349, 28705, 13};
  const std::vector<float> a = AllLogits(whole, ids), b = AllLogits(sharded, ids);
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(AllClose(b, a, 0.0, 0.0, "sharded vs unsharded logits (bitwise)"));
  // A random model still has to say something: not every position agrees.
  std::vector<int> argmax;
  for (size_t t = 0; t < ids.size(); ++t) {
    auto row = absl::MakeConstSpan(a).subspan(t * 32000, 32000);
    argmax.push_back(static_cast<int>(std::max_element(row.begin(), row.end()) - row.begin()));
  }
  EXPECT_GT(std::set<int>(argmax.begin(), argmax.end()).size(), 1u);
}

// With one layer and a window of W, the last position sees exactly the last W
// tokens; RoPE depends only on relative positions, so feeding those W tokens
// alone from position 0 gives the same logits.
TEST(ModelVariantsTest, SlidingWindowLimitsAttention) {
  const std::string dir = MakeTiny("window", 0, /*layers=*/1);
  const std::vector<int32_t> ids = {1, 415, 5565, 302, 4843, 349, 28705, 13, 9471, 2287, 513, 307};
  constexpr int kWindow = 5;
  const std::vector<int32_t> tail(ids.end() - kWindow, ids.end());
  const std::vector<float> no_window_full = AllLogits(dir, ids);
  const std::vector<float> tail_alone = AllLogits(dir, tail);

  nlohmann::json config = nlohmann::json::parse(testing::ReadAll(dir + "/config.json"));
  config["sliding_window"] = kWindow;
  std::ofstream(dir + "/config.json") << config.dump(2);
  const std::vector<float> windowed_full = AllLogits(dir, ids);

  auto last = [](const std::vector<float>& logits) {
    return absl::MakeConstSpan(logits).subspan(logits.size() - 32000, 32000);
  };
  EXPECT_TRUE(AllClose(last(windowed_full), last(tail_alone), tolerance::kReorderAbs,
                       tolerance::kReorderRel, "window 5: last position vs the 5 tokens alone"));
  // Without the window the last position sees more, and the logits differ.
  EXPECT_FALSE(AllClose(last(no_window_full), last(tail_alone), tolerance::kReorderAbs,
                        tolerance::kReorderRel, "no window vs the 5 tokens alone"));
}

}  // namespace
}  // namespace switchyard
