#include "core/worker_pool.h"

#include <algorithm>
#include <utility>

namespace switchyard {

WorkerPool::WorkerPool(WorkerPoolOptions options) : options_(options) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int i = 0; i < options_.threads; ++i) StartThreadLocked();
}

WorkerPool::~WorkerPool() { Shutdown(); }

bool WorkerPool::Submit(std::function<void()> task, std::function<void()> then) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return false;
  queue_.push_back(Task{std::move(task), std::move(then)});
  const int idle = static_cast<int>(threads_.size()) - running_;
  if (options_.grow_when_busy && static_cast<int>(queue_.size()) > idle) {
    StartThreadLocked();  // it takes a task once started, no wake-up needed
  } else {
    wake_.notify_one();
  }
  return true;
}

bool WorkerPool::TryStartInline() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!queue_.empty() || running_ >= static_cast<int>(threads_.size())) return false;
  ++running_;
  return true;
}

void WorkerPool::FinishInline() {
  std::lock_guard<std::mutex> lock(mu_);
  --running_;
}

int WorkerPool::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(queue_.size());
}

int WorkerPool::threads() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(threads_.size());
}

void WorkerPool::Shutdown() {
  std::lock_guard<std::mutex> join_lock(join_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  // No thread is added once stopping_ is set, so threads_ is ours to walk.
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
}

void WorkerPool::StartThreadLocked() {
  threads_.emplace_back([this] { Loop(); });
}

void WorkerPool::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    // Drain the queue before exiting so every accepted task runs.
    if (queue_.empty()) return;
    Task task = std::move(queue_.front());
    queue_.pop_front();
    ++running_;
    lock.unlock();
    task.run();
    task.run = nullptr;  // its captures go before the lock is taken again
    lock.lock();
    --running_;
    if (task.then) {
      lock.unlock();
      task.then();
      task.then = nullptr;
      lock.lock();
    }
  }
}

}  // namespace switchyard
