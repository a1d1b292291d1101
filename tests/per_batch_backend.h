// RunLayer for test ExpertBackends that implement RunLayerPerBatch: the
// layer fails with its first failed batch's status, as the real backends'
// RunLayer does.
#ifndef SWITCHYARD_TESTS_PER_BATCH_BACKEND_H_
#define SWITCHYARD_TESTS_PER_BATCH_BACKEND_H_

#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "expert_service/expert_backend.h"

namespace switchyard::testing {

inline absl::Status RunLayerThroughPerBatch(ExpertBackend& backend, int layer,
                                            absl::Span<const ExpertBatch> batches) {
  std::vector<absl::Status> status;
  if (absl::Status s = backend.RunLayerPerBatch(layer, batches, &status); !s.ok()) return s;
  for (const absl::Status& b : status) {
    if (!b.ok()) return b;
  }
  return absl::OkStatus();
}

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_PER_BATCH_BACKEND_H_
