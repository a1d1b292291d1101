#include "core/cpu_amx.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SY_HAVE_AMX 1
#endif

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "core/status_macros.h"

namespace switchyard::cpu::amx {

namespace {

constexpr int kTileRows = 16;     // weight rows per A tile
constexpr int kTileK = 32;        // BF16 columns per A tile (16 k-pairs)
constexpr int kBlockRows = 32;    // weight rows per block (two A tiles)
constexpr int kChunkTokens = 16;  // tokens per B tile
// Weight cache lines requested this many 32-column chunks ahead of the tile
// loads, for each of the block's 32 rows (the hardware prefetcher alone left
// the loads waiting: decode step CPU time -8% at 1 sequence, -10% at 16).
constexpr int kPrefetchChunks = 4;

// Elements before chunk `t0 / 16`'s tiles in PackedX::tiles.
int64_t ChunkBase(const PackedX& x, int t0) {
  return static_cast<int64_t>(x.terms) * x.chunks * kTileK * t0;
}

// Whether a token chunk's x terms fit one B tile side by side (terms x tc
// columns of at most 16): then one TDPBF16PS per weight tile computes every
// term (at batch 1, a third of the tile work of one per term).
bool TermsShareATile(int terms, int tc) { return terms > 1 && terms * tc <= kChunkTokens; }

}  // namespace

namespace {

// The BF16 terms of 32 consecutive values of x, each pair (2 BF16 in one
// 32-bit word, lower column in the low half) as B-tile rows want them:
// words[p][i] for term p and pair i.
void SplitChunkScalar(const float* x, int terms, uint32_t words[3][16]) {
  for (int i = 0; i < 16; ++i) {
    uint16_t bits[3][2];
    for (int half = 0; half < 2; ++half) {
      const float v = x[2 * i + half];
      bits[0][half] = F32ToBf16(v);
      // x = hi + mid + lo exactly (each residual is exact in FP32).
      const float r1 = std::isfinite(v) ? v - Bf16ToF32(bits[0][half]) : 0.0f;
      bits[1][half] = F32ToBf16(r1);
      bits[2][half] = F32ToBf16(r1 - Bf16ToF32(bits[1][half]));
    }
    for (int p = 0; p < terms; ++p) words[p][i] = bits[p][0] | (uint32_t{bits[p][1]} << 16);
  }
}

#ifdef SY_HAVE_AMX
#define SY_PACK_AVX2 __attribute__((target("avx2,fma")))

// F32ToBf16 on 8 lanes: the BF16 bits in the low half of each 32-bit lane.
SY_PACK_AVX2 inline __m256i RoundBf16x8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}

// SplitChunkScalar with AVX2 (bitwise the same terms).
SY_PACK_AVX2 void SplitChunkAvx2(const float* x, int terms, uint32_t words[3][16]) {
  const __m256i lo16 = _mm256_set1_epi64x(0xffff), hi16 = _mm256_set1_epi64x(0xffff0000);
  const __m256i gather_even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int q = 0; q < 4; ++q) {  // 8 values = 4 pairs at a time
    const __m256 v = _mm256_loadu_ps(x + 8 * q);
    __m256i bits[3];
    bits[0] = RoundBf16x8(v);
    if (terms == 3) {
      const __m256i abs = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff));
      const __m256i finite = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x7f800000), abs);
      const __m256 r1 =
          _mm256_and_ps(_mm256_sub_ps(v, _mm256_castsi256_ps(_mm256_slli_epi32(bits[0], 16))),
                        _mm256_castsi256_ps(finite));
      bits[1] = RoundBf16x8(r1);
      const __m256 r2 = _mm256_sub_ps(r1, _mm256_castsi256_ps(_mm256_slli_epi32(bits[1], 16)));
      bits[2] = RoundBf16x8(r2);
    }
    for (int p = 0; p < terms; ++p) {
      // Lanes (2j, 2j+1) -> one word in the low half of 64-bit lane j.
      const __m256i pairs = _mm256_or_si256(_mm256_and_si256(bits[p], lo16),
                                            _mm256_and_si256(_mm256_srli_epi64(bits[p], 16), hi16));
      const __m256i packed = _mm256_permutevar8x32_epi32(pairs, gather_even);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&words[p][4 * q]),
                       _mm256_castsi256_si128(packed));
    }
  }
}
#endif

}  // namespace

