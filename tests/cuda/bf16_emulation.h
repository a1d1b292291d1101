// A CPU model of the CUDA backend's BF16 mode, for tests: the plain FP32 CPU
// math (core/cpu_ops) over the whole sequence, except that the input of every
// projection GEMM (q/k/v, o, expert w13 and w2, LM head) is rounded to BF16
// and the weights are BF16 values, as cuda/linear.cc does on the GPU, and the
// cached K (after RoPE) and V are BF16 values, as the device KV slab keeps
// them (gateway/cuda_model_runner.h). Norms, RoPE, attention, softmax, the
// router (FP32 gate on unrounded x) and the residual stream stay FP32.
//
// It recomputes the whole prefix each call (no KV cache): slow but obvious,
// fine for tiny-mixtral. With round_activations = false it is the FP32 CPU
// model (weights rounded to BF16 only if the checkpoint is not BF16), which
// the tests check against Hugging Face to validate the emulation itself.
//
// Legend: T tokens, D hidden, H heads, Hkv kv heads, hd head dim, E experts,
// K experts per token, F expert ffn, V vocabulary.
#ifndef SWITCHYARD_TESTS_CUDA_BF16_EMULATION_H_
#define SWITCHYARD_TESTS_CUDA_BF16_EMULATION_H_

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attention_service/router.h"
#include "core/checkpoint.h"
#include "core/cpu_ops.h"
#include "core/dtype.h"
#include "core/status_macros.h"
#include "core/tensor_names.h"

namespace switchyard::testing {

class Bf16Emulation {
 public:
  static absl::StatusOr<std::unique_ptr<Bf16Emulation>> Load(const std::string& dir) {
    SY_ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(dir));
    auto m = std::unique_ptr<Bf16Emulation>(new Bf16Emulation());
    m->c_ = ckpt->config();
    const ModelConfig& c = m->c_;
    auto read = [&](const std::string& name, bool bf16) -> absl::StatusOr<std::vector<float>> {
      SY_ASSIGN_OR_RETURN(std::vector<float> v, ckpt->ReadF32(name));
      if (bf16) RoundToBf16(v);
      return v;
    };
    SY_ASSIGN_OR_RETURN(m->embed_, read(names::Embed(), true));
    SY_ASSIGN_OR_RETURN(m->final_norm_, read(names::FinalNorm(), false));
    SY_ASSIGN_OR_RETURN(m->lm_head_, read(names::LmHead(), true));
    m->layers_.resize(c.num_hidden_layers);
    for (int i = 0; i < c.num_hidden_layers; ++i) {
      Layer& l = m->layers_[i];
      SY_ASSIGN_OR_RETURN(l.input_norm, read(names::InputNorm(i), false));
      SY_ASSIGN_OR_RETURN(l.post_norm, read(names::PostAttnNorm(i), false));
      SY_ASSIGN_OR_RETURN(l.wq, read(names::QProj(i), true));
      SY_ASSIGN_OR_RETURN(l.wk, read(names::KProj(i), true));
      SY_ASSIGN_OR_RETURN(l.wv, read(names::VProj(i), true));
      SY_ASSIGN_OR_RETURN(l.wo, read(names::OProj(i), true));
      SY_ASSIGN_OR_RETURN(l.gate, read(names::Gate(i), false));
      l.w1.resize(c.num_local_experts);
      l.w3.resize(c.num_local_experts);
      l.w2.resize(c.num_local_experts);
      for (int e = 0; e < c.num_local_experts; ++e) {
        SY_ASSIGN_OR_RETURN(l.w1[e], read(names::Expert(i, e, "w1"), true));
        SY_ASSIGN_OR_RETURN(l.w3[e], read(names::Expert(i, e, "w3"), true));
        SY_ASSIGN_OR_RETURN(l.w2[e], read(names::Expert(i, e, "w2"), true));
      }
    }
    return m;
  }

  const ModelConfig& config() const { return c_; }

  // Sum every projection in double and round once (another FP32 summation
  // order than BLAS's), to measure how far FP32 reordering alone moves the
  // BF16 pipeline: the GPU's GEMMs sum in yet another order.
  void set_double_accumulation(bool on) { double_accumulate_ = on; }

