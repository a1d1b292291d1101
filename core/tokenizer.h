// Byte-fallback BPE tokenizer for Hugging Face `tokenizer.json` files of the
// Llama 2 / Mistral / Mixtral kind, reproducing the `tokenizers` library
// exactly (ids, token strings and decoded text).
//
// Supported pipeline (anything else is rejected at load time with
// Unimplemented naming the component):
//   * added tokens (`added_tokens`): split out of the raw text before
//     normalization (leftmost-longest match; lstrip/rstrip/single_word
//     honoured), exactly as `tokenizers` does. E.g. "a<s>b" encodes as
//     BOS, "▁a", <s>, "▁b" (each text piece is normalized separately, so the
//     piece after a literal special token also gets the "▁" prefix).
//   * normalizer: null, or Prepend / Replace(String pattern), alone or in a
//     Sequence.
//   * pre_tokenizer: null (the whole normalized piece is one BPE word).
//   * model: BPE with merges as "a b" strings or ["a","b"] pairs, byte_fallback,
//     unk_token, fuse_unk, ignore_merges; no dropout, no subword prefix/suffix.
//   * post_processor: TemplateProcessing (or null), overridden by
//     tokenizer_config.json's add_bos_token / add_eos_token when present.
//   * decoder: Sequence of Replace(String) -> ByteFallback -> Fuse ->
//     Strip(start=n, stop=0) (each step optional, in that order), or null.
//
// Decoding follows `tokenizers`: special tokens are dropped first (when
// skipping), "▁" becomes " ", each maximal run of <0xNN> byte tokens becomes its
// bytes if they form valid UTF-8 and otherwise one U+FFFD per byte, and up to
// `start` leading spaces of the whole text are stripped.
//
// Encoding input that is not valid UTF-8: each invalid byte is treated as a
// one-byte character (and so becomes a <0xNN> byte token).
//
// Thread-safety: a Tokenizer is immutable after loading; all const methods may
// be called concurrently. An IncrementalDecoder is not thread-safe: use one per
// stream.
#ifndef SWITCHYARD_CORE_TOKENIZER_H_
#define SWITCHYARD_CORE_TOKENIZER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace switchyard {

