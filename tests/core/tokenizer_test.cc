#include "core/tokenizer.h"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/utf8.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace switchyard {
namespace {

using ::testing::HasSubstr;
using testing::ReadAll;

const std::string kDataDir = SWITCHYARD_TEST_DATA_DIR;
const std::string kMistralDir = kDataDir + "/mistral-tokenizer";
const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD

struct Reference {
  std::string text;
  std::vector<int32_t> ids;
  std::vector<std::string> tokens;
  std::string decoded;
};

void WriteAll(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::vector<Reference> LoadReferences() {
  const nlohmann::json j = nlohmann::json::parse(ReadAll(kMistralDir + "/reference-encodings.json"),
                                                 nullptr, /*allow_exceptions=*/false);
  std::vector<Reference> refs;
  if (!j.is_array()) return refs;
  for (const auto& e : j) {
    Reference r;
    r.text = e["text"].get<std::string>();
    r.ids = e["ids"].get<std::vector<int32_t>>();
    r.tokens = e["tokens"].get<std::vector<std::string>>();
    r.decoded = e["decoded"].get<std::string>();
    refs.push_back(std::move(r));
  }
  return refs;
}

bool IsValidUtf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = s[i];
    size_t n;
    uint32_t cp;
    if (c < 0x80) {
      n = 1;
      cp = c;
    } else if ((c & 0xE0) == 0xC0) {
      n = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      const unsigned char d = s[i + k];
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    static const uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n;
  }
  return true;
}

class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto t = Tokenizer::FromDir(kMistralDir);
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = t->release();
    refs_ = new std::vector<Reference>(LoadReferences());
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    delete refs_;
    tokenizer_ = nullptr;
    refs_ = nullptr;
  }

  static int32_t Id(const std::string& token) { return tokenizer_->TokenToId(token); }

  // Pushes `ids` through an IncrementalDecoder, checking every output is valid
  // UTF-8; returns the concatenated text.
  static std::string StreamDecode(const std::vector<int32_t>& prompt,
                                  const std::vector<int32_t>& ids, bool skip = true) {
    IncrementalDecoder dec(tokenizer_, prompt, skip);
    std::string all;
    for (int32_t id : ids) {
      absl::StatusOr<std::string> piece = dec.Push(id);
      EXPECT_TRUE(piece.ok()) << piece.status();
      if (!piece.ok()) return all;
      EXPECT_TRUE(IsValidUtf8(*piece)) << "invalid UTF-8 pushed for id " << id;
      all += *piece;
    }
    const std::string rest = dec.Finish();
    EXPECT_TRUE(IsValidUtf8(rest));
    return all + rest;
  }

  static Tokenizer* tokenizer_;
  static std::vector<Reference>* refs_;
};

Tokenizer* TokenizerTest::tokenizer_ = nullptr;
std::vector<Reference>* TokenizerTest::refs_ = nullptr;

TEST_F(TokenizerTest, Properties) {
  EXPECT_EQ(tokenizer_->vocab_size(), 32000);
  EXPECT_EQ(tokenizer_->bos_id(), 1);
  EXPECT_EQ(tokenizer_->eos_id(), 2);
  EXPECT_EQ(tokenizer_->unk_id(), 0);
  EXPECT_TRUE(tokenizer_->add_bos());
  EXPECT_FALSE(tokenizer_->add_eos());
  EXPECT_TRUE(tokenizer_->IsSpecial(0));
  EXPECT_TRUE(tokenizer_->IsSpecial(1));
  EXPECT_TRUE(tokenizer_->IsSpecial(2));
  EXPECT_FALSE(tokenizer_->IsSpecial(3));
  EXPECT_FALSE(tokenizer_->IsSpecial(-1));
  EXPECT_FALSE(tokenizer_->IsSpecial(32000));
  EXPECT_EQ(*tokenizer_->IdToToken(3), "<0x00>");
  EXPECT_EQ(*tokenizer_->IdToToken(22557), "\xE2\x96\x81Hello");
  EXPECT_EQ(Id("<0x0A>"), 13);
  EXPECT_EQ(Id("no-such-token"), -1);
}

