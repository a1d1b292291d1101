#include "cli/messages_flag.h"

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace switchyard::cli {
namespace {

// "a string", "an array", ... for error messages.
std::string Describe(const nlohmann::ordered_json& v) {
  switch (v.type()) {
    case nlohmann::ordered_json::value_t::null:
      return "null";
    case nlohmann::ordered_json::value_t::boolean:
      return "a boolean";
    case nlohmann::ordered_json::value_t::string:
      return "a string";
    case nlohmann::ordered_json::value_t::array:
      return "an array";
    case nlohmann::ordered_json::value_t::object:
      return "an object";
    default:
      return "a number";
  }
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const std::string& where) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(where, ": cannot read the file: ", std::strerror(errno)));
  }
  std::string text;
  char buf[65536];
  for (size_t n; (n = std::fread(buf, 1, sizeof(buf), f)) > 0;) text.append(buf, n);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) return absl::NotFoundError(absl::StrCat(where, ": cannot read the file"));
  return text;
}

absl::Status CheckMessage(const nlohmann::ordered_json& m, size_t i, const std::string& where) {
  const std::string name = absl::StrCat("messages[", i, "]");
  if (!m.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", name, " is ", Describe(m),
                                                   ", expected an object {\"role\": ..., "
                                                   "\"content\": ...}"));
  }
  for (const char* field : {"role", "content"}) {
    auto it = m.find(field);
    if (it == m.end()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": ", name, " has no \"", field, "\""));
    }
    if (!it->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", name, ".", field, " must be a string, got ", Describe(*it)));
    }
  }
  for (auto it = m.begin(); it != m.end(); ++it) {
    if (it.key() != "role" && it.key() != "content") {
      // The Generation API carries role and content only; dropping a field
      // silently would change the conversation.
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", name, ".", it.key(),
                       " is not supported (a message has only \"role\" and \"content\")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<nlohmann::ordered_json> ParseMessagesFlag(const std::string& value) {
  std::string where = "--messages";
  std::string text = value;
  if (!value.empty() && value[0] == '@') {
    const std::string path = value.substr(1);
    where = absl::StrCat("--messages @", path);
    absl::StatusOr<std::string> contents = ReadFile(path, where);
    if (!contents.ok()) return contents.status();
    text = *std::move(contents);
  }
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::ordered_json::parse_error& e) {
    // e.what() reads "[json.exception.parse_error.101] parse error at line
    // 1, column 3: ..."; keep the part a user can act on.
    std::string what = e.what();
    const size_t bracket = what.find("] ");
    if (what.rfind("[json.exception", 0) == 0 && bracket != std::string::npos) {
      what = what.substr(bracket + 2);
    }
    return absl::InvalidArgumentError(absl::StrCat(where, ": not valid JSON: ", what));
  }
  if (j.is_object()) {
    auto it = j.find("messages");
    if (it == j.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": an object needs a \"messages\" array"));
    }
    nlohmann::ordered_json inner = *it;
    j = std::move(inner);
  }
  if (!j.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": expected a JSON array of messages [{\"role\": ..., \"content\": ...}] ",
        "or {\"messages\": [...]}, got ", Describe(j)));
  }
  if (j.empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": no messages"));
  for (size_t i = 0; i < j.size(); ++i) {
    if (absl::Status s = CheckMessage(j[i], i, where); !s.ok()) return s;
  }
  return j;
}

}  // namespace switchyard::cli
