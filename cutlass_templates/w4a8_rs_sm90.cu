// W4A8 GEMMs on Hopper tensor cores with the 4-bit weights unpacked straight into wgmma's register
// A operand (wgmma RS, sm_90a): per channel (QC_GROUP 0) and progressive group (QC_GROUP 64 / 128),
// the operands, layout and epilogues of w4a8_sm80.cu.
//
// Why: wgmma reads B only from shared memory, so a first template (replaced by this one) unpacked
// each stage's nibbles into a shared s8 copy of the weights that the tensor cores then read back:
// per 128x256x128 step about 1300 cycles of shared-memory traffic against 1100 of MMA, bound by
// shared memory, and at K = 4096 no faster than mma.sync.  This one measured 1.2-1.5x faster at M
// >= 1024 (bench/results/gemm-h100-2026-11-21k-rs).  The problem is transposed: the CTA computes
// C^T = W . X^T, the weights are wgmma's A (M = weight rows) and the activations its B (N = tokens,
// K-major: X's rows as they are, 128-byte swizzled by qc::RowLoader).  A's register fragment of a
// warp is mma.sync m16n8k32's A fragment, and one LDS.128 of a lane in a compute-aware 32x32 tile
// holds exactly two of them (w4_stage_sm90.cuh): the low nibbles are rows 0..15 of the tile, the
// high nibbles rows 16..31.  So warp w of a warpgroup owns weight tile w (32 rows) and feeds two
// wgmmas per k32 step, #0 (low) and #1 (high), each m64 x BM x k32 over the warpgroup's 4 tiles: A
// row 16w + i of wgmma #h is weight row 32w + 16h + i.  No shared round trip of the weights: per
// step shared memory serves the nibbles once (LDS) and the activations to each wgmma.  Groups
// dequantize in registers (W4Stage::dequant), as in the mma.sync kernel.
//
// Tile: BN weight rows (one warpgroup per 128: WARPS_N = BN / 32, WARPS_M = 1) x BM tokens (wgmma
// N, a multiple of 16 up to 256) x BK = 128.  Accumulators: 2 x BM / 2 registers.
//
// Pipeline (cp.async multistage; one wgmma batch in flight behind the one being issued): prologue
// loads tiles 0..S-3; tile kt: wait for it, fence the generic->async proxy, barrier, refill the
// stage of tile kt-2 (every batch reading it retired before the barrier) with tile kt+S-2; then per
// k32 step ks: LDS + unpack of A(ks) into register set ks % 2 (the batch of ks-2, which read that
// set, retired at step ks-1), wgmma #0 and #1, commit, wait for all but this batch.
//
// Epilogue: wgmma #h's accumulator 4j + 2r + e is (weight row 32w + 16h + 8r + g, token 8j + 2t +
// e) for lane 4g + t; lanes g and g^1 swap one value so that each holds two adjacent weight rows of
// one token and stores them as a half2 through the shared epilogues (qc::Epi*).
//
// QC_A4X (per channel), COMET's W4Ax (w4a8_sm80.cu's QC_A4X: activation blocks of 128 channels
// with their own scales): a K tile is one block, so after its wgmmas retire (a full wait, then
// the other warpgroup keeps the tensor cores busy) each int32 partial is scaled by its token's
// s_x of the block into an fp32 accumulator (qc::block_scale_add, the reference's order) and
// the int32 one restarts: the next block's first wgmmas run with scale-d 0 (no register
// zeroing: 64 moves a thread a block otherwise).  Twice the accumulators: BM <= 64 tokens.
//
// Entries (the arguments of the sm80 kinds): QC_GROUP 0: QC_KERNEL(A, s_x, xsum, B, s_w, zs_w,
// bias, C, workspace, flags, M, N, K); groups: QC_KERNEL(A, s_x, B, s1, s2, negzs, bias, C,
// workspace, flags, M, N, K) (workspace, flags unused); grid (ceil(N/BN), ceil(M/BM)), block BN
// threads, dynamic smem STAGES * (BM*128 + W4Stage::BYTES (+ round_up(4 BM, 128), QC_A4X)).
#include "w4_stage_sm90.cuh"
#include "wgmma_sm90.cuh"

#include <type_traits>

#if !defined(QC_KERNEL) || !defined(QC_BM) || !defined(QC_BN) || !defined(QC_BK) || \
    !defined(QC_WARPS_M) || !defined(QC_WARPS_N) || !defined(QC_STAGES) ||              \
    !defined(QC_SPLITK) || !defined(QC_GROUP)
#error "define QC_KERNEL, QC_BM, QC_BN, QC_BK, QC_WARPS_M, QC_WARPS_N, QC_STAGES, QC_SPLITK, QC_GROUP"
#endif

