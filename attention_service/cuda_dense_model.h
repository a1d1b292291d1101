// The dense half of Mixtral on a GPU: the CUDA version of AttentionModel
// (attention_model.h), built on cuda/'s kernels and cuBLAS projections.
// It holds the dense weights (embeddings, attention, norms, router gate, LM
// head) and runs each stage of a step on device buffers the caller owns; the
// runner (gateway/cuda_model_runner.h) strings the stages together with the
// experts.
//
// Legend: T tokens in the step, B sequences, D hidden, H query heads,
// Hkv kv heads, hd head dim, E experts, K experts per token, V vocabulary,
// R logit rows.
//
// Precision (cuda/precision.h): in kBF16 the projection weights (q/k/v/o,
// embeddings, LM head) are BF16; norm weights, the router gate, RoPE,
// attention, softmax and the residual stream stay FP32; the KV cache is
// FP32 or BF16 as the runner's slab is (cuda/kernels/kv_layout.h).
//
// Thread-safety: a loaded model is immutable; its stage methods may run
// concurrently on different contexts and buffers.
#ifndef SWITCHYARD_ATTENTION_SERVICE_CUDA_DENSE_MODEL_H_
#define SWITCHYARD_ATTENTION_SERVICE_CUDA_DENSE_MODEL_H_

#include <cuda_bf16.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/checkpoint.h"
#include "core/model_config.h"
#include "cuda/device.h"
#include "cuda/kernels/kv_layout.h"
#include "cuda/linear.h"
#include "cuda/precision.h"

namespace switchyard::cuda {

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

  // The device state of one step's attention (not owned; the runner's).
  struct AttentionStep {
    int tokens = 0;                      // T
    const int32_t* positions = nullptr;  // [T] position of each row
    const int32_t* tok_seq = nullptr;    // [T] sequence (index into seqs) of each row
    PagedKv kv;                          // the device K/V slab and [B] block tables
    float* x = nullptr;                  // [T, D] scratch
    float* qkv = nullptr;                // [T, (H + 2 Hkv) hd] scratch
    float* attn = nullptr;               // [T, H hd] scratch
    __nv_bfloat16* bf16 = nullptr;       // BF16 GEMM inputs (kBF16): >= T max(D, H hd)
    size_t bf16_elems = 0;
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

  // The stages of a step, each enqueued on ctx's stream.
  //
  // h[T, D] = embed[ids]
  absl::Status Embed(const CudaContext& ctx, const int32_t* ids, int tokens, float* h) const;
  // h[T, D] += attention(rmsnorm(h)): q, k, v, RoPE, this step's k, v
  // appended to each sequence's cache, attention over it, output projection.
  absl::Status AttentionBlock(const CudaContext& ctx, int layer, const AttentionStep& step,
                              float* h) const;
  // x[T, D] = rmsnorm(h) (post-attention norm); router_logits[T, E] =
  // x · gate^T; the top-K experts of each token and their softmax weights
  // (topk_experts, topk_weights [T, K], best first).
  absl::Status RouterInput(const CudaContext& ctx, int layer, const float* h, int tokens, float* x,
                           float* router_logits, int32_t* topk_experts, float* topk_weights) const;
  // logits[R, V] = lm_head(rmsnorm(h[rows])); x_rows[R, D] is scratch.
  absl::Status Logits(const CudaContext& ctx, const float* h, const int32_t* rows, int num_rows,
                      float* x_rows, float* logits, __nv_bfloat16* bf16, size_t bf16_elems) const;

 private:
  ModelConfig config_;
  Precision precision_ = Precision::kF32;
  DeviceMatrix embed_;
  std::vector<Layer> layers_;
  DeviceBuffer<float> final_norm_;
  DeviceMatrix lm_head_;
  DeviceBuffer<float> inv_freq_;
};

// KV token slots that fit in `fraction` of the device's free memory now (K
// and V of every layer in `dtype`, whole blocks of kKvBlockTokens), for
// sizing the KvCachePool whose device slab the runner allocates.
absl::StatusOr<int64_t> DeviceKvTokensThatFit(const ModelConfig& config, double fraction,
                                              KvDType dtype = KvDType::kF32, int device = 0);

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_ATTENTION_SERVICE_CUDA_DENSE_MODEL_H_
