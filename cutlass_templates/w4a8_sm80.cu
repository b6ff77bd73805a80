// W4A8 GEMMs on INT8 tensor cores (QServe / QoQ), weights in the compute-aware layout of
// w4a8_layout.py: B [Np/32, Kp/32, 512] uint8, one 512-byte block per 32x32 (N x K) tile, lane
// L = 4c + f owns bytes 16L..16L+15 = four words w = 2a + r; (w & 0x0F0F0F0F) is B register r
// of n8 tile a, ((w >> 4) & 0x0F0F0F0F) that of n8 tile a + 2.  So a stage is copied verbatim
// (cp.async 16 B) and each lane reads its 16 bytes of a tile with one LDS.128: no ldmatrix,
// no shuffle.
//
// QC_GROUP == 0, per channel (layout w4a8_pc_sm80, Kp = K up to 32):
//   acc = sum_k A[m, k] q[n, k] with the codes q in 0..15 as s8;
//   C = fp16( ((s_x * s_w) * acc - zs_w * (s_x * xsum)) (+ bias) )      [gemm_w4a8]
//   entry (A, s_x, xsum, B, s_w, zs_w, bias, C, workspace, flags, M, N, K)
// QC_GROUP == 64 / 128, progressive group (layout w4a8_g{G}_sm80, Kp = K up to G):
//   w8 = (q - z2) * s2 = q * s2 + negzs, subtraction after multiplication, for the four k of
//   a register in one IMAD and one XOR (qc::group_zero_word: exact, since every w8 fits
//   int8); acc = sum_k A w8;
//   C = fp16( (s_x * s1) * acc (+ bias) )                                [gemm_w4a8_group]
//   entry (A, s_x, B, s1, s2, negzs, bias, C, workspace, flags, M, N, K)
//   s2, negzs [Kp/G, Np/32, 32] uint8: byte [g, t, 4c + j] serves n = 32t + c + 8j, so lane
//   4c + f reads one word whose byte j belongs to its n8 tile j.
//
// QC_A4X (with QC_GROUP 0), COMET's W4Ax (per-channel weights as above; activations x_q [M, K]
//   int8 codes of 128-channel blocks, 4- or 8-bit, each block with its own scale):
//   acc = sum_b s_x[m, b] * (int32 sum_{k in b} A q), in fp32 in block order (gemm_sm80.cuh);
//   C = fp16( acc * s_w - zs_w * t (+ bias) )                          [gemm_w4a4x]
//   entry (A, s_x [M, K/128], t [M], B, s_w, zs_w, bias, C, workspace, flags, M, N, K),
//   K % 128 == 0, no split-K (workspace, flags unused).  QC_A4X == 1 (kind w4a4x): the MMA is
//   s8 for every block, the 4-bit blocks' codes stored as int8 (qcompile::quant_a4x), as on
//   Hopper, which has no s4 MMA.  QC_A4X == 2 (kind w4a4x_s4, sm80 artifacts): A is packed
//   (pack_a4x: the n8 leading 8-bit blocks, then the 4-bit ones two codes a byte, (K + 128 n8)
//   / 2 bytes a row), the entry takes n8 after K, and the 4-bit blocks run on
//   mma.m16n8k64.s4.u4 with the same weights and layout (convert_s4).
//
// A [M, K] int8 (K % 16 == 0), s_x [M] f32, xsum [M] int32 (sum_k A[m, k]), s_w/zs_w/s1 [Np]
// f32, bias [N] fp16 or nullptr, C [M, N] fp16, workspace [QC_SPLITK, M, Np] int32 and
// flags [grid tiles] uint32 (zeroed once, left zero) when QC_SPLITK > 1 (common.cuh).
// Entry: QC_KERNEL (grid (ceil(N/BN), ceil(M/BM), QC_SPLITK), block WARPS_M*WARPS_N*32,
// dynamic smem STAGES*(BM*BK + BN*BK/2 + S) with S = 0 per channel,
// round_up(2*max(1, BK/G)*BN, 128) for groups and round_up(4*BM, 128) with QC_A4X) and, when QC_SPLITK > 1, QC_KERNEL##_reduce
// (same arguments; block qc::kReduceThreads, any grid) for launches with flags == nullptr.
#include "gemm_sm80.cuh"

