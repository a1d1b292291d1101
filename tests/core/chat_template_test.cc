// Chat templates rendered as Hugging Face transformers renders them: every
// reference in tests/data/chat-templates (references.json from the shared
// fixtures, extra-references.json from make_extra_references.py, both made
// with Python's jinja2), template loading, and bounds on hostile templates.
#include "core/chat_template.h"

#include <pthread.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace switchyard {
namespace {

using ::switchyard::testing::DataDir;
using ::switchyard::testing::MakeTempDir;
using ::switchyard::testing::ReadAll;
using ::switchyard::testing::WriteAll;

std::string TemplatesDir() { return DataDir() + "/chat-templates"; }

TEST(ChatTemplateReferences, EveryFixtureRenderingAndRefusal) {
  const nlohmann::ordered_json refs =
      nlohmann::ordered_json::parse(ReadAll(TemplatesDir() + "/references.json"));
  ASSERT_GT(refs["references"].size(), 0u);
  int texts = 0, errors = 0;
  for (const nlohmann::ordered_json& ref : refs["references"]) {
    const std::string name = ref["template"];
    const int conversation = ref["conversation"];
    const bool add_generation_prompt = ref["add_generation_prompt"];
    SCOPED_TRACE(name + " conversation " + std::to_string(conversation) +
                 (add_generation_prompt ? " with" : " without") + " generation prompt");
    auto tmpl = ChatTemplate::Compile(ReadAll(TemplatesDir() + "/" + name + ".jinja"));
    ASSERT_TRUE(tmpl.ok()) << tmpl.status();
    (*tmpl)->set_bos_token(refs["bos_token"]);
    (*tmpl)->set_eos_token(refs["eos_token"]);
    auto text = (*tmpl)->RenderChat(refs["conversations"][conversation], add_generation_prompt);
    if (ref.contains("text")) {
      ++texts;
      ASSERT_TRUE(text.ok()) << text.status();
      EXPECT_EQ(*text, ref["text"].get<std::string>());
    } else {
      ++errors;
      ASSERT_FALSE(text.ok()) << "rendered instead of refusing: " << *text;
      EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_EQ(text.status().message(), ref["error"].get<std::string>());
    }
  }
  EXPECT_GT(texts, 0);
  EXPECT_GT(errors, 0);
}

TEST(ChatTemplateReferences, EveryExtraConstructCase) {
  const nlohmann::ordered_json refs =
      nlohmann::ordered_json::parse(ReadAll(TemplatesDir() + "/extra-references.json"));
  ASSERT_GT(refs["cases"].size(), 30u);
  for (const nlohmann::ordered_json& c : refs["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    nlohmann::ordered_json variables = refs["variables"];
    if (c.contains("variables")) variables.update(c["variables"]);
    auto tmpl = ChatTemplate::Compile(c["template"].get<std::string>());
    absl::StatusOr<std::string> text =
        tmpl.ok() ? (*tmpl)->Render(variables) : absl::StatusOr<std::string>(tmpl.status());
    if (c.contains("text")) {
      ASSERT_TRUE(text.ok()) << text.status();
      EXPECT_EQ(*text, c["text"].get<std::string>());
      continue;
    }
    ASSERT_FALSE(text.ok()) << "rendered instead of failing: " << *text;
    EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument) << text.status();
    const std::string type = c["error_type"];
    // raise_exception, undefined values and Python type errors carry
    // jinja2's own message; syntax errors are worded our way (with a line).
    if (type == "TemplateError" || type == "UndefinedError" || type == "TypeError") {
      EXPECT_EQ(text.status().message(), c["error"].get<std::string>());
    }
  }
}

TEST(ChatTemplate, CompileOnceRenderManyFromThreads) {
  auto tmpl = ChatTemplate::Compile(ReadAll(TemplatesDir() + "/mixtral-instruct-system.jinja"));
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  (*tmpl)->set_bos_token("<s>");
  (*tmpl)->set_eos_token("</s>");
  const nlohmann::ordered_json messages = {{{"role", "system"}, {"content", "S"}},
                                           {{"role", "user"}, {"content", "U"}}};
  const std::string expected = "<s> [INST] S\n\nU [/INST]";
  std::vector<std::thread> threads;
  std::vector<int> good(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < 200; ++k) {
        auto text = (*tmpl)->RenderChat(messages, true);
        if (text.ok() && *text == expected) ++good[t];
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int g : good) EXPECT_EQ(g, 200);
}

TEST(ChatTemplate, GenerationBlockRendersItsBody) {
  auto tmpl = ChatTemplate::Compile(
      "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
      "{% endgeneration %}{% else %}[{{ m.content }}]{% endif %}{% endfor %}");
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  auto text = (*tmpl)->RenderChat(
      {{{"role", "user"}, {"content", "q"}}, {{"role", "assistant"}, {"content", "a"}}}, false);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "[q]a");
}

