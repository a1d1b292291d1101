#include "cuda/cuda_model.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/status_macros.h"
#include "core/tensor_names.h"
#include "cuda/kernels/attention.h"
#include "cuda/kernels/embedding_lookup.h"
#include "cuda/kernels/gather_rows.h"
#include "cuda/kernels/kv_append.h"
#include "cuda/kernels/moe_combine.h"
#include "cuda/kernels/rms_norm.h"
#include "cuda/kernels/rope_rotate_half.h"
#include "cuda/kernels/router_topk.h"
#include "cuda/kernels/swiglu.h"
#include "cuda/status.h"

namespace switchyard::cuda {
namespace {

// Copies one stored tensor to `dst` (device) as `dtype`.
absl::Status UploadTensor(const TensorView& view, DeviceDType dtype, uint8_t* dst) {
  const size_t count = static_cast<size_t>(view.num_elements());
  if ((view.dtype == DType::kF32 && dtype == DeviceDType::kF32) ||
      (view.dtype == DType::kBF16 && dtype == DeviceDType::kBF16)) {
    SY_RETURN_IF_ERROR(UploadAndWait(dst, view.data, view.nbytes));
    return absl::OkStatus();
  }
  // Convert on the host in chunks (bounded memory whatever the tensor size).
  constexpr size_t kChunk = size_t{1} << 22;
  std::vector<float> f32(std::min(count, kChunk));
  std::vector<uint16_t> bf16(dtype == DeviceDType::kBF16 ? f32.size() : 0);
  const size_t src_esize = DTypeSize(view.dtype);
  for (size_t begin = 0; begin < count; begin += kChunk) {
    const size_t n = std::min(kChunk, count - begin);
    ConvertToF32(view.dtype, view.data + begin * src_esize, n, f32.data());
    if (dtype == DeviceDType::kF32) {
      SY_RETURN_IF_ERROR(UploadAndWait(dst + begin * sizeof(float), f32.data(), n * sizeof(float)));
    } else {
      for (size_t i = 0; i < n; ++i) bf16[i] = F32ToBf16(f32[i]);
      SY_RETURN_IF_ERROR(
          UploadAndWait(dst + begin * sizeof(uint16_t), bf16.data(), n * sizeof(uint16_t)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<DeviceBuffer<float>> UploadVector(const Checkpoint& checkpoint,
                                                 const std::string& name) {
  SY_ASSIGN_OR_RETURN(std::vector<float> host, checkpoint.ReadF32(name));
  SY_ASSIGN_OR_RETURN(DeviceBuffer<float> dev, DeviceBuffer<float>::Create(host.size()));
  SY_RETURN_IF_ERROR(UploadAndWait(dev.data(), host.data(), host.size() * sizeof(float)));
  return dev;
}

template <typename T>
absl::StatusOr<DeviceBuffer<T>> UploadHostVector(const std::vector<T>& host) {
  SY_ASSIGN_OR_RETURN(DeviceBuffer<T> dev, DeviceBuffer<T>::Create(host.size()));
  SY_RETURN_IF_ERROR(UploadAndWait(dev.data(), host.data(), host.size() * sizeof(T)));
  return dev;
}

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

const char* PrecisionName(Precision precision) {
  return precision == Precision::kF32 ? "f32" : "bf16";
}

absl::StatusOr<Precision> ParsePrecision(std::string_view name) {
  if (name == "f32" || name == "fp32") return Precision::kF32;
  if (name == "bf16") return Precision::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown precision '", std::string(name), "' (expected f32 or bf16)"));
}

absl::StatusOr<DeviceMatrix> UploadMatrix(const Checkpoint& checkpoint,
                                          const std::vector<std::string>& names,
                                          DeviceDType dtype) {
  std::vector<TensorView> views;
  int64_t rows = 0, cols = -1;
  for (const std::string& name : names) {
    SY_ASSIGN_OR_RETURN(TensorView view, checkpoint.View(name));
    if (view.shape.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(name, " is not a matrix"));
    }
    if (cols >= 0 && view.shape[1] != cols) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " has ", view.shape[1], " columns, expected ", cols));
    }
    cols = view.shape[1];
    rows += view.shape[0];
    views.push_back(std::move(view));
  }
  if (views.empty() || rows > INT_MAX || cols > INT_MAX) {
    return absl::InvalidArgumentError("UploadMatrix: no tensors, or a dimension over INT_MAX");
  }
  DeviceMatrix m;
  m.dtype = dtype;
  m.rows = static_cast<int>(rows);
  m.cols = static_cast<int>(cols);
  const size_t esize = DeviceDTypeSize(dtype);
  SY_RETURN_IF_ERROR(m.storage.EnsureCapacity(static_cast<size_t>(rows) * cols * esize));
  uint8_t* dst = m.storage.data();
  for (const TensorView& view : views) {
    SY_RETURN_IF_ERROR(UploadTensor(view, dtype, dst));
    dst += static_cast<size_t>(view.num_elements()) * esize;
  }
  return m;
}

// ---------------------------------------------------------------------------
// CudaDenseModel

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

// ---------------------------------------------------------------------------
// CudaExpertStore

absl::StatusOr<std::unique_ptr<CudaExpertStore>> CudaExpertStore::Load(const Checkpoint& checkpoint,
                                                                       Precision precision) {
  auto store = std::unique_ptr<CudaExpertStore>(new CudaExpertStore());
  store->config_ = checkpoint.config();
  store->precision_ = precision;
  const ModelConfig& c = store->config_;
  const DeviceDType wt = WeightDType(precision);
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    for (int e = 0; e < c.num_local_experts; ++e) {
      if (!checkpoint.selection().IncludesExpert(layer, e)) continue;
      Expert expert;
      SY_ASSIGN_OR_RETURN(
          expert.w13,
          UploadMatrix(checkpoint, {names::Expert(layer, e, "w1"), names::Expert(layer, e, "w3")},
                       wt));
      SY_ASSIGN_OR_RETURN(expert.w2, UploadMatrix(checkpoint, {names::Expert(layer, e, "w2")}, wt));
      store->experts_.emplace(std::make_pair(layer, e), std::move(expert));
    }
  }
  return store;
}

const CudaExpertStore::Expert* CudaExpertStore::Find(int layer, int expert) const {
  auto it = experts_.find({layer, expert});
  return it == experts_.end() ? nullptr : &it->second;
}

std::vector<std::pair<int, int>> CudaExpertStore::Held() const {
  std::vector<std::pair<int, int>> held;
  for (const auto& [key, _] : experts_) held.push_back(key);
  return held;
}

uint64_t CudaExpertStore::expert_bytes() const {
  return uint64_t{3} * config_.intermediate_size * config_.hidden_size *
         DeviceDTypeSize(WeightDType(precision_));
}

absl::Status ExpertForward(const CudaContext& ctx, const CudaExpertStore::Expert& expert,
                           const float* x, int tokens, float* gate_up, float* act,
                           __nv_bfloat16* bf16_scratch, size_t bf16_scratch_elems, float* out) {
  if (tokens == 0) return absl::OkStatus();
  const int F = expert.w2.cols;
  // gate_up[N, 2F] = x[N, D] · w13^T
  SY_RETURN_IF_ERROR(Linear(ctx, x, tokens, expert.w13.view(), gate_up, /*accumulate=*/false,
                            bf16_scratch, bf16_scratch_elems));
  // act[N, F] = silu(gate) ⊙ up
  SY_RETURN_IF_ERROR(LaunchSwiGlu(gate_up, tokens, F, act, ctx.stream()));
  // out[N, D] = act[N, F] · w2^T
  SY_RETURN_IF_ERROR(Linear(ctx, act, tokens, expert.w2.view(), out, /*accumulate=*/false,
                            bf16_scratch, bf16_scratch_elems));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// CudaModelRunner

absl::StatusOr<std::unique_ptr<CudaModelRunner>> CudaModelRunner::Create(
    std::unique_ptr<CudaContext> ctx, std::unique_ptr<CudaDenseModel> dense,
    std::unique_ptr<CudaExpertStore> experts, ExpertBackend* remote, GatewayMetrics* metrics) {
  if (ctx == nullptr || dense == nullptr) {
    return absl::InvalidArgumentError("CudaModelRunner needs a context and a dense model");
  }
  if ((experts == nullptr) == (remote == nullptr)) {
    return absl::InvalidArgumentError(
        "CudaModelRunner needs exactly one of GPU experts and an ExpertBackend");
  }
  if (experts != nullptr) {
    if (experts->config().Fingerprint() != dense->config().Fingerprint()) {
      return absl::InvalidArgumentError("the expert store and the dense model differ in config");
    }
    if (experts->precision() != dense->precision()) {
      // The step's BF16 scratch is sized by the dense model's precision.
      return absl::InvalidArgumentError(absl::StrCat(
          "the expert store is ", PrecisionName(experts->precision()), " but the dense model is ",
          PrecisionName(dense->precision()), ": load both in one precision"));
    }
    const ModelConfig& c = dense->config();
    for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
      for (int e = 0; e < c.num_local_experts; ++e) {
        if (experts->Find(layer, e) == nullptr) {
          return absl::InvalidArgumentError(absl::StrCat(
              "GPU experts: expert ", e, " of layer ", layer,
              " is not loaded (open the checkpoint with every expert, or pass an ExpertBackend)"));
        }
      }
    }
  }
  auto r = std::unique_ptr<CudaModelRunner>(new CudaModelRunner());
  r->ctx_ = std::move(ctx);
  r->dense_ = std::move(dense);
  r->experts_ = std::move(experts);
  r->remote_ = remote;
  r->metrics_ = metrics;
  return r;
}

absl::Status CudaModelRunner::EnsureStepBuffers(int tokens, int sequences, int logit_rows) {
  const ModelConfig& c = config();
  const size_t T = tokens, B = sequences, R = logit_rows;
  const size_t D = c.hidden_size, F = c.intermediate_size, E = c.num_local_experts;
  const size_t K = c.num_experts_per_tok, V = c.vocab_size;
  const size_t q_dim = c.q_dim(), qkv_dim = q_dim + 2 * static_cast<size_t>(c.kv_dim());
  const size_t TK = T * K;
  SY_RETURN_IF_ERROR(ids_.EnsureCapacity(T));
  SY_RETURN_IF_ERROR(positions_.EnsureCapacity(T));
  SY_RETURN_IF_ERROR(tok_seq_.EnsureCapacity(T));
  SY_RETURN_IF_ERROR(seqs_.EnsureCapacity(B));
  SY_RETURN_IF_ERROR(h_.EnsureCapacity(T * D));
  SY_RETURN_IF_ERROR(x_.EnsureCapacity(T * D));
  SY_RETURN_IF_ERROR(qkv_.EnsureCapacity(T * qkv_dim));
  SY_RETURN_IF_ERROR(attn_.EnsureCapacity(T * q_dim));
  SY_RETURN_IF_ERROR(router_logits_.EnsureCapacity(T * E));
  SY_RETURN_IF_ERROR(topk_experts_.EnsureCapacity(TK));
  SY_RETURN_IF_ERROR(topk_weights_.EnsureCapacity(TK));
  SY_RETURN_IF_ERROR(moe_index_.EnsureCapacity(3 * TK));
  SY_RETURN_IF_ERROR(moe_in_.EnsureCapacity(TK * D));
  SY_RETURN_IF_ERROR(moe_out_.EnsureCapacity(TK * D));
  if (experts_ != nullptr) {
    // One expert at a time: an expert gets at most T rows (a token's K experts differ).
    SY_RETURN_IF_ERROR(gate_up_.EnsureCapacity(T * 2 * F));
    SY_RETURN_IF_ERROR(act_.EnsureCapacity(T * F));
  }
  if (dense_->precision() == Precision::kBF16) {
    // GEMM inputs: x [T, D], attn [T, H hd], expert rows [<= T, D] and
    // [<= T, F], logit rows [R <= T, D].
    bf16_elems_ = T * std::max({D, q_dim, F});
    SY_RETURN_IF_ERROR(bf16_.EnsureCapacity(bf16_elems_));
  }
  SY_RETURN_IF_ERROR(logit_rows_.EnsureCapacity(R));
  SY_RETURN_IF_ERROR(logit_x_.EnsureCapacity(R * D));
  SY_RETURN_IF_ERROR(logits_.EnsureCapacity(R * V));
  SY_RETURN_IF_ERROR(h_topk_experts_.EnsureCapacity(TK));
  SY_RETURN_IF_ERROR(h_topk_weights_.EnsureCapacity(TK));
  SY_RETURN_IF_ERROR(h_router_logits_.EnsureCapacity(T * E));
  SY_RETURN_IF_ERROR(h_moe_index_.EnsureCapacity(3 * TK));
  if (remote_ != nullptr) {
    SY_RETURN_IF_ERROR(h_moe_in_.EnsureCapacity(TK * D));
    SY_RETURN_IF_ERROR(h_moe_out_.EnsureCapacity(TK * D));
  }
  return absl::OkStatus();
}

absl::StatusOr<DeviceKv*> CudaModelRunner::EnsureDeviceKv(SequenceKv* kv) {
  const ModelConfig& c = config();
  std::shared_ptr<void>& attachment = kv->attachment();
  if (attachment == nullptr) attachment = std::make_shared<DeviceKv>();
  auto* dkv = static_cast<DeviceKv*>(attachment.get());
  const int need = kv->reserved();
  if (dkv->capacity >= need) return dkv;

  const size_t kv_dim = c.kv_dim();
  const size_t planes = size_t{2} * c.num_hidden_layers;  // (layer, K|V)
  const size_t floats = planes * static_cast<size_t>(need) * kv_dim;
  auto fresh = DeviceBuffer<float>::Create(floats);
  if (!fresh.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("device KV cache: allocating ", floats * sizeof(float), " bytes for ", need,
                     " token slots failed: ", fresh.status().message()));
  }
  // Keep the cached positions: the first `keep` rows of every plane.
  const int keep = std::min(kv->length(), dkv->capacity);
  if (keep > 0) {
    SY_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(
        fresh->data(), static_cast<size_t>(need) * kv_dim * sizeof(float), dkv->buffer.data(),
        static_cast<size_t>(dkv->capacity) * kv_dim * sizeof(float),
        static_cast<size_t>(keep) * kv_dim * sizeof(float), planes, cudaMemcpyDeviceToDevice,
        ctx_->stream()));
    SY_RETURN_IF_ERROR(ctx_->Synchronize());  // before the old buffer is freed
  }
  dkv->buffer = std::move(*fresh);
  dkv->capacity = need;
  return dkv;
}

