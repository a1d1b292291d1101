#include "expert_service/expert_backend.h"

#include "absl/strings/str_cat.h"

namespace switchyard {

absl::Status ExpertBackend::RunLayerPerBatch(int layer, absl::Span<const ExpertBatch> batches,
                                             std::vector<absl::Status>* batch_status) {
  batch_status->assign(batches.size(), absl::OkStatus());
  return RunLayer(layer, batches);
}

absl::Status LocalExpertBackend::RunLayer(int layer, absl::Span<const ExpertBatch> batches) {
  for (const ExpertBatch& b : batches) {
    const ExpertFfn* ffn = store_->Find(layer, b.expert);
    if (ffn == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("expert ", b.expert, " of layer ", layer, " is not loaded in this process"));
    }
    ffn->Forward(b.input, b.tokens, b.output);
  }
  return absl::OkStatus();
}

}  // namespace switchyard
