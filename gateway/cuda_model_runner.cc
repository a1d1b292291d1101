#include "gateway/cuda_model_runner.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "cuda/kernels/gather_rows.h"
#include "cuda/kernels/moe_combine.h"
#include "cuda/status.h"
#include "gateway/moe_dispatch.h"

namespace switchyard::cuda {

absl::StatusOr<std::unique_ptr<CudaModelRunner>> CudaModelRunner::Create(
    std::unique_ptr<CudaContext> ctx, std::unique_ptr<CudaDenseModel> dense,
    std::unique_ptr<CudaExpertStore> experts, ExpertBackend* remote, RoutingObserver* observer) {
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
  r->observer_ = observer;
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

KvDType DeviceKvDType(Precision precision) {
  return precision == Precision::kBF16 ? KvDType::kBF16 : KvDType::kF32;
}

int64_t DeviceKvSlabBytes(const ModelConfig& config, KvDType dtype, int64_t blocks) {
  const int64_t elem = dtype == KvDType::kBF16 ? 2 : 4;
  return blocks * PagedKvBlockElems(config.num_hidden_layers, config.kv_dim()) * elem;
}

absl::StatusOr<DeviceKvSlab*> AttachDeviceKvSlab(KvCachePool& pool, KvDType dtype, int device) {
  static_assert(kKvBlockTokens == KvCachePool::kBlockTokens,
                "the device slab's blocks must be the pool's blocks");
  if (pool.host_storage()) {
    return absl::FailedPreconditionError(
        "the CUDA runner needs a KvCachePool built with host_storage = false");
  }
  auto* slab = static_cast<DeviceKvSlab*>(pool.attachment().get());
  if (slab == nullptr) {
    const ModelConfig& c = pool.config();
    const int64_t bytes = DeviceKvSlabBytes(c, dtype, pool.total_blocks());
    SY_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    auto fresh = std::make_shared<DeviceKvSlab>();
    if (absl::Status s = fresh->storage.EnsureCapacity(static_cast<size_t>(bytes)); !s.ok()) {
      return absl::Status(s.code(),
                          absl::StrCat("device KV cache: ", pool.total_blocks(), " blocks of ",
                                       KvCachePool::kBlockTokens, " token slots (", bytes,
                                       " bytes) do not fit on device ", device,
                                       " (lower the KV cache budget): ", s.message()));
    }
    fresh->dtype = dtype;
    fresh->blocks = pool.total_blocks();
    fresh->layers = c.num_hidden_layers;
    fresh->kv_dim = c.kv_dim();
    fresh->device = device;
    slab = static_cast<DeviceKvSlab*>(pool.SetAttachmentIfUnset(std::move(fresh)).get());
  }
  if (slab->dtype != dtype || slab->device != device) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the KV pool's device slab is ", slab->dtype == KvDType::kBF16 ? "BF16" : "FP32",
        " on device ", slab->device, ", this runner needs ",
        dtype == KvDType::kBF16 ? "BF16" : "FP32", " on device ", device,
        ": give each runner precision and device its own pool"));
  }
  return slab;
}

absl::StatusOr<StepOutput> CudaModelRunner::Step(absl::Span<const StepInput> inputs,
                                                 StepTrace* trace) {
  return RunStepContainingExpertFailures(
      inputs, [&](absl::Span<const StepInput> live) { return StepOnce(live, trace); });
}

