#include "core/safetensors.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace switchyard {
namespace {

using testing::Exists;
using testing::MakeTempDir;
using testing::ReadAll;
using testing::WriteAll;

using ::testing::HasSubstr;

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

// A file with header `json` and `data_bytes` bytes of data.
std::string RawFile(const std::string& json, size_t data_bytes) {
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  out += json;
  out.append(data_bytes, '\x11');
  return out;
}

absl::Status ParseRaw(const std::string& json, size_t data_bytes) {
  const std::string file = RawFile(json, data_bytes);
  return ParseSafetensorsHeader(Bytes(file), "raw.safetensors").status();
}

TEST(SafetensorsTest, RoundTripAllDtypes) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/t.safetensors";
  std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -8.5f};
  std::vector<uint16_t> bf16 = {F32ToBf16(1.0f), F32ToBf16(-0.5f), F32ToBf16(3.0f)};
  std::vector<uint16_t> f16 = {F32ToF16(0.25f), F32ToF16(-4.0f)};
  std::vector<int64_t> i64 = {1, -2, 1ll << 40};
  std::vector<int32_t> i32 = {7};
  auto span = [](const auto& v) {
    return absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(v[0]));
  };
  std::vector<SafetensorsTensor> tensors = {
      {"a.f32", DType::kF32, {2, 3}, span(f32)}, {"b.bf16", DType::kBF16, {3}, span(bf16)},
      {"c.empty", DType::kF32, {0, 4}, {}},      {"d.f16", DType::kF16, {1, 2}, span(f16)},
      {"e.i64", DType::kI64, {3}, span(i64)},    {"f.scalar", DType::kI32, {}, span(i32)},
  };
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}, {"note", "x\"y"}}).ok());
  EXPECT_FALSE(Exists(path + ".tmp"));

  const std::string raw = ReadAll(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_EQ(raw[8], '{');

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors().size(), 6u);
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  EXPECT_EQ((*file)->metadata().at("note"), "x\"y");
  EXPECT_EQ((*file)->header().data_section_offset, 8 + n);
  for (const SafetensorsTensor& t : tensors) {
    auto v = (*file)->View(t.name);
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->dtype, t.dtype) << t.name;
    EXPECT_EQ(v->shape, t.shape) << t.name;
    ASSERT_EQ(v->nbytes, t.bytes.size()) << t.name;
    if (v->nbytes > 0) {
      EXPECT_EQ(std::memcmp(v->data, t.bytes.data(), v->nbytes), 0) << t.name;
    }
  }
  auto v = (*file)->View("a.f32");
  std::vector<float> back(6);
  ConvertToF32(v->dtype, v->data, 6, back.data());
  EXPECT_EQ(back, f32);
  EXPECT_EQ(v->num_elements(), 6);

  auto missing = (*file)->View("nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("nope"));
  EXPECT_THAT(missing.status().message(), HasSubstr(path));
}

TEST(SafetensorsTest, HeaderMatchesHuggingFaceLayout) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/t.safetensors";
  std::vector<uint8_t> data(6, 0);
  ASSERT_TRUE(WriteSafetensors(path, {{"w", DType::kBF16, {3}, data}}).ok());
  const std::string raw = ReadAll(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  std::string header = raw.substr(8, n);
  EXPECT_EQ(
      header.rfind(
          R"({"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]}})",
          0),
      0u);
  // Padding is spaces.
  EXPECT_EQ(header.find_first_not_of(' ', header.find_last_of('}') + 1), std::string::npos);
  EXPECT_EQ(raw.size(), 8 + n + 6);
}

TEST(SafetensorsTest, StreamingWriterInChunks) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/s.safetensors";
  auto w = SafetensorsWriter::Create(
      path, {{"x", DType::kF32, {5}}, {"z", DType::kF32, {0}}, {"y", DType::kBF16, {3, 3}}});
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->data_bytes(), 20u + 18u);
  std::string all;
  for (int i = 0; i < 38; ++i) all.push_back(static_cast<char>(i));
  // Chunks straddle the tensor boundary.
  ASSERT_TRUE((*w)->Append(Bytes(all.substr(0, 7))).ok());
  ASSERT_TRUE((*w)->Append(Bytes(all.substr(7, 20))).ok());
  EXPECT_EQ((*w)->Append(Bytes(std::string(12, 'x'))).code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*w)->Append(Bytes(all.substr(27))).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  auto y = (*f)->View("y");
  ASSERT_TRUE(y.ok());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(y->data), y->nbytes), all.substr(20));
}

