// Shared building blocks of the INT8 tensor-core GEMMs (sm80 mma.sync; also built for sm_90a).
//
// One CTA computes a BM x BN tile of C = epilogue(A . B^T) over a range of K tiles of BK:
//
//   global --cp.async (16 B, zero-filled where predicated off)--> shared, QC_STAGES deep
//   shared --ldmatrix.x4 (A, swizzled)----------------------------> A fragments
//   shared --BOp (operand policy of the .cu: ldmatrix or LDS.128 + unpack/dequant)--> B fragments
//   mma.sync.m16n8k32.row.col.s32.s8.s8.s32 -> int32 accumulators (exact)
//   epilogue: fp32 math with explicit _rn intrinsics (no FMA contraction, so the rounding
//   sequence is that of the PyTorch reference), one rounding to fp16.  With split-K, every
//   slice publishes its raw int32 sums to a workspace; then either the last slice of each tile
//   to arrive (a per-tile arrival counter) adds the others' into its registers and runs the
//   epilogue in the same launch ("fixup"), or, when the launch passes no counters, the
//   *_reduce entry sums the workspace and runs the epilogue in a second launch ("separate"),
//   or, on sm_90 when the launch makes the SPLITK slices of a tile one thread-block cluster
//   ("cluster"), the slices meet in distributed shared memory: no workspace, no second launch.
//   Which is faster depends on the shape (the fixup puts three dependent L2 round trips on
//   the tail of the critical path, a second launch about one); the tile table chooses.
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

__device__ __forceinline__ void ldsm_x4(const void* smem, uint32_t (&r)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2],
                                r[3]);
}