TEST(ChatTemplate, SyntaxErrorsNameTheLine) {
  for (const char* source :
       {"line one\n{% if x %}open", "{{ x ", "{% endfor %}", "{{ (1 }}", "{% for %}",
        "{% macro m( %}{% endmacro %}", "{{ 'unterminated }}", "{% raw %}x{% endraw %}"}) {
    SCOPED_TRACE(source);
    auto tmpl = ChatTemplate::Compile(source);
    ASSERT_FALSE(tmpl.ok());
    EXPECT_EQ(tmpl.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(tmpl.status().message().find("(line "), std::string::npos) << tmpl.status();
  }
  auto tmpl = ChatTemplate::Compile("a\nb\n{% if x %}open");
  EXPECT_NE(tmpl.status().message().find("line 3"), std::string::npos) << tmpl.status();
}

TEST(ChatTemplate, RaiseExceptionMessageIsExactlyTheStatusMessage) {
  auto tmpl = ChatTemplate::Compile("ok{{ raise_exception('Roles must alternate: ' ~ n) }}");
  ASSERT_TRUE(tmpl.ok());
  auto text = (*tmpl)->Render({{"n", 2}});
  ASSERT_FALSE(text.ok());
  EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(text.status().message(), "Roles must alternate: 2");
}

// String literals unescape as jinja2's (Python's unicode-escape): the
// one-character escapes, \x \u \U, octal, a line continuation, and an
// unknown escape kept as written; \U past U+10FFFF is a syntax error.
TEST(ChatTemplate, StringLiteralEscapesArePythons) {
  auto tmpl = ChatTemplate::Compile(
      "{{ \"a\\tb\\\\\\'\\\"\\a\\b\\f\\n\\r\\v|\\x41\\u00e9\\U0001F600\\101\\q|\\\nz\" }}");
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  auto text = (*tmpl)->Render(nlohmann::json::object());
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "a\tb\\'\"\a\b\f\n\r\v|A\u00e9\U0001F600A\\q|z");
  auto bad = ChatTemplate::Compile("{{ '\\U00110000' }}");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), ::testing::HasSubstr("\\U escape out of range"));
}

