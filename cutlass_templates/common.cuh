// Shared building blocks of the INT8 tensor-core GEMMs: tile shape, CTA order, swizzled
// shared-memory staging (cp.async, ldmatrix), mma.sync s8, and the epilogues, which every
// template (the sm80 mma.sync kernels of gemm_sm80.cuh, the Hopper wgmma ones) shares: fp32
// math with explicit _rn intrinsics (no FMA contraction, so the rounding sequence is that of
// the PyTorch reference), one rounding to fp16.  Split-K: splitk.cuh.
//
// CTA order (tile_origin): blockIdx.x walks N fastest; where N is wide (tile columns x BN at
// least kRasterMinN) the grid is walked in bands of kRasterM tile rows instead, column by
// column, so that the CTAs resident at once share a few A row blocks and a few dozen B column
// blocks instead of one A row block and every B column block: for wide N (gate_up, N = 28672,
// whose int8 weights are 117 MB, more than L2) the plain order re-reads all of B from DRAM for
// every row block (W8A8 gate_up M = 4096: 1543 -> 1269 us on an H100).  Narrower grids keep
// the plain order, which measured 2-5% faster there (a wave already spans 8+ rows).
//
// Shared memory (dynamic, 128-byte aligned), STAGES stages of [A stage][B stage]:
//   [A_0 .. A_{S-1}][B_0 .. B_{S-1}], A stage = BM x BK int8 rows with the 16-byte chunks of
//   every 128-byte line XOR-swizzled by the line index (CuTe Swizzle<3,4,3> on byte offsets):
//   8 ldmatrix row addresses (8 consecutive rows, one 16-byte chunk column) hit 8 distinct
//   chunk slots of the 32 banks for BK = 32, 64, 128, 256, and a warp's 32 cp.async writes
//   cover whole lines.  The B stage size is the policy's (kStageBytes).
//
// Fragment layouts: PTX ISA "Matrix Fragments for mma.m16n8k32" (.s8): lane = 4*g + t;
//   A regs a0..a3 = (row g, k 4t..4t+3), (row g+8, same k), (row g, k 16+4t..), (row g+8, ..);
//   B regs b0, b1 = (col g, k 4t..4t+3), (col g, k 16+4t..); C c0,c1 = (row g, cols 2t, 2t+1),
//   c2,c3 = (row g+8, same cols).
#pragma once

#include <cstdint>
#include <cuda_fp16.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#define QC_CAT_(a, b) a##b
#define QC_CAT(a, b) QC_CAT_(a, b)

namespace qc {

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, int SPLITK_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_, SPLITK = SPLITK_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MT = WM / 16, NT = WN / 8;             // m16 x n8 MMA tiles per warp
  static constexpr int KS = BK / 32;                          // k32 steps per stage
  static constexpr int A_STAGE = BM * BK;                     // bytes

  static_assert(BM % (16 * WARPS_M) == 0, "BM must be a multiple of 16 * WARPS_M");
  static_assert(BN % (32 * WARPS_N) == 0, "BN must be a multiple of 32 * WARPS_N");
  static_assert(BK % 32 == 0 && BK >= 32 && BK <= 256, "BK must be 32, 64, ..., 256");
  static_assert(STAGES >= 2, "the cp.async pipeline needs at least 2 stages");
  static_assert(SPLITK >= 1, "QC_SPLITK must be >= 1");
  static_assert(THREADS <= 1024, "too many warps");
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }

// Threads per block of every *_reduce entry (configs.py REDUCE_THREADS mirrors it).
constexpr int kReduceThreads = 256;

// Tile rows per raster band, and the output width from which bands are used (see the header).
constexpr int kRasterM = 8;
constexpr int kRasterMinN = 16384;

// (m0, n0) of this CTA's output tile.  With gridDim.x * BN >= kRasterMinN, the linear CTA
// index blockIdx.y * gridDim.x + blockIdx.x enumerates bands of kRasterM tile rows (the last
// band may be thinner) column by column, each column of a band top to bottom.  A bijection of the grid; slices of one split-K tile
// share blockIdx.x/y and so their tile.
template <class T>
__device__ __forceinline__ int2 tile_origin() {
  const int tiles_n = gridDim.x, tiles_m = gridDim.y;
  if (tiles_n * T::BN < kRasterMinN) return make_int2(blockIdx.y * T::BM, blockIdx.x * T::BN);
  const int id = blockIdx.y * tiles_n + blockIdx.x;
  const int band = id / (kRasterM * tiles_n), in_band = id % (kRasterM * tiles_n);
  const int rows = min(kRasterM, tiles_m - band * kRasterM);
  const int tm = band * kRasterM + in_band % rows, tn = in_band / rows;
  return make_int2(tm * T::BM, tn * T::BN);
}

