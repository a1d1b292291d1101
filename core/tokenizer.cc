#include "core/tokenizer.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <fstream>
#include <queue>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/utf8.h"
#include "nlohmann/json.hpp"

namespace switchyard {
namespace {

using nlohmann::json;

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// ---------------------------------------------------------------------------
// UTF-8 helpers. Validity follows Rust's String::from_utf8 (no overlongs, no
// surrogates, nothing above U+10FFFF), which is what `tokenizers` uses.

// Length of the "character" at s[i]: a valid UTF-8 sequence, or one byte.
size_t CharLen(std::string_view s, size_t i) {
  const size_t n = ValidUtf8Len(s, i);
  return n == 0 ? 1 : n;
}

// Code point of the valid sequence s[i, i+n); invalid single bytes map to
// 0xFFFD.
uint32_t CodePoint(std::string_view s, size_t i, size_t n) {
  const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[k])); };
  if (n == 1) return b(i) < 0x80 ? b(i) : 0xFFFD;
  if (n == 2) return ((b(i) & 0x1F) << 6) | (b(i + 1) & 0x3F);
  if (n == 3) return ((b(i) & 0x0F) << 12) | ((b(i + 1) & 0x3F) << 6) | (b(i + 2) & 0x3F);
  return ((b(i) & 0x07) << 18) | ((b(i + 1) & 0x3F) << 12) | ((b(i + 2) & 0x3F) << 6) |
         (b(i + 3) & 0x3F);
}

// Rust's char::is_whitespace (Unicode White_Space).
bool IsWhitespace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Approximation of the regex class \w that `tokenizers` uses for single_word
// added tokens: exact for ASCII; beyond ASCII, everything except whitespace and
// the common punctuation / symbol blocks counts as a word character.
bool IsWordChar(uint32_t c) {
  if (c < 0x80) return std::isalnum(static_cast<int>(c)) || c == '_';
  if (IsWhitespace(c)) return false;
  if (c >= 0xA1 && c <= 0xBF) return c == 0xAA || c == 0xB5 || c == 0xBA;
  if (c == 0xD7 || c == 0xF7) return false;
  if (c >= 0x2010 && c <= 0x205E) return c == 0x203F || c == 0x2040 || c == 0x2054;
  if (c >= 0x3000 && c <= 0x303F) return c >= 0x3005 && c <= 0x3007;
  if (c >= 0xFF01 && c <= 0xFF0F) return false;
  return true;
}

// Last / first character of `s` (empty -> nullopt-like 0xFFFFFFFF).
constexpr uint32_t kNoChar = 0xFFFFFFFF;
uint32_t FirstChar(std::string_view s) {
  if (s.empty()) return kNoChar;
  return CodePoint(s, 0, CharLen(s, 0));
}
uint32_t LastChar(std::string_view s) {
  if (s.empty()) return kNoChar;
  size_t i = s.size() - 1;
  // Walk back over up to 3 continuation bytes to a start byte that covers the end.
  for (size_t back = 0; back < 4 && i > 0; ++back) {
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) break;
    --i;
  }
  const size_t n = ValidUtf8Len(s, i);
  if (n != 0 && i + n == s.size()) return CodePoint(s, i, n);
  return 0xFFFD;
}

void ReplaceAll(std::string_view in, std::string_view pattern, std::string_view content,
                std::string* out) {
  out->clear();
  if (pattern.empty()) {
    out->assign(in);
    return;
  }
  size_t pos = 0;
  while (true) {
    const size_t hit = in.find(pattern, pos);
    if (hit == std::string_view::npos) break;
    out->append(in.substr(pos, hit - pos));
    out->append(content);
    pos = hit + pattern.size();
  }
  out->append(in.substr(pos));
}

// `tokenizers`' ByteFallback test: a 6-byte "<0xHH>" token whose HH parses
// with Rust's u8::from_str_radix(_, 16) (which also accepts a leading '+').
int ByteFallbackValue(std::string_view token) {
  if (token.size() != 6 || token.substr(0, 3) != "<0x" || token[5] != '>') return -1;
  const auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  if (token[3] == '+') return hex(token[4]);
  const int hi = hex(token[3]);
  const int lo = hex(token[4]);
  if (hi < 0 || lo < 0) return -1;
  return hi * 16 + lo;
}

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open tokenizer file: ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading tokenizer file: ", path));
  return std::move(ss).str();
}

bool FileExists(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return static_cast<bool>(in);
}

absl::StatusOr<json> ParseJson(std::string_view text, const std::string& path) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    // Parse again with exceptions on, only to get the position of the error.
    std::string detail = "syntax error";
    try {
      const json unused = json::parse(text);
      (void)unused;
    } catch (const json::exception& e) {
      detail = e.what();
    }
    return absl::InvalidArgumentError(absl::StrCat("malformed JSON in ", path, ": ", detail));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("malformed JSON in ", path, ": not an object"));
  }
  return j;
}

// Field helpers. `where` names the file and field for error messages.
absl::Status FieldError(const std::string& where, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(where, ": ", what));
}

absl::StatusOr<bool> OptBool(const json& obj, const char* key, bool dflt,
                             const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) return FieldError(absl::StrCat(where, ".", key), "must be a boolean");
  return it->get<bool>();
}

// A string, or an object with a string "content" (tokenizer_config.json's
// AddedToken form). Returns "" for null/absent.
absl::StatusOr<std::string> TokenString(const json& obj, const char* key,
                                        const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::string();
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  return FieldError(absl::StrCat(where, ".", key),
                    "must be a string or an object with a string \"content\"");
}

absl::StatusOr<std::string> StringPattern(const json& obj, const std::string& where) {
  auto it = obj.find("pattern");
  if (it == obj.end() || !it->is_object()) {
    return FieldError(where, "missing object \"pattern\"");
  }
  auto s = it->find("String");
  if (s == it->end()) {
    return absl::UnimplementedError(absl::StrCat(where, ": only String patterns are supported"));
  }
  if (!s->is_string()) return FieldError(where, "pattern.String must be a string");
  return s->get<std::string>();
}

