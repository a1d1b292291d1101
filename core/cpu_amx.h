// AMX tile kernel for y[T, N] = x[T, Kin] · w[N, Kin]^T with BF16 weights
// (Intel AMX-BF16: TDPBF16PS multiplies 16 x 32 BF16 tiles into FP32).
// Internal to core/cpu_ops.cc, which picks it at level CpuIsa::kAmx.
//
// The weights stay in their row-major [N, Kin] layout: a tile of 16 weight
// rows x 32 columns is the A operand, loaded straight from the matrix, and x
// is repacked once per product into the B operand (k-pairs x tokens), so the
// FP32 result tile is y^T for 16 rows x up to 16 tokens.
//
// Precision: AMX multiplies BF16 by BF16. For MatmulPrecision::kBf16, x is
// rounded to BF16 (one term). For kF32, x is split into three BF16 terms
// x = hi + mid + lo (exact for normal FP32 values: 3 x 8 significant bits),
// each term's products with the BF16 weights are exact in FP32, so the result
// is the FP32 math of the oracle in another summation order: each term's
// products are summed in their own FP32 accumulator, then hi + mid, + lo.
// Up to 5 tokens (3 x 5 columns) the three terms sit side by side in one B
// tile, so one tile product covers all three (batch 1 does a third of the
// tile work it would with a tile per term); from 6 tokens each term has its
// own B tile and accumulators. A product's element depends only on its row
// and column, so both layouts give the same bits. Kin past the last
// multiple of 32 is added after the tiles with scalar FMAs in order. A row's
// summation order depends only on Kin, never on T, N or the thread split
// (partial row blocks are computed in a zero-padded copy of the rows).
// AMX flushes denormal inputs to zero: a term below 2^-126 is dropped (an
// x below ~1e-33 in kF32 precision).
//
// Thread-safety: AmxUsable is safe from any thread; the other functions work
// on caller-owned buffers and configure the calling thread's tiles.
#ifndef SWITCHYARD_CORE_CPU_AMX_H_
#define SWITCHYARD_CORE_CPU_AMX_H_

#include <cstdint>
#include <vector>

namespace switchyard::cpu::amx {

// True when the CPU has AMX-BF16 and the kernel let this process use the
// tile state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once).
bool AmxUsable();

// x[T, Kin] repacked as B tiles: for each chunk of up to 16 tokens (tc
// tokens) and each 32-column chunk kc, a tile [16 k-pairs][terms][tc][2] of
// BF16 where terms x tc <= 16 (one term; three terms up to 5 tokens), else a
// tile [16 k-pairs][tc][2] per term; plus the columns past the last multiple
// of 32, as FP32 values of the precision (x itself for 3 terms, BF16-rounded
// x for 1 term).
struct PackedX {
  int tokens = 0;
  int k = 0;                    // Kin
  int chunks = 0;               // Kin / 32, rounded down
  int terms = 0;                // 1 (BF16 precision) or 3 (FP32 precision)
  std::vector<uint16_t> tiles;  // see above
  std::vector<float> tail;      // [T, Kin - 32 chunks]
};

// Fills `out` from x[T, Kin] (terms 1 or 3; see the file comment).
void PackX(const float* x, int tokens, int k, int terms, PackedX* out);

// Rows [n_begin, n_end) of y[T, N] = x · w[N, Kin]^T (+ y when accumulate),
// all tokens, from the packed x. Call only when AmxUsable().
void AmxRows(const PackedX& x, const uint16_t* w, int n, int n_begin, int n_end, float* y,
             bool accumulate);

}  // namespace switchyard::cpu::amx

#endif  // SWITCHYARD_CORE_CPU_AMX_H_