namespace {

using T = qc::Tile<QC_BM, QC_BN, QC_BK, QC_WARPS_M, QC_WARPS_N, QC_STAGES, QC_SPLITK>;
using W4 = qc::W4Stage<T, QC_GROUP>;
static_assert(T::SPLITK == 1, "the wgmma template has no split-K yet");
static_assert(T::BK == 128, "one 128-byte swizzle atom per activation row: BK must be 128");
static_assert(T::WARPS_M == 1 && T::WARPS_N * 32 == T::BN && T::BN % 128 == 0,
              "one warpgroup per 128 weight rows: WARPS_M = 1, WARPS_N = BN / 32");
static_assert(T::BM % 16 == 0 && T::BM <= 256, "token tile = wgmma N: 16, 32, ..., 256");
static_assert(T::STAGES >= 3, "one stage in the MMAs, one landing, one loading");

constexpr int kAcc = T::BM / 2;  // per wgmma: 64 x BM int32 over 128 threads

// A fragments of k32 step ks for wgmma #0 (a[0], low nibbles) and #1 (a[1], high nibbles) of
// the warp's weight tile ti: word 2a + r -> register a + 2r (row +8a, k +16r); with groups,
// dequantized with the step's group constants `deq`.
__device__ __forceinline__ void a_frags(const char* raw, int ti, int ks, int lane,
                                        const W4::Deq& deq, uint32_t (&a)[2][4]) {
  const uint4 v = *reinterpret_cast<const uint4*>(raw + ((ti * W4::KT + ks) * 32 + lane) * 16);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int half = j >> 1, reg = half + 2 * (j & 1);
    a[0][reg] = W4::dequant(w[j] & 0x0F0F0F0Fu, deq, half);
    a[1][reg] = W4::dequant((w[j] >> 4) & 0x0F0F0F0Fu, deq, half + 2);
  }
}

template <class Epi>
constexpr bool kBlocks = std::is_same_v<Epi, qc::EpiW4A4X>;

template <class Epi>
__device__ __forceinline__ void body(const int8_t* A, const uint8_t* B, const uint8_t* s2,
                                     const uint8_t* negzs, const Epi& epi, const __half* bias,
                                     __half* C, int M, int N, int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(1024) char smem[];
  const int np = qc::round_up(N, 32), kp = qc::round_up(K, QC_GROUP ? QC_GROUP : 32);
  const int tid = threadIdx.x, wg = tid / 128, lane = tid & 31, warp = (tid / 32) & 3;
  const int2 origin = qc::tile_origin<T>();
  const int m0 = origin.x, n0 = origin.y;  // token, weight row
  const int tiles = qc::ceil_div(kp, T::BK);
  const int ti = wg * 4 + warp;  // the warp's weight tile in the stage

  char* const sx0 = smem;                         // STAGES x activations (1024-aligned)
  char* const raw0 = sx0 + T::STAGES * T::A_STAGE;  // STAGES x packed weights
  // kBlocks: STAGES x the block's scales of the tile's BM tokens
  float* const ss0 = reinterpret_cast<float*>(raw0 + T::STAGES * W4::BYTES);
  constexpr int SS = kBlocks<Epi> ? qc::round_up(T::BM * 4, 128) / 4 : 0;  // floats a stage
  const qc::RowLoader<T, T::BM> xload(A, M, K, m0, tid);
  auto load = [&](int kt) {
    const int s = kt % T::STAGES;
    xload.load(sx0 + s * T::A_STAGE, kt * T::BK, tid);
    W4::load(raw0 + s * W4::BYTES, B, s2, negzs, np, kp, n0, kt * T::BK, tid);
    if constexpr (kBlocks<Epi>) epi.template load_scales<T::BM>(ss0 + s * SS, m0, M, kt, tid);
  };

  static_assert(!kBlocks<Epi> || T::BM <= 64, "per-block scales: two accumulator sets");
  constexpr int kAccF = kBlocks<Epi> ? kAcc : 1;
  const int g = lane >> 2, t = lane & 3, odd = g & 1;
  uint32_t acc[2][kAcc];
  float accf[2][kAccF];  // kBlocks: the scaled blocks' fp32 sum
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      acc[h][i] = 0u;
      if constexpr (kBlocks<Epi>) accf[h][i] = 0.f;
    }
  uint32_t a[2][2][4];
  // only the wgmmas touch the accumulators until the last wait (no fences inside the loop:
  // an accumulator "defined" by a fence while a batch is in flight serializes the wgmmas)
  qc::sm90::fence_operands(acc[0]);
  qc::sm90::fence_operands(acc[1]);

