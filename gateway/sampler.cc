#include "gateway/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>

#include "absl/strings/str_cat.h"

namespace switchyard {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be finite and >= 0, got ", p.temperature));
  }
  if (p.top_k < 0)
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  }
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("min_p must be in [0, 1], got ", p.min_p));
  }
  if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty)) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition_penalty must be finite and > 0, got ", p.repetition_penalty));
  }
  if (!(p.presence_penalty >= -2.0f && p.presence_penalty <= 2.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("presence_penalty must be in [-2, 2], got ", p.presence_penalty));
  }
  if (!(p.frequency_penalty >= -2.0f && p.frequency_penalty <= 2.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("frequency_penalty must be in [-2, 2], got ", p.frequency_penalty));
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params)
    : params_(params), rng_(params.seed.has_value() ? *params.seed : std::random_device{}()) {}

double Sampler::Uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

SampledToken Sampler::Sample(absl::Span<const float> raw, absl::Span<const int32_t> prompt,
                             absl::Span<const int32_t> output, int top_logprobs) {
  const int V = static_cast<int>(raw.size());
  SampledToken result;

  // Log-probabilities of the raw distribution, for reporting.
  double max_raw = *std::max_element(raw.begin(), raw.end());
  double sum = 0.0;
  for (float v : raw) sum += std::exp(static_cast<double>(v) - max_raw);
  const double log_z = max_raw + std::log(sum);
  auto raw_logprob = [&](int id) { return static_cast<float>(raw[id] - log_z); };

  std::vector<float> logits(raw.begin(), raw.end());  // [V]
  if (params_.repetition_penalty != 1.0f) {
    auto penalise = [&](int32_t id) {
      if (id < 0 || id >= V) return;
      float& l = logits[id];
      l = l > 0 ? raw[id] / params_.repetition_penalty : raw[id] * params_.repetition_penalty;
    };
    for (int32_t id : prompt) penalise(id);
    for (int32_t id : output) penalise(id);
  }
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f) {
    std::unordered_map<int32_t, int> counts;
    for (int32_t id : output) ++counts[id];
    for (auto [id, n] : counts) {
      if (id < 0 || id >= V) continue;
      logits[id] -= params_.presence_penalty + params_.frequency_penalty * static_cast<float>(n);
    }
  }

  if (params_.temperature == 0.0f) {
    result.id =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  } else {
    // Candidates sorted by logit, best first (ties: lower id first).
    std::vector<int32_t> order(V);
    std::iota(order.begin(), order.end(), 0);
    const int keep_k = params_.top_k > 0 ? std::min(params_.top_k, V) : V;
    auto better = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    std::partial_sort(order.begin(), order.begin() + keep_k, order.end(), better);
    order.resize(keep_k);
    std::vector<double> probs(order.size());
    const double inv_t = 1.0 / params_.temperature;
    const double top = logits[order[0]] * inv_t;
    double z = 0.0;
    for (size_t i = 0; i < order.size(); ++i) {
      probs[i] = std::exp(logits[order[i]] * inv_t - top);
      z += probs[i];
    }
    for (double& p : probs) p /= z;
    // top-p: the smallest prefix whose mass reaches top_p (always >= 1 token).
    size_t n = probs.size();
    if (params_.top_p < 1.0f) {
      double cum = 0.0;
      for (size_t i = 0; i < probs.size(); ++i) {
        cum += probs[i];
        if (cum >= params_.top_p) {
          n = i + 1;
          break;
        }
      }
    }
    // min-p: relative to the most likely token.
    if (params_.min_p > 0.0f) {
      const double floor = params_.min_p * probs[0];
      size_t m = 1;
      while (m < n && probs[m] >= floor) ++m;
      n = m;
    }
    double mass = 0.0;
    for (size_t i = 0; i < n; ++i) mass += probs[i];
    double u = Uniform() * mass;
    result.id = order[n - 1];
    for (size_t i = 0; i < n; ++i) {
      u -= probs[i];
      if (u < 0) {
        result.id = order[i];
        break;
      }
    }
  }
  result.logprob = raw_logprob(result.id);

  if (top_logprobs > 0) {
    const int n = std::min(top_logprobs, V);
    std::vector<int32_t> ids(V);
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
      return raw[a] > raw[b] || (raw[a] == raw[b] && a < b);
    });
    for (int i = 0; i < n; ++i) result.top.emplace_back(ids[i], raw_logprob(ids[i]));
  }
  return result;
}

}  // namespace switchyard