__device__ __forceinline__ void mma_s8(uint32_t (&d)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
  cute::SM80_16x8x32_S32S8S8S32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b[0], b[1],
                                        d[0], d[1], d[2], d[3]);
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

  __device__ __forceinline__ void load(char* s, int k0, int tid) const {
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

template <class Epi>
__device__ __forceinline__ void finish_pair(const Epi& epi, const typename Epi::Row& row,
                                            const __half* bias, __half* C, int N, int m, int n,
                                            int acc0, int acc1) {
  const float y0 = add_bias(epi.apply(row, n, acc0), bias, n);
  const float y1 = n + 1 < N ? add_bias(epi.apply(row, n + 1, acc1), bias, n + 1) : 0.f;
  store_pair(C, N, m, n, y0, y1);
}

// ---------------------------------------------------------------------------------------------
// Split-K "last slice finishes" (the fixup of stream-K GEMMs, here with a fixed split):
//   1. every slice stores its raw int32 sums for rows < M, columns < N to ws[z, m, n]
//      (ws: [SPLITK, M, Np] int32, Np = N rounded up to 32; no zeroing needed);
//   2. __threadfence + barrier, then one thread counts the slice in at flags[tile]
//      (tile = blockIdx.y * gridDim.x + blockIdx.x) with atomicAdd;
//   3. the slice that sees SPLITK - 1 arrivals before it is the last: it resets the counter to
//      0 (every slice of this launch has counted, so the next launch on the stream finds it
//      zeroed), sums every slice's part (L2 loads, __ldcg, all issued at once) into its
//      accumulators and returns true: it runs the epilogue.  The others return false and exit.
// flags == nullptr ("separate" reduction): step 1 only; the *_reduce entry (splitk_reduce)
// launched next on the stream sums and finishes.
// flags must be zero before the first launch (the runtime allocates them zeroed, once per
// device); kernels leave them zero.  Two split-K GEMMs running concurrently on different
// streams must not share flags.  int32 sums wrap exactly like the unsplit accumulation
// (unsigned adds), so the result is bitwise that of SPLITK = 1.
template <class T>
__device__ __forceinline__ bool splitk_fixup(uint32_t (&acc)[T::MT][T::NT][4], int M, int N,
                                             int m0, int n0, int32_t* ws, uint32_t* flags,
                                             int warp_m, int warp_n, int lane) {
  const int np = round_up(N, 32);
  auto visit = [&](auto&& f) {  // f(mt, nt, h, offset of (m, n) in a slice), in range
#pragma unroll
    for (int mt = 0; mt < T::MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + warp_m * T::WM + mt * 16 + (lane >> 2) + 8 * h;
        if (m >= M) continue;
#pragma unroll
        for (int nt = 0; nt < T::NT; ++nt) {
          const int n = n0 + warp_n * T::WN + nt * 8 + (lane & 3) * 2;
          // n even and np % 32 == 0: n + 1 < np, the int2 stays in the row
          if (n < N) f(mt, nt, h, (size_t)m * np + n);
        }
      }
  };
  int32_t* mine = ws + (size_t)blockIdx.z * M * np;
  visit([&](int mt, int nt, int h, size_t off) {
    __stcg(reinterpret_cast<int2*>(mine + off),
           make_int2((int)acc[mt][nt][2 * h], (int)acc[mt][nt][2 * h + 1]));
  });
  if (flags == nullptr) return false;  // separate reduction
  __threadfence();
  __syncthreads();
  __shared__ uint32_t last;
  if (threadIdx.x == 0) {
    uint32_t* flag = flags + blockIdx.y * gridDim.x + blockIdx.x;
    last = atomicAdd(flag, 1u) == T::SPLITK - 1;
    if (last) atomicExch(flag, 0u);
  }
  __syncthreads();
  if (!last) return false;
  __threadfence();
  // every slice's part is read at once (unrolled: one round trip to L2, not SPLITK - 1); the
  // own slice reads its own part back instead of branching on blockIdx.z, which costs an L2
  // hit but keeps the loads independent
  int2 parts[T::SPLITK][T::MT][T::NT][2];
#pragma unroll
  for (int z = 0; z < T::SPLITK; ++z) {
    const int32_t* slice = ws + (size_t)z * M * np;
    visit([&](int mt, int nt, int h, size_t off) {
      parts[z][mt][nt][h] = __ldcg(reinterpret_cast<const int2*>(slice + off));
    });
  }
  visit([&](int mt, int nt, int h, size_t) {
    uint32_t x = 0u, y = 0u;
#pragma unroll
    for (int z = 0; z < T::SPLITK; ++z) {
      x += (uint32_t)parts[z][mt][nt][h].x;
      y += (uint32_t)parts[z][mt][nt][h].y;
    }
    acc[mt][nt][2 * h] = x;
    acc[mt][nt][2 * h + 1] = y;
  });
  return true;
}

// Split-K in a thread-block cluster (sm_90; the launch's cluster dims are (1, 1, SPLITK), so
// the slices of one output tile are the cluster's CTAs, rank = blockIdx.z):
//   1. every CTA stores its int32 accumulators to its own shared memory (the drained pipeline
//      buffers; BM*BN*4 bytes, uint4 per MMA tile and thread, thread-contiguous: no conflicts);
//   2. cluster barrier (release/acquire: the stores are visible cluster-wide);
//   3. rank 0 loads every other rank's accumulators through distributed shared memory (mapa +
//      ld.shared::cluster, all issued before the adds) and adds them to its registers;
//   4. cluster barrier again, so that no CTA exits while rank 0 still reads its shared memory;
//   rank 0 returns true and runs the epilogue, the others false.
// int32 wrap-around adds as in splitk_fixup: bitwise the unsplit result.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define QC_HAS_CLUSTER 1
__device__ __forceinline__ uint32_t cluster_ctas() {
  uint32_t n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
  return n;
}

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

__device__ __forceinline__ void cluster_barrier() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
               ::: "memory");
}

__device__ __forceinline__ uint4 ld_dsmem_u4(const void* local, uint32_t rank) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(local));
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
  uint4 v;
  asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(remote) : "memory");
  return v;
}

template <class T>
__device__ __forceinline__ bool splitk_cluster(uint32_t (&acc)[T::MT][T::NT][4], char* smem) {
  uint4* mine = reinterpret_cast<uint4*>(smem);
  __syncthreads();  // every warp is done with the pipeline buffers
#pragma unroll
  for (int mt = 0; mt < T::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < T::NT; ++nt)
      mine[(mt * T::NT + nt) * T::THREADS + threadIdx.x] =
          make_uint4(acc[mt][nt][0], acc[mt][nt][1], acc[mt][nt][2], acc[mt][nt][3]);
  cluster_barrier();
  const bool first = cluster_rank() == 0;
  if (first) {
    uint4 parts[T::SPLITK - 1][T::MT][T::NT];
#pragma unroll
    for (int r = 1; r < T::SPLITK; ++r)
#pragma unroll
      for (int mt = 0; mt < T::MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < T::NT; ++nt)
          parts[r - 1][mt][nt] = ld_dsmem_u4(&mine[(mt * T::NT + nt) * T::THREADS + threadIdx.x], r);
#pragma unroll
    for (int r = 0; r < T::SPLITK - 1; ++r)
#pragma unroll
      for (int mt = 0; mt < T::MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < T::NT; ++nt) {
          acc[mt][nt][0] += parts[r][mt][nt].x;
          acc[mt][nt][1] += parts[r][mt][nt].y;
          acc[mt][nt][2] += parts[r][mt][nt].z;
          acc[mt][nt][3] += parts[r][mt][nt].w;
        }
  }
  cluster_barrier();
  return first;
}
#endif

