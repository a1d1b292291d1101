// libFuzzer target for the tokenizer (core/tokenizer.h), on the real Mistral
// tokenizer in tests/data/mistral-tokenizer. Each input is used twice:
//   * as text: Encode (with and without special tokens) must give ids inside
//     the vocabulary, and decoding them must succeed with valid UTF-8;
//   * as a sequence of token ids (2 input bytes per id, biased towards byte
//     tokens, special tokens and ids just outside the vocabulary): Decode must
//     fail with InvalidArgument exactly when an id is out of range and
//     otherwise return valid UTF-8, and an IncrementalDecoder fed the same ids
//     must return only valid UTF-8 and the text Decode gives (the contract in
//     tokenizer.h).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/tokenizer.h"
#include "core/utf8.h"
#include "fuzz/fuzz_check.h"

namespace {

using switchyard::IncrementalDecoder;
using switchyard::IsValidUtf8;
using switchyard::Tokenizer;

struct Env {
  std::unique_ptr<Tokenizer> tokenizer;
  int32_t byte_ids[256];  // id of <0xNN>, or -1
};

const Env& GetEnv() {
  static const Env* env = [] {
    auto* e = new Env;
    absl::StatusOr<std::unique_ptr<Tokenizer>> t =
        Tokenizer::FromDir(SWITCHYARD_FUZZ_TOKENIZER_DIR);
    if (!t.ok()) {
      std::fprintf(stderr, "cannot load %s: %s\n", SWITCHYARD_FUZZ_TOKENIZER_DIR,
                   t.status().ToString().c_str());
      std::abort();
    }
    e->tokenizer = *std::move(t);
    for (int b = 0; b < 256; ++b) {
      e->byte_ids[b] = e->tokenizer->TokenToId(absl::StrFormat("<0x%02X>", b));
    }
    return e;
  }();
  return *env;
}

// Debian's absl::string_view is not std::string_view.
std::string Escaped(std::string_view s) {
  return absl::CHexEscape(absl::string_view(s.data(), s.size()));
}

std::string IdsString(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) absl::StrAppend(&s, s.empty() ? "" : ",", id);
  return "[" + s + "]";
}

bool InVocab(const Tokenizer& t, int32_t id) {
  return id >= 0 && id < t.vocab_size() && t.IdToToken(id).ok();
}

// Whether `id` is a <0xNN> byte-fallback token (decoded as one raw byte).
bool IsByteToken(const Tokenizer& t, int32_t id) {
  absl::StatusOr<std::string> tok = t.IdToToken(id);
  return tok.ok() && tok->size() == 6 && tok->compare(0, 3, "<0x") == 0 && (*tok)[5] == '>';
}

void CheckEncode(const Tokenizer& t, std::string_view text, bool add_special_tokens) {
  const std::vector<int32_t> ids = t.Encode(text, add_special_tokens);
  for (int32_t id : ids) {
    FUZZ_CHECK(InVocab(t, id), "Encode(\"%s\") gave id %d outside [0, %d)", Escaped(text).c_str(),
               id, t.vocab_size());
  }
  if (!text.empty()) {
    FUZZ_CHECK(!ids.empty(), "Encode(\"%s\") gave no tokens", Escaped(text).c_str());
  }
  if (add_special_tokens && t.add_bos()) {
    FUZZ_CHECK(!ids.empty() && ids[0] == t.bos_id(), "Encode(\"%s\") does not start with BOS",
               Escaped(text).c_str());
  }
  for (bool skip : {true, false}) {
    absl::StatusOr<std::string> decoded = t.Decode(ids, skip);
    FUZZ_CHECK(decoded.ok(), "Decode(Encode(\"%s\")) failed: %s", Escaped(text).c_str(),
               decoded.status().ToString().c_str());
    FUZZ_CHECK(IsValidUtf8(*decoded), "Decode(Encode(\"%s\")) is not UTF-8: \"%s\"",
               Escaped(text).c_str(), Escaped(*decoded).c_str());
  }
}

// 2 bytes per id. The top 2 bits of the first byte pick the kind of id, so
// the fuzzer reaches byte-token runs (partial and invalid UTF-8), special
// tokens and out-of-range ids without having to guess 15-bit numbers.
std::vector<int32_t> IdsFromBytes(const Env& env, const uint8_t* data, size_t size) {
  const int32_t V = env.tokenizer->vocab_size();
  std::vector<int32_t> ids;
  for (size_t i = 0; i + 1 < size; i += 2) {
    const uint8_t a = data[i], b = data[i + 1];
    int32_t id;
    switch (a >> 6) {
      case 0:  // a byte-fallback token
        id = env.byte_ids[b] >= 0 ? env.byte_ids[b] : b;
        break;
      case 1:  // small and slightly negative: <unk>, <s>, </s>, -1, ...
        id = static_cast<int32_t>(b % 16) - 4;
        break;
      default:  // anywhere in the vocabulary, or just past its end
        id = static_cast<int32_t>(((a & 0x7f) << 8 | b) % (V + 4));
        break;
    }
    ids.push_back(id);
  }
  return ids;
}

