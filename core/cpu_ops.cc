#include "core/cpu_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace switchyard::cpu {

void Linear(const float* x, const float* w, int tokens, int in_features, int out_features, float* y,
            bool accumulate) {
  if (tokens == 0) return;
  if (tokens == 1) {
    // y[N] = w[N, Kin] · x[Kin]: GEMV streams the weight once.
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out_features, in_features, 1.0f, w, in_features, x, 1,
                accumulate ? 1.0f : 0.0f, y, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tokens, out_features, in_features, 1.0f, x,
              in_features, w, in_features, accumulate ? 1.0f : 0.0f, y, out_features);
}

void RmsNorm(const float* x, const float* weight, int tokens, int dim, float eps, float* y) {
  for (int t = 0; t < tokens; ++t) {
    const float* xr = x + static_cast<int64_t>(t) * dim;  // [D]
    float* yr = y + static_cast<int64_t>(t) * dim;        // [D]
    float sum_sq = 0.0f;
    for (int i = 0; i < dim; ++i) sum_sq += xr[i] * xr[i];
    const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
    for (int i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * inv_rms);
  }
}

void RopeRotateHalf(float* x, const int32_t* positions, int tokens, int heads, int head_dim,
                    double theta) {
  const int half = head_dim / 2;
  std::vector<float> cos_t(half), sin_t(half);  // [hd/2]
  for (int t = 0; t < tokens; ++t) {
    for (int i = 0; i < half; ++i) {
      // inv_freq in float as Hugging Face computes it, the angle in double.
      const float inv_freq =
          1.0f / static_cast<float>(std::pow(theta, (2.0 * i) / static_cast<double>(head_dim)));
      const double angle = static_cast<double>(positions[t]) * static_cast<double>(inv_freq);
      cos_t[i] = static_cast<float>(std::cos(angle));
      sin_t[i] = static_cast<float>(std::sin(angle));
    }
    for (int h = 0; h < heads; ++h) {
      float* v = x + (static_cast<int64_t>(t) * heads + h) * head_dim;  // [hd]
      for (int i = 0; i < half; ++i) {
        const float a = v[i];
        const float b = v[i + half];
        v[i] = a * cos_t[i] - b * sin_t[i];
        v[i + half] = b * cos_t[i] + a * sin_t[i];
      }
    }
  }
}

void SoftmaxInPlace(float* x, int n) {
  if (n <= 0) return;
  const float max_v = *std::max_element(x, x + n);
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max_v);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int i = 0; i < n; ++i) x[i] *= inv;
}

void SwiGlu(const float* gate, const float* up, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void AddInPlace(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace switchyard::cpu
