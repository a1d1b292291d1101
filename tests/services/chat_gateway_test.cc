// `messages` prompts over real gRPC, against in-process gateways on the demo
// model: one started with --chat-template (Mixtral-Instruct's template), one
// without a template. A conversation generates exactly what its rendering
// sent as token ids generates; the rendering carries one BOS (the template's);
// template refusals and missing templates are clear errors.
#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "core/chat_template.h"
#include "core/tokenizer.h"
#include "gateway/gateway_server.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/test_util.h"

namespace switchyard {
namespace {

std::string TemplateFile() {
  return testing::DataDir() + "/chat-templates/mixtral-instruct-v0.1.jinja";
}

std::unique_ptr<Gateway> StartGateway(const std::string& chat_template_file) {
  GatewayOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.kv_cache_tokens = 4096;
  options.chat_template_file = chat_template_file;
  auto gateway = Gateway::Start(options);
  EXPECT_TRUE(gateway.ok()) << gateway.status();
  return gateway.ok() ? *std::move(gateway) : nullptr;
}

std::unique_ptr<v1::GenerationService::Stub> StubFor(const Gateway& gateway) {
  return v1::GenerationService::NewStub(
      grpc::CreateChannel(gateway.address(), grpc::InsecureChannelCredentials()));
}

void AddMessage(v1::GenerateRequest* r, const std::string& role, const std::string& content) {
  v1::ChatMessage* m = r->add_messages();
  m->set_role(role);
  m->set_content(content);
}

v1::GenerateRequest Conversation() {
  v1::GenerateRequest r;
  AddMessage(&r, "user", "What is the capital of France?");
  AddMessage(&r, "assistant", "Paris.");
  AddMessage(&r, "user", "And of Italy?");
  r.mutable_stopping()->set_max_new_tokens(12);
  r.mutable_stopping()->set_ignore_eos(true);
  return r;
}

std::vector<int32_t> Ids(const google::protobuf::RepeatedField<int32_t>& ids) {
  return std::vector<int32_t>(ids.begin(), ids.end());
}

TEST(ChatGateway, MessagesGenerateWhatTheRenderedTokenIdsGenerate) {
  std::unique_ptr<Gateway> gateway = StartGateway(TemplateFile());
  ASSERT_NE(gateway, nullptr);
  auto stub = StubFor(*gateway);

  // The rendering, as transformers' apply_chat_template makes it.
  auto tmpl = LoadChatTemplate(testing::TinyMixtralDir(), TemplateFile());
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  const v1::GenerateRequest conversation = Conversation();
  for (const v1::ChatMessage& m : conversation.messages()) {
    messages.push_back({{"role", m.role()}, {"content", m.content()}});
  }
  auto text = (*tmpl)->RenderChat(messages, true);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text,
            "<s>[INST] What is the capital of France? [/INST]Paris.</s>[INST] And of Italy? "
            "[/INST]");
  auto tokenizer = Tokenizer::FromDir(testing::TinyMixtralDir());
  ASSERT_TRUE(tokenizer.ok());
  const std::vector<int32_t> rendered_ids = (*tokenizer)->Encode(*text, false);
  ASSERT_GE(rendered_ids.size(), 2u);
  EXPECT_EQ(rendered_ids[0], (*tokenizer)->bos_id());
  EXPECT_NE(rendered_ids[1], (*tokenizer)->bos_id()) << "a second BOS";

  v1::GenerateResponse chat;
  {
    grpc::ClientContext ctx;
    grpc::Status status = stub->Generate(&ctx, Conversation(), &chat);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  EXPECT_EQ(Ids(chat.prompt_token_ids()), rendered_ids);
  EXPECT_EQ(chat.usage().prompt_tokens(), rendered_ids.size());
  EXPECT_EQ(chat.token_ids_size(), 12);

  v1::GenerateRequest by_ids = Conversation();
  by_ids.clear_messages();
  for (int32_t id : rendered_ids) by_ids.mutable_token_ids()->add_ids(id);
  v1::GenerateResponse direct;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->Generate(&ctx, by_ids, &direct).ok());
  }
  EXPECT_EQ(Ids(chat.token_ids()), Ids(direct.token_ids()));
  EXPECT_EQ(chat.text(), direct.text());

  // Streaming takes the same prompt form.
  grpc::ClientContext ctx;
  auto reader = stub->GenerateStream(&ctx, Conversation());
  v1::GenerateStreamResponse m;
  std::vector<int32_t> streamed;
  while (reader->Read(&m))
    streamed.insert(streamed.end(), m.token_ids().begin(), m.token_ids().end());
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(streamed, Ids(direct.token_ids()));
  gateway->Shutdown(absl::Seconds(1));
}

TEST(ChatGateway, RefusalsAndBadRequestsAreInvalidArgument) {
  std::unique_ptr<Gateway> gateway = StartGateway(TemplateFile());
  ASSERT_NE(gateway, nullptr);
  auto stub = StubFor(*gateway);
  auto call = [&](const v1::GenerateRequest& r) {
    v1::GenerateResponse response;
    grpc::ClientContext ctx;
    return stub->Generate(&ctx, r, &response);
  };

  // The template's own raise_exception message, unchanged.
  v1::GenerateRequest assistant_first;
  AddMessage(&assistant_first, "assistant", "I speak first.");
  grpc::Status s = call(assistant_first);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(),
            "Conversation roles must alternate user/assistant/user/assistant/...");

  v1::GenerateRequest tool;
  AddMessage(&tool, "user", "tool?");
  AddMessage(&tool, "tool", "42");
  s = call(tool);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "Only user and assistant roles are supported!");

  // Prompt forms are mutually exclusive.
  v1::GenerateRequest both = Conversation();
  both.set_text("Hello");
  s = call(both);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("only one of text, token_ids and messages"), std::string::npos)
      << s.error_message();

  v1::GenerateRequest none;
  s = call(none);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("messages"), std::string::npos) << s.error_message();

  // Still serving.
  v1::GenerateRequest ok = Conversation();
  EXPECT_TRUE(call(ok).ok());
  gateway->Shutdown(absl::Seconds(1));
}

TEST(ChatGateway, WithoutATemplateMessagesAreAFailedPrecondition) {
  // The demo model's tokenizer_config.json has no chat_template.
  std::unique_ptr<Gateway> gateway = StartGateway("");
  ASSERT_NE(gateway, nullptr);
  auto stub = StubFor(*gateway);
  v1::GenerateResponse response;
  grpc::ClientContext ctx;
  grpc::Status s = stub->Generate(&ctx, Conversation(), &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("--chat-template"), std::string::npos) << s.error_message();
  gateway->Shutdown(absl::Seconds(1));
}

TEST(ChatGateway, AChatTemplateFlagThatDoesNotLoadStopsStartUp) {
  const std::string dir = testing::MakeTempDir();
  testing::WriteAll(dir + "/broken.jinja", "{% for m in messages %}");
  GatewayOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.kv_cache_tokens = 1024;
  options.chat_template_file = dir + "/broken.jinja";
  auto gateway = Gateway::Start(options);
  ASSERT_FALSE(gateway.ok());
  EXPECT_NE(gateway.status().message().find("broken.jinja"), std::string::npos) << gateway.status();
  options.chat_template_file = dir + "/missing.jinja";
  gateway = Gateway::Start(options);
  ASSERT_FALSE(gateway.ok());
  EXPECT_EQ(gateway.status().code(), absl::StatusCode::kNotFound) << gateway.status();
}

}  // namespace
}  // namespace switchyard
