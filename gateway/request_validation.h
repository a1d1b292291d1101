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
  int max_new_tokens_limit = 4096;  // largest max_new_tokens accepted
  int max_prompt_bytes = 1 << 20;   // longest text prompt (and conversation, rendered or not)
  int max_messages = 10000;         // most turns in a `messages` prompt
  int max_stop_strings = 16;
  int max_stop_string_bytes = 256;
  int max_top_logprobs = 20;
};

// `chat_template` renders `messages` prompts; nullptr (default): such
// requests get FAILED_PRECONDITION.
absl::StatusOr<GenerationRequest> ValidateGenerateRequest(
    const v1::GenerateRequest& request, const Tokenizer& tokenizer, const ModelConfig& config,
    const RequestLimits& limits, const ChatTemplate* chat_template = nullptr);

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_REQUEST_VALIDATION_H_
