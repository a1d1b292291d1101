#include "gateway/openai_api.h"

#include <cctype>
#include <cmath>
#include <limits>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "nlohmann/json.hpp"

namespace switchyard::openai {
namespace {

using Json = nlohmann::json;

absl::Status Bad(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", why));
}

// Serialises without throwing: text the gateway produces is whole UTF-8
// characters, but a bad byte must never take the server down.
std::string Dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

const char* TypeName(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::boolean:
      return "a boolean";
    case Json::value_t::string:
      return "a string";
    case Json::value_t::array:
      return "an array";
    case Json::value_t::object:
      return "an object";
    default:
      return "a number";
  }
}

absl::StatusOr<double> Number(const Json& v, const std::string& field) {
  if (!v.is_number()) return Bad(field, absl::StrCat("must be a number, got ", TypeName(v)));
  const double d = v.get<double>();
  if (!std::isfinite(d)) return Bad(field, "must be finite");
  return d;
}

absl::StatusOr<int64_t> Integer(const Json& v, const std::string& field) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Bad(field, "is too large");
    }
    return static_cast<int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  return Bad(field, absl::StrCat("must be an integer, got ", TypeName(v)));
}

absl::StatusOr<bool> Boolean(const Json& v, const std::string& field) {
  if (!v.is_boolean()) return Bad(field, absl::StrCat("must be a boolean, got ", TypeName(v)));
  return v.get<bool>();
}

// `stop`: a string or an array of strings.
absl::Status ParseStop(const Json& v, v1::StoppingCriteria* stopping) {
  if (v.is_string()) {
    stopping->add_stop(v.get<std::string>());
    return absl::OkStatus();
  }
  if (!v.is_array()) {
    return Bad("stop", absl::StrCat("must be a string or an array of strings, got ", TypeName(v)));
  }
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_string()) {
      return Bad(absl::StrCat("stop[", i, "]"),
                 absl::StrCat("must be a string, got ", TypeName(v[i])));
    }
    stopping->add_stop(v[i].get<std::string>());
  }
  return absl::OkStatus();
}

// An array of token ids as the prompt.
absl::Status ParseTokenIds(const Json& v, const std::string& field, v1::GenerateRequest* request) {
  v1::TokenIds* ids = request->mutable_token_ids();
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string item = absl::StrCat(field, "[", i, "]");
    absl::StatusOr<int64_t> id = Integer(v[i], item);
    if (!id.ok()) return id.status();
    if (*id < 0 || *id > std::numeric_limits<int32_t>::max()) {
      return Bad(item, absl::StrCat("token id ", *id, " is outside the vocabulary"));
    }
    ids->add_ids(static_cast<int32_t>(*id));
  }
  return absl::OkStatus();
}

// `prompt`: a string, an array of token ids, or a one-element array of
// either (OpenAI's batch form, one prompt only here).
absl::Status ParsePrompt(const Json& v, v1::GenerateRequest* request) {
  if (v.is_string()) {
    request->set_text(v.get<std::string>());
    return absl::OkStatus();
  }
  if (!v.is_array()) {
    return Bad("prompt",
               absl::StrCat("must be a string or an array of token ids, got ", TypeName(v)));
  }
  if (v.empty()) return Bad("prompt", "is empty");
  if (v[0].is_string() || v[0].is_array()) {
    if (v.size() != 1) {
      return Bad("prompt", absl::StrCat("one prompt per request is supported, got ", v.size()));
    }
    if (v[0].is_string()) {
      request->set_text(v[0].get<std::string>());
      return absl::OkStatus();
    }
    if (v[0].empty()) return Bad("prompt[0]", "is empty");
    return ParseTokenIds(v[0], "prompt[0]", request);
  }
  return ParseTokenIds(v, "prompt", request);
}

// A message's `content`: a string, null, or an array of text parts.
absl::StatusOr<std::string> MessageContent(const Json& v, const std::string& field) {
  if (v.is_null()) return std::string();
  if (v.is_string()) return v.get<std::string>();
  if (!v.is_array()) {
    return Bad(field,
               absl::StrCat("must be a string or an array of text parts, got ", TypeName(v)));
  }
  std::string text;
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string part = absl::StrCat(field, "[", i, "]");
    const Json& p = v[i];
    if (!p.is_object() || !p.contains("type") || !p["type"].is_string()) {
      return Bad(part, "must be an object with a string `type`");
    }
    if (p["type"].get<std::string>() != "text") {
      return Bad(absl::StrCat(part, ".type"), absl::StrCat("'", p["type"].get<std::string>(),
                                                           "' is not supported (text parts only)"));
    }
    if (!p.contains("text") || !p["text"].is_string()) {
      return Bad(absl::StrCat(part, ".text"), "must be a string");
    }
    text += p["text"].get<std::string>();
  }
  return text;
}

