#include "core/cpu_ops.h"

#include <cblas.h>

#if defined(__x86_64__) || defined(__i386__)
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and warn about
// it wherever they are inlined (a known false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "core/checkpoint.h"
#include "core/cpu_amx.h"
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
#define SY_X86 1
#define SY_AVX2 __attribute__((target("avx2,fma")))
#define SY_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define SY_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

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

// out[i] = Bf16ToF32(x[i]) for little-endian BF16 at any address, 8 at a time.
SY_AVX2 void WidenBf16Avx2(const uint8_t* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 2 * i));
    _mm256_storeu_ps(out + i,
                     _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)));
  }
  for (; i < n; ++i) {
    uint16_t v;
    std::memcpy(&v, x + 2 * i, 2);
    out[i] = Bf16ToF32(v);
  }
}

// F32ToBf16 on 8 lanes (round to nearest even; a NaN keeps its sign and
// payload's top bits and is made quiet), each result in a lane's low 16 bits.
SY_AVX2 inline __m256i RoundToBf16Lanes(__m256i u) {
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i quieted = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quieted, nan);
}

// out[i] = F32ToBf16(x[i]), 16 at a time: two 8-lane halves packed to 16
// bits (packus works per 128-bit lane, so the quadwords are put back in order).
SY_AVX2 void RoundToBf16Avx2(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i lo = RoundToBf16Lanes(_mm256_castps_si256(_mm256_loadu_ps(x + i)));
    const __m256i hi = RoundToBf16Lanes(_mm256_castps_si256(_mm256_loadu_ps(x + i + 8)));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), packed);
  }
  for (; i < n; ++i) out[i] = F32ToBf16(x[i]);
}

// ---- AVX-512F: the same FP32 math with 16 lanes ----

SY_AVX512 inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
SY_AVX512 inline __m512 Load16(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// As SkinnyBlockAvx2 with 16 lanes: 16-lane FMA accumulation over k < Kin
// rounded down to 16, _mm512_reduce_add_ps, then the tail in order.
template <int RB, int TB, typename W>
SY_AVX512 void SkinnyBlockAvx512(const float* x, const W* w, int K, int N, float* y,
                                 bool accumulate) {
  __m512 acc[RB][TB];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[RB];
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) wv[r] = Load16(w + static_cast<int64_t>(r) * K + k);
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + static_cast<int64_t>(t) * K + k);
#pragma GCC unroll 16
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    const W* wr = w + static_cast<int64_t>(r) * K;  // [Kin]
    for (int t = 0; t < TB; ++t) {
      const float* xr = x + static_cast<int64_t>(t) * K;  // [Kin]
      float s = _mm512_reduce_add_ps(acc[r][t]);
      for (int kk = k; kk < K; ++kk) s = std::fma(xr[kk], ToF32(wr[kk]), s);
      float& out = y[static_cast<int64_t>(t) * N + r];
      out = accumulate ? out + s : s;
    }
  }
}

template <int RB, int TB, typename W>
SY_AVX512 void SkinnyRowsAvx512(const float* x, const W* w, int K, int N, int n_begin, int n_end,
                                float* y, bool accumulate) {
  int n = n_begin;
  for (; n + RB <= n_end; n += RB) {
    SkinnyBlockAvx512<RB, TB>(x, w + static_cast<int64_t>(n) * K, K, N, y + n, accumulate);
  }
  for (; n < n_end; ++n) {
    SkinnyBlockAvx512<1, TB>(x, w + static_cast<int64_t>(n) * K, K, N, y + n, accumulate);
  }
}

template <typename W>
SY_AVX512 void SkinnyAvx512(const float* x, const W* w, int tokens, int K, int N, int n_begin,
                            int n_end, float* y, bool accumulate) {
  // 4 rows × 4 tokens (16 accumulators, each weight vector used 4 times); a
  // lone token takes 8 rows so that 8 FMA chains hide the latency.
  int t = 0;
  for (; t + 4 <= tokens; t += 4) {
    SkinnyRowsAvx512<4, 4>(x + static_cast<int64_t>(t) * K, w, K, N, n_begin, n_end,
                           y + static_cast<int64_t>(t) * N, accumulate);
  }
  const float* xt = x + static_cast<int64_t>(t) * K;  // [rest, Kin]
  float* yt = y + static_cast<int64_t>(t) * N;        // [rest, N]
  switch (tokens - t) {
    case 3:
      SkinnyRowsAvx512<4, 3>(xt, w, K, N, n_begin, n_end, yt, accumulate);
      break;
    case 2:
      SkinnyRowsAvx512<4, 2>(xt, w, K, N, n_begin, n_end, yt, accumulate);
      break;
    case 1:
      SkinnyRowsAvx512<8, 1>(xt, w, K, N, n_begin, n_end, yt, accumulate);
      break;
    default:
      break;
  }
}