// The separate reduction: C[m, n] = epilogue(sum_z ws[z, m, n]).  One thread per 4 columns of
// a row (one 16-byte load per slice, all issued before the adds), grid-stride over
// M * ceil(N / 4) quads.
// Launched with programmatic dependent launch on sm_90 (runtime/gemm_kernels.py PDL), it may
// start while the GEMM still runs: griddepcontrol.wait blocks until the GEMM grid has finished
// and its writes are visible (a no-op without PDL).
template <int SPLITK, class Epi>
__device__ __forceinline__ void splitk_reduce(const int32_t* ws, int M, int N, const Epi& epi,
                                              const __half* bias, __half* C) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  const int np = round_up(N, 32), nq = ceil_div(N, 4);
  const long long total = (long long)M * nq;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int m = (int)(i / nq), n = (int)(i % nq) * 4;
    int4 v[SPLITK];
#pragma unroll
    for (int z = 0; z < SPLITK; ++z)
      v[z] = __ldcg(reinterpret_cast<const int4*>(ws + ((size_t)z * M + m) * np + n));
    uint32_t s0 = 0u, s1 = 0u, s2 = 0u, s3 = 0u;  // unsigned: int32 wrap-around, no UB
#pragma unroll
    for (int z = 0; z < SPLITK; ++z) {
      s0 += (uint32_t)v[z].x;
      s1 += (uint32_t)v[z].y;
      s2 += (uint32_t)v[z].z;
      s3 += (uint32_t)v[z].w;
    }
    const typename Epi::Row row = epi.row(m);
    finish_pair(epi, row, bias, C, N, m, n, (int)s0, (int)s1);
    if (n + 2 < N) finish_pair(epi, row, bias, C, N, m, n + 2, (int)s2, (int)s3);
  }
}

// ---------------------------------------------------------------------------------------------
// The GEMM body.  BOp (operand B policy) provides:
//   static constexpr int kStageBytes;                      shared bytes of one B stage (x128)
//   Loader loader(int n0, int tid) const;   hoisted per-thread addressing (see RowLoader), with
//     void load(char* sb, int k0, int tid) const;   cp.async of one stage
//   struct Raw; void load_raw(const char* sb, int warp_n, int lane, int ks, Raw&) const;
//   void convert(const Raw&, uint32_t (&b)[T::NT][2]) const;   -> s8 B fragments
// kp: K padded as the B layout pads it; the K tiles cover [0, kp) in steps of BK (the last one
// may be partial: the policies zero-fill past kp, the A loader past K).
//
// Split-K (T::SPLITK > 1): blockIdx.z takes K tiles [z*per, min((z+1)*per, tiles)) with
// per = ceil(tiles / SPLITK); see splitk_fixup for how the slices meet (flags == nullptr:
// they do not; the *_reduce entry runs next).
template <class T, class BOp, class Epi>
__device__ __forceinline__ void gemm_body(char* smem, const int8_t* A, int M, int N, int K,
                                          int kp, const BOp& bop, const Epi& epi,
                                          const __half* bias, __half* C, int32_t* ws,
                                          uint32_t* flags) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_n = warp % T::WARPS_N, warp_m = warp / T::WARPS_N;
  const int2 origin = tile_origin<T>();
  const int m0 = origin.x, n0 = origin.y;

  const int tiles = ceil_div(kp, T::BK);
  int kt0 = 0, nk = tiles;
  if constexpr (T::SPLITK > 1) {
    // the arrival counter is touched once, at the end: bring its line into L2 now so that the
    // atomic does not wait on DRAM on the critical path (decode runs with a cold L2)
    if (tid == 0 && flags != nullptr) {
      const uint32_t* flag = flags + blockIdx.y * gridDim.x + blockIdx.x;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(flag));
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // a PDL-launched _reduce may be scheduled now (it waits for this grid to finish)
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    const int per = ceil_div(tiles, T::SPLITK);
    kt0 = blockIdx.z * per;
    nk = max(0, min(tiles, kt0 + per) - kt0);
  }

  char* const sa0 = smem;
  char* const sb0 = smem + T::STAGES * T::A_STAGE;
  const RowLoader<T, T::BM> aload(A, M, K, m0, tid);
  const auto bload = bop.loader(n0, tid);

  uint32_t acc[T::MT][T::NT][4];