absl::StatusOr<StepOutput> CudaModelRunner::Step(absl::Span<const StepInput> inputs,
                                                 StepTrace* trace) {
  const ModelConfig& c = config();
  const int D = c.hidden_size, V = c.vocab_size;
  const cudaStream_t stream = ctx_->stream();

  // Validate, reserve and lay out the batch before any work (shared with the
  // CPU runner, so the checks and messages are the same).
  SY_ASSIGN_OR_RETURN(StepLayout layout, PrepareStep(c, inputs));
  const int tokens = layout.tokens;
  const std::vector<SequenceSlice>& slices = layout.slices;
  const int logit_rows = static_cast<int>(layout.logit_rows.size());

  SY_RETURN_IF_ERROR(ctx_->MakeCurrent());
  // Nothing of an earlier (failed) step may still run while buffers change.
  SY_RETURN_IF_ERROR(ctx_->Synchronize());

  const int B = static_cast<int>(slices.size());
  std::vector<SeqKvDesc> descs(B);
  for (int b = 0; b < B; ++b) {
    SY_ASSIGN_OR_RETURN(DeviceKv * dkv, EnsureDeviceKv(slices[b].kv));
    // kv_append drops rows past the capacity and attention would read past
    // the plane: never launch with a slice that does not fit.
    if (slices[b].start_pos + slices[b].tokens > dkv->capacity) {
      return absl::InternalError(absl::StrCat("device KV of input ", b, " holds ", dkv->capacity,
                                              " positions, the step writes up to ",
                                              slices[b].start_pos + slices[b].tokens));
    }
    descs[b].base = dkv->buffer.data();
    descs[b].capacity = dkv->capacity;
  }

  StepOutput out;
  out.logits_row_begin = layout.logits_row_begin;
  if (trace != nullptr) {
    trace->router_logits.assign(c.num_hidden_layers, {});
    trace->routing.assign(c.num_hidden_layers, {});
    for (Routing& r : trace->routing) r.top_k = c.num_experts_per_tok;
  }
  if (tokens == 0) return out;

  const std::vector<int32_t>& ids = layout.ids;              // [T]
  const std::vector<int32_t>& positions = layout.positions;  // [T]
  std::vector<int32_t> tok_seq(tokens);                      // [T]: the input each row belongs to
  for (int b = 0; b < B; ++b) {
    std::fill_n(tok_seq.begin() + slices[b].row_begin, slices[b].tokens, b);
  }
  const std::vector<int32_t> rows(layout.logit_rows.begin(), layout.logit_rows.end());  // [R]

  SY_RETURN_IF_ERROR(EnsureStepBuffers(tokens, B, logit_rows));
  SY_RETURN_IF_ERROR(CopyToDevice(ids_.data(), ids.data(), ids.size(), stream));
  SY_RETURN_IF_ERROR(CopyToDevice(positions_.data(), positions.data(), positions.size(), stream));
  SY_RETURN_IF_ERROR(CopyToDevice(tok_seq_.data(), tok_seq.data(), tok_seq.size(), stream));
  SY_RETURN_IF_ERROR(CopyToDevice(seqs_.data(), descs.data(), descs.size(), stream));

  // h[T, D] = embeddings
  const DeviceMatrix& embed = dense_->embed();
  if (embed.dtype == DeviceDType::kF32) {
    SY_RETURN_IF_ERROR(LaunchEmbeddingLookup(ids_.data(), tokens,
                                             reinterpret_cast<const float*>(embed.storage.data()),
                                             V, D, h_.data(), stream));
  } else {
    SY_RETURN_IF_ERROR(LaunchEmbeddingLookup(
        ids_.data(), tokens, reinterpret_cast<const __nv_bfloat16*>(embed.storage.data()), V, D,
        h_.data(), stream));
  }

  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    SY_RETURN_IF_ERROR(AttentionLayer(layer, tokens, B));
    SY_RETURN_IF_ERROR(MoeLayer(layer, tokens, &out.expert_tokens, trace));
  }

  // logits[R, V] = lm_head(rmsnorm(h[rows]))
  const int R = static_cast<int>(rows.size());
  if (R > 0) {
    SY_RETURN_IF_ERROR(CopyToDevice(logit_rows_.data(), rows.data(), rows.size(), stream));
    SY_RETURN_IF_ERROR(
        LaunchGatherRows(h_.data(), D, logit_rows_.data(), R, logit_x_.data(), stream));
    SY_RETURN_IF_ERROR(LaunchRmsNorm(logit_x_.data(), dense_->final_norm(), R, D,
                                     static_cast<float>(c.rms_norm_eps), logit_x_.data(), stream));
    SY_RETURN_IF_ERROR(Linear(*ctx_, logit_x_.data(), R, dense_->lm_head().view(), logits_.data(),
                              /*accumulate=*/false, bf16_.data(), bf16_elems_));
    out.logits.resize(static_cast<size_t>(R) * V);
    SY_RETURN_IF_ERROR(CopyToHost(out.logits.data(), logits_.data(), out.logits.size(), stream));
  }
  SY_RETURN_IF_ERROR(ctx_->Synchronize());

  for (const SequenceSlice& s : slices) s.kv->Commit(s.tokens);
  return out;
}