#include <type_traits>

#if !defined(QC_KERNEL) || !defined(QC_BM) || !defined(QC_BN) || !defined(QC_BK) || \
    !defined(QC_WARPS_M) || !defined(QC_WARPS_N) || !defined(QC_STAGES) ||             \
    !defined(QC_SPLITK) || !defined(QC_GROUP)
#error "define QC_KERNEL, QC_BM, QC_BN, QC_BK, QC_WARPS_M/N, QC_STAGES, QC_SPLITK, QC_GROUP"
#endif

namespace {

using T = qc::Tile<QC_BM, QC_BN, QC_BK, QC_WARPS_M, QC_WARPS_N, QC_STAGES, QC_SPLITK>;
constexpr int G = QC_GROUP;
constexpr int kG = G > 0 ? G : 1;  // divisor (no division by zero in the per-channel build)
static_assert(G == 0 || G == 32 || G == 64 || G == 128 || G == 256, "QC_GROUP: 0, 32, .., 256");
static_assert(G == 0 || T::BK % kG == 0 || kG % T::BK == 0,
              "QC_BK and QC_GROUP must divide one another (a k32 step must not straddle groups)");

constexpr int kTileBytes = 512;             // one 32x32 tile of nibbles
constexpr int kKT = T::BK / 32;             // 32x32 tiles per stage along K
constexpr int kWT32 = T::WN / 32;           // 32-column tiles per warp
constexpr int kWeightBytes = T::BN * T::BK / 2;
constexpr int kGroupRows = G == 0 ? 0 : (T::BK > G ? T::BK / kG : 1);  // groups per stage
constexpr int kScaleBytes = qc::round_up(2 * kGroupRows * T::BN, 128);  // s2 rows, negzs rows

constexpr uint32_t kLo = 0x0F0F0F0Fu;

// The operand's buffers (what a stage loader needs).
struct W4Buffers {
  const uint8_t* B;
  const uint8_t* s2;     // group only
  const uint8_t* negzs;  // group only
  int np, kp;

  // kGroupRows rows of BN bytes of s2, then as many of negzs; row g of s2 is
  // s2[g * np + n0 .. + BN) (interleaved order kept).
  __device__ __forceinline__ void load_scales(char* ss, int n0, int k0, int tid) const {
    constexpr int CPR = T::BN / 16;
    constexpr int SCHUNKS = 2 * kGroupRows * CPR;
    const int g_total = kp / kG, g0 = k0 / kG;
#pragma unroll
    for (int i = 0; i < qc::ceil_div(SCHUNKS, T::THREADS); ++i) {
      const int c = tid + i * T::THREADS;
      if (SCHUNKS % T::THREADS == 0 || c < SCHUNKS) {
        constexpr int kRowChunks = (kGroupRows > 0 ? kGroupRows : 1) * CPR;
        const int which = c / kRowChunks;  // 0: s2, 1: negzs
        const int rc = c % kRowChunks;
        const int gr = rc / CPR, col = rc % CPR;
        const int g = g0 + gr, n = n0 + col * 16;
        const bool p = g < g_total && n < np;
        const uint8_t* base = which ? negzs : s2;
        const uint8_t* src = p ? base + (size_t)g * np + n : base;
        qc::cp_async16(ss + c * 16, src, p);
      }
    }
  }
};

struct W4Operand : W4Buffers {
  static constexpr int kStageBytes = kWeightBytes + kScaleBytes;