absl::Status ParseMessages(const Json& v, v1::GenerateRequest* request) {
  if (!v.is_array()) {
    return Bad("messages", absl::StrCat("must be an array of messages, got ", TypeName(v)));
  }
  if (v.empty()) return Bad("messages", "is empty");
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string field = absl::StrCat("messages[", i, "]");
    const Json& m = v[i];
    if (!m.is_object()) {
      return Bad(field, absl::StrCat("must be an object, got ", TypeName(m)));
    }
    if (!m.contains("role") || !m["role"].is_string()) {
      return Bad(field + ".role", "must be a string");
    }
    for (const auto& [key, value] : m.items()) {
      if (key != "role" && key != "content" && key != "name" && !value.is_null()) {
        return Bad(absl::StrCat(field, ".", key), "not supported by this gateway");
      }
    }
    v1::ChatMessage* message = request->add_messages();
    message->set_role(m["role"].get<std::string>());
    if (m.contains("content")) {
      absl::StatusOr<std::string> content = MessageContent(m["content"], field + ".content");
      if (!content.ok()) return content.status();
      message->set_content(*std::move(content));
    }
  }
  return absl::OkStatus();
}

// Parameters OpenAI defines that this gateway accepts only with their
// neutral value (anything else is refused, not silently ignored).
absl::Status CheckNeutral(const std::string& key, const Json& v) {
  bool neutral = false;
  if (key == "n" || key == "best_of") {
    neutral = v.is_number_integer() && v.get<int64_t>() == 1;
    if (!neutral) return Bad(key, "only 1 is supported (one choice per request)");
  } else if (key == "echo" || key == "parallel_tool_calls") {
    neutral = v.is_boolean() && !v.get<bool>();
  } else if (key == "suffix") {
    neutral = v.is_string() && v.get<std::string>().empty();
  } else if (key == "logit_bias" || key == "metadata") {
    neutral = v.is_object() && v.empty();
  } else if (key == "tools" || key == "functions") {
    neutral = v.is_array() && v.empty();
  } else if (key == "tool_choice" || key == "function_call") {
    neutral = v.is_string() && v.get<std::string>() == "none";
  } else if (key == "response_format") {
    neutral = v.is_object() && v.contains("type") && v["type"] == "text";
  }
  if (!neutral) return Bad(key, "not supported by this gateway");
  return absl::OkStatus();
}

bool IsNeutralOnlyKey(Endpoint endpoint, const std::string& key) {
  static const char* const kBoth[] = {"n", "logit_bias"};
  static const char* const kCompletions[] = {"best_of", "echo", "suffix"};
  static const char* const kChat[] = {"tools",         "tool_choice",     "functions",
                                      "function_call", "response_format", "parallel_tool_calls",
                                      "metadata"};
  for (const char* k : kBoth) {
    if (key == k) return true;
  }
  if (endpoint == Endpoint::kCompletions) {
    for (const char* k : kCompletions) {
      if (key == k) return true;
    }
  } else {
    for (const char* k : kChat) {
      if (key == k) return true;
    }
  }
  return false;
}

absl::Status ParseMaxTokens(const Json& v, const std::string& key, ParsedRequest* out) {
  absl::StatusOr<int64_t> n = Integer(v, key);
  if (!n.ok()) return n.status();
  if (*n < 1) return Bad(key, absl::StrCat("must be at least 1, got ", *n));
  if (*n > std::numeric_limits<uint32_t>::max()) {
    return Bad(key, absl::StrCat(*n, " is above the limit"));
  }
  out->request.mutable_stopping()->set_max_new_tokens(static_cast<uint32_t>(*n));
  out->max_tokens_defaulted = false;
  return absl::OkStatus();
}

