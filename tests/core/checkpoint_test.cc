#include "core/checkpoint.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/make_model.h"
#include "core/safetensors.h"
#include "core/tensor_names.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace switchyard {
namespace {

using testing::Exists;
using testing::MakeTempDir;
using testing::ReadAll;
using testing::WriteAll;

using nlohmann::json;
using ::testing::HasSubstr;

const std::string kFixture = std::string(SWITCHYARD_TEST_DATA_DIR) + "/tiny-mixtral";

bool IsExpertName(const std::string& name) { return name.find(".experts.") != std::string::npos; }

// Writes a copy of the fixture checkpoint into `dir`: its config.json (or
// `config_json`) and a model file of its tensors, passed through `edit`
// first (which may change or erase entries).
void WriteFixtureCopy(const std::string& dir,
                      const std::function<void(std::vector<SafetensorsTensor>&)>& edit = nullptr,
                      const std::string& file_name = "model.safetensors",
                      const std::string& config_json = "") {
  WriteAll(dir + "/config.json",
           config_json.empty() ? ReadAll(kFixture + "/config.json") : config_json);
  auto src = SafetensorsFile::Open(kFixture + "/model.safetensors");
  ASSERT_TRUE(src.ok()) << src.status();
  std::vector<SafetensorsTensor> tensors;
  for (const SafetensorsEntry& e : (*src)->tensors()) {
    TensorView v = (*src)->View(e);
    tensors.push_back({e.name, e.dtype, e.shape, absl::MakeConstSpan(v.data, v.nbytes)});
  }
  if (edit) edit(tensors);
  ASSERT_TRUE(WriteSafetensors(dir + "/" + file_name, tensors).ok());
}

// Replaces the JSON header of the safetensors file at `path` by edit(header).
void RewriteHeader(const std::string& path, const std::function<void(json&)>& edit) {
  const std::string raw = ReadAll(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  json header = json::parse(raw.substr(8, n));
  edit(header);
  const std::string text = header.dump();
  std::string out(8, '\0');
  const uint64_t m = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(m >> (8 * i));
  WriteAll(path, out + text + raw.substr(8 + n));
}

// ---------------------------------------------------------------------------
// The fixture.

TEST(CheckpointTest, ExpectedTensorsOrderAndShapes) {
  auto config = LoadModelConfig(kFixture);
  ASSERT_TRUE(config.ok());
  const std::vector<ExpectedTensor> t = ExpectedTensors(*config);
  ASSERT_EQ(t.size(), 1u + 2 * (7 + 8 * 3) + 2);
  EXPECT_EQ(t[0].name, names::Embed());
  EXPECT_EQ(t[0].shape, (std::vector<int64_t>{32000, 64}));
  EXPECT_EQ(t[1].name, names::InputNorm(0));
  EXPECT_EQ(t[2].name, names::QProj(0));
  EXPECT_EQ(t[2].shape, (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(t[3].name, names::KProj(0));
  EXPECT_EQ(t[3].shape, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(t[4].name, names::VProj(0));
  EXPECT_EQ(t[5].name, names::OProj(0));
  EXPECT_EQ(t[5].shape, (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(t[6].name, names::PostAttnNorm(0));
  EXPECT_EQ(t[7].name, names::Gate(0));
  EXPECT_EQ(t[7].shape, (std::vector<int64_t>{8, 64}));
  EXPECT_EQ(t[8].name, names::Expert(0, 0, "w1"));
  EXPECT_EQ(t[8].shape, (std::vector<int64_t>{128, 64}));
  EXPECT_TRUE(t[8].is_expert);
  EXPECT_EQ(t[8].layer, 0);
  EXPECT_EQ(t[8].expert, 0);
  EXPECT_EQ(t[9].name, names::Expert(0, 0, "w2"));
  EXPECT_EQ(t[9].shape, (std::vector<int64_t>{64, 128}));
  EXPECT_EQ(t[10].name, names::Expert(0, 0, "w3"));
  EXPECT_EQ(t[7 + 24].name, names::Expert(0, 7, "w3"));
  EXPECT_EQ(t[7 + 24].expert, 7);
  EXPECT_EQ(t[7 + 25].name, names::InputNorm(1));
  EXPECT_EQ(t[7 + 25].layer, 1);
  EXPECT_FALSE(t[7 + 25].is_expert);
  EXPECT_EQ(t[t.size() - 2].name, names::FinalNorm());
  EXPECT_EQ(t.back().name, names::LmHead());
  EXPECT_EQ(t.back().shape, (std::vector<int64_t>{32000, 64}));
  EXPECT_EQ(t.back().layer, -1);
}

TEST(CheckpointTest, IncludesExpert) {
  EXPECT_TRUE(WeightSelection::All().IncludesExpert(5, 7));
  EXPECT_FALSE(WeightSelection::DenseOnly().IncludesExpert(0, 0));
  const WeightSelection s = WeightSelection::ExpertsOnly({1, 3}, 2, 4);
  EXPECT_TRUE(s.IncludesExpert(2, 1));
  EXPECT_TRUE(s.IncludesExpert(3, 3));
  EXPECT_FALSE(s.IncludesExpert(1, 1));
  EXPECT_FALSE(s.IncludesExpert(4, 1));
  EXPECT_FALSE(s.IncludesExpert(2, 2));
  EXPECT_TRUE(WeightSelection::ExpertsOnly({0}, 1).IncludesExpert(100, 0));
}

TEST(CheckpointTest, FixtureLoadsAll) {
  auto ckpt = Checkpoint::Open(kFixture);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const Checkpoint& c = **ckpt;
  EXPECT_EQ(c.config().hidden_size, 64);
  EXPECT_EQ(c.config().num_hidden_layers, 2);
  std::vector<std::string> expected;
  for (const ExpectedTensor& t : ExpectedTensors(c.config())) expected.push_back(t.name);
  EXPECT_EQ(c.selected_tensors(), expected);
  ASSERT_EQ(c.opened_files().size(), 1u);
  EXPECT_THAT(c.opened_files()[0], HasSubstr("model.safetensors"));
  // Every tensor of the file is selected: the data section is 9030272 bytes.
  EXPECT_EQ(c.selected_bytes(), 9030272u);
  for (const std::string& name : expected) {
    auto v = c.View(name);
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->dtype, DType::kBF16);
  }
  auto lm = c.ReadF32(names::LmHead());
  ASSERT_TRUE(lm.ok());
  EXPECT_EQ(lm->size(), 32000u * 64);
}

TEST(CheckpointTest, FixtureDenseOnly) {
  auto all = Checkpoint::Open(kFixture);
  auto dense = Checkpoint::Open(kFixture, WeightSelection::DenseOnly());
  ASSERT_TRUE(all.ok() && dense.ok()) << dense.status();
  const Checkpoint& c = **dense;
  EXPECT_EQ(c.selected_tensors().size(), 3u + 2 * 7);
  for (const std::string& name : c.selected_tensors()) EXPECT_FALSE(IsExpertName(name)) << name;
  EXPECT_LT(c.selected_bytes(), (*all)->selected_bytes());
  EXPECT_EQ(c.selected_bytes(), (*all)->selected_bytes() - 2 * 8 * 3 * 128 * 64 * 2);
  auto e = c.ReadF32(names::Expert(0, 0, "w1"));
  EXPECT_EQ(e.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(e.status().message(), HasSubstr(names::Expert(0, 0, "w1")));
  EXPECT_TRUE(c.ReadF32(names::Gate(1)).ok());
}

TEST(CheckpointTest, FixtureExpertsOnly) {
  auto ckpt = Checkpoint::Open(kFixture, WeightSelection::ExpertsOnly({3}));
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const Checkpoint& c = **ckpt;
  const std::vector<std::string> want = {names::Expert(0, 3, "w1"), names::Expert(0, 3, "w2"),
                                         names::Expert(0, 3, "w3"), names::Expert(1, 3, "w1"),
                                         names::Expert(1, 3, "w2"), names::Expert(1, 3, "w3")};
  EXPECT_EQ(c.selected_tensors(), want);
  EXPECT_EQ(c.selected_bytes(), 6u * 128 * 64 * 2);
  EXPECT_EQ(c.ReadF32(names::Embed()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(c.ReadF32(names::Expert(0, 2, "w1")).status().code(), absl::StatusCode::kNotFound);
  auto w2 = c.ReadF32(names::Expert(1, 3, "w2"));
  ASSERT_TRUE(w2.ok());
  EXPECT_EQ(w2->size(), 64u * 128);

  auto layer1 = Checkpoint::Open(kFixture, WeightSelection::ExpertsOnly({0, 7}, 1, 2));
  ASSERT_TRUE(layer1.ok()) << layer1.status();
  EXPECT_EQ((*layer1)->selected_tensors().size(), 6u);
  for (const std::string& n : (*layer1)->selected_tensors()) {
    EXPECT_THAT(n, HasSubstr("model.layers.1."));
  }
}

TEST(CheckpointTest, InvalidSelections) {
  for (const WeightSelection& s :
       {WeightSelection::ExpertsOnly({8}), WeightSelection::ExpertsOnly({-1}),
        WeightSelection::ExpertsOnly({0}, 3), WeightSelection::ExpertsOnly({0}, -1),
        WeightSelection::ExpertsOnly({0}, 0, 3), WeightSelection::ExpertsOnly({0}, 2, 1)}) {
    auto c = Checkpoint::Open(kFixture, s);
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(c.status().message(), HasSubstr("selection"));
  }
  // An empty layer range is allowed.
  EXPECT_TRUE(Checkpoint::Open(kFixture, WeightSelection::ExpertsOnly({0}, 2)).ok());
}

TEST(CheckpointTest, ReadF32ConvertsBf16) {
  auto ckpt = Checkpoint::Open(kFixture);
  ASSERT_TRUE(ckpt.ok());
  for (const std::string& name : {names::QProj(1), names::Embed(), names::InputNorm(0)}) {
    auto v = (*ckpt)->View(name);
    ASSERT_TRUE(v.ok());
    ASSERT_EQ(v->dtype, DType::kBF16);
    auto f = (*ckpt)->ReadF32(name);
    ASSERT_TRUE(f.ok());
    ASSERT_EQ(f->size(), v->nbytes / 2);
    for (size_t i : {size_t{0}, size_t{1}, size_t{17}, f->size() / 2, f->size() - 1}) {
      uint16_t bits;
      std::memcpy(&bits, v->data + 2 * i, 2);
      const uint32_t u = static_cast<uint32_t>(bits) << 16;
      float want;
      std::memcpy(&want, &u, 4);
      EXPECT_EQ((*f)[i], want) << name << "[" << i << "]";
    }
  }
  // The norms hover around 1, as the fixture's README promises random weights.
  auto norm = (*ckpt)->ReadF32(names::InputNorm(0));
  EXPECT_NEAR((*norm)[0], 1.0f, 0.5f);
}

TEST(CheckpointTest, ReferenceOpens) {
  auto ref = SafetensorsFile::Open(kFixture + "/reference.safetensors");
  ASSERT_TRUE(ref.ok()) << ref.status();
  auto ids = (*ref)->View("p0.input_ids");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->dtype, DType::kI64);
  ASSERT_EQ(ids->shape.size(), 1u);
  const int64_t T = ids->shape[0];
  EXPECT_GT(T, 1);
  auto logits = (*ref)->View("p0.logits");
  ASSERT_TRUE(logits.ok());
  EXPECT_EQ(logits->dtype, DType::kF32);
  EXPECT_EQ(logits->shape, (std::vector<int64_t>{T, 32000}));
  int64_t first_id;
  std::memcpy(&first_id, ids->data, 8);
  EXPECT_EQ(first_id, 1);  // BOS
}

TEST(CheckpointTest, TiedEmbeddingsWithoutLmHead) {
  const std::string dir = MakeTempDir();
  auto config = LoadModelConfig(kFixture);
  ASSERT_TRUE(config.ok());
  config->tie_word_embeddings = true;
  WriteFixtureCopy(
      dir,
      [](std::vector<SafetensorsTensor>& t) {
        std::erase_if(t, [](const auto& x) { return x.name == names::LmHead(); });
      },
      "model.safetensors", config->ToJson());
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto lm = (*ckpt)->ReadF32(names::LmHead());
  auto embed = (*ckpt)->ReadF32(names::Embed());
  ASSERT_TRUE(lm.ok() && embed.ok()) << lm.status();
  EXPECT_EQ(*lm, *embed);
  EXPECT_EQ((*ckpt)->selected_tensors().back(), names::LmHead());
  EXPECT_EQ((*ckpt)->selected_bytes(), 9030272u - 32000u * 64 * 2);
}

// ---------------------------------------------------------------------------
// Broken checkpoints: the status code, and a message naming file and tensor.

TEST(CheckpointErrorTest, MissingConfig) {
  const std::string dir = MakeTempDir();
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr(dir + "/config.json"));
}

TEST(CheckpointErrorTest, MissingModelFile) {
  const std::string dir = MakeTempDir();
  WriteAll(dir + "/config.json", ReadAll(kFixture + "/config.json"));
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr(dir));
  EXPECT_THAT(c.status().message(), HasSubstr("model.safetensors"));
}

TEST(CheckpointErrorTest, MissingTensor) {
  const std::string dir = MakeTempDir();
  WriteFixtureCopy(dir, [](std::vector<SafetensorsTensor>& t) {
    std::erase_if(t, [](const auto& x) { return x.name == names::VProj(1); });
  });
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr(names::VProj(1)));
  EXPECT_THAT(c.status().message(), HasSubstr(dir + "/model.safetensors"));
  // A selection that does not need the tensor loads.
  EXPECT_TRUE(Checkpoint::Open(dir, WeightSelection::ExpertsOnly({0})).ok());
}

TEST(CheckpointErrorTest, ShapeMismatch) {
  const std::string dir = MakeTempDir();
  WriteFixtureCopy(dir, [](std::vector<SafetensorsTensor>& t) {
    for (auto& x : t) {
      if (x.name == names::QProj(0)) x.shape = {32, 128};  // same bytes, wrong shape
    }
  });
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(names::QProj(0)));
  EXPECT_THAT(c.status().message(), HasSubstr(dir + "/model.safetensors"));
  EXPECT_THAT(c.status().message(), HasSubstr("[32, 128]"));
  EXPECT_THAT(c.status().message(), HasSubstr("[64, 64]"));
}

TEST(CheckpointErrorTest, UnsupportedWeightDtype) {
  // I32 is a valid safetensors dtype but not a valid weight dtype.
  const std::string dir = MakeTempDir();
  WriteFixtureCopy(dir, [](std::vector<SafetensorsTensor>& t) {
    for (auto& x : t) {
      if (x.name == names::InputNorm(1)) {
        x.dtype = DType::kI32;
        x.shape = {32};
      }
    }
  });
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(names::InputNorm(1)));
  EXPECT_THAT(c.status().message(), HasSubstr("I32"));
  EXPECT_THAT(c.status().message(), HasSubstr("model.safetensors"));
}

TEST(CheckpointErrorTest, UnsupportedFileDtype) {
  const std::string dir = MakeTempDir();
  WriteFixtureCopy(dir);
  RewriteHeader(dir + "/model.safetensors",
                [](json& h) { h[names::Gate(1)]["dtype"] = "F8_E4M3"; });
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr("F8_E4M3"));
  EXPECT_THAT(c.status().message(), HasSubstr(names::Gate(1)));
  EXPECT_THAT(c.status().message(), HasSubstr(dir + "/model.safetensors"));
}

TEST(CheckpointErrorTest, TruncatedFile) {
  const std::string dir = MakeTempDir();
  WriteFixtureCopy(dir);
  const std::string path = dir + "/model.safetensors";
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok());
  // The tensor stored last is the one cut short.
  std::string last;
  uint64_t last_end = 0;
  for (const auto& e : (*f)->tensors()) {
    if (e.data_end > last_end) last_end = e.data_end, last = e.name;
  }
  f->reset();
  const std::string raw = ReadAll(path);
  WriteAll(path, raw.substr(0, raw.size() - 100));
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(c.status().message(), HasSubstr(path));
  EXPECT_THAT(c.status().message(), HasSubstr(last));
  EXPECT_THAT(c.status().message(), HasSubstr("truncated"));
}

TEST(CheckpointErrorTest, MalformedHeaderJson) {
  const std::string dir = MakeTempDir();
  WriteFixtureCopy(dir);
  const std::string path = dir + "/model.safetensors";
  std::string raw = ReadAll(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  const std::string header = raw.substr(8, n);
  raw[8 + header.find_last_of('}')] = ',';  // {..., "x": {...}, <- unterminated
  WriteAll(path, raw);
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(path));
  EXPECT_THAT(c.status().message(), HasSubstr("JSON"));
}

TEST(CheckpointErrorTest, DataOffsetsOutsideFile) {
  const std::string dir = MakeTempDir();
  WriteFixtureCopy(dir);
  const std::string path = dir + "/model.safetensors";
  const std::string name = names::OProj(1);
  RewriteHeader(path, [&](json& h) {
    h[name]["data_offsets"] = {uint64_t{1} << 40, (uint64_t{1} << 40) + 64 * 64 * 2};
  });
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(c.status().message(), HasSubstr(path));
  EXPECT_THAT(c.status().message(), HasSubstr(name));
}

TEST(CheckpointErrorTest, HeaderLengthBeyondFile) {
  const std::string dir = MakeTempDir();
  WriteFixtureCopy(dir);
  const std::string path = dir + "/model.safetensors";
  std::string raw = ReadAll(path);
  const uint64_t n = raw.size();  // header "length" = the whole file
  for (int i = 0; i < 8; ++i) raw[i] = static_cast<char>(n >> (8 * i));
  WriteAll(path, raw);
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(c.status().message(), HasSubstr(path));
  EXPECT_THAT(c.status().message(), HasSubstr("header length"));
}

TEST(CheckpointErrorTest, ByteSizeMismatchAndNegativeShape) {
  const std::string dir = MakeTempDir();
  WriteFixtureCopy(dir);
  const std::string path = dir + "/model.safetensors";
  RewriteHeader(path, [&](json& h) { h[names::FinalNorm()]["shape"] = {65}; });
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(names::FinalNorm()));
  EXPECT_THAT(c.status().message(), HasSubstr(path));

