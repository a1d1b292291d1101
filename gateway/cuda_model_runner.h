// The whole Mixtral step on a GPU: the CUDA implementation of StepRunner.
// It strings together the dense half (attention_service/cuda_dense_model.h)
// and the experts, either on the same GPU (expert_service/cuda_experts.h) or
// behind any ExpertBackend (remote or CPU experts, through host buffers).
//
// Legend: T tokens in the step, B sequences, D hidden, F expert ffn,
// H query heads, Hkv kv heads, hd head dim, E experts, K experts per token,
// V vocabulary, L layers, R logit rows.
//
// Data flow of CudaModelRunner::Step (all on one stream):
//   ids ─embed─► h[T, D]; per layer:
//     h += attention(rmsnorm(h)) over each sequence's device cache;
//     x = rmsnorm(h); router_logits = x · gate^T; top-K on the device;
//     (host: the MoE dispatch plan, gateway/moe_dispatch.h, the same as the
//     CPU runner's)
//     gather x rows per expert; expert FFNs, on this GPU or through an
//     ExpertBackend with host buffers;
//     h += Σ_k w_k · expert_k(x) summed in expert-index order;
//   rows wanted ─► rmsnorm ─► · lm_head^T ─► logits to the host.
// Each layer copies the routing (T·K ids and weights) to the host, since the
// expert GEMM sizes are decided there.
//
// Micro-batches (max_micro_batches > 1; gateway/step_runner.h,
// SplitIntoMicroBatches): the step's sequences split into micro-batches
// whose rows are contiguous slices of every step buffer. Per layer, each
// micro-batch in turn waits for its expert calls of the previous layer,
// enqueues their outputs and the combine, enqueues its attention and
// routing, waits on an event recorded after its routing copies and starts
// its expert calls in the background
// (ExpertBackend::StartLayerPerBatch), so that the GPU computes the next
// micro-batch while the experts of the others are in flight. Results are
// bit-for-bit those of one micro-batch. With experts on this GPU there is
// nothing to overlap with; they run in turn on the one stream.
//
// KV cache, paged (cuda/kernels/kv_layout.h): the runner's KvCachePool is
// built with host_storage = false and only accounts blocks; the K/V live in
// one device slab of the pool's total_blocks() blocks of kBlockTokens
// positions, allocated once per pool (AttachDeviceKvSlab, or the first step
// that sees the pool) and kept as the pool's attachment(). Block b of the
// pool is block b of the slab, so each step uploads the sequences' block
// tables and kv_append / attention go through them: a sequence grows a
// block at a time without copying, and a prefix the pool shares between
// sequences (AttachCachedPrefix) is shared on the device too. Every runner
// that uses a pool must be on the slab's device and precision.
//
// Thread-safety: CudaModelRunner::Step is thread-compatible (callers
// serialise steps, as for the CPU runner).
#ifndef SWITCHYARD_GATEWAY_CUDA_MODEL_RUNNER_H_
#define SWITCHYARD_GATEWAY_CUDA_MODEL_RUNNER_H_

#include <cuda_bf16.h>

#include <cstdint>
#include <future>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "attention_service/cuda_dense_model.h"
#include "attention_service/kv_cache.h"
#include "core/checkpoint.h"
#include "cuda/device.h"
#include "cuda/kernels/kv_layout.h"
#include "cuda/precision.h"
#include "expert_service/cuda_experts.h"
#include "expert_service/expert_backend.h"
#include "gateway/step_runner.h"

namespace switchyard::cuda {

// The device K/V of a KvCachePool (its attachment()): [N][L][2][Bt][Hkv hd].
struct DeviceKvSlab {
  DeviceBuffer<uint8_t> storage;
  KvDType dtype = KvDType::kF32;
  int64_t blocks = 0;  // N, the pool's total_blocks()
  int layers = 0;      // L
  int kv_dim = 0;      // Hkv hd
  int device = 0;
};

// The slab's element type for a compute precision: FP32 for kF32 (the exact
// parity mode), BF16 for kBF16.
KvDType DeviceKvDType(Precision precision);
// Bytes of a slab of `blocks` blocks.
int64_t DeviceKvSlabBytes(const ModelConfig& config, KvDType dtype, int64_t blocks);

// Allocates `pool`'s device slab (total_blocks() blocks) on `device` unless
// the pool has one; FAILED_PRECONDITION if it has one of another dtype or
// device, or if it keeps host storage; RESOURCE_EXHAUSTED (naming the bytes)
// if the device memory is not there.
absl::StatusOr<DeviceKvSlab*> AttachDeviceKvSlab(KvCachePool& pool, KvDType dtype, int device);

class CudaModelRunner : public StepRunner {
 public:
  // Exactly one of `experts` (experts on this GPU) and `remote` (any
  // ExpertBackend with host buffers; not owned, must outlive the runner)
  // must be given. `observer` (optional, not owned) is told the tokens
  // routed per (layer, expert).
  // `max_micro_batches` (>= 1; default 1, no overlap): the most micro-batches
  // a step splits into.
  static absl::StatusOr<std::unique_ptr<CudaModelRunner>> Create(
      std::unique_ptr<CudaContext> ctx, std::unique_ptr<CudaDenseModel> dense,
      std::unique_ptr<CudaExpertStore> experts, ExpertBackend* remote,
      RoutingObserver* observer = nullptr, int max_micro_batches = 1);

