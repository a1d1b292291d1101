// The OpenAI API's JSON mapping (gateway/openai_api.h) without sockets:
// request bodies onto GenerateRequest, refusals naming the field, gRPC-path
// errors as OpenAI error objects, and the response and chunk shapes.
#include "gateway/openai_api.h"

#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace switchyard::openai {
namespace {

using Json = nlohmann::json;

ParsedRequest MustParse(Endpoint endpoint, const std::string& body) {
  absl::StatusOr<ParsedRequest> parsed = ParseRequest(endpoint, body);
  EXPECT_TRUE(parsed.ok()) << body << ": " << parsed.status();
  return parsed.ok() ? *std::move(parsed) : ParsedRequest{};
}

// The message of the refusal of `body` (which must be refused).
std::string Refusal(Endpoint endpoint, const std::string& body) {
  absl::StatusOr<ParsedRequest> parsed = ParseRequest(endpoint, body);
  EXPECT_FALSE(parsed.ok()) << body << " was accepted";
  if (parsed.ok()) return "";
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << parsed.status();
  return std::string(parsed.status().message());
}

TEST(OpenAiApi, CompletionFieldsMapOntoTheGenerateRequest) {
  ParsedRequest p = MustParse(Endpoint::kCompletions,
                              R"({"model":"m","prompt":"Hello","max_tokens":7,"temperature":0,
                                  "top_p":0.5,"seed":42,"stop":["a","b"],"n":1,"stream":true,
                                  "stream_options":{"include_usage":true},"user":"u",
                                  "presence_penalty":0.5,"frequency_penalty":-0.5})");
  EXPECT_EQ(p.model, "m");
  EXPECT_TRUE(p.stream);
  EXPECT_TRUE(p.include_usage);
  EXPECT_FALSE(p.max_tokens_defaulted);
  const v1::GenerateRequest& r = p.request;
  EXPECT_EQ(r.text(), "Hello");
  EXPECT_EQ(r.stopping().max_new_tokens(), 7u);
  EXPECT_EQ(r.sampling().temperature(), 0.0f);
  EXPECT_FLOAT_EQ(r.sampling().top_p(), 0.5f);
  EXPECT_EQ(r.sampling().seed(), 42u);
  EXPECT_FLOAT_EQ(r.sampling().presence_penalty(), 0.5f);
  EXPECT_FLOAT_EQ(r.sampling().frequency_penalty(), -0.5f);
  ASSERT_EQ(r.stopping().stop_size(), 2);
  EXPECT_EQ(r.stopping().stop(1), "b");
}

TEST(OpenAiApi, DefaultsAreOpenAisNotTheProtos) {
  ParsedRequest p = MustParse(Endpoint::kCompletions, R"({"model":"m","prompt":"x"})");
  EXPECT_EQ(p.request.sampling().temperature(), 1.0f);      // the proto's default would be greedy
  EXPECT_FALSE(p.request.stopping().has_max_new_tokens());  // the gateway's default, 16
  EXPECT_FALSE(p.stream);
  // null is "the default" for every optional parameter.
  p = MustParse(Endpoint::kCompletions,
                R"({"model":"m","prompt":"x","temperature":null,"stop":null,"n":null})");
  EXPECT_EQ(p.request.sampling().temperature(), 1.0f);
  // Chat without max_tokens generates as much as fits (set once the prompt is known).
  p = MustParse(Endpoint::kChatCompletions,
                R"({"model":"m","messages":[{"role":"user","content":"x"}]})");
  EXPECT_TRUE(p.max_tokens_defaulted);
  p = MustParse(Endpoint::kChatCompletions,
                R"({"model":"m","messages":[{"role":"user","content":"x"}],
                    "max_completion_tokens":5})");
  EXPECT_FALSE(p.max_tokens_defaulted);
  EXPECT_EQ(p.request.stopping().max_new_tokens(), 5u);
}

TEST(OpenAiApi, PromptForms) {
  EXPECT_EQ(MustParse(Endpoint::kCompletions, R"({"model":"m","prompt":["one"]})").request.text(),
            "one");
  ParsedRequest ids = MustParse(Endpoint::kCompletions, R"({"model":"m","prompt":[1,2,3]})");
  ASSERT_EQ(ids.request.token_ids().ids_size(), 3);
  EXPECT_EQ(ids.request.token_ids().ids(2), 3);
  ids = MustParse(Endpoint::kCompletions, R"({"model":"m","prompt":[[5,6]]})");
  ASSERT_EQ(ids.request.token_ids().ids_size(), 2);
  EXPECT_EQ(ids.request.token_ids().ids(0), 5);
  EXPECT_EQ(MustParse(Endpoint::kCompletions, R"({"model":"m","prompt":"s","stop":"x"})")
                .request.stopping()
                .stop(0),
            "x");
}