absl::StatusOr<StepOutput> CudaModelRunner::StepOnce(absl::Span<const StepInput> inputs,
                                                     StepTrace* trace) {
  const ModelConfig& c = config();
  const int V = c.vocab_size;
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

  // The step's block tables, concatenated; block ids index the pool's slab.
  const int B = static_cast<int>(slices.size());
  std::vector<SeqKvDesc> descs(B);
  std::vector<int32_t> tables;
  DeviceKvSlab* slab = nullptr;
  for (int b = 0; b < B; ++b) {
    KvCachePool& pool = slices[b].kv->pool();
    if (b > 0 && &pool != &slices[0].kv->pool()) {
      return absl::InvalidArgumentError(
          absl::StrCat("input ", b, "'s KV cache is from another pool than input 0's"));
    }
    if (b == 0) {
      SY_ASSIGN_OR_RETURN(slab, AttachDeviceKvSlab(pool, kv_dtype(), ctx_->device()));
    }
    const std::vector<int32_t>& table = slices[b].kv->block_table();
    // kv_append drops rows past the table and attention would read past it:
    // never launch with a slice that does not fit.
    if (slices[b].start_pos + slices[b].tokens >
        static_cast<int64_t>(table.size()) * kKvBlockTokens) {
      return absl::InternalError(absl::StrCat("input ", b, " holds ", table.size(),
                                              " KV blocks, the step writes up to position ",
                                              slices[b].start_pos + slices[b].tokens));
    }
    descs[b].table_begin = static_cast<int32_t>(tables.size());
    descs[b].num_blocks = static_cast<int32_t>(table.size());
    tables.insert(tables.end(), table.begin(), table.end());
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
  SY_RETURN_IF_ERROR(block_tables_.EnsureCapacity(std::max<size_t>(tables.size(), 1)));
  SY_RETURN_IF_ERROR(CopyToDevice(block_tables_.data(), tables.data(), tables.size(), stream));
  SY_RETURN_IF_ERROR(CopyToDevice(ids_.data(), ids.data(), ids.size(), stream));
  SY_RETURN_IF_ERROR(CopyToDevice(positions_.data(), positions.data(), positions.size(), stream));
  SY_RETURN_IF_ERROR(CopyToDevice(tok_seq_.data(), tok_seq.data(), tok_seq.size(), stream));
  SY_RETURN_IF_ERROR(CopyToDevice(seqs_.data(), descs.data(), descs.size(), stream));

  // h[T, D] = embeddings
  SY_RETURN_IF_ERROR(dense_->Embed(*ctx_, ids_.data(), tokens, h_.data()));

  CudaDenseModel::AttentionStep attention;
  attention.tokens = tokens;
  attention.positions = positions_.data();
  attention.tok_seq = tok_seq_.data();
  attention.kv.slab = slab->storage.data();
  attention.kv.dtype = slab->dtype;
  attention.kv.layers = slab->layers;
  attention.kv.block_tables = block_tables_.data();
  attention.kv.seqs = seqs_.data();
  attention.x = x_.data();
  attention.qkv = qkv_.data();
  attention.attn = attn_.data();
  attention.bf16 = bf16_.data();
  attention.bf16_elems = bf16_elems_;
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    SY_RETURN_IF_ERROR(dense_->AttentionBlock(*ctx_, layer, attention, h_.data()));
    SY_RETURN_IF_ERROR(
        MoeLayer(layer, tokens, slices, &out.expert_tokens, trace, &out.sequence_status));
    if (!out.sequence_status.empty()) {
      // Nothing committed (see StepAttempt); the stream is idle again.
      SY_RETURN_IF_ERROR(ctx_->Synchronize());
      return out;
    }
  }

  // logits[R, V] = lm_head(rmsnorm(h[rows]))
  const int R = static_cast<int>(rows.size());
  if (R > 0) {
    SY_RETURN_IF_ERROR(CopyToDevice(logit_rows_.data(), rows.data(), rows.size(), stream));
    SY_RETURN_IF_ERROR(dense_->Logits(*ctx_, h_.data(), logit_rows_.data(), R, logit_x_.data(),
                                      logits_.data(), bf16_.data(), bf16_elems_));
    out.logits.resize(static_cast<size_t>(R) * V);
    SY_RETURN_IF_ERROR(CopyToHost(out.logits.data(), logits_.data(), out.logits.size(), stream));
  }
  SY_RETURN_IF_ERROR(ctx_->Synchronize());

  for (const SequenceSlice& s : slices) s.kv->Commit(s.tokens);
  return out;
}