  static void RoundToBf16(std::vector<float>& v) {
    for (float& x : v) x = Bf16ToF32(F32ToBf16(x));
  }

  // y[T, N] = x[T, Kin] · w[N, Kin]^T (+ y)
  void Lin(const float* x, const float* w, int tokens, int in, int out_features, float* y,
           bool accumulate = false) const {
    if (!double_accumulate_) {
      cpu::Linear(x, w, tokens, in, out_features, y, accumulate);
      return;
    }
    for (int t = 0; t < tokens; ++t) {
      for (int n = 0; n < out_features; ++n) {
        double s = 0.0;
        for (int k = 0; k < in; ++k) {
          s += static_cast<double>(x[static_cast<int64_t>(t) * in + k]) *
               w[static_cast<int64_t>(n) * in + k];
        }
        float& dst = y[static_cast<int64_t>(t) * out_features + n];
        dst = accumulate ? dst + static_cast<float>(s) : static_cast<float>(s);
      }
    }
  }

  // logits[T, V] for every position of `ids` (positions 0..T-1).
  std::vector<float> Forward(const std::vector<int32_t>& ids, bool round_activations) const {
    const ModelConfig& c = c_;
    const int T = static_cast<int>(ids.size());
    const int D = c.hidden_size, H = c.num_attention_heads, Hkv = c.num_key_value_heads;
    const int hd = c.head_dim, q_dim = c.q_dim(), kv_dim = c.kv_dim(), group = H / Hkv;
    const int E = c.num_local_experts, K = c.num_experts_per_tok, F = c.intermediate_size;
    const float eps = static_cast<float>(c.rms_norm_eps);
    auto maybe_round = [&](std::vector<float> v) {
      if (round_activations) RoundToBf16(v);
      return v;
    };
    std::vector<int32_t> pos(T);
    for (int t = 0; t < T; ++t) pos[t] = t;

    std::vector<float> h(static_cast<size_t>(T) * D);  // [T, D]
    for (int t = 0; t < T; ++t) {
      std::copy_n(embed_.data() + static_cast<int64_t>(ids[t]) * D, D, h.data() + t * D);
    }
    std::vector<float> x(h.size());
    for (const Layer& l : layers_) {
      // Attention.
      cpu::RmsNorm(h.data(), l.input_norm.data(), T, D, eps, x.data());
      const std::vector<float> xr = maybe_round(x);
      std::vector<float> q(static_cast<size_t>(T) * q_dim), k(static_cast<size_t>(T) * kv_dim),
          v(static_cast<size_t>(T) * kv_dim);
      Lin(xr.data(), l.wq.data(), T, D, q_dim, q.data());
      Lin(xr.data(), l.wk.data(), T, D, kv_dim, k.data());
      Lin(xr.data(), l.wv.data(), T, D, kv_dim, v.data());
      cpu::RopeRotateHalf(q.data(), pos.data(), T, H, hd, c.rope_theta);
      cpu::RopeRotateHalf(k.data(), pos.data(), T, Hkv, hd, c.rope_theta);
      // The KV cache stores K (after RoPE) and V in BF16 (the device slab's
      // element type in BF16 mode); attention reads them back as FP32.
      if (round_activations) {
        RoundToBf16(k);
        RoundToBf16(v);
      }
      std::vector<float> attn(static_cast<size_t>(T) * q_dim, 0.0f);
      const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
      for (int t = 0; t < T; ++t) {
        const int first = c.sliding_window > 0 ? std::max(0, t - c.sliding_window + 1) : 0;
        for (int head = 0; head < H; ++head) {
          const int kvh = head / group;
          std::vector<float> s(t - first + 1);
          for (int j = first; j <= t; ++j) {
            float dot = 0.0f;
            for (int d = 0; d < hd; ++d) {
              dot += q[(static_cast<int64_t>(t) * H + head) * hd + d] *
                     k[(static_cast<int64_t>(j) * Hkv + kvh) * hd + d];
            }
            s[j - first] = dot * scale;
          }
          cpu::SoftmaxInPlace(s.data(), static_cast<int>(s.size()));
          float* o = attn.data() + (static_cast<int64_t>(t) * H + head) * hd;
          for (int j = first; j <= t; ++j) {
            for (int d = 0; d < hd; ++d) {
              o[d] += s[j - first] * v[(static_cast<int64_t>(j) * Hkv + kvh) * hd + d];
            }
          }
        }
      }
      const std::vector<float> attn_r = maybe_round(attn);
      Lin(attn_r.data(), l.wo.data(), T, q_dim, D, h.data(), /*accumulate=*/true);

      // MoE: router on unrounded FP32 x, experts on rounded x.
      cpu::RmsNorm(h.data(), l.post_norm.data(), T, D, eps, x.data());
      std::vector<float> router(static_cast<size_t>(T) * E);
      Lin(x.data(), l.gate.data(), T, D, E, router.data());
      const Routing r = RouteTopK(router.data(), T, E, K);
      const std::vector<float> xe = maybe_round(x);
      std::vector<float> moe(static_cast<size_t>(T) * D, 0.0f);
      std::vector<float> gate(F), up(F), out(D);
      for (int t = 0; t < T; ++t) {
        // Sum in expert-index order, as the reference.
        std::vector<std::pair<int, float>> chosen;
        for (int kk = 0; kk < K; ++kk)
          chosen.push_back({r.experts[t * K + kk], r.weights[t * K + kk]});
        std::sort(chosen.begin(), chosen.end());
        for (const auto& [e, w] : chosen) {
          Lin(xe.data() + static_cast<int64_t>(t) * D, l.w1[e].data(), 1, D, F, gate.data());
          Lin(xe.data() + static_cast<int64_t>(t) * D, l.w3[e].data(), 1, D, F, up.data());
          std::vector<float> act(F);
          cpu::SwiGlu(gate.data(), up.data(), F, act.data());
          act = maybe_round(act);
          Lin(act.data(), l.w2[e].data(), 1, F, D, out.data());
          for (int d = 0; d < D; ++d) moe[static_cast<int64_t>(t) * D + d] += w * out[d];
        }
      }
      cpu::AddInPlace(h.data(), moe.data(), static_cast<int64_t>(T) * D);
    }
    cpu::RmsNorm(h.data(), final_norm_.data(), T, D, eps, x.data());
    const std::vector<float> xf = maybe_round(x);
    std::vector<float> logits(static_cast<size_t>(T) * c.vocab_size);
    Lin(xf.data(), lm_head_.data(), T, D, c.vocab_size, logits.data());
    return logits;
  }

