#include "core/cpu_ops.h"

#include <cblas.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "core/checkpoint.h"
#include "core/status_macros.h"

namespace switchyard::cpu {

namespace {

inline float ToF32(float v) { return v; }
inline float ToF32(uint16_t v) { return Bf16ToF32(v); }

// Portable kernel: rows [n_begin, n_end) of y[T, N] = x[T, Kin] · w[N, Kin]^T.
template <typename W>
void SkinnyScalar(const float* x, const W* w, int tokens, int K, int N, int n_begin, int n_end,
                  float* y, bool accumulate) {
  for (int n = n_begin; n < n_end; ++n) {
    const W* wr = w + static_cast<int64_t>(n) * K;  // [Kin]
    for (int t = 0; t < tokens; ++t) {
      const float* xr = x + static_cast<int64_t>(t) * K;  // [Kin]
      float s = 0.0f;
      for (int k = 0; k < K; ++k) s += xr[k] * ToF32(wr[k]);
      float& out = y[static_cast<int64_t>(t) * N + n];
      out = accumulate ? out + s : s;
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)
#define SY_AVX2 __attribute__((target("avx2,fma")))

SY_AVX2 inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
SY_AVX2 inline __m256 Load8(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
SY_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// RB weight rows × TB tokens: y[t0.., n..] from w[n.., Kin] and x[t0.., Kin].
// Each element: 8-lane FMA accumulation over k < Kin rounded down to 8, a
// fixed horizontal sum, then the tail in order — independent of RB and TB.
template <int RB, int TB, typename W>
SY_AVX2 void SkinnyBlockAvx2(const float* x, const W* w, int K, int N, float* y, bool accumulate) {
  __m256 acc[RB][TB];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[RB];
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) wv[r] = Load8(w + static_cast<int64_t>(r) * K + k);
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + static_cast<int64_t>(t) * K + k);
#pragma GCC unroll 16
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    const W* wr = w + static_cast<int64_t>(r) * K;  // [Kin]
    for (int t = 0; t < TB; ++t) {
      const float* xr = x + static_cast<int64_t>(t) * K;  // [Kin]
      float s = HorizontalSum(acc[r][t]);
      for (int kk = k; kk < K; ++kk) s = std::fma(xr[kk], ToF32(wr[kk]), s);
      float& out = y[static_cast<int64_t>(t) * N + r];
      out = accumulate ? out + s : s;
    }
  }
}

// All tokens for rows [n_begin, n_end), RB rows at a time.
template <int RB, int TB, typename W>
SY_AVX2 void SkinnyRowsAvx2(const float* x, const W* w, int K, int N, int n_begin, int n_end,
                            float* y, bool accumulate) {
  int n = n_begin;
  for (; n + RB <= n_end; n += RB) {
    SkinnyBlockAvx2<RB, TB>(x, w + static_cast<int64_t>(n) * K, K, N, y + n, accumulate);
  }
  for (; n < n_end; ++n) {
    SkinnyBlockAvx2<1, TB>(x, w + static_cast<int64_t>(n) * K, K, N, y + n, accumulate);
  }
}

template <typename W>
SY_AVX2 void SkinnyAvx2(const float* x, const W* w, int tokens, int K, int N, int n_begin,
                        int n_end, float* y, bool accumulate) {
  // Tokens in blocks of 4 (8 accumulators with 2 rows); a lone token takes 8
  // rows at a time so that the FMA latency is still hidden.
  int t = 0;
  for (; t + 4 <= tokens; t += 4) {
    SkinnyRowsAvx2<2, 4>(x + static_cast<int64_t>(t) * K, w, K, N, n_begin, n_end,
                         y + static_cast<int64_t>(t) * N, accumulate);
  }
  const float* xt = x + static_cast<int64_t>(t) * K;  // [rest, Kin]
  float* yt = y + static_cast<int64_t>(t) * N;        // [rest, N]
  switch (tokens - t) {
    case 3:
      SkinnyRowsAvx2<2, 3>(xt, w, K, N, n_begin, n_end, yt, accumulate);
      break;
    case 2:
      SkinnyRowsAvx2<4, 2>(xt, w, K, N, n_begin, n_end, yt, accumulate);
      break;
    case 1:
      SkinnyRowsAvx2<8, 1>(xt, w, K, N, n_begin, n_end, yt, accumulate);
      break;
    default:
      break;
  }
}

bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
bool HasAvx2() { return false; }
#endif

template <typename W>
void SkinnyRange(const float* x, const W* w, int tokens, int K, int N, int n_begin, int n_end,
                 float* y, bool accumulate) {
#if defined(__x86_64__) || defined(__i386__)
  if (HasAvx2()) {
    SkinnyAvx2(x, w, tokens, K, N, n_begin, n_end, y, accumulate);
    return;
  }
#endif
  SkinnyScalar(x, w, tokens, K, N, n_begin, n_end, y, accumulate);
}

// y[T, N] = x[T, Kin] · w[N, Kin]^T for T <= kSkinnyMaxTokens, N split
// across the OpenMP team when the weights are large enough to pay for it.
template <typename W>
void Skinny(const float* x, const W* w, int tokens, int K, int N, float* y, bool accumulate) {
  constexpr int64_t kMinWeightsPerThread = 1 << 15;
  int threads = 1;
#ifdef _OPENMP
  if (!omp_in_parallel()) {
    const int64_t by_size = static_cast<int64_t>(N) * K / kMinWeightsPerThread;
    threads = static_cast<int>(std::clamp<int64_t>(by_size, 1, omp_get_max_threads()));
    threads = std::min(threads, std::max(1, N / 8));
  }
#endif
  if (threads <= 1) {
    SkinnyRange(x, w, tokens, K, N, 0, N, y, accumulate);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    // Chunks of whole 8-row groups; only the last chunk has a ragged end.
    const int groups = (N + 7) / 8;
    const int begin = std::min(N, static_cast<int>(static_cast<int64_t>(groups) * id / nt) * 8);
    const int end = std::min(N, static_cast<int>(static_cast<int64_t>(groups) * (id + 1) / nt) * 8);
    SkinnyRange(x, w, tokens, K, N, begin, end, y, accumulate);
  }
#endif
}

void BlasLinear(const float* x, const float* w, int tokens, int in_features, int out_features,
                int ldy, float* y, bool accumulate) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tokens, out_features, in_features, 1.0f, x,
              in_features, w, in_features, accumulate ? 1.0f : 0.0f, y, ldy);
}

}  // namespace

