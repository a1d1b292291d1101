// The OpenAI-compatible HTTP API's JSON: request bodies of /v1/completions
// and /v1/chat/completions mapped onto the gRPC GenerateRequest (which then
// goes through the same ValidateGenerateRequest as gRPC), responses and
// server-sent-event chunks built from the scheduler's events, and errors in
// OpenAI's shape {"error": {"message", "type", "param", "code"}}.
//
// Kept apart from the HTTP server (gateway/openai_http.h) so the mapping is
// testable without sockets.
//
// Thread-safety: pure functions over their arguments.
#ifndef SWITCHYARD_GATEWAY_OPENAI_API_H_
#define SWITCHYARD_GATEWAY_OPENAI_API_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gateway/generate.h"
#include "switchyard/v1/generation.pb.h"

namespace switchyard::openai {

enum class Endpoint {
  kCompletions,      // POST /v1/completions: `prompt`
  kChatCompletions,  // POST /v1/chat/completions: `messages`
};

// A request body as the gateway understands it.
struct ParsedRequest {
  // Prompt (text, token ids or messages), sampling, stopping. OpenAI's
  // defaults where they differ from the proto's: temperature 1 when absent.
  v1::GenerateRequest request;
  std::string model;           // the `model` the client named (required)
  bool stream = false;         // `stream`: answer with server-sent events
  bool include_usage = false;  // `stream_options.include_usage`: a last chunk with usage
  // Chat requests without max_tokens / max_completion_tokens: OpenAI's
  // default is "as many as fit", which the caller sets once the prompt's
  // length is known (request.stopping.max_new_tokens is then unset).
  bool max_tokens_defaulted = false;
};

// Parses and checks a request body. INVALID_ARGUMENT "FIELD: why" (OpenAI's
// field names) for malformed JSON, wrong types, unknown or unsupported
// parameters (n > 1, best_of, echo, suffix, logit_bias, tools, ...).
// `logprobs` (completions: an integer, the alternatives per token; chat: a
// boolean, with `top_logprobs`) sets return_logprobs and top_logprobs.
absl::StatusOr<ParsedRequest> ParseRequest(Endpoint endpoint, std::string_view body);

// An error as OpenAI's API answers it.
struct Error {
  int http_status = 500;
  std::string type;     // "invalid_request_error", "authentication_error", ...
  std::string message;  // what is wrong, naming the field with OpenAI's name
  std::string param;    // the field, or "" (JSON null)
  std::string code;     // a short code, or "" (JSON null)
};

// The HTTP answer to a failed request: INVALID_ARGUMENT and
// FAILED_PRECONDITION 400 (the proto field names of ValidateGenerateRequest's
// messages rewritten to OpenAI's: stopping.max_new_tokens is max_tokens,
// sampling.top_p is top_p, text and token_ids are prompt, ...),
// UNAUTHENTICATED 401, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE
// 503, anything else 500.
Error ErrorFromStatus(const absl::Status& status, Endpoint endpoint);

// {"error": {...}}.
std::string ErrorJson(const Error& error);

// GET /v1/models: one model, `id`, owned by "switchyard".
std::string ModelsJson(const std::string& id, int64_t created);

// OpenAI's finish_reason: "length" for kLength, "stop" for EOS and stop
// sequences (and for cancellation, which no client sees).
const char* OpenAiFinishReason(FinishReason reason);

// What identifies one response and repeats in each of its chunks.
struct ResponseHeader {
  std::string id;  // "cmpl-..." or "chatcmpl-..."
  std::string model;
  int64_t created = 0;  // Unix seconds
};

// A new response id: `prefix` and 24 random hex digits.
std::string NewResponseId(std::string_view prefix);

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
};

// One generated token's log-probability (`logprobs` requested), with its
// most likely alternatives; tokens as text (their bytes, which may be part
// of a UTF-8 character).
struct TokenLogprob {
  std::string token;
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;
};

// The whole (non-streaming) answer. `logprobs` nullptr: JSON null (not
// requested). Completions use the legacy shape {tokens, token_logprobs,
// top_logprobs, text_offset}, chat {content: [{token, logprob, bytes,
// top_logprobs}]}.
std::string CompletionJson(Endpoint endpoint, const ResponseHeader& header, const std::string& text,
                           FinishReason reason, const Usage& usage,
                           const std::vector<TokenLogprob>* logprobs = nullptr);

// One streamed chunk's JSON (without the SSE framing). `finish_reason`
// nullptr: JSON null (not the last chunk). For chat, `first` adds the
// assistant role to the delta.
std::string ChunkJson(Endpoint endpoint, const ResponseHeader& header, const std::string& text,
                      const char* finish_reason, bool first,
                      const std::vector<TokenLogprob>* logprobs = nullptr);

// stream_options.include_usage's last chunk: no choices, the usage.
std::string UsageChunkJson(Endpoint endpoint, const ResponseHeader& header, const Usage& usage);

// Server-sent-event framing: "data: JSON\n\n".
std::string SseEvent(const std::string& json);
inline constexpr char kSseDone[] = "data: [DONE]\n\n";

}  // namespace switchyard::openai

#endif  // SWITCHYARD_GATEWAY_OPENAI_API_H_
