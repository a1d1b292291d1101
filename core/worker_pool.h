// A pool of worker threads that run submitted tasks in submission order:
// the expert server's compute workers (a fixed number, plus calls computed
// inline on the caller's thread while a worker would sit idle) and the
// ExpertBackend's layer-call threads (growing to the peak of calls in flight,
// so that no call waits behind another).
//
// Shutdown refuses new tasks, runs every task still queued, then joins the
// threads; nothing accepted is dropped.
//
// Thread-safety: every method may be called from any thread, except that
// Shutdown (and so the destructor) must not be called from one of the pool's
// own tasks (it would join its own thread).
#ifndef SWITCHYARD_CORE_WORKER_POOL_H_
#define SWITCHYARD_CORE_WORKER_POOL_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace switchyard {

struct WorkerPoolOptions {
  // Threads started by the constructor. Default 1; may be 0 with
  // grow_when_busy.
  int threads = 1;
  // Whether a task submitted while no worker is idle starts one more thread,
  // so that tasks never wait behind each other and the threads number the
  // peak of tasks in flight at once. Default false: a fixed number of
  // threads; tasks beyond them wait in the queue.
  bool grow_when_busy = false;
};

class WorkerPool {
 public:
  explicit WorkerPool(WorkerPoolOptions options = {});
  // Shutdown().
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Queues `task` for a worker; false (and `task` is dropped unrun) once
  // Shutdown has begun. `then`, if given, runs on the same worker right
  // after `task`, once the worker counts as idle again: e.g. to make a
  // future ready, so that a caller that waits for it and submits again
  // finds that worker idle (with grow_when_busy: no thread is started).
  // Tasks must not throw.
  bool Submit(std::function<void()> task, std::function<void()> then = nullptr);

  // Claims a worker's share for running a task on the caller's own thread:
  // true (and counted as a running task until FinishInline) when nothing is
  // queued and fewer tasks run than there are threads; false otherwise (then
  // Submit it). Meant for a fixed pool: a claim makes a worker count as busy.
  bool TryStartInline();
  // Ends a claim of TryStartInline.
  void FinishInline();

  // Tasks waiting for a worker right now.
  int queued() const;
  // Threads started so far (with grow_when_busy: the peak of tasks in flight).
  int threads() const;

  // Refuses new tasks, runs every task still queued, then joins the
  // threads. Idempotent; a second caller returns once the threads are joined.
  void Shutdown();

 private:
  struct Task {
    std::function<void()> run;
    std::function<void()> then;
  };

  void StartThreadLocked();
  void Loop();

  const WorkerPoolOptions options_;
  mutable std::mutex mu_;
  std::condition_variable wake_;      // a task was queued, or stopping_
  std::deque<Task> queue_;            // guarded by mu_
  std::vector<std::thread> threads_;  // guarded by mu_ until stopping_, then Shutdown's
  int running_ = 0;                   // tasks running, on workers or inline; guarded by mu_
  bool stopping_ = false;             // guarded by mu_
  std::mutex join_mu_;                // serialises Shutdown's joins
};

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_WORKER_POOL_H_