// 16-byte chunk index within each 128-byte line XOR the line index (mod 8).
__device__ __forceinline__ uint32_t swz(uint32_t off) { return off ^ (((off >> 7) & 7u) << 4); }

// cp.async.cg 16 B global -> shared; pred false: no global read, 16 zero bytes written.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(gmem), *reinterpret_cast<cute::uint128_t*>(smem),
      pred);
}

// cp.async.ca 4 B global -> shared; pred false: no global read, a zero written.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool pred) {
  cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(
      *reinterpret_cast<const uint32_t*>(gmem), *reinterpret_cast<uint32_t*>(smem), pred);
}

__device__ __forceinline__ void ldsm_x4(const void* smem, uint32_t (&r)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2],
                                r[3]);
}

__device__ __forceinline__ void mma_s8(uint32_t (&d)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
  cute::SM80_16x8x32_S32S8S8S32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b[0], b[1],
                                        d[0], d[1], d[2], d[3]);
}

// s4 activations x u4 weight codes (W4Ax's 4-bit blocks, w4a8_sm80.cu with QC_A4X == 2).  The
// m16n8k64 fragments are m16n8k32's by bytes (PTX ISA "Matrix Fragments for mma.m16n8k64"):
// a0..a3 = (row g, k 8t..8t+7), (row g+8, ..), (row g, k 32+8t..), (row g+8, ..); b0, b1 =
// (col g, k 8t..8t+7), (col g, k 32+8t..); a register's nibble j is k + j.
__device__ __forceinline__ void mma_s4u4(uint32_t (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  cute::SM80_16x8x64_S32S4U4S32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b[0],
                                        b[1], d[0], d[1], d[2], d[3]);
}

// ---------------------------------------------------------------------------------------------
// cp.async of ROWS x BK bytes of a row-major int8 matrix X [rows, cols] (row stride cols,
// cols % 16 == 0) into swizzled shared memory, rows r0.., columns k0..: rows >= `rows` and
// 16-byte chunks at k >= cols are zero-filled.  Operand A ([M, K]) and the W8A8 B operand
// ([Np, Kp]) use it.
//
// The addressing is hoisted out of the K loop: chunk i of a thread is chunk tid + i * THREADS
// of the stage, so all of a thread's chunks share one column (tid % CPR) and step down by
// RSTEP = THREADS / CPR rows; the constructor computes the first chunk's pointer, the row
// bounds of all of them (a bit mask) and the swizzled shared offset once, and a stage only
// adds k0.  When RSTEP rows span whole periods of the swizzle (8 lines of 128 bytes), the
// shared offsets of the chunks differ by constants.
template <class T, int ROWS>
struct RowLoader {
  static constexpr int CPR = T::BK / 16;  // chunks per row
  static constexpr int CHUNKS = ROWS * CPR;
  static constexpr int ITERS = ceil_div(CHUNKS, T::THREADS);
  static constexpr int RSTEP = T::THREADS / CPR;
  static constexpr bool kLinear = (RSTEP * T::BK) % 1024 == 0;
  static_assert(T::THREADS % CPR == 0, "a CTA must cover whole rows");
  static_assert(ITERS <= 32, "row mask holds 32 chunks");

  const int8_t* base;  // X
  uint32_t off;        // bytes from X to the thread's first chunk at k0 = 0
  uint32_t step;       // bytes between a thread's chunks (RSTEP rows)
  int k, cols, r;      // the thread's column (bytes), the row length, its first tile row
  uint32_t ok;         // bit i: chunk i exists and its row is < rows

  // Offsets are 32-bit (the runtime refuses operands of 2^31 bytes or more) from the
  // kernel-uniform base, so a chunk address is one add; a predicated-off chunk keeps its
  // (possibly out-of-range) address: cp.async with src-size 0 reads no byte of it.
  __device__ __forceinline__ RowLoader(const int8_t* X, int rows, int cols_, int r0, int tid)
      : base(X), step((uint32_t)(RSTEP * cols_)), k((tid % CPR) * 16), cols(cols_),
        r(tid / CPR), ok(0u) {
    off = (uint32_t)((r0 + r) * cols + k);
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const bool exists = CHUNKS % T::THREADS == 0 || tid + i * T::THREADS < CHUNKS;
      ok |= (uint32_t)(exists && r0 + r + i * RSTEP < rows) << i;
    }
  }

  // kmax < BK: only the first kmax bytes of each row (a packed 4-bit W4Ax tile: 64); the
  // threads of the other columns issue nothing (no reader looks past kmax)
  __device__ __forceinline__ void load(char* s, int k0, int tid, int kmax = T::BK) const {
    if (kmax < T::BK && k >= kmax) return;
    const bool in_k = k0 + k < cols;
    const uint32_t o = off + (uint32_t)k0;
    const uint32_t s0 = swz(r * T::BK + k);
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      if (CHUNKS % T::THREADS == 0 || i + 1 < ITERS || tid + i * T::THREADS < CHUNKS) {
        const uint32_t so = kLinear ? s0 + i * RSTEP * T::BK : swz((r + i * RSTEP) * T::BK + k);
        cp_async16(s + so, base + (o + i * step), in_k && (ok >> i & 1u));
      }
    }
  }
};

