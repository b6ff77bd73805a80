// W4A8 GEMMs on Hopper tensor cores (wgmma, sm_90a), per channel (QC_GROUP 0) and progressive
// group (QC_GROUP 64 / 128): the operands, layouts (QServe's compute-aware 32x32 nibble tiles,
// w4a8_layout.py) and epilogues of w4a8_sm80.cu, for an sm90 target.
//
// wgmma reads B from shared memory, so the 4-bit weights take a detour the mma.sync kernel
// does not need: cp.async brings each stage's packed tiles to a raw buffer (BN x BK / 2
// bytes), and the CTA unpacks them (LDS.128, two LOP3s per word) into a double-buffered s8 B
// operand of 128-byte swizzled rows (wgmma_sm90.cuh) while the tensor cores run the previous
// stage.  Per channel, the codes q in 0..15 go into the MMA unshifted and the zero point is the
// epilogue's (qc::EpiW4A8); with groups, the unpack dequantizes w8 = (q - z2) * s2 exactly,
// one IMAD and one XOR per 4 weights (qc::group_zero_word), from the stage's s2 / negzs rows
// (cp.async'd with it), and the epilogue scales by s_x * s1 (qc::EpiW4A8Group).  Per 32x32 tile, lane L = 4c + f owns 16 bytes = four words w = 2a + r whose
// byte i holds k = 16r + 4f + i with row c + 8a in the low nibble and row c + 8a + 16 in the
// high one (w4a8_layout.py): each word becomes two 4-byte stores, and the XOR swizzle puts a
// warp's 32 stores of one (a, r, nibble) in 32 distinct banks.
//
// Pipeline: prologue loads tiles 0..S-2 (A stage + raw B stage per cp.async group) and unpacks
// tile 0.  Iteration kt issues the wgmma batch of tile kt, then (while it runs) waits for tile
// kt+1, unpacks it into the other s8 buffer and refills the stages of tile kt-1 with tile
// kt+S-1; then it retires the batch, fences the generic->async proxy and syncs.
//
// Entries: QC_GROUP 0: QC_KERNEL(A, s_x, xsum, B, s_w, zs_w, bias, C, workspace, flags, M, N,
// K); groups: QC_KERNEL(A, s_x, B, s1, s2, negzs, bias, C, workspace, flags, M, N, K) (workspace,
// flags unused); grid (ceil(N/BN), ceil(M/BM)), block 2*BM threads, dynamic smem
// STAGES*(BM*128 + BN*64 + S) + 2*BN*128, S = 0 per channel, round_up(2*(128/G)*BN, 128).
#include "wgmma_sm90.cuh"

#if !defined(QC_KERNEL) || !defined(QC_BM) || !defined(QC_BN) || !defined(QC_BK) || \
    !defined(QC_WARPS_M) || !defined(QC_WARPS_N) || !defined(QC_STAGES) ||              \
    !defined(QC_SPLITK) || !defined(QC_GROUP)
#error "define QC_KERNEL, QC_BM, QC_BN, QC_BK, QC_WARPS_M, QC_WARPS_N, QC_STAGES, QC_SPLITK, QC_GROUP"
#endif

