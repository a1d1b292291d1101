#include "core/worker_pool.h"

#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace switchyard {
namespace {

using std::chrono::seconds;

// Blocks the tasks that wait on it until Open().
class Gate {
 public:
  void Wait() { opened_.wait(); }
  void Open() { promise_.set_value(); }

 private:
  std::promise<void> promise_;
  std::shared_future<void> opened_ = promise_.get_future().share();
};

TEST(WorkerPoolTest, OneThreadRunsTasksInSubmissionOrder) {
  std::vector<int> order;
  std::mutex mu;
  {
    WorkerPool pool({.threads = 1});
    for (int i = 0; i < 100; ++i) {
      ASSERT_TRUE(pool.Submit([&, i] {
        std::lock_guard<std::mutex> lock(mu);
        order.push_back(i);
      }));
    }
  }  // the destructor runs what is queued
  ASSERT_EQ(order.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(order[i], i);
}

TEST(WorkerPoolTest, ShutdownRunsEveryQueuedTaskThenRefusesNewOnes) {
  WorkerPool pool({.threads = 1});
  Gate gate;
  std::atomic<int> ran{0};
  ASSERT_TRUE(pool.Submit([&] { gate.Wait(); }));
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(pool.Submit([&] { ++ran; }));
  // The first task holds the only worker, so the others wait in the queue
  // (the worker may not have taken the first one yet: 5 or 6 queued).
  EXPECT_GE(pool.queued(), 5);
  std::thread stopper([&] { pool.Shutdown(); });
  // Shutdown refuses new work at once, before the queue is drained.
  while (pool.Submit([&] { ran += 100; })) {
    std::this_thread::yield();
  }
  gate.Open();
  stopper.join();
  // Every accepted task ran, and none after shutdown began, except those
  // the loop above got in before it (each adds 100).
  EXPECT_EQ(ran.load() % 100, 5);
  EXPECT_EQ(pool.queued(), 0);
  EXPECT_FALSE(pool.Submit([] {}));
  pool.Shutdown();  // idempotent
}

TEST(WorkerPoolTest, FixedPoolRunsAtMostItsThreadsAtOnce) {
  WorkerPool pool({.threads = 3});
  std::atomic<int> running{0};
  std::atomic<int> peak{0};
  Gate gate;
  for (int i = 0; i < 12; ++i) {
    ASSERT_TRUE(pool.Submit([&] {
      const int now = ++running;
      int seen = peak.load();
      while (now > seen && !peak.compare_exchange_weak(seen, now)) {
      }
      gate.Wait();
      --running;
    }));
  }
  while (running.load() < 3) std::this_thread::yield();
  EXPECT_EQ(pool.queued(), 9);  // the other tasks wait for a worker
  gate.Open();
  pool.Shutdown();
  EXPECT_EQ(peak.load(), 3);
  EXPECT_EQ(pool.threads(), 3);
}

TEST(WorkerPoolTest, InlineClaimOnlyWhileAWorkerWouldBeIdle) {
  WorkerPool pool({.threads = 2});
  ASSERT_TRUE(pool.TryStartInline());
  ASSERT_TRUE(pool.TryStartInline());
  EXPECT_FALSE(pool.TryStartInline());  // both threads' shares claimed
  // The claims run on their callers' threads: the workers still take what
  // is submitted.
  std::promise<void> ran;
  ASSERT_TRUE(pool.Submit([] {}, [&] { ran.set_value(); }));  // then: after it counts as done
  EXPECT_EQ(ran.get_future().wait_for(seconds(30)), std::future_status::ready);
  pool.FinishInline();
  EXPECT_TRUE(pool.TryStartInline());  // the share given back
  pool.FinishInline();
  pool.FinishInline();
  // Something queued: no claim even with idle threads.
  Gate gate;
  ASSERT_TRUE(pool.Submit([&] { gate.Wait(); }));
  ASSERT_TRUE(pool.Submit([&] { gate.Wait(); }));
  while (pool.queued() > 0) std::this_thread::yield();
  EXPECT_FALSE(pool.TryStartInline());  // both workers busy
  ASSERT_TRUE(pool.Submit([] {}));
  EXPECT_FALSE(pool.TryStartInline());  // and one queued
  gate.Open();
  pool.Shutdown();  // before `gate` goes
}

TEST(WorkerPoolTest, GrowingPoolStartsAThreadPerConcurrentTask) {
  WorkerPool pool({.threads = 0, .grow_when_busy = true});
  EXPECT_EQ(pool.threads(), 0);
  Gate gate;
  std::atomic<int> started{0};
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(pool.Submit([&] {
      ++started;
      gate.Wait();
    }));
  }
  // No task waits behind another: all four run at once.
  while (started.load() < 4) std::this_thread::yield();
  EXPECT_EQ(pool.threads(), 4);
  gate.Open();
  pool.Shutdown();  // before `gate` goes
}

TEST(WorkerPoolTest, ThenRunsAfterTheWorkerIsIdleSoWaitAndResubmitStartsNoThread) {
  WorkerPool pool({.threads = 0, .grow_when_busy = true});
  for (int round = 0; round < 50; ++round) {
    std::vector<std::future<int>> results;
    for (int i = 0; i < 2; ++i) {
      auto done = std::make_shared<std::promise<int>>();
      results.push_back(done->get_future());
      ASSERT_TRUE(pool.Submit([] {}, [done, i] { done->set_value(i); }));
    }
    for (int i = 0; i < 2; ++i) EXPECT_EQ(results[i].get(), i);
  }
  // The peak of tasks in flight was 2 in every round.
  EXPECT_LE(pool.threads(), 2);
}

TEST(WorkerPoolTest, ManyProducersEveryTaskRunsOnce) {
  constexpr int kProducers = 8;
  constexpr int kTasks = 2000;
  std::vector<std::atomic<int>> runs(kProducers * kTasks);
  {
    WorkerPool pool({.threads = 4});
    std::vector<std::thread> producers;
    for (int p = 0; p < kProducers; ++p) {
      producers.emplace_back([&, p] {
        for (int i = 0; i < kTasks; ++i) {
          EXPECT_TRUE(pool.Submit([&runs, index = p * kTasks + i] { ++runs[index]; }));
          if (i % 7 == 0 && pool.TryStartInline()) pool.FinishInline();
        }
      });
    }
    for (std::thread& t : producers) t.join();
  }
  for (const std::atomic<int>& r : runs) ASSERT_EQ(r.load(), 1);
}

}  // namespace
}  // namespace switchyard