void CheckDecodeIds(const Env& env, const std::vector<int32_t>& ids, bool skip) {
  const Tokenizer& t = *env.tokenizer;
  bool all_valid = true;
  for (int32_t id : ids) all_valid = all_valid && InVocab(t, id);
  absl::StatusOr<std::string> decoded = t.Decode(ids, skip);
  if (all_valid) {
    FUZZ_CHECK(decoded.ok(), "Decode(%s) failed: %s", IdsString(ids).c_str(),
               decoded.status().ToString().c_str());
    FUZZ_CHECK(IsValidUtf8(*decoded), "Decode(%s) is not UTF-8: \"%s\"", IdsString(ids).c_str(),
               Escaped(*decoded).c_str());
  } else {
    FUZZ_CHECK(decoded.status().code() == absl::StatusCode::kInvalidArgument,
               "Decode(%s) with an out-of-range id: %s", IdsString(ids).c_str(),
               decoded.status().ToString().c_str());
  }
}

// The first `prompt_len` ids are the prompt, the rest are pushed one by one.
void CheckIncremental(const Env& env, const std::vector<int32_t>& ids, size_t prompt_len,
                      bool skip) {
  const Tokenizer& t = *env.tokenizer;
  prompt_len = std::min(prompt_len, ids.size());
  const std::vector<int32_t> prompt(ids.begin(), ids.begin() + prompt_len);
  bool prompt_valid = true;
  for (int32_t id : prompt) prompt_valid = prompt_valid && InVocab(t, id);

  IncrementalDecoder dec(&t, prompt, skip);
  std::string streamed;
  std::vector<int32_t> accepted = prompt;  // prompt + every id Push() took
  for (size_t i = prompt_len; i < ids.size(); ++i) {
    absl::StatusOr<std::string> piece = dec.Push(ids[i]);
    if (!prompt_valid || !InVocab(t, ids[i])) {
      FUZZ_CHECK(piece.status().code() == absl::StatusCode::kInvalidArgument,
                 "Push(%d) (prompt %s): %s", ids[i], IdsString(prompt).c_str(),
                 piece.status().ToString().c_str());
      continue;
    }
    FUZZ_CHECK(piece.ok(), "Push(%d) failed: %s", ids[i], piece.status().ToString().c_str());
    FUZZ_CHECK(IsValidUtf8(*piece), "Push(%d) returned invalid UTF-8 \"%s\" (ids %s)", ids[i],
               Escaped(*piece).c_str(), IdsString(ids).c_str());
    streamed += *piece;
    accepted.push_back(ids[i]);
  }
  const std::string rest = dec.Finish();
  FUZZ_CHECK(IsValidUtf8(rest), "Finish() returned invalid UTF-8 \"%s\" (ids %s)",
             Escaped(rest).c_str(), IdsString(ids).c_str());
  streamed += rest;
  FUZZ_CHECK(!dec.Push(t.bos_id() >= 0 ? t.bos_id() : 0).ok(), "Push() after Finish() succeeded");
  if (!prompt_valid) return;

  // The stream equals Decode(prompt + generated) minus the prompt's text. The
  // prompt's text is Decode(prompt) unless the prompt ends inside a run of
  // byte tokens (then the run's bytes come out with the generated text, and
  // Decode(prompt) would have rendered the incomplete run as U+FFFD).
  const std::vector<int32_t> generated(accepted.begin() + prompt_len, accepted.end());
  bool prompt_ends_in_bytes = false;
  for (size_t i = prompt.size(); i-- > 0;) {
    if (skip && t.IsSpecial(prompt[i])) continue;
    prompt_ends_in_bytes = IsByteToken(t, prompt[i]);
    break;
  }
  if (prompt_ends_in_bytes) return;
  absl::StatusOr<std::string> whole = t.Decode(accepted, skip);
  absl::StatusOr<std::string> prompt_text = t.Decode(prompt, skip);
  FUZZ_CHECK(whole.ok() && prompt_text.ok(), "Decode failed on valid ids");
  FUZZ_CHECK(*prompt_text + streamed == *whole,
             "stream \"%s\" after prompt %s (\"%s\") != Decode(prompt + %s) = \"%s\" (skip=%d)",
             Escaped(streamed).c_str(), IdsString(prompt).c_str(), Escaped(*prompt_text).c_str(),
             IdsString(generated).c_str(), Escaped(*whole).c_str(), skip);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Env& env = GetEnv();
  const Tokenizer& t = *env.tokenizer;

  const std::string_view text(reinterpret_cast<const char*>(data), size);
  CheckEncode(t, text, /*add_special_tokens=*/true);
  CheckEncode(t, text, /*add_special_tokens=*/false);

  if (size == 0) return 0;
  // First byte: flags; the rest: ids.
  const bool skip = data[0] & 1;
  const size_t prompt_len = (data[0] >> 1) & 7;
  const std::vector<int32_t> ids = IdsFromBytes(env, data + 1, size - 1);
  CheckDecodeIds(env, ids, skip);
  CheckIncremental(env, ids, 0, skip);
  if (prompt_len > 0) CheckIncremental(env, ids, prompt_len, skip);
  return 0;
}