absl::StatusOr<std::string> RequiredString(const json& obj, const char* key,
                                           const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || !it->is_string()) {
    return FieldError(absl::StrCat(where, ".", key), "missing or not a string");
  }
  return it->get<std::string>();
}

}  // namespace

// ---------------------------------------------------------------------------
// Loading.

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFiles(
    const std::string& tokenizer_json, const std::string& tokenizer_config_json) {
  absl::StatusOr<std::string> text = ReadFile(tokenizer_json);
  if (!text.ok()) return text.status();
  std::string config_text;
  std::string config_path;
  if (!tokenizer_config_json.empty() && FileExists(tokenizer_config_json)) {
    absl::StatusOr<std::string> c = ReadFile(tokenizer_config_json);
    if (!c.ok()) return c.status();
    config_text = *std::move(c);
    config_path = tokenizer_config_json;
  }
  return Build(*text, tokenizer_json, config_text, config_path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromDir(const std::string& dir) {
  return FromFiles(dir + "/tokenizer.json", dir + "/tokenizer_config.json");
}

// The stages of Build, in the order Build runs them (which fixes which error a
// file with several problems reports). A nested class so that the stages may
// fill the Tokenizer's private fields.
class Tokenizer::Loader {
 public:
  // The "model" object of tokenizer.json, or InvalidArgument if it is missing.
  static absl::StatusOr<const json*> FindModel(const json& root, const std::string& mwhere);
  // Rejects a model other than plain BPE; reads byte_fallback, fuse_unk, ignore_merges.
  static absl::Status ReadModelOptions(const json& model, const std::string& mwhere, Tokenizer* t);
  // Reads model.vocab into token_to_id_; returns the largest id (-1 if empty).
  static absl::StatusOr<int64_t> ReadVocab(const json& model, const std::string& mwhere,
                                           Tokenizer* t);
  // Reads added_tokens into added_tokens_; returns max(max_id, their largest id).
  static absl::StatusOr<int64_t> ReadAddedTokens(const json& root, const std::string& path,
                                                 int64_t max_id, Tokenizer* t);
  // Sizes the by-id tables to max_id + 1 and fills them from the vocab and added tokens.
  static void BuildIdTables(int64_t max_id, Tokenizer* t);
  // Finds the byte-fallback tokens <0x00>..<0xFF> in the vocab.
  static void FindByteTokens(Tokenizer* t);
  // Reads model.unk_token into unk_id_ (stays -1 if it is not in the vocab).
  static absl::Status ReadUnkToken(const json& model, const std::string& mwhere, Tokenizer* t);
  // Reads model.merges into merges_ (rank = position in the list).
  static absl::Status ReadMerges(const json& model, const std::string& mwhere, Tokenizer* t);
  // Reads the normalizer (Prepend / Replace steps, alone or in a Sequence).
  static absl::Status ReadNormalizer(const json& root, const std::string& path, Tokenizer* t);
  // Rejects any pre_tokenizer but null.
  static absl::Status CheckPreTokenizer(const json& root, const std::string& path);
  // Splits added tokens into raw and normalized matching sets (needs the normalizer).
  static void IndexAddedTokens(Tokenizer* t);
  // Reads a TemplateProcessing post_processor into prefix_ids_ / suffix_ids_.
  static absl::Status ReadPostProcessor(const json& root, const std::string& path, Tokenizer* t);
  // Reads the decoder and fills decoded_piece_ / byte_value_ for every id.
  static absl::Status ReadDecoder(const json& root, const std::string& path, Tokenizer* t);
  // Reads tokenizer_config.json (may be empty) and sets BOS/EOS and add_bos_ / add_eos_.
  static absl::Status ReadSpecialTokenConfig(std::string_view config_json,
                                             const std::string& config_path, Tokenizer* t);

 private:
  // What the decoder does to each token string, as parsed from "decoder".
  struct DecoderSteps {
    bool has_replace = false;
    std::string replace_pattern;
    std::string replace_content;
    bool has_byte_fallback = false;
  };
  // What tokenizer_config.json says about BOS/EOS.
  struct SpecialTokenConfig {
    std::string bos_token;  // empty: not given
    std::string eos_token;
    bool has_add = false;  // whether add_bos_token or add_eos_token is present
    bool add_bos = true;
    bool add_eos = false;
  };

  // Parses the decoder's steps; sets strip_char_, strip_start_ and has_decoder_.
  static absl::StatusOr<DecoderSteps> ParseDecoder(const json& root, const std::string& path,
                                                   Tokenizer* t);
  // Applies `steps` to every token string to fill decoded_piece_ / byte_value_.
  static void BuildDecodedPieces(const DecoderSteps& steps, Tokenizer* t);
  // Parses tokenizer_config.json's add_bos_token, add_eos_token, bos_token, eos_token.
  static absl::StatusOr<SpecialTokenConfig> ParseSpecialTokenConfig(std::string_view config_json,
                                                                    const std::string& config_path);
  // Sets bos_id_ / eos_id_: from the config's tokens, else the template's, else <s> / </s>.
  static absl::Status ResolveBosEos(const SpecialTokenConfig& config,
                                    const std::string& config_path, Tokenizer* t);
  // Sets add_bos_ / add_eos_ (and the template ids) from the config if it says, else the
  // post_processor template.
  static absl::Status ApplyAddSpecialTokens(const SpecialTokenConfig& config,
                                            const std::string& config_path, Tokenizer* t);
};

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Build(std::string_view tokenizer_json,
                                                            const std::string& path,
                                                            std::string_view config_json,
                                                            const std::string& config_path) {
  absl::StatusOr<json> root_or = ParseJson(tokenizer_json, path);
  if (!root_or.ok()) return root_or.status();
  const json& root = *root_or;
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  std::fill(std::begin(t->byte_ids_), std::end(t->byte_ids_), -1);

  // Model and added tokens.
  const std::string mwhere = absl::StrCat(path, ": model");
  SY_ASSIGN_OR_RETURN(const json* model, Loader::FindModel(root, mwhere));
  SY_RETURN_IF_ERROR(Loader::ReadModelOptions(*model, mwhere, t.get()));
  SY_ASSIGN_OR_RETURN(int64_t max_id, Loader::ReadVocab(*model, mwhere, t.get()));
  SY_ASSIGN_OR_RETURN(max_id, Loader::ReadAddedTokens(root, path, max_id, t.get()));
  Loader::BuildIdTables(max_id, t.get());
  Loader::FindByteTokens(t.get());
  SY_RETURN_IF_ERROR(Loader::ReadUnkToken(*model, mwhere, t.get()));
  SY_RETURN_IF_ERROR(Loader::ReadMerges(*model, mwhere, t.get()));

  // The rest of the pipeline.
  SY_RETURN_IF_ERROR(Loader::ReadNormalizer(root, path, t.get()));
  SY_RETURN_IF_ERROR(Loader::CheckPreTokenizer(root, path));
  Loader::IndexAddedTokens(t.get());
  SY_RETURN_IF_ERROR(Loader::ReadPostProcessor(root, path, t.get()));
  SY_RETURN_IF_ERROR(Loader::ReadDecoder(root, path, t.get()));
  SY_RETURN_IF_ERROR(Loader::ReadSpecialTokenConfig(config_json, config_path, t.get()));
  return t;
}

absl::StatusOr<const json*> Tokenizer::Loader::FindModel(const json& root,
                                                         const std::string& mwhere) {
  auto mit = root.find("model");
  if (mit == root.end() || !mit->is_object()) return FieldError(mwhere, "missing or not an object");
  return &*mit;
}

absl::Status Tokenizer::Loader::ReadModelOptions(const json& model, const std::string& mwhere,
                                                 Tokenizer* t) {
  if (auto type = model.find("type"); type != model.end()) {
    if (!type->is_string() || type->get<std::string>() != "BPE") {
      return absl::UnimplementedError(
          absl::StrCat(mwhere, ".type: only \"BPE\" is supported, got ", type->dump()));
    }
  }
  if (auto d = model.find("dropout"); d != model.end() && !d->is_null()) {
    if (!d->is_number() || d->get<double>() != 0.0) {
      return absl::UnimplementedError(absl::StrCat(mwhere, ".dropout: BPE dropout is unsupported"));
    }
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(key);
    if (it != model.end() && !it->is_null() &&
        !(it->is_string() && it->get<std::string>().empty())) {
      return absl::UnimplementedError(absl::StrCat(mwhere, ".", key, " is unsupported"));
    }
  }
  absl::StatusOr<bool> b = OptBool(model, "byte_fallback", false, mwhere);
  if (!b.ok()) return b.status();
  t->byte_fallback_ = *b;
  if (!(b = OptBool(model, "fuse_unk", false, mwhere)).ok()) return b.status();
  t->fuse_unk_ = *b;
  if (!(b = OptBool(model, "ignore_merges", false, mwhere)).ok()) return b.status();
  t->ignore_merges_ = *b;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Tokenizer::Loader::ReadVocab(const json& model, const std::string& mwhere,
                                                     Tokenizer* t) {
  auto vit = model.find("vocab");
  if (vit == model.end() || !vit->is_object()) {
    return FieldError(absl::StrCat(mwhere, ".vocab"), "missing or not an object");
  }
  int64_t max_id = -1;
  t->token_to_id_.reserve(vit->size());
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > (int64_t{1} << 30)) {
      return FieldError(absl::StrCat(mwhere, ".vocab[\"", it.key(), "\"]"),
                        "must be a non-negative integer id");
    }
    const int64_t id = it.value().get<int64_t>();
    t->token_to_id_[it.key()] = static_cast<int32_t>(id);
    max_id = std::max(max_id, id);
  }
  return max_id;
}

absl::StatusOr<int64_t> Tokenizer::Loader::ReadAddedTokens(const json& root,
                                                           const std::string& path, int64_t max_id,
                                                           Tokenizer* t) {
  auto ait = root.find("added_tokens");
  if (ait == root.end() || ait->is_null()) return max_id;
  if (!ait->is_array()) return FieldError(absl::StrCat(path, ": added_tokens"), "not an array");
  for (size_t i = 0; i < ait->size(); ++i) {
    const json& e = (*ait)[i];
    const std::string where = absl::StrCat(path, ": added_tokens[", i, "]");
    if (!e.is_object()) return FieldError(where, "not an object");
    AddedToken a;
    auto id = e.find("id");
    if (id == e.end() || !id->is_number_integer() || id->get<int64_t>() < 0 ||
        id->get<int64_t>() > (int64_t{1} << 30)) {
      return FieldError(absl::StrCat(where, ".id"), "missing or not a non-negative integer");
    }
    a.id = static_cast<int32_t>(id->get<int64_t>());
    absl::StatusOr<std::string> content = RequiredString(e, "content", where);
    if (!content.ok()) return content.status();
    a.content = *std::move(content);
    if (a.content.empty()) return FieldError(absl::StrCat(where, ".content"), "is empty");
    // Absent "normalized" defaults to !special, as AddedToken(special=...) does.
    struct {
      const char* key;
      bool* field;
    } flags[] = {{"special", &a.special},
                 {"single_word", &a.single_word},
                 {"lstrip", &a.lstrip},
                 {"rstrip", &a.rstrip},
                 {"normalized", &a.normalized}};
    for (auto& f : flags) {
      const bool dflt = f.field == &a.normalized ? !a.special : false;
      absl::StatusOr<bool> v = OptBool(e, f.key, dflt, where);
      if (!v.ok()) return v.status();
      *f.field = *v;
    }
    max_id = std::max<int64_t>(max_id, a.id);
    t->added_tokens_.push_back(std::move(a));
  }
  return max_id;
}

void Tokenizer::Loader::BuildIdTables(int64_t max_id, Tokenizer* t) {
  t->id_to_token_.assign(static_cast<size_t>(max_id + 1), std::string());
  t->has_token_.assign(static_cast<size_t>(max_id + 1), false);
  t->is_special_.assign(static_cast<size_t>(max_id + 1), false);
  for (const auto& [token, id] : t->token_to_id_) {
    t->id_to_token_[id] = token;
    t->has_token_[id] = true;
  }
  for (const AddedToken& a : t->added_tokens_) {
    t->id_to_token_[a.id] = a.content;
    t->has_token_[a.id] = true;
    if (a.special) t->is_special_[a.id] = true;
  }
}

void Tokenizer::Loader::FindByteTokens(Tokenizer* t) {
  // As `tokenizers` spells them: format!("<{:#04X}>", b).
  for (int v = 0; v < 256; ++v) {
    static const char kHex[] = "0123456789ABCDEF";
    const char name[7] = {'<', '0', 'x', kHex[v >> 4], kHex[v & 15], '>', 0};
    auto it = t->token_to_id_.find(std::string_view(name, 6));
    if (it != t->token_to_id_.end()) t->byte_ids_[v] = it->second;
  }
}

absl::Status Tokenizer::Loader::ReadUnkToken(const json& model, const std::string& mwhere,
                                             Tokenizer* t) {
  if (auto u = model.find("unk_token"); u != model.end() && !u->is_null()) {
    if (!u->is_string()) return FieldError(absl::StrCat(mwhere, ".unk_token"), "not a string");
    auto it = t->token_to_id_.find(u->get<std::string>());
    if (it != t->token_to_id_.end()) t->unk_id_ = it->second;
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Loader::ReadMerges(const json& model, const std::string& mwhere,
                                           Tokenizer* t) {
  auto merges = model.find("merges");
  if (merges == model.end() || !merges->is_array()) {
    return FieldError(absl::StrCat(mwhere, ".merges"), "missing or not an array");
  }
  t->merges_.reserve(merges->size() * 2);
  std::string left;
  std::string right;
  for (size_t i = 0; i < merges->size(); ++i) {
    const json& m = (*merges)[i];
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos) {
        return FieldError(absl::StrCat(mwhere, ".merges[", i, "]"),
                          absl::StrCat("\"", s, "\" is not of the form \"a b\""));
      }
      left = s.substr(0, sp);
      right = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      return FieldError(absl::StrCat(mwhere, ".merges[", i, "]"),
                        "must be \"a b\" or [\"a\", \"b\"]");
    }
    auto a = t->token_to_id_.find(left);
    auto c = t->token_to_id_.find(right);
    auto n = t->token_to_id_.find(left + right);
    if (a == t->token_to_id_.end() || c == t->token_to_id_.end() || n == t->token_to_id_.end()) {
      return FieldError(absl::StrCat(mwhere, ".merges[", i, "]"),
                        absl::StrCat("merge of \"", left, "\" and \"", right,
                                     "\" uses a token that is not in the vocab"));
    }
    // Later duplicates overwrite earlier ones, as in `tokenizers`' HashMap.
    t->merges_[PairKey(a->second, c->second)] = {static_cast<int32_t>(i), n->second};
  }
  return absl::OkStatus();
}

namespace {

// The steps of a normalizer or decoder node: the node itself, or the list
// under `list_key` when its type is "Sequence".
absl::StatusOr<std::vector<const json*>> SequenceSteps(const json& node, const char* list_key,
                                                       const std::string& where) {
  if (!node.is_object()) return FieldError(where, "not an object");
  absl::StatusOr<std::string> type = RequiredString(node, "type", where);
  if (!type.ok()) return type.status();
  std::vector<const json*> steps;
  if (*type != "Sequence") {
    steps.push_back(&node);
    return steps;
  }
  auto list = node.find(list_key);
  if (list == node.end() || !list->is_array()) {
    return FieldError(absl::StrCat(where, ".", list_key), "missing or not an array");
  }
  for (const json& s : *list) steps.push_back(&s);
  return steps;
}

}  // namespace

absl::Status Tokenizer::Loader::ReadNormalizer(const json& root, const std::string& path,
                                               Tokenizer* t) {
  auto nit = root.find("normalizer");
  if (nit == root.end() || nit->is_null()) return absl::OkStatus();
  const std::string where = absl::StrCat(path, ": normalizer");
  absl::StatusOr<std::vector<const json*>> sequence = SequenceSteps(*nit, "normalizers", where);
  if (!sequence.ok()) return sequence.status();
  const std::vector<const json*>& steps = *sequence;
  for (size_t i = 0; i < steps.size(); ++i) {
    const json& s = *steps[i];
    const std::string swhere = absl::StrCat(where, "[", i, "]");
    if (!s.is_object()) return FieldError(swhere, "not an object");
    absl::StatusOr<std::string> st = RequiredString(s, "type", swhere);
    if (!st.ok()) return st.status();
    NormalizerStep step;
    if (*st == "Prepend") {
      absl::StatusOr<std::string> p = RequiredString(s, "prepend", swhere);
      if (!p.ok()) return p.status();
      step.is_prepend = true;
      step.content = *std::move(p);
    } else if (*st == "Replace") {
      absl::StatusOr<std::string> pat = StringPattern(s, swhere);
      if (!pat.ok()) return pat.status();
      absl::StatusOr<std::string> content = RequiredString(s, "content", swhere);
      if (!content.ok()) return content.status();
      step.pattern = *std::move(pat);
      step.content = *std::move(content);
    } else {
      return absl::UnimplementedError(
          absl::StrCat(swhere, ": unsupported normalizer type \"", *st, "\""));
    }
    t->normalizer_.push_back(std::move(step));
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Loader::CheckPreTokenizer(const json& root, const std::string& path) {
  if (auto pit = root.find("pre_tokenizer"); pit != root.end() && !pit->is_null()) {
    return absl::UnimplementedError(
        absl::StrCat(path, ": pre_tokenizer: only null is supported, got ", pit->dump(-1)));
  }
  return absl::OkStatus();
}

void Tokenizer::Loader::IndexAddedTokens(Tokenizer* t) {
  t->normalized_added_content_.resize(t->added_tokens_.size());
  for (size_t i = 0; i < t->added_tokens_.size(); ++i) {
    const AddedToken& a = t->added_tokens_[i];
    if (a.normalized) {
      t->normalized_added_content_[i] = t->Normalize(a.content);
      if (!t->normalized_added_content_[i].empty()) {
        t->normalized_added_.push_back(static_cast<int>(i));
      }
    } else {
      t->normalized_added_content_[i] = a.content;
      t->raw_added_.push_back(static_cast<int>(i));
    }
  }
}

absl::Status Tokenizer::Loader::ReadPostProcessor(const json& root, const std::string& path,
                                                  Tokenizer* t) {
  auto pp = root.find("post_processor");
  if (pp == root.end() || pp->is_null()) return absl::OkStatus();
  const std::string where = absl::StrCat(path, ": post_processor");
  if (!pp->is_object()) return FieldError(where, "not an object");
  absl::StatusOr<std::string> type = RequiredString(*pp, "type", where);
  if (!type.ok()) return type.status();
  if (*type != "TemplateProcessing") {
    return absl::UnimplementedError(
        absl::StrCat(where, ": unsupported post_processor type \"", *type, "\""));
  }
  auto single = pp->find("single");
  if (single == pp->end() || !single->is_array()) {
    return FieldError(absl::StrCat(where, ".single"), "missing or not an array");
  }
  auto specials = pp->find("special_tokens");
  bool seen_sequence = false;
  for (size_t i = 0; i < single->size(); ++i) {
    const json& item = (*single)[i];
    const std::string iwhere = absl::StrCat(where, ".single[", i, "]");
    if (item.is_object() && item.contains("Sequence")) {
      seen_sequence = true;
      continue;
    }
    if (!item.is_object() || !item.contains("SpecialToken") || !item["SpecialToken"].is_object()) {
      return FieldError(iwhere, "must be {\"Sequence\": ...} or {\"SpecialToken\": ...}");
    }
    absl::StatusOr<std::string> name = RequiredString(item["SpecialToken"], "id", iwhere);
    if (!name.ok()) return name.status();
    if (specials == pp->end() || !specials->is_object() || !specials->contains(*name) ||
        !(*specials)[*name].is_object() || !(*specials)[*name].contains("ids") ||
        !(*specials)[*name]["ids"].is_array()) {
      return FieldError(iwhere,
                        absl::StrCat("special token \"", *name, "\" has no ids in special_tokens"));
    }
    for (const json& id : (*specials)[*name]["ids"]) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
          id.get<int64_t>() >= static_cast<int64_t>(t->id_to_token_.size())) {
        return FieldError(iwhere, absl::StrCat("special token \"", *name, "\" has a bad id"));
      }
      (seen_sequence ? t->suffix_ids_ : t->prefix_ids_).push_back(id.get<int32_t>());
    }
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Loader::ReadDecoder(const json& root, const std::string& path,
                                            Tokenizer* t) {
  t->decoded_piece_.assign(t->id_to_token_.size(), std::string());
  t->byte_value_.assign(t->id_to_token_.size(), -1);
  SY_ASSIGN_OR_RETURN(const DecoderSteps steps, ParseDecoder(root, path, t));
  BuildDecodedPieces(steps, t);
  return absl::OkStatus();
}

absl::StatusOr<Tokenizer::Loader::DecoderSteps> Tokenizer::Loader::ParseDecoder(
    const json& root, const std::string& path, Tokenizer* t) {
  DecoderSteps result;
  auto dit = root.find("decoder");
  if (dit == root.end() || dit->is_null()) return result;
  const std::string where = absl::StrCat(path, ": decoder");
  absl::StatusOr<std::vector<const json*>> sequence = SequenceSteps(*dit, "decoders", where);
  if (!sequence.ok()) return sequence.status();
  const std::vector<const json*>& steps = *sequence;
  // Supported shape: [Replace] [ByteFallback] [Fuse] [Strip(stop=0)], in order.
  int stage = 0;  // 0: start, 1: after Replace, 2: after ByteFallback, 3: after Fuse, 4: Strip
  bool fused = false;
  for (size_t i = 0; i < steps.size(); ++i) {
    const json& s = *steps[i];
    const std::string swhere = absl::StrCat(where, "[", i, "]");
    if (!s.is_object()) return FieldError(swhere, "not an object");
    absl::StatusOr<std::string> st = RequiredString(s, "type", swhere);
    if (!st.ok()) return st.status();
    const auto unsupported = [&]() {
      return absl::UnimplementedError(
          absl::StrCat(swhere, ": unsupported decoder \"", *st,
                       "\" here; supported: Replace, ByteFallback, Fuse, Strip (in that order)"));
    };
    if (*st == "Replace" && stage < 1) {
      absl::StatusOr<std::string> pat = StringPattern(s, swhere);
      if (!pat.ok()) return pat.status();
      absl::StatusOr<std::string> content = RequiredString(s, "content", swhere);
      if (!content.ok()) return content.status();
      result.replace_pattern = *std::move(pat);
      result.replace_content = *std::move(content);
      result.has_replace = true;
      stage = 1;
    } else if (*st == "ByteFallback" && stage < 2) {
      result.has_byte_fallback = true;
      stage = 2;
    } else if (*st == "Fuse" && stage < 3) {
      fused = true;
      stage = 3;
    } else if (*st == "Strip" && stage < 4 && fused) {
      absl::StatusOr<std::string> content = RequiredString(s, "content", swhere);
      if (!content.ok()) return content.status();
      if (content->empty() || CharLen(*content, 0) != content->size()) {
        return FieldError(absl::StrCat(swhere, ".content"), "must be one character");
      }
      auto start = s.find("start");
      auto stop = s.find("stop");
      if (start == s.end() || !start->is_number_unsigned() || stop == s.end() ||
          !stop->is_number_unsigned()) {
        return FieldError(swhere, "start/stop must be non-negative integers");
      }
      if (stop->get<uint64_t>() != 0) {
        return absl::UnimplementedError(absl::StrCat(swhere, ": Strip with stop > 0"));
      }
      t->strip_char_ = *std::move(content);
      t->strip_start_ = static_cast<int>(std::min<uint64_t>(start->get<uint64_t>(), 1 << 20));
      stage = 4;
    } else {
      return unsupported();
    }
  }
  t->has_decoder_ = true;
  return result;
}

void Tokenizer::Loader::BuildDecodedPieces(const DecoderSteps& steps, Tokenizer* t) {
  std::string piece;
  for (size_t id = 0; id < t->id_to_token_.size(); ++id) {
    if (steps.has_replace) {
      ReplaceAll(t->id_to_token_[id], steps.replace_pattern, steps.replace_content, &piece);
    } else {
      piece = t->id_to_token_[id];
    }
    if (steps.has_byte_fallback) {
      t->byte_value_[id] = static_cast<int16_t>(ByteFallbackValue(piece));
    }
    t->decoded_piece_[id] = piece;
  }
}

absl::Status Tokenizer::Loader::ReadSpecialTokenConfig(std::string_view config_json,
                                                       const std::string& config_path,
                                                       Tokenizer* t) {
  SY_ASSIGN_OR_RETURN(const SpecialTokenConfig config,
                      ParseSpecialTokenConfig(config_json, config_path));
  SY_RETURN_IF_ERROR(ResolveBosEos(config, config_path, t));
  return ApplyAddSpecialTokens(config, config_path, t);
}

absl::StatusOr<Tokenizer::Loader::SpecialTokenConfig> Tokenizer::Loader::ParseSpecialTokenConfig(
    std::string_view config_json, const std::string& config_path) {
  SpecialTokenConfig config;
  if (config_json.empty()) return config;
  absl::StatusOr<json> cfg = ParseJson(config_json, config_path);
  if (!cfg.ok()) return cfg.status();
  const std::string where = config_path;
  config.has_add = cfg->contains("add_bos_token") || cfg->contains("add_eos_token");
  absl::StatusOr<bool> v = OptBool(*cfg, "add_bos_token", true, where);
  if (!v.ok()) return v.status();
  config.add_bos = *v;
  if (!(v = OptBool(*cfg, "add_eos_token", false, where)).ok()) return v.status();
  config.add_eos = *v;
  absl::StatusOr<std::string> s = TokenString(*cfg, "bos_token", where);
  if (!s.ok()) return s.status();
  config.bos_token = *std::move(s);
  if (!(s = TokenString(*cfg, "eos_token", where)).ok()) return s.status();
  config.eos_token = *std::move(s);
  return config;
}

absl::Status Tokenizer::Loader::ResolveBosEos(const SpecialTokenConfig& config,
                                              const std::string& config_path, Tokenizer* t) {
  if (!config.bos_token.empty()) {
    t->bos_id_ = t->TokenToId(config.bos_token);
    if (t->bos_id_ < 0) {
      return FieldError(absl::StrCat(config_path, ".bos_token"),
                        absl::StrCat("\"", config.bos_token, "\" is not a token"));
    }
  } else if (t->prefix_ids_.size() == 1) {
    t->bos_id_ = t->prefix_ids_[0];
  } else {
    t->bos_id_ = t->TokenToId("<s>");
  }
  if (!config.eos_token.empty()) {
    t->eos_id_ = t->TokenToId(config.eos_token);
    if (t->eos_id_ < 0) {
      return FieldError(absl::StrCat(config_path, ".eos_token"),
                        absl::StrCat("\"", config.eos_token, "\" is not a token"));
    }
  } else if (t->suffix_ids_.size() == 1) {
    t->eos_id_ = t->suffix_ids_[0];
  } else {
    t->eos_id_ = t->TokenToId("</s>");
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Loader::ApplyAddSpecialTokens(const SpecialTokenConfig& config,
                                                      const std::string& config_path,
                                                      Tokenizer* t) {
  if (!config.has_add) {
    // The post_processor template decides.
    t->add_bos_ = !t->prefix_ids_.empty();
    t->add_eos_ = !t->suffix_ids_.empty();
    return absl::OkStatus();
  }
  // As transformers' LlamaTokenizerFast.update_post_processor does.
  t->prefix_ids_.clear();
  t->suffix_ids_.clear();
  if (config.add_bos) {
    if (t->bos_id_ < 0) {
      return FieldError(config_path, "add_bos_token is true but there is no bos_token");
    }
    t->prefix_ids_.push_back(t->bos_id_);
  }
  if (config.add_eos) {
    if (t->eos_id_ < 0) {
      return FieldError(config_path, "add_eos_token is true but there is no eos_token");
    }
    t->suffix_ids_.push_back(t->eos_id_);
  }
  t->add_bos_ = config.add_bos;
  t->add_eos_ = config.add_eos;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Lookups.

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < is_special_.size() && is_special_[id];
}

absl::StatusOr<std::string> Tokenizer::IdToToken(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !has_token_[id]) {
    return absl::InvalidArgumentError(
        absl::StrCat("token id ", id, " is out of range [0, ", id_to_token_.size(), ")"));
  }
  return id_to_token_[id];
}

int32_t Tokenizer::TokenToId(std::string_view token) const {
  for (const AddedToken& a : added_tokens_) {
    if (a.content == token) return a.id;
  }
  auto it = token_to_id_.find(token);
  return it == token_to_id_.end() ? -1 : it->second;
}

// ---------------------------------------------------------------------------
// Encoding.

std::string Tokenizer::Normalize(std::string_view text) const {
  std::string cur(text);
  std::string next;
  for (const NormalizerStep& step : normalizer_) {
    if (step.is_prepend) {
      if (!cur.empty()) cur.insert(0, step.content);
    } else {
      ReplaceAll(cur, step.pattern, step.content, &next);
      cur.swap(next);
    }
  }
  return cur;
}

// Mirrors `tokenizers`' AddedVocabulary::find_matches: leftmost-longest
// non-overlapping matches, then single_word / lstrip / rstrip handling.
void Tokenizer::SplitOnAddedTokens(std::string_view text, const std::vector<int>& candidates,
                                   std::vector<std::pair<int32_t, std::string_view>>* out) const {
  if (candidates.empty() || text.empty()) {
    if (!text.empty()) out->emplace_back(-1, text);
    return;
  }
  // Leftmost-longest matches (like aho-corasick's LeftmostLongest).
  struct Match {
    size_t start, stop;
    int token;  // index into added_tokens_
  };
  std::vector<Match> matches;
  for (size_t i = 0; i < text.size();) {
    int best = -1;
    size_t best_len = 0;
    for (int c : candidates) {
      const std::string& content = normalized_added_content_[c];
      if (content.size() > best_len && content.size() <= text.size() - i &&
          text.compare(i, content.size(), content) == 0) {
        best = c;
        best_len = content.size();
      }
    }
    if (best >= 0) {
      matches.push_back({i, i + best_len, best});
      i += best_len;
    } else {
      ++i;
    }
  }
  size_t start_offset = 0;
  for (const Match& m : matches) {
    size_t start = m.start;
    size_t stop = m.stop;
    const AddedToken& a = added_tokens_[m.token];
    if (a.single_word) {
      const uint32_t before = LastChar(text.substr(0, start));
      const uint32_t after = FirstChar(text.substr(stop));
      const bool start_space = before == kNoChar || !IsWordChar(before);
      const bool stop_space = after == kNoChar || !IsWordChar(after);
      if (!start_space || !stop_space) continue;
    }
    if (a.lstrip) {
      size_t new_start = start;
      while (new_start > 0) {
        size_t p = new_start - 1;
        while (p > 0 && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) --p;
        const size_t n = CharLen(text, p);
        if (p + n != new_start || !IsWhitespace(CodePoint(text, p, n))) break;
        new_start = p;
      }
      start = std::max(new_start, start_offset);
    }
    if (a.rstrip) {
      while (stop < text.size()) {
        const size_t n = CharLen(text, stop);
        if (!IsWhitespace(CodePoint(text, stop, n))) break;
        stop += n;
      }
    }
    if (start_offset < start)
      out->emplace_back(-1, text.substr(start_offset, start - start_offset));
    out->emplace_back(a.id, text.substr(start, stop - start));
    start_offset = stop;
  }
  if (start_offset < text.size()) out->emplace_back(-1, text.substr(start_offset));
}

void Tokenizer::EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    auto it = token_to_id_.find(word);
    if (it != token_to_id_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  const auto add = [&](int32_t id) {
    const int32_t n = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, n - 1, n + 1, true});
  };
  // Pending (fused) unknown, as in `tokenizers`' BPE::merge_word.
  bool pending_unk = false;
  for (size_t i = 0; i < word.size();) {
    const size_t n = CharLen(word, i);
    const std::string_view ch = word.substr(i, n);
    i += n;
    auto it = token_to_id_.find(ch);
    if (it != token_to_id_.end()) {
      if (pending_unk) {
        add(unk_id_);
        pending_unk = false;
      }
      add(it->second);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char c : ch) all = all && byte_ids_[static_cast<unsigned char>(c)] >= 0;
      if (all) {
        for (char c : ch) add(byte_ids_[static_cast<unsigned char>(c)]);
        continue;
      }
    }
    if (unk_id_ >= 0) {
      if (pending_unk && !fuse_unk_) add(unk_id_);
      pending_unk = true;
    }
  }
  if (pending_unk) add(unk_id_);
  if (symbols.empty()) return;
  symbols.back().next = -1;

  // Merge by rank, leftmost first on ties, exactly as `tokenizers`'
  // Word::merge_all (including its staleness check on new_id).
  struct Merge {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
  };
  const auto later = [](const Merge& a, const Merge& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  std::vector<Merge> heap_storage;
  heap_storage.reserve(symbols.size());
  std::priority_queue<Merge, std::vector<Merge>, decltype(later)> queue(later,
                                                                        std::move(heap_storage));
  const auto lookup = [&](int32_t a, int32_t b) -> const MergeValue* {
    auto it = merges_.find(PairKey(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const MergeValue* m = lookup(symbols[i].id, symbols[i + 1].id)) {
      queue.push({m->rank, static_cast<int32_t>(i), m->new_id});
    }
  }
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& cur = symbols[top.pos];
    if (!cur.alive || cur.next < 0) continue;
    Symbol& right = symbols[cur.next];
    const MergeValue* m = lookup(cur.id, right.id);
    if (m == nullptr || m->new_id != top.new_id) continue;
    cur.id = top.new_id;
    right.alive = false;
    cur.next = right.next;
    if (cur.next >= 0) symbols[cur.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const MergeValue* pm = lookup(symbols[cur.prev].id, cur.id)) {
        queue.push({pm->rank, cur.prev, pm->new_id});
      }
    }
    if (cur.next >= 0) {
      if (const MergeValue* nm = lookup(cur.id, symbols[cur.next].id)) {
        queue.push({nm->rank, top.pos, nm->new_id});
      }
    }
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) out->push_back(symbols[i].id);
}

void Tokenizer::EncodePiece(std::string_view piece, std::vector<int32_t>* out) const {
  const std::string normalized = Normalize(piece);
  if (normalized_added_.empty()) {
    EncodeWord(normalized, out);
    return;
  }
  std::vector<std::pair<int32_t, std::string_view>> parts;
  SplitOnAddedTokens(normalized, normalized_added_, &parts);
  for (const auto& [id, part] : parts) {
    if (id >= 0) {
      out->push_back(id);
    } else {
      EncodeWord(part, out);
    }
  }
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special_tokens) ids.insert(ids.end(), prefix_ids_.begin(), prefix_ids_.end());
  std::vector<std::pair<int32_t, std::string_view>> parts;
  SplitOnAddedTokens(text, raw_added_, &parts);
  for (const auto& [id, part] : parts) {
    if (id >= 0) {
      ids.push_back(id);
    } else {
      EncodePiece(part, &ids);
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

// ---------------------------------------------------------------------------
// Decoding: a direct transcription of `tokenizers`' decode() with the
// Replace -> ByteFallback -> Fuse -> Strip decoder chain.

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const int32_t> ids,
                                              bool skip_special_tokens) const {
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !has_token_[id]) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " is out of range [0, ", id_to_token_.size(), ")"));
    }
  }
  // Tokens that survive skipping.
  std::vector<int32_t> kept;
  kept.reserve(ids.size());
  for (int32_t id : ids) {
    if (skip_special_tokens && is_special_[id]) continue;
    kept.push_back(id);
  }
  std::string fused;
  if (!has_decoder_) {
    for (size_t i = 0; i < kept.size(); ++i) {
      if (i > 0) fused += ' ';
      fused += id_to_token_[kept[i]];
    }
    return fused;
  }
  std::string bytes;
  const auto flush = [&]() {
    if (bytes.empty()) return;
    if (IsValidUtf8(bytes)) {
      fused += bytes;
    } else {
      for (size_t k = 0; k < bytes.size(); ++k) fused += kReplacementChar;
    }
    bytes.clear();
  };
  for (int32_t id : kept) {
    if (byte_value_[id] >= 0) {
      bytes.push_back(static_cast<char>(byte_value_[id]));
    } else {
      flush();
      fused += decoded_piece_[id];
    }
  }
  flush();
  // Strip up to strip_start_ leading strip characters.
  size_t cut = 0;
  for (int k = 0; k < strip_start_; ++k) {
    if (fused.compare(cut, strip_char_.size(), strip_char_) != 0) break;
    cut += strip_char_.size();
  }
  return fused.substr(cut);
}