// ---- AVX512_BF16: BF16 activations × BF16 weights with vdpbf16ps ----

// xb[Kp] (Kp a multiple of 32, zero padded) · w[Kin] for RB rows × TB tokens.
// vdpbf16ps adds the products of each BF16 pair into its FP32 lane; the tail
// (Kin mod 32) loads masked weights against x's zero padding. Each element's
// order depends only on Kin.
template <int RB, int TB>
SY_AVX512BF16 void DpBlock(const uint16_t* xb, int Kp, const uint16_t* w, int K, int N, float* y,
                           bool accumulate) {
  __m512 acc[RB][TB];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[RB];
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
      wv[r] = (__m512bh)_mm512_loadu_si512(w + static_cast<int64_t>(r) * K + k);
    }
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + static_cast<int64_t>(t) * Kp + k);
#pragma GCC unroll 16
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    __m512bh wv[RB];
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
      wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + static_cast<int64_t>(r) * K + k);
    }
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + static_cast<int64_t>(t) * Kp + k);
#pragma GCC unroll 16
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) {
      const float s = _mm512_reduce_add_ps(acc[r][t]);
      float& out = y[static_cast<int64_t>(t) * N + r];
      out = accumulate ? out + s : s;
    }
}

template <int RB, int TB>
SY_AVX512BF16 void DpRows(const uint16_t* xb, int Kp, const uint16_t* w, int K, int N, int n_begin,
                          int n_end, float* y, bool accumulate) {
  int n = n_begin;
  for (; n + RB <= n_end; n += RB) {
    DpBlock<RB, TB>(xb, Kp, w + static_cast<int64_t>(n) * K, K, N, y + n, accumulate);
  }
  for (; n < n_end; ++n) {
    DpBlock<1, TB>(xb, Kp, w + static_cast<int64_t>(n) * K, K, N, y + n, accumulate);
  }
}

SY_AVX512BF16 void SkinnyDpBf16(const uint16_t* xb, int Kp, const uint16_t* w, int tokens, int K,
                                int N, int n_begin, int n_end, float* y, bool accumulate) {
  int t = 0;
  for (; t + 4 <= tokens; t += 4) {
    DpRows<4, 4>(xb + static_cast<int64_t>(t) * Kp, Kp, w, K, N, n_begin, n_end,
                 y + static_cast<int64_t>(t) * N, accumulate);
  }
  const uint16_t* xt = xb + static_cast<int64_t>(t) * Kp;  // [rest, Kp]
  float* yt = y + static_cast<int64_t>(t) * N;             // [rest, N]
  switch (tokens - t) {
    case 3:
      DpRows<4, 3>(xt, Kp, w, K, N, n_begin, n_end, yt, accumulate);
      break;
    case 2:
      DpRows<4, 2>(xt, Kp, w, K, N, n_begin, n_end, yt, accumulate);
      break;
    case 1:
      DpRows<8, 1>(xt, Kp, w, K, N, n_begin, n_end, yt, accumulate);
      break;
    default:
      break;
  }
}

// out[n] = F32ToBf16(x[n]) (round to nearest even, NaN kept), 16 at a time.
SY_AVX512 void RoundToBf16Avx512(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(x + i));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, lsb)), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs_mask), inf);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), quiet);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(r));
  }
  for (; i < n; ++i) out[i] = F32ToBf16(x[i]);
}

// Attention row kernels for a group of G query heads sharing one K or V row
// (grouped-query attention): the row is loaded once per lane chunk and used
// by every head. Each head's dot product sums in the same order as
// DotRows*<1> (lane accumulators, a fixed horizontal sum, then the tail in
// order), so the result does not depend on how heads are blocked.
template <int G, typename W>
SY_AVX2 void DotBlockAvx2(const float* q, const W* k, int n, float* out) {
  __m256 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 kv = Load8(k + i);
    for (int g = 0; g < G; ++g)
      acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + static_cast<int64_t>(g) * n + i), kv, acc[g]);
  }
  for (int g = 0; g < G; ++g) {
    const float* qg = q + static_cast<int64_t>(g) * n;  // [n]
    float s = HorizontalSum(acc[g]);
    for (int j = i; j < n; ++j) s = std::fma(qg[j], ToF32(k[j]), s);
    out[g] = s;
  }
}

template <typename W>
SY_AVX2 void DotRowsAvx2(const float* q, int heads, const W* k, int n, float* out) {
  int g = 0;
  for (; g + 4 <= heads; g += 4) DotBlockAvx2<4>(q + static_cast<int64_t>(g) * n, k, n, out + g);
  for (; g < heads; ++g) DotBlockAvx2<1>(q + static_cast<int64_t>(g) * n, k, n, out + g);
}

