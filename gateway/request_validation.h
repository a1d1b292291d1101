// Turning a public GenerateRequest into a validated GenerationRequest.
// Every check happens before any work, and a bad request gets
// INVALID_ARGUMENT with a message that names the field.
//
// Thread-safety: pure function over its arguments.
#ifndef SWITCHYARD_GATEWAY_REQUEST_VALIDATION_H_
#define SWITCHYARD_GATEWAY_REQUEST_VALIDATION_H_

#include "absl/status/statusor.h"
#include "core/chat_template.h"
#include "core/model_config.h"
#include "core/tokenizer.h"
#include "gateway/scheduler.h"
#include "switchyard/v1/generation.pb.h"

namespace switchyard {

struct RequestLimits {
  int default_max_new_tokens = 16;  // when stopping.max_new_tokens is unset
  // Largest max_new_tokens accepted. Default 0: the model's context - 1 (the
  // most a one-token prompt can use); larger values are capped to that.
  int max_new_tokens_limit = 0;
  int max_prompt_bytes = 1 << 20;  // longest text prompt (and conversation, rendered or not)
  int max_messages = 10000;        // most turns in a `messages` prompt
  int max_stop_strings = 16;
  int max_stop_string_bytes = 256;
  int max_stop_token_ids = 1024;
  int max_request_id_bytes = 256;  // printable ASCII only
  int max_top_logprobs = 20;
  // GenerateStream messages kept for a client that does not read: beyond
  // either bound the request is cancelled and the stream ends with
  // RESOURCE_EXHAUSTED.
  int max_stream_queued_messages = 1024;
  int64_t max_stream_queued_bytes = 4 << 20;
};

// The max_new_tokens limit in force for `config`: limits.max_new_tokens_limit
// capped to context - 1, or context - 1 when it is 0.
int EffectiveMaxNewTokensLimit(const RequestLimits& limits, const ModelConfig& config);

// The largest serialized GenerateRequest (or Tokenize/Detokenize request)
// these limits allow for `config`: what the server's max receive message size
// is set to, so nothing larger is ever read into memory.
int64_t MaxLegalRequestBytes(const RequestLimits& limits, const ModelConfig& config);

// `chat_template` renders `messages` prompts; nullptr (default): such
// requests get FAILED_PRECONDITION.
absl::StatusOr<GenerationRequest> ValidateGenerateRequest(
    const v1::GenerateRequest& request, const Tokenizer& tokenizer, const ModelConfig& config,
    const RequestLimits& limits, const ChatTemplate* chat_template = nullptr);

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_REQUEST_VALIDATION_H_