  RewriteHeader(path, [&](json& h) { h[names::FinalNorm()]["shape"] = {-64}; });
  c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(names::FinalNorm()));
  EXPECT_THAT(c.status().message(), HasSubstr("negative"));
}

// An index whose weight_map sends each tensor to one of two shards.
void WriteTwoShardIndex(const std::string& dir, const std::string& second_shard) {
  WriteFixtureCopy(dir, nullptr, "model-00001-of-00002.safetensors");
  json wm = json::object();
  auto f = SafetensorsFile::Open(dir + "/model-00001-of-00002.safetensors");
  ASSERT_TRUE(f.ok());
  for (const auto& e : (*f)->tensors()) {
    wm[e.name] = IsExpertName(e.name) ? second_shard : "model-00001-of-00002.safetensors";
  }
  json index = {{"metadata", {{"total_size", 9030272}}}, {"weight_map", wm}};
  WriteAll(dir + "/model.safetensors.index.json", index.dump(2));
}

TEST(CheckpointErrorTest, IndexPointsToMissingShard) {
  const std::string dir = MakeTempDir();
  WriteTwoShardIndex(dir, "model-00002-of-00002.safetensors");
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr(dir + "/model-00002-of-00002.safetensors"));
  EXPECT_THAT(c.status().message(), HasSubstr(names::Expert(0, 0, "w1")));
  // The dense side never needs the missing shard.
  auto dense = Checkpoint::Open(dir, WeightSelection::DenseOnly());
  ASSERT_TRUE(dense.ok()) << dense.status();
  EXPECT_EQ((*dense)->opened_files(),
            std::vector<std::string>{dir + "/model-00001-of-00002.safetensors"});
}