void PackX(const float* x, int tokens, int k, int terms, PackedX* out) {
  SY_CHECK(terms == 1 || terms == 3);
  out->tokens = tokens;
  out->k = k;
  out->chunks = k / kTileK;
  out->terms = terms;
  const int kf = out->chunks * kTileK, rest = k - kf;
  out->tiles.resize(static_cast<size_t>(terms) * out->chunks * kTileK * tokens);
  out->tail.resize(static_cast<size_t>(tokens) * rest);
#ifdef SY_HAVE_AMX
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  uint32_t words[3][16];
  for (int t0 = 0; t0 < tokens; t0 += kChunkTokens) {
    const int tc = std::min(kChunkTokens, tokens - t0);
    uint16_t* base = out->tiles.data() + ChunkBase(*out, t0);  // [chunks][terms][16][tc][2]
    for (int t = 0; t < tc; ++t) {
      const float* xr = x + static_cast<int64_t>(t0 + t) * k;  // [Kin]
      for (int kc = 0; kc < out->chunks; ++kc) {
#ifdef SY_HAVE_AMX
        if (avx2) {
          SplitChunkAvx2(xr + kc * kTileK, terms, words);
        } else {
          SplitChunkScalar(xr + kc * kTileK, terms, words);
        }
#else
        SplitChunkScalar(xr + kc * kTileK, terms, words);
#endif
        uint16_t* tile = base + static_cast<int64_t>(kc) * terms * kTileK * tc;  // term 0
        if (TermsShareATile(terms, tc)) {  // one tile [16][terms][tc][2]
          for (int p = 0; p < terms; ++p) {
            for (int i = 0; i < 16; ++i) {
              std::memcpy(tile + ((i * terms + p) * tc + t) * 2, &words[p][i], 4);
            }
          }
        } else {
          for (int p = 0; p < terms; ++p) {
            uint16_t* tp = tile + static_cast<int64_t>(p) * kTileK * tc;  // [16][tc][2]
            for (int i = 0; i < 16; ++i) std::memcpy(tp + (i * tc + t) * 2, &words[p][i], 4);
          }
        }
      }
      for (int kk = kf; kk < k; ++kk) {
        out->tail[static_cast<size_t>(t0 + t) * rest + (kk - kf)] =
            terms == 3 ? xr[kk] : Bf16ToF32(F32ToBf16(xr[kk]));
      }
    }
  }
}

#ifdef SY_HAVE_AMX