// A fragments of k32 step ks for the warp's MT m16 tiles: ldmatrix.x4 matrices
// (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31) = a0..a3;
// lane l gives the row address of matrix l / 8, row l % 8.
template <class T>
__device__ __forceinline__ void load_a_frag(const char* sa, int warp_m, int lane, int ks,
                                            uint32_t (&a)[T::MT][4]) {
  const int kb = ks * 32 + (lane >> 4) * 16;
  const int row0 = warp_m * T::WM + (lane & 15);
  // 16 rows further is 16 * BK bytes: a whole number of swizzle periods (8 lines of 128 bytes)
  // when BK >= 64, so the m16 tiles' addresses differ by immediates (no per-tile swizzle math)
  constexpr bool kLinear = (16 * T::BK) % 1024 == 0;
  const uint32_t off0 = swz(row0 * T::BK + kb);
#pragma unroll
  for (int mt = 0; mt < T::MT; ++mt)
    ldsm_x4(sa + (kLinear ? off0 + mt * 16 * T::BK : swz((row0 + mt * 16) * T::BK + kb)), a[mt]);
}

// ---------------------------------------------------------------------------------------------
// Epilogue helpers.  Epi (defined by each .cu) has:
//   struct Row; Row row(int m) const;           per-token values (s_x, ...)
//   float apply(const Row&, int n, int acc) const;   fp32 value before bias, column n < N
// Then y (+ bias[n] as fp32) is rounded once to fp16 (round to nearest even).

__device__ __forceinline__ float add_bias(float y, const __half* bias, int n) {
  return bias ? __fadd_rn(y, __half2float(bias[n])) : y;
}

// Store columns n (< N) and n + 1 (if < N) of row m; n is even.
__device__ __forceinline__ void store_pair(__half* C, int N, int m, int n, float y0, float y1) {
  __half* p = C + (size_t)m * N + n;
  if (n + 1 < N) {
    if ((N & 1) == 0) {
      *reinterpret_cast<__half2*>(p) = __floats2half2_rn(y0, y1);
    } else {
      p[0] = __float2half_rn(y0);
      p[1] = __float2half_rn(y1);
    }
  } else {
    p[0] = __float2half_rn(y0);
  }
}

// The W8A8 epilogue (w8a8_sm80.cu, w8a8_sm90.cu): y = fp32(acc) * s_x[m] * s_w[n], the
// reference's rounding sequence (runtime/ops/gemm.py gemm_w8a8).
struct EpiW8A8 {
  const float* s_x;
  const float* s_w;
  struct Row {
    float sx;
  };
  __device__ __forceinline__ Row row(int m) const { return {__ldg(s_x + m)}; }
  __device__ __forceinline__ float apply(const Row& r, int n, int acc) const {
    return __fmul_rn(__fmul_rn(__int2float_rn(acc), r.sx), __ldg(s_w + n));
  }
};

// The W4A8 per-channel epilogue (w4a8_sm80.cu, w4a8_rs_sm90.cu): the codes q in 0..15 went into
// the MMA unshifted, so C = (s_x * s_w) * acc - zs_w * (s_x * sum_k x_q) (zs_w = z * s_w).
struct EpiW4A8 {
  const float* s_x;
  const int32_t* xsum;
  const float* s_w;
  const float* zs_w;
  struct Row {
    float sx, sx_sum;  // s_x, s_x * sum_k x_q
  };
  __device__ __forceinline__ Row row(int m) const {
    const float sx = __ldg(s_x + m);
    return {sx, __fmul_rn(sx, __int2float_rn(__ldg(xsum + m)))};
  }
  __device__ __forceinline__ float apply(const Row& r, int n, int acc) const {
    return __fsub_rn(__fmul_rn(__fmul_rn(r.sx, __ldg(s_w + n)), __int2float_rn(acc)),
                     __fmul_rn(__ldg(zs_w + n), r.sx_sum));
  }
};

// The W4A8 progressive-group epilogue: the MMA ran on w8 = (q - z2) * s2, so C = s_x * s1 * acc.
struct EpiW4A8Group {
  const float* s_x;
  const float* s1;
  struct Row {
    float sx;
  };
  __device__ __forceinline__ Row row(int m) const { return {__ldg(s_x + m)}; }
  __device__ __forceinline__ float apply(const Row& r, int n, int acc) const {
    return __fmul_rn(__fmul_rn(r.sx, __ldg(s1 + n)), __int2float_rn(acc));
  }
};