namespace {

using T = qc::Tile<QC_BM, QC_BN, QC_BK, QC_WARPS_M, QC_WARPS_N, QC_STAGES, QC_SPLITK>;
constexpr int G = QC_GROUP;
static_assert(G == 0 || G == 64 || G == 128, "QC_GROUP: 0 (per channel), 64 or 128");
static_assert(T::SPLITK == 1, "the wgmma template has no split-K yet");
static_assert(T::BK == 128, "one 128-byte swizzle atom per row: BK must be 128");
static_assert(T::WARPS_N == 1 && T::WARPS_M * 16 == T::BM && T::BM % 64 == 0,
              "one warpgroup (4 warps) per 64 rows: WARPS_M = BM / 16, WARPS_N = 1");
static_assert(T::BN % 32 == 0 && T::BN <= 256, "whole 32-row weight tiles, wgmma N <= 256");
static_assert(T::STAGES >= 3, "tiles kt (MMA), kt+1 (unpack) and one loading");

constexpr int kAcc = T::BN / 2;
constexpr int kKT = T::BK / 32;                   // 32x32 tiles per stage along K
constexpr int kGroupRows = G ? T::BK / G : 0;    // group rows of s2 / negzs per stage
constexpr int kScaleBytes = qc::round_up(2 * kGroupRows * T::BN, 128);
constexpr int NIB_STAGE = T::BN * T::BK / 2;      // packed nibbles
constexpr int RAW_STAGE = NIB_STAGE + kScaleBytes;  // + [s2 rows][negzs rows], BN bytes each
constexpr int S8_STAGE = T::BN * T::BK;           // unpacked s8 rows
constexpr int UNITS = NIB_STAGE / 16;             // 16-byte lane units per stage
static_assert(UNITS % T::THREADS == 0, "every thread loads and unpacks whole units");
constexpr int UPT = UNITS / T::THREADS;

// cp.async of one raw stage: unit u = 32 * tile + lane, tile = ti * kKT + tj (tile-major, as
// the global layout [Np/32, Kp/32, 512] stores each N tile's K tiles contiguously).
__device__ __forceinline__ void load_raw(char* raw, const uint8_t* B, const uint8_t* s2,
                                         const uint8_t* negzs, int np, int kp, int n0, int k0,
                                         int tid) {
  const int nt_total = np / 32, kt_total = kp / 32;
  if constexpr (G > 0) {  // kGroupRows rows of BN bytes of s2, then of negzs: [g, n0 .. n0+BN)
    constexpr int CPR = T::BN / 16, CHUNKS = 2 * kGroupRows * CPR;
    for (int c = tid; c < CHUNKS; c += T::THREADS) {
      const int which = c / (kGroupRows * CPR), rc = c % (kGroupRows * CPR);
      const int g = k0 / G + rc / CPR, n = n0 + (rc % CPR) * 16;
      const bool ok = g < kp / G && n < np;
      const uint8_t* base = which ? negzs : s2;
      qc::cp_async16(raw + NIB_STAGE + c * 16, ok ? base + (size_t)g * np + n : base, ok);
    }
  }
#pragma unroll
  for (int i = 0; i < UPT; ++i) {
    const int u = tid + i * T::THREADS, t = u >> 5, lane = u & 31;
    const int nt = n0 / 32 + t / kKT, kt = k0 / 32 + t % kKT;
    const bool ok = nt < nt_total && kt < kt_total;
    const uint8_t* src = B + ((size_t)(ok ? nt : 0) * kt_total + (ok ? kt : 0)) * 512 + lane * 16;
    qc::cp_async16(raw + u * 16, src, ok);
  }
}

// With groups: the lane's interleaved s2 / negzs words for a unit (byte j serves n8 tile j,
// n = 32 ti + c + 8 j), one 32-bit load each, and the dequantized register of tile j.
struct Scales {
  uint32_t s2, nz;
};

__device__ __forceinline__ Scales scales(const char* raw, int ti, int tj, int c) {
  if constexpr (G == 0) {
    return {0u, 0u};
  } else {
    const int off = NIB_STAGE + (tj * 32 / G) * T::BN + ti * 32 + 4 * c;
    return {*reinterpret_cast<const uint32_t*>(raw + off),
            *reinterpret_cast<const uint32_t*>(raw + off + kGroupRows * T::BN)};
  }
}

__device__ __forceinline__ uint32_t dequant(uint32_t q4, const Scales& sc, int j) {
  if constexpr (G == 0) {
    return q4;
  } else {
    const uint32_t s = (sc.s2 >> (8 * j)) & 0xFFu;
    return (q4 * s + qc::group_zero_word(sc.nz >> (8 * j))) ^ 0x80808080u;
  }
}

// Raw stage -> s8 stage: row n (of BN) at n * 128 bytes, k (of 128) within, swizzled.
__device__ __forceinline__ void unpack(const char* raw, char* s8, int tid) {
#pragma unroll
  for (int i = 0; i < UPT; ++i) {
    const int u = tid + i * T::THREADS, t = u >> 5, lane = u & 31;
    const int c = lane >> 2, f = lane & 3, ti = t / kKT, tj = t % kKT;
    const int n_base = ti * 32 + c, k_base = tj * 32 + 4 * f;
    const uint4 v = *reinterpret_cast<const uint4*>(raw + u * 16);
    const Scales sc = scales(raw, ti, tj, c);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int a = j >> 1, r = j & 1;
      const int n = n_base + 8 * a, k = k_base + 16 * r;
      *reinterpret_cast<uint32_t*>(s8 + qc::swz(n * T::BK + k)) =
          dequant(w[j] & 0x0F0F0F0Fu, sc, a);
      *reinterpret_cast<uint32_t*>(s8 + qc::swz((n + 16) * T::BK + k)) =
          dequant((w[j] >> 4) & 0x0F0F0F0Fu, sc, a + 2);
    }
  }
}

}  // namespace

