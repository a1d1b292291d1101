// A thread that calls a function every period until it is destroyed: the
// pollers of the gateway (the --experts file watcher, the expert DNS
// refresher).
//
// Thread-safety: constructed and destroyed on one thread; the destructor
// wakes the thread and joins it, waiting for a call in progress to return.
#ifndef SWITCHYARD_CORE_PERIODIC_THREAD_H_
#define SWITCHYARD_CORE_PERIODIC_THREAD_H_

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

namespace switchyard {

class PeriodicThread {
 public:
  // Calls `tick` every `period_ms` (at least 1), the first time one period
  // from now.
  PeriodicThread(int period_ms, std::function<void()> tick)
      : period_(std::max(period_ms, 1)), tick_(std::move(tick)) {
    thread_ = std::thread([this] {
      std::unique_lock<std::mutex> lock(mu_);
      while (!cv_.wait_for(lock, period_, [this] { return stop_; })) {
        lock.unlock();
        tick_();
        lock.lock();
      }
    });
  }
  ~PeriodicThread() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  PeriodicThread(const PeriodicThread&) = delete;
  PeriodicThread& operator=(const PeriodicThread&) = delete;

 private:
  const std::chrono::milliseconds period_;
  const std::function<void()> tick_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // guarded by mu_
  std::thread thread_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_PERIODIC_THREAD_H_
