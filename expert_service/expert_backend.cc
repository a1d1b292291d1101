#include "expert_service/expert_backend.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <exception>
#include <functional>
#include <memory>
#include <numeric>
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

// The default StartLayerPerBatch's threads grow to the peak of calls in
// flight at once (a couple of micro-batches per model runner), so a call
// never waits behind another (which would undo the overlap). A worker counts
// as idle again before it makes its call's future ready (WorkerPool's
// `then`), so a caller that waits for its calls and then starts the next
// ones finds it idle and no thread is started.
ExpertBackend::ExpertBackend() : layer_calls_({.threads = 0, .grow_when_busy = true}) {}

ExpertBackend::~ExpertBackend() = default;

std::future<absl::Status> ExpertBackend::StartLayerPerBatch(
    int layer, std::vector<ExpertBatch> batches, std::vector<absl::Status>* batch_status) {
  struct Call {
    std::promise<absl::Status> done;
    absl::Status status;
    std::exception_ptr error;
  };
  auto call = std::make_shared<Call>();
  std::future<absl::Status> result = call->done.get_future();
  auto run = [this, call, layer, batches = std::move(batches), batch_status] {
    try {
      call->status = RunLayerPerBatch(layer, batches, batch_status);
    } catch (...) {  // as std::async would: the caller's get() rethrows
      call->error = std::current_exception();
    }
  };
  auto finish = [call] {
    if (call->error) {
      call->done.set_exception(call->error);
    } else {
      call->done.set_value(std::move(call->status));
    }
  };
  if (!layer_calls_.Submit(std::move(run), std::move(finish))) {
    // Only while the backend is being destroyed, which no caller may overlap.
    call->done.set_value(absl::FailedPreconditionError("expert backend is shutting down"));
  }
  return result;
}

int ExpertBackend::layer_call_threads() const { return layer_calls_.threads(); }

LocalExpertBackend::LocalExpertBackend(const ExpertStore* store) : store_(store) {
  for (const auto& [layer, expert] : store_->Held()) {
    if (!store_->Find(layer, expert)->bf16_weights()) bf16_weights_ = false;
  }
}

bool LocalExpertBackend::RowsIndependentOfCount() const {
  return bf16_weights_ && cpu::RowsIndependentOfCount(/*bf16_weights=*/true);
}