TEST_F(TokenizerTest, ReferenceEncodings) {
  ASSERT_EQ(refs_->size(), 50u);
  for (const Reference& r : *refs_) {
    SCOPED_TRACE(absl::StrCat("text: \"", r.text, "\""));
    const std::vector<int32_t> ids = tokenizer_->Encode(r.text);
    EXPECT_EQ(ids, r.ids);
    std::vector<std::string> tokens;
    for (int32_t id : ids) {
      absl::StatusOr<std::string> tok = tokenizer_->IdToToken(id);
      ASSERT_TRUE(tok.ok()) << tok.status();
      tokens.push_back(*tok);
    }
    EXPECT_EQ(tokens, r.tokens);
    absl::StatusOr<std::string> decoded = tokenizer_->Decode(r.ids);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(*decoded, r.decoded);
    // Without BOS.
    std::vector<int32_t> no_bos(r.ids.begin() + 1, r.ids.end());
    EXPECT_EQ(tokenizer_->Encode(r.text, /*add_special_tokens=*/false), no_bos);
  }
}

TEST_F(TokenizerTest, ReferenceIncrementalDecoding) {
  for (const Reference& r : *refs_) {
    SCOPED_TRACE(absl::StrCat("text: \"", r.text, "\""));
    const std::string full = *tokenizer_->Decode(r.ids);
    EXPECT_EQ(StreamDecode({}, r.ids), full);
    EXPECT_EQ(StreamDecode({}, r.ids, /*skip=*/false), *tokenizer_->Decode(r.ids, false));
    // Every split point into prompt + generated. The prompt's text is
    // Decode(prompt), except that a byte run still incomplete at the end of
    // the prompt (part of a character) is emitted with the generated text.
    for (size_t k = 0; k <= r.ids.size(); ++k) {
      std::vector<int32_t> prompt(r.ids.begin(), r.ids.begin() + k);
      std::vector<int32_t> gen(r.ids.begin() + k, r.ids.end());
      std::string run;  // bytes of the trailing byte-token run
      size_t j = prompt.size();
      while (j > 0) {
        const std::string tok = *tokenizer_->IdToToken(prompt[j - 1]);
        const bool is_byte = tok.size() == 6 && tok.rfind("<0x", 0) == 0;
        if (is_byte) {
          run.insert(run.begin(), static_cast<char>(std::stoi(tok.substr(3, 2), nullptr, 16)));
        } else if (!tokenizer_->IsSpecial(prompt[j - 1])) {
          break;
        }
        --j;
      }
      std::vector<int32_t> complete = prompt;
      if (!run.empty() && !IsValidUtf8(run)) complete.resize(j);
      const std::string prefix = *tokenizer_->Decode(complete);
      ASSERT_EQ(full.substr(0, prefix.size()), prefix) << "k=" << k;
      EXPECT_EQ(StreamDecode(prompt, gen), full.substr(prefix.size())) << "k=" << k;
    }
  }
}

TEST_F(TokenizerTest, WholeByteTokenEndingThePromptStaysInThePrompt) {
  // <0x00> is a whole character: it belongs to the prompt, not the completion.
  const int32_t nul = Id("<0x00>");
  ASSERT_GE(nul, 0);
  IncrementalDecoder dec(tokenizer_, {1, nul});
  auto hello = dec.Push(Id("▁Hello"));
  ASSERT_TRUE(hello.ok());
  EXPECT_EQ(*hello + dec.Finish(), " Hello");
  // The first byte of a 3-byte character is carried: the completion finishes it.
  IncrementalDecoder partial(tokenizer_, {1, Id("<0xE7>")});
  std::string text = *partial.Push(Id("<0x8C>"));
  text += *partial.Push(Id("<0xAB>"));
  text += partial.Finish();
  EXPECT_EQ(text, "\xE7\x8C\xAB");  // 猫
}