  // Greedy continuation of `prompt`, `steps` tokens (no EOS stop); each
  // step's top-1 minus top-2 logit margin into `margins` when given.
  std::vector<int32_t> Greedy(std::vector<int32_t> prompt, int steps, bool round_activations,
                              std::vector<float>* margins = nullptr) const {
    std::vector<int32_t> out;
    const int V = c_.vocab_size;
    if (margins != nullptr) margins->clear();
    for (int i = 0; i < steps; ++i) {
      const std::vector<float> logits = Forward(prompt, round_activations);
      const float* last = logits.data() + (prompt.size() - 1) * static_cast<size_t>(V);
      const int32_t next = static_cast<int32_t>(std::max_element(last, last + V) - last);
      if (margins != nullptr) {
        float second = -INFINITY;
        for (int v = 0; v < V; ++v) {
          if (v != next) second = std::max(second, last[v]);
        }
        margins->push_back(last[next] - second);
      }
      out.push_back(next);
      prompt.push_back(next);
    }
    return out;
  }

 private:
  struct Layer {
    std::vector<float> input_norm, post_norm, wq, wk, wv, wo, gate;
    std::vector<std::vector<float>> w1, w3, w2;  // [E][F, D], [E][F, D], [E][D, F]
  };
  ModelConfig c_;
  bool double_accumulate_ = false;
  std::vector<float> embed_, final_norm_, lm_head_;
  std::vector<Layer> layers_;
};

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_CUDA_BF16_EMULATION_H_
