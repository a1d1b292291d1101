#include "gateway/request_validation.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/utf8.h"
#include "nlohmann/json.hpp"

namespace switchyard {
namespace {

absl::Status Invalid(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", why));
}

bool IsPrintableAscii(const std::string& s) {
  for (unsigned char c : s) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

// Renders a `messages` prompt with the chat template and tokenizes it
// without special tokens, as apply_chat_template(tokenize=True) does.
absl::StatusOr<std::vector<int32_t>> EncodeMessages(const v1::GenerateRequest& request,
                                                    const Tokenizer& tokenizer,
                                                    const RequestLimits& limits,
                                                    const ChatTemplate* chat_template) {
  if (chat_template == nullptr) {
    return absl::FailedPreconditionError(
        "messages: this gateway has no chat template (the model's tokenizer_config.json has no "
        "chat_template; start switchyard-gateway with --chat-template FILE), so send text or "
        "token_ids");
  }
  if (request.messages_size() > limits.max_messages) {
    return Invalid("messages",
                   absl::StrCat(request.messages_size(), " messages, more than the limit of ",
                                limits.max_messages));
  }
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  int64_t bytes = 0;
  for (int i = 0; i < request.messages_size(); ++i) {
    const v1::ChatMessage& m = request.messages(i);
    const std::string field = absl::StrCat("messages[", i, "]");
    if (!IsValidUtf8(m.role())) return Invalid(field + ".role", "not valid UTF-8");
    if (!IsValidUtf8(m.content())) return Invalid(field + ".content", "not valid UTF-8");
    bytes += static_cast<int64_t>(m.role().size() + m.content().size());
    messages.push_back({{"role", m.role()}, {"content", m.content()}});
  }
  if (bytes > limits.max_prompt_bytes) {
    return Invalid("messages",
                   absl::StrCat("the conversation is ", bytes, " bytes, more than the limit of ",
                                limits.max_prompt_bytes));
  }
  absl::StatusOr<std::string> text = chat_template->RenderChat(messages, true);
  if (!text.ok()) {
    // The template's own message (raise_exception's text) reaches the caller
    // unchanged; a template that hits its limits is the request's fault too.
    return absl::InvalidArgumentError(
        text.status().code() == absl::StatusCode::kInvalidArgument
            ? std::string(text.status().message())
            : absl::StrCat("messages: chat template: ", text.status().message()));
  }
  if (static_cast<int64_t>(text->size()) > limits.max_prompt_bytes) {
    return Invalid("messages",
                   absl::StrCat("the rendered prompt is ", text->size(),
                                " bytes, more than the limit of ", limits.max_prompt_bytes));
  }
  std::vector<int32_t> ids = tokenizer.Encode(*text, /*add_special_tokens=*/false);
  if (ids.empty()) return Invalid("messages", "the chat template rendered an empty prompt");
  return ids;
}

}  // namespace

int EffectiveMaxNewTokensLimit(const RequestLimits& limits, const ModelConfig& config) {
  const int most = std::max(1, config.max_position_embeddings - 1);
  return limits.max_new_tokens_limit > 0 ? std::min(limits.max_new_tokens_limit, most) : most;
}

int64_t MaxLegalRequestBytes(const RequestLimits& limits, const ModelConfig& config) {
  // Protobuf's worst cases: a varint int32 takes up to 10 bytes (negative
  // values, refused later but legal on the wire), a string its bytes plus a
  // tag and a length of at most 6 bytes.
  constexpr int64_t kVarint = 10, kFieldOverhead = 6;
  // A `messages` prompt: its text plus a header for each message and for its
  // role and content.
  const int64_t conversation =
      limits.max_prompt_bytes + int64_t{limits.max_messages} * 3 * kFieldOverhead;
  const int64_t prompt =
      std::max<int64_t>(conversation, int64_t{config.max_position_embeddings} * kVarint);
  const int64_t stops =
      int64_t{limits.max_stop_strings} * (limits.max_stop_string_bytes + kFieldOverhead);
  const int64_t stop_ids = int64_t{limits.max_stop_token_ids} * kVarint;
  // Sampling parameters, flags and nested-message headers: well under 4 KiB.
  constexpr int64_t kScalars = 4096;
  return prompt + kFieldOverhead + stops + stop_ids + limits.max_request_id_bytes + kFieldOverhead +
         kScalars;
}

absl::StatusOr<GenerationRequest> ValidateGenerateRequest(const v1::GenerateRequest& request,
                                                          const Tokenizer& tokenizer,
                                                          const ModelConfig& config,
                                                          const RequestLimits& limits,
                                                          const ChatTemplate* chat_template) {
  GenerationRequest out;
  // request_id is echoed in every stream message and in logs: bound it.
  if (static_cast<int64_t>(request.request_id().size()) > limits.max_request_id_bytes) {
    return Invalid("request_id", absl::StrCat(request.request_id().size(), " bytes, at most ",
                                              limits.max_request_id_bytes, " allowed"));
  }
  if (!IsPrintableAscii(request.request_id())) {
    return Invalid("request_id", "must be printable ASCII (0x20 to 0x7e)");
  }
  out.request_id = request.request_id();
  const int V = config.vocab_size;

  if (request.messages_size() > 0 && request.prompt_case() != v1::GenerateRequest::PROMPT_NOT_SET) {
    return Invalid("messages", "set only one of text, token_ids and messages");
  }
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText:
      if (request.text().empty()) return Invalid("text", "prompt is empty");
      if (static_cast<int>(request.text().size()) > limits.max_prompt_bytes) {
        return Invalid("text",
                       absl::StrCat("prompt is ", request.text().size(),
                                    " bytes, more than the limit of ", limits.max_prompt_bytes));
      }
      if (!IsValidUtf8(request.text())) return Invalid("text", "prompt is not valid UTF-8");
      out.prompt_ids = tokenizer.Encode(request.text());
      break;
    case v1::GenerateRequest::kTokenIds:
      if (request.token_ids().ids().empty()) return Invalid("token_ids", "prompt is empty");
      for (int i = 0; i < request.token_ids().ids_size(); ++i) {
        const int32_t id = request.token_ids().ids(i);
        if (id < 0 || id >= V) {
          return Invalid(absl::StrCat("token_ids.ids[", i, "]"),
                         absl::StrCat("token id ", id, " is outside the vocabulary [0, ", V, ")"));
        }
      }
      out.prompt_ids.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
      break;
    default:
      if (request.messages_size() == 0) {
        return Invalid("prompt", "set one of text, token_ids and messages");
      }
      SY_ASSIGN_OR_RETURN(out.prompt_ids,
                          EncodeMessages(request, tokenizer, limits, chat_template));
  }
  if (out.prompt_ids.empty()) return Invalid("text", "prompt encodes to no tokens");