// One top-level key of the body.
absl::Status ParseField(Endpoint endpoint, const std::string& key, const Json& v,
                        ParsedRequest* out) {
  v1::GenerateRequest& r = out->request;
  if (key == "model") {
    if (!v.is_string()) return Bad(key, absl::StrCat("must be a string, got ", TypeName(v)));
    out->model = v.get<std::string>();
  } else if (key == "prompt" && endpoint == Endpoint::kCompletions) {
    return ParsePrompt(v, &r);
  } else if (key == "messages" && endpoint == Endpoint::kChatCompletions) {
    return ParseMessages(v, &r);
  } else if (key == "max_tokens" ||
             (key == "max_completion_tokens" && endpoint == Endpoint::kChatCompletions)) {
    return ParseMaxTokens(v, key, out);
  } else if (key == "temperature") {
    absl::StatusOr<double> t = Number(v, key);
    if (!t.ok()) return t.status();
    if (*t < 0 || *t > 2) return Bad(key, absl::StrCat("must be in [0, 2], got ", *t));
    r.mutable_sampling()->set_temperature(static_cast<float>(*t));
  } else if (key == "top_p") {
    absl::StatusOr<double> p = Number(v, key);
    if (!p.ok()) return p.status();
    r.mutable_sampling()->set_top_p(static_cast<float>(*p));
  } else if (key == "presence_penalty" || key == "frequency_penalty") {
    absl::StatusOr<double> p = Number(v, key);
    if (!p.ok()) return p.status();
    if (key == "presence_penalty") {
      r.mutable_sampling()->set_presence_penalty(static_cast<float>(*p));
    } else {
      r.mutable_sampling()->set_frequency_penalty(static_cast<float>(*p));
    }
  } else if (key == "seed") {
    absl::StatusOr<int64_t> seed = Integer(v, key);
    if (!seed.ok()) return seed.status();
    // OpenAI's seed is a signed 64-bit integer; its bits seed the generator.
    r.mutable_sampling()->set_seed(static_cast<uint64_t>(*seed));
  } else if (key == "stop") {
    return ParseStop(v, r.mutable_stopping());
  } else if (key == "stream") {
    absl::StatusOr<bool> b = Boolean(v, key);
    if (!b.ok()) return b.status();
    out->stream = *b;
  } else if (key == "stream_options") {
    if (!v.is_object()) return Bad(key, absl::StrCat("must be an object, got ", TypeName(v)));
    for (const auto& [k, value] : v.items()) {
      if (k != "include_usage") return Bad(absl::StrCat(key, ".", k), "not supported");
      absl::StatusOr<bool> b = Boolean(value, "stream_options.include_usage");
      if (!b.ok()) return b.status();
      out->include_usage = *b;
    }
  } else if (key == "logprobs" && endpoint == Endpoint::kCompletions) {
    absl::StatusOr<int64_t> n = Integer(v, key);
    if (!n.ok()) return n.status();
    if (*n < 0 || *n > 20) return Bad(key, absl::StrCat("must be in [0, 20], got ", *n));
    r.set_return_logprobs(true);
    r.set_top_logprobs(static_cast<uint32_t>(*n));
  } else if (key == "logprobs") {
    absl::StatusOr<bool> b = Boolean(v, key);
    if (!b.ok()) return b.status();
    r.set_return_logprobs(*b);
  } else if (key == "top_logprobs" && endpoint == Endpoint::kChatCompletions) {
    absl::StatusOr<int64_t> n = Integer(v, key);
    if (!n.ok()) return n.status();
    if (*n < 0 || *n > 20) return Bad(key, absl::StrCat("must be in [0, 20], got ", *n));
    r.set_top_logprobs(static_cast<uint32_t>(*n));
  } else if (key == "user") {
    if (!v.is_string()) return Bad(key, absl::StrCat("must be a string, got ", TypeName(v)));
  } else if (IsNeutralOnlyKey(endpoint, key)) {
    return CheckNeutral(key, v);
  } else {
    return Bad(key, "unrecognized request argument");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ParsedRequest> ParseRequest(Endpoint endpoint, std::string_view body) {
  const Json j = Json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(
        "body: not valid JSON (send a JSON object with Content-Type: application/json)");
  }
  if (!j.is_object()) return Bad("body", absl::StrCat("must be a JSON object, got ", TypeName(j)));
  ParsedRequest out;
  out.request.mutable_sampling()->set_temperature(1.0f);  // OpenAI's default
  out.max_tokens_defaulted = endpoint == Endpoint::kChatCompletions;
  for (const auto& [key, value] : j.items()) {
    if (value.is_null()) continue;  // null means "the default" for every optional parameter
    if (absl::Status s = ParseField(endpoint, key, value, &out); !s.ok()) return s;
  }
  if (out.model.empty()) return Bad("model", "required: the id GET /v1/models lists");
  if (endpoint == Endpoint::kCompletions &&
      out.request.prompt_case() == v1::GenerateRequest::PROMPT_NOT_SET) {
    return Bad("prompt", "required");
  }
  if (endpoint == Endpoint::kChatCompletions && out.request.messages_size() == 0) {
    return Bad("messages", "required");
  }
  if (endpoint == Endpoint::kChatCompletions && out.request.top_logprobs() > 0 &&
      !out.request.return_logprobs()) {
    return Bad("top_logprobs", "needs logprobs: true");
  }
  if (!out.stream && out.include_usage) {
    return Bad("stream_options", "only allowed with stream: true");
  }
  return out;
}

Error ErrorFromStatus(const absl::Status& status, Endpoint endpoint) {
  Error e;
  e.message = std::string(status.message());
  // OpenAI's status, type and code per absl code; any other code is a 500
  // server_error.
  struct Mapping {
    absl::StatusCode status;
    int http_status;
    const char* type;
    const char* code;
  };
  static constexpr Mapping kMappings[] = {
      {absl::StatusCode::kInvalidArgument, 400, "invalid_request_error", ""},
      {absl::StatusCode::kFailedPrecondition, 400, "invalid_request_error", ""},
      {absl::StatusCode::kOutOfRange, 400, "invalid_request_error", ""},
      {absl::StatusCode::kUnauthenticated, 401, "invalid_request_error", "invalid_api_key"},
      {absl::StatusCode::kPermissionDenied, 403, "invalid_request_error", ""},
      {absl::StatusCode::kNotFound, 404, "invalid_request_error", ""},
      {absl::StatusCode::kResourceExhausted, 429, "rate_limit_error", "rate_limit_exceeded"},
      {absl::StatusCode::kUnavailable, 503, "server_error", "service_unavailable"},
  };
  e.http_status = 500;
  e.type = "server_error";
  for (const Mapping& m : kMappings) {
    if (m.status != status.code()) continue;
    e.http_status = m.http_status;
    e.type = m.type;
    e.code = m.code;
    break;
  }
  // Only the 400s name a request field.
  if (e.http_status != 400) return e;
  // ValidateGenerateRequest names proto fields; say OpenAI's.
  const bool chat = endpoint == Endpoint::kChatCompletions;
  struct Rename {
    std::string proto;
    std::string openai;
  };
  const Rename renames[] = {
      {"stopping.max_new_tokens", "max_tokens"},
      {"stopping.stop_token_ids", "stop"},
      {"stopping.stop", "stop"},
      {"sampling.", ""},
      {"token_ids.ids", chat ? "messages" : "prompt"},
      {"token_ids", chat ? "messages" : "prompt"},
      {"text", chat ? "messages" : "prompt"},
      {"prompt", chat ? "messages" : "prompt"},
      {"top_logprobs", chat ? "top_logprobs" : "logprobs"},
  };
  for (const Rename& r : renames) {
    if (!absl::StartsWith(e.message, r.proto)) continue;
    const char next = e.message.size() > r.proto.size() ? e.message[r.proto.size()] : ':';
    if (r.proto.back() != '.' && next != ':' && next != '[' && next != ' ') continue;
    e.message = absl::StrCat(r.openai, e.message.substr(r.proto.size()));
    break;
  }
  e.message = absl::StrReplaceAll(e.message, {{"max_new_tokens", "max_tokens"}});
  // The field is the message's leading identifier.
  size_t end = 0;
  while (end < e.message.size() &&
         (std::islower(static_cast<unsigned char>(e.message[end])) || e.message[end] == '_')) {
    ++end;
  }
  const bool named = end > 0 && end < e.message.size() &&
                     (e.message[end] == ':' || e.message[end] == '[' || e.message[end] == '.' ||
                      e.message[end] == ' ');
  if (named) e.param = e.message.substr(0, end);
  // A chat template's own refusal names no field: the conversation is at fault.
  if (chat && !named) e.param = "messages";
  return e;
}

std::string ErrorJson(const Error& error) {
  Json body = {{"error",
                {{"message", error.message},
                 {"type", error.type},
                 {"param", error.param.empty() ? Json(nullptr) : Json(error.param)},
                 {"code", error.code.empty() ? Json(nullptr) : Json(error.code)}}}};
  return Dump(body);
}

std::string ModelsJson(const std::string& id, int64_t created) {
  Json body = {
      {"object", "list"},
      {"data",
       Json::array(
           {{{"id", id}, {"object", "model"}, {"created", created}, {"owned_by", "switchyard"}}})}};
  return Dump(body);
}

const char* OpenAiFinishReason(FinishReason reason) {
  return reason == FinishReason::kLength ? "length" : "stop";
}

std::string NewResponseId(std::string_view prefix) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  std::string id(prefix);
  static constexpr char kHex[] = "0123456789abcdef";
  for (int i = 0; i < 24; ++i) id.push_back(kHex[rng() & 15]);
  return id;
}