TEST_F(TokenizerTest, FirstTokenStripRule) {
  const int32_t hello = Id("\xE2\x96\x81Hello");
  const int32_t world = Id("\xE2\x96\x81world");
  EXPECT_EQ(*tokenizer_->Decode({hello, world}), "Hello world");
  EXPECT_EQ(*tokenizer_->Decode({1, hello, world}), "Hello world");
  EXPECT_EQ(*tokenizer_->Decode({1, hello, world}, /*skip_special_tokens=*/false),
            "<s> Hello world");
  EXPECT_EQ(*tokenizer_->Decode({world}), "world");
  EXPECT_EQ(*tokenizer_->Decode({}), "");
  // Generation after a prompt keeps the leading space of its first token...
  EXPECT_EQ(StreamDecode({1, hello}, {world}), " world");
  // ...but not after a prompt that decodes to nothing.
  EXPECT_EQ(StreamDecode({1}, {world}), "world");
  EXPECT_EQ(StreamDecode({}, {world}), "world");
  // Only one leading space is stripped.
  EXPECT_EQ(*tokenizer_->Decode({Id("\xE2\x96\x81\xE2\x96\x81"), hello}), "  Hello");
}

TEST_F(TokenizerTest, ByteFallbackDecoding) {
  const int32_t e4 = Id("<0xE4>"), b8 = Id("<0xB8>"), ad = Id("<0xAD>"), ff = Id("<0xFF>");
  const int32_t hello = Id("\xE2\x96\x81Hello");
  ASSERT_GE(e4, 0);
  ASSERT_GE(ff, 0);
  // A complete character.
  EXPECT_EQ(*tokenizer_->Decode({e4, b8, ad}), "\xE4\xB8\xAD");
  // An incomplete run: one U+FFFD per byte.
  EXPECT_EQ(*tokenizer_->Decode({e4, b8}), kReplacement + kReplacement);
  EXPECT_EQ(*tokenizer_->Decode({e4, b8, hello}), kReplacement + kReplacement + " Hello");
  // Any invalid byte spoils the whole run (HF semantics), even valid parts.
  EXPECT_EQ(*tokenizer_->Decode({e4, b8, ad, ff}),
            kReplacement + kReplacement + kReplacement + kReplacement);
  // A skipped special token does not interrupt a run...
  EXPECT_EQ(*tokenizer_->Decode({e4, 1, b8, ad}), "\xE4\xB8\xAD");
  // ...but a kept one does.
  EXPECT_EQ(*tokenizer_->Decode({e4, 1, b8, ad}, false),
            kReplacement + "<s>" + kReplacement + kReplacement);
  // A byte-decoded leading space is stripped like any other.
  EXPECT_EQ(*tokenizer_->Decode({Id("<0x20>"), hello}), " Hello");

  // Streaming: nothing is emitted mid-run; output is always valid UTF-8.
  for (const std::vector<int32_t>& ids :
       std::vector<std::vector<int32_t>>{{e4, b8, ad},
                                         {e4, b8},
                                         {e4, b8, hello},
                                         {hello, e4, b8, ad, ff, hello},
                                         {e4, 1, b8, ad},
                                         {ff},
                                         {hello, e4, b8, ad, e4, b8, ad, hello}}) {
    EXPECT_EQ(StreamDecode({}, ids), *tokenizer_->Decode(ids));
    EXPECT_EQ(StreamDecode({}, ids, false), *tokenizer_->Decode(ids, false));
  }
  IncrementalDecoder dec(tokenizer_);
  EXPECT_EQ(*dec.Push(hello), "Hello");
  EXPECT_EQ(*dec.Push(e4), "");
  EXPECT_EQ(*dec.Push(b8), "");
  EXPECT_EQ(*dec.Push(ad), "");
  EXPECT_EQ(*dec.Push(hello), "\xE4\xB8\xAD Hello");
  EXPECT_EQ(*dec.Push(e4), "");
  EXPECT_EQ(dec.Finish(), kReplacement);
  EXPECT_EQ(dec.Push(hello).status().code(), absl::StatusCode::kFailedPrecondition);

  // A prompt ending inside a byte run: its pending bytes come out with the
  // generated text.
  EXPECT_EQ(StreamDecode({1, hello, e4}, {b8, ad, hello}), "\xE4\xB8\xAD Hello");
}