TEST(OpenAiApi, LogprobsMapOntoReturnLogprobs) {
  ParsedRequest p = MustParse(Endpoint::kCompletions, R"({"model":"m","prompt":"x","logprobs":3})");
  EXPECT_TRUE(p.request.return_logprobs());
  EXPECT_EQ(p.request.top_logprobs(), 3u);
  p = MustParse(Endpoint::kCompletions, R"({"model":"m","prompt":"x","logprobs":0})");
  EXPECT_TRUE(p.request.return_logprobs());
  EXPECT_EQ(p.request.top_logprobs(), 0u);
  p = MustParse(Endpoint::kChatCompletions, R"({"model":"m","messages":[{"role":"user",
                "content":"x"}],"logprobs":true,"top_logprobs":2})");
  EXPECT_TRUE(p.request.return_logprobs());
  EXPECT_EQ(p.request.top_logprobs(), 2u);
  p = MustParse(Endpoint::kChatCompletions,
                R"({"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":false})");
  EXPECT_FALSE(p.request.return_logprobs());
}

TEST(OpenAiApi, LogprobsShapes) {
  const ResponseHeader h{"id", "m", 1};
  const std::vector<TokenLogprob> lps = {{" Hi", -0.5f, {{" Hi", -0.5f}, {"!", -1.5f}}},
                                         {"!", -0.25f, {{"!", -0.25f}, {"?", -2.0f}}}};
  Json j = Json::parse(
      CompletionJson(Endpoint::kCompletions, h, " Hi!", FinishReason::kLength, {1, 2}, &lps));
  EXPECT_EQ(j["choices"][0]["logprobs"],
            Json::parse(R"({"tokens":[" Hi","!"],"token_logprobs":[-0.5,-0.25],
                            "top_logprobs":[{" Hi":-0.5,"!":-1.5},{"!":-0.25,"?":-2.0}],
                            "text_offset":[0,3]})"));
  j = Json::parse(ChunkJson(Endpoint::kChatCompletions, h, " Hi!", nullptr, false, &lps));
  const Json& content = j["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 2u);
  EXPECT_EQ(content[0]["token"], " Hi");
  EXPECT_EQ(content[0]["logprob"], -0.5);
  EXPECT_EQ(content[0]["bytes"], Json::parse("[32,72,105]"));
  EXPECT_EQ(content[1]["top_logprobs"][1],
            Json::parse(R"({"token":"?","logprob":-2.0,"bytes":[63]})"));
  // Not requested: null.
  j = Json::parse(ChunkJson(Endpoint::kChatCompletions, h, "x", nullptr, false));
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
}

TEST(OpenAiApi, ChatMessagesMapOntoMessages) {
  ParsedRequest p = MustParse(Endpoint::kChatCompletions,
                              R"({"model":"m","messages":[{"role":"system","content":"be brief"},
          {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
          {"role":"assistant","content":null,"name":"bot"}]})");
  ASSERT_EQ(p.request.messages_size(), 3);
  EXPECT_EQ(p.request.messages(0).role(), "system");
  EXPECT_EQ(p.request.messages(0).content(), "be brief");
  EXPECT_EQ(p.request.messages(1).content(), "ab");
  EXPECT_EQ(p.request.messages(2).content(), "");
}