TEST(SafetensorsTest, WriteTensorChecksOrderAndSize) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/w.safetensors";
  auto w = SafetensorsWriter::Create(path, {{"a", DType::kF32, {2}}, {"b", DType::kF32, {1}}});
  ASSERT_TRUE(w.ok());
  std::vector<uint8_t> eight(8), four(4);
  absl::Status s = (*w)->WriteTensor("b", four);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("expected 'a'"));
  EXPECT_EQ((*w)->WriteTensor("a", four).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE((*w)->WriteTensor("a", eight).ok());
  s = (*w)->Finish();  // "b" missing
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(Exists(path));
  EXPECT_FALSE(Exists(path + ".tmp"));
}

TEST(SafetensorsTest, AbandonedWriterLeavesNoFile) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/abandoned.safetensors";
  {
    auto w = SafetensorsWriter::Create(path, {{"a", DType::kF32, {2}}});
    ASSERT_TRUE(w.ok());
    std::vector<uint8_t> four(4);
    ASSERT_TRUE((*w)->Append(four).ok());
  }
  EXPECT_FALSE(Exists(path));
  EXPECT_FALSE(Exists(path + ".tmp"));
}

TEST(SafetensorsTest, WriterRejectsBadTensorLists) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/bad.safetensors";
  EXPECT_EQ(SafetensorsWriter::Create(path, {{"a", DType::kF32, {1}}, {"a", DType::kF32, {1}}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SafetensorsWriter::Create(path, {{"__metadata__", DType::kF32, {1}}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SafetensorsWriter::Create(path, {{"", DType::kF32, {1}}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SafetensorsWriter::Create(path, {{"neg", DType::kF32, {-1}}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SafetensorsWriter::Create(path, {{"\xff\xfe", DType::kF32, {1}}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SafetensorsWriter::Create(path, {{"huge", DType::kF32, {1ll << 40, 1ll << 40}}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SafetensorsWriter::Create(dir + "/no/such/dir/x.safetensors", {}).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, OpenErrors) {
  const std::string dir = MakeTempDir();
  auto s = SafetensorsFile::Open(dir + "/missing.safetensors").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("missing.safetensors"));

  EXPECT_EQ(SafetensorsFile::Open(dir).status().code(), absl::StatusCode::kInvalidArgument);

  WriteAll(dir + "/empty.safetensors", "");
  s = SafetensorsFile::Open(dir + "/empty.safetensors").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr("empty.safetensors"));
  EXPECT_THAT(s.message(), HasSubstr("shorter than"));

  WriteAll(dir + "/short.safetensors", "abc");
  EXPECT_EQ(SafetensorsFile::Open(dir + "/short.safetensors").status().code(),
            absl::StatusCode::kDataLoss);
}

TEST(SafetensorsTest, ParserValidatesHeader) {
  const char* kOk = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  EXPECT_TRUE(ParseRaw(kOk, 8).ok());
  EXPECT_TRUE(ParseRaw(R"({})", 0).ok());
  EXPECT_TRUE(ParseRaw(R"({"__metadata__":{"a":"b","n":3}})", 0).ok());
  // Brackets inside strings do not count as nesting.
  EXPECT_TRUE(ParseRaw("{\"__metadata__\":{\"a\":\"" + std::string(100, '[') + "\\\"\"}}", 0).ok());
  // Trailing bytes after the last tensor are tolerated.
  EXPECT_TRUE(ParseRaw(kOk, 9).ok());

  struct Case {
    std::string json;
    size_t data;
    absl::StatusCode code;
    std::string needle;
  };
  const absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
  const std::vector<Case> cases = {
      {"", 0, kInvalid, "JSON object"},
      {"[1,2]", 0, kInvalid, "JSON object"},
      {R"({"t":)", 0, kInvalid, "not valid JSON"},
      {R"({"t":1})", 0, kInvalid, "'t'"},
      {R"({"__metadata__":[1]})", 0, kInvalid, "__metadata__"},
      {"{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}", 0, kInvalid,
       "nested"},
      {R"({"t":{"shape":[2],"data_offsets":[0,8]}})", 8, kInvalid, "missing 'dtype'"},
      {R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", 8, kInvalid, "missing 'shape'"},
      {R"({"t":{"dtype":"F32","shape":[2]}})", 8, kInvalid, "missing 'data_offsets'"},
      {R"({"t":{"dtype":5,"shape":[2],"data_offsets":[0,8]}})", 8, kInvalid, "'dtype'"},
      {R"({"t":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2, kInvalid, "F8_E4M3"},
      {R"({"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 2, kInvalid, "U8"},
      {R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, kInvalid, "negative"},
      {R"({"t":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8, kInvalid, "shape"},
      {R"({"t":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8, kInvalid, "shape"},
      {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8, kInvalid, "end 0 < begin 8"},
      {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8, kInvalid, "data_offsets"},
      {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,-8]}})", 8, kInvalid, "negative"},
      {R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, kInvalid, "needs 12"},
      {R"({"t":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}})", 8, kInvalid,
       "too large"},
      {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4, absl::StatusCode::kDataLoss,
       "truncated"},
      {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551608,0]}})", 8, kInvalid,
       "'t'"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
       8, kInvalid, "overlaps"},
  };
  for (const Case& c : cases) {
    absl::Status s = ParseRaw(c.json, c.data);
    EXPECT_EQ(s.code(), c.code) << c.json << " -> " << s;
    EXPECT_THAT(s.message(), HasSubstr(c.needle)) << c.json;
    EXPECT_THAT(s.message(), HasSubstr("raw.safetensors")) << c.json;
    if (c.json.find("\"t\":{") != std::string::npos) {
      EXPECT_THAT(s.message(), HasSubstr("tensor 't'")) << c.json;
    }
  }
}

TEST(SafetensorsTest, ParserChecksHeaderLength) {
  std::string file = RawFile(R"({})", 0);
  file[0] = 100;  // header length 100 > file
  auto s = ParseSafetensorsHeader(Bytes(file), "f").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr("header length 100"));
  std::memset(file.data(), 0xff, 8);  // 2^64 - 1
  EXPECT_EQ(ParseSafetensorsHeader(Bytes(file), "f").status().code(), absl::StatusCode::kDataLoss);
  // Absurd but inside the file.
  std::string big(8 + kMaxSafetensorsHeaderBytes + 16, ' ');
  const uint64_t n = kMaxSafetensorsHeaderBytes + 8;
  for (int i = 0; i < 8; ++i) big[i] = static_cast<char>(n >> (8 * i));
  s = ParseSafetensorsHeader(Bytes(big), "f").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("absurd"));
}

// Mutated and truncated versions of a valid file never crash the parser.
TEST(SafetensorsTest, ParserSurvivesMutations) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/m.safetensors";
  std::vector<uint8_t> a(24), b(6);
  ASSERT_TRUE(
      WriteSafetensors(path, {{"a", DType::kF32, {2, 3}, a}, {"b", DType::kBF16, {3}, b}}).ok());
  const std::string good = ReadAll(path);
  for (size_t len = 0; len < good.size(); ++len) {
    EXPECT_FALSE(ParseSafetensorsHeader(Bytes(good.substr(0, len)), "m").ok()) << len;
  }
  uint64_t state = 12345;
  auto next = [&] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return state >> 33;
  };
  int ok = 0;
  for (int iter = 0; iter < 5000; ++iter) {
    std::string m = good;
    const int flips = 1 + next() % 4;
    for (int k = 0; k < flips; ++k) {
      const size_t pos = next() % m.size();
      m[pos] = static_cast<char>(next() % 3 == 0 ? "{}[]\",:0-9e"[next() % 11] : next() & 0xff);
    }
    auto r = ParseSafetensorsHeader(Bytes(m), "m");
    if (r.ok()) {
      ++ok;
      for (const SafetensorsEntry& e : r->tensors) {
        EXPECT_LE(r->data_section_offset + e.data_end, m.size());
      }
    }
  }
  EXPECT_GT(ok, 0);  // some mutations land in the data and stay valid
}

}  // namespace
}  // namespace switchyard
