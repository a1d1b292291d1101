// The restart policy of `switchyard up`: backoff doubling to a cap, and the
// crash-loop limit over a sliding window.
#include "cli/restart_policy.h"

#include <gtest/gtest.h>

namespace switchyard::cli {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

TEST(RestartPolicyTest, BackoffDoublesToTheCap) {
  RestartPolicy policy;  // 0.5 s doubling to 10 s
  EXPECT_EQ(BackoffDelay(policy, 0), milliseconds(500));
  EXPECT_EQ(BackoffDelay(policy, 1), milliseconds(1000));
  EXPECT_EQ(BackoffDelay(policy, 2), milliseconds(2000));
  EXPECT_EQ(BackoffDelay(policy, 4), milliseconds(8000));
  EXPECT_EQ(BackoffDelay(policy, 5), milliseconds(10000));
  EXPECT_EQ(BackoffDelay(policy, 1000), milliseconds(10000));  // no overflow
}

TEST(RestartPolicyTest, GivesUpAfterMaxRestartsWithinTheWindow) {
  RestartTracker tracker;  // 5 restarts within 60 s
  const auto t0 = RestartTracker::TimePoint{} + seconds(1000);
  for (int i = 0; i < 5; ++i) {
    RestartDecision d = tracker.OnExit(t0 + seconds(i));
    EXPECT_FALSE(d.give_up) << i;
    EXPECT_EQ(d.restarts_in_window, i + 1);
    EXPECT_EQ(d.delay, BackoffDelay(tracker.policy(), i));
  }
  RestartDecision d = tracker.OnExit(t0 + seconds(10));
  EXPECT_TRUE(d.give_up);
  EXPECT_EQ(d.restarts_in_window, 5);
}

TEST(RestartPolicyTest, OldRestartsLeaveTheWindowAndTheBackoffResets) {
  RestartTracker tracker;
  const auto t0 = RestartTracker::TimePoint{} + seconds(1000);
  for (int i = 0; i < 5; ++i) ASSERT_FALSE(tracker.OnExit(t0 + seconds(i)).give_up);
  // 60 s after the first restart it no longer counts: one slot is free.
  RestartDecision d = tracker.OnExit(t0 + seconds(60));
  EXPECT_FALSE(d.give_up);
  EXPECT_EQ(d.restarts_in_window, 5);
  // Long after all of them: a fresh start with the initial delay.
  d = tracker.OnExit(t0 + seconds(1000));
  EXPECT_FALSE(d.give_up);
  EXPECT_EQ(d.restarts_in_window, 1);
  EXPECT_EQ(d.delay, milliseconds(500));
}

TEST(RestartPolicyTest, ZeroMaxRestartsNeverRestarts) {
  RestartPolicy policy;
  policy.max_restarts = 0;
  RestartTracker tracker(policy);
  EXPECT_TRUE(tracker.OnExit(RestartTracker::TimePoint{} + seconds(5)).give_up);
}

}  // namespace
}  // namespace switchyard::cli