template <typename W>
SY_AVX2 void AxpyRowsAvx2(const float* a, int heads, const W* v, float* y, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 vv = Load8(v + i);
    for (int g = 0; g < heads; ++g) {
      float* yg = y + static_cast<int64_t>(g) * n + i;
      _mm256_storeu_ps(yg, _mm256_fmadd_ps(_mm256_set1_ps(a[g]), vv, _mm256_loadu_ps(yg)));
    }
  }
  for (int g = 0; g < heads; ++g) {
    float* yg = y + static_cast<int64_t>(g) * n;
    for (int j = i; j < n; ++j) yg[j] = std::fma(a[g], ToF32(v[j]), yg[j]);
  }
}

template <int G, typename W>
SY_AVX512 void DotBlockAvx512(const float* q, const W* k, int n, float* out) {
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 kv = Load16(k + i);
    for (int g = 0; g < G; ++g)
      acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + static_cast<int64_t>(g) * n + i), kv, acc[g]);
  }
  for (int g = 0; g < G; ++g) {
    const float* qg = q + static_cast<int64_t>(g) * n;  // [n]
    float s = _mm512_reduce_add_ps(acc[g]);
    for (int j = i; j < n; ++j) s = std::fma(qg[j], ToF32(k[j]), s);
    out[g] = s;
  }
}

template <typename W>
SY_AVX512 void DotRowsAvx512(const float* q, int heads, const W* k, int n, float* out) {
  int g = 0;
  for (; g + 4 <= heads; g += 4) DotBlockAvx512<4>(q + static_cast<int64_t>(g) * n, k, n, out + g);
  for (; g < heads; ++g) DotBlockAvx512<1>(q + static_cast<int64_t>(g) * n, k, n, out + g);
}

template <typename W>
SY_AVX512 void AxpyRowsAvx512(const float* a, int heads, const W* v, float* y, int n) {
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 vv = Load16(v + i);
    for (int g = 0; g < heads; ++g) {
      float* yg = y + static_cast<int64_t>(g) * n + i;
      _mm512_storeu_ps(yg, _mm512_fmadd_ps(_mm512_set1_ps(a[g]), vv, _mm512_loadu_ps(yg)));
    }
  }
  for (int g = 0; g < heads; ++g) {
    float* yg = y + static_cast<int64_t>(g) * n;
    for (int j = i; j < n; ++j) yg[j] = std::fma(a[g], ToF32(v[j]), yg[j]);
  }
}

CpuIsa DetectIsa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    if (!__builtin_cpu_supports("avx512bf16")) return CpuIsa::kAvx512;
    return amx::AmxUsable() ? CpuIsa::kAmx : CpuIsa::kAvx512Bf16;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
  return CpuIsa::kScalar;
}
#else
CpuIsa DetectIsa() { return CpuIsa::kScalar; }
#endif

// The level and precision in force; set from the environment at first use.
struct KernelState {
  std::atomic<int> isa;
  std::atomic<int> precision;
  KernelState() {
    CpuIsa chosen = DetectedIsa();
    if (const char* env = std::getenv("SWITCHYARD_CPU_ISA"); env != nullptr && *env != '\0') {
      for (CpuIsa level :
           {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16, CpuIsa::kAmx}) {
        if (std::strcmp(env, CpuIsaName(level)) == 0) chosen = std::min(chosen, level);
      }
    }
    isa.store(static_cast<int>(chosen));
    MatmulPrecision p = MatmulPrecision::kF32;
    if (const char* env = std::getenv("SWITCHYARD_CPU_PRECISION"); env != nullptr) {
      if (std::strcmp(env, "bf16") == 0) p = MatmulPrecision::kBf16;
    }
    precision.store(static_cast<int>(p));
  }
};

KernelState& State() {
  static KernelState state;
  return state;
}

template <typename W>
void SkinnyRange(CpuIsa isa, const float* x, const W* w, int tokens, int K, int N, int n_begin,
                 int n_end, float* y, bool accumulate) {
#ifdef SY_X86
  if (isa >= CpuIsa::kAvx512) {
    SkinnyAvx512(x, w, tokens, K, N, n_begin, n_end, y, accumulate);
    return;
  }
  if (isa >= CpuIsa::kAvx2) {
    SkinnyAvx2(x, w, tokens, K, N, n_begin, n_end, y, accumulate);
    return;
  }
#endif
  SkinnyScalar(x, w, tokens, K, N, n_begin, n_end, y, accumulate);
}

// Threads for a product over w[N, Kin]: as many as the weights pay for.
int ThreadsFor(int64_t N, int64_t K, int64_t tokens) {
  constexpr int64_t kMinWorkPerThread = 1 << 15;
  int threads = 1;
#ifdef _OPENMP
  if (!omp_in_parallel()) {
    const int64_t by_size = N * K * std::max<int64_t>(1, tokens / 4) / kMinWorkPerThread;
    threads = static_cast<int>(std::clamp<int64_t>(by_size, 1, omp_get_max_threads()));
    threads = std::min<int64_t>(threads, std::max<int64_t>(1, N / 8));
  }
#endif
  return threads;
}