namespace {

Json UsageJson(const Usage& usage) {
  return {{"prompt_tokens", usage.prompt_tokens},
          {"completion_tokens", usage.completion_tokens},
          {"total_tokens", usage.prompt_tokens + usage.completion_tokens}};
}

Json Bytes(const std::string& s) {
  Json bytes = Json::array();
  for (unsigned char c : s) bytes.push_back(static_cast<int>(c));
  return bytes;
}

Json LogprobsJson(Endpoint endpoint, const std::vector<TokenLogprob>* logprobs) {
  if (logprobs == nullptr) return nullptr;
  if (endpoint == Endpoint::kChatCompletions) {
    Json content = Json::array();
    for (const TokenLogprob& t : *logprobs) {
      Json top = Json::array();
      for (const auto& [token, lp] : t.top) {
        top.push_back({{"token", token}, {"logprob", lp}, {"bytes", Bytes(token)}});
      }
      content.push_back({{"token", t.token},
                         {"logprob", t.logprob},
                         {"bytes", Bytes(t.token)},
                         {"top_logprobs", top}});
    }
    return {{"content", content}, {"refusal", nullptr}};
  }
  Json tokens = Json::array(), token_logprobs = Json::array(), top_logprobs = Json::array(),
       offsets = Json::array();
  size_t offset = 0;
  for (const TokenLogprob& t : *logprobs) {
    tokens.push_back(t.token);
    token_logprobs.push_back(t.logprob);
    Json top = Json::object();
    for (const auto& [token, lp] : t.top) top[token] = lp;
    top_logprobs.push_back(top);
    offsets.push_back(offset);
    offset += t.token.size();
  }
  return {{"tokens", tokens},
          {"token_logprobs", token_logprobs},
          {"top_logprobs", top_logprobs},
          {"text_offset", offsets}};
}

Json Envelope(Endpoint endpoint, const ResponseHeader& header, bool chunk) {
  const char* object = endpoint == Endpoint::kCompletions ? "text_completion"
                       : chunk                            ? "chat.completion.chunk"
                                                          : "chat.completion";
  Json j = {
      {"id", header.id}, {"object", object}, {"created", header.created}, {"model", header.model}};
  return j;
}

}  // namespace

