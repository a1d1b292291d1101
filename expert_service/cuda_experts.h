// The expert half of Mixtral on a GPU: expert FFN weights on the device, the
// FFN itself, and a GPU ExpertBackend (the CUDA version of ExpertStore and
// LocalExpertBackend) for switchyard-expert --device cuda. The CUDA runner
// (gateway/cuda_model_runner.h) uses the store directly when the experts
// share its GPU.
//
// Legend: N tokens routed to one expert, D hidden, F expert ffn.
//
// Precision (cuda/precision.h): kBF16 keeps w1/w3/w2 in BF16 and rounds the
// GEMM inputs to BF16 (FP32 accumulation); kF32 is exact FP32.
//
// Thread-safety: a loaded CudaExpertStore is immutable. CudaExpertBackend is
// thread-safe (calls are serialised on its one stream).
#ifndef SWITCHYARD_EXPERT_SERVICE_CUDA_EXPERTS_H_
#define SWITCHYARD_EXPERT_SERVICE_CUDA_EXPERTS_H_

#include <cuda_bf16.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/checkpoint.h"
#include "core/model_config.h"
#include "cuda/device.h"
#include "cuda/linear.h"
#include "cuda/precision.h"
#include "expert_service/expert_backend.h"

namespace switchyard::cuda {

// Expert FFN weights on the device, keyed by (layer, expert).
class CudaExpertStore {
 public:
  struct Expert {
    DeviceMatrix w13;  // [2F, D]: w1 (gate) rows, then w3 (up) rows
    DeviceMatrix w2;   // [D, F]
  };

  // Loads every (layer, expert) that the checkpoint's selection includes.
  static absl::StatusOr<std::unique_ptr<CudaExpertStore>> Load(const Checkpoint& checkpoint,
                                                               Precision precision);

  const ModelConfig& config() const { return config_; }
  Precision precision() const { return precision_; }
  // nullptr when this store does not hold (layer, expert).
  const Expert* Find(int layer, int expert) const;
  // Held (layer, expert) pairs, sorted.
  std::vector<std::pair<int, int>> Held() const;
  // Device bytes of one expert's weights (w13 + w2).
  uint64_t expert_bytes() const;

 private:
  ModelConfig config_;
  Precision precision_ = Precision::kF32;
  std::map<std::pair<int, int>, Expert> experts_;
};

// out[N, D] = w2 · (silu(w1 · x) ⊙ (w3 · x)) for x[N, D], on the device.
// Scratch (device): gate_up [N, 2F] and act [N, F] FP32; with BF16 weights
// bf16_scratch of at least N · max(D, F) elements.
absl::Status ExpertForward(const CudaContext& ctx, const CudaExpertStore::Expert& expert,
                           const float* x, int tokens, float* gate_up, float* act,
                           __nv_bfloat16* bf16_scratch, size_t bf16_scratch_elems, float* out);

// A GPU ExpertBackend: host inputs and outputs (the ExpertBatch contract),
// expert compute on the device from a CudaExpertStore.
class CudaExpertBackend : public ExpertBackend {
 public:
  static absl::StatusOr<std::unique_ptr<CudaExpertBackend>> Create(
      std::unique_ptr<CudaContext> ctx, std::unique_ptr<CudaExpertStore> store);

  // NotFound (before any work) when a batch's (layer, expert) is not held.
  absl::Status RunLayer(int layer, absl::Span<const ExpertBatch> batches) override;
  std::string Describe() const override { return description_; }
  const CudaExpertStore& store() const { return *store_; }

 private:
  CudaExpertBackend() = default;

  std::unique_ptr<CudaContext> ctx_;
  std::unique_ptr<CudaExpertStore> store_;
  std::string description_;
  std::mutex mu_;  // serialises RunLayer: one stream, shared buffers
  DeviceBuffer<float> in_, out_, gate_up_, act_;
  DeviceBuffer<__nv_bfloat16> bf16_;
  PinnedBuffer<float> h_in_, h_out_;
};

// An ExpertBackend serving every expert the checkpoint's selection includes
// (e.g. WeightSelection::ExpertsOnly) from GPU `device`.
absl::StatusOr<std::unique_ptr<ExpertBackend>> MakeCudaExpertBackend(const Checkpoint& checkpoint,
                                                                     Precision precision,
                                                                     int device = 0);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_EXPERT_SERVICE_CUDA_EXPERTS_H_
