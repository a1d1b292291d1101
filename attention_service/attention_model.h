// The dense part of Mixtral that the gateway runs: token embeddings,
// attention over the KV cache, the router's input norm and gate, the final
// norm and the LM head. Everything except the expert FFNs.
//
// Legend: T tokens in the step, D hidden, H query heads, Hkv kv heads,
// hd head dim, E experts, V vocabulary, S cached positions.
//
// Projection weights are held as stored (BF16 stays BF16, F32/F16 become
// FP32; the math is FP32 either way, see core/cpu_ops.h).
//
// Thread-safety: immutable after Load; methods are const and may run
// concurrently on different sequences' caches.
#ifndef SWITCHYARD_ATTENTION_SERVICE_ATTENTION_MODEL_H_
#define SWITCHYARD_ATTENTION_SERVICE_ATTENTION_MODEL_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "attention_service/kv_cache.h"
#include "core/checkpoint.h"
#include "core/cpu_ops.h"
#include "core/model_config.h"

namespace switchyard {

class AttentionModel {
 public:
  // Reads the dense tensors; the checkpoint's selection must include them.
  static absl::StatusOr<std::unique_ptr<AttentionModel>> Load(const Checkpoint& checkpoint);

  const ModelConfig& config() const { return config_; }

  // h[T, D] = embedding rows of ids[T]. Ids must be < V (callers validate).
  void Embed(const int32_t* ids, int tokens, float* h) const;

  // The attention sub-layer of `layer`, in place: h += o_proj(attn(rmsnorm(h))).
  // Writes each slice's new K/V into its cache (positions start_pos...).
  void AttentionBlock(int layer, float* h, int tokens, absl::Span<const SequenceSlice> slices,
                      const int32_t* positions) const;

  // The MoE sub-layer's input and the router: x[T, D] = rmsnorm(h),
  // router_logits[T, E] = x · gate^T.
  void RouterInput(int layer, const float* h, int tokens, float* x, float* router_logits) const;

  // logits[N, V] = lm_head(rmsnorm(h[N, D])).
  void Logits(const float* h, int rows, float* logits) const;

  // Whether every row of every method above has the same bits whatever the
  // number of rows in the call, at the CPU kernel level and precision in
  // force: all its products (q/k/v/o projections, router, lm_head) are on
  // BF16 matrices and cpu::RowsIndependentOfCount says so (the rest is per
  // row, or per sequence for attention). Otherwise that holds only up to
  // cpu::kSkinnyMaxTokens rows.
  bool RowsIndependentOfCount() const;

 private:
  struct Layer {
    std::vector<float> input_norm;  // [D]
    cpu::Matrix wqkv;               // [(H + 2 Hkv) hd, D]: q, k, v rows stacked
    cpu::Matrix wo;                 // [D, H hd]
    std::vector<float> post_norm;   // [D]
    cpu::Matrix gate;               // [E, D]
  };

  // Writes one slice's K (k[T, Hkv hd], rotated) and V (from qkv[T, (H + 2 Hkv)
  // hd]) into its BF16 cache, rounded to BF16.
  void StoreKvBf16(int layer, const float* k, const float* qkv, const SequenceSlice& s) const;

  ModelConfig config_;
  std::vector<float> embed_;       // [V, D]
  std::vector<Layer> layers_;      // [L]
  std::vector<float> final_norm_;  // [D]
  cpu::Matrix lm_head_;            // [V, D]
};

}  // namespace switchyard

#endif  // SWITCHYARD_ATTENTION_SERVICE_ATTENTION_MODEL_H_
