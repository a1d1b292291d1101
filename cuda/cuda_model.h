// The whole Mixtral step on a GPU: the CUDA implementation of StepRunner,
// and a GPU ExpertBackend for switchyard-expert.
//
// Legend: T tokens in the step, B sequences, D hidden, F expert ffn,
// H query heads, Hkv kv heads, hd head dim, E experts, K experts per token,
// V vocabulary, L layers, R logit rows.
//
// Precision:
//   kF32   every weight in FP32 on the device, FP32 cuBLAS GEMMs (no TF32):
//          the CPU engine's results up to FP32 rounding order.
//   kBF16  the projection weights (q/k/v/o, experts, embeddings, LM head) in
//          BF16; activations are rounded to BF16 before each GEMM, which
//          accumulates in FP32. Norm weights, the router gate, RoPE,
//          attention, softmax, the KV cache and the residual stream stay FP32.
//
// Data flow of CudaModelRunner::Step (all on one stream):
//   ids ─embed─► h[T, D]; per layer:
//     x = rmsnorm(h); qkv = x · Wqkv^T; rope(q, k); append k, v to each
//     sequence's device cache; attn = attention(q, cache); h += attn · Wo^T;
//     x = rmsnorm(h); router_logits = x · gate^T; top-K on the device;
//     (host: the K experts of every token, grouped by expert in token order)
//     gather x rows per expert; expert FFNs, on this GPU (CudaExpertStore) or
//     through an ExpertBackend with host buffers (remote or CPU experts);
//     h += Σ_k w_k · expert_k(x) summed in expert-index order;
//   rows wanted ─► rmsnorm ─► · lm_head^T ─► logits to the host.
// Each layer copies the routing (T·K ids and weights) to the host, since the
// expert GEMM sizes are decided there.
//
// KV cache: the runner's KvCachePool should be built with host_storage =
// false (it then only accounts slots). Each sequence's K/V lives on the
// device in its SequenceKv::attachment() ([L][2][reserved][Hkv hd] FP32, see
// kernels/kv_layout.h), allocated with the reserved capacity and reallocated
// (with a copy of the cached positions) when the reservation grows; it is
// freed with the sequence. A SequenceKv used by a CudaModelRunner must not be
// used by another runner (the attachment is the runner's).
//
// Thread-safety: CudaModelRunner::Step is thread-compatible (callers
// serialise steps, as for the CPU runner). CudaExpertBackend is thread-safe
// (calls are serialised on its one stream). Loaded models are immutable.
#ifndef SWITCHYARD_CUDA_CUDA_MODEL_H_
#define SWITCHYARD_CUDA_CUDA_MODEL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/checkpoint.h"
#include "core/model_config.h"
#include "cuda/device.h"
#include "cuda/kernels/kv_layout.h"
#include "cuda/linear.h"
#include "expert_service/expert_backend.h"
#include "gateway/gateway_metrics.h"
#include "gateway/step_runner.h"

namespace switchyard::cuda {

enum class Precision { kF32, kBF16 };

// "f32" / "bf16".
const char* PrecisionName(Precision precision);
// Parses "f32" / "fp32" / "bf16"; InvalidArgument otherwise.
absl::StatusOr<Precision> ParsePrecision(std::string_view name);

// Element type of the projection weights in `precision`.
inline DeviceDType WeightDType(Precision precision) {
  return precision == Precision::kF32 ? DeviceDType::kF32 : DeviceDType::kBF16;
}

// Uploads the row-wise concatenation of the selected 2-D tensors `names`
// (each [rows_i, cols]) as one [Σ rows_i, cols] matrix of `dtype`. Stored
// dtypes are converted on the host (BF16 -> FP32 exactly; FP32/F16 -> BF16
// rounding to nearest even); a tensor already in `dtype` is copied as is.
absl::StatusOr<DeviceMatrix> UploadMatrix(const Checkpoint& checkpoint,
                                          const std::vector<std::string>& names, DeviceDType dtype);

// The dense weights (everything except the experts) on the device.
class CudaDenseModel {
 public:
  struct Layer {
    DeviceBuffer<float> input_norm;  // [D]
    DeviceBuffer<float> post_norm;   // [D]
    DeviceMatrix wqkv;               // [(H + 2 Hkv) hd, D]: q, k, v rows stacked
    DeviceMatrix wo;                 // [D, H hd]
    DeviceMatrix gate;               // [E, D], always FP32
  };

  // The checkpoint's selection must include the dense tensors.
  static absl::StatusOr<std::unique_ptr<CudaDenseModel>> Load(const Checkpoint& checkpoint,
                                                              Precision precision);

  const ModelConfig& config() const { return config_; }
  Precision precision() const { return precision_; }
  const Layer& layer(int i) const { return layers_[i]; }
  const DeviceMatrix& embed() const { return embed_; }             // [V, D]
  const DeviceMatrix& lm_head() const { return lm_head_; }         // [V, D]
  const float* final_norm() const { return final_norm_.data(); }   // [D]
  const float* rope_inv_freq() const { return inv_freq_.data(); }  // [hd/2]
  // Device bytes of one layer's weights (norms, qkv, o, gate).
  uint64_t layer_bytes() const;
  // Device bytes of every dense weight.
  uint64_t total_bytes() const;