TEST_F(TokenizerTest, LiteralSpecialTokensInText) {
  // HF splits added tokens out of the raw text before normalization; each
  // remaining piece is normalized on its own, so it gets its own "▁" prefix.
  const int32_t hello = Id("\xE2\x96\x81Hello");
  const int32_t world = Id("\xE2\x96\x81world");
  EXPECT_EQ(tokenizer_->Encode("Hello<s>world"), (std::vector<int32_t>{1, hello, 1, world}));
  EXPECT_EQ(tokenizer_->Encode("<s>Hello"), (std::vector<int32_t>{1, 1, hello}));
  EXPECT_EQ(tokenizer_->Encode("Hello</s>"), (std::vector<int32_t>{1, hello, 2}));
  EXPECT_EQ(tokenizer_->Encode("<unk>", false), (std::vector<int32_t>{0}));
  EXPECT_EQ(tokenizer_->Encode("</s></s>", false), (std::vector<int32_t>{2, 2}));
  // " world" after a special token is "▁▁world" -> "▁", "▁world".
  EXPECT_EQ(tokenizer_->Encode("</s> world", false),
            (std::vector<int32_t>{2, Id("\xE2\x96\x81"), world}));
  // Partial matches are ordinary text.
  EXPECT_THAT(tokenizer_->Encode("<s </ s>", false), ::testing::Not(::testing::Contains(1)));
  EXPECT_EQ(*tokenizer_->Decode({1, hello, 1, world}), "Hello world");
  EXPECT_EQ(*tokenizer_->Decode({1, hello, 1, world}, false), "<s> Hello<s> world");
}

TEST_F(TokenizerTest, InvalidUtf8Input) {
  // Invalid bytes are encoded one byte token each.
  const std::vector<int32_t> ids = tokenizer_->Encode("a\xFF", false);
  EXPECT_EQ(ids, (std::vector<int32_t>{Id("\xE2\x96\x81"
                                          "a"),
                                       Id("<0xFF>")}));
  EXPECT_EQ(*tokenizer_->Decode(ids), "a" + kReplacement);
}

