// The `--messages` flag of `switchyard generate`: a chat conversation given
// as JSON text or as @FILE, checked before anything is sent or loaded so a
// mistake is reported naming the message and field that is wrong.
//
// Thread-safety: stateless functions; safe to call from any thread.
#ifndef SWITCHYARD_CLI_MESSAGES_FLAG_H_
#define SWITCHYARD_CLI_MESSAGES_FLAG_H_

#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace switchyard::cli {

// Parses the value of --messages: JSON text, or "@PATH" for the contents of
// the file PATH. The JSON is an array of {"role": STRING, "content": STRING}
// objects, or an object holding such an array under "messages" (the shape
// `switchyard chat-template --messages` and OpenAI requests use). Returns the
// array. InvalidArgument (starting "--messages:" or "--messages @PATH:") when
// the text is not JSON (with line and column), not that shape, empty, or a
// message has a missing, non-string or unsupported field; NotFound when the
// file cannot be read.
absl::StatusOr<nlohmann::ordered_json> ParseMessagesFlag(const std::string& value);

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_MESSAGES_FLAG_H_