 private:
  ModelConfig config_;
  Precision precision_ = Precision::kF32;
  DeviceMatrix embed_;
  std::vector<Layer> layers_;
  DeviceBuffer<float> final_norm_;
  DeviceMatrix lm_head_;
  DeviceBuffer<float> inv_freq_;
};

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

// A sequence's device K/V: the SequenceKv attachment a CudaModelRunner keeps.
struct DeviceKv {
  DeviceBuffer<float> buffer;  // [L][2][capacity][Hkv hd]
  int capacity = 0;
};

class CudaModelRunner : public StepRunner {
 public:
  // Exactly one of `experts` (experts on this GPU) and `remote` (any
  // ExpertBackend with host buffers; not owned, must outlive the runner)
  // must be given. `metrics` (optional, not owned) receives the tokens
  // routed per (layer, expert).
  static absl::StatusOr<std::unique_ptr<CudaModelRunner>> Create(
      std::unique_ptr<CudaContext> ctx, std::unique_ptr<CudaDenseModel> dense,
      std::unique_ptr<CudaExpertStore> experts, ExpertBackend* remote,
      GatewayMetrics* metrics = nullptr);

  // As StepRunner (and gateway/model_runner.cc): validates ids and lengths
  // (INVALID_ARGUMENT) and reserves cache (RESOURCE_EXHAUSTED, also when the
  // device K/V cannot be allocated) before any work; on error no cache
  // length changes.
  absl::StatusOr<StepOutput> Step(absl::Span<const StepInput> inputs,
                                  StepTrace* trace = nullptr) override;
  const ModelConfig& config() const override { return dense_->config(); }

  const CudaDenseModel& dense() const { return *dense_; }
  const CudaExpertStore* experts() const { return experts_.get(); }
  const CudaContext& context() const { return *ctx_; }

 private:
  CudaModelRunner() = default;

  absl::Status EnsureStepBuffers(int tokens, int sequences, int logit_rows);
  absl::StatusOr<DeviceKv*> EnsureDeviceKv(SequenceKv* kv);
  absl::Status AttentionLayer(int layer, int tokens, int sequences);
  // h += Σ_k w · expert_k(x) for one layer; fills the trace's entries.
  absl::Status MoeLayer(int layer, int tokens, int64_t* expert_tokens, StepTrace* trace);

  std::unique_ptr<CudaContext> ctx_;
  std::unique_ptr<CudaDenseModel> dense_;
  std::unique_ptr<CudaExpertStore> experts_;
  ExpertBackend* remote_ = nullptr;
  GatewayMetrics* metrics_ = nullptr;

  // Step buffers, grown on demand (device unless named h_*, pinned host).
  DeviceBuffer<int32_t> ids_, positions_, tok_seq_;  // [T]
  DeviceBuffer<SeqKvDesc> seqs_;                     // [B]
  DeviceBuffer<float> h_, x_;                        // [T, D]
  DeviceBuffer<float> qkv_;                          // [T, (H + 2 Hkv) hd]
  DeviceBuffer<float> attn_;                         // [T, H hd]
  DeviceBuffer<float> router_logits_;                // [T, E]
  DeviceBuffer<int32_t> topk_experts_;               // [T, K]
  DeviceBuffer<float> topk_weights_;                 // [T, K]
  DeviceBuffer<int32_t>
      moe_index_;                // [3 T K]: gather rows, combine rows, combine weights (as float)
  DeviceBuffer<float> moe_in_;   // [T K, D] x rows grouped by expert
  DeviceBuffer<float> moe_out_;  // [T K, D] expert outputs, same order
  DeviceBuffer<float> gate_up_;  // [T, 2F] (local experts)
  DeviceBuffer<float> act_;      // [T, F] (local experts)
  DeviceBuffer<__nv_bfloat16> bf16_;      // [T max(D, H hd, F)] (BF16 GEMM inputs)
  DeviceBuffer<int32_t> logit_rows_;      // [R]
  DeviceBuffer<float> logit_x_;           // [R, D]
  DeviceBuffer<float> logits_;            // [R, V]
  PinnedBuffer<int32_t> h_topk_experts_;  // [T, K]
  PinnedBuffer<float> h_topk_weights_;    // [T, K]
  PinnedBuffer<float> h_router_logits_;   // [T, E] (trace only)
  PinnedBuffer<int32_t> h_moe_index_;     // [3 T K]
  PinnedBuffer<float> h_moe_in_;          // [T K, D] (remote experts)
  PinnedBuffer<float> h_moe_out_;         // [T K, D] (remote experts)
  size_t bf16_elems_ = 0;
};

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

// The factories the binaries use.
//
// A StepRunner on GPU `device`: dense weights from `checkpoint` (its selection
// must include them) and either every expert the selection includes, on the
// same GPU (remote_or_null == nullptr), or the experts behind
// `remote_or_null` (not owned; must outlive the runner; the checkpoint may
// then be opened WeightSelection::DenseOnly()). The checkpoint may be closed
// after the call. Pair it with KvCachePool(config, tokens, /*host_storage=*/false).
absl::StatusOr<std::unique_ptr<StepRunner>> MakeCudaRunner(const Checkpoint& checkpoint,
                                                           Precision precision,
                                                           ExpertBackend* remote_or_null,
                                                           GatewayMetrics* metrics = nullptr,
                                                           int device = 0);

// An ExpertBackend serving every expert the checkpoint's selection includes
// (e.g. WeightSelection::ExpertsOnly) from GPU `device`.
absl::StatusOr<std::unique_ptr<ExpertBackend>> MakeCudaExpertBackend(const Checkpoint& checkpoint,
                                                                     Precision precision,
                                                                     int device = 0);

// KV token slots that fit in `fraction` of the device's free memory now
// (FP32 K and V, every layer), for sizing the KvCachePool.
absl::StatusOr<int64_t> DeviceKvTokensThatFit(const ModelConfig& config, double fraction,
                                              int device = 0);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_CUDA_MODEL_H_