std::string CompletionJson(Endpoint endpoint, const ResponseHeader& header, const std::string& text,
                           FinishReason reason, const Usage& usage,
                           const std::vector<TokenLogprob>* logprobs) {
  Json j = Envelope(endpoint, header, /*chunk=*/false);
  Json choice = {{"index", 0}};
  if (endpoint == Endpoint::kCompletions) {
    choice["text"] = text;
  } else {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  }
  choice["logprobs"] = LogprobsJson(endpoint, logprobs);
  choice["finish_reason"] = OpenAiFinishReason(reason);
  j["choices"] = Json::array({choice});
  j["usage"] = UsageJson(usage);
  return Dump(j);
}

std::string ChunkJson(Endpoint endpoint, const ResponseHeader& header, const std::string& text,
                      const char* finish_reason, bool first,
                      const std::vector<TokenLogprob>* logprobs) {
  Json j = Envelope(endpoint, header, /*chunk=*/true);
  Json choice = {{"index", 0}};
  if (endpoint == Endpoint::kCompletions) {
    choice["text"] = text;
  } else {
    Json delta = Json::object();
    if (first) delta["role"] = "assistant";
    if (first || !text.empty()) delta["content"] = text;
    choice["delta"] = delta;
  }
  choice["logprobs"] = LogprobsJson(endpoint, logprobs);
  choice["finish_reason"] = finish_reason == nullptr ? Json(nullptr) : Json(finish_reason);
  j["choices"] = Json::array({choice});
  return Dump(j);
}

std::string UsageChunkJson(Endpoint endpoint, const ResponseHeader& header, const Usage& usage) {
  Json j = Envelope(endpoint, header, /*chunk=*/true);
  j["choices"] = Json::array();
  j["usage"] = UsageJson(usage);
  return Dump(j);
}

std::string SseEvent(const std::string& json) { return absl::StrCat("data: ", json, "\n\n"); }

}  // namespace switchyard::openai
