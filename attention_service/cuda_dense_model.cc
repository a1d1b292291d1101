#include "attention_service/cuda_dense_model.h"

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/tensor_names.h"
#include "cuda/kernels/attention.h"
#include "cuda/kernels/embedding_lookup.h"
#include "cuda/kernels/gather_rows.h"
#include "cuda/kernels/kv_append.h"
#include "cuda/kernels/rms_norm.h"
#include "cuda/kernels/rope_rotate_half.h"
#include "cuda/kernels/router_topk.h"
#include "cuda/status.h"
#include "cuda/upload.h"

namespace switchyard::cuda {
namespace {

absl::Status ValidateConfigForGpu(const ModelConfig& c) {
  if (c.head_dim <= 0 || c.head_dim % 2 != 0 || c.head_dim > kAttentionMaxHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the CUDA backend needs an even head_dim <= ", kAttentionMaxHeadDim, ", not ", c.head_dim));
  }
  if (c.num_key_value_heads <= 0 || c.num_attention_heads % c.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(
        "num_attention_heads must be a multiple of num_key_value_heads");
  }
  if (c.num_experts_per_tok <= 0 || c.num_experts_per_tok > c.num_local_experts) {
    return absl::InvalidArgumentError("need 0 < num_experts_per_tok <= num_local_experts");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaDenseModel>> CudaDenseModel::Load(const Checkpoint& checkpoint,
                                                                     Precision precision) {
  if (!checkpoint.selection().dense) {
    return absl::FailedPreconditionError(
        "CudaDenseModel needs the dense tensors, but the checkpoint was opened without them");
  }
  auto m = std::unique_ptr<CudaDenseModel>(new CudaDenseModel());
  m->config_ = checkpoint.config();
  m->precision_ = precision;
  const ModelConfig& c = m->config_;
  SY_RETURN_IF_ERROR(ValidateConfigForGpu(c));
  const DeviceDType wt = WeightDType(precision);
  SY_ASSIGN_OR_RETURN(m->embed_, UploadMatrix(checkpoint, {names::Embed()}, wt));
  SY_ASSIGN_OR_RETURN(m->final_norm_, UploadVector(checkpoint, names::FinalNorm()));
  SY_ASSIGN_OR_RETURN(m->lm_head_, UploadMatrix(checkpoint, {names::LmHead()}, wt));
  m->layers_.resize(c.num_hidden_layers);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    Layer& layer = m->layers_[i];
    SY_ASSIGN_OR_RETURN(layer.input_norm, UploadVector(checkpoint, names::InputNorm(i)));
    SY_ASSIGN_OR_RETURN(layer.post_norm, UploadVector(checkpoint, names::PostAttnNorm(i)));
    SY_ASSIGN_OR_RETURN(
        layer.wqkv,
        UploadMatrix(checkpoint, {names::QProj(i), names::KProj(i), names::VProj(i)}, wt));
    SY_ASSIGN_OR_RETURN(layer.wo, UploadMatrix(checkpoint, {names::OProj(i)}, wt));
    // The router stays FP32 in both precisions: it is tiny, and its top-K
    // choices are what a rounding difference would flip.
    SY_ASSIGN_OR_RETURN(layer.gate, UploadMatrix(checkpoint, {names::Gate(i)}, DeviceDType::kF32));
  }
  SY_ASSIGN_OR_RETURN(m->inv_freq_, UploadHostVector(RopeInvFreq(c.head_dim, c.rope_theta)));
  return m;
}

uint64_t CudaDenseModel::layer_bytes() const {
  if (layers_.empty()) return 0;
  const Layer& l = layers_[0];
  return l.input_norm.bytes() + l.post_norm.bytes() + l.wqkv.bytes() + l.wo.bytes() +
         l.gate.bytes();
}

uint64_t CudaDenseModel::total_bytes() const {
  return embed_.bytes() + lm_head_.bytes() + final_norm_.bytes() + layer_bytes() * layers_.size();
}

absl::Status CudaDenseModel::Embed(const CudaContext& ctx, const int32_t* ids, int tokens,
                                   float* h) const {
  const int D = config_.hidden_size, V = config_.vocab_size;
  if (embed_.dtype == DeviceDType::kF32) {
    return LaunchEmbeddingLookup(ids, tokens, reinterpret_cast<const float*>(embed_.storage.data()),
                                 V, D, h, ctx.stream());
  }
  return LaunchEmbeddingLookup(ids, tokens,
                               reinterpret_cast<const __nv_bfloat16*>(embed_.storage.data()), V, D,
                               h, ctx.stream());
}

absl::Status CudaDenseModel::AttentionBlock(const CudaContext& ctx, int layer,
                                            const AttentionStep& s, float* h) const {
  const ModelConfig& c = config_;
  const Layer& w = layers_[layer];
  const cudaStream_t stream = ctx.stream();
  const int T = s.tokens, D = c.hidden_size, H = c.num_attention_heads;
  const int Hkv = c.num_key_value_heads, hd = c.head_dim, q_dim = c.q_dim(), kv_dim = c.kv_dim();
  const int qkv_dim = q_dim + 2 * kv_dim;

  // x[T, D] = rmsnorm(h)
  SY_RETURN_IF_ERROR(
      LaunchRmsNorm(h, w.input_norm.data(), T, D, static_cast<float>(c.rms_norm_eps), s.x, stream));
  // qkv[T, (H + 2 Hkv) hd] = x · Wqkv^T
  SY_RETURN_IF_ERROR(
      Linear(ctx, s.x, T, w.wqkv.view(), s.qkv, /*accumulate=*/false, s.bf16, s.bf16_elems));
  // RoPE on q and k at once: per row H + Hkv consecutive heads.
  SY_RETURN_IF_ERROR(
      LaunchRopeRotateHalf(s.qkv, qkv_dim, s.positions, T, H + Hkv, hd, inv_freq_.data(), stream));
  // This step's k, v into each sequence's cache, then attention over it.
  SY_RETURN_IF_ERROR(LaunchKvAppend(s.qkv, qkv_dim, /*k_offset=*/q_dim,
                                    /*v_offset=*/q_dim + kv_dim, T, kv_dim, s.kv, s.tok_seq,
                                    s.positions, layer, stream));
  // attn[T, H, hd]
  SY_RETURN_IF_ERROR(LaunchAttention(s.qkv, qkv_dim, T, H, Hkv, hd, c.sliding_window, s.kv,
                                     s.tok_seq, s.positions, layer, s.attn, stream));
  // h[T, D] += attn[T, H hd] · Wo^T
  return Linear(ctx, s.attn, T, w.wo.view(), h, /*accumulate=*/true, s.bf16, s.bf16_elems);
}

absl::Status CudaDenseModel::RouterInput(const CudaContext& ctx, int layer, const float* h,
                                         int tokens, float* x, float* router_logits,
                                         int32_t* topk_experts, float* topk_weights) const {
  const ModelConfig& c = config_;
  const Layer& w = layers_[layer];
  const int T = tokens, D = c.hidden_size, E = c.num_local_experts, K = c.num_experts_per_tok;
  // x[T, D] = rmsnorm(h)
  SY_RETURN_IF_ERROR(LaunchRmsNorm(h, w.post_norm.data(), T, D, static_cast<float>(c.rms_norm_eps),
                                   x, ctx.stream()));
  // router_logits[T, E] = x · gate^T (FP32)
  SY_RETURN_IF_ERROR(
      Linear(ctx, x, T, w.gate.view(), router_logits, /*accumulate=*/false, nullptr, 0));
  // topk_experts, topk_weights [T, K]
  return LaunchRouterTopK(router_logits, T, E, K, topk_experts, topk_weights, ctx.stream());
}

absl::Status CudaDenseModel::Logits(const CudaContext& ctx, const float* h, const int32_t* rows,
                                    int num_rows, float* x_rows, float* logits, __nv_bfloat16* bf16,
                                    size_t bf16_elems) const {
  const int D = config_.hidden_size;
  // x_rows[R, D] = rmsnorm(h[rows])
  SY_RETURN_IF_ERROR(LaunchGatherRows(h, D, rows, num_rows, x_rows, ctx.stream()));
  SY_RETURN_IF_ERROR(LaunchRmsNorm(x_rows, final_norm_.data(), num_rows, D,
                                   static_cast<float>(config_.rms_norm_eps), x_rows, ctx.stream()));
  // logits[R, V] = x_rows · lm_head^T
  return Linear(ctx, x_rows, num_rows, lm_head_.view(), logits, /*accumulate=*/false, bf16,
                bf16_elems);
}

absl::StatusOr<int64_t> DeviceKvTokensThatFit(const ModelConfig& config, double fraction,
                                              KvDType dtype, int device) {
  SY_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  size_t free_bytes = 0, total_bytes = 0;
  SY_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  const double block_bytes =
      static_cast<double>(PagedKvBlockElems(config.num_hidden_layers, config.kv_dim())) *
      (dtype == KvDType::kBF16 ? 2 : 4);
  const auto blocks =
      static_cast<int64_t>(static_cast<double>(free_bytes) * fraction / block_bytes);
  return blocks * kKvBlockTokens;
}

}  // namespace switchyard::cuda