// Group dequant constant: for the stored negzs byte (low 8 bits of nz) = (-(z2*s2)) mod 256,
// 0x80808080 - z2*s2 * 0x01010101, so that (q4 * s2 + it) ^ 0x80808080 is the four s8 weights
// (q - z2) * s2 of a 32-bit register of codes, exactly (w4a8_sm80.cu W4Operand::convert).
// (In asm so that nvcc cannot split the constant back out of it into a VIADD per register.)
__device__ __forceinline__ uint32_t group_zero_word(uint32_t nz) {
  const uint32_t zs = (0u - nz) & 0xFFu;  // z2 * s2, 0..240
  uint32_t out;
  asm("mad.lo.u32 %0, %1, 0xFEFEFEFF, 0x80808080;" : "=r"(out) : "r"(zs));  // -0x01010101
  return out;
}

// COMET's W4Ax epilogue (w4a8_sm80.cu / w4a8_rs_sm90.cu with QC_A4X): the main loop already
// scaled each activation block's int32 partial by its s_x and summed them in fp32 (`acc`, the
// reference's order and rounding: y = 0, then y = fma(s_x[b], p_b, y) for b = 0, 1, ..; see
// block_scale_add), so C = acc * s_w - zs_w * t with t the dequantized row sum
// (runtime/ops/gemm.py gemm_w4a4x).  s_x [M, nb] f32 (nb = K / 128 blocks), t [M] f32.
struct EpiW4A4X {
  const float* s_x;
  const float* t;
  const float* s_w;
  const float* zs_w;
  int nb;
  struct Row {
    float t;
  };
  __device__ __forceinline__ Row row(int m) const { return {__ldg(t + m)}; }
  // The block-kb scales of tokens m0 .. m0 + ROWS - 1 into ss [ROWS] floats (0 past M), with
  // the stage's cp.async group: thread tid < ROWS copies one.  The main loop then reads each
  // thread's few scales from shared memory, instead of computing and bounds-checking a
  // global address per scale and block (SASS of the 64-token wgmma tile: ~150 of 631
  // instructions a K tile a warp went to those loads).
  template <int ROWS>
  __device__ __forceinline__ void load_scales(float* ss, int m0, int M, int kb, int tid) const {
    if (tid < ROWS) {
      const int m = m0 + tid;
      cp_async4(ss + tid, m < M ? s_x + (size_t)m * nb + kb : s_x, m < M);
    }
  }
  __device__ __forceinline__ float apply(const Row& r, int n, float acc) const {
    return __fsub_rn(__fmul_rn(acc, __ldg(s_w + n)), __fmul_rn(__ldg(zs_w + n), r.t));
  }
};

// EpiW4A4X with packed activations (QC_A4X == 2, sm80 W4Ax): x_q's rows hold the n8 leading
// 8-bit blocks as 128 int8 codes each, then the 4-bit blocks at 64 bytes each (pack_a4x in
// runtime/ops/quant.py: byte b of a 32-channel group = channel b | channel b + 16 << 4), so
// row bytes = (K + 128 n8) / 2; the main loop runs 8-bit blocks on s8 MMAs, 4-bit ones on s4.
struct EpiW4A4XS4 : EpiW4A4X {
  int n8;
};

// One block's partial into the fp32 accumulator with one rounding, as the reference rounds it
// (gemm_w4a4x_ref's fma32): an FFMA where a multiply and an add (two roundings) were two
// instructions, one issue slot an accumulator a block fewer, which is where the per-block
// scaling's cost lies (bench/results/w4a4x-s4-sass-2026-12-08.md).  Exact conversion: |p| <=
// 128 * 127 * 15 < 2^24 (I2F on sm_80, a quarter-rate pipe; I2FP, full rate, on sm_90).
__device__ __forceinline__ float block_scale_add(float acc, float s, uint32_t p) {
  return __fmaf_rn(s, __int2float_rn((int)p), acc);
}

// Acc: int (the int32 accumulator; W8A8 / W4A8 epilogues) or float (EpiW4A4X).
template <class Epi, class Acc>
__device__ __forceinline__ void finish_pair(const Epi& epi, const typename Epi::Row& row,
                                            const __half* bias, __half* C, int N, int m, int n,
                                            Acc acc0, Acc acc1) {
  const float y0 = add_bias(epi.apply(row, n, acc0), bias, n);
  const float y1 = n + 1 < N ? add_bias(epi.apply(row, n + 1, acc1), bias, n + 1) : 0.f;
  store_pair(C, N, m, n, y0, y1);
}

}  // namespace qc
