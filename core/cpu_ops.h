// CPU kernels of the Mixtral forward pass, in FP32. This readable path is
// the oracle every faster backend is tested against.
//
// Legend (dimension names used in shape comments throughout Switchyard):
//   T tokens in a step, D hidden, F expert ffn, E experts, K experts per token,
//   H query heads, Hkv key/value heads, hd head dim, V vocabulary, S cached positions.
//
// All matrices are row-major. Weights keep the Hugging Face layout
// [out_features, in_features], so a projection is y = x W^T.
//
// Weights may be held as FP32 or as BF16 (Matrix). BF16 -> FP32 is exact, so
// Linear on a BF16 Matrix computes the same FP32 math as on its FP32 copy:
// y[t, n] = sum_k x[t, k] * float(w[n, k]), accumulated in FP32 (the
// summation order differs between shapes and kernels, FP32 rounding only).
// For few rows (T <= kSkinnyMaxTokens) Linear uses a "skinny" kernel that
// streams each weight row once and computes all T dot products from it,
// split over N across a persistent OpenMP team; each output element's
// summation order depends only on Kin (and the kernel level), never on T, N or
// the thread split. BF16 matrices use the same kernel for any T when the
// level is avx512 or above, or the precision is kBf16 (row blocks kept in
// cache while 16-token chunks pass over them); otherwise, and for FP32
// matrices, more rows go through BLAS, which runs on the calling thread
// (OpenBLAS set to one thread unless OPENBLAS_NUM_THREADS is set), so its
// bits do not depend on the process's threads either.
//
// Kernel levels (CpuIsa), picked at run time: the best the CPU has, capped by
// SWITCHYARD_CPU_ISA=scalar|avx2|avx512|avx512_bf16|amx (tests force the
// lower paths this way or with SetIsa). scalar is the portable loop; avx2 and
// avx512 are FMA kernels with 8 and 16 lanes; amx (Intel AMX-BF16 tiles,
// core/cpu_amx.h) runs every BF16-weight product, any T, in both precisions
// (kF32 as three BF16 terms of x, see there); FP32 matrices use avx512.
//
// Precision of BF16-weight products (MatmulPrecision), default kF32:
//   kF32:  FP32 activations × exact BF16 weights, FP32 sums (HF parity).
//   kBf16: activations rounded to BF16 (round to nearest even) first, as
//          llama.cpp does with F16 weights and the GPU's BF16 mode; the
//          products are exact, the sums FP32. With AVX512_BF16 this runs on
//          vdpbf16ps (two products per lane and instruction), elsewhere as the
//          same math in FP32. Select with SWITCHYARD_CPU_PRECISION=bf16 or
//          SetPrecision. FP32 matrices always use kF32.
//
// Thread-safety: pure functions over caller-owned buffers (the level and
// precision are atomics read once per product); Matrix is
// immutable after construction and may be shared across threads.
#ifndef SWITCHYARD_CORE_CPU_OPS_H_
#define SWITCHYARD_CORE_CPU_OPS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/dtype.h"
#include "core/huge_pages.h"

namespace switchyard {
class Checkpoint;
}  // namespace switchyard

