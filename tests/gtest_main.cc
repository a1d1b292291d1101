// GoogleTest main for every suite. It differs from gtest_main in one way: a
// failed SetUpTestSuite fails the test binary. Stock GoogleTest then marks
// each test of the suite SKIPPED, which ctest (gtest_discover_tests' skip
// pattern) reports as skipped, hiding a broken fixture.
#include <cstdio>
#include <cstdlib>

#include "gtest/gtest.h"

namespace {

class FailedSuiteSetUpIsFatal : public ::testing::EmptyTestEventListener {
  void OnTestStart(const ::testing::TestInfo& info) override {
    const ::testing::TestSuite* suite = ::testing::UnitTest::GetInstance()->current_test_suite();
    if (suite == nullptr || !suite->ad_hoc_test_result().Failed()) return;
    std::printf("[  FAILED  ] %s.%s: %s::SetUpTestSuite failed (above), so the test cannot run\n",
                info.test_suite_name(), info.name(), info.test_suite_name());
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(1);
  }
};

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::UnitTest::GetInstance()->listeners().Append(new FailedSuiteSetUpIsFatal);
  return RUN_ALL_TESTS();
}
