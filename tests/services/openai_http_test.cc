// The OpenAI-compatible HTTP API of an in-process gateway on the demo model,
// with a real HTTP client (cpp-httplib's): each endpoint, greedy text equal to
// the gRPC path's, SSE framing, errors (400/401/404/429/503) in OpenAI's
// shape, and a client that disconnects having its request cancelled and its
// KV cache freed.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "gateway/gateway_server.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/test_util.h"

namespace switchyard {
namespace {

using Json = nlohmann::json;

std::string TemplateFile() {
  return testing::DataDir() + "/chat-templates/mixtral-instruct-v0.1.jinja";
}

GatewayOptions BaseOptions() {
  GatewayOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.http_listen = "127.0.0.1:0";
  options.kv_cache_tokens = 8192;
  options.chat_template_file = TemplateFile();
  return options;
}

std::unique_ptr<Gateway> Start(const GatewayOptions& options) {
  auto gateway = Gateway::Start(options);
  EXPECT_TRUE(gateway.ok()) << gateway.status();
  return gateway.ok() ? *std::move(gateway) : nullptr;
}

int PortOf(const std::string& address) {
  int port = 0;
  EXPECT_TRUE(absl::SimpleAtoi(address.substr(address.rfind(':') + 1), &port)) << address;
  return port;
}

std::unique_ptr<httplib::Client> ClientFor(const Gateway& gateway) {
  auto client = std::make_unique<httplib::Client>("127.0.0.1", PortOf(gateway.http_address()));
  client->set_read_timeout(60, 0);
  return client;
}

// The data of each SSE event of `body`, checking the framing on the way.
std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> data;
  EXPECT_TRUE(body.size() >= 2 && body.substr(body.size() - 2) == "\n\n") << body;
  for (const std::string& event :
       std::vector<std::string>(absl::StrSplit(body, "\n\n", absl::SkipEmpty()))) {
    EXPECT_EQ(event.substr(0, 6), "data: ") << event;
    EXPECT_EQ(event.find('\n'), std::string::npos) << event;  // one line per event
    data.push_back(event.substr(6));
  }
  return data;
}

// The error object of a refused request, checking OpenAI's shape.
Json ErrorOf(const httplib::Result& r, int status) {
  EXPECT_TRUE(r) << "no response";
  if (!r) return Json();
  EXPECT_EQ(r->status, status) << r->body;
  EXPECT_EQ(r->get_header_value("Content-Type"), "application/json");
  Json j = Json::parse(r->body, nullptr, false);
  EXPECT_TRUE(j.is_object() && j.contains("error")) << r->body;
  if (!j.is_object() || !j.contains("error")) return Json();
  const Json& e = j["error"];
  for (const char* key : {"message", "type", "param", "code"}) {
    EXPECT_TRUE(e.contains(key)) << key << " missing: " << r->body;
  }
  EXPECT_TRUE(e["message"].is_string());
  EXPECT_TRUE(e["type"].is_string());
  return e;
}

class OpenAiHttpTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    gateway_ = Start(BaseOptions()).release();
    ASSERT_NE(gateway_, nullptr);
    stub_ = v1::GenerationService::NewStub(
                grpc::CreateChannel(gateway_->address(), grpc::InsecureChannelCredentials()))
                .release();
  }
  static void TearDownTestSuite() {
    delete stub_;
    delete gateway_;
  }

  // Greedy generation through gRPC, for comparison.
  static v1::GenerateResponse GrpcGenerate(v1::GenerateRequest request) {
    grpc::ClientContext context;
    v1::GenerateResponse response;
    grpc::Status status = stub_->Generate(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  static httplib::Result Post(const std::string& path, const Json& body) {
    return ClientFor(*gateway_)->Post(path.c_str(), body.dump(), "application/json");
  }

  static Gateway* gateway_;
  static v1::GenerationService::Stub* stub_;
};
Gateway* OpenAiHttpTest::gateway_ = nullptr;
v1::GenerationService::Stub* OpenAiHttpTest::stub_ = nullptr;

TEST_F(OpenAiHttpTest, ModelsListsTheServedModel) {
  httplib::Result r = ClientFor(*gateway_)->Get("/v1/models");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const Json j = Json::parse(r->body);
  EXPECT_EQ(j["object"], "list");
  ASSERT_EQ(j["data"].size(), 1u);
  EXPECT_EQ(j["data"][0]["id"], "tiny-mixtral");
}

TEST_F(OpenAiHttpTest, CompletionEqualsTheGrpcPathsGreedyText) {
  v1::GenerateRequest g;
  g.set_text("The capital of France is");
  g.mutable_stopping()->set_max_new_tokens(12);
  const v1::GenerateResponse expected = GrpcGenerate(g);
  ASSERT_FALSE(expected.text().empty());

  httplib::Result r = Post("/v1/completions", {{"model", "tiny-mixtral"},
                                               {"prompt", "The capital of France is"},
                                               {"max_tokens", 12},
                                               {"temperature", 0}});
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const Json j = Json::parse(r->body);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["model"], "tiny-mixtral");
  EXPECT_EQ(j["id"].get<std::string>().rfind("cmpl-", 0), 0u);
  EXPECT_EQ(j["choices"][0]["text"], expected.text());
  EXPECT_EQ(j["choices"][0]["finish_reason"],
            expected.finish_reason() == v1::FINISH_REASON_LENGTH ? "length" : "stop");
  EXPECT_EQ(j["usage"]["prompt_tokens"], expected.usage().prompt_tokens());
  EXPECT_EQ(j["usage"]["completion_tokens"], expected.usage().completion_tokens());
  EXPECT_EQ(j["usage"]["total_tokens"],
            expected.usage().prompt_tokens() + expected.usage().completion_tokens());

  // The same prompt as token ids generates the same.
  std::vector<int> ids(expected.prompt_token_ids().begin(), expected.prompt_token_ids().end());
  r = Post("/v1/completions",
           {{"model", "tiny-mixtral"}, {"prompt", ids}, {"max_tokens", 12}, {"temperature", 0}});
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(Json::parse(r->body)["choices"][0]["text"], expected.text());
}

