// What the request fuzzers share: the tiny-mixtral fixture's tokenizer and
// config and Mixtral-Instruct's chat template (tests/data), loaded once, and
// protobuf's logging silenced. Built on first use and never freed; read-only
// afterwards, so any thread may use it.
#ifndef SWITCHYARD_FUZZ_TINY_MIXTRAL_ENV_H_
#define SWITCHYARD_FUZZ_TINY_MIXTRAL_ENV_H_

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "core/chat_template.h"
#include "core/model_config.h"
#include "core/tokenizer.h"
#include "google/protobuf/stubs/logging.h"

namespace switchyard::fuzz {

struct TinyMixtralEnv {
  std::unique_ptr<Tokenizer> tokenizer;
  ModelConfig config;
  std::unique_ptr<ChatTemplate> chat_template;  // renders `messages` prompts
};

// Aborts (the fuzzer cannot run) when a fixture does not load.
inline const TinyMixtralEnv& GetTinyMixtralEnv() {
  static const TinyMixtralEnv* env = [] {
    auto* e = new TinyMixtralEnv;
    absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromDir(SWITCHYARD_FUZZ_MODEL_DIR);
    absl::StatusOr<ModelConfig> c = LoadModelConfig(SWITCHYARD_FUZZ_MODEL_DIR);
    absl::StatusOr<std::unique_ptr<ChatTemplate>> chat =
        LoadChatTemplate(SWITCHYARD_FUZZ_MODEL_DIR, SWITCHYARD_FUZZ_CHAT_TEMPLATE);
    if (!t.ok() || !c.ok() || !chat.ok()) {
      std::fprintf(stderr, "cannot load %s / %s: %s %s %s\n", SWITCHYARD_FUZZ_MODEL_DIR,
                   SWITCHYARD_FUZZ_CHAT_TEMPLATE, t.status().ToString().c_str(),
                   c.status().ToString().c_str(), chat.status().ToString().c_str());
      std::abort();
    }
    e->tokenizer = *std::move(t);
    e->config = *c;
    e->chat_template = *std::move(chat);
    return e;
  }();
  return *env;
}

// Protobuf logs every string field with invalid UTF-8 it refuses to parse or
// serializes; that is expected here and would drown the fuzzer's output.
inline void SilenceProtobufLogs() {
  google::protobuf::SetLogHandler(
      [](google::protobuf::LogLevel, const char*, int, const std::string&) {});
}

}  // namespace switchyard::fuzz

#endif  // SWITCHYARD_FUZZ_TINY_MIXTRAL_ENV_H_
