#include "attention_service/attention_model.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/cpu_ops.h"
#include "core/status_macros.h"
#include "core/tensor_names.h"

namespace switchyard {
namespace {

cpu::AttentionShape AttentionShapeOf(const ModelConfig& c) {
  return {.heads = c.num_attention_heads,
          .kv_heads = c.num_key_value_heads,
          .head_dim = c.head_dim,
          .sliding_window = c.sliding_window};
}

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionModel>> AttentionModel::Load(const Checkpoint& checkpoint) {
  if (!checkpoint.selection().dense) {
    return absl::FailedPreconditionError(
        "AttentionModel needs the dense tensors, but the checkpoint was opened without them");
  }
  auto m = std::unique_ptr<AttentionModel>(new AttentionModel());
  m->config_ = checkpoint.config();
  const ModelConfig& c = m->config_;
  SY_ASSIGN_OR_RETURN(m->embed_, checkpoint.ReadF32(names::Embed()));
  SY_ASSIGN_OR_RETURN(m->final_norm_, checkpoint.ReadF32(names::FinalNorm()));
  SY_ASSIGN_OR_RETURN(m->lm_head_, cpu::Matrix::Read(checkpoint, names::LmHead()));
  m->layers_.resize(c.num_hidden_layers);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    Layer& layer = m->layers_[i];
    SY_ASSIGN_OR_RETURN(layer.input_norm, checkpoint.ReadF32(names::InputNorm(i)));
    SY_ASSIGN_OR_RETURN(layer.post_norm, checkpoint.ReadF32(names::PostAttnNorm(i)));
    SY_ASSIGN_OR_RETURN(layer.wo, cpu::Matrix::Read(checkpoint, names::OProj(i)));
    SY_ASSIGN_OR_RETURN(layer.gate, cpu::Matrix::Read(checkpoint, names::Gate(i)));
    SY_ASSIGN_OR_RETURN(cpu::Matrix wq,
                        cpu::Matrix::Read(checkpoint, names::QProj(i)));  // [H hd, D]
    SY_ASSIGN_OR_RETURN(cpu::Matrix wk,
                        cpu::Matrix::Read(checkpoint, names::KProj(i)));  // [Hkv hd, D]
    SY_ASSIGN_OR_RETURN(cpu::Matrix wv,
                        cpu::Matrix::Read(checkpoint, names::VProj(i)));  // [Hkv hd, D]
    layer.wqkv = cpu::Matrix::StackRows({&wq, &wk, &wv});
  }
  return m;
}

void AttentionModel::Embed(const int32_t* ids, int tokens, float* h) const {
  const int D = config_.hidden_size;
  for (int t = 0; t < tokens; ++t) {
    std::copy_n(embed_.data() + static_cast<int64_t>(ids[t]) * D, D,
                h + static_cast<int64_t>(t) * D);
  }
}

void AttentionModel::AttentionBlock(int layer, float* h, int tokens,
                                    absl::Span<const SequenceSlice> slices,
                                    const int32_t* positions) const {
  const ModelConfig& c = config_;
  const Layer& w = layers_[layer];
  const int D = c.hidden_size, hd = c.head_dim, H = c.num_attention_heads;
  const int Hkv = c.num_key_value_heads;
  const int q_dim = c.q_dim(), kv_dim = c.kv_dim(), qkv_dim = q_dim + 2 * kv_dim;

  // Scratch reused across calls on this thread: no allocation per layer and step.
  thread_local std::vector<float> x, qkv, q, k, attn;
  x.resize(static_cast<size_t>(tokens) * D);          // [T, D]
  qkv.resize(static_cast<size_t>(tokens) * qkv_dim);  // [T, (H + 2 Hkv) hd]
  q.resize(static_cast<size_t>(tokens) * q_dim);      // [T, H, hd]
  k.resize(static_cast<size_t>(tokens) * kv_dim);     // [T, Hkv, hd]
  attn.resize(static_cast<size_t>(tokens) * q_dim);   // [T, H, hd]

  cpu::RmsNorm(h, w.input_norm.data(), tokens, D, static_cast<float>(c.rms_norm_eps), x.data());
  cpu::Linear(x.data(), w.wqkv, tokens, qkv.data());  // [T, (H + 2 Hkv) hd]
  for (int t = 0; t < tokens; ++t) {
    const float* row = qkv.data() + static_cast<int64_t>(t) * qkv_dim;
    std::copy_n(row, q_dim, q.data() + static_cast<int64_t>(t) * q_dim);
    std::copy_n(row + q_dim, kv_dim, k.data() + static_cast<int64_t>(t) * kv_dim);
  }
  cpu::RopeRotateHalf(q.data(), positions, tokens, H, hd, c.rope_theta);
  cpu::RopeRotateHalf(k.data(), positions, tokens, Hkv, hd, c.rope_theta);

  // Every slice's chunk goes into its cache first (tokens attend to themselves
  // and to earlier tokens of the same chunk); then all slices' attention runs
  // as one batch, FP32 and BF16 caches apart.
  size_t f32_rows = 0, bf16_rows = 0;
  for (const SequenceSlice& s : slices) {
    if (s.kv->dtype() == KvDtype::kBf16) {
      StoreKvBf16(layer, k.data(), qkv.data(), s);
      bf16_rows += s.start_pos + s.tokens;
      continue;
    }
    for (int i = 0; i < s.tokens; ++i) {
      const int row = s.row_begin + i;
      std::copy_n(k.data() + static_cast<int64_t>(row) * kv_dim, kv_dim,
                  s.kv->key(layer, s.start_pos + i));
      std::copy_n(qkv.data() + static_cast<int64_t>(row) * qkv_dim + q_dim + kv_dim, kv_dim,
                  s.kv->value(layer, s.start_pos + i));
    }
    f32_rows += s.start_pos + s.tokens;
  }
  // [sum S]: each slice's cache rows read through its block table (scratch, as above).
  thread_local std::vector<const float*> key_rows, value_rows;
  thread_local std::vector<const uint16_t*> key_rows_bf16, value_rows_bf16;
  thread_local std::vector<cpu::AttentionRows<float>> jobs;
  thread_local std::vector<cpu::AttentionRows<uint16_t>> jobs_bf16;
  key_rows.resize(f32_rows);
  value_rows.resize(f32_rows);
  key_rows_bf16.resize(bf16_rows);
  value_rows_bf16.resize(bf16_rows);
  jobs.clear();
  jobs_bf16.clear();
  size_t f32_at = 0, bf16_at = 0;
  for (const SequenceSlice& s : slices) {
    const int end = s.start_pos + s.tokens;
    const float* qs = q.data() + static_cast<int64_t>(s.row_begin) * q_dim;  // [T_s, H, hd]
    float* out = attn.data() + static_cast<int64_t>(s.row_begin) * q_dim;    // [T_s, H, hd]
    if (s.kv->dtype() == KvDtype::kBf16) {
      for (int p = 0; p < end; ++p) {
        key_rows_bf16[bf16_at + p] = s.kv->key_bf16(layer, p);
        value_rows_bf16[bf16_at + p] = s.kv->value_bf16(layer, p);
      }
      jobs_bf16.push_back({qs, s.tokens, s.start_pos, key_rows_bf16.data() + bf16_at,
                           value_rows_bf16.data() + bf16_at, out});
      bf16_at += end;
    } else {
      for (int p = 0; p < end; ++p) {
        key_rows[f32_at + p] = s.kv->key(layer, p);
        value_rows[f32_at + p] = s.kv->value(layer, p);
      }
      jobs.push_back(
          {qs, s.tokens, s.start_pos, key_rows.data() + f32_at, value_rows.data() + f32_at, out});
      f32_at += end;
    }
  }
  const cpu::AttentionShape shape = AttentionShapeOf(c);
  if (!jobs.empty()) cpu::Attend(shape, absl::MakeConstSpan(jobs));
  if (!jobs_bf16.empty()) cpu::Attend(shape, absl::MakeConstSpan(jobs_bf16));
  // h[T, D] += attn[T, H hd] · wo^T
  cpu::Linear(attn.data(), w.wo, tokens, h, /*accumulate=*/true);
}

void AttentionModel::StoreKvBf16(int layer, const float* k, const float* qkv,
                                 const SequenceSlice& s) const {
  const ModelConfig& c = config_;
  const int q_dim = c.q_dim(), kv_dim = c.kv_dim(), qkv_dim = q_dim + 2 * kv_dim;
  // Every position, these included, is then read back from the cache, so a
  // token sees the same K/V whether it was cached in this step or an earlier one.
  for (int i = 0; i < s.tokens; ++i) {
    const int row = s.row_begin + i;
    cpu::RoundToBf16(k + static_cast<int64_t>(row) * kv_dim, kv_dim,
                     s.kv->key_bf16(layer, s.start_pos + i));
    cpu::RoundToBf16(qkv + static_cast<int64_t>(row) * qkv_dim + q_dim + kv_dim, kv_dim,
                     s.kv->value_bf16(layer, s.start_pos + i));
  }
}

void AttentionModel::RouterInput(int layer, const float* h, int tokens, float* x,
                                 float* router_logits) const {
  const ModelConfig& c = config_;
  const Layer& w = layers_[layer];
  cpu::RmsNorm(h, w.post_norm.data(), tokens, c.hidden_size, static_cast<float>(c.rms_norm_eps),
               x);                                // [T, D]
  cpu::Linear(x, w.gate, tokens, router_logits);  // [T, E]
}

void AttentionModel::Logits(const float* h, int rows, float* logits) const {
  const ModelConfig& c = config_;
  std::vector<float> x(static_cast<size_t>(rows) * c.hidden_size);  // [N, D]
  cpu::RmsNorm(h, final_norm_.data(), rows, c.hidden_size, static_cast<float>(c.rms_norm_eps),
               x.data());
  cpu::Linear(x.data(), lm_head_, rows, logits);  // [N, V]
}

bool AttentionModel::RowsIndependentOfCount() const {
  if (!lm_head_.is_bf16()) return false;
  for (const Layer& l : layers_) {
    if (!l.wqkv.is_bf16() || !l.wo.is_bf16() || !l.gate.is_bf16()) return false;
  }
  return cpu::RowsIndependentOfCount(/*bf16_weights=*/true);
}

}  // namespace switchyard