// Hostile templates end with an error quickly, never hang or exhaust memory.
TEST(ChatTemplate, HostileTemplatesHitLimits) {
  const struct {
    const char* name;
    const char* source;
  } cases[] = {
      {"nested loops",
       "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}"
       "{% endfor %}"},
      {"huge range", "{% for a in range(1000000000) %}{% endfor %}"},
      {"string repetition", "{{ 'x' * 1000000000 }}"},
      {"doubling",
       "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(100) %}"
       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"},
      {"huge output", "{% for a in range(100000) %}{{ 'y' * 1000 }}{% endfor %}"},
      {"list growth",
       "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}"
       "{% set ns.l = ns.l + ns.l %}{% endfor %}"},
      {"recursive macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"},
      {"nesting lists",
       "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
       "{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l }}"},
      {"nesting dicts",
       "{% set ns = namespace(d={}) %}{% for i in range(100000) %}"
       "{% set ns.d = dict(a=ns.d) %}{% endfor %}{{ ns.d | tojson }}"},
      {"scanning a big list",
       "{% set ns = namespace(l=range(100000) | list) %}"
       "{% for i in range(100000) %}{% set ns.l = ns.l %}{% endfor %}"},
      {"big string operations",
       "{% set s = 'x' * 4000000 %}{% for i in range(100000) %}"
       "{% if s | length > 0 and 'y' not in s %}{% endif %}{% endfor %}"},
      {"indented json", "{{ range(100000) | list | tojson(indent=1000) }}"},
      {"exponential macro",
       "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}"
       "{% endif %}{% endmacro %}{{ f(40) }}"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto tmpl = ChatTemplate::Compile(c.source);
    ASSERT_TRUE(tmpl.ok()) << tmpl.status();
    const auto start = std::chrono::steady_clock::now();
    auto text = (*tmpl)->Render(nlohmann::ordered_json::object());
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ASSERT_FALSE(text.ok()) << "rendered " << text->size() << " bytes";
    EXPECT_EQ(text.status().code(), absl::StatusCode::kResourceExhausted) << text.status();
    EXPECT_NE(text.status().message().find("limit"), std::string::npos) << text.status();
    std::printf("%s: %s (%.2f s)\n", c.name, std::string(text.status().message()).c_str(), seconds);
  }
}

// Python's integers are unbounded; ours are 64-bit and say so instead of
// wrapping.
TEST(ChatTemplate, IntegersAreCheckedNotWrapped) {
  const struct {
    const char* source;
    const char* text;  // nullptr: an integer overflow error
  } cases[] = {
      {"{{ (-1) ** 3 }} {{ 2 ** 62 }} {{ 3 ** 0 }} {{ (-2) ** 63 }}",
       "-1 4611686018427387904 1 -9223372036854775808"},
      {"{{ [1, 2, 3][1::9223372036854775807] }} {{ range(9223372036854775806, 9223372036854775807, "
       "9223372036854775807) | list }}",
       "[2] [9223372036854775806]"},
      {"{{ 9223372036854775807 + 1 }}", nullptr},
      {"{{ -9223372036854775807 - 2 }}", nullptr},
      {"{{ 4294967296 * 4294967296 }}", nullptr},
      {"{{ 2 ** 63 }}", nullptr},
      {"{{ -(-9223372036854775807 - 1) }}", nullptr},
      {"{{ (-9223372036854775807 - 1) // -1 }}", nullptr},
      {"{{ 1e300 | int }}", nullptr},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.source);
    auto tmpl = ChatTemplate::Compile(c.source);
    ASSERT_TRUE(tmpl.ok()) << tmpl.status();
    auto text = (*tmpl)->Render(nlohmann::ordered_json::object());
    if (c.text != nullptr) {
      ASSERT_TRUE(text.ok()) << text.status();
      EXPECT_EQ(*text, c.text);
    } else {
      ASSERT_FALSE(text.ok()) << *text;
      EXPECT_NE(text.status().message().find("integer overflow"), std::string::npos)
          << text.status();
    }
  }
}

TEST(ChatTemplate, NamespacesCannotHoldNamespaces) {
  for (const char* source : {"{% set ns = namespace() %}{% set ns.me = ns %}",
                             "{% set ns = namespace() %}{% set ns.l = [1, {'a': ns}] %}",
                             "{% set a = namespace() %}{% set b = namespace(x=a) %}",
                             "{% for x in [1] %}{% set ns = namespace() %}{% set ns.l = loop %}"
                             "{% endfor %}"}) {
    SCOPED_TRACE(source);
    auto tmpl = ChatTemplate::Compile(source);
    ASSERT_TRUE(tmpl.ok()) << tmpl.status();
    auto text = (*tmpl)->Render(nlohmann::ordered_json::object());
    EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument) << text.status();
  }
}

// The deepest render the limits allow fits in a 1 MiB thread stack (gRPC and
// HTTP server threads have at least that).
TEST(ChatTemplate, DeepestRenderFitsASmallStack) {
  std::string source = "{% macro f(n) %}";
  for (int k = 0; k < 30; ++k) source += "{% if true %}";
  source += "{{ ((((((((((f(n + 1))))))))))) }}";
  for (int k = 0; k < 30; ++k) source += "{% endif %}";
  source += "{% endmacro %}{{ f(0) }}";
  auto tmpl = ChatTemplate::Compile(source);
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  absl::Status result;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
#if defined(__SANITIZE_ADDRESS__)
  pthread_attr_setstacksize(&attr, 8 << 20);  // ASan frames are several times larger
#else
  pthread_attr_setstacksize(&attr, 1 << 20);
#endif
  struct Job {
    const ChatTemplate* tmpl;
    absl::Status* result;
  } job{tmpl->get(), &result};
  pthread_t thread;
  ASSERT_EQ(pthread_create(
                &thread, &attr,
                [](void* arg) -> void* {
                  auto* j = static_cast<Job*>(arg);
                  *j->result = j->tmpl->Render(nlohmann::ordered_json::object()).status();
                  return nullptr;
                },
                &job),
            0);
  pthread_join(thread, nullptr);
  pthread_attr_destroy(&attr);
  EXPECT_EQ(result.code(), absl::StatusCode::kResourceExhausted) << result;
}

