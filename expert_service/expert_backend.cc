#include "expert_service/expert_backend.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu_ops.h"

namespace switchyard {

absl::Status ExpertBackend::RunLayerPerBatch(int layer, absl::Span<const ExpertBatch> batches,
                                             std::vector<absl::Status>* batch_status) {
  batch_status->assign(batches.size(), absl::OkStatus());
  return RunLayer(layer, batches);
}

std::future<absl::Status> ExpertBackend::StartLayerPerBatch(
    int layer, std::vector<ExpertBatch> batches, std::vector<absl::Status>* batch_status) {
  return std::async(std::launch::async,
                    [this, layer, batches = std::move(batches), batch_status]() {
                      return RunLayerPerBatch(layer, batches, batch_status);
                    });
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
