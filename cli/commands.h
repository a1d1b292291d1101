// The `switchyard` subcommands. Each takes the arguments after its name and
// returns the process exit code; errors are printed to stderr.
#ifndef SWITCHYARD_CLI_COMMANDS_H_
#define SWITCHYARD_CLI_COMMANDS_H_

#include <string>
#include <vector>

namespace switchyard::cli {

int RunGenerate(const std::vector<std::string>& args);
int RunTokenize(const std::vector<std::string>& args);
int RunMakeModel(const std::vector<std::string>& args);

// Clients of a running gateway (`generate --server`, `tokenize --server`);
// cli/remote_commands.cc.
int RunGenerateRemote(const std::vector<std::string>& args);
int RunTokenizeRemote(const std::vector<std::string>& args);
// `health --server`: exit 0 when the server reports SERVING (exec probes).
int RunHealth(const std::vector<std::string>& args);
// `switchyard up`: runs experts and a gateway as child processes;
// cli/up_command.cc.
int RunUp(const std::vector<std::string>& args);
// `switchyard bench`: closed-loop streaming load generator;
// cli/bench_command.cc.
int RunBench(const std::vector<std::string>& args);
// `switchyard chat-template`: renders messages with a chat template;
// cli/chat_template_command.cc.
int RunChatTemplate(const std::vector<std::string>& args);

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_COMMANDS_H_