  // cp.async of one stage, addressing hoisted out of the K loop (as qc::RowLoader).  Weights:
  // chunk i of a thread is 16-byte part `lane` of stage tile t = warp + i * NWARPS, i.e. n tile
  // t / kKT, k tile t % kKT of the stage; for each of the BN/32 column tiles the BK/32 K tiles
  // are contiguous in global, so a chunk's address is B + kt0 * 512 + off[i].
  struct Loader {
    static constexpr int CHUNKS = kWeightBytes / 16;
    static constexpr int ITERS = qc::ceil_div(CHUNKS, T::THREADS);
    static constexpr int NWARPS = T::THREADS / 32;
    W4Buffers op;
    uint32_t off[ITERS];  // bytes from B of chunk i at kt0 = 0 (32-bit: as qc::RowLoader)
    int ktl[ITERS];       // k tile of chunk i within the stage
    uint32_t ok;          // bit i: chunk i exists and its n tile is < Np / 32
    int n0;

    __device__ __forceinline__ Loader(const W4Buffers& op_, int n0_, int tid)
        : op(op_), ok(0u), n0(n0_) {
      const int nt_total = op.np / 32, kt_total = op.kp / 32;
      const int p = (n0 / 32) * kt_total * kTileBytes + (tid & 31) * 16;
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        const int t = (tid >> 5) + i * NWARPS;
        const bool exists = CHUNKS % T::THREADS == 0 || tid + i * T::THREADS < CHUNKS;
        ktl[i] = t % kKT;
        off[i] = (uint32_t)(p + ((t / kKT) * kt_total + ktl[i]) * kTileBytes);
        ok |= (uint32_t)(exists && n0 / 32 + t / kKT < nt_total) << i;
      }
    }