TEST_F(TokenizerTest, OutOfRangeIds) {
  absl::StatusOr<std::string> s = tokenizer_->Decode({1, 32000});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("32000"));
  s = tokenizer_->Decode({-5});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("-5"));
  EXPECT_EQ(tokenizer_->IdToToken(32000).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tokenizer_->IdToToken(-1).status().code(), absl::StatusCode::kInvalidArgument);

  IncrementalDecoder dec(tokenizer_);
  EXPECT_EQ(*dec.Push(Id("\xE2\x96\x81Hello")), "Hello");
  absl::StatusOr<std::string> bad = dec.Push(123456);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("123456"));
  // The stream is unaffected.
  EXPECT_EQ(*dec.Push(Id("\xE2\x96\x81world")), " world");

  IncrementalDecoder bad_prompt(tokenizer_, {1, 99999});
  EXPECT_EQ(bad_prompt.Push(1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(TokenizerTest, LongTextRoundTripAndSpeed) {
  std::string text;
  for (int rep = 0; text.size() < 10000; ++rep) {
    for (const Reference& r : *refs_) {
      absl::StrAppend(&text, r.text, rep % 2 ? "\n" : " ");
    }
  }
  std::vector<int32_t> ids;
  const auto t0 = std::chrono::steady_clock::now();
  constexpr int kIters = 10;
  for (int i = 0; i < kIters; ++i) ids = tokenizer_->Encode(text);
  const auto t1 = std::chrono::steady_clock::now();
  const double ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / kIters;
  std::printf("Encode: %zu bytes -> %zu tokens in %.3f ms\n", text.size(), ids.size(), ms);
  EXPECT_LT(ms, 500.0);
  EXPECT_EQ(*tokenizer_->Decode(ids), text);
  EXPECT_EQ(StreamDecode({}, ids), text);
  // Encoding pieces separately differs only at piece boundaries; the text is
  // one BPE word, so a prefix's encoding is not necessarily a prefix. Check a
  // rebuilt encoding decodes the same.
  EXPECT_EQ(*tokenizer_->Decode(tokenizer_->Encode(text, false)), text);
}

TEST(TokenizerLoadTest, TinyMixtralDirMatches) {
  auto a = Tokenizer::FromDir(kMistralDir);
  auto b = Tokenizer::FromDir(kDataDir + "/tiny-mixtral");
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  const std::string text = "Mixtral 8x7B uses 2 of 8 experts per token. 日本語";
  EXPECT_EQ((*a)->Encode(text), (*b)->Encode(text));
}

TEST(TokenizerLoadTest, MissingFile) {
  auto t = Tokenizer::FromFiles("/nonexistent/dir/tokenizer.json", "");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(t.status().message(), HasSubstr("/nonexistent/dir/tokenizer.json"));
  t = Tokenizer::FromDir("/nonexistent/dir");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
}

TEST(TokenizerLoadTest, MissingConfigUsesTemplate) {
  auto t = Tokenizer::FromFiles(kMistralDir + "/tokenizer.json", "/nonexistent/config.json");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE((*t)->add_bos());
  EXPECT_FALSE((*t)->add_eos());
  EXPECT_EQ((*t)->bos_id(), 1);
  EXPECT_EQ((*t)->eos_id(), 2);
  EXPECT_EQ((*t)->Encode("Hello"), (std::vector<int32_t>{1, 22557}));
  auto u = Tokenizer::FromFiles(kMistralDir + "/tokenizer.json", "");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ((*u)->Encode("Hello"), (std::vector<int32_t>{1, 22557}));
}

TEST(TokenizerLoadTest, ConfigOverridesSpecialTokens) {
  const std::string cfg = ::testing::TempDir() + "/tok_cfg_eos.json";
  WriteAll(cfg, R"({"add_bos_token": false, "add_eos_token": true,
                    "bos_token": {"content": "<s>", "special": true},
                    "eos_token": {"content": "</s>"}})");
  auto t = Tokenizer::FromFiles(kMistralDir + "/tokenizer.json", cfg);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE((*t)->add_bos());
  EXPECT_TRUE((*t)->add_eos());
  EXPECT_EQ((*t)->Encode("Hello"), (std::vector<int32_t>{22557, 2}));
  EXPECT_EQ((*t)->Encode("Hello", false), (std::vector<int32_t>{22557}));
  std::remove(cfg.c_str());
}

TEST(TokenizerLoadTest, MalformedJson) {
  const std::string bad = ::testing::TempDir() + "/tok_bad.json";
  WriteAll(bad, "{ \"model\": [1, 2,");
  auto t = Tokenizer::FromFiles(bad, "");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(t.status().message(), HasSubstr(bad));

  // Valid JSON, wrong shape.
  WriteAll(bad, R"({"model": {"type": "BPE", "vocab": {"a": 0}}})");
  t = Tokenizer::FromFiles(bad, "");
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(t.status().message(), HasSubstr(bad));
  EXPECT_THAT(t.status().message(), HasSubstr("merges"));

  WriteAll(bad, R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})");
  t = Tokenizer::FromFiles(bad, "");
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(t.status().message(), HasSubstr("merges[0]"));

  WriteAll(bad, R"({"model": {"type": "WordPiece", "vocab": {}}})");
  t = Tokenizer::FromFiles(bad, "");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kUnimplemented);

  WriteAll(bad, "[]");
  t = Tokenizer::FromFiles(bad, "");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);

  // Malformed tokenizer_config.json.
  WriteAll(bad, "{ not json");
  t = Tokenizer::FromFiles(kMistralDir + "/tokenizer.json", bad);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(t.status().message(), HasSubstr(bad));

  WriteAll(bad, R"({"add_bos_token": "yes"})");
  t = Tokenizer::FromFiles(kMistralDir + "/tokenizer.json", bad);
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(t.status().message(), HasSubstr("add_bos_token"));
  std::remove(bad.c_str());
}