namespace switchyard::cpu {

// Instruction-set levels of the Linear kernels, lowest first.
enum class CpuIsa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// What a product with BF16 weights rounds (see the file comment).
enum class MatmulPrecision { kF32 = 0, kBf16 = 1 };

// The best level this CPU supports.
CpuIsa DetectedIsa();
// "scalar", "avx2", "avx512", "avx512_bf16", "amx".
const char* CpuIsaName(CpuIsa isa);
// The level in force: DetectedIsa() capped by SWITCHYARD_CPU_ISA at first use.
CpuIsa ActiveIsa();
// Sets the level (clamped to DetectedIsa()) for all threads; returns the level
// in force. Call between products, not during one (tests and benchmarks).
CpuIsa SetIsa(CpuIsa isa);
// The precision in force: kBf16 when SWITCHYARD_CPU_PRECISION=bf16 at first use.
MatmulPrecision ActivePrecision();
void SetPrecision(MatmulPrecision precision);
// One line for start-up logs: the active level, the CPU's, the precision.
std::string KernelDescription();

// Row counts up to this use the skinny kernel.
inline constexpr int kSkinnyMaxTokens = 16;

// Whether Linear, at the level and precision in force, gives every output row
// the same bits whatever the number of rows T (any T, not only T <=
// kSkinnyMaxTokens), for a matrix held as BF16 (`bf16_weights`) or FP32.
// True for BF16 matrices at avx512 and above (AMX tiles, or the skinny
// kernels over 16-row chunks) and in kBf16 precision at any level (skinny
// kernels over 16-row chunks); false for FP32 matrices and for BF16 ones in
// kF32 precision below avx512, whose products of more than kSkinnyMaxTokens
// rows take a BLAS GEMM (another summation order). Micro-batches rely on it
// (gateway/step_runner.h).
bool RowsIndependentOfCount(bool bf16_weights);

// A weight matrix w[N, Kin], row-major, held as FP32 or as BF16 bits.
class Matrix {
 public:
  Matrix() = default;
  static Matrix FromF32(std::vector<float> data, int rows, int cols);      // [rows, cols]
  static Matrix FromBf16(std::vector<uint16_t> data, int rows, int cols);  // [rows, cols]
  // A stored tensor (little-endian, possibly unaligned): BF16 stays BF16,
  // F32 and F16 become FP32 (all exact).
  static Matrix FromStored(DType dtype, const void* data, int rows, int cols);
  // The rows of `parts` (all with the same cols) stacked in order; BF16 when
  // every part is BF16, else FP32.
  static Matrix StackRows(const std::vector<const Matrix*>& parts);
  // The 2-D tensor `name` of `checkpoint` (FromStored of its view).
  static absl::StatusOr<Matrix> Read(const Checkpoint& checkpoint, const std::string& name);

  int rows() const { return rows_; }
  int cols() const { return cols_; }
  bool is_bf16() const { return is_bf16_; }
  const float* f32() const { return f32_.data(); }       // [rows, cols]; FP32 only
  const uint16_t* bf16() const { return bf16_.data(); }  // [rows, cols]; BF16 only
  // Row `r` converted to FP32 into out[cols].
  void RowToF32(int r, float* out) const;
  size_t bytes() const { return f32_.size() * sizeof(float) + bf16_.size() * sizeof(uint16_t); }

 private:
  int rows_ = 0;
  int cols_ = 0;
  bool is_bf16_ = false;
  // In transparent huge pages when large (core/huge_pages.h): batch-1
  // decode streams them with fewer TLB misses.
  HugePageVector<float> f32_;      // [rows, cols] when !is_bf16_
  HugePageVector<uint16_t> bf16_;  // [rows, cols] when is_bf16_
};

// y[T, N] = x[T, Kin] · w[N, Kin]^T  (+ y when accumulate), FP32 weights.
void Linear(const float* x, const float* w, int tokens, int in_features, int out_features, float* y,
            bool accumulate = false);

// y[T, N] = x[T, Kin] · w[N, Kin]^T  (+ y when accumulate), N = w.rows(),
// Kin = w.cols(); either dtype.
void Linear(const float* x, const Matrix& w, int tokens, float* y, bool accumulate = false);

// Linear(x, w, tokens, y, accumulate) taken apart so that its output rows can
// be computed as separate pieces of work, on any threads: Prepare once (it
// rounds or packs x as the level and precision need), then Rows over ranges
// that cover [0, rows()). Every output element is bitwise what Linear
// computes (Linear itself runs this way over its own team), whatever the
// ranges. The MoE layer spreads several experts' products over one team
// with it (LocalExpertBackend::RunLayer).
//
// Thread-safety: Prepare is not; after it, Rows may run concurrently on
// disjoint ranges. x, w and y must outlive the Rows calls.
class LinearRows {
 public:
  LinearRows();
  ~LinearRows();
  LinearRows(LinearRows&&) noexcept;
  LinearRows& operator=(LinearRows&&) noexcept;

  void Prepare(const float* x, const Matrix& w, int tokens, float* y, bool accumulate = false);
  // N, the output rows.
  int rows() const { return rows_; }
  // Ranges must start at multiples of this (8, or 32 for the AMX tiles). 0
  // when the product runs only whole (the BLAS paths: Rows(0, rows())).
  int row_group() const { return row_group_; }
  // y[:, n_begin:n_end] for every token; no-op for an empty range.
  void Rows(int n_begin, int n_end) const;
  // The row_group() that Prepare(x, w, tokens, ...) will give at the level
  // and precision in force, before x exists.
  static int RowGroup(const Matrix& w, int tokens);

