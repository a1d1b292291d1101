// switchyard: the command-line entry point. Dispatches to a subcommand.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cli/commands.h"

namespace {

constexpr char kUsage[] =
    "usage: switchyard COMMAND [FLAGS]\n"
    "\n"
    "commands:\n"
    "  generate    --model DIR --prompt TEXT [--max-new-tokens N] [--temperature T]\n"
    "              [--top-p P] [--top-k K] [--min-p P] [--repetition-penalty R]\n"
    "              [--presence-penalty P] [--frequency-penalty F] [--seed S]\n"
    "              [--stop-token-id ID] [--ignore-eos] [--json]\n"
    "  generate    --server HOST:PORT (--prompt TEXT | --token-ids 1,2,3) [the sampling and\n"
    "              stopping flags above] [--stop STR]... [--stream[=false]] [--timeout-ms N]\n"
    "              [--logprobs N] [--request-id ID] [--json]\n"
    "  tokenize    --model DIR --text TEXT\n"
    "  tokenize    --server HOST:PORT --text TEXT [--add-special-tokens=false]\n"
    "  health      --server HOST:PORT [--service NAME] [--timeout-ms N (default 5000)]\n"
    "              [--tls-ca F [--tls-cert F --tls-key F]]: exit 0 when SERVING\n"
    "  up          --model DIR --port P [--endpoints-file F] [--experts-per-process N]\n"
    "              [--bin-dir DIR] [--listen-host HOST] [--start-timeout-s S]\n"
    "              [--expert-workers N] [--kv-cache-tokens N] [--max-queue N]\n"
    "              [--max-step-tokens N] [--max-new-tokens-limit N]\n"
    "              [--expert-arg ARG]... [--gateway-arg ARG]...\n"
    "              [--device cpu|cuda] [--precision bf16|f32] (for every process)\n"
    "  bench       --server HOST:PORT [--concurrency C] [--requests N] [--prompt-tokens P]\n"
    "              [--output-tokens O] [--seed S] [--timeout-ms N] [--json]\n"
    "              [--metrics HOST:PORT] (gateway metrics: per-hop expert call breakdown)\n"
    "  chat-template (--model DIR | --template FILE) --messages FILE.json\n"
    "              [--add-generation-prompt] [--json]: render a conversation\n"
    "  make-model  --preset tiny|bench|mixtral-8x7b --out DIR [--layers N] [--seed S]\n"
    "              [--dtype bf16|f16|f32] [--shard-size-mb M] [--tokenizer-dir DIR]\n";

// Whether the arguments name a server (`--server X` or `--server=X`), which
// selects the remote form of generate/tokenize.
bool HasServerFlag(const std::vector<std::string>& args) {
  for (const std::string& a : args) {
    if (a == "--server" || a.rfind("--server=", 0) == 0) return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "help") == 0) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  const bool remote = HasServerFlag(args);
  if (command == "generate") {
    return remote ? switchyard::cli::RunGenerateRemote(args) : switchyard::cli::RunGenerate(args);
  }
  if (command == "tokenize") {
    return remote ? switchyard::cli::RunTokenizeRemote(args) : switchyard::cli::RunTokenize(args);
  }
  if (command == "health") return switchyard::cli::RunHealth(args);
  if (command == "up") return switchyard::cli::RunUp(args);
  if (command == "bench") return switchyard::cli::RunBench(args);
  if (command == "make-model") return switchyard::cli::RunMakeModel(args);
  if (command == "chat-template") return switchyard::cli::RunChatTemplate(args);
  std::fprintf(stderr, "switchyard: unknown command '%s'\n\n%s", command.c_str(), kUsage);
  return 2;
}
