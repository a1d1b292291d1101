// The flag parser and the shared --help/--version/unknown-flag front door.
#include "core/flags.h"

#include <string>
#include <vector>

#include "core/version.h"
#include "gtest/gtest.h"

namespace switchyard {
namespace {

const std::vector<FlagSpec>& Specs() {
  static const auto* specs = new std::vector<FlagSpec>{
      {"model", true, "required", "model directory"},
      {"port", true, "8080", "the port"},
      {"prompt", true, "", "the prompt"},
      {"json", false, "", "print JSON"},
  };
  return *specs;
}

TEST(FlagsTest, SpecParseTakesValuesBooleansAndEqualsForms) {
  auto f = Flags::Parse({"--model", "m", "--port=9", "--json", "--prompt", "-h"}, Specs());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->GetOr("model", ""), "m");
  EXPECT_EQ(*f->Int("port", 0), 9);
  EXPECT_EQ(f->GetOr("prompt", ""), "-h");  // A value, even when it looks like a flag.
  EXPECT_TRUE(f->Has("json"));
}

TEST(FlagsTest, SpecParseNamesUnknownFlagsAndMissingValues) {
  auto unknown = Flags::Parse({"--model", "m", "--bogus"}, Specs());
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("unknown flag --bogus"), std::string::npos);
  auto missing = Flags::Parse({"--model"}, Specs());
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("--model needs a value"), std::string::npos);
  // A boolean takes no separate value: the next word is an unexpected argument.
  EXPECT_FALSE(Flags::Parse({"--json", "yes"}, Specs()).ok());
}

TEST(FlagsTest, HelpTextListsEveryFlagWithMeaningAndDefault) {
  const std::string help = HelpText({"tool", "tool --model DIR", Specs(), "notes here\n"});
  EXPECT_NE(help.find("usage: tool --model DIR"), std::string::npos) << help;
  EXPECT_NE(help.find("--model VALUE"), std::string::npos) << help;
  EXPECT_NE(help.find("model directory (required)"), std::string::npos) << help;
  EXPECT_NE(help.find("the port (default: 8080)"), std::string::npos) << help;
  EXPECT_NE(help.find("the prompt (default: none)"), std::string::npos) << help;
  EXPECT_NE(help.find("print JSON (default: off)"), std::string::npos) << help;
  EXPECT_NE(help.find("--help, -h"), std::string::npos) << help;
  EXPECT_NE(help.find("--version"), std::string::npos) << help;
  EXPECT_NE(help.find("notes here"), std::string::npos) << help;
}

TEST(FlagsTest, HandleCommandLineAnswersHelpAndVersionWithZero) {
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--help"}, {"-h"}, {"--model", "m", "--help"}, {"--bogus", "-h"}}) {
    testing::internal::CaptureStdout();
    std::optional<int> code = HandleCommandLine("tool", "HELP TEXT\n", Specs(), args, nullptr);
    const std::string out = testing::internal::GetCapturedStdout();
    ASSERT_TRUE(code.has_value()) << args[0];
    EXPECT_EQ(*code, 0);
    EXPECT_EQ(out, "HELP TEXT\n");
  }
  testing::internal::CaptureStdout();
  std::optional<int> code = HandleCommandLine("tool", "HELP", Specs(), {"--version"}, nullptr);
  const std::string out = testing::internal::GetCapturedStdout();
  ASSERT_TRUE(code.has_value());
  EXPECT_EQ(*code, 0);
  EXPECT_EQ(out, std::string("tool ") + Version() + "\n");
}

TEST(FlagsTest, HandleCommandLineRejectsUnknownFlagsWithTwoAndAHint) {
  testing::internal::CaptureStderr();
  std::optional<int> code = HandleCommandLine("tool sub", "HELP", Specs(), {"--nope"}, nullptr);
  const std::string err = testing::internal::GetCapturedStderr();
  ASSERT_TRUE(code.has_value());
  EXPECT_EQ(*code, 2);
  EXPECT_EQ(err, "tool sub: unknown flag --nope\nsee tool sub --help\n");
}

TEST(FlagsTest, HandleCommandLinePassesParsedFlagsThrough) {
  Flags flags;
  // "-h" here is the value of --prompt, not a help request.
  std::optional<int> code =
      HandleCommandLine("tool", "HELP", Specs(), {"--prompt", "-h", "--model=m"}, &flags);
  EXPECT_FALSE(code.has_value());
  EXPECT_EQ(flags.GetOr("prompt", ""), "-h");
  EXPECT_EQ(flags.GetOr("model", ""), "m");
}

}  // namespace
}  // namespace switchyard
