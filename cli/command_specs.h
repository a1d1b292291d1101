// The flags of every `switchyard` subcommand, in one place: the subcommands
// parse with them and `switchyard SUB --help` prints them. Immutable data;
// thread-safe.
#ifndef SWITCHYARD_CLI_COMMAND_SPECS_H_
#define SWITCHYARD_CLI_COMMAND_SPECS_H_

#include <string>
#include <vector>

#include "core/flags.h"

namespace switchyard::cli {

// One subcommand: its name, a line for `switchyard --help`, and the forms it
// takes (generate and tokenize run locally or, with --server, against a
// gateway; each form has its own flags).
struct Subcommand {
  std::string name;
  std::string summary;
  std::vector<CommandSpec> forms;
};

const std::vector<Subcommand>& Subcommands();
// The subcommand called `name`, or nullptr.
const Subcommand* FindSubcommand(const std::string& name);
// The flags of a form, by its usage's first words, e.g. FormFlags("generate", true) for
// `generate --server`.
const std::vector<FlagSpec>& FormFlags(const std::string& name, bool remote);
// The help of every form of a subcommand.
std::string SubcommandHelp(const Subcommand& command);

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_COMMAND_SPECS_H_