absl::Status CudaModelRunner::AttentionLayer(int layer, int tokens, int sequences) {
  const ModelConfig& c = config();
  const CudaDenseModel::Layer& w = dense_->layer(layer);
  const cudaStream_t stream = ctx_->stream();
  const int D = c.hidden_size, H = c.num_attention_heads, Hkv = c.num_key_value_heads;
  const int hd = c.head_dim, q_dim = c.q_dim(), kv_dim = c.kv_dim();
  const int qkv_dim = q_dim + 2 * kv_dim;

  // x[T, D] = rmsnorm(h)
  SY_RETURN_IF_ERROR(LaunchRmsNorm(h_.data(), w.input_norm.data(), tokens, D,
                                   static_cast<float>(c.rms_norm_eps), x_.data(), stream));
  // qkv[T, (H + 2 Hkv) hd] = x · Wqkv^T
  SY_RETURN_IF_ERROR(Linear(*ctx_, x_.data(), tokens, w.wqkv.view(), qkv_.data(),
                            /*accumulate=*/false, bf16_.data(), bf16_elems_));
  // RoPE on q and k at once: per row H + Hkv consecutive heads.
  SY_RETURN_IF_ERROR(LaunchRopeRotateHalf(qkv_.data(), qkv_dim, positions_.data(), tokens, H + Hkv,
                                          hd, dense_->rope_inv_freq(), stream));
  // This step's k, v into each sequence's cache, then attention over it.
  SY_RETURN_IF_ERROR(LaunchKvAppend(qkv_.data(), qkv_dim, /*k_offset=*/q_dim,
                                    /*v_offset=*/q_dim + kv_dim, tokens, kv_dim, seqs_.data(),
                                    tok_seq_.data(), positions_.data(), layer, stream));
  // attn[T, H, hd]
  SY_RETURN_IF_ERROR(LaunchAttention(qkv_.data(), qkv_dim, tokens, H, Hkv, hd, c.sliding_window,
                                     seqs_.data(), tok_seq_.data(), positions_.data(), layer,
                                     attn_.data(), stream));
  // h[T, D] += attn[T, H hd] · Wo^T
  SY_RETURN_IF_ERROR(Linear(*ctx_, attn_.data(), tokens, w.wo.view(), h_.data(),
                            /*accumulate=*/true, bf16_.data(), bf16_elems_));
  (void)sequences;
  return absl::OkStatus();
}

