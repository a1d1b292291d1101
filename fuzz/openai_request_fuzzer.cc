// libFuzzer target for the OpenAI-compatible API's request mapping
// (gateway/openai_api.h): the first byte picks the endpoint (even:
// /v1/completions, odd: /v1/chat/completions), the rest is the request body.
// It goes the way openai_http.cc takes it: ParseRequest, then the mapped
// GenerateRequest through ValidateGenerateRequest (tiny-mixtral tokenizer and
// config, Mixtral-Instruct's chat template), and every failure through
// ErrorFromStatus and ErrorJson. Checked: ParseRequest refuses only with
// INVALID_ARGUMENT; an accepted body named a model and maps onto a
// GenerateRequest that serializes, with the endpoint's prompt form; validation refuses only
// with INVALID_ARGUMENT; every error is a 4xx whose JSON is OpenAI's shape
// with a non-empty message.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "fuzz/fuzz_check.h"
#include "fuzz/tiny_mixtral_env.h"
#include "gateway/openai_api.h"
#include "gateway/request_validation.h"
#include "nlohmann/json.hpp"
#include "switchyard/v1/generation.pb.h"

namespace {

namespace openai = switchyard::openai;

// The error a client would get for `status`: a 4xx in OpenAI's shape.
void CheckError(const absl::Status& status, openai::Endpoint endpoint) {
  FUZZ_CHECK(status.code() == absl::StatusCode::kInvalidArgument, "refused with %s",
             status.ToString().c_str());
  const openai::Error error = openai::ErrorFromStatus(status, endpoint);
  FUZZ_CHECK(error.http_status == 400, "INVALID_ARGUMENT answered %d", error.http_status);
  FUZZ_CHECK(!error.message.empty(), "an error without a message (%s)", status.ToString().c_str());
  const nlohmann::json json =
      nlohmann::json::parse(openai::ErrorJson(error), nullptr, /*allow_exceptions=*/false);
  FUZZ_CHECK(json.is_object() && json.contains("error") && json["error"].is_object() &&
                 json["error"].value("message", "") == error.message &&
                 json["error"].value("type", "") == "invalid_request_error",
             "ErrorJson is not OpenAI's shape: %s", openai::ErrorJson(error).c_str());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  switchyard::fuzz::SilenceProtobufLogs();
  switchyard::fuzz::GetTinyMixtralEnv();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const openai::Endpoint endpoint =
      data[0] % 2 == 0 ? openai::Endpoint::kCompletions : openai::Endpoint::kChatCompletions;
  const std::string_view body(reinterpret_cast<const char*>(data) + 1, size - 1);

  absl::StatusOr<openai::ParsedRequest> parsed = openai::ParseRequest(endpoint, body);
  if (!parsed.ok()) {
    CheckError(parsed.status(), endpoint);
    return 0;
  }
  FUZZ_CHECK(!parsed->model.empty(), "accepted a request without a model");
  const switchyard::v1::GenerateRequest& request = parsed->request;
  if (endpoint == openai::Endpoint::kChatCompletions) {
    FUZZ_CHECK(request.prompt_case() == switchyard::v1::GenerateRequest::PROMPT_NOT_SET,
               "a chat request mapped onto a text or token prompt");
  } else {
    FUZZ_CHECK(request.messages_size() == 0, "a completion mapped onto messages");
  }
  FUZZ_CHECK(!parsed->include_usage || parsed->stream, "include_usage without stream");
  std::string wire;
  FUZZ_CHECK(request.SerializeToString(&wire), "the mapped request does not serialize");

  // As openai_http.cc: a defaulted max_tokens validates with the smallest budget.
  switchyard::v1::GenerateRequest checked = request;
  if (parsed->max_tokens_defaulted) checked.mutable_stopping()->set_max_new_tokens(1);
  const switchyard::fuzz::TinyMixtralEnv& env = switchyard::fuzz::GetTinyMixtralEnv();
  absl::StatusOr<switchyard::GenerationRequest> validated = switchyard::ValidateGenerateRequest(
      checked, *env.tokenizer, env.config, switchyard::RequestLimits{}, env.chat_template.get());
  if (!validated.ok()) CheckError(validated.status(), endpoint);
  return 0;
}
