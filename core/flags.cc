#include "core/flags.h"

#include <cstdio>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/version.h"

namespace switchyard {

absl::StatusOr<Flags> Flags::Parse(const std::vector<std::string>& args,
                                   const std::set<std::string>& value_flags,
                                   const std::set<std::string>& bool_flags) {
  Flags f;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", a, "'"));
    }
    std::string name = a.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    if (bool_flags.count(name)) {
      f.values_[name] = has_value ? value : "true";
      f.all_values_[name].push_back(f.values_[name]);
    } else if (value_flags.count(name)) {
      if (!has_value) {
        if (i + 1 >= args.size()) {
          return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
        }
        value = args[++i];
      }
      f.values_[name] = value;
      f.all_values_[name].push_back(value);
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
  }
  return f;
}

absl::StatusOr<Flags> Flags::Parse(const std::vector<std::string>& args,
                                   const std::vector<FlagSpec>& specs) {
  std::set<std::string> value_flags, bool_flags;
  for (const FlagSpec& s : specs) (s.takes_value ? value_flags : bool_flags).insert(s.name);
  return Parse(args, value_flags, bool_flags);
}

std::string HelpText(const CommandSpec& spec) {
  std::string out = absl::StrCat("usage: ", spec.usage, "\n\nflags:\n");
  for (const FlagSpec& f : spec.flags) {
    std::string head = absl::StrCat("  --", f.name, f.takes_value ? " VALUE" : "");
    // Aligned descriptions; a long name gets its description on the next line.
    if (head.size() < 30) {
      head.resize(30, ' ');
    } else {
      absl::StrAppend(&head, "\n", std::string(30, ' '));
    }
    absl::StrAppend(&out, head, f.help);
    if (f.default_text == "required") {
      absl::StrAppend(&out, " (required)");
    } else {
      // Every flag states its default: a boolean is off, a value flag without one is unset.
      const std::string fallback = f.takes_value ? "none" : "off";
      absl::StrAppend(&out, " (default: ", f.default_text.empty() ? fallback : f.default_text, ")");
    }
    absl::StrAppend(&out, "\n");
  }
  absl::StrAppend(&out, "  --help, -h                  print this help and exit\n",
                  "  --version                   print the version and exit\n");
  if (!spec.notes.empty()) absl::StrAppend(&out, "\n", spec.notes);
  return out;
}

std::optional<int> HandleCommandLine(const std::string& name, const std::string& help,
                                     const std::vector<FlagSpec>& specs,
                                     const std::vector<std::string>& args, Flags* out) {
  // --help and --version win wherever they are, even next to a bad flag; a
  // value that happens to read "-h" (--prompt -h) is not a help request.
  std::set<std::string> value_flags;
  for (const FlagSpec& s : specs) {
    if (s.takes_value) value_flags.insert(s.name);
  }
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      std::fputs(help.c_str(), stdout);
      return 0;
    }
    if (a == "--version") {
      std::printf("%s %s\n", name.c_str(), Version());
      return 0;
    }
    if (a.rfind("--", 0) == 0 && a.find('=') == std::string::npos &&
        value_flags.count(a.substr(2))) {
      ++i;  // Skip the value.
    }
  }
  absl::StatusOr<Flags> flags = Flags::Parse(args, specs);
  if (!flags.ok()) {
    std::fprintf(stderr, "%s: %s\nsee %s --help\n", name.c_str(),
                 std::string(flags.status().message()).c_str(), name.c_str());
    return 2;
  }
  if (out != nullptr) *out = *std::move(flags);
  return std::nullopt;
}

std::optional<std::string> Flags::Get(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::string> Flags::GetAll(const std::string& name) const {
  auto it = all_values_.find(name);
  if (it == all_values_.end()) return {};
  return it->second;
}

absl::StatusOr<std::string> Flags::Required(const std::string& name) const {
  auto v = Get(name);
  if (!v) return absl::InvalidArgumentError(absl::StrCat("missing required flag --", name));
  return *v;
}

std::string Flags::GetOr(const std::string& name, const std::string& fallback) const {
  return Get(name).value_or(fallback);
}

absl::StatusOr<int64_t> Flags::Int(const std::string& name, int64_t fallback) const {
  auto v = Get(name);
  if (!v) return fallback;
  int64_t out;
  if (!absl::SimpleAtoi(*v, &out)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be an integer, got '", *v, "'"));
  }
  return out;
}

absl::StatusOr<int64_t> Flags::IntInRange(const std::string& name, int64_t fallback, int64_t min,
                                          int64_t max) const {
  auto v = Get(name);
  if (!v) return fallback;
  int64_t out;
  if (!absl::SimpleAtoi(*v, &out) || out < min || out > max) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be an integer in [", min, ", ", max, "], got '", *v, "'"));
  }
  return out;
}

absl::StatusOr<double> Flags::Double(const std::string& name, double fallback) const {
  auto v = Get(name);
  if (!v) return fallback;
  double out;
  if (!absl::SimpleAtod(*v, &out)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be a number, got '", *v, "'"));
  }
  return out;
}

absl::StatusOr<std::optional<uint64_t>> Flags::OptionalUint(const std::string& name) const {
  auto v = Get(name);
  if (!v) return std::optional<uint64_t>();
  uint64_t out;
  if (!absl::SimpleAtoi(*v, &out)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be a non-negative integer, got '", *v, "'"));
  }
  return std::optional<uint64_t>(out);
}

}  // namespace switchyard