// Runs body(n_begin, n_end) over [0, N) split into whole `group`-row groups
// across `threads` OpenMP threads (only the last chunk has a ragged end).
template <typename Body>
void SplitRows(int N, int threads, const Body& body, int group = 8) {
  if (threads <= 1) {
    body(0, N);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int groups = (N + group - 1) / group;
    const int begin = std::min(N, static_cast<int>(static_cast<int64_t>(groups) * id / nt) * group);
    const int end =
        std::min(N, static_cast<int>(static_cast<int64_t>(groups) * (id + 1) / nt) * group);
    body(begin, end);
  }
#endif
}

// Rows [n_begin, n_end) for all T tokens: blocks of kRowBlock weight rows stay
// in cache while every chunk of kSkinnyMaxTokens tokens passes over them.
template <typename Kernel>
void ForRowBlocks(int tokens, int N, int n_begin, int n_end, const Kernel& kernel) {
  constexpr int kRowBlock = 64;
  if (tokens <= kSkinnyMaxTokens) {
    kernel(0, tokens, n_begin, n_end);
    return;
  }
  for (int n0 = n_begin; n0 < n_end; n0 += kRowBlock) {
    const int n1 = std::min(n_end, n0 + kRowBlock);
    for (int t0 = 0; t0 < tokens; t0 += kSkinnyMaxTokens) {
      kernel(t0, std::min(kSkinnyMaxTokens, tokens - t0), n0, n1);
    }
  }
}

// y[T, N] = x[T, Kin] · w[N, Kin]^T with the FP32 skinny kernels, any T.
template <typename W>
void Skinny(CpuIsa isa, const float* x, const W* w, int tokens, int K, int N, float* y,
            bool accumulate) {
  SplitRows(N, ThreadsFor(N, K, tokens), [&](int n_begin, int n_end) {
    ForRowBlocks(tokens, N, n_begin, n_end, [&](int t0, int tb, int b, int e) {
      SkinnyRange(isa, x + static_cast<int64_t>(t0) * K, w, tb, K, N, b, e,
                  y + static_cast<int64_t>(t0) * N, accumulate);
    });
  });
}

// OpenBLAS (Debian's build keeps a pool of its own threads, one per CPU)
// runs single-threaded unless OPENBLAS_NUM_THREADS says otherwise: OpenMP
// already splits the work, and a GEMM called from each thread of an OpenMP
// team woke OpenBLAS's pool too, on the same cores (the local engine's
// prefill, whole experts per thread: 2 vCPUs, 256-token prompts, TTFT 2.2 s
// against 5.3-5.9 s). Its bits also depend on its thread count, so one
// thread gives every process layout the same result whatever its cores.
void UseOneBlasThread() {
  static const bool done = [] {
    if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr) openblas_set_num_threads(1);
    return true;
  }();
  (void)done;
}

void BlasLinear(const float* x, const float* w, int tokens, int in_features, int out_features,
                int ldy, float* y, bool accumulate) {
  UseOneBlasThread();
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tokens, out_features, in_features, 1.0f, x,
              in_features, w, in_features, accumulate ? 1.0f : 0.0f, y, ldy);
}

}  // namespace

Matrix Matrix::FromF32(std::vector<float> data, int rows, int cols) {
  SY_CHECK(data.size() == static_cast<size_t>(rows) * cols);
  Matrix m;
  m.rows_ = rows;
  m.cols_ = cols;
  m.f32_.assign(data.begin(), data.end());
  return m;
}

Matrix Matrix::FromBf16(std::vector<uint16_t> data, int rows, int cols) {
  SY_CHECK(data.size() == static_cast<size_t>(rows) * cols);
  Matrix m;
  m.rows_ = rows;
  m.cols_ = cols;
  m.is_bf16_ = true;
  m.bf16_.assign(data.begin(), data.end());
  return m;
}

Matrix Matrix::FromStored(DType dtype, const void* data, int rows, int cols) {
  const size_t count = static_cast<size_t>(rows) * cols;
  Matrix m;
  m.rows_ = rows;
  m.cols_ = cols;
  if (dtype == DType::kBF16) {
    m.is_bf16_ = true;
    m.bf16_.resize(count);  // [rows, cols]
    std::memcpy(m.bf16_.data(), data, count * sizeof(uint16_t));
  } else {
    m.f32_.resize(count);  // [rows, cols]
    ConvertToF32(dtype, data, count, m.f32_.data());
  }
  return m;
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
  Matrix m;
  m.rows_ = rows;
  m.cols_ = cols;
  if (all_bf16) {
    m.is_bf16_ = true;
    m.bf16_.reserve(static_cast<size_t>(rows) * cols);  // [sum rows, cols]
    for (const Matrix* p : parts) m.bf16_.insert(m.bf16_.end(), p->bf16_.begin(), p->bf16_.end());
    return m;
  }
  m.f32_.resize(static_cast<size_t>(rows) * cols);  // [sum rows, cols]
  int64_t row = 0;
  for (const Matrix* p : parts) {
    for (int r = 0; r < p->rows(); ++r, ++row) p->RowToF32(r, m.f32_.data() + row * cols);
  }
  return m;
}