TEST(ChatTemplate, DeepNestingIsACompileError) {
  const std::string parens = "{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}";
  auto tmpl = ChatTemplate::Compile(parens);
  ASSERT_FALSE(tmpl.ok());
  EXPECT_EQ(tmpl.status().code(), absl::StatusCode::kInvalidArgument);
  std::string ifs;
  for (int k = 0; k < 5000; ++k) ifs += "{% if true %}";
  for (int k = 0; k < 5000; ++k) ifs += "{% endif %}";
  tmpl = ChatTemplate::Compile(ifs);
  ASSERT_FALSE(tmpl.ok());
  EXPECT_NE(tmpl.status().message().find("nests too deeply"), std::string::npos);
  ChatTemplateLimits small;
  small.max_source_bytes = 10;
  EXPECT_FALSE(ChatTemplate::Compile("0123456789ab", small).ok());
}

TEST(ChatTemplate, SmallOutputLimitIsEnforced) {
  ChatTemplateLimits limits;
  limits.max_output_bytes = 16;
  auto tmpl = ChatTemplate::Compile("{% for m in messages %}{{ m.content }}{% endfor %}", limits);
  ASSERT_TRUE(tmpl.ok());
  EXPECT_TRUE((*tmpl)->RenderChat({{{"role", "user"}, {"content", "0123456789"}}}, false).ok());
  auto text = (*tmpl)->RenderChat({{{"role", "user"}, {"content", "0123456789"}},
                                   {{"role", "user"}, {"content", "0123456789"}}},
                                  false);
  EXPECT_EQ(text.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(TokenizerChatConfig, StringNamedListAndTokenObjects) {
  auto c = ParseTokenizerChatConfig(
      R"({"chat_template": "{{ bos_token }}", "bos_token": "<s>",
          "eos_token": {"content": "</s>", "lstrip": false}})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->chat_template, "{{ bos_token }}");
  EXPECT_EQ(c->bos_token, "<s>");
  EXPECT_EQ(c->eos_token, "</s>");

  c = ParseTokenizerChatConfig(
      R"({"chat_template": [{"name": "tool_use", "template": "T"},
                            {"name": "default", "template": "D"}]})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->chat_template, "D");
  EXPECT_FALSE(c->bos_token.has_value());

  c = ParseTokenizerChatConfig(R"({"chat_template": [{"name": "tool_use", "template": "T"}]})");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("default"), std::string::npos);
  EXPECT_FALSE(ParseTokenizerChatConfig(R"({"chat_template": 3})").ok());
  EXPECT_FALSE(ParseTokenizerChatConfig(R"({"bos_token": 3})").ok());
  EXPECT_FALSE(ParseTokenizerChatConfig("not json").ok());
  c = ParseTokenizerChatConfig(R"({"chat_template": null})");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->chat_template, "");
}

TEST(LoadChatTemplate, FromModelDirFromFileAndMissing) {
  const std::string dir = MakeTempDir();
  nlohmann::ordered_json config = {
      {"bos_token", {{"content", "<s>"}}},
      {"eos_token", "</s>"},
      {"chat_template", ReadAll(TemplatesDir() + "/mixtral-instruct-v0.1.jinja")}};
  WriteAll(dir + "/tokenizer_config.json", config.dump());
  const nlohmann::ordered_json messages = {{{"role", "user"}, {"content", "Hello!"}}};

  auto tmpl = LoadChatTemplate(dir, "");
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  auto text = (*tmpl)->RenderChat(messages, true);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "<s>[INST] Hello! [/INST]");

  // A file overrides the model's template; the tokens still come from the model.
  tmpl = LoadChatTemplate(dir, TemplatesDir() + "/chatml.jinja");
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  EXPECT_EQ((*tmpl)->bos_token(), "<s>");
  text = (*tmpl)->RenderChat(messages, true);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n");

  // A file alone: no special tokens (undefined, so they print as nothing).
  tmpl = LoadChatTemplate("", TemplatesDir() + "/mixtral-instruct-v0.1.jinja");
  ASSERT_TRUE(tmpl.ok());
  EXPECT_EQ(*(*tmpl)->RenderChat(messages, false), "[INST] Hello! [/INST]");

  // The demo model has no chat_template.
  auto missing = LoadChatTemplate(::switchyard::testing::TinyMixtralDir(), "");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("has no chat_template"), std::string::npos);
  EXPECT_EQ(LoadChatTemplate(dir, dir + "/nope.jinja").status().code(),
            absl::StatusCode::kNotFound);

  WriteAll(dir + "/bad.jinja", "{% if %}");
  auto bad = LoadChatTemplate("", dir + "/bad.jinja");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("bad.jinja"), std::string::npos) << bad.status();
}

}  // namespace
}  // namespace switchyard