TEST(CheckpointErrorTest, IndexProblems) {
  const std::string dir = MakeTempDir();
  WriteTwoShardIndex(dir, "model-00001-of-00002.safetensors");
  ASSERT_TRUE(Checkpoint::Open(dir).ok());
  const std::string index_path = dir + "/model.safetensors.index.json";
  json index = json::parse(ReadAll(index_path));

  json no_gate = index;
  no_gate["weight_map"].erase(names::Gate(0));
  WriteAll(index_path, no_gate.dump());
  auto c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr(names::Gate(0)));
  EXPECT_THAT(c.status().message(), HasSubstr(index_path));

  WriteAll(index_path, "{\"weight_map\": ");
  c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(index_path));

  json escape = index;
  escape["weight_map"][names::Embed()] = "../elsewhere.safetensors";
  WriteAll(index_path, escape.dump());
  c = Checkpoint::Open(dir);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(names::Embed()));

  json wrong_type = index;
  wrong_type["weight_map"][names::Embed()] = 3;
  WriteAll(index_path, wrong_type.dump());
  EXPECT_EQ(Checkpoint::Open(dir).status().code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------
// make-model.

TEST(MakeModelTest, Presets) {
  auto tiny = PresetConfig("tiny");
  ASSERT_TRUE(tiny.ok());
  auto fixture = LoadModelConfig(kFixture);
  ASSERT_TRUE(fixture.ok());
  EXPECT_EQ(tiny->Fingerprint(), fixture->Fingerprint());
  auto bench = PresetConfig("bench");
  ASSERT_TRUE(bench.ok());
  EXPECT_EQ(bench->hidden_size, 1024);
  EXPECT_EQ(bench->intermediate_size, 3584);
  EXPECT_EQ(bench->num_hidden_layers, 8);
  EXPECT_EQ(bench->num_attention_heads, 16);
  EXPECT_EQ(bench->num_key_value_heads, 4);
  EXPECT_EQ(bench->head_dim, 64);
  auto mixtral = PresetConfig("mixtral-8x7b");
  ASSERT_TRUE(mixtral.ok());
  EXPECT_EQ(mixtral->hidden_size, 4096);
  EXPECT_EQ(mixtral->intermediate_size, 14336);
  EXPECT_EQ(mixtral->num_hidden_layers, 32);
  EXPECT_EQ(mixtral->num_key_value_heads, 8);
  EXPECT_EQ(mixtral->head_dim, 128);
  EXPECT_EQ(mixtral->max_position_embeddings, 32768);
  for (const ModelConfig& c : {*tiny, *bench, *mixtral}) {
    EXPECT_EQ(c.vocab_size, 32000);
    EXPECT_EQ(c.num_local_experts, 8);
    EXPECT_EQ(c.num_experts_per_tok, 2);
    EXPECT_EQ(c.rope_theta, 1e6);
    // Round-trips through config.json.
    auto back = ParseModelConfig(c.ToJson());
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(back->Fingerprint(), c.Fingerprint());
  }
}

TEST(MakeModelTest, UnknownPreset) {
  auto c = PresetConfig("mixtral-8x22b");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr("mixtral-8x22b"));
  for (const char* name : {"tiny", "bench", "mixtral-8x7b"}) {
    EXPECT_THAT(c.status().message(), HasSubstr(name));
  }
  MakeModelOptions o{.preset = "nope", .out_dir = MakeTempDir()};
  EXPECT_EQ(MakeModel(o).code(), absl::StatusCode::kInvalidArgument);
  o.preset = "tiny";
  o.layers = 0;
  EXPECT_EQ(MakeModel(o).code(), absl::StatusCode::kInvalidArgument);
  o.layers = -1;
  o.dtype = DType::kI64;
  EXPECT_EQ(MakeModel(o).code(), absl::StatusCode::kInvalidArgument);
}