TEST(OpenAiApi, BadInputIsRefusedNamingTheField) {
  const Endpoint c = Endpoint::kCompletions, chat = Endpoint::kChatCompletions;
  EXPECT_EQ(Refusal(c, "{"),
            "body: not valid JSON (send a JSON object with Content-Type: application/json)");
  EXPECT_EQ(Refusal(c, "[1]"), "body: must be a JSON object, got an array");
  EXPECT_EQ(Refusal(c, R"({"prompt":"x"})"), "model: required: the id GET /v1/models lists");
  EXPECT_EQ(Refusal(c, R"({"model":"m"})"), "prompt: required");
  EXPECT_EQ(Refusal(chat, R"({"model":"m"})"), "messages: required");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","n":2})"),
            "n: only 1 is supported (one choice per request)");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","best_of":3})"),
            "best_of: only 1 is supported (one choice per request)");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","max_tokens":"9"})"),
            "max_tokens: must be an integer, got a string");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","max_tokens":1.5})"),
            "max_tokens: must be an integer, got a number");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","max_tokens":0})"),
            "max_tokens: must be at least 1, got 0");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","temperature":3})"),
            "temperature: must be in [0, 2], got 3");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","stream":"yes"})"),
            "stream: must be a boolean, got a string");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","stop":[1]})"),
            "stop[0]: must be a string, got a number");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":["a","b"]})"),
            "prompt: one prompt per request is supported, got 2");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":[1,-2]})"),
            "prompt[1]: token id -2 is outside the vocabulary");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","frobnicate":1})"),
            "frobnicate: unrecognized request argument");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","logprobs":true})"),
            "logprobs: must be an integer, got a boolean");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","logprobs":21})"),
            "logprobs: must be in [0, 20], got 21");
  EXPECT_EQ(Refusal(chat, R"({"model":"m","messages":[{"role":"user","content":"x"}],
              "top_logprobs":2})"),
            "top_logprobs: needs logprobs: true");
  EXPECT_EQ(Refusal(c, R"({"model":"m","prompt":"x","stream_options":{"include_usage":true}})"),
            "stream_options: only allowed with stream: true");
  EXPECT_EQ(Refusal(chat, R"({"model":"m","messages":[]})"), "messages: is empty");
  EXPECT_EQ(Refusal(chat, R"({"model":"m","messages":[{"content":"x"}]})"),
            "messages[0].role: must be a string");
  EXPECT_EQ(Refusal(chat, R"({"model":"m","messages":[{"role":"user","content":[
              {"type":"image_url","image_url":{}}]}]})"),
            "messages[0].content[0].type: 'image_url' is not supported (text parts only)");
  EXPECT_EQ(Refusal(chat, R"({"model":"m","messages":[{"role":"user","content":"x"}],
              "tools":[{"type":"function"}]})"),
            "tools: not supported by this gateway");
  // A chat body's `prompt` is not a chat parameter.
  EXPECT_EQ(Refusal(chat, R"({"model":"m","prompt":"x","messages":[{"role":"user"}]})"),
            "prompt: unrecognized request argument");
}

TEST(OpenAiApi, ValidationErrorsSayOpenAisFieldNames) {
  Error e = ErrorFromStatus(
      absl::InvalidArgumentError("stopping.max_new_tokens: 5000 is above the limit of 4095"),
      Endpoint::kCompletions);
  EXPECT_EQ(e.http_status, 400);
  EXPECT_EQ(e.type, "invalid_request_error");
  EXPECT_EQ(e.param, "max_tokens");
  EXPECT_EQ(e.message, "max_tokens: 5000 is above the limit of 4095");
  e = ErrorFromStatus(absl::InvalidArgumentError("stopping.max_new_tokens: prompt (9 tokens) plus "
                                                 "max_new_tokens (4095) exceeds the context"),
                      Endpoint::kChatCompletions);
  EXPECT_EQ(e.message, "max_tokens: prompt (9 tokens) plus max_tokens (4095) exceeds the context");
  e = ErrorFromStatus(absl::InvalidArgumentError("sampling.top_p must be in (0, 1], got 3"),
                      Endpoint::kCompletions);
  EXPECT_EQ(e.param, "top_p");
  EXPECT_EQ(e.message, "top_p must be in (0, 1], got 3");
  e = ErrorFromStatus(absl::InvalidArgumentError("stopping.stop[0]: stop string is empty"),
                      Endpoint::kCompletions);
  EXPECT_EQ(e.param, "stop");
  EXPECT_EQ(e.message, "stop[0]: stop string is empty");
  e = ErrorFromStatus(absl::InvalidArgumentError("text: prompt is empty"), Endpoint::kCompletions);
  EXPECT_EQ(e.param, "prompt");
  EXPECT_EQ(e.message, "prompt: prompt is empty");
  e = ErrorFromStatus(absl::InvalidArgumentError("token_ids.ids[1]: token id 99999 is outside"),
                      Endpoint::kCompletions);
  EXPECT_EQ(e.message, "prompt[1]: token id 99999 is outside");
  // A chat template's own refusal names no field: the conversation is at fault.
  e = ErrorFromStatus(
      absl::InvalidArgumentError("Conversation roles must alternate user/assistant"),
      Endpoint::kChatCompletions);
  EXPECT_EQ(e.param, "messages");
  EXPECT_EQ(e.message, "Conversation roles must alternate user/assistant");
  e = ErrorFromStatus(absl::FailedPreconditionError("messages: this gateway has no chat template"),
                      Endpoint::kChatCompletions);
  EXPECT_EQ(e.http_status, 400);
  EXPECT_EQ(e.param, "messages");
}

