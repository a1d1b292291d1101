// A small command-line flag parser for every binary (the switchyard
// subcommands and the servers):
// `--name value`, `--name=value` and boolean `--name`. Unknown flags and
// missing values are errors that name the flag.
#ifndef SWITCHYARD_CORE_FLAGS_H_
#define SWITCHYARD_CORE_FLAGS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace switchyard {

// One flag of a command: what Flags::Parse accepts and what --help prints.
struct FlagSpec {
  std::string name;         // Without the leading "--".
  bool takes_value = true;  // false: a boolean flag (`--name` or `--name=false`).
  // Shown as "(default: ...)", or "(required)" for "required"; empty: "off" for
  // a boolean, "none" for a value flag.
  std::string default_text;
  std::string help;  // What the flag means; one line or more.
};

// A command for --help: its name ("switchyard generate"), a usage line and
// its flags. `notes` is printed after the flags (may be empty).
struct CommandSpec {
  std::string name;
  std::string usage;
  std::vector<FlagSpec> flags;
  std::string notes;
};

// The help text of `spec`: usage, then every flag with its meaning and default.
std::string HelpText(const CommandSpec& spec);

class Flags {
 public:
  // value_flags take a value; bool_flags do not.
  static absl::StatusOr<Flags> Parse(const std::vector<std::string>& args,
                                     const std::set<std::string>& value_flags,
                                     const std::set<std::string>& bool_flags);
  // The flags named in `specs` (takes_value picks value or boolean).
  static absl::StatusOr<Flags> Parse(const std::vector<std::string>& args,
                                     const std::vector<FlagSpec>& specs);

  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  // The last value given for `name`.
  std::optional<std::string> Get(const std::string& name) const;
  // Every value given for a repeatable flag, in command-line order.
  std::vector<std::string> GetAll(const std::string& name) const;
  absl::StatusOr<std::string> Required(const std::string& name) const;
  std::string GetOr(const std::string& name, const std::string& fallback) const;
  // Parsed numbers; INVALID_ARGUMENT names the flag.
  absl::StatusOr<int64_t> Int(const std::string& name, int64_t fallback) const;
  // An integer in [min, max] (the fallback when absent); INVALID_ARGUMENT
  // names the flag and the range. Check every numeric flag in the range of
  // the type it ends up in, so nothing is narrowed into a different value.
  absl::StatusOr<int64_t> IntInRange(const std::string& name, int64_t fallback, int64_t min,
                                     int64_t max) const;
  absl::StatusOr<double> Double(const std::string& name, double fallback) const;
  absl::StatusOr<std::optional<uint64_t>> OptionalUint(const std::string& name) const;

 private:
  std::map<std::string, std::string> values_;
  std::map<std::string, std::vector<std::string>> all_values_;
};

// The shared front door of every binary and subcommand. `--help`/`-h` print
// `help` to stdout and give 0; `--version` prints "NAME VERSION" and gives 0;
// a flag not in `specs` (or a missing value) prints one line naming it plus
// "see NAME --help" to stderr and gives 2. Otherwise returns nullopt and
// stores the parsed flags in *out (when out is non-null).
// Prints to stdout/stderr; call from main threads only.
std::optional<int> HandleCommandLine(const std::string& name, const std::string& help,
                                     const std::vector<FlagSpec>& specs,
                                     const std::vector<std::string>& args, Flags* out);

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_FLAGS_H_