std::vector<std::string> ShardFiles(const std::string& dir) {
  auto index = json::parse(ReadAll(dir + "/model.safetensors.index.json"));
  std::set<std::string> files;
  for (const auto& [name, file] : index["weight_map"].items()) files.insert(file);
  return {files.begin(), files.end()};
}

class MakeModelShardedTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    unsharded_ = new std::string(MakeTempDir());
    sharded_ = new std::string(MakeTempDir());
    ASSERT_TRUE(MakeModel({.preset = "tiny",
                           .out_dir = *unsharded_,
                           .seed = 7,
                           .shard_bytes = 0,
                           .tokenizer_dir = kFixture})
                    .ok());
    auto s = MakeModel({.preset = "tiny", .out_dir = *sharded_, .seed = 7, .shard_bytes = 100000});
    ASSERT_TRUE(s.ok()) << s;
  }
  static void TearDownTestSuite() {
    delete unsharded_;
    delete sharded_;
  }
  static std::string* unsharded_;
  static std::string* sharded_;
};
std::string* MakeModelShardedTest::unsharded_ = nullptr;
std::string* MakeModelShardedTest::sharded_ = nullptr;

TEST_F(MakeModelShardedTest, FilesExist) {
  EXPECT_TRUE(Exists(*unsharded_ + "/config.json"));
  EXPECT_TRUE(Exists(*unsharded_ + "/generation_config.json"));
  EXPECT_TRUE(Exists(*unsharded_ + "/model.safetensors"));
  EXPECT_FALSE(Exists(*unsharded_ + "/model.safetensors.index.json"));
  EXPECT_EQ(ReadAll(*unsharded_ + "/tokenizer.json"), ReadAll(kFixture + "/tokenizer.json"));
  EXPECT_TRUE(Exists(*unsharded_ + "/tokenizer_config.json"));

  EXPECT_FALSE(Exists(*sharded_ + "/model.safetensors"));
  EXPECT_FALSE(Exists(*sharded_ + "/tokenizer.json"));
  const std::vector<std::string> shards = ShardFiles(*sharded_);
  ASSERT_GE(shards.size(), 3u);
  const size_t n = shards.size();
  uint64_t data_bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    char want[64];
    std::snprintf(want, sizeof(want), "model-%05zu-of-%05zu.safetensors", i + 1, n);
    EXPECT_EQ(shards[i], want);
    auto f = SafetensorsFile::Open(*sharded_ + "/" + shards[i]);
    ASSERT_TRUE(f.ok()) << f.status();
    for (const auto& e : (*f)->tensors()) data_bytes += e.nbytes();
  }
  auto index = json::parse(ReadAll(*sharded_ + "/model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), data_bytes);
  auto tiny = PresetConfig("tiny");
  EXPECT_EQ(index["weight_map"].size(), ExpectedTensors(*tiny).size());
  auto gen = json::parse(ReadAll(*sharded_ + "/generation_config.json"));
  EXPECT_EQ(gen["eos_token_id"], 2);
}

TEST_F(MakeModelShardedTest, ShardedAndUnshardedHoldTheSameTensors) {
  auto a = Checkpoint::Open(*unsharded_);
  auto b = Checkpoint::Open(*sharded_);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*a)->config().Fingerprint(), PresetConfig("tiny")->Fingerprint());
  EXPECT_EQ((*a)->config().torch_dtype, "bfloat16");
  EXPECT_EQ((*a)->opened_files().size(), 1u);
  EXPECT_EQ((*b)->opened_files().size(), ShardFiles(*sharded_).size());
  EXPECT_EQ((*a)->selected_tensors(), (*b)->selected_tensors());
  EXPECT_EQ((*a)->selected_bytes(), (*b)->selected_bytes());
  for (const std::string& name : (*a)->selected_tensors()) {
    auto x = (*a)->ReadF32(name);
    auto y = (*b)->ReadF32(name);
    ASSERT_TRUE(x.ok() && y.ok()) << name;
    ASSERT_EQ(*x, *y) << name;
    EXPECT_EQ((*a)->View(name)->dtype, DType::kBF16);
  }
}

