// `switchyard chat-template`: renders a conversation with a model's chat
// template (or a template file), as the gateway does for `messages` prompts.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "cli/command_specs.h"
#include "cli/commands.h"
#include "core/chat_template.h"
#include "core/flags.h"
#include "nlohmann/json.hpp"

namespace switchyard::cli {
namespace {

int Fail(absl::string_view message) {
  std::fprintf(stderr, "switchyard chat-template: %.*s\n", static_cast<int>(message.size()),
               message.data());
  return 1;
}

// The messages file: a JSON array of {"role", "content"} objects, or an
// object with such an array under "messages".
absl::StatusOr<nlohmann::ordered_json> ReadMessages(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return absl::NotFoundError("cannot read --messages file " + path);
  std::string text;
  char buf[65536];
  for (size_t n; (n = std::fread(buf, 1, sizeof(buf), f)) > 0;) text.append(buf, n);
  std::fclose(f);
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(text, nullptr, false);
  if (j.is_discarded()) return absl::InvalidArgumentError(path + ": not valid JSON");
  if (j.is_object() && j.contains("messages")) j = j["messages"];
  if (!j.is_array()) {
    return absl::InvalidArgumentError(
        path + ": expected a JSON array of messages or {\"messages\": [...]}");
  }
  for (size_t i = 0; i < j.size(); ++i) {
    if (!j[i].is_object() || !j[i].contains("role") || !j[i]["role"].is_string()) {
      return absl::InvalidArgumentError(path + ": messages[" + std::to_string(i) +
                                        "] needs a string \"role\"");
    }
  }
  return j;
}

}  // namespace

int RunChatTemplate(const std::vector<std::string>& args) {
  auto flags = Flags::Parse(args, FormFlags("chat-template", false));
  if (!flags.ok()) return Fail(flags.status().message());
  const std::string model_dir = flags->GetOr("model", "");
  const std::string template_file = flags->GetOr("template", "");
  if (model_dir.empty() && template_file.empty()) {
    return Fail("give --model DIR (its tokenizer_config.json's chat_template) or --template FILE");
  }
  auto messages_file = flags->Required("messages");
  if (!messages_file.ok()) return Fail(messages_file.status().message());
  auto messages = ReadMessages(*messages_file);
  if (!messages.ok()) return Fail(messages.status().message());
  auto tmpl = LoadChatTemplate(model_dir, template_file);
  if (!tmpl.ok()) return Fail(tmpl.status().message());
  auto text = (*tmpl)->RenderChat(*messages, flags->Has("add-generation-prompt"));
  if (!text.ok()) return Fail(text.status().message());
  if (flags->Has("json")) {
    const std::string out = nlohmann::ordered_json{{"text", *text}}.dump();
    std::printf("%s\n", out.c_str());
  } else {
    std::fwrite(text->data(), 1, text->size(), stdout);
    std::fputc('\n', stdout);
  }
  return 0;
}

}  // namespace switchyard::cli