  const v1::StoppingCriteria& stopping = request.stopping();
  int max_new = limits.default_max_new_tokens;
  if (stopping.has_max_new_tokens()) {
    if (stopping.max_new_tokens() == 0) {
      return Invalid("stopping.max_new_tokens", "must be at least 1");
    }
    const int limit = EffectiveMaxNewTokensLimit(limits, config);
    if (stopping.max_new_tokens() > static_cast<uint32_t>(limit)) {
      return Invalid("stopping.max_new_tokens",
                     absl::StrCat(stopping.max_new_tokens(), " is above the limit of ", limit));
    }
    max_new = static_cast<int>(stopping.max_new_tokens());
  }
  const int64_t total = static_cast<int64_t>(out.prompt_ids.size()) + max_new;
  if (total > config.max_position_embeddings) {
    return Invalid(
        "stopping.max_new_tokens",
        absl::StrCat("prompt (", out.prompt_ids.size(), " tokens) plus max_new_tokens (", max_new,
                     ") exceeds the context of ", config.max_position_embeddings, " tokens"));
  }
  out.options.max_new_tokens = max_new;
  out.options.ignore_eos = stopping.ignore_eos();
  if (stopping.stop_size() > limits.max_stop_strings) {
    return Invalid("stopping.stop", absl::StrCat(stopping.stop_size(), " stop strings, at most ",
                                                 limits.max_stop_strings, " allowed"));
  }
  for (int i = 0; i < stopping.stop_size(); ++i) {
    const std::string& s = stopping.stop(i);
    const std::string field = absl::StrCat("stopping.stop[", i, "]");
    if (s.empty()) return Invalid(field, "stop string is empty");
    if (static_cast<int>(s.size()) > limits.max_stop_string_bytes) {
      return Invalid(field, absl::StrCat("stop string is ", s.size(), " bytes, at most ",
                                         limits.max_stop_string_bytes, " allowed"));
    }
    if (!IsValidUtf8(s)) return Invalid(field, "stop string is not valid UTF-8");
    out.stop.push_back(s);
  }
  if (stopping.stop_token_ids_size() > limits.max_stop_token_ids) {
    return Invalid("stopping.stop_token_ids",
                   absl::StrCat(stopping.stop_token_ids_size(), " stop token ids, at most ",
                                limits.max_stop_token_ids, " allowed"));
  }
  for (int i = 0; i < stopping.stop_token_ids_size(); ++i) {
    const int32_t id = stopping.stop_token_ids(i);
    if (id < 0 || id >= V) {
      return Invalid(absl::StrCat("stopping.stop_token_ids[", i, "]"),
                     absl::StrCat("token id ", id, " is outside the vocabulary [0, ", V, ")"));
    }
    out.options.stop_token_ids.push_back(id);
  }

  const v1::SamplingParameters& s = request.sampling();
  SamplingParams& p = out.options.sampling;
  p.temperature = s.temperature();
  p.top_p = s.has_top_p() ? s.top_p() : 1.0f;
  p.top_k = s.top_k();
  p.min_p = s.min_p();
  p.repetition_penalty = s.has_repetition_penalty() ? s.repetition_penalty() : 1.0f;
  p.presence_penalty = s.presence_penalty();
  p.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) p.seed = s.seed();
  if (absl::Status st = ValidateSamplingParams(p); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.", st.message()));
  }
  if (p.repetition_penalty > 10.0f) {
    return Invalid("sampling.repetition_penalty", "must be at most 10");
  }

  out.return_logprobs = request.return_logprobs();
  if (request.top_logprobs() > static_cast<uint32_t>(limits.max_top_logprobs)) {
    return Invalid("top_logprobs", absl::StrCat(request.top_logprobs(), " is above the limit of ",
                                                limits.max_top_logprobs));
  }
  out.top_logprobs = static_cast<int>(request.top_logprobs());
  if (out.top_logprobs > 0 && !out.return_logprobs) {
    return Invalid("top_logprobs", "needs return_logprobs");
  }
  return out;
}

}  // namespace switchyard