namespace {

// No AVX-512 here: GCC would keep values in zmm16-31, whose dirty upper halves
// (vzeroupper does not clear them) slow down the SSE code that runs next.
#define SY_AMX __attribute__((target("amx-tile,amx-bf16")))

// The 64-byte LDTILECFG operand.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles of the two layouts (`cols`: FP32 columns of C, k-pair columns of B).
// Shared B (one term, or all terms side by side): 0, 1 accumulators C [16
// rows][cols] FP32 of rows 0-15 and 16-31; 2, 3 weights A [16 rows][32] BF16;
// 4 the x B [16 pairs][cols][2] BF16. Per term (3 terms, over 5 tokens): 0-2
// the accumulators of terms hi, mid, lo for rows 0-15, 3-5 for rows 16-31; 6
// weights A; 7 one term's B.
SY_AMX void Configure(bool per_term, int cols) {
  TileConfig cfg;
  constexpr int kSharedC[] = {0, 1, 4}, kSharedA[] = {2, 3};
  constexpr int kPerTermC[] = {0, 1, 2, 3, 4, 5, 7}, kPerTermA[] = {6};
  const auto set = [&](const int* tiles, int count, int colsb) {
    for (int j = 0; j < count; ++j) {
      cfg.rows[tiles[j]] = kTileRows;
      cfg.colsb[tiles[j]] = static_cast<uint16_t>(colsb);
    }
  };
  if (per_term) {
    set(kPerTermC, 7, cols * 4);
    set(kPerTermA, 1, kTileK * 2);
  } else {
    set(kSharedC, 3, cols * 4);
    set(kSharedA, 2, kTileK * 2);
  }
  // Not _tile_loadconfig: GCC 12's version declares an 8-byte memory operand,
  // so the compiler may drop the stores to the rest of cfg.
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}

// Requests the block's 32 weight rows kPrefetchChunks chunks past chunk kc
// (at `ak`), while there are any.
SY_AMX inline void PrefetchAhead(const uint16_t* ak, int64_t ld, int kc, int chunks) {
  if (kc + kPrefetchChunks >= chunks) return;
  const uint16_t* ahead = ak + kPrefetchChunks * kTileK;
  for (int r = 0; r < kBlockRows; ++r) __builtin_prefetch(ahead + r * ld, 0, 3);
}

// C0, C1 = 32 weight rows (stride `ld` elements) · one B tile per chunk
// (stride `b_chunk` elements between chunks) of `cols` columns.
SY_AMX void SharedBBlock(const uint16_t* a, int64_t ld, const uint16_t* b, int64_t b_chunk,
                         int chunks, int cols, float* c /* [32][16] */) {
  const int64_t a_stride = ld * 2, b_stride = cols * 4;  // bytes
  _tile_zero(0);
  _tile_zero(1);
  for (int kc = 0; kc < chunks; ++kc) {
    const uint16_t* ak = a + static_cast<int64_t>(kc) * kTileK;
    PrefetchAhead(ak, ld, kc, chunks);
    _tile_loadd(2, ak, a_stride);
    _tile_loadd(3, ak + kTileRows * ld, a_stride);
    _tile_loadd(4, b + kc * b_chunk, b_stride);
    _tile_dpbf16ps(0, 2, 4);
    _tile_dpbf16ps(1, 3, 4);
  }
  _tile_stored(0, c, kChunkTokens * 4);
  _tile_stored(1, c + kTileRows * kChunkTokens, kChunkTokens * 4);
}

// The three terms' accumulators for 32 weight rows, each term in its own
// tiles: c[p] = rows · term p of one chunk of tc tokens. Each term's B tile is
// loaded once per chunk and used by both 16-row halves (the A tile of a half
// is reloaded from L1). Each FP32 output element is the same sum as in
// SharedBBlock (a tile product's element depends only on its row and column),
// so both layouts give the same bits.
SY_AMX void PerTermBlock(const uint16_t* a, int64_t ld, const uint16_t* b, int chunks, int tc,
                         float* c /* [3][32][16] */) {
  const int64_t a_stride = ld * 2, b_stride = tc * 4;        // bytes
  const int64_t b_tile = static_cast<int64_t>(kTileK) * tc;  // elements per term tile
  const int64_t a1 = static_cast<int64_t>(kTileRows) * ld;   // the second half's rows
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  for (int kc = 0; kc < chunks; ++kc) {
    const uint16_t* ak = a + static_cast<int64_t>(kc) * kTileK;
    PrefetchAhead(ak, ld, kc, chunks);
    const uint16_t* bk = b + static_cast<int64_t>(kc) * 3 * b_tile;
    // Tiles 0-2: rows 0-15, terms hi, mid, lo; 3-5: rows 16-31; 6: A; 7: B.
    _tile_loadd(7, bk, b_stride);
    _tile_loadd(6, ak, a_stride);
    _tile_dpbf16ps(0, 6, 7);
    _tile_loadd(6, ak + a1, a_stride);
    _tile_dpbf16ps(3, 6, 7);
    _tile_loadd(7, bk + b_tile, b_stride);
    _tile_dpbf16ps(4, 6, 7);
    _tile_loadd(6, ak, a_stride);
    _tile_dpbf16ps(1, 6, 7);
    _tile_loadd(7, bk + 2 * b_tile, b_stride);
    _tile_dpbf16ps(2, 6, 7);
    _tile_loadd(6, ak + a1, a_stride);
    _tile_dpbf16ps(5, 6, 7);
  }
  constexpr int64_t kHalf = kTileRows * kChunkTokens, kTerm = kBlockRows * kChunkTokens;
  _tile_stored(0, c, kChunkTokens * 4);
  _tile_stored(1, c + kTerm, kChunkTokens * 4);
  _tile_stored(2, c + 2 * kTerm, kChunkTokens * 4);
  _tile_stored(3, c + kHalf, kChunkTokens * 4);
  _tile_stored(4, c + kTerm + kHalf, kChunkTokens * 4);
  _tile_stored(5, c + 2 * kTerm + kHalf, kChunkTokens * 4);
}

template <int kTerms>
SY_AMX void Rows(const PackedX& x, const uint16_t* w, int n, int n_begin, int n_end, float* y,
                 bool accumulate) {
  constexpr int terms = kTerms;
  const int K = x.k, kf = x.chunks * kTileK, rest = K - kf;
  thread_local std::vector<uint16_t> padded;  // [32, Kin]: a partial block, zero padded
  // [terms][32 rows][16 columns]: per term (PerTermBlock), or terms side by
  // side in the columns of c[0] (SharedBBlock).
  alignas(64) float c[3 * kBlockRows * kChunkTokens];
  int configured = 0;  // 1 + columns << 1 | per_term of the tile configuration; 0: none
  for (int n0 = n_begin; n0 < n_end; n0 += kBlockRows) {
    const int rows = std::min(kBlockRows, n_end - n0);
    const uint16_t* a = w + static_cast<int64_t>(n0) * K;  // [rows, Kin]
    if (rows < kBlockRows) {
      padded.assign(static_cast<size_t>(kBlockRows) * K, 0);
      std::memcpy(padded.data(), a, static_cast<size_t>(rows) * K * sizeof(uint16_t));
      a = padded.data();
    }
    for (int t0 = 0; t0 < x.tokens; t0 += kChunkTokens) {
      const int tc = std::min(kChunkTokens, x.tokens - t0);
      const bool per_term = kTerms > 1 && !TermsShareATile(terms, tc);
      const int cols = per_term ? tc : terms * tc;
      const int config = 1 + (cols << 1 | static_cast<int>(per_term));
      if (config != configured) {
        Configure(per_term, cols);
        configured = config;
      }
      const uint16_t* b = x.tiles.data() + ChunkBase(x, t0);
      // Elements of c between a term's value and the next term's, for the
      // same row and token: a [32][16] block apart, or tc columns apart.
      int64_t next_term;
      if (per_term) {
        PerTermBlock(a, K, b, x.chunks, tc, c);
        next_term = kBlockRows * kChunkTokens;
      } else {
        SharedBBlock(a, K, b, static_cast<int64_t>(terms) * kTileK * tc, x.chunks, cols, c);
        next_term = tc;
      }
      for (int r = 0; r < rows; ++r) {
        const uint16_t* wr = w + static_cast<int64_t>(n0 + r) * K;  // [Kin]
        for (int t = 0; t < tc; ++t) {
          const float* ct = c + r * kChunkTokens + t;
          // hi + mid, then + lo: the same order in both layouts.
          float s = ct[0];
          if constexpr (kTerms == 3) {
            s += ct[next_term];
            s += ct[2 * next_term];
          }
          const float* xt = x.tail.data() + static_cast<int64_t>(t0 + t) * rest;  // [rest]
          for (int kk = 0; kk < rest; ++kk) s = std::fma(xt[kk], Bf16ToF32(wr[kf + kk]), s);
          float& out = y[static_cast<int64_t>(t0 + t) * n + n0 + r];
          out = accumulate ? out + s : s;
        }
      }
    }
  }
  if (configured != 0) _tile_release();
}

}  // namespace

bool AmxUsable() {
  static const bool usable = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) return false;
    unsigned eax, ebx, ecx, edx;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
    if (!amx_bf16 || !amx_tile) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

void AmxRows(const PackedX& x, const uint16_t* w, int n, int n_begin, int n_end, float* y,
             bool accumulate) {
  if (x.terms == 3) {
    Rows<3>(x, w, n, n_begin, n_end, y, accumulate);
  } else {
    Rows<1>(x, w, n, n_begin, n_end, y, accumulate);
  }
}

#else

bool AmxUsable() { return false; }

void AmxRows(const PackedX&, const uint16_t*, int, int, int, float*, bool) {
  SY_CHECK(false && "AmxRows without AMX");
}

#endif

}  // namespace switchyard::cpu::amx
