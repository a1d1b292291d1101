#include "expert_service/cuda_experts.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/tensor_names.h"
#include "cuda/kernels/swiglu.h"
#include "cuda/upload.h"

namespace switchyard::cuda {

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

}  // namespace switchyard::cuda