void Matrix::RowToF32(int r, float* out) const {
  const int64_t offset = static_cast<int64_t>(r) * cols_;
  if (is_bf16_) {
    for (int k = 0; k < cols_; ++k) out[k] = Bf16ToF32(bf16_[offset + k]);
  } else {
    std::copy_n(f32_.data() + offset, cols_, out);
  }
}

CpuIsa DetectedIsa() {
  static const CpuIsa detected = DetectIsa();
  return detected;
}

const char* CpuIsaName(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar:
      return "scalar";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx512Bf16:
      return "avx512_bf16";
    case CpuIsa::kAmx:
      return "amx";
  }
  return "unknown";
}

CpuIsa ActiveIsa() { return static_cast<CpuIsa>(State().isa.load(std::memory_order_relaxed)); }

CpuIsa SetIsa(CpuIsa isa) {
  const CpuIsa chosen = std::min(isa, DetectedIsa());
  State().isa.store(static_cast<int>(chosen));
  return chosen;
}

MatmulPrecision ActivePrecision() {
  return static_cast<MatmulPrecision>(State().precision.load(std::memory_order_relaxed));
}

void SetPrecision(MatmulPrecision precision) {
  State().precision.store(static_cast<int>(precision));
}

std::string KernelDescription() {
  const CpuIsa isa = ActiveIsa();
  const bool bf16 = ActivePrecision() == MatmulPrecision::kBf16;
  std::string s = std::string("cpu kernels: ") + CpuIsaName(isa) + " (cpu has " +
                  CpuIsaName(DetectedIsa()) + "), bf16-weight products in " +
                  (bf16 ? "bf16 precision" : "fp32 precision");
  if (isa >= CpuIsa::kAmx) {
    s += bf16 ? " via AMX tiles" : " via AMX tiles (x as 3 bf16 terms)";
  } else if (bf16) {
    s += isa >= CpuIsa::kAvx512Bf16 ? " via vdpbf16ps" : " (fp32 emulation)";
  }
  return s;
}

bool RowsIndependentOfCount(bool bf16_weights) {
  // Mirrors the dispatch of the two Linear functions below: only their BLAS
  // branches depend on T.
  if (!bf16_weights) return false;
  return ActiveIsa() >= CpuIsa::kAvx512 || ActivePrecision() == MatmulPrecision::kBf16;
}

void Linear(const float* x, const float* w, int tokens, int in_features, int out_features, float* y,
            bool accumulate) {
  if (tokens <= 0 || out_features <= 0) return;
  if (tokens <= kSkinnyMaxTokens) {
    Skinny(ActiveIsa(), x, w, tokens, in_features, out_features, y, accumulate);
    return;
  }
  BlasLinear(x, w, tokens, in_features, out_features, out_features, y, accumulate);
}

struct LinearRows::Scratch {
  std::vector<float> xr;     // [T, Kin] x rounded to BF16 (kBf16 without vdpbf16ps)
  std::vector<uint16_t> xb;  // [T, kp] x as BF16, zero padded (vdpbf16ps)
  int kp = 0;
  amx::PackedX packed;  // x as AMX B tiles
};

LinearRows::LinearRows() : scratch_(std::make_unique<Scratch>()) {}
LinearRows::~LinearRows() = default;
LinearRows::LinearRows(LinearRows&&) noexcept = default;
LinearRows& LinearRows::operator=(LinearRows&&) noexcept = default;

LinearRows::Path LinearRows::Choose(const Matrix& w, int tokens, CpuIsa isa,
                                    MatmulPrecision precision) {
  if (tokens <= 0 || w.rows() <= 0) return Path::kNone;
  if (!w.is_bf16()) return tokens <= kSkinnyMaxTokens ? Path::kSkinnyF32 : Path::kBlasF32;
  if (isa >= CpuIsa::kAmx) return Path::kAmx;
  if (precision == MatmulPrecision::kBf16) {
    // x rounded to BF16, then BF16 × BF16 products summed in FP32: with
    // vdpbf16ps, elsewhere in FP32 (BF16 × BF16 is exact in FP32).
    return isa >= CpuIsa::kAvx512Bf16 ? Path::kDpBf16 : Path::kSkinnyBf16;
  }
  if (tokens <= kSkinnyMaxTokens || isa >= CpuIsa::kAvx512) return Path::kSkinnyBf16;
  return Path::kBlasBf16;
}