TEST_F(MakeModelShardedTest, DenseOnlySkipsExpertShards) {
  const std::string index_path = *sharded_ + "/model.safetensors.index.json";
  auto index = json::parse(ReadAll(index_path));
  std::set<std::string> shards_with_dense, shards_with_expert3, all_shards;
  for (const auto& [name, file] : index["weight_map"].items()) {
    const std::string path = *sharded_ + "/" + file.get<std::string>();
    all_shards.insert(path);
    if (!IsExpertName(name)) shards_with_dense.insert(path);
    if (name.find(".experts.3.") != std::string::npos) shards_with_expert3.insert(path);
  }
  // The layout puts some experts in shards of their own.
  ASSERT_LT(shards_with_dense.size(), all_shards.size());

  auto dense = Checkpoint::Open(*sharded_, WeightSelection::DenseOnly());
  ASSERT_TRUE(dense.ok()) << dense.status();
  const std::vector<std::string> opened = (*dense)->opened_files();
  EXPECT_EQ(std::set<std::string>(opened.begin(), opened.end()), shards_with_dense);

  auto e3 = Checkpoint::Open(*sharded_, WeightSelection::ExpertsOnly({3}));
  ASSERT_TRUE(e3.ok()) << e3.status();
  const std::vector<std::string> opened3 = (*e3)->opened_files();
  EXPECT_EQ(std::set<std::string>(opened3.begin(), opened3.end()), shards_with_expert3);
  EXPECT_LT(opened3.size(), all_shards.size());
}