    __device__ __forceinline__ void load(char* sb, int k0, int tid) const {
      const int kt0 = k0 / 32, kt_left = op.kp / 32 - kt0;
      const uint32_t o = (uint32_t)(kt0 * kTileBytes);
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        if (CHUNKS % T::THREADS == 0 || i + 1 < ITERS || tid + i * T::THREADS < CHUNKS) {
          const bool pred = (ok >> i & 1u) && ktl[i] < kt_left;
          qc::cp_async16(sb + (tid + i * T::THREADS) * 16, op.B + (o + off[i]), pred);
        }
      }
      if constexpr (G > 0) op.load_scales(sb + kWeightBytes, n0, k0, tid);
    }
  };

  __device__ __forceinline__ Loader loader(int n0, int tid) const { return Loader(*this, n0, tid); }

  struct RawPC {
    uint4 w[kWT32];
  };
  struct RawGroup {
    uint4 w[kWT32];
    uint32_t s2[kWT32], nz[kWT32];  // s2 / negzs words of the lane's column c, byte j: tile j
  };
  using Raw = std::conditional_t<G == 0, RawPC, RawGroup>;

  template <class R>  // R = Raw (a template so that the discarded group branch is not checked)
  __device__ __forceinline__ void load_raw(const char* sb, int warp_n, int lane, int ks,
                                           R& raw) const {
#pragma unroll
    for (int q = 0; q < kWT32; ++q) {
      const int t = (warp_n * kWT32 + q) * kKT + ks;
      raw.w[q] = *reinterpret_cast<const uint4*>(sb + t * kTileBytes + lane * 16);
    }
    if constexpr (G > 0) {
      const int gr = T::BK > G ? ks * 32 / kG : 0;
      const char* ss = sb + kWeightBytes + gr * T::BN;
#pragma unroll
      for (int q = 0; q < kWT32; ++q) {
        const int off = (warp_n * kWT32 + q) * 32 + (lane >> 2) * 4;
        raw.s2[q] = *reinterpret_cast<const uint32_t*>(ss + off);
        raw.nz[q] = *reinterpret_cast<const uint32_t*>(ss + kGroupRows * T::BN + off);
      }
    }
  }

  // The group dequant w8 = (q - z2) * s2 of the four k of one column in one IMAD and one
  // LOP3, exact (no per-byte add): with d_i = q_i*s2 - z2*s2 in [-127, 127] (the packer checks
  // it), q*s2 + (0x80808080 - z2*s2 * 0x01010101) = sum_i (d_i + 128) * 256^i has every
  // digit in [0, 255], so no byte carries into the next, and XOR 0x80 turns each offset
  // digit d + 128 into the two's-complement byte of d.  qc::group_zero_word(nz >> 8j) is
  // that constant for n8 tile j from the stored negzs byte (-(z2*s2)) mod 256; zero-filled
  // stages (s2 = nz = 0) give d = 0.  (The emulated __vadd4 it replaces cost four instructions per register.)

  // s4 B fragments of one k64 step (QC_A4X == 2) from the raw words of its two k32 tiles,
  // with no data movement between lanes.  Lane 4c + f holds, for column c of n8 tile a, the
  // codes of k 4f..4f+3 (word 2a + 0, low nibbles) and 16+4f..16+4f+3 (word 2a + 1) of each
  // k32 tile: 16 of the 64 k, where the s4 MMA's lane f expects k 8f..8f+7 and 32+8f...  The
  // MMA only sums over k, so a permutation of k applied to both operands changes nothing:
  // b0 = nibbles (k 4f + i, 16 + 4f + i) of tile 0 interleaved (nibble 2i, 2i + 1), b1 the
  // same of tile 1, and the activations are packed to match (pack_a4x: byte b of a
  // 32-channel group = channels b and b + 16), which ldmatrix then delivers as a0..a3.  Two
  // LOP3-class operations a register (shift, select), as convert's unpack.
  template <class R>
  __device__ __forceinline__ void convert_s4(const R& t0, const R& t1,
                                             uint32_t (&b)[T::NT][2]) const {
#pragma unroll
    for (int q = 0; q < kWT32; ++q) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint4 v = j ? t1.w[q] : t0.w[q];
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          const uint32_t r0 = w[2 * a], r1 = w[2 * a + 1];
          b[4 * q + a][j] = (r0 & kLo) | ((r1 << 4) & ~kLo);      // n8 tile a
          b[4 * q + a + 2][j] = ((r0 >> 4) & kLo) | (r1 & ~kLo);  // n8 tile a + 2
        }
      }
    }
  }

  template <class R>
  __device__ __forceinline__ void convert(const R& raw, uint32_t (&b)[T::NT][2]) const {
#pragma unroll
    for (int q = 0; q < kWT32; ++q) {
      const uint32_t w[4] = {raw.w[q].x, raw.w[q].y, raw.w[q].z, raw.w[q].w};
#pragma unroll
      for (int a = 0; a < 2; ++a) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint32_t lo = w[2 * a + r] & kLo;         // n8 tile a
          const uint32_t hi = (w[2 * a + r] >> 4) & kLo;  // n8 tile a + 2
          if constexpr (G == 0) {
            b[4 * q + a][r] = lo;
            b[4 * q + a + 2][r] = hi;
          } else {
            // byte j of the s2 / negzs words belongs to n8 tile j
            const uint32_t s_lo = (raw.s2[q] >> (8 * a)) & 0xFFu;
            const uint32_t s_hi = (raw.s2[q] >> (8 * (a + 2))) & 0xFFu;
            const uint32_t z_lo = qc::group_zero_word(raw.nz[q] >> (8 * a));
            const uint32_t z_hi = qc::group_zero_word(raw.nz[q] >> (8 * (a + 2)));
            b[4 * q + a][r] = (lo * s_lo + z_lo) ^ 0x80808080u;
            b[4 * q + a + 2][r] = (hi * s_hi + z_hi) ^ 0x80808080u;
          }
        }
      }
    }
  }
};


}  // namespace

#if defined(QC_A4X)
static_assert(G == 0 && QC_SPLITK == 1, "W4Ax: per-channel weights, no split-K");
static_assert(QC_A4X == 1 || QC_A4X == 2, "QC_A4X: 1 (int8 codes) or 2 (packed 4-bit blocks)");