TEST_F(OpenAiHttpTest, LogprobsEqualTheGrpcPaths) {
  v1::GenerateRequest g;
  g.set_text("Hello world");
  g.mutable_stopping()->set_max_new_tokens(6);
  g.set_return_logprobs(true);
  g.set_top_logprobs(2);
  const v1::GenerateResponse expected = GrpcGenerate(g);
  ASSERT_EQ(expected.logprobs_size(), 6);
  httplib::Result r = Post("/v1/completions", {{"model", "tiny-mixtral"},
                                               {"prompt", "Hello world"},
                                               {"max_tokens", 6},
                                               {"temperature", 0},
                                               {"logprobs", 2}});
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const Json lp = Json::parse(r->body)["choices"][0]["logprobs"];
  ASSERT_EQ(lp["token_logprobs"].size(), 6u) << lp;
  double max_diff = 0;
  std::string tokens;
  for (int i = 0; i < 6; ++i) {
    max_diff = std::max(
        max_diff, std::abs(lp["token_logprobs"][i].get<double>() - expected.logprobs(i).logprob()));
    EXPECT_EQ(lp["top_logprobs"][i].size(), 2u);
    tokens += lp["tokens"][i].get<std::string>();
  }
  // The same numbers (float, printed and parsed back).
  EXPECT_LE(max_diff, 1e-6) << "max diff " << max_diff;
  EXPECT_EQ(tokens, expected.text());  // the token texts spell the completion

  // Chat, streamed: a logprob per generated token across the chunks.
  r = Post("/v1/chat/completions",
           {{"model", "tiny-mixtral"},
            {"messages", Json::parse(R"([{"role":"user","content":"Hi"}])")},
            {"max_tokens", 5},
            {"temperature", 0},
            {"logprobs", true},
            {"top_logprobs", 1},
            {"stream", true}});
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  size_t count = 0;
  for (const std::string& event : SseData(r->body)) {
    if (event == "[DONE]") continue;
    const Json j = Json::parse(event);
    if (!j["choices"][0]["logprobs"].is_null()) {
      for (const Json& t : j["choices"][0]["logprobs"]["content"]) {
        EXPECT_LE(t["logprob"].get<double>(), 0.0);
        EXPECT_EQ(t["top_logprobs"].size(), 1u);
        ++count;
      }
    }
  }
  EXPECT_EQ(count, 5u);
}

TEST_F(OpenAiHttpTest, StopStringEndsWithFinishReasonStop) {
  v1::GenerateRequest g;
  g.set_text("Hello world");
  g.mutable_stopping()->set_max_new_tokens(12);
  const std::string full = GrpcGenerate(g).text();
  ASSERT_GE(full.size(), 6u);
  const std::string stop = full.substr(3, 3);  // something the greedy text contains
  httplib::Result r = Post("/v1/completions", {{"model", "tiny-mixtral"},
                                               {"prompt", "Hello world"},
                                               {"max_tokens", 12},
                                               {"temperature", 0},
                                               {"stop", stop}});
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const Json j = Json::parse(r->body);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["choices"][0]["text"], full.substr(0, full.find(stop)));
}

