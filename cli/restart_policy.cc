#include "cli/restart_policy.h"

#include <algorithm>

namespace switchyard::cli {

std::chrono::milliseconds BackoffDelay(const RestartPolicy& policy, int earlier_restarts) {
  std::chrono::milliseconds delay = policy.initial_backoff;
  for (int i = 0; i < earlier_restarts && delay < policy.max_backoff; ++i) delay *= 2;
  return std::min(delay, policy.max_backoff);
}

RestartDecision RestartTracker::OnExit(TimePoint now) {
  while (!restarts_.empty() && now - restarts_.front() >= policy_.window) restarts_.pop_front();
  RestartDecision decision;
  const int earlier = static_cast<int>(restarts_.size());
  if (earlier >= policy_.max_restarts) {
    decision.give_up = true;
    decision.restarts_in_window = earlier;
    return decision;
  }
  decision.delay = BackoffDelay(policy_, earlier);
  restarts_.push_back(now);
  decision.restarts_in_window = earlier + 1;
  return decision;
}

}  // namespace switchyard::cli