TEST_F(MakeModelShardedTest, ValuesFollowTheInitScheme) {
  auto c = Checkpoint::Open(*unsharded_);
  ASSERT_TRUE(c.ok());
  for (const ExpectedTensor& t : ExpectedTensors((*c)->config())) {
    auto v = (*c)->ReadF32(t.name);
    ASSERT_TRUE(v.ok());
    for (size_t i : {size_t{0}, size_t{1}, size_t{2}, size_t{3}, size_t{5}, v->size() - 1}) {
      const float want = Bf16ToF32(F32ToBf16(RandomWeightValue(7, t.name, t.shape, i)));
      ASSERT_EQ((*v)[i], want) << t.name << "[" << i << "]";
    }
    double sum = 0, sq = 0;
    for (float x : *v) sum += x, sq += double(x) * x;
    const double mean = sum / v->size();
    const double sd = std::sqrt(sq / v->size() - mean * mean);
    if (t.shape.size() == 1) {  // RMSNorm weights: 1 + U(-0.15, 0.15)
      EXPECT_NEAR(mean, 1.0, 0.05) << t.name;
      EXPECT_NEAR(sd, 0.15 / std::sqrt(3.0), 0.03) << t.name;
    } else if (t.name == names::Embed()) {
      EXPECT_NEAR(sd, 0.08, 0.005) << t.name;
    } else if (t.name == names::LmHead()) {
      EXPECT_NEAR(sd, 4.0 / 8, 0.03) << t.name;
    } else if (t.name.find("gate") != std::string::npos) {
      EXPECT_NEAR(sd, 1.0 / 8, 0.03) << t.name;
    } else {
      EXPECT_NEAR(mean, 0.0, 0.01) << t.name;
      EXPECT_NEAR(sd, 0.6 / std::sqrt(double(t.shape[1])), 0.01) << t.name;
    }
  }
}