TEST(TokenizerLoadTest, SmallHandWrittenTokenizer) {
  // Pair-form merges, no normalizer/decoder/post-processor, unk without byte
  // fallback (fused).
  const std::string path = ::testing::TempDir() + "/tok_small.json";
  WriteAll(path, R"({
    "added_tokens": [{"id": 5, "content": "[X]", "special": false}],
    "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
    "model": {"type": "BPE", "unk_token": "?", "fuse_unk": true, "byte_fallback": false,
              "vocab": {"?": 0, "a": 1, "b": 2, "ab": 3, "abb": 4},
              "merges": [["a", "b"], ["ab", "b"]]}})");
  auto t = Tokenizer::FromFiles(path, "");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->vocab_size(), 6);
  EXPECT_FALSE((*t)->add_bos());
  EXPECT_EQ((*t)->Encode("abbab"), (std::vector<int32_t>{4, 3}));
  EXPECT_EQ((*t)->Encode("axyb[X]a"), (std::vector<int32_t>{1, 0, 2, 5, 1}));
  EXPECT_EQ(*(*t)->Decode({4, 3, 5}), "abb ab [X]");
  IncrementalDecoder dec(t->get());
  std::string streamed;
  for (int32_t id : {4, 3, 5}) streamed += *dec.Push(id);
  streamed += dec.Finish();
  EXPECT_EQ(streamed, "abb ab [X]");
  std::remove(path.c_str());
}

TEST(TokenizerLoadTest, AddedTokenOptions) {
  // lstrip/rstrip swallow surrounding whitespace; a normalized added token is
  // matched against the normalized text; single_word only matches whole words.
  const std::string path = ::testing::TempDir() + "/tok_added.json";
  WriteAll(path, R"({
    "added_tokens": [
      {"id": 5, "content": "[M]", "lstrip": true, "rstrip": true, "normalized": false,
       "special": true},
      {"id": 6, "content": "x y", "normalized": true, "special": false},
      {"id": 7, "content": "w", "single_word": true, "normalized": false, "special": false}],
    "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "_"},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "_": 2, "z": 3, "x": 4},
              "merges": []}})");
  auto t = Tokenizer::FromFiles(path, "");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("a  [M] b"), (std::vector<int32_t>{0, 5, 1}));
  EXPECT_EQ((*t)->Encode("zx yz"), (std::vector<int32_t>{3, 6, 3}));
  EXPECT_EQ((*t)->Encode("a w b"), (std::vector<int32_t>{0, 2, 7, 2, 1}));
  // "w" inside a word is not matched (and, not being in the vocab, is dropped).
  EXPECT_EQ((*t)->Encode("awb"), (std::vector<int32_t>{0, 1}));
  EXPECT_TRUE((*t)->IsSpecial(5));
  EXPECT_FALSE((*t)->IsSpecial(6));
  EXPECT_EQ(*(*t)->Decode({0, 5, 1}), "a b");
  EXPECT_EQ(*(*t)->Decode({0, 5, 1}, false), "a [M] b");
  std::remove(path.c_str());
}

}  // namespace
}  // namespace switchyard
