// `switchyard generate --model` and `switchyard tokenize --model`: the whole
// model in this process.
#include <cstdio>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cli/command_specs.h"
#include "cli/commands.h"
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

}  // namespace

int RunGenerate(const std::vector<std::string>& args) {
  auto flags = Flags::Parse(args, FormFlags("generate", false));
  if (!flags.ok()) return Fail(flags.status(), "generate");
  auto model_dir = flags->Required("model");
  if (!model_dir.ok()) return Fail(model_dir.status(), "generate");
  auto prompt = flags->Required("prompt");
  if (!prompt.ok()) return Fail(prompt.status(), "generate");
  auto options = ParseGenerateOptions(*flags);
  if (!options.ok()) return Fail(options.status(), "generate");
  auto model = LocalModel::Load(*model_dir);
  if (!model.ok()) return Fail(model.status(), "generate");

  const bool json = flags->Has("json");
  const std::vector<int32_t> prompt_ids = (*model)->tokenizer().Encode(*prompt);
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
