// switchyard: the command-line entry point. Dispatches to a subcommand.
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "cli/command_specs.h"
#include "cli/commands.h"
#include "core/flags.h"
#include "core/version.h"
#include "rpc/grpc_process.h"

namespace {

// `switchyard --help`: every subcommand with its summary.
std::string Usage() {
  std::string out =
      "usage: switchyard COMMAND [FLAGS]\n"
      "       switchyard COMMAND --help   (every flag of COMMAND, its meaning and default)\n"
      "       switchyard --version\n\ncommands:\n";
  for (const switchyard::cli::Subcommand& c : switchyard::cli::Subcommands()) {
    std::string name = "  " + c.name;
    name.resize(17, ' ');
    out += name + c.summary + "\n";
  }
  return out;
}

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
  using switchyard::cli::FindSubcommand;
  const std::string first = argc < 2 ? "" : argv[1];
  if (argc < 2) {
    std::fputs(Usage().c_str(), stderr);
    return 2;
  }
  if (first == "--help" || first == "-h" || first == "help") {
    std::fputs(Usage().c_str(), stdout);
    return 0;
  }
  if (first == "--version") {
    std::printf("switchyard %s\n", switchyard::Version());
    return 0;
  }
  const switchyard::cli::Subcommand* sub = FindSubcommand(first);
  if (sub == nullptr) {
    std::fprintf(stderr, "switchyard: unknown command '%s'\nsee switchyard --help\n",
                 first.c_str());
    return 2;
  }
  const std::string& command = sub->name;
  const std::vector<std::string> args(argv + 2, argv + argc);
  const bool remote = HasServerFlag(args);
  // --help, --version and unknown flags are answered here, the same way for every subcommand.
  if (std::optional<int> code = switchyard::HandleCommandLine(
          "switchyard " + command, switchyard::cli::SubcommandHelp(*sub),
          switchyard::cli::FormFlags(command, remote), args, nullptr)) {
    return *code;
  }
  // The commands that talk gRPC and take signals the default way hold the
  // runtime here (rpc/grpc_process.h); `up` blocks its signals first, so it
  // holds its own after that.
  std::optional<switchyard::rpc::GrpcProcess> grpc_process;
  if (remote || command == "health" || command == "bench") grpc_process.emplace();
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
  std::fprintf(stderr, "switchyard: command '%s' has no handler\n", command.c_str());
  return 2;
}
