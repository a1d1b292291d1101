// Load progress: Checkpoint's byte counting and the text LoadProgressMeter
// gives the servers to print.
#include "core/load_progress.h"

#include <chrono>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "gtest/gtest.h"

namespace switchyard {
namespace {

using std::chrono::milliseconds;
const std::string kFixture = std::string(SWITCHYARD_TEST_DATA_DIR) + "/tiny-mixtral";

TEST(LoadProgressTest, CheckpointCountsEachTensorOnceWhileACallbackIsSet) {
  auto checkpoint = Checkpoint::Open(kFixture);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  const std::vector<std::string>& names = (*checkpoint)->selected_tensors();
  ASSERT_GE(names.size(), 3u);
  std::vector<LoadProgress> reports;
  (*checkpoint)->SetLoadProgressCallback([&](const LoadProgress& p) { reports.push_back(p); });
  auto a = (*checkpoint)->View(names[0]);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE((*checkpoint)->ReadF32(names[0]).ok());  // the same tensor again: not counted
  auto b = (*checkpoint)->View(names[1]);
  ASSERT_TRUE(b.ok());
  ASSERT_EQ(reports.size(), 2u);
  EXPECT_EQ(reports[0].bytes_done, a->nbytes);
  EXPECT_EQ(reports[1].bytes_done, a->nbytes + b->nbytes);
  EXPECT_EQ(reports[1].bytes_total, (*checkpoint)->selected_bytes());
  EXPECT_FALSE(reports[1].finished);
  (*checkpoint)->SetLoadProgressCallback(nullptr);
  ASSERT_TRUE((*checkpoint)->View(names[2]).ok());  // no callback: not counted
  EXPECT_EQ(reports.size(), 2u);
  EXPECT_EQ((*checkpoint)->bytes_read(), a->nbytes + b->nbytes);
}

TEST(LoadProgressTest, LogLinesEveryIntervalOrTenPercentAndAFinalLine) {
  LoadProgressMeter meter("loading", /*terminal=*/false, std::chrono::seconds(2));
  const auto t0 = LoadProgressMeter::Clock::now();
  const uint64_t total = 1000 << 20;
  std::string first = meter.Update({10 << 20, total, false}, t0);
  EXPECT_NE(first.find("loading   1% 10.0 MiB / 1000.0 MiB"), std::string::npos) << first;
  EXPECT_EQ(first.back(), '\n');
  // Within the interval and the same tenth: nothing.
  EXPECT_EQ(meter.Update({50 << 20, total, false}, t0 + milliseconds(500)), "");
  // A new tenth: a line, even within the interval.
  EXPECT_NE(meter.Update({150 << 20, total, false}, t0 + milliseconds(600)), "");
  // The interval passed: a line, even in the same tenth.
  EXPECT_NE(meter.Update({160 << 20, total, false}, t0 + milliseconds(2700)), "");
  const std::string last = meter.Update({total, total, true}, t0 + milliseconds(3000));
  EXPECT_NE(last.find("100% 1000.0 MiB / 1000.0 MiB"), std::string::npos) << last;
  EXPECT_NE(last.find("/s"), std::string::npos) << last;
  EXPECT_NE(last.find("done\n"), std::string::npos) << last;
  EXPECT_EQ(last.find('\r'), std::string::npos) << last;
}

TEST(LoadProgressTest, TerminalRedrawsOneBarAndEndsTheLine) {
  LoadProgressMeter meter("loading", /*terminal=*/true);
  const auto t0 = LoadProgressMeter::Clock::now();
  const std::string bar = meter.Update({500, 1000, false}, t0);
  EXPECT_EQ(bar.rfind("\rloading [###############...............]  50%", 0), 0u) << bar;
  EXPECT_EQ(bar.find('\n'), std::string::npos);
  EXPECT_EQ(meter.Update({600, 1000, false}, t0 + milliseconds(10)), "");  // throttled
  const std::string last = meter.Update({1000, 1000, true}, t0 + milliseconds(20));
  EXPECT_EQ(last.front(), '\r');
  EXPECT_EQ(last.back(), '\n');
}

TEST(LoadProgressTest, HumanBytes) {
  EXPECT_EQ(HumanBytes(512), "512 B");
  EXPECT_EQ(HumanBytes(1536), "1.5 KiB");
  EXPECT_EQ(HumanBytes(3ull << 30), "3.0 GiB");
}

}  // namespace
}  // namespace switchyard