TEST(OpenAiApi, StatusCodesMapToHttpStatuses) {
  const Endpoint c = Endpoint::kCompletions;
  EXPECT_EQ(ErrorFromStatus(absl::UnauthenticatedError("x"), c).http_status, 401);
  EXPECT_EQ(ErrorFromStatus(absl::UnauthenticatedError("x"), c).code, "invalid_api_key");
  EXPECT_EQ(ErrorFromStatus(absl::NotFoundError("x"), c).http_status, 404);
  Error e = ErrorFromStatus(absl::ResourceExhaustedError("queue full"), c);
  EXPECT_EQ(e.http_status, 429);
  EXPECT_EQ(e.code, "rate_limit_exceeded");
  EXPECT_EQ(ErrorFromStatus(absl::UnavailableError("draining"), c).http_status, 503);
  EXPECT_EQ(ErrorFromStatus(absl::InternalError("x"), c).http_status, 500);
}

TEST(OpenAiApi, ErrorJsonIsOpenAisShape) {
  const Json j = Json::parse(ErrorJson({400, "invalid_request_error", "n: only 1", "n", ""}));
  EXPECT_EQ(j, Json::parse(R"({"error":{"message":"n: only 1","type":"invalid_request_error",
                                        "param":"n","code":null}})"));
}

TEST(OpenAiApi, ResponseShapes) {
  const ResponseHeader h{"cmpl-1", "m", 1700000000};
  Json j =
      Json::parse(CompletionJson(Endpoint::kCompletions, h, "hi", FinishReason::kLength, {3, 2}));
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["choices"][0]["text"], "hi");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"], Json::parse(R"({"prompt_tokens":3,"completion_tokens":2,
                                        "total_tokens":5})"));
  j = Json::parse(CompletionJson(Endpoint::kChatCompletions, h, "hi", FinishReason::kEos, {3, 2}));
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"], Json::parse(R"({"role":"assistant","content":"hi"})"));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(OpenAiFinishReason(FinishReason::kStopSequence), std::string("stop"));

  j = Json::parse(ChunkJson(Endpoint::kChatCompletions, h, "", nullptr, /*first=*/true));
  EXPECT_EQ(j["object"], "chat.completion.chunk");
  EXPECT_EQ(j["choices"][0]["delta"], Json::parse(R"({"role":"assistant","content":""})"));
  EXPECT_TRUE(j["choices"][0]["finish_reason"].is_null());
  j = Json::parse(ChunkJson(Endpoint::kChatCompletions, h, "", "stop", false));
  EXPECT_EQ(j["choices"][0]["delta"], Json::object());
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  j = Json::parse(ChunkJson(Endpoint::kCompletions, h, "x", nullptr, false));
  EXPECT_EQ(j["choices"][0]["text"], "x");
  j = Json::parse(UsageChunkJson(Endpoint::kCompletions, h, {1, 1}));
  EXPECT_TRUE(j["choices"].empty());
  EXPECT_EQ(j["usage"]["total_tokens"], 2);
  EXPECT_EQ(SseEvent("{}"), "data: {}\n\n");
  EXPECT_EQ(NewResponseId("cmpl-").size(), 5u + 24u);
  EXPECT_NE(NewResponseId("cmpl-"), NewResponseId("cmpl-"));
}

TEST(OpenAiApi, ModelsList) {
  const Json j = Json::parse(ModelsJson("tiny-mixtral", 5));
  EXPECT_EQ(j["object"], "list");
  ASSERT_EQ(j["data"].size(), 1u);
  EXPECT_EQ(j["data"][0]["id"], "tiny-mixtral");
  EXPECT_EQ(j["data"][0]["object"], "model");
}

}  // namespace
}  // namespace switchyard::openai