 private:
  struct Scratch;  // x as the kernel wants it (BF16-rounded, AMX-packed)
  enum class Path { kNone, kSkinnyF32, kSkinnyBf16, kDpBf16, kAmx, kBlasF32, kBlasBf16 };
  static Path Choose(const Matrix& w, int tokens, CpuIsa isa, MatmulPrecision precision);
  static int GroupOf(Path path);
  Path path_ = Path::kNone;
  CpuIsa isa_ = CpuIsa::kScalar;
  const float* x_ = nullptr;  // [T, Kin], or the rounded copy in scratch_
  const Matrix* w_ = nullptr;
  int tokens_ = 0;
  int rows_ = 0;
  int row_group_ = 0;
  float* y_ = nullptr;
  bool accumulate_ = false;
  std::unique_ptr<Scratch> scratch_;
};

// y[T, D] = x / sqrt(mean(x^2) + eps) * weight, per row.
void RmsNorm(const float* x, const float* weight, int tokens, int dim, float eps, float* y);

// Rotary embedding in place, "rotate half" convention (pairs i and i + hd/2),
// on x[T, heads, hd] with positions[T].
void RopeRotateHalf(float* x, const int32_t* positions, int tokens, int heads, int head_dim,
                    double theta);

// x[n] = softmax(x[n]) in place, numerically stable.
void SoftmaxInPlace(float* x, int n);

// out[N, F] = silu(gate[N, F]) * up[N, F]  (out may alias gate).
void SwiGlu(const float* gate, const float* up, int64_t count, float* out);

// y[n] += x[n]
void AddInPlace(float* y, const float* x, int64_t n);

// Causal grouped-query attention over a cache read through row pointers.
struct AttentionShape {
  int heads = 0;           // H query heads
  int kv_heads = 0;        // Hkv key/value heads; H is a multiple of Hkv
  int head_dim = 0;        // hd
  int sliding_window = 0;  // a position sees the last `sliding_window` ones; 0 = all
};

// out[T, H, hd] = softmax(q K^T / sqrt(hd)) V per query row t < T at position
// start_pos + t, over cached positions [first, pos] (first = pos - window + 1
// with a sliding window, else 0); key_rows[p] and value_rows[p] point at
// [Hkv, hd] for every p < start_pos + T. FP32 or BF16 K/V.
// Each K and V row is read once per group of H / Hkv query heads with the
// kernels of the level in force; (row, kv head) items run across an OpenMP
// team when the work is large. A row's result depends only on its own q and
// the cache (fixed summation order), never on T, start_pos or the threads.
void Attend(const AttentionShape& shape, const float* q, int tokens, int start_pos,
            const float* const* key_rows, const float* const* value_rows, float* out);
void Attend(const AttentionShape& shape, const float* q, int tokens, int start_pos,
            const uint16_t* const* key_rows, const uint16_t* const* value_rows, float* out);
// One sequence's part of a batched Attend: the arguments above.
template <typename W>
struct AttentionRows {
  const float* q;            // [T, H, hd]
  int tokens;                // T
  int start_pos;             // position of q's first row
  const W* const* key_rows;  // [start_pos + T] -> [Hkv, hd]
  const W* const* value_rows;
  float* out;  // [T, H, hd]
};
// Attend for several sequences with one OpenMP team (the rows of every job
// are the items); each row's result is the same as in a call of its own.
void Attend(const AttentionShape& shape, absl::Span<const AttentionRows<float>> jobs);
void Attend(const AttentionShape& shape, absl::Span<const AttentionRows<uint16_t>> jobs);
// The same math as the readable oracle: a scalar loop per query head over
// every position (the K/V rows re-read per head), single-threaded.
void AttendReference(const AttentionShape& shape, const float* q, int tokens, int start_pos,
                     const float* const* key_rows, const float* const* value_rows, float* out);
void AttendReference(const AttentionShape& shape, const float* q, int tokens, int start_pos,
                     const uint16_t* const* key_rows, const uint16_t* const* value_rows,
                     float* out);

// out[n] = F32ToBf16(x[n]): round to nearest even, NaN kept quiet.
void RoundToBf16(const float* x, int64_t n, uint16_t* out);
// out[n] = Bf16ToF32 of the n little-endian BF16 values at `x` (any alignment):
// the wire codec's decode.
void WidenBf16(const void* x, int64_t n, float* out);

}  // namespace switchyard::cpu

#endif  // SWITCHYARD_CORE_CPU_OPS_H_