absl::Status CudaModelRunner::MoeLayer(int layer, int tokens, int64_t* expert_tokens,
                                       StepTrace* trace) {
  const ModelConfig& c = config();
  const CudaDenseModel::Layer& w = dense_->layer(layer);
  const cudaStream_t stream = ctx_->stream();
  const int T = tokens, D = c.hidden_size, E = c.num_local_experts, K = c.num_experts_per_tok;
  const int TK = T * K;

  // x[T, D] = rmsnorm(h); router_logits[T, E] = x · gate^T; top-K on the device.
  SY_RETURN_IF_ERROR(LaunchRmsNorm(h_.data(), w.post_norm.data(), T, D,
                                   static_cast<float>(c.rms_norm_eps), x_.data(), stream));
  SY_RETURN_IF_ERROR(Linear(*ctx_, x_.data(), T, w.gate.view(), router_logits_.data(),
                            /*accumulate=*/false, nullptr, 0));
  SY_RETURN_IF_ERROR(LaunchRouterTopK(router_logits_.data(), T, E, K, topk_experts_.data(),
                                      topk_weights_.data(), stream));
  SY_RETURN_IF_ERROR(CopyToHost(h_topk_experts_.data(), topk_experts_.data(), TK, stream));
  SY_RETURN_IF_ERROR(CopyToHost(h_topk_weights_.data(), topk_weights_.data(), TK, stream));
  if (trace != nullptr) {
    SY_RETURN_IF_ERROR(CopyToHost(h_router_logits_.data(), router_logits_.data(),
                                  static_cast<size_t>(T) * E, stream));
  }
  SY_RETURN_IF_ERROR(ctx_->Synchronize());
  const int32_t* chosen = h_topk_experts_.data();  // [T, K]
  const float* weights = h_topk_weights_.data();   // [T, K]

  // Group the (token, slot) pairs by expert, tokens in order within an
  // expert (the CPU runner's batches). Row i of moe_in/moe_out is expert
  // e's (i - offset[e])-th token.
  std::vector<int> count(E, 0), offset(E + 1, 0);
  for (int i = 0; i < TK; ++i) {
    if (chosen[i] < 0 || chosen[i] >= E) {
      return absl::InternalError(absl::StrCat("router returned expert ", chosen[i]));
    }
    ++count[chosen[i]];
  }
  for (int e = 0; e < E; ++e) offset[e + 1] = offset[e] + count[e];
  int32_t* gather = h_moe_index_.data();  // [T K]: source token of row i
  int32_t* combine_src = gather + TK;     // [T, K]: rows of token t, expert order
  float* combine_w = reinterpret_cast<float*>(gather + 2 * TK);  // [T, K]: their weights
  std::vector<int> cursor(offset.begin(), offset.end() - 1);
  std::vector<std::array<int, 3>> mine(K);  // (expert, row, slot) of one token
  for (int t = 0; t < T; ++t) {
    for (int k = 0; k < K; ++k) {
      const int e = chosen[t * K + k];
      const int row = cursor[e]++;
      gather[row] = t;
      mine[k] = {e, row, k};
    }
    // The reference sums a token's expert outputs in expert-index order.
    std::sort(mine.begin(), mine.end());
    for (int k = 0; k < K; ++k) {
      combine_src[t * K + k] = mine[k][1];
      combine_w[t * K + k] = weights[t * K + mine[k][2]];
    }
  }
  SY_RETURN_IF_ERROR(CopyToDevice(moe_index_.data(), h_moe_index_.data(), 3 * TK, stream));
  // moe_in[T K, D] = x rows grouped by expert
  SY_RETURN_IF_ERROR(LaunchGatherRows(x_.data(), D, moe_index_.data(), TK, moe_in_.data(), stream));

  if (experts_ != nullptr) {
    for (int e = 0; e < E; ++e) {
      if (count[e] == 0) continue;
      const CudaExpertStore::Expert* expert = experts_->Find(layer, e);
      if (expert == nullptr) {
        return absl::NotFoundError(
            absl::StrCat("expert ", e, " of layer ", layer, " is not loaded in this process"));
      }
      const int64_t off = static_cast<int64_t>(offset[e]) * D;
      SY_RETURN_IF_ERROR(ExpertForward(*ctx_, *expert, moe_in_.data() + off, count[e],
                                       gate_up_.data(), act_.data(), bf16_.data(), bf16_elems_,
                                       moe_out_.data() + off));
    }
  } else {
    // Experts elsewhere: rows to the host, the backend, outputs back.
    const size_t n = static_cast<size_t>(TK) * D;
    SY_RETURN_IF_ERROR(CopyToHost(h_moe_in_.data(), moe_in_.data(), n, stream));
    SY_RETURN_IF_ERROR(ctx_->Synchronize());
    std::vector<ExpertBatch> batches;
    for (int e = 0; e < E; ++e) {
      if (count[e] == 0) continue;
      const int64_t off = static_cast<int64_t>(offset[e]) * D;
      batches.push_back({e, count[e], h_moe_in_.data() + off, h_moe_out_.data() + off});
    }
    SY_RETURN_IF_ERROR(remote_->RunLayer(layer, batches));
    SY_RETURN_IF_ERROR(CopyToDevice(moe_out_.data(), h_moe_out_.data(), n, stream));
  }
  for (int e = 0; e < E; ++e) {
    if (count[e] == 0) continue;
    *expert_tokens += count[e];
    if (metrics_ != nullptr) metrics_->RoutedTokens(layer, e).Increment(count[e]);
  }

  // h[T, D] += Σ_k w[t, k] · moe_out[combine_src[t, k]]
  SY_RETURN_IF_ERROR(LaunchMoeCombine(moe_out_.data(), moe_index_.data() + TK,
                                      reinterpret_cast<const float*>(moe_index_.data() + 2 * TK), T,
                                      K, D, h_.data(), stream));

  if (trace != nullptr) {
    trace->router_logits[layer].assign(h_router_logits_.data(),
                                       h_router_logits_.data() + static_cast<size_t>(T) * E);
    Routing& r = trace->routing[layer];
    r.tokens = T;
    r.top_k = K;
    r.experts.assign(chosen, chosen + TK);
    r.weights.assign(weights, weights + TK);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// CudaExpertBackend

absl::StatusOr<std::unique_ptr<CudaExpertBackend>> CudaExpertBackend::Create(
    std::unique_ptr<CudaContext> ctx, std::unique_ptr<CudaExpertStore> store) {
  if (ctx == nullptr || store == nullptr) {
    return absl::InvalidArgumentError("CudaExpertBackend needs a context and an expert store");
  }
  auto b = std::unique_ptr<CudaExpertBackend>(new CudaExpertBackend());
  auto device = DescribeDevice(ctx->device());
  b->description_ = absl::StrCat(
      "cuda (", device.ok() ? *device : "device " + std::to_string(ctx->device()), ", ",
      PrecisionName(store->precision()), ", ", store->Held().size(), " layer-experts)");
  b->ctx_ = std::move(ctx);
  b->store_ = std::move(store);
  return b;
}

absl::Status CudaExpertBackend::RunLayer(int layer, absl::Span<const ExpertBatch> batches) {
  std::lock_guard<std::mutex> lock(mu_);
  const ModelConfig& c = store_->config();
  const int D = c.hidden_size, F = c.intermediate_size;
  std::vector<const CudaExpertStore::Expert*> experts;
  size_t rows = 0;
  int max_rows = 0;
  for (const ExpertBatch& b : batches) {
    const CudaExpertStore::Expert* expert = store_->Find(layer, b.expert);
    if (expert == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("expert ", b.expert, " of layer ", layer, " is not loaded in this process"));
    }
    if (b.tokens < 0) return absl::InvalidArgumentError("expert batch with negative tokens");
    experts.push_back(expert);
    rows += b.tokens;
    max_rows = std::max(max_rows, b.tokens);
  }
  if (rows == 0) return absl::OkStatus();
  const cudaStream_t stream = ctx_->stream();
  SY_RETURN_IF_ERROR(ctx_->MakeCurrent());
  SY_RETURN_IF_ERROR(ctx_->Synchronize());  // nothing may still use the buffers

  const size_t n = rows * D;
  SY_RETURN_IF_ERROR(in_.EnsureCapacity(n));
  SY_RETURN_IF_ERROR(out_.EnsureCapacity(n));
  SY_RETURN_IF_ERROR(gate_up_.EnsureCapacity(static_cast<size_t>(max_rows) * 2 * F));
  SY_RETURN_IF_ERROR(act_.EnsureCapacity(static_cast<size_t>(max_rows) * F));
  size_t bf16_elems = 0;
  if (store_->precision() == Precision::kBF16) {
    bf16_elems = static_cast<size_t>(max_rows) * std::max(D, F);
    SY_RETURN_IF_ERROR(bf16_.EnsureCapacity(bf16_elems));
  }
  SY_RETURN_IF_ERROR(h_in_.EnsureCapacity(n));
  SY_RETURN_IF_ERROR(h_out_.EnsureCapacity(n));

  size_t off = 0;
  for (const ExpertBatch& b : batches) {
    std::memcpy(h_in_.data() + off, b.input, static_cast<size_t>(b.tokens) * D * sizeof(float));
    off += static_cast<size_t>(b.tokens) * D;
  }
  SY_RETURN_IF_ERROR(CopyToDevice(in_.data(), h_in_.data(), n, stream));
  off = 0;
  for (size_t i = 0; i < batches.size(); ++i) {
    SY_RETURN_IF_ERROR(ExpertForward(*ctx_, *experts[i], in_.data() + off, batches[i].tokens,
                                     gate_up_.data(), act_.data(), bf16_.data(), bf16_elems,
                                     out_.data() + off));
    off += static_cast<size_t>(batches[i].tokens) * D;
  }
  SY_RETURN_IF_ERROR(CopyToHost(h_out_.data(), out_.data(), n, stream));
  SY_RETURN_IF_ERROR(ctx_->Synchronize());
  off = 0;
  for (const ExpertBatch& b : batches) {
    std::memcpy(b.output, h_out_.data() + off, static_cast<size_t>(b.tokens) * D * sizeof(float));
    off += static_cast<size_t>(b.tokens) * D;
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Factories

absl::StatusOr<std::unique_ptr<StepRunner>> MakeCudaRunner(const Checkpoint& checkpoint,
                                                           Precision precision,
                                                           ExpertBackend* remote_or_null,
                                                           GatewayMetrics* metrics, int device) {
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaContext> ctx, CudaContext::Create(device));
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaDenseModel> dense,
                      CudaDenseModel::Load(checkpoint, precision));
  std::unique_ptr<CudaExpertStore> experts;
  if (remote_or_null == nullptr) {
    SY_ASSIGN_OR_RETURN(experts, CudaExpertStore::Load(checkpoint, precision));
  }
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaModelRunner> runner,
                      CudaModelRunner::Create(std::move(ctx), std::move(dense), std::move(experts),
                                              remote_or_null, metrics));
  return std::unique_ptr<StepRunner>(std::move(runner));
}

absl::StatusOr<std::unique_ptr<ExpertBackend>> MakeCudaExpertBackend(const Checkpoint& checkpoint,
                                                                     Precision precision,
                                                                     int device) {
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaContext> ctx, CudaContext::Create(device));
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaExpertStore> store,
                      CudaExpertStore::Load(checkpoint, precision));
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaExpertBackend> backend,
                      CudaExpertBackend::Create(std::move(ctx), std::move(store)));
  return std::unique_ptr<ExpertBackend>(std::move(backend));
}

absl::StatusOr<int64_t> DeviceKvTokensThatFit(const ModelConfig& config, double fraction,
                                              int device) {
  SY_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  size_t free_bytes = 0, total_bytes = 0;
  SY_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  const double per_token =
      2.0 * config.num_hidden_layers * static_cast<double>(config.kv_dim()) * sizeof(float);
  return static_cast<int64_t>(static_cast<double>(free_bytes) * fraction / per_token);
}

}  // namespace switchyard::cuda
