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
  for (int t0 = 0; t0 < tokens; t0 += kChunkTokens) {
    const int tc = std::min(kChunkTokens, tokens - t0);
    uint16_t* base = out->tiles.data() + ChunkBase(*out, t0);  // [chunks][terms][16][tc][2]
    for (int t = 0; t < tc; ++t) {
      const float* xr = x + static_cast<int64_t>(t0 + t) * k;  // [Kin]
      for (int kk = 0; kk < kf; ++kk) {
        const int kc = kk / kTileK, pair = (kk % kTileK) / 2, half = kk % 2;
        uint16_t* tile = base + static_cast<int64_t>(kc) * terms * kTileK * tc;
        const int64_t at = (static_cast<int64_t>(pair) * tc + t) * 2 + half;
        const float v = xr[kk];
        const uint16_t hi = F32ToBf16(v);
        tile[at] = hi;
        if (terms == 3) {
          // x = hi + mid + lo exactly (each residual is exact in FP32).
          const float r1 = std::isfinite(v) ? v - Bf16ToF32(hi) : 0.0f;
          const uint16_t mid = F32ToBf16(r1);
          const float r2 = r1 - Bf16ToF32(mid);
          tile[at + 2 * kTileK / 2 * tc] = mid;  // next term's tile: 16 pairs x tc x 2
          tile[at + 2 * (2 * kTileK / 2 * tc)] = F32ToBf16(r2);
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

// Tiles: 0, 1 accumulators C [16 rows][tc] FP32; 2, 3 weights A [16 rows][32]
// BF16; 4, 5, 6 the x terms B [16 pairs][tc][2] BF16.
SY_AMX void Configure(int tc) {
  TileConfig cfg;
  for (int i : {0, 1, 4, 5, 6}) {
    cfg.rows[i] = kTileRows;
    cfg.colsb[i] = static_cast<uint16_t>(tc * 4);
  }
  for (int i : {2, 3}) {
    cfg.rows[i] = kTileRows;
    cfg.colsb[i] = kTileK * 2;
  }
  // Not _tile_loadconfig: GCC 12's version declares an 8-byte memory operand,
  // so the compiler may drop the stores to the rest of cfg.
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}

// C0, C1 = 32 weight rows (stride `ld` elements) · one chunk's packed x.
template <int kTerms>
SY_AMX void Block(const uint16_t* a, int64_t ld, const uint16_t* b, int chunks, int tc,
                  float* c /* [32][16] */) {
  const int64_t a_stride = ld * 2, b_stride = tc * 4;  // bytes
  const int64_t b_tile = static_cast<int64_t>(kTileK) * tc;  // elements per term tile
  _tile_zero(0);
  _tile_zero(1);
  for (int kc = 0; kc < chunks; ++kc) {
    const uint16_t* ak = a + static_cast<int64_t>(kc) * kTileK;
    if (kc + kPrefetchChunks < chunks) {
      const uint16_t* ahead = ak + kPrefetchChunks * kTileK;
      for (int r = 0; r < kBlockRows; ++r) __builtin_prefetch(ahead + r * ld, 0, 3);
    }
    const uint16_t* bk = b + static_cast<int64_t>(kc) * kTerms * b_tile;
    _tile_loadd(2, ak, a_stride);
    _tile_loadd(3, ak + kTileRows * ld, a_stride);
    _tile_loadd(4, bk, b_stride);
    _tile_dpbf16ps(0, 2, 4);
    _tile_dpbf16ps(1, 3, 4);
    if constexpr (kTerms == 3) {
      _tile_loadd(5, bk + b_tile, b_stride);
      _tile_loadd(6, bk + 2 * b_tile, b_stride);
      _tile_dpbf16ps(0, 2, 5);
      _tile_dpbf16ps(1, 3, 5);
      _tile_dpbf16ps(0, 2, 6);
      _tile_dpbf16ps(1, 3, 6);
    }
  }
  _tile_stored(0, c, kChunkTokens * 4);
  _tile_stored(1, c + kTileRows * kChunkTokens, kChunkTokens * 4);
}

template <int kTerms>
SY_AMX void Rows(const PackedX& x, const uint16_t* w, int n, int n_begin, int n_end, float* y,
                 bool accumulate) {
  const int K = x.k, kf = x.chunks * kTileK, rest = K - kf;
  thread_local std::vector<uint16_t> padded;  // [32, Kin]: a partial block, zero padded
  alignas(64) float c[kBlockRows * kChunkTokens];  // [32 rows][16 tokens]
  int configured = 0;
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
      if (tc != configured) {
        Configure(tc);
        configured = tc;
      }
      Block<kTerms>(a, K, x.tiles.data() + ChunkBase(x, t0), x.chunks, tc, c);
      for (int r = 0; r < rows; ++r) {
        const uint16_t* wr = w + static_cast<int64_t>(n0 + r) * K;  // [Kin]
        for (int t = 0; t < tc; ++t) {
          float s = c[r * kChunkTokens + t];
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