// ---------------------------------------------------------------------------
// IncrementalDecoder.

IncrementalDecoder::IncrementalDecoder(const Tokenizer* tokenizer, std::vector<int32_t> prompt_ids,
                                       bool skip_special_tokens)
    : tokenizer_(tokenizer),
      skip_special_tokens_(skip_special_tokens),
      strip_left_(tokenizer->has_decoder_ ? tokenizer->strip_start_ : 1) {
  std::string discard;
  for (int32_t id : prompt_ids) {
    if (id < 0 || id >= tokenizer_->vocab_size() || !tokenizer_->has_token_[id]) {
      init_status_ = absl::InvalidArgumentError(absl::StrCat(
          "prompt token id ", id, " is out of range [0, ", tokenizer_->vocab_size(), ")"));
      return;
    }
    Consume(id, &discard);
  }
  // A byte run that ends the prompt and is already whole UTF-8 is prompt
  // text; only an incomplete one (a character the completion may finish) is
  // carried into the generated text.
  if (!pending_bytes_.empty() && IsValidUtf8(pending_bytes_)) FlushBytes(&discard);
}

void IncrementalDecoder::Emit(std::string_view piece, std::string* out) {
  if (!tokenizer_->has_decoder_) {
    // No decoder: tokens joined with single spaces (strip_left_ is 1 until the
    // first token).
    if (strip_left_ == 0) out->push_back(' ');
    strip_left_ = 0;
    out->append(piece);
    return;
  }
  const std::string& sc = tokenizer_->strip_char_;
  while (strip_left_ > 0 && !piece.empty()) {
    if (piece.substr(0, sc.size()) == sc) {
      piece.remove_prefix(sc.size());
      --strip_left_;
    } else {
      strip_left_ = 0;
    }
  }
  out->append(piece);
}