int LinearRows::GroupOf(Path path) {
  switch (path) {
    case Path::kAmx:
      return 32;  // the AMX kernel's row tiles
    case Path::kBlasF32:
    case Path::kBlasBf16:
      return 0;
    default:
      return 8;
  }
}

int LinearRows::RowGroup(const Matrix& w, int tokens) {
  return GroupOf(Choose(w, tokens, ActiveIsa(), ActivePrecision()));
}

void LinearRows::Prepare(const float* x, const Matrix& w, int tokens, float* y, bool accumulate) {
  x_ = x;
  w_ = &w;
  tokens_ = std::max(tokens, 0);
  rows_ = w.rows();
  y_ = y;
  accumulate_ = accumulate;
  isa_ = ActiveIsa();
  const MatmulPrecision precision = ActivePrecision();
  path_ = Choose(w, tokens, isa_, precision);
  row_group_ = GroupOf(path_);
  const int K = w.cols();
  if (path_ == Path::kAmx) {
    amx::PackX(x, tokens, K, precision == MatmulPrecision::kBf16 ? 1 : 3, &scratch_->packed);
  } else if (path_ == Path::kDpBf16) {
#ifdef SY_X86
    const int kp = (K + 31) / 32 * 32;
    scratch_->kp = kp;
    scratch_->xb.assign(static_cast<size_t>(tokens) * kp, 0);
    for (int t = 0; t < tokens; ++t) {
      RoundToBf16Avx512(x + static_cast<int64_t>(t) * K, K,
                        scratch_->xb.data() + static_cast<int64_t>(t) * kp);
    }
#endif
  } else if (path_ == Path::kSkinnyBf16 && precision == MatmulPrecision::kBf16) {
    std::vector<float>& xr = scratch_->xr;  // [T, Kin]
    xr.resize(static_cast<size_t>(tokens) * K);
    for (size_t i = 0; i < xr.size(); ++i) xr[i] = Bf16ToF32(F32ToBf16(x[i]));
    x_ = xr.data();
  }
}

void LinearRows::Rows(int n_begin, int n_end) const {
  if (n_begin >= n_end) return;
  const int K = w_->cols(), N = rows_;
  switch (path_) {
    case Path::kNone:
      return;
    case Path::kSkinnyF32:
    case Path::kSkinnyBf16:
      ForRowBlocks(tokens_, N, n_begin, n_end, [&](int t0, int tb, int b, int e) {
        const float* xt = x_ + static_cast<int64_t>(t0) * K;
        float* yt = y_ + static_cast<int64_t>(t0) * N;
        if (path_ == Path::kSkinnyF32) {
          SkinnyRange(isa_, xt, w_->f32(), tb, K, N, b, e, yt, accumulate_);
        } else {
          SkinnyRange(isa_, xt, w_->bf16(), tb, K, N, b, e, yt, accumulate_);
        }
      });
      return;
    case Path::kDpBf16: {
#ifdef SY_X86
      const int kp = scratch_->kp;
      const uint16_t* xb = scratch_->xb.data();
      ForRowBlocks(tokens_, N, n_begin, n_end, [&](int t0, int tb, int b, int e) {
        SkinnyDpBf16(xb + static_cast<int64_t>(t0) * kp, kp, w_->bf16(), tb, K, N, b, e,
                     y_ + static_cast<int64_t>(t0) * N, accumulate_);
      });
#endif
      return;
    }
    case Path::kAmx:
      amx::AmxRows(scratch_->packed, w_->bf16(), N, n_begin, n_end, y_, accumulate_);
      return;
    case Path::kBlasF32:
      SY_CHECK(n_begin == 0 && n_end == N);
      BlasLinear(x_, w_->f32(), tokens_, K, N, N, y_, accumulate_);
      return;
    case Path::kBlasBf16: {
      SY_CHECK(n_begin == 0 && n_end == N);
      // Many rows without AVX-512: convert blocks of about 256 KiB of
      // weights to FP32 and GEMM.
      const int block = std::max(16, (1 << 16) / std::max(K, 1));
      std::vector<float> wf(static_cast<size_t>(std::min(block, N)) * K);  // [block, Kin]
      for (int n0 = 0; n0 < N; n0 += block) {
        const int nb = std::min(block, N - n0);
        for (int r = 0; r < nb; ++r) w_->RowToF32(n0 + r, wf.data() + static_cast<int64_t>(r) * K);
        BlasLinear(x_, wf.data(), tokens_, K, nb, N, y_ + n0, accumulate_);  // y[:, n0:n0+nb]
      }
      return;
    }
  }
}