Matrix Matrix::FromF32(std::vector<float> data, int rows, int cols) {
  SY_CHECK(data.size() == static_cast<size_t>(rows) * cols);
  Matrix m;
  m.rows_ = rows;
  m.cols_ = cols;
  m.f32_ = std::move(data);
  return m;
}

Matrix Matrix::FromBf16(std::vector<uint16_t> data, int rows, int cols) {
  SY_CHECK(data.size() == static_cast<size_t>(rows) * cols);
  Matrix m;
  m.rows_ = rows;
  m.cols_ = cols;
  m.is_bf16_ = true;
  m.bf16_ = std::move(data);
  return m;
}

Matrix Matrix::FromStored(DType dtype, const void* data, int rows, int cols) {
  const size_t count = static_cast<size_t>(rows) * cols;
  if (dtype == DType::kBF16) {
    std::vector<uint16_t> bits(count);  // [rows, cols]
    std::memcpy(bits.data(), data, count * sizeof(uint16_t));
    return FromBf16(std::move(bits), rows, cols);
  }
  std::vector<float> f(count);  // [rows, cols]
  ConvertToF32(dtype, data, count, f.data());
  return FromF32(std::move(f), rows, cols);
}

absl::StatusOr<Matrix> Matrix::Read(const Checkpoint& checkpoint, const std::string& name) {
  SY_ASSIGN_OR_RETURN(TensorView view, checkpoint.View(name));
  SY_CHECK(view.shape.size() == 2);
  return FromStored(view.dtype, view.data, static_cast<int>(view.shape[0]),
                    static_cast<int>(view.shape[1]));
}

Matrix Matrix::StackRows(const std::vector<const Matrix*>& parts) {
  SY_CHECK(!parts.empty());
  const int cols = parts[0]->cols();
  int rows = 0;
  bool all_bf16 = true;
  for (const Matrix* p : parts) {
    SY_CHECK(p->cols() == cols);
    rows += p->rows();
    all_bf16 = all_bf16 && p->is_bf16();
  }
  if (all_bf16) {
    std::vector<uint16_t> bits;  // [sum rows, cols]
    bits.reserve(static_cast<size_t>(rows) * cols);
    for (const Matrix* p : parts) bits.insert(bits.end(), p->bf16_.begin(), p->bf16_.end());
    return FromBf16(std::move(bits), rows, cols);
  }
  std::vector<float> f(static_cast<size_t>(rows) * cols);  // [sum rows, cols]
  int64_t row = 0;
  for (const Matrix* p : parts) {
    for (int r = 0; r < p->rows(); ++r, ++row) p->RowToF32(r, f.data() + row * cols);
  }
  return FromF32(std::move(f), rows, cols);
}

void Matrix::RowToF32(int r, float* out) const {
  const int64_t offset = static_cast<int64_t>(r) * cols_;
  if (is_bf16_) {
    for (int k = 0; k < cols_; ++k) out[k] = Bf16ToF32(bf16_[offset + k]);
  } else {
    std::copy_n(f32_.data() + offset, cols_, out);
  }
}

void Linear(const float* x, const float* w, int tokens, int in_features, int out_features, float* y,
            bool accumulate) {
  if (tokens <= 0 || out_features <= 0) return;
  if (tokens <= kSkinnyMaxTokens) {
    Skinny(x, w, tokens, in_features, out_features, y, accumulate);
    return;
  }
  BlasLinear(x, w, tokens, in_features, out_features, out_features, y, accumulate);
}

void Linear(const float* x, const Matrix& w, int tokens, float* y, bool accumulate) {
  if (!w.is_bf16()) {
    Linear(x, w.f32(), tokens, w.cols(), w.rows(), y, accumulate);
    return;
  }
  const int K = w.cols(), N = w.rows();
  if (tokens <= 0 || N <= 0) return;
  if (tokens <= kSkinnyMaxTokens) {
    Skinny(x, w.bf16(), tokens, K, N, y, accumulate);
    return;
  }
  // Many rows: convert blocks of about 256 KiB of weights to FP32 and GEMM.
  const int block = std::max(16, (1 << 16) / std::max(K, 1));
  std::vector<float> wf(static_cast<size_t>(std::min(block, N)) * K);  // [block, Kin]
  for (int n0 = 0; n0 < N; n0 += block) {
    const int nb = std::min(block, N - n0);
    for (int r = 0; r < nb; ++r) w.RowToF32(n0 + r, wf.data() + static_cast<int64_t>(r) * K);
    BlasLinear(x, wf.data(), tokens, K, nb, N, y + n0, accumulate);  // y[:, n0:n0+nb]
  }
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