absl::Status CudaModelRunner::MoeLayer(int layer, int tokens,
                                       absl::Span<const SequenceSlice> slices,
                                       int64_t* expert_tokens, StepTrace* trace,
                                       std::vector<absl::Status>* sequence_status) {
  const ModelConfig& c = config();
  const cudaStream_t stream = ctx_->stream();
  const int T = tokens, D = c.hidden_size, E = c.num_local_experts, K = c.num_experts_per_tok;
  const int TK = T * K;

  // x[T, D] = rmsnorm(h); router_logits[T, E] = x · gate^T; top-K on the device.
  SY_RETURN_IF_ERROR(dense_->RouterInput(*ctx_, layer, h_.data(), T, x_.data(),
                                         router_logits_.data(), topk_experts_.data(),
                                         topk_weights_.data()));
  SY_RETURN_IF_ERROR(CopyToHost(h_topk_experts_.data(), topk_experts_.data(), TK, stream));
  SY_RETURN_IF_ERROR(CopyToHost(h_topk_weights_.data(), topk_weights_.data(), TK, stream));
  if (trace != nullptr) {
    SY_RETURN_IF_ERROR(CopyToHost(h_router_logits_.data(), router_logits_.data(),
                                  static_cast<size_t>(T) * E, stream));
  }
  SY_RETURN_IF_ERROR(ctx_->Synchronize());
  const int32_t* chosen = h_topk_experts_.data();  // [T, K]
  const float* weights = h_topk_weights_.data();   // [T, K]

  // The dispatch plan (the CPU runner's): row i of moe_in/moe_out is
  // expert e's (i - offset[e])-th token.
  SY_ASSIGN_OR_RETURN(MoeDispatch plan, PlanMoeDispatch(absl::MakeConstSpan(chosen, TK),
                                                        absl::MakeConstSpan(weights, TK), T, K, E));
  int32_t* gather = h_moe_index_.data();  // [T K]: source token of row i
  int32_t* combine_src = gather + TK;     // [T, K]: rows of token t, expert order
  float* combine_w = reinterpret_cast<float*>(gather + 2 * TK);  // [T, K]: their weights
  std::copy(plan.gather.begin(), plan.gather.end(), gather);
  std::copy(plan.combine_rows.begin(), plan.combine_rows.end(), combine_src);
  std::copy(plan.combine_weights.begin(), plan.combine_weights.end(), combine_w);
  for (int e = 0; e < E; ++e) {
    if (plan.rows(e) == 0) continue;
    *expert_tokens += plan.rows(e);
    if (observer_ != nullptr) observer_->OnExpertTokens(layer, e, plan.rows(e));
  }
  SY_RETURN_IF_ERROR(CopyToDevice(moe_index_.data(), h_moe_index_.data(), 3 * TK, stream));
  // moe_in[T K, D] = x rows grouped by expert
  SY_RETURN_IF_ERROR(LaunchGatherRows(x_.data(), D, moe_index_.data(), TK, moe_in_.data(), stream));

  if (experts_ != nullptr) {
    for (int e = 0; e < E; ++e) {
      if (plan.rows(e) == 0) continue;
      const CudaExpertStore::Expert* expert = experts_->Find(layer, e);
      if (expert == nullptr) {
        return absl::NotFoundError(
            absl::StrCat("expert ", e, " of layer ", layer, " is not loaded in this process"));
      }
      const int64_t off = static_cast<int64_t>(plan.offset[e]) * D;
      SY_RETURN_IF_ERROR(ExpertForward(*ctx_, *expert, moe_in_.data() + off, plan.rows(e),
                                       gate_up_.data(), act_.data(), bf16_.data(), bf16_elems_,
                                       moe_out_.data() + off));
    }
  } else {
    // Experts elsewhere: rows to the host, the backend, outputs back.
    const size_t n = static_cast<size_t>(TK) * D;
    SY_RETURN_IF_ERROR(CopyToHost(h_moe_in_.data(), moe_in_.data(), n, stream));
    SY_RETURN_IF_ERROR(ctx_->Synchronize());
    const std::vector<ExpertBatch> batches =
        ExpertBatches(plan, h_moe_in_.data(), h_moe_out_.data(), D);
    std::vector<absl::Status> batch_status;
    SY_RETURN_IF_ERROR(remote_->RunLayerPerBatch(layer, batches, &batch_status));
    if (std::any_of(batch_status.begin(), batch_status.end(),
                    [](const absl::Status& s) { return !s.ok(); })) {
      *sequence_status = SequencesOfFailedBatches(plan, batches, batch_status, slices);
      return absl::OkStatus();
    }
    SY_RETURN_IF_ERROR(CopyToDevice(moe_out_.data(), h_moe_out_.data(), n, stream));
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
// Factory

absl::StatusOr<std::unique_ptr<StepRunner>> MakeCudaRunner(const Checkpoint& checkpoint,
                                                           Precision precision,
                                                           ExpertBackend* remote_or_null,
                                                           RoutingObserver* observer, int device) {
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaContext> ctx, CudaContext::Create(device));
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaDenseModel> dense,
                      CudaDenseModel::Load(checkpoint, precision));
  std::unique_ptr<CudaExpertStore> experts;
  if (remote_or_null == nullptr) {
    SY_ASSIGN_OR_RETURN(experts, CudaExpertStore::Load(checkpoint, precision));
  }
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaModelRunner> runner,
                      CudaModelRunner::Create(std::move(ctx), std::move(dense), std::move(experts),
                                              remote_or_null, observer));
  return std::unique_ptr<StepRunner>(std::move(runner));
}

}  // namespace switchyard::cuda
