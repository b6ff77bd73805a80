// The mma.sync main loop of the sm80 INT8 GEMMs (w8a8_sm80.cu, w4a8_sm80.cu; also built for
// sm_90a).  One CTA computes a BM x BN tile of C = epilogue(A . B^T) over a range of K tiles
// of BK:
//
//   global --cp.async (16 B, zero-filled where predicated off)--> shared, QC_STAGES deep
//   shared --ldmatrix.x4 (A, swizzled)----------------------------> A fragments
//   shared --BOp (operand policy of the .cu: ldmatrix or LDS.128 + unpack/dequant)--> B fragments
//   mma.sync.m16n8k32.row.col.s32.s8.s8.s32 -> int32 accumulators (exact)
//     (packed 4-bit W4Ax blocks: m16n8k64.s4.u4, mma_stage_s4)
//   epilogue (common.cuh), or with split-K the slices' meeting (splitk.cuh).
#pragma once

#include "common.cuh"
#include "splitk.cuh"

#include <type_traits>

namespace qc {

// The MMAs of one stage (BK / 32 k32 steps), fragments double-buffered in registers: step
// ks + 1 is read while ks runs on the tensor cores.
template <class T, class BOp>
__device__ __forceinline__ void mma_stage_s8(const char* sa, const char* sb, const BOp& bop,
                                             int warp_m, int warp_n, int lane,
                                             uint32_t (&acc)[T::MT][T::NT][4]) {
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

// The same for a packed 4-bit W4Ax block (EpiW4A4XS4): BK / 64 k64 steps of s4 MMAs, each
// reading 32 bytes of the A rows (64 channels: load_a_frag's k32 step by bytes) and two k32
// steps of B's raw words, which BOp::convert_s4 pairs into s4 fragments.
template <class T, class BOp>
__device__ __forceinline__ void mma_stage_s4(const char* sa, const char* sb, const BOp& bop,
                                             int warp_m, int warp_n, int lane,
                                             uint32_t (&acc)[T::MT][T::NT][4]) {
  constexpr int KS4 = T::BK / 64;
  uint32_t af[2][T::MT][4];
  typename BOp::Raw braw[2][2];
  load_a_frag<T>(sa, warp_m, lane, 0, af[0]);
  bop.load_raw(sb, warp_n, lane, 0, braw[0][0]);
  bop.load_raw(sb, warp_n, lane, 1, braw[0][1]);
#pragma unroll
  for (int ks = 0; ks < KS4; ++ks) {
    if (ks + 1 < KS4) {
      load_a_frag<T>(sa, warp_m, lane, ks + 1, af[(ks + 1) & 1]);
      bop.load_raw(sb, warp_n, lane, 2 * ks + 2, braw[(ks + 1) & 1][0]);
      bop.load_raw(sb, warp_n, lane, 2 * ks + 3, braw[(ks + 1) & 1][1]);
    }
    uint32_t bf[T::NT][2];
    bop.convert_s4(braw[ks & 1][0], braw[ks & 1][1], bf);
#pragma unroll
    for (int mt = 0; mt < T::MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < T::NT; ++nt) mma_s4u4(acc[mt][nt], af[ks & 1][mt], bf[nt]);
  }
}

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
//
// Per-block activation scales (Epi = EpiW4A4X, COMET's W4Ax): a K tile (BK = 128) is one
// activation block, so after its MMAs each int32 partial is scaled by its token's s_x of the
// block and added to a second, fp32 accumulator (block_scale_add), and the int32 one restarts
// from zero; the block's scales of the tile's tokens come with the stage (cp.async,
// EpiW4A4X::load_scales, after the B stages) and are read from shared memory.  Twice the accumulator registers (configs.py keeps such tiles at <= 64 a thread) and no
// split-K: the fp32 sum runs over the blocks in order, as the reference's does.  With packed
// activations (Epi = EpiW4A4XS4, sm80) the blocks past the n8 8-bit ones are 64 bytes a row,
// loaded into the first half of their stage's rows and run on s4 MMAs (mma_stage_s4).
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

  constexpr bool kS4 = std::is_same_v<Epi, EpiW4A4XS4>;
  constexpr bool kBlocks = kS4 || std::is_same_v<Epi, EpiW4A4X>;
  static_assert(!kBlocks || (T::BK == 128 && T::SPLITK == 1),
                "per-block activation scales: one 128-channel block per K tile, no split-K");
  int n8 = 0;  // kS4: the leading 8-bit blocks
  if constexpr (kS4) n8 = epi.n8;

  char* const sa0 = smem;
  char* const sb0 = smem + T::STAGES * T::A_STAGE;
  // kBlocks: each stage's block scales of the tile's BM tokens after the B stages
  float* const ss0 = reinterpret_cast<float*>(sb0 + T::STAGES * BOp::kStageBytes);
  constexpr int SS = kBlocks ? round_up(T::BM * 4, 128) / 4 : 0;  // floats a stage
  static_assert(!kBlocks || T::BM <= T::THREADS, "one thread a token's scale");
  const RowLoader<T, T::BM> aload(A, M, kS4 ? (K + n8 * T::BK) / 2 : K, m0, tid);
  const auto bload = bop.loader(n0, tid);
  // K tile kt of A: BK bytes a row from kt * BK, or a packed 4-bit block's 64 from its offset
  const auto load_a = [&](char* s, int kt) {
    if (kS4 && kt >= n8)
      aload.load(s, 64 * (kt + n8), tid, T::BK / 2);
    else
      aload.load(s, kt * T::BK, tid);
  };
  // the stage's A and B tiles (and block scales) of K tile kt
  const auto load = [&](int stage, int kt) {
    load_a(sa0 + stage * T::A_STAGE, kt);
    bload.load(sb0 + stage * BOp::kStageBytes, kt * T::BK, tid);
    if constexpr (kBlocks) epi.template load_scales<T::BM>(ss0 + stage * SS, m0, M, kt, tid);
  };
  constexpr int FMT = kBlocks ? T::MT : 1, FNT = kBlocks ? T::NT : 1;
  uint32_t acc[T::MT][T::NT][4];
  float accf[FMT][FNT][4];  // kBlocks: the scaled blocks' fp32 sum
#pragma unroll
  for (int mt = 0; mt < T::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < T::NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[mt][nt][i] = 0u;
        if constexpr (kBlocks) accf[mt][nt][i] = 0.f;
      }

  // Prologue: STAGES - 1 tiles in flight (one commit group each, empty past the range).
#pragma unroll
  for (int s = 0; s < T::STAGES - 1; ++s) {
    if (s < nk) load(s, kt0 + s);
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
      if (nxt < nk) load(write_stage, kt0 + nxt);
      cute::cp_async_fence();
      write_stage = write_stage + 1 == T::STAGES ? 0 : write_stage + 1;
    }

    const char* sa = sa0 + read_stage * T::A_STAGE;
    const char* sb = sb0 + read_stage * BOp::kStageBytes;
    const float* ss = ss0 + read_stage * SS;
    read_stage = read_stage + 1 == T::STAGES ? 0 : read_stage + 1;

    float bscale[FMT][2];  // kBlocks: s_x of this block for the thread's rows (0 past M)
    if constexpr (kBlocks) {
#pragma unroll
      for (int mt = 0; mt < T::MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          bscale[mt][h] = ss[warp_m * T::WM + mt * 16 + (lane >> 2) + 8 * h];
    }

    if constexpr (kS4) {
      if (kt0 + it >= n8)  // (block-uniform)
        mma_stage_s4<T>(sa, sb, bop, warp_m, warp_n, lane, acc);
      else
        mma_stage_s8<T>(sa, sb, bop, warp_m, warp_n, lane, acc);
    } else {
      mma_stage_s8<T>(sa, sb, bop, warp_m, warp_n, lane, acc);
    }
    if constexpr (kBlocks) {
#pragma unroll
      for (int mt = 0; mt < T::MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < T::NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            accf[mt][nt][i] = block_scale_add(accf[mt][nt][i], bscale[mt][i >> 1], acc[mt][nt][i]);
            acc[mt][nt][i] = 0u;
          }
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
        if (n >= N) continue;
        if constexpr (kBlocks)
          finish_pair(epi, row, bias, C, N, m, n, accf[mt][nt][2 * h], accf[mt][nt][2 * h + 1]);
        else
          finish_pair(epi, row, bias, C, N, m, n, (int)acc[mt][nt][2 * h],
                      (int)acc[mt][nt][2 * h + 1]);
      }
    }
  }
}

}  // namespace qc