void IncrementalDecoder::FlushBytes(std::string* out) {
  if (pending_bytes_.empty()) return;
  if (IsValidUtf8(pending_bytes_)) {
    Emit(pending_bytes_, out);
  } else {
    std::string repl;
    for (size_t k = 0; k < pending_bytes_.size(); ++k) repl += kReplacementChar;
    Emit(repl, out);
  }
  pending_bytes_.clear();
}

void IncrementalDecoder::Consume(int32_t id, std::string* out) {
  if (skip_special_tokens_ && tokenizer_->is_special_[id]) return;
  if (!tokenizer_->has_decoder_) {
    Emit(tokenizer_->id_to_token_[id], out);
    return;
  }
  const int byte = tokenizer_->byte_value_[id];
  if (byte >= 0) {
    pending_bytes_.push_back(static_cast<char>(byte));
    return;
  }
  FlushBytes(out);
  Emit(tokenizer_->decoded_piece_[id], out);
}

absl::StatusOr<std::string> IncrementalDecoder::Push(int32_t id) {
  if (!init_status_.ok()) return init_status_;
  if (finished_) return absl::FailedPreconditionError("IncrementalDecoder: Push() after Finish()");
  if (id < 0 || id >= tokenizer_->vocab_size() || !tokenizer_->has_token_[id]) {
    return absl::InvalidArgumentError(
        absl::StrCat("token id ", id, " is out of range [0, ", tokenizer_->vocab_size(), ")"));
  }
  std::string out;
  Consume(id, &out);
  return out;
}

std::string IncrementalDecoder::Finish() {
  std::string out;
  if (finished_ || !init_status_.ok()) return out;
  finished_ = true;
  FlushBytes(&out);
  return out;
}

}  // namespace switchyard
