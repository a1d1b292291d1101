// libFuzzer target for the chat-template engine (core/chat_template.h): the
// bytes before the first NUL are a template's source, the bytes after it the
// render's input as JSON (an array: RenderChat's messages, with
// add_generation_prompt from the input's length; an object: Render's
// variables; anything else, or no NUL: the messages of a two-turn chat).
// Compile and render must never crash, hang or exhaust memory: every failure
// is a Status (INVALID_ARGUMENT for bad templates and render errors,
// RESOURCE_EXHAUSTED for a render over its limits), and an accepted render
// stays within max_output_bytes. Tight limits keep each input fast.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/chat_template.h"
#include "fuzz/fuzz_check.h"
#include "nlohmann/json.hpp"

namespace {

using switchyard::ChatTemplate;
using switchyard::ChatTemplateLimits;

ChatTemplateLimits FuzzLimits() {
  ChatTemplateLimits limits;
  limits.max_source_bytes = 8 << 10;
  limits.max_output_bytes = 64 << 10;
  limits.max_work_bytes = 1 << 20;
  limits.max_steps = 20'000;
  limits.max_loop_iterations = 5'000;
  limits.max_range = 1'000;
  limits.max_render_ms = 500;
  return limits;
}

void CheckFailure(const absl::Status& status, const char* what) {
  FUZZ_CHECK(status.code() == absl::StatusCode::kInvalidArgument ||
                 status.code() == absl::StatusCode::kResourceExhausted,
             "%s failed with %s", what, status.ToString().c_str());
  FUZZ_CHECK(!status.message().empty(), "%s failed without a message", what);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string_view source = input.substr(0, nul);
  const std::string_view json_text =
      nul == std::string_view::npos ? std::string_view() : input.substr(nul + 1);

  const ChatTemplateLimits limits = FuzzLimits();
  absl::StatusOr<std::unique_ptr<ChatTemplate>> tmpl = ChatTemplate::Compile(source, limits);
  if (!tmpl.ok()) {
    CheckFailure(tmpl.status(), "Compile");
    return 0;
  }
  (*tmpl)->set_bos_token("<s>");
  (*tmpl)->set_eos_token("</s>");

  nlohmann::ordered_json variables = nlohmann::ordered_json::parse(
      json_text.begin(), json_text.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (!variables.is_array() && !variables.is_object()) {
    variables = nlohmann::ordered_json::array(
        {{{"role", "user"}, {"content", "Hello"}}, {{"role", "assistant"}, {"content", "Hi"}}});
  }
  absl::StatusOr<std::string> text =
      variables.is_array() ? (*tmpl)->RenderChat(variables, /*add_generation_prompt=*/size % 2)
                           : (*tmpl)->Render(variables);
  if (!text.ok()) {
    CheckFailure(text.status(), "Render");
    return 0;
  }
  FUZZ_CHECK(static_cast<int64_t>(text->size()) <= limits.max_output_bytes,
             "rendered %zu bytes, over max_output_bytes", text->size());
  return 0;
}