TEST_F(OpenAiHttpTest, ChatEqualsTheGrpcPathsGreedyText) {
  v1::GenerateRequest g;
  for (auto [role, content] :
       std::vector<std::pair<std::string, std::string>>{{"user", "What is the capital of France?"},
                                                        {"assistant", "Paris."},
                                                        {"user", "And of Italy?"}}) {
    v1::ChatMessage* m = g.add_messages();
    m->set_role(role);
    m->set_content(content);
  }
  g.mutable_stopping()->set_max_new_tokens(10);
  const v1::GenerateResponse expected = GrpcGenerate(g);
  ASSERT_FALSE(expected.text().empty());

  const Json messages = Json::parse(R"([{"role":"user","content":"What is the capital of France?"},
      {"role":"assistant","content":"Paris."},{"role":"user","content":"And of Italy?"}])");
  httplib::Result r = Post(
      "/v1/chat/completions",
      {{"model", "tiny-mixtral"}, {"messages", messages}, {"max_tokens", 10}, {"temperature", 0}});
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  Json j = Json::parse(r->body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["message"]["content"], expected.text());
  EXPECT_EQ(j["usage"]["prompt_tokens"], expected.usage().prompt_tokens());

  // Streamed: the deltas add up to the same text; the first names the
  // assistant; the last chunk has the finish reason, then usage, then [DONE].
  r = Post("/v1/chat/completions", {{"model", "tiny-mixtral"},
                                    {"messages", messages},
                                    {"max_tokens", 10},
                                    {"temperature", 0},
                                    {"stream", true},
                                    {"stream_options", {{"include_usage", true}}}});
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(r->get_header_value("Content-Type"), "text/event-stream");
  std::vector<std::string> events = SseData(r->body);
  ASSERT_GE(events.size(), 4u) << r->body;
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  for (size_t i = 0; i + 3 < events.size(); ++i) {
    j = Json::parse(events[i]);
    EXPECT_EQ(j["object"], "chat.completion.chunk");
    if (i == 0) EXPECT_EQ(j["choices"][0]["delta"]["role"], "assistant");
    EXPECT_TRUE(j["choices"][0]["finish_reason"].is_null());
    text += j["choices"][0]["delta"].value("content", "");
  }
  EXPECT_EQ(text, expected.text());
  j = Json::parse(events[events.size() - 3]);
  EXPECT_EQ(j["choices"][0]["finish_reason"],
            expected.finish_reason() == v1::FINISH_REASON_LENGTH ? "length" : "stop");
  j = Json::parse(events[events.size() - 2]);
  EXPECT_TRUE(j["choices"].empty());
  EXPECT_EQ(j["usage"]["completion_tokens"], expected.usage().completion_tokens());
}

TEST_F(OpenAiHttpTest, StreamedCompletionAddsUpToTheUnaryOne) {
  const Json body = {{"model", "tiny-mixtral"},
                     {"prompt", "Once upon a time"},
                     {"max_tokens", 20},
                     {"temperature", 0}};
  httplib::Result unary = Post("/v1/completions", body);
  ASSERT_TRUE(unary);
  ASSERT_EQ(unary->status, 200);
  Json streamed_body = body;
  streamed_body["stream"] = true;
  httplib::Result r = Post("/v1/completions", streamed_body);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  std::vector<std::string> events = SseData(r->body);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const Json j = Json::parse(events[i]);
    EXPECT_EQ(j["object"], "text_completion");
    EXPECT_FALSE(j.contains("usage"));  // only with stream_options.include_usage
    text += j["choices"][0]["text"].get<std::string>();
    if (i + 2 == events.size()) {
      EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
    } else {
      EXPECT_TRUE(j["choices"][0]["finish_reason"].is_null());
    }
  }
  EXPECT_EQ(text, Json::parse(unary->body)["choices"][0]["text"]);
}