#pragma unroll
  for (int mt = 0; mt < T::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < T::NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0u;

  // Prologue: STAGES - 1 tiles in flight (one commit group each, empty past the range).
#pragma unroll
  for (int s = 0; s < T::STAGES - 1; ++s) {
    if (s < nk) {
      const int k0 = (kt0 + s) * T::BK;
      aload.load(sa0 + s * T::A_STAGE, k0, tid);
      bload.load(sb0 + s * BOp::kStageBytes, k0, tid);
    }
    cute::cp_async_fence();
  }

  int read_stage = 0, write_stage = T::STAGES - 1;
  for (int it = 0; it < nk; ++it) {
    // Groups committed so far: STAGES - 1 + it; allowing STAGES - 2 pending means tile `it`
    // has landed.  The barrier also retires every warp's reads of the stage refilled below
    // (the one consumed in iteration it - 1).
    cute::cp_async_wait<T::STAGES - 2>();
    __syncthreads();
    {
      const int nxt = it + T::STAGES - 1;
      if (nxt < nk) {
        const int k0 = (kt0 + nxt) * T::BK;
        aload.load(sa0 + write_stage * T::A_STAGE, k0, tid);
        bload.load(sb0 + write_stage * BOp::kStageBytes, k0, tid);
      }
      cute::cp_async_fence();
      write_stage = write_stage + 1 == T::STAGES ? 0 : write_stage + 1;
    }

    const char* sa = sa0 + read_stage * T::A_STAGE;
    const char* sb = sb0 + read_stage * BOp::kStageBytes;
    read_stage = read_stage + 1 == T::STAGES ? 0 : read_stage + 1;

    // Fragments double-buffered in registers: step ks + 1 is read while ks runs on the MMAs.
    uint32_t af[2][T::MT][4];
    typename BOp::Raw braw[2];
    load_a_frag<T>(sa, warp_m, lane, 0, af[0]);
    bop.load_raw(sb, warp_n, lane, 0, braw[0]);
#pragma unroll
    for (int ks = 0; ks < T::KS; ++ks) {
      if (ks + 1 < T::KS) {
        load_a_frag<T>(sa, warp_m, lane, ks + 1, af[(ks + 1) & 1]);
        bop.load_raw(sb, warp_n, lane, ks + 1, braw[(ks + 1) & 1]);
      }
      uint32_t bf[T::NT][2];
      bop.convert(braw[ks & 1], bf);
#pragma unroll
      for (int mt = 0; mt < T::MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < T::NT; ++nt) mma_s8(acc[mt][nt], af[ks & 1][mt], bf[nt]);
    }
  }
  cute::cp_async_wait<0>();  // only empty groups can be left; drain before exit

  if constexpr (T::SPLITK > 1) {
#ifdef QC_HAS_CLUSTER
    // the shared memory holds the accumulators only if BM*BN*4 fits in it (configs.py fits())
    if constexpr (T::BM * T::BN * 4 <= T::STAGES * (T::A_STAGE + BOp::kStageBytes)) {
      if (cluster_ctas() > 1) {
        if (!splitk_cluster<T>(acc, smem)) return;
      } else if (!splitk_fixup<T>(acc, M, N, m0, n0, ws, flags, warp_m, warp_n, lane)) {
        return;
      }
    } else
#endif
    if (!splitk_fixup<T>(acc, M, N, m0, n0, ws, flags, warp_m, warp_n, lane)) return;
  }
  // Epilogue straight from the accumulator fragments.
#pragma unroll
  for (int mt = 0; mt < T::MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + warp_m * T::WM + mt * 16 + (lane >> 2) + 8 * h;
      if (m >= M) continue;
      const typename Epi::Row row = epi.row(m);
#pragma unroll
      for (int nt = 0; nt < T::NT; ++nt) {
        const int n = n0 + warp_n * T::WN + nt * 8 + (lane & 3) * 2;
        if (n < N)
          finish_pair(epi, row, bias, C, N, m, n, (int)acc[mt][nt][2 * h],
                      (int)acc[mt][nt][2 * h + 1]);
      }
    }
  }
}

}  // namespace qc
