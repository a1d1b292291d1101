#include "expert_service/expert_backend.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <numeric>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu_ops.h"

namespace switchyard {

absl::Status ExpertBackend::RunLayerPerBatch(int layer, absl::Span<const ExpertBatch> batches,
                                             std::vector<absl::Status>* batch_status) {
  batch_status->assign(batches.size(), absl::OkStatus());
  return RunLayer(layer, batches);
}

// The default StartLayerPerBatch's threads: a queue of calls and workers
// that sleep on a condition variable while it is empty. A call posted when
// no worker is idle starts one more, so the workers number the peak of
// calls in flight at once (a couple of micro-batches per model runner) and
// a call never waits behind another (which would undo the overlap). A worker
// counts as idle again before it makes its call's future ready, so a caller
// that waits for its calls and then posts the next ones finds it idle.
// Thread-safety: Post and threads() from any thread.
class ExpertBackend::CallWorkers {
 public:
  CallWorkers() = default;
  // Runs what is still queued (nothing, if every future was waited on), then
  // joins the workers.
  ~CallWorkers() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
  }

  std::future<absl::Status> Post(std::function<absl::Status()> run) {
    Call call{std::move(run), {}};
    std::future<absl::Status> result = call.done.get_future();
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(call));
    if (queue_.size() > static_cast<size_t>(idle_)) {
      threads_.emplace_back([this] { Loop(); });
    } else {
      wake_.notify_one();
    }
    return result;
  }

  int threads() const {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(threads_.size());
  }

 private:
  struct Call {
    std::function<absl::Status()> run;
    std::promise<absl::Status> done;
  };

  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    ++idle_;
    while (true) {
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      --idle_;
      if (queue_.empty()) return;  // stopping, and nothing left to run
      Call call = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      absl::Status status;
      std::exception_ptr error;
      try {
        status = call.run();
      } catch (...) {  // as std::async would: the caller's get() rethrows
        error = std::current_exception();
      }
      lock.lock();
      ++idle_;
      lock.unlock();
      if (error) {
        call.done.set_exception(error);
      } else {
        call.done.set_value(std::move(status));
      }
      lock.lock();
    }
  }

  mutable std::mutex mu_;
  std::condition_variable wake_;  // a call was queued, or stopping_
  std::deque<Call> queue_;
  std::vector<std::thread> threads_;
  int idle_ = 0;  // workers not running a call
  bool stopping_ = false;
};

ExpertBackend::ExpertBackend() = default;

ExpertBackend::~ExpertBackend() {
  std::unique_ptr<CallWorkers> workers;
  {
    std::lock_guard<std::mutex> lock(workers_mu_);
    workers = std::move(workers_);
  }
  workers.reset();  // joins outside the lock
}

std::future<absl::Status> ExpertBackend::StartLayerPerBatch(
    int layer, std::vector<ExpertBatch> batches, std::vector<absl::Status>* batch_status) {
  CallWorkers* workers;
  {
    std::lock_guard<std::mutex> lock(workers_mu_);
    if (workers_ == nullptr) workers_ = std::make_unique<CallWorkers>();
    workers = workers_.get();
  }
  return workers->Post([this, layer, batches = std::move(batches), batch_status] {
    return RunLayerPerBatch(layer, batches, batch_status);
  });
}

int ExpertBackend::layer_call_threads() const {
  std::lock_guard<std::mutex> lock(workers_mu_);
  return workers_ == nullptr ? 0 : workers_->threads();
}

LocalExpertBackend::LocalExpertBackend(const ExpertStore* store) : store_(store) {
  for (const auto& [layer, expert] : store_->Held()) {
    if (!store_->Find(layer, expert)->bf16_weights()) bf16_weights_ = false;
  }
}

bool LocalExpertBackend::RowsIndependentOfCount() const {
  return bf16_weights_ && cpu::RowsIndependentOfCount(/*bf16_weights=*/true);
}

absl::Status LocalExpertBackend::RunLayer(int layer, absl::Span<const ExpertBatch> batches) {
  const int count = static_cast<int>(batches.size());
  std::vector<const ExpertFfn*> ffns(count);
  for (int i = 0; i < count; ++i) {
    ffns[i] = store_->Find(layer, batches[i].expert);
    if (ffns[i] == nullptr) {
      return absl::NotFoundError(absl::StrCat("expert ", batches[i].expert, " of layer ", layer,
                                              " is not loaded in this process"));
    }
  }
  int threads = 1;
#ifdef _OPENMP
  if (!omp_in_parallel()) threads = std::min(count, omp_get_max_threads());
#endif
  if (threads <= 1) {
    for (int i = 0; i < count; ++i)
      ffns[i]->Forward(batches[i].input, batches[i].tokens, batches[i].output);
    return absl::OkStatus();
  }
  // Several experts: one OpenMP team takes whole experts (each Forward then
  // runs its products on one thread), so a layer costs one fork/join instead
  // of two per expert. Most tokens first, so the last expert picked is a
  // small one. Each output is bitwise what the expert computes alone.
  std::vector<int> order(count);  // batch indices, most tokens first
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return batches[a].tokens > batches[b].tokens; });
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int j = 0; j < count; ++j) {
    const ExpertBatch& b = batches[order[j]];
    ffns[order[j]]->Forward(b.input, b.tokens, b.output);
  }
  return absl::OkStatus();
}

std::string LocalExpertBackend::Describe() const {
  return "cpu (in-process, f32; " + cpu::KernelDescription() + ")";
}

}  // namespace switchyard