class Tokenizer {
 public:
  // Loads `tokenizer_json` and, when the path is non-empty and the file exists,
  // `tokenizer_config_json` (add_bos_token, add_eos_token, bos_token,
  // eos_token). NotFound if tokenizer.json cannot be read; InvalidArgument
  // (naming the file and field) if either file is malformed; Unimplemented for
  // an unsupported pipeline component.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFiles(
      const std::string& tokenizer_json, const std::string& tokenizer_config_json);
  // Loads dir/tokenizer.json and (optional) dir/tokenizer_config.json.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromDir(const std::string& dir);

  // Encodes `text`. With add_special_tokens, prepends BOS / appends EOS as the
  // post-processor and tokenizer_config.json say. Never fails.
  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens = true) const;

  // Decodes `ids` like `tokenizers`' decode(). InvalidArgument naming the id if
  // one is out of range. skip_special_tokens drops special added tokens
  // (<s>, </s>, <unk>, ...).
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids,
                                     bool skip_special_tokens = true) const;

  // One past the largest token id (model vocab plus added tokens).
  int vocab_size() const { return static_cast<int>(id_to_token_.size()); }
  // -1 when the tokenizer has no such token.
  int bos_id() const { return bos_id_; }
  int eos_id() const { return eos_id_; }
  int unk_id() const { return unk_id_; }
  // Whether Encode(..., add_special_tokens=true) prepends BOS / appends EOS.
  bool add_bos() const { return add_bos_; }
  bool add_eos() const { return add_eos_; }
  // Whether `id` is a special added token (skipped by skip_special_tokens).
  bool IsSpecial(int32_t id) const;
  // The token string for `id` (e.g. "▁Hello", "<0x0A>", "<s>"), for debugging
  // and logprobs. InvalidArgument if out of range.
  absl::StatusOr<std::string> IdToToken(int32_t id) const;
  // The id of a token string, or -1.
  int32_t TokenToId(std::string_view token) const;

 private:
  friend class IncrementalDecoder;

  struct AddedToken {
    std::string content;
    int32_t id = -1;
    bool single_word = false;
    bool lstrip = false;
    bool rstrip = false;
    bool normalized = false;
    bool special = false;
  };
  struct NormalizerStep {
    bool is_prepend = false;  // else Replace
    std::string pattern;      // Replace only
    std::string content;      // text prepended / replacement
  };
  struct MergeValue {
    int32_t rank;
    int32_t new_id;
  };
  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>()(s); }
  };
  using StringMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

  // Build's loading stages, one per part of tokenizer.json (defined in tokenizer.cc).
  class Loader;

  Tokenizer() = default;
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Build(std::string_view tokenizer_json,
                                                          const std::string& tokenizer_path,
                                                          std::string_view config_json,
                                                          const std::string& config_path);

  std::string Normalize(std::string_view text) const;
  // Splits `text` on the given added tokens; appends (id or -1, piece) pairs.
  void SplitOnAddedTokens(std::string_view text, const std::vector<int>& candidates,
                          std::vector<std::pair<int32_t, std::string_view>>* out) const;
  // BPE over one normalized piece; appends ids to `out`.
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const;
  void EncodePiece(std::string_view piece, std::vector<int32_t>* out) const;

  // Model.
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_token_;  // false for ids that are holes
  StringMap token_to_id_;        // model vocab
  std::unordered_map<uint64_t, MergeValue> merges_;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  int32_t unk_id_ = -1;
  int32_t byte_ids_[256];  // id of <0xNN>, or -1

  // Added tokens.
  std::vector<AddedToken> added_tokens_;
  std::vector<int> raw_added_;                         // indices of non-normalized added tokens
  std::vector<int> normalized_added_;                  // indices of normalized added tokens
  std::vector<std::string> normalized_added_content_;  // parallel to added_tokens_
  std::vector<bool> is_special_;                       // by id

  // Normalizer.
  std::vector<NormalizerStep> normalizer_;

  // Post-processor.
  std::vector<int32_t> prefix_ids_;
  std::vector<int32_t> suffix_ids_;
  bool add_bos_ = false;
  bool add_eos_ = false;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;

  // Decoder: per id, the text after Replace, and the byte value (or -1) if
  // ByteFallback treats the token as a byte.
  bool has_decoder_ = false;
  std::vector<std::string> decoded_piece_;
  std::vector<int16_t> byte_value_;
  std::string strip_char_ = " ";  // one UTF-8 character
  int strip_start_ = 0;
};

// Streaming detokenizer for one sequence. Feed generated ids one at a time;
// each Push() returns only newly completed text, always valid UTF-8. The
// concatenation of all Push() outputs plus Finish() equals
// Decode(prompt_ids + generated ids) minus the text of the prompt (the
// leading-space strip is applied once, to the start of the whole sequence, so
// the first generated word keeps its space after a non-empty prompt, and loses
// it when the prompt decodes to nothing, e.g. only BOS).
//
// Because `tokenizers` turns a whole run of <0xNN> byte tokens into U+FFFD if
// any part of it is invalid UTF-8, text from a run of byte tokens is held back
// until the run ends (a non-byte token arrives, or Finish()). If the prompt ends
// inside such a run, those pending prompt bytes are emitted with the generated
// text when the run ends.
//
// Not thread-safe. `tokenizer` must be non-null and outlive the decoder.
class IncrementalDecoder {
 public:
  // Ids in `prompt_ids` that are out of range make every Push() fail with
  // InvalidArgument.
  IncrementalDecoder(const Tokenizer* tokenizer, std::vector<int32_t> prompt_ids = {},
                     bool skip_special_tokens = true);

  // Consumes one generated id; returns the new complete text (maybe empty).
  // InvalidArgument (state unchanged) if the id is out of range;
  // FailedPrecondition after Finish().
  absl::StatusOr<std::string> Push(int32_t id);
  // Ends the stream and returns whatever is left (an incomplete or invalid
  // byte run becomes one U+FFFD per byte, as Decode does).
  std::string Finish();

 private:
  // Appends decoded text (after the strip rule) to `out`.
  void Emit(std::string_view piece, std::string* out);
  // Flushes the pending byte run into `out`.
  void FlushBytes(std::string* out);
  void Consume(int32_t id, std::string* out);

  const Tokenizer* tokenizer_;
  bool skip_special_tokens_;
  absl::Status init_status_;
  bool finished_ = false;
  int strip_left_;             // leading strip characters still to strip
  std::string pending_bytes_;  // current run of byte-token bytes
};

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_TOKENIZER_H_