namespace {

// A piece of a split layer: rows [begin, end) of expert `expert`'s product.
struct RowItem {
  int expert;
  int begin;
  int end;
};

// Rows [0, rows) in `blocks` pieces of whole `group`-row groups (one piece
// when group is 0: the product runs only whole).
void AddRowItems(int expert, int rows, int group, int blocks, std::vector<RowItem>* items) {
  if (group == 0 || blocks <= 1) {
    items->push_back({expert, 0, rows});
    return;
  }
  const int groups = (rows + group - 1) / group;
  blocks = std::min(blocks, groups);
  for (int i = 0; i < blocks; ++i) {
    const int begin =
        std::min(rows, static_cast<int>(static_cast<int64_t>(groups) * i / blocks) * group);
    const int end =
        std::min(rows, static_cast<int>(static_cast<int64_t>(groups) * (i + 1) / blocks) * group);
    if (begin < end) items->push_back({expert, begin, end});
  }
}

// One expert's products and buffers in a split layer.
struct ExpertWork {
  cpu::LinearRows gate_up_product;
  cpu::LinearRows down_product;
  std::vector<float> gate_up;  // [N, 2F]
  std::vector<float> act;      // [N, F]
};

// Runs the experts ffns[order[j]] over (expert, row block) items on a team of
// up to `team` threads: the gate/up rows, a barrier, SwiGLU, the down rows.
// Each expert gets blocks in proportion to its tokens, about `team` blocks in
// all per product. False (nothing run) when no product can be split, where
// whole experts per thread do as well.
bool RunSplit(absl::Span<const ExpertFfn* const> ffns, absl::Span<const ExpertBatch> batches,
              absl::Span<const int> order, int team) {
  int64_t total_tokens = 0;
  for (const ExpertBatch& b : batches) total_tokens += b.tokens;
  if (total_tokens == 0) return true;
  std::vector<RowItem> up_items, down_items;
  bool splits = false;
  for (int i : order) {
    const int tokens = batches[i].tokens;
    if (tokens == 0) continue;
    const int blocks = static_cast<int>(std::max<int64_t>(
        1, (static_cast<int64_t>(team) * tokens + total_tokens / 2) / total_tokens));
    const int up_group = cpu::LinearRows::RowGroup(ffns[i]->w13(), tokens);
    const int down_group = cpu::LinearRows::RowGroup(ffns[i]->w2(), tokens);
    splits = splits || (blocks > 1 && (up_group > 0 || down_group > 0));
    AddRowItems(i, ffns[i]->w13().rows(), up_group, blocks, &up_items);
    AddRowItems(i, ffns[i]->w2().rows(), down_group, blocks, &down_items);
  }
  if (!splits) return false;
  thread_local std::vector<ExpertWork> work;  // by batch index; the caller's thread's
  if (work.size() < batches.size()) work.resize(batches.size());
  std::vector<int> active;  // batch indices with tokens
  for (int i : order) {
    if (batches[i].tokens > 0) active.push_back(i);
  }
  ExpertWork* w = work.data();  // the team's threads see this thread's buffers
  const int threads =
      static_cast<int>(std::min<size_t>(team, std::max(up_items.size(), down_items.size())));
  const int n_up = static_cast<int>(up_items.size()), n_down = static_cast<int>(down_items.size());
  const int n_active = static_cast<int>(active.size());
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int j = 0; j < n_active; ++j) {
      const int i = active[j];
      const int tokens = batches[i].tokens;
      w[i].gate_up.resize(static_cast<size_t>(tokens) * ffns[i]->w13().rows());
      w[i].act.resize(static_cast<size_t>(tokens) * ffns[i]->ffn());
      w[i].gate_up_product.Prepare(batches[i].input, ffns[i]->w13(), tokens, w[i].gate_up.data());
    }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int j = 0; j < n_up; ++j) {
      const RowItem& item = up_items[j];
      w[item.expert].gate_up_product.Rows(item.begin, item.end);
    }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int j = 0; j < n_active; ++j) {
      const int i = active[j];
      ffns[i]->Activate(w[i].gate_up.data(), batches[i].tokens, w[i].act.data());
      w[i].down_product.Prepare(w[i].act.data(), ffns[i]->w2(), batches[i].tokens,
                                batches[i].output);
    }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int j = 0; j < n_down; ++j) {
      const RowItem& item = down_items[j];
      w[item.expert].down_product.Rows(item.begin, item.end);
    }
  }
  return true;
}

}  // namespace

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
  int team = 1;
#ifdef _OPENMP
  if (!omp_in_parallel()) team = omp_get_max_threads();
#endif
  if (team <= 1 || count == 0) {
    for (int i = 0; i < count; ++i)
      ffns[i]->Forward(batches[i].input, batches[i].tokens, batches[i].output);
    return absl::OkStatus();
  }
  std::vector<int> order(count);  // batch indices, most tokens first
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return batches[a].tokens > batches[b].tokens; });
  // Fewer experts than threads (batch 1 has 2): the team splits the
  // experts' output rows too, so every thread streams its share of the
  // weights. Row blocks leave each output element's sums as they are.
  if (team > count && RunSplit(ffns, batches, order, team)) return absl::OkStatus();
  if (count == 1) {
    ffns[0]->Forward(batches[0].input, batches[0].tokens, batches[0].output);
    return absl::OkStatus();
  }
  // Otherwise one OpenMP team takes whole experts (each Forward then runs
  // its products on one thread), so a layer costs one fork/join instead of
  // two per expert. Most tokens first, so the last expert picked is a small
  // one. Each output is bitwise what the expert computes alone.
  const int threads = std::min(count, team);
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
