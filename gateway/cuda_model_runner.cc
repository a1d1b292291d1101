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

// One micro-batch of a step: whole sequences, rows [row_begin, row_begin +
// tokens) of the step, hence rows [row_begin K, (row_begin + tokens) K) of
// the grouped expert buffers and its own part of every index buffer.
struct CudaModelRunner::MicroBatch {
  int index = 0;
  int row_begin = 0;
  int tokens = 0;
  int slice_begin = 0;                // its first input
  std::vector<SequenceSlice> slices;  // row_begin relative to the micro-batch
  MoeDispatch plan;
  std::vector<ExpertBatch> batches;
  std::vector<absl::Status> batch_status;
  std::future<absl::Status> experts;  // valid while its expert calls may run
};

namespace {

std::future<absl::Status> Ready(absl::Status status) {
  std::promise<absl::Status> done;
  done.set_value(std::move(status));
  return done.get_future();
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaModelRunner>> CudaModelRunner::Create(
    std::unique_ptr<CudaContext> ctx, std::unique_ptr<CudaDenseModel> dense,
    std::unique_ptr<CudaExpertStore> experts, ExpertBackend* remote, RoutingObserver* observer,
    int max_micro_batches) {
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
  r->max_micro_batches_ = std::max(1, max_micro_batches);
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
    const size_t TE = static_cast<size_t>(tokens) * c.num_local_experts;
    const size_t TK = static_cast<size_t>(tokens) * c.num_experts_per_tok;
    trace->router_logits.assign(c.num_hidden_layers, std::vector<float>(TE));
    trace->routing.assign(c.num_hidden_layers, {});
    for (Routing& r : trace->routing) {
      r.tokens = tokens;
      r.top_k = c.num_experts_per_tok;
      r.experts.resize(TK);
      r.weights.resize(TK);
    }
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

  const std::vector<int> bounds = SplitIntoMicroBatches(slices, tokens, max_micro_batches_);
  const int M = static_cast<int>(bounds.size()) - 1;
  const bool overlap = M > 1 && remote_ != nullptr;
  while (static_cast<int>(routed_.size()) < M) {
    SY_ASSIGN_OR_RETURN(CudaEvent event, CudaEvent::Create());
    routed_.push_back(std::move(event));
  }
  std::vector<MicroBatch> mbs(M);
  for (int m = 0; m < M; ++m) {
    MicroBatch& mb = mbs[m];
    mb.index = m;
    mb.slice_begin = bounds[m];
    mb.row_begin = slices[bounds[m]].row_begin;
    for (int b = bounds[m]; b < bounds[m + 1]; ++b) {
      SequenceSlice s = slices[b];
      s.row_begin -= mb.row_begin;
      mb.tokens += s.tokens;
      mb.slices.push_back(s);
    }
  }

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
  // Per layer, each micro-batch in turn: finish its previous layer, start
  // this one. An error or a failed expert stops the step (nothing committed,
  // see StepAttempt) once every call in flight is done with the buffers.
  absl::Status status;
  for (int layer = 0; layer < c.num_hidden_layers && status.ok(); ++layer) {
    for (MicroBatch& mb : mbs) {
      if (mb.experts.valid()) status = FinishLayer(mb, B, &out.sequence_status);
      if (!status.ok() || !out.sequence_status.empty()) break;
      status = StartLayer(mb, layer, attention, overlap, &out.expert_tokens, trace);
      if (!status.ok()) break;
    }
    if (!out.sequence_status.empty()) break;
  }
  for (MicroBatch& mb : mbs) {
    if (!mb.experts.valid()) continue;
    if (status.ok()) {
      status = FinishLayer(mb, B, &out.sequence_status);  // records late failures too
    } else {
      mb.experts.wait();  // its buffers stay in use until then
    }
  }
  if (!status.ok() || !out.sequence_status.empty()) {
    // Nothing committed (see StepAttempt); the stream is idle again.
    const absl::Status idle = ctx_->Synchronize();
    SY_RETURN_IF_ERROR(status);
    SY_RETURN_IF_ERROR(idle);
    return out;
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

absl::Status CudaModelRunner::StartLayer(MicroBatch& mb, int layer,
                                         const CudaDenseModel::AttentionStep& step, bool overlap,
                                         int64_t* expert_tokens, StepTrace* trace) {
  const ModelConfig& c = config();
  const cudaStream_t stream = ctx_->stream();
  const int T = mb.tokens, D = c.hidden_size, E = c.num_local_experts, K = c.num_experts_per_tok;
  const int TK = T * K;
  const int64_t r0 = mb.row_begin;
  float* h = h_.data() + r0 * D;                          // [T, D] of this micro-batch
  float* x = x_.data() + r0 * D;                          // [T, D]
  float* router_logits = router_logits_.data() + r0 * E;  // [T, E]
  int32_t* topk_experts = topk_experts_.data() + r0 * K;  // [T, K]
  float* topk_weights = topk_weights_.data() + r0 * K;    // [T, K]
  int32_t* moe_index = moe_index_.data() + 3 * r0 * K;    // [3 T K]
  int32_t* h_moe_index = h_moe_index_.data() + 3 * r0 * K;
  const int64_t grouped = r0 * K * D;  // first element of its grouped rows

  CudaDenseModel::AttentionStep a = step;
  a.tokens = T;
  a.positions = positions_.data() + r0;
  a.tok_seq = tok_seq_.data() + r0;  // indexes the step's sequences, as seqs does
  a.x = x;
  a.qkv = qkv_.data() + r0 * (c.q_dim() + 2 * static_cast<int64_t>(c.kv_dim()));
  a.attn = attn_.data() + r0 * c.q_dim();
  SY_RETURN_IF_ERROR(dense_->AttentionBlock(*ctx_, layer, a, h));

  // x[T, D] = rmsnorm(h); router_logits[T, E] = x · gate^T; top-K on the device.
  SY_RETURN_IF_ERROR(
      dense_->RouterInput(*ctx_, layer, h, T, x, router_logits, topk_experts, topk_weights));
  int32_t* chosen = h_topk_experts_.data() + r0 * K;  // [T, K]
  float* weights = h_topk_weights_.data() + r0 * K;   // [T, K]
  float* h_router_logits = h_router_logits_.data() + r0 * E;
  SY_RETURN_IF_ERROR(CopyToHost(chosen, topk_experts, TK, stream));
  SY_RETURN_IF_ERROR(CopyToHost(weights, topk_weights, TK, stream));
  if (trace != nullptr) {
    SY_RETURN_IF_ERROR(
        CopyToHost(h_router_logits, router_logits, static_cast<size_t>(T) * E, stream));
  }
  // The host needs this micro-batch's routing; the other micro-batches'
  // expert calls stay in flight meanwhile.
  CudaEvent& routed = routed_[mb.index];
  SY_RETURN_IF_ERROR(routed.Record(stream));
  SY_RETURN_IF_ERROR(routed.Synchronize());

  // The dispatch plan (the CPU runner's): row i of its moe_in/moe_out part
  // is expert e's (i - offset[e])-th token.
  SY_ASSIGN_OR_RETURN(mb.plan, PlanMoeDispatch(absl::MakeConstSpan(chosen, TK),
                                               absl::MakeConstSpan(weights, TK), T, K, E));
  const MoeDispatch& plan = mb.plan;
  int32_t* gather = h_moe_index;       // [T K]: source token of row i
  int32_t* combine_src = gather + TK;  // [T, K]: rows of token t, expert order
  float* combine_w = reinterpret_cast<float*>(gather + 2 * TK);  // [T, K]: their weights
  std::copy(plan.gather.begin(), plan.gather.end(), gather);
  std::copy(plan.combine_rows.begin(), plan.combine_rows.end(), combine_src);
  std::copy(plan.combine_weights.begin(), plan.combine_weights.end(), combine_w);
  for (int e = 0; e < E; ++e) {
    if (plan.rows(e) == 0) continue;
    *expert_tokens += plan.rows(e);
    if (observer_ != nullptr) observer_->OnExpertTokens(layer, e, plan.rows(e));
  }
  if (trace != nullptr) {
    std::copy(h_router_logits, h_router_logits + static_cast<size_t>(T) * E,
              trace->router_logits[layer].begin() + r0 * E);
    Routing& r = trace->routing[layer];
    std::copy(chosen, chosen + TK, r.experts.begin() + r0 * K);
    std::copy(weights, weights + TK, r.weights.begin() + r0 * K);
  }
  SY_RETURN_IF_ERROR(CopyToDevice(moe_index, h_moe_index, 3 * TK, stream));
  // moe_in[T K, D] = x rows grouped by expert
  SY_RETURN_IF_ERROR(LaunchGatherRows(x, D, moe_index, TK, moe_in_.data() + grouped, stream));

  if (experts_ != nullptr) {
    for (int e = 0; e < E; ++e) {
      if (plan.rows(e) == 0) continue;
      const CudaExpertStore::Expert* expert = experts_->Find(layer, e);
      if (expert == nullptr) {
        return absl::NotFoundError(
            absl::StrCat("expert ", e, " of layer ", layer, " is not loaded in this process"));
      }
      const int64_t off = grouped + static_cast<int64_t>(plan.offset[e]) * D;
      SY_RETURN_IF_ERROR(ExpertForward(*ctx_, *expert, moe_in_.data() + off, plan.rows(e),
                                       gate_up_.data(), act_.data(), bf16_.data(), bf16_elems_,
                                       moe_out_.data() + off));
    }
    mb.experts = Ready(absl::OkStatus());
    return absl::OkStatus();
  }
  // Experts elsewhere: rows to the host, then the backend (outputs back in
  // FinishLayer).
  const size_t n = static_cast<size_t>(TK) * D;
  SY_RETURN_IF_ERROR(CopyToHost(h_moe_in_.data() + grouped, moe_in_.data() + grouped, n, stream));
  SY_RETURN_IF_ERROR(routed.Record(stream));
  SY_RETURN_IF_ERROR(routed.Synchronize());
  mb.batches = ExpertBatches(plan, h_moe_in_.data() + grouped, h_moe_out_.data() + grouped, D);
  if (overlap) {
    mb.experts = remote_->StartLayerPerBatch(layer, mb.batches, &mb.batch_status);
  } else {
    mb.experts = Ready(remote_->RunLayerPerBatch(layer, mb.batches, &mb.batch_status));
  }
  return absl::OkStatus();
}

absl::Status CudaModelRunner::FinishLayer(MicroBatch& mb, int sequences,
                                          std::vector<absl::Status>* sequence_status) {
  const ModelConfig& c = config();
  const cudaStream_t stream = ctx_->stream();
  const int T = mb.tokens, D = c.hidden_size, K = c.num_experts_per_tok;
  const int TK = T * K;
  const int64_t r0 = mb.row_begin;
  const int64_t grouped = r0 * K * D;
  const int32_t* moe_index = moe_index_.data() + 3 * r0 * K;

  absl::Status status = mb.experts.get();
  mb.experts = {};
  SY_RETURN_IF_ERROR(status);
  if (remote_ != nullptr) {
    if (std::any_of(mb.batch_status.begin(), mb.batch_status.end(),
                    [](const absl::Status& s) { return !s.ok(); })) {
      const std::vector<absl::Status> failed =
          SequencesOfFailedBatches(mb.plan, mb.batches, mb.batch_status, mb.slices);
      sequence_status->resize(sequences);
      for (size_t i = 0; i < failed.size(); ++i) {
        if (!failed[i].ok()) (*sequence_status)[mb.slice_begin + i] = failed[i];
      }
      return absl::OkStatus();
    }
    const size_t n = static_cast<size_t>(TK) * D;
    SY_RETURN_IF_ERROR(
        CopyToDevice(moe_out_.data() + grouped, h_moe_out_.data() + grouped, n, stream));
  }
  // h[T, D] += Σ_k w[t, k] · moe_out[combine_src[t, k]]
  return LaunchMoeCombine(moe_out_.data() + grouped, moe_index + TK,
                          reinterpret_cast<const float*>(moe_index + 2 * TK), T, K, D,
                          h_.data() + r0 * D, stream);
}

// ---------------------------------------------------------------------------
// Factory

absl::StatusOr<std::unique_ptr<StepRunner>> MakeCudaRunner(const Checkpoint& checkpoint,
                                                           Precision precision,
                                                           ExpertBackend* remote_or_null,
                                                           RoutingObserver* observer, int device,
                                                           int max_micro_batches) {
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaContext> ctx, CudaContext::Create(device));
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaDenseModel> dense,
                      CudaDenseModel::Load(checkpoint, precision));
  std::unique_ptr<CudaExpertStore> experts;
  if (remote_or_null == nullptr) {
    SY_ASSIGN_OR_RETURN(experts, CudaExpertStore::Load(checkpoint, precision));
  }
  SY_ASSIGN_OR_RETURN(std::unique_ptr<CudaModelRunner> runner,
                      CudaModelRunner::Create(std::move(ctx), std::move(dense), std::move(experts),
                                              remote_or_null, observer, max_micro_batches));
  return std::unique_ptr<StepRunner>(std::move(runner));
}

}  // namespace switchyard::cuda