TEST(MakeModelTest, DeterministicPerSeedAndDtypes) {
  const std::string a = MakeTempDir(), b = MakeTempDir(), c = MakeTempDir();
  ASSERT_TRUE(MakeModel({.preset = "tiny", .out_dir = a, .layers = 1, .seed = 3}).ok());
  ASSERT_TRUE(
      MakeModel({.preset = "tiny", .out_dir = b, .layers = 1, .seed = 3, .threads = 1}).ok());
  ASSERT_TRUE(MakeModel({.preset = "tiny", .out_dir = c, .layers = 1, .seed = 4}).ok());
  EXPECT_EQ(ReadAll(a + "/model.safetensors"), ReadAll(b + "/model.safetensors"));
  EXPECT_NE(ReadAll(a + "/model.safetensors"), ReadAll(c + "/model.safetensors"));
  auto ca = Checkpoint::Open(a);
  ASSERT_TRUE(ca.ok());
  EXPECT_EQ((*ca)->config().num_hidden_layers, 1);

  const std::string f32 = MakeTempDir(), f16 = MakeTempDir();
  ASSERT_TRUE(
      MakeModel({.preset = "tiny", .out_dir = f32, .layers = 1, .seed = 3, .dtype = DType::kF32})
          .ok());
  ASSERT_TRUE(
      MakeModel({.preset = "tiny", .out_dir = f16, .layers = 1, .seed = 3, .dtype = DType::kF16})
          .ok());
  auto c32 = Checkpoint::Open(f32);
  auto c16 = Checkpoint::Open(f16);
  ASSERT_TRUE(c32.ok() && c16.ok());
  EXPECT_EQ((*c32)->config().torch_dtype, "float32");
  EXPECT_EQ((*c16)->config().torch_dtype, "float16");
  const std::string name = names::Expert(0, 5, "w2");
  const std::vector<int64_t> shape = {64, 128};
  auto v32 = (*c32)->ReadF32(name);
  auto v16 = (*c16)->ReadF32(name);
  auto vbf = (*ca)->ReadF32(name);
  ASSERT_TRUE(v32.ok() && v16.ok() && vbf.ok());
  EXPECT_EQ((*c32)->View(name)->dtype, DType::kF32);
  EXPECT_EQ((*c16)->View(name)->dtype, DType::kF16);
  for (size_t i = 0; i < v32->size(); ++i) {
    const float x = RandomWeightValue(3, name, shape, i);
    ASSERT_EQ((*v32)[i], x);
    ASSERT_EQ((*v16)[i], F16ToF32(F32ToF16(x)));
    ASSERT_EQ((*vbf)[i], Bf16ToF32(F32ToBf16(x)));
  }
}

TEST(MakeModelTest, RewritingReplacesStaleFiles) {
  const std::string dir = MakeTempDir();
  ASSERT_TRUE(MakeModel({.preset = "tiny", .out_dir = dir, .shard_bytes = 1 << 20}).ok());
  EXPECT_TRUE(Exists(dir + "/model.safetensors.index.json"));
  ASSERT_TRUE(MakeModel({.preset = "tiny", .out_dir = dir, .layers = 1, .shard_bytes = 0}).ok());
  EXPECT_FALSE(Exists(dir + "/model.safetensors.index.json"));
  EXPECT_FALSE(Exists(dir + "/model-00001-of-00003.safetensors"));
  auto c = Checkpoint::Open(dir);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->config().num_hidden_layers, 1);
}

TEST(MakeModelTest, MissingTokenizerDir) {
  const std::string dir = MakeTempDir();
  absl::Status s = MakeModel({.preset = "tiny", .out_dir = dir, .tokenizer_dir = dir + "/none"});
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("tokenizer.json"));
}

}  // namespace
}  // namespace switchyard