#pragma unroll
  for (int s = 0; s < T::STAGES - 2; ++s) {
    if (s < tiles) load(s);
    cute::cp_async_fence();
  }
  for (int kt = 0; kt < tiles; ++kt) {
    cute::cp_async_wait<T::STAGES - 3>();  // tile kt has landed (this thread's chunks)
    qc::sm90::fence_async_proxy();          // ... visible to wgmma's async proxy
    __syncthreads();                        // ... every thread's chunks
    if (kt + T::STAGES - 2 < tiles) load(kt + T::STAGES - 2);
    cute::cp_async_fence();

    const int s = kt % T::STAGES;
    const char* raw = raw0 + s * W4::BYTES;
    const char* sx = sx0 + s * T::A_STAGE;
    typename W4::Deq deq;
    float bscale[kBlocks<Epi> ? T::BM / 8 : 1][2];  // s_x of block kt, tokens 8j + 2t + e
    if constexpr (kBlocks<Epi>) {  // from the stage (0 past M): one 8-byte load a pair
#pragma unroll
      for (int j = 0; j < T::BM / 8; ++j) {
        const float2 v = *reinterpret_cast<const float2*>(ss0 + s * SS + 8 * j + 2 * t);
        bscale[j][0] = v.x;
        bscale[j][1] = v.y;
      }
    }
#pragma unroll
    for (int ks = 0; ks < W4::KT; ++ks) {
      if constexpr (W4::GROUP_STEPS > 0) {  // a new group row every GROUP_STEPS steps
        if (ks % W4::GROUP_STEPS == 0) deq = W4::prepare(W4::scales(raw, ti, ks, lane >> 2));
      }
      a_frags(raw, ti, ks, lane, deq, a[ks & 1]);
      cute::warpgroup_arrive();
      // kBlocks: a block's first step overwrites the retired partials (scale-d 0)
      const bool accumulate = !kBlocks<Epi> || ks > 0;
      qc::sm90::wgmma_rs_k32<T::BM>(a[ks & 1][0], sx + ks * 32, acc[0], accumulate);
      qc::sm90::wgmma_rs_k32<T::BM>(a[ks & 1][1], sx + ks * 32, acc[1], accumulate);
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<1>();  // the batch of step ks-1 retired: its A set may be rewritten
    }
    if constexpr (kBlocks<Epi>) {  // the block's partials, retired, into the fp32 sum
      cute::warpgroup_wait<0>();
      qc::sm90::fence_operands(acc[0]);
      qc::sm90::fence_operands(acc[1]);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < kAcc; ++i)
          accf[h][i] = qc::block_scale_add(accf[h][i], bscale[i >> 2][i & 1], acc[h][i]);
      qc::sm90::fence_operands(acc[0]);
      qc::sm90::fence_operands(acc[1]);
    }
  }
  cute::warpgroup_wait<0>();
  qc::sm90::fence_operands(acc[0]);
  qc::sm90::fence_operands(acc[1]);
  cute::cp_async_wait<0>();

#pragma unroll
  for (int j = 0; j < T::BM / 8; ++j) {
    const int m = m0 + 8 * j + 2 * t + odd;
    const bool m_ok = m < M;
    const typename Epi::Row row = epi.row(m_ok ? m : 0);
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = 4 * j + 2 * r;
        uint32_t v0 = acc[h][i], v1 = acc[h][i + 1];
        if constexpr (kBlocks<Epi>) {
          v0 = __float_as_uint(accf[h][i]);
          v1 = __float_as_uint(accf[h][i + 1]);
        }
        const uint32_t got = __shfl_xor_sync(0xFFFFFFFFu, odd ? v0 : v1, 4);
        const uint32_t x0 = odd ? got : v0, x1 = odd ? v1 : got;
        const int n = n0 + ti * 32 + 16 * h + 8 * r + (g & ~1);
        if (!m_ok || n >= N) continue;
        if constexpr (kBlocks<Epi>)
          qc::finish_pair(epi, row, bias, C, N, m, n, __uint_as_float(x0), __uint_as_float(x1));
        else
          qc::finish_pair(epi, row, bias, C, N, m, n, (int)x0, (int)x1);
      }
  }
#else
  __trap();  // built for an architecture without wgmma: the runtime never selects it there
#endif
}

}  // namespace

#if defined(QC_A4X)
static_assert(QC_GROUP == 0, "W4Ax: per-channel weights");
extern "C" __global__ void __launch_bounds__(T::THREADS, 1)
    QC_KERNEL(const int8_t* __restrict__ A, const float* __restrict__ s_x,
              const float* __restrict__ t, const uint8_t* __restrict__ B,
              const float* __restrict__ s_w, const float* __restrict__ zs_w,
              const __half* __restrict__ bias, __half* __restrict__ C,
              int32_t* __restrict__ workspace, uint32_t* __restrict__ flags, int M, int N,
              int K) {
  body(A, B, nullptr, nullptr, qc::EpiW4A4X{s_x, t, s_w, zs_w, K / 128}, bias, C, M, N, K);
}
#elif QC_GROUP == 0
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
