// `switchyard generate --model` and `switchyard tokenize --model`: the whole
// model in this process.
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cli/command_specs.h"
#include "cli/commands.h"
#include "cli/messages_flag.h"
#include "core/chat_template.h"
#include "core/flags.h"
#include "core/status_macros.h"
#include "core/tokenizer.h"
#include "gateway/generate.h"
#include "gateway/local_model.h"
#include "nlohmann/json.hpp"

namespace switchyard::cli {
namespace {

int Fail(const absl::Status& status, const char* command) {
  std::fprintf(stderr, "switchyard %s: %s\n", command, status.ToString().c_str());
  return 1;
}

absl::StatusOr<GenerateOptions> ParseGenerateOptions(const Flags& f) {
  GenerateOptions o;
  SY_ASSIGN_OR_RETURN(int64_t max_new, f.Int("max-new-tokens", 16));
  o.max_new_tokens = static_cast<int>(max_new);
  SY_ASSIGN_OR_RETURN(double t, f.Double("temperature", 0.0));
  SY_ASSIGN_OR_RETURN(double top_p, f.Double("top-p", 1.0));
  SY_ASSIGN_OR_RETURN(int64_t top_k, f.Int("top-k", 0));
  SY_ASSIGN_OR_RETURN(double min_p, f.Double("min-p", 0.0));
  SY_ASSIGN_OR_RETURN(double rep, f.Double("repetition-penalty", 1.0));
  SY_ASSIGN_OR_RETURN(double presence, f.Double("presence-penalty", 0.0));
  SY_ASSIGN_OR_RETURN(double frequency, f.Double("frequency-penalty", 0.0));
  SY_ASSIGN_OR_RETURN(o.sampling.seed, f.OptionalUint("seed"));
  o.sampling.temperature = static_cast<float>(t);
  o.sampling.top_p = static_cast<float>(top_p);
  o.sampling.top_k = static_cast<int>(top_k);
  o.sampling.min_p = static_cast<float>(min_p);
  o.sampling.repetition_penalty = static_cast<float>(rep);
  o.sampling.presence_penalty = static_cast<float>(presence);
  o.sampling.frequency_penalty = static_cast<float>(frequency);
  o.ignore_eos = f.Has("ignore-eos");
  if (auto ids = f.Get("stop-token-id")) {
    for (absl::string_view part : absl::StrSplit(*ids, ',', absl::SkipEmpty())) {
      int32_t id;
      if (!absl::SimpleAtoi(part, &id)) {
        return absl::InvalidArgumentError(absl::StrCat("--stop-token-id: bad id '", part, "'"));
      }
      o.stop_token_ids.push_back(id);
    }
  }
  return o;
}

// Flags that do not go together: one line and the usage hint, exit 2, as
// for unknown flags.
int UsageError(const char* message) {
  std::fprintf(stderr, "switchyard generate: %s\nsee switchyard generate --help\n", message);
  return 2;
}

// --messages rendered with the chat template (--chat-template FILE, else the
// model's), the generation prompt added, as the gateway renders them.
absl::StatusOr<std::string> RenderMessages(const Flags& f, const std::string& model_dir) {
  SY_ASSIGN_OR_RETURN(nlohmann::ordered_json messages, ParseMessagesFlag(*f.Get("messages")));
  absl::StatusOr<std::unique_ptr<ChatTemplate>> chat_template =
      LoadChatTemplate(model_dir, f.GetOr("chat-template", ""));
  if (absl::IsNotFound(chat_template.status()) && !f.Has("chat-template")) {
    return absl::NotFoundError(absl::StrCat(chat_template.status().message(),
                                            "; give --chat-template FILE to render --messages"));
  }
  if (!chat_template.ok()) return chat_template.status();
  return (*chat_template)->RenderChat(messages, /*add_generation_prompt=*/true);
}

}  // namespace

int RunGenerate(const std::vector<std::string>& args) {
  auto flags = Flags::Parse(args, FormFlags("generate", false));
  if (!flags.ok()) return Fail(flags.status(), "generate");
  auto model_dir = flags->Required("model");
  if (!model_dir.ok()) return Fail(model_dir.status(), "generate");
  const bool chat = flags->Has("messages");
  if (chat == flags->Has("prompt")) {
    return UsageError("give exactly one of --prompt TEXT or --messages JSON_OR_@FILE");
  }
  if (flags->Has("chat-template") && !chat) {
    return UsageError("--chat-template renders --messages; give --messages JSON_OR_@FILE");
  }
  auto options = ParseGenerateOptions(*flags);
  if (!options.ok()) return Fail(options.status(), "generate");
  // The conversation is rendered before the (slow) model load, so a bad one
  // fails at once.
  std::string chat_text;
  if (chat) {
    auto rendered = RenderMessages(*flags, *model_dir);
    if (!rendered.ok()) return Fail(rendered.status(), "generate");
    chat_text = *std::move(rendered);
  }
  auto model = LocalModel::Load(*model_dir);
  if (!model.ok()) return Fail(model.status(), "generate");

  const bool json = flags->Has("json");
  // The rendered chat is tokenized without special tokens, as the gateway
  // does: the template writes BOS itself.
  const std::vector<int32_t> prompt_ids =
      chat ? (*model)->tokenizer().Encode(chat_text, /*add_special_tokens=*/false)
           : (*model)->tokenizer().Encode(*flags->Get("prompt"));
  if (chat && prompt_ids.empty()) {
    return Fail(absl::InvalidArgumentError("the chat template rendered an empty prompt"),
                "generate");
  }
  auto stream = [](std::string_view delta) {
    std::fwrite(delta.data(), 1, delta.size(), stdout);
    std::fflush(stdout);
  };
  auto result = Generate((*model)->runner(), (*model)->kv_pool(), (*model)->tokenizer(), prompt_ids,
                         *options, json ? std::function<void(std::string_view)>() : stream);
  if (!result.ok()) return Fail(result.status(), "generate");
  if (json) {
    nlohmann::json out = {{"prompt_token_ids", result->prompt_ids},
                          {"token_ids", result->token_ids},
                          {"text", result->text},
                          {"finish_reason", FinishReasonName(result->finish_reason)}};
    std::cout << out.dump() << std::endl;
  } else {
    std::fputc('\n', stdout);
  }
  return 0;
}

int RunTokenize(const std::vector<std::string>& args) {
  auto flags = Flags::Parse(args, FormFlags("tokenize", false));
  if (!flags.ok()) return Fail(flags.status(), "tokenize");
  auto model_dir = flags->Required("model");
  if (!model_dir.ok()) return Fail(model_dir.status(), "tokenize");
  auto text = flags->Required("text");
  if (!text.ok()) return Fail(text.status(), "tokenize");
  auto tokenizer = Tokenizer::FromDir(*model_dir);
  if (!tokenizer.ok()) return Fail(tokenizer.status(), "tokenize");
  std::cout << nlohmann::json((*tokenizer)->Encode(*text)).dump() << std::endl;
  return 0;
}

}  // namespace switchyard::cli