namespace {

template <class Epi>
__device__ __forceinline__ void body(const int8_t* A, const uint8_t* B, const uint8_t* s2,
                                     const uint8_t* negzs, const Epi& epi, const __half* bias,
                                     __half* C, int M, int N, int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(1024) char smem[];
  const int np = qc::round_up(N, 32), kp = qc::round_up(K, G ? G : 32);
  const int tid = threadIdx.x, wg = tid / 128, lane = tid & 31, warp = (tid / 32) & 3;
  const int2 origin = qc::tile_origin<T>();
  const int m0 = origin.x, n0 = origin.y;
  const int tiles = qc::ceil_div(kp, T::BK);

  char* const sa0 = smem;                                  // STAGES x A (1024-aligned)
  char* const s80 = sa0 + T::STAGES * T::A_STAGE;          // 2 x s8 B
  char* const raw0 = s80 + 2 * S8_STAGE;                   // STAGES x raw B
  const qc::RowLoader<T, T::BM> aload(A, M, K, m0, tid);
  auto load = [&](int kt) {
    const int s = kt % T::STAGES;
    aload.load(sa0 + s * T::A_STAGE, kt * T::BK, tid);
    load_raw(raw0 + s * RAW_STAGE, B, s2, negzs, np, kp, n0, kt * T::BK, tid);
  };

  uint32_t acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0u;

#pragma unroll
  for (int s = 0; s < T::STAGES - 1; ++s) {
    if (s < tiles) load(s);
    cute::cp_async_fence();
  }
  cute::cp_async_wait<T::STAGES - 2>();  // tile 0
  __syncthreads();
  unpack(raw0, s80, tid);
  qc::sm90::fence_async_proxy();
  __syncthreads();

  for (int kt = 0; kt < tiles; ++kt) {
    const int s = kt % T::STAGES;
    qc::sm90::fence_operands(acc);
    cute::warpgroup_arrive();
    qc::sm90::wgmma_k128<T::BN>(sa0 + s * T::A_STAGE + wg * 64 * T::BK,
                                s80 + (kt & 1) * S8_STAGE, acc);
    cute::warpgroup_commit_batch();

    // while the batch runs: tile kt+1 lands and is unpacked into the other s8 buffer (its
    // previous content, tile kt-1, was retired at the end of the last iteration)
    cute::cp_async_wait<T::STAGES - 3>();
    __syncthreads();
    if (kt + 1 < tiles) unpack(raw0 + ((kt + 1) % T::STAGES) * RAW_STAGE,
                               s80 + ((kt + 1) & 1) * S8_STAGE, tid);
    // the stages of tile kt-1 (A read by its retired batch, raw unpacked before it) refill
    if (kt + T::STAGES - 1 < tiles) load(kt + T::STAGES - 1);
    cute::cp_async_fence();

    cute::warpgroup_wait<0>();
    qc::sm90::fence_operands(acc);
    qc::sm90::fence_async_proxy();
    __syncthreads();
  }
  cute::cp_async_wait<0>();

  qc::sm90::store<T::BN>(epi, acc, bias, C, M, N, m0, n0, wg, warp, lane);
#else
  __trap();  // built for an architecture without wgmma: the runtime never selects it there
#endif
}

}  // namespace

#if QC_GROUP == 0
extern "C" __global__ void __launch_bounds__(T::THREADS, 1)
    QC_KERNEL(const int8_t* __restrict__ A, const float* __restrict__ s_x,
              const int32_t* __restrict__ xsum, const uint8_t* __restrict__ B,
              const float* __restrict__ s_w, const float* __restrict__ zs_w,
              const __half* __restrict__ bias, __half* __restrict__ C,
              int32_t* __restrict__ workspace, uint32_t* __restrict__ flags, int M, int N,
              int K) {
  body(A, B, nullptr, nullptr, qc::EpiW4A8{s_x, xsum, s_w, zs_w}, bias, C, M, N, K);
}
#else
extern "C" __global__ void __launch_bounds__(T::THREADS, 1)
    QC_KERNEL(const int8_t* __restrict__ A, const float* __restrict__ s_x,
              const uint8_t* __restrict__ B, const float* __restrict__ s1,
              const uint8_t* __restrict__ s2, const uint8_t* __restrict__ negzs,
              const __half* __restrict__ bias, __half* __restrict__ C,
              int32_t* __restrict__ workspace, uint32_t* __restrict__ flags, int M, int N,
              int K) {
  body(A, B, s2, negzs, qc::EpiW4A8Group{s_x, s1}, bias, C, M, N, K);
}
#endif