void Linear(const float* x, const Matrix& w, int tokens, float* y, bool accumulate) {
  const int K = w.cols(), N = w.rows();
  if (tokens <= 0 || N <= 0) return;
  thread_local LinearRows product_here;
  product_here.Prepare(x, w, tokens, y, accumulate);
  const LinearRows& product = product_here;  // the team's threads see this thread's copy
  if (product.row_group() == 0) {
    product.Rows(0, N);
    return;
  }
  SplitRows(
      N, ThreadsFor(N, K, tokens), [&](int n_begin, int n_end) { product.Rows(n_begin, n_end); },
      product.row_group());
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

void RoundToBf16(const float* x, int64_t n, uint16_t* out) {
#ifdef SY_X86
  if (ActiveIsa() >= CpuIsa::kAvx512) {
    RoundToBf16Avx512(x, n, out);
    return;
  }
  if (ActiveIsa() >= CpuIsa::kAvx2) {
    RoundToBf16Avx2(x, n, out);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = F32ToBf16(x[i]);
}

void WidenBf16(const void* x, int64_t n, float* out) {
  const auto* bytes = static_cast<const uint8_t*>(x);
#ifdef SY_X86
  if (ActiveIsa() >= CpuIsa::kAvx2) {
    WidenBf16Avx2(bytes, n, out);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    uint16_t v;
    std::memcpy(&v, bytes + 2 * i, 2);
    out[i] = Bf16ToF32(v);
  }
}

namespace {

template <typename W>
void DotRowsScalar(const float* q, int heads, const W* k, int n, float* out) {
  for (int g = 0; g < heads; ++g) {
    const float* qg = q + static_cast<int64_t>(g) * n;  // [n]
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += qg[i] * ToF32(k[i]);
    out[g] = s;
  }
}

template <typename W>
void AxpyRowsScalar(const float* a, int heads, const W* v, float* y, int n) {
  for (int g = 0; g < heads; ++g) {
    float* yg = y + static_cast<int64_t>(g) * n;  // [n]
    for (int i = 0; i < n; ++i) yg[i] += a[g] * ToF32(v[i]);
  }
}

// out[heads] = q[heads, n] · k[n] and y[heads, n] += a[heads] * v[n], at one level.
template <typename W>
struct GroupRowOps {
  void (*dot)(const float* q, int heads, const W* k, int n, float* out);
  void (*axpy)(const float* a, int heads, const W* v, float* y, int n);
};

template <typename W>
GroupRowOps<W> GroupRows() {
#ifdef SY_X86
  const CpuIsa isa = ActiveIsa();
  if (isa >= CpuIsa::kAvx512) return {DotRowsAvx512<W>, AxpyRowsAvx512<W>};
  if (isa >= CpuIsa::kAvx2) return {DotRowsAvx2<W>, AxpyRowsAvx2<W>};
#endif
  return {DotRowsScalar<W>, AxpyRowsScalar<W>};
}

// Below this many multiply-adds (tokens x H x span x hd x 2) a call stays on
// the calling thread: a team costs more than it saves.
constexpr int64_t kAttendMinParallelWork = int64_t{1} << 20;

template <typename W>
void AttendImpl(const AttentionShape& shape, absl::Span<const AttentionRows<W>> jobs) {
  const int hd = shape.head_dim, H = shape.heads, Hkv = shape.kv_heads, group = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const GroupRowOps<W> ops = GroupRows<W>();
  // Every (job, row) of the batch, so one team covers all sequences of a step.
  thread_local std::vector<std::pair<int, int>> rows;
  rows.clear();
  int64_t work = 0;  // multiply-adds
  for (size_t j = 0; j < jobs.size(); ++j) {
    const AttentionRows<W>& job = jobs[j];
    for (int t = 0; t < job.tokens; ++t) {
      rows.emplace_back(static_cast<int>(j), t);
      const int pos = job.start_pos + t;
      work += static_cast<int64_t>(
                  shape.sliding_window > 0 ? std::min(pos + 1, shape.sliding_window) : pos + 1) *
              H * hd * 2;
    }
  }
  const std::vector<std::pair<int, int>>& all_rows = rows;
  // One item = one query row's group of heads sharing a kv head: each K and
  // V row of its span is read once for the whole group.
  auto item = [&](int64_t index) {
    const AttentionRows<W>& job = jobs[all_rows[index / Hkv].first];
    const int t = all_rows[index / Hkv].second, kv_head = static_cast<int>(index % Hkv);
    const int pos = job.start_pos + t;
    const int first = shape.sliding_window > 0 ? std::max(0, pos - shape.sliding_window + 1) : 0;
    const int span = pos - first + 1;
    // Position-major [S, group]: the dot of row j writes, and the axpy of row
    // j reads, one contiguous group of scores.
    thread_local std::vector<float> scores, head;  // [S, group], [S]
    scores.resize(static_cast<size_t>(span) * group);
    head.resize(span);
    const int64_t head0 = static_cast<int64_t>(t) * H + static_cast<int64_t>(kv_head) * group;
    const float* qg = job.q + head0 * hd;  // [group, hd]
    const int64_t kv_off = static_cast<int64_t>(kv_head) * hd;
    for (int j = 0; j < span; ++j) {
      ops.dot(qg, group, job.key_rows[first + j] + kv_off, hd,
              scores.data() + static_cast<size_t>(j) * group);
    }
    for (int g = 0; g < group; ++g) {
      for (int j = 0; j < span; ++j) head[j] = scores[static_cast<size_t>(j) * group + g] * scale;
      SoftmaxInPlace(head.data(), span);
      for (int j = 0; j < span; ++j) scores[static_cast<size_t>(j) * group + g] = head[j];
    }
    float* og = job.out + head0 * hd;  // [group, hd]
    std::fill_n(og, static_cast<size_t>(group) * hd, 0.0f);
    for (int j = 0; j < span; ++j) {
      ops.axpy(scores.data() + static_cast<size_t>(j) * group, group,
               job.value_rows[first + j] + kv_off, og, hd);
    }
  };
  const int64_t items = static_cast<int64_t>(all_rows.size()) * Hkv;
  int threads = 1;
#ifdef _OPENMP
  if (!omp_in_parallel() && work >= kAttendMinParallelWork) {
    threads = static_cast<int>(std::clamp<int64_t>(
        std::min<int64_t>(work / kAttendMinParallelWork, items), 1, omp_get_max_threads()));
  }
#endif
  if (threads <= 1) {
    for (int64_t i = 0; i < items; ++i) item(i);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < items; ++i) item(i);
#endif
}

template <typename W>
void AttendReferenceImpl(const AttentionShape& shape, const float* q, int tokens, int start_pos,
                         const W* const* key_rows, const W* const* value_rows, float* out) {
  const int hd = shape.head_dim, H = shape.heads, group = H / shape.kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<float> scores;  // [S]
  for (int t = 0; t < tokens; ++t) {
    const int pos = start_pos + t;
    const int first = shape.sliding_window > 0 ? std::max(0, pos - shape.sliding_window + 1) : 0;
    const int span = pos - first + 1;
    scores.resize(span);
    for (int head = 0; head < H; ++head) {
      const int kv_head = head / group;
      const float* qv = q + (static_cast<int64_t>(t) * H + head) * hd;  // [hd]
      for (int j = 0; j < span; ++j) {
        const W* kv = key_rows[first + j] + kv_head * hd;  // [hd]
        float dot = 0.0f;
        for (int d = 0; d < hd; ++d) dot += qv[d] * ToF32(kv[d]);
        scores[j] = dot * scale;
      }
      SoftmaxInPlace(scores.data(), span);
      float* o = out + (static_cast<int64_t>(t) * H + head) * hd;  // [hd]
      std::fill_n(o, hd, 0.0f);
      for (int j = 0; j < span; ++j) {
        const W* vv = value_rows[first + j] + kv_head * hd;  // [hd]
        for (int d = 0; d < hd; ++d) o[d] += scores[j] * ToF32(vv[d]);
      }
    }
  }
}

}  // namespace

void Attend(const AttentionShape& shape, const float* q, int tokens, int start_pos,
            const float* const* key_rows, const float* const* value_rows, float* out) {
  const AttentionRows<float> job{q, tokens, start_pos, key_rows, value_rows, out};
  AttendImpl<float>(shape, absl::MakeConstSpan(&job, 1));
}
void Attend(const AttentionShape& shape, const float* q, int tokens, int start_pos,
            const uint16_t* const* key_rows, const uint16_t* const* value_rows, float* out) {
  const AttentionRows<uint16_t> job{q, tokens, start_pos, key_rows, value_rows, out};
  AttendImpl<uint16_t>(shape, absl::MakeConstSpan(&job, 1));
}
void Attend(const AttentionShape& shape, absl::Span<const AttentionRows<float>> jobs) {
  AttendImpl<float>(shape, jobs);
}
void Attend(const AttentionShape& shape, absl::Span<const AttentionRows<uint16_t>> jobs) {
  AttendImpl<uint16_t>(shape, jobs);
}
void AttendReference(const AttentionShape& shape, const float* q, int tokens, int start_pos,
                     const float* const* key_rows, const float* const* value_rows, float* out) {
  AttendReferenceImpl(shape, q, tokens, start_pos, key_rows, value_rows, out);
}
void AttendReference(const AttentionShape& shape, const float* q, int tokens, int start_pos,
                     const uint16_t* const* key_rows, const uint16_t* const* value_rows,
                     float* out) {
  AttendReferenceImpl(shape, q, tokens, start_pos, key_rows, value_rows, out);
}

}  // namespace switchyard::cpu