TEST_F(OpenAiHttpTest, BadInputIs400NamingTheField) {
  Json e =
      ErrorOf(Post("/v1/completions", {{"model", "tiny-mixtral"}, {"prompt", "x"}, {"n", 2}}), 400);
  EXPECT_EQ(e["param"], "n");
  EXPECT_EQ(e["type"], "invalid_request_error");
  // Refused by the gRPC path's validation, said with OpenAI's names.
  e = ErrorOf(
      Post("/v1/completions", {{"model", "tiny-mixtral"}, {"prompt", "x"}, {"max_tokens", 100000}}),
      400);
  EXPECT_EQ(e["param"], "max_tokens");
  EXPECT_NE(e["message"].get<std::string>().find("max_tokens: 100000 is above the limit"),
            std::string::npos)
      << e;
  e = ErrorOf(Post("/v1/completions", {{"model", "tiny-mixtral"}, {"prompt", ""}}), 400);
  EXPECT_EQ(e["param"], "prompt");
  e = ErrorOf(Post("/v1/completions", {{"model", "tiny-mixtral"}, {"prompt", {1, 32000}}}), 400);
  EXPECT_EQ(e["message"], "prompt[1]: token id 32000 is outside the vocabulary [0, 32000)");
  // The chat template's own refusal.
  e = ErrorOf(
      Post("/v1/chat/completions",
           {{"model", "tiny-mixtral"}, {"messages", Json::parse(R"([{"role":"user","content":"a"},
                                                {"role":"user","content":"b"}])")}}),
      400);
  EXPECT_EQ(e["param"], "messages");
  EXPECT_NE(e["message"].get<std::string>().find("alternate"), std::string::npos) << e;
  // Not JSON at all.
  httplib::Result r = ClientFor(*gateway_)->Post("/v1/completions", "{", "application/json");
  e = ErrorOf(r, 400);
  EXPECT_EQ(e["param"], "body");
}

TEST_F(OpenAiHttpTest, UnknownModelAndRouteAre404) {
  Json e = ErrorOf(Post("/v1/completions", {{"model", "gpt-4"}, {"prompt", "x"}}), 404);
  EXPECT_EQ(e["code"], "model_not_found");
  EXPECT_EQ(e["param"], "model");
  e = ErrorOf(ClientFor(*gateway_)->Get("/v1/engines"), 404);
  EXPECT_EQ(e["code"], "unknown_url");
}

// A raw connection that sends `body` to `path` and reads until `marker`.
int SendRaw(const Gateway& gateway, const std::string& path, const std::string& body) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(PortOf(gateway.http_address()));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  const std::string request = "POST " + path +
                              " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              "Content-Length: " +
                              std::to_string(body.size()) + "\r\n\r\n" + body;
  EXPECT_EQ(send(fd, request.data(), request.size(), 0), static_cast<ssize_t>(request.size()));
  return fd;
}

// Waits for the scheduler to have nothing running and no cache in use.
bool WaitIdle(Gateway& gateway, int64_t cancelled_before) {
  for (int i = 0; i < 400; ++i) {
    SchedulerStats s = gateway.scheduler().Stats();
    if (s.running == 0 && s.waiting == 0 && s.kv_used_tokens == 0 &&
        s.requests_cancelled > cancelled_before) {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  return false;
}

TEST_F(OpenAiHttpTest, ClientDisconnectCancelsAndFreesTheCache) {
  // A request far longer than the test (about 4000 tokens), streamed: the
  // client reads the first event and goes away.
  const Json body = {{"model", "tiny-mixtral"},
                     {"prompt", "Hello"},
                     {"max_tokens", 4000},
                     {"temperature", 0},
                     {"stream", true}};
  int64_t before = gateway_->scheduler().Stats().requests_cancelled;
  int fd = SendRaw(*gateway_, "/v1/completions", body.dump());
  std::string got;
  char buf[4096];
  while (got.find("data: ") == std::string::npos) {
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    ASSERT_GT(n, 0) << got;
    got.append(buf, static_cast<size_t>(n));
  }
  EXPECT_NE(got.find("HTTP/1.1 200"), std::string::npos) << got;
  EXPECT_GT(gateway_->scheduler().Stats().kv_used_tokens, 0);
  close(fd);
  EXPECT_TRUE(WaitIdle(*gateway_, before)) << "streamed request not cancelled";

  // The same, unary: the client leaves before the answer.
  Json unary = body;
  unary["stream"] = false;
  before = gateway_->scheduler().Stats().requests_cancelled;
  fd = SendRaw(*gateway_, "/v1/completions", unary.dump());
  for (int i = 0; i < 3000 && gateway_->scheduler().Stats().running == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(gateway_->scheduler().Stats().running, 1);
  close(fd);
  EXPECT_TRUE(WaitIdle(*gateway_, before)) << "unary request not cancelled";
}

TEST(OpenAiHttpShutdown, UnfinishedStreamsEndWithAnErrorEvent) {
  std::unique_ptr<Gateway> gateway = Start(BaseOptions());
  ASSERT_NE(gateway, nullptr);
  const Json body = {{"model", "tiny-mixtral"},
                     {"prompt", "Hello"},
                     {"max_tokens", 4000},
                     {"temperature", 0},
                     {"stream", true}};
  int fd = SendRaw(*gateway, "/v1/completions", body.dump());
  timeval timeout{20, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  std::string got;
  char buf[4096];
  while (got.find("data: ") == std::string::npos) {
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    ASSERT_GT(n, 0) << got;
    got.append(buf, static_cast<size_t>(n));
  }
  // The drain's grace is far too short for 4000 tokens: the request is ended
  // with UNAVAILABLE, which the stream reports as its last event.
  gateway->Shutdown(absl::Milliseconds(200));
  while (got.find("\r\n0\r\n\r\n") == std::string::npos) {  // the chunked body's end
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  EXPECT_NE(got.find("data: {\"error\""), std::string::npos) << got.substr(got.size() - 400);
  EXPECT_NE(got.find("service_unavailable"), std::string::npos);
  EXPECT_NE(got.find("shutting down"), std::string::npos);
  EXPECT_EQ(got.find("[DONE]"), std::string::npos);
  EXPECT_NE(got.find("\r\n0\r\n\r\n"), std::string::npos) << "the stream was cut, not ended";
}

TEST(OpenAiHttpAuth, BearerTokenIsRequiredWhenConfigured) {
  const std::string dir = testing::MakeTempDir();
  testing::WriteAll(dir + "/tokens", "secret-token\n");
  GatewayOptions options = BaseOptions();
  options.auth_token_file = dir + "/tokens";
  std::unique_ptr<Gateway> gateway = Start(options);
  ASSERT_NE(gateway, nullptr);
  auto client = ClientFor(*gateway);
  const std::string body = R"({"model":"tiny-mixtral","prompt":"x","max_tokens":2})";
  Json e = ErrorOf(client->Post("/v1/completions", body, "application/json"), 401);
  EXPECT_EQ(e["code"], "invalid_api_key");
  EXPECT_EQ(e["message"].get<std::string>().find("secret"), std::string::npos);
  ErrorOf(client->Get("/v1/models"), 401);
  ErrorOf(client->Post("/v1/completions", {{"Authorization", "Bearer wrong"}}, body,
                       "application/json"),
          401);
  httplib::Result r = client->Post("/v1/completions", {{"Authorization", "Bearer secret-token"}},
                                   body, "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  r = client->Get("/v1/models", {{"Authorization", "Bearer secret-token"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
}

TEST(OpenAiHttpLoad, FullQueueIs429AndDrainingIs503) {
  GatewayOptions options = BaseOptions();
  options.scheduler.max_running = 1;
  options.scheduler.max_queue = 1;
  std::unique_ptr<Gateway> gateway = Start(options);
  ASSERT_NE(gateway, nullptr);
  const Json long_request = {{"model", "tiny-mixtral"},
                             {"prompt", "Hello"},
                             {"max_tokens", 4000},
                             {"temperature", 0},
                             {"stream", true}};
  // One running, one waiting: the queue is full.
  int running = SendRaw(*gateway, "/v1/completions", long_request.dump());
  for (int i = 0; i < 3000 && gateway->scheduler().Stats().running == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  int waiting = SendRaw(*gateway, "/v1/completions", long_request.dump());
  for (int i = 0; i < 3000 && gateway->scheduler().Stats().waiting == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(gateway->scheduler().Stats().waiting, 1);
  auto client = ClientFor(*gateway);
  Json e = ErrorOf(
      client->Post("/v1/completions", R"({"model":"tiny-mixtral","prompt":"x","max_tokens":2})",
                   "application/json"),
      429);
  EXPECT_EQ(e["code"], "rate_limit_exceeded");
  close(waiting);
  close(running);

  // Draining: new requests are refused with 503.
  gateway->scheduler().StopAdmitting();
  e = ErrorOf(
      client->Post("/v1/completions", R"({"model":"tiny-mixtral","prompt":"x","max_tokens":2})",
                   "application/json"),
      503);
  EXPECT_EQ(e["type"], "server_error");
}

}  // namespace
}  // namespace switchyard
