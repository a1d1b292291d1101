// When `switchyard up` restarts a child process that died, and when it gives
// up: exponential backoff between restarts and a crash-loop limit. Pure logic
// on time points the caller passes in, so it is tested without sleeping.
#ifndef SWITCHYARD_CLI_RESTART_POLICY_H_
#define SWITCHYARD_CLI_RESTART_POLICY_H_

#include <chrono>
#include <deque>

namespace switchyard::cli {

struct RestartPolicy {
  // Delay before restarting after a crash with no other restart in `window`;
  // it doubles for each further restart in the window. Default 0.5 s.
  std::chrono::milliseconds initial_backoff{500};
  // The delay never exceeds this. Default 10 s.
  std::chrono::milliseconds max_backoff{10000};
  // A crash that would be restart number max_restarts + 1 within `window`
  // means the child is crash-looping: give up. 0 never restarts. Default 5.
  int max_restarts = 5;
  // Default 60 s.
  std::chrono::milliseconds window{60000};
};

// initial_backoff * 2^earlier_restarts, capped at max_backoff; earlier_restarts
// is the number of restarts already done within the window (>= 0).
std::chrono::milliseconds BackoffDelay(const RestartPolicy& policy, int earlier_restarts);

struct RestartDecision {
  bool give_up = false;
  // How long to wait before restarting (when !give_up).
  std::chrono::milliseconds delay{0};
  // Restarts within the window, counting this one (when !give_up), or the
  // restarts that were already there (when give_up).
  int restarts_in_window = 0;
};

// One child's restart history.
//
// Thread-safety: not thread-safe; one owner.
class RestartTracker {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;

  explicit RestartTracker(RestartPolicy policy = {}) : policy_(policy) {}

  // The child died at `now`: restart it after a delay, or give up. A restart
  // that is decided counts from `now`.
  RestartDecision OnExit(TimePoint now);

  const RestartPolicy& policy() const { return policy_; }

 private:
  RestartPolicy policy_;
  std::deque<TimePoint> restarts_;  // within the window, oldest first
};

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_RESTART_POLICY_H_