extern "C" __global__ void __launch_bounds__(T::THREADS, 1)
    QC_KERNEL(const int8_t* __restrict__ A, const float* __restrict__ s_x,
              const float* __restrict__ t, const uint8_t* __restrict__ B,
              const float* __restrict__ s_w, const float* __restrict__ zs_w,
              const __half* __restrict__ bias, __half* __restrict__ C,
              int32_t* __restrict__ workspace, uint32_t* __restrict__ flags, int M,
              int N, int K
#if QC_A4X == 2
              , int n8
#endif
    ) {
  extern __shared__ __align__(128) char smem[];
  const int np = qc::round_up(N, 32), kp = qc::round_up(K, 32);
  const qc::EpiW4A4X scales{s_x, t, s_w, zs_w, K / 128};
#if QC_A4X == 2
  const qc::EpiW4A4XS4 epi{scales, n8};
#else
  const qc::EpiW4A4X& epi = scales;
#endif
  qc::gemm_body<T>(smem, A, M, N, K, kp, W4Operand{{B, nullptr, nullptr, np, kp}}, epi, bias,
                   C, workspace, flags);
}

#elif QC_GROUP == 0

extern "C" __global__ void __launch_bounds__(T::THREADS, 1)
    QC_KERNEL(const int8_t* __restrict__ A, const float* __restrict__ s_x,
              const int32_t* __restrict__ xsum, const uint8_t* __restrict__ B,
              const float* __restrict__ s_w, const float* __restrict__ zs_w,
              const __half* __restrict__ bias, __half* __restrict__ C,
              int32_t* __restrict__ workspace, uint32_t* __restrict__ flags, int M,
              int N, int K) {
  extern __shared__ __align__(128) char smem[];
  const int np = qc::round_up(N, 32), kp = qc::round_up(K, 32);
  qc::gemm_body<T>(smem, A, M, N, K, kp, W4Operand{{B, nullptr, nullptr, np, kp}},
                   qc::EpiW4A8{s_x, xsum, s_w, zs_w}, bias, C, workspace, flags);
}

#if QC_SPLITK > 1
extern "C" __global__ void __launch_bounds__(qc::kReduceThreads)
    QC_CAT(QC_KERNEL, _reduce)(const int8_t* __restrict__ A, const float* __restrict__ s_x,
                               const int32_t* __restrict__ xsum, const uint8_t* __restrict__ B,
                               const float* __restrict__ s_w, const float* __restrict__ zs_w,
                               const __half* __restrict__ bias, __half* __restrict__ C,
                               int32_t* __restrict__ workspace, uint32_t* __restrict__ flags,
                               int M, int N, int K) {
  qc::splitk_reduce<T::SPLITK>(workspace, M, N, qc::EpiW4A8{s_x, xsum, s_w, zs_w}, bias, C);
}
#endif

#else

extern "C" __global__ void __launch_bounds__(T::THREADS, 1)
    QC_KERNEL(const int8_t* __restrict__ A, const float* __restrict__ s_x,
              const uint8_t* __restrict__ B, const float* __restrict__ s1,
              const uint8_t* __restrict__ s2, const uint8_t* __restrict__ negzs,
              const __half* __restrict__ bias, __half* __restrict__ C,
              int32_t* __restrict__ workspace, uint32_t* __restrict__ flags, int M,
              int N, int K) {
  extern __shared__ __align__(128) char smem[];
  const int np = qc::round_up(N, 32), kp = qc::round_up(K, G);
  qc::gemm_body<T>(smem, A, M, N, K, kp, W4Operand{{B, s2, negzs, np, kp}},
                   qc::EpiW4A8Group{s_x, s1}, bias, C, workspace, flags);
}

#if QC_SPLITK > 1
extern "C" __global__ void __launch_bounds__(qc::kReduceThreads)
    QC_CAT(QC_KERNEL, _reduce)(const int8_t* __restrict__ A, const float* __restrict__ s_x,
                               const uint8_t* __restrict__ B, const float* __restrict__ s1,
                               const uint8_t* __restrict__ s2, const uint8_t* __restrict__ negzs,
                               const __half* __restrict__ bias, __half* __restrict__ C,
                               int32_t* __restrict__ workspace, uint32_t* __restrict__ flags,
                               int M, int N, int K) {
  qc::splitk_reduce<T::SPLITK>(workspace, M, N, qc::EpiW4A8Group{s_x, s1}, bias, C);
}
#endif

#endif