  // As StepRunner (and the CPU runner, gateway/model_runner.h): validates ids and lengths
  // (INVALID_ARGUMENT) and reserves cache (RESOURCE_EXHAUSTED, also when the
  // pool's device slab cannot be allocated) before any work; on error no
  // cache length changes. Every input's SequenceKv must come from one pool.
  absl::StatusOr<StepOutput> Step(absl::Span<const StepInput> inputs,
                                  StepTrace* trace = nullptr) override;
  const ModelConfig& config() const override { return dense_->config(); }

  const CudaDenseModel& dense() const { return *dense_; }
  const CudaExpertStore* experts() const { return experts_.get(); }
  const CudaContext& context() const { return *ctx_; }
  // Element type of the device K/V this runner writes.
  KvDType kv_dtype() const { return DeviceKvDType(dense_->precision()); }

 private:
  CudaModelRunner() = default;

  absl::Status EnsureStepBuffers(int tokens, int sequences, int logit_rows);
  // One attempt at the step (StepAttempt, gateway/step_runner.h): stops at
  // the first layer where a remote expert call failed, committing nothing.
  absl::StatusOr<StepOutput> StepOnce(absl::Span<const StepInput> inputs, StepTrace* trace);
  struct MicroBatch;
  // Attention, routing and the expert calls of one micro-batch for `layer`
  // (the calls in the background when `overlap`); fills the trace's rows.
  absl::Status StartLayer(MicroBatch& mb, int layer, const CudaDenseModel::AttentionStep& step,
                          bool overlap, int64_t* expert_tokens, StepTrace* trace);
  // Waits for the micro-batch's expert calls, then enqueues h += Σ_k w ·
  // expert_k(x) for its rows. When remote expert calls failed, fills
  // `sequence_status` (per input of the step) instead and leaves h unusable.
  absl::Status FinishLayer(MicroBatch& mb, int sequences,
                           std::vector<absl::Status>* sequence_status);

  std::unique_ptr<CudaContext> ctx_;
  std::unique_ptr<CudaDenseModel> dense_;
  std::unique_ptr<CudaExpertStore> experts_;
  ExpertBackend* remote_ = nullptr;
  RoutingObserver* observer_ = nullptr;
  int max_micro_batches_ = 1;
  std::vector<CudaEvent> routed_;  // per micro-batch: its routing is on the host

  // Step buffers, grown on demand (device unless named h_*, pinned host).
  DeviceBuffer<int32_t> ids_, positions_, tok_seq_;  // [T]
  DeviceBuffer<SeqKvDesc> seqs_;                     // [B]
  DeviceBuffer<int32_t> block_tables_;               // [Σ blocks of the step's sequences]
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

// The factories the binaries use.
//
// A StepRunner on GPU `device`: dense weights from `checkpoint` (its selection
// must include them) and either every expert the selection includes, on the
// same GPU (remote_or_null == nullptr), or the experts behind
// `remote_or_null` (not owned; must outlive the runner; the checkpoint may
// then be opened WeightSelection::DenseOnly()). The checkpoint may be closed
// after the call. Pair it with KvCachePool(config, tokens, /*host_storage=*/false)
// (and AttachDeviceKvSlab to allocate its device K/V up front).
absl::StatusOr<std::unique_ptr<StepRunner>> MakeCudaRunner(
    const Checkpoint& checkpoint, Precision precision, ExpertBackend* remote_or_null,
    RoutingObserver* observer = nullptr, int device = 0, int max_micro_batches = 1);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_GATEWAY_CUDA_MODEL_RUNNER_H_
