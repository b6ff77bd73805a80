// The "keys as M" decode path of paged_attention.cu (entry QC_KERNEL_kt), included after
// attention_tile.cuh. A decode step has few query rows per kv head (G = Hq / Hkv, 4 for
// Llama-3-8B, times the new tokens), so rows are the MMA's N (8) and keys its M (16):
//   S^T [16 keys x 8 rows] = K [16 keys x D] . Q^T [D x 8 rows]
//   O^T [D x 8 rows]      += V^T [D x 16 keys] . P^T [16 keys x 8 rows]
// With rows as M (the _decode / _prefill entries), 16-row tiles of 4 real rows waste 3/4 of
// every MMA and hold 16 rows of O in registers; here 8-row tiles halve both the MMAs per key
// (1 instead of 2 for QK + PV) and the O and Q registers.
//
// Fragments (m16n8k16; g = lane / 4, q = lane % 4):
// * K is the A operand: a0/a2 = key g (k = 2q.. / 2q+8..), a1/a3 = key g + 8, read exactly
//   as the rows-as-M path reads its K B fragments (same per-thread head-dim permutation q_dim,
//   same int4 magic-number conversion), so Q's B fragment is its row g in that order.
// * S^T's C fragment (keys g, g+8; rows 2q, 2q+1) becomes P^T's B fragment (keys 2q, 2q+1,
//   2q+8, 2q+9; row g) with two movmatrix.trans per 16 keys (an in-register 8x8 transpose).
// * V^T is the A operand: fp16 by ldmatrix.x4.trans from the [key][dim] stage rows; int4 by
//   byte-interleaving the codes of keys 2q and 2q+1 (prmt) so one masked word is the half2
//   (code of key 2q, code of key 2q+1) of one dim. Thread g owns dims g*D/8 .. + D/8 - 1 of
//   every V record; O^T m-tile mt row g is dim g*D/8 + 2mt (x1), row g+8 is + 1 (x16 for int4).
// int4 maths as in paged_attention.cu's header (offsets removed by per-row sums for K, by a
// half2 subtraction for V; V scales folded into P, V mins added through sum p * min).
#pragma once

namespace {

constexpr int KT_ROWS = 8;
constexpr int KT_TN = 64;               // keys per stage: 16 per warp (one m-tile)
constexpr int KT_MT = D / 16;           // m16 tiles of O^T (head dims)
// Decode is memory-bound and, at 5 CTAs per SM (the registers' limit), bound by the bytes in
// flight per SM: an H200 served 1.63 TB/s with 3.9 CTAs per SM and 1.94 with 5, about in
// proportion (bench/results/gpu-h200-2026-12-07.md). An int4 stage is 9.7 KB, so a fourth
// stage (STAGES - 1 = 3 tiles ahead, 39 KB a CTA) still fits 5 CTAs per SM; an fp16 stage
// (36 KB) would not, and keeps STAGES.
constexpr int KT_STAGES = INT4 ? STAGES + 1 : STAGES;
constexpr int KT_MERGE_BYTES = WARPS * KT_ROWS * (D + 4) * 4 + 2 * WARPS * KT_ROWS * 4;
constexpr int SMEM_KT = KT_STAGES * Stage<KT_TN>::BYTES > KT_MERGE_BYTES
                            ? KT_STAGES * Stage<KT_TN>::BYTES : KT_MERGE_BYTES;
#if defined(QC_SMEM_KT)
static_assert(SMEM_KT == QC_SMEM_KT, "AttnConfig.smem_bytes(kt) disagrees with the template");
#endif

__device__ __forceinline__ uint32_t movmatrix_t(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

// One warp's state: query rows 2q, 2q+1 of the block (sums and maxima), Q row g as B fragments.
struct KtState {
  float m[2], l[2], pm[2];  // per row 2q + c: max (log2 units), sum p (this thread's keys), sum p*min
  float o[KT_MT][4];        // O^T: [mt][(dim row g | g+8) x (query row 2q | 2q+1)]
  float qm[2], qs[2];       // int4: 1024 * sum q', sum q of rows 2q, 2q+1
  uint32_t b[KSTEPS][2];    // Q^T B fragments of row g
  int lim[2];               // keys < lim are visible to row 2q + c
};

// S^T of the warp's 16 keys at k0 (keys g, g+8 x rows 2q, 2q+1).
__device__ __forceinline__ void qk_t(const KtState& st, const uint8_t* sk, int k0, int lane,
                                     float (&s)[4]) {
  const int g = lane >> 2, q = lane & 3;
  s[0] = s[1] = s[2] = s[3] = 0.f;
  const uint8_t* r0 = sk + (k0 + g) * K_STRIDE;
  const uint8_t* r1 = sk + (k0 + g + 8) * K_STRIDE;
  if constexpr (INT4) {
    uint32_t w0[D / 32], w1[D / 32];
    if constexpr (D == 128) {
      const uint4 x = *reinterpret_cast<const uint4*>(r0 + q * 16);
      const uint4 y = *reinterpret_cast<const uint4*>(r1 + q * 16);
      w0[0] = x.x; w0[1] = x.y; w0[2] = x.z; w0[3] = x.w;
      w1[0] = y.x; w1[1] = y.y; w1[2] = y.z; w1[3] = y.w;
    } else {
      const uint2 x = *reinterpret_cast<const uint2*>(r0 + q * 8);
      const uint2 y = *reinterpret_cast<const uint2*>(r1 + q * 8);
      w0[0] = x.x; w0[1] = x.y; w1[0] = y.x; w1[1] = y.y;
    }
#pragma unroll
    for (int j = 0; j < D / 32; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // k16 step 2j + h: bytes 0, 2 (h = 0) or 1, 3 of the words
        const uint32_t x = h ? w0[j] >> 8 : w0[j], y = h ? w1[j] >> 8 : w1[j];
        const uint32_t a[4] = {(x & 0x000F000Fu) | MAGIC, (y & 0x000F000Fu) | MAGIC,
                               (x & 0x00F000F0u) | MAGIC, (y & 0x00F000F0u) | MAGIC};
        mma(s, a, st.b[2 * j + h][0], st.b[2 * j + h][1]);
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      const uint2 x = *reinterpret_cast<const uint2*>(r0 + 32 * ks + 8 * q);
      const uint2 y = *reinterpret_cast<const uint2*>(r1 + 32 * ks + 8 * q);
      const uint32_t a[4] = {x.x, y.x, x.y, y.y};
      mma(s, a, st.b[ks][0], st.b[ks][1]);
    }
  }
}

// Online softmax over the warp's 16 keys at k0 (absolute first key key0 + k0), then O^T += V^T P^T.
template <class S>
__device__ __forceinline__ void softmax_pv_t(KtState& st, const uint8_t* stage, int k0, int key0,
                                             float scale_log2, int lane, float (&s)[4]) {
  const int g = lane >> 2, q = lane & 3;
  float ks[2] = {1.f, 1.f}, km[2] = {0.f, 0.f}, vs[2] = {1.f, 1.f}, vm[2] = {0.f, 0.f};
  if constexpr (INT4) {
#pragma unroll
    for (int hk = 0; hk < 2; ++hk) {  // keys g, g + 8
      const int key = k0 + g + 8 * hk;
      const float2 kp = unpack_half2(*reinterpret_cast<const uint32_t*>(stage + S::KP_OFF + 4 * key));
      const float2 vp = unpack_half2(*reinterpret_cast<const uint32_t*>(stage + S::VP_OFF + 4 * key));
      ks[hk] = kp.x; km[hk] = kp.y; vs[hk] = vp.x; vm[hk] = vp.y;
    }
  }
  float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
  for (int e = 0; e < 4; ++e) {  // e: (key g | g+8) x (row 2q | 2q+1)
    const int hk = e >> 1, c = e & 1;
    float x = s[e];
    if (INT4) x = ks[hk] * (x - st.qm[c]) + km[hk] * st.qs[c];
    x = key0 + k0 + g + 8 * hk < st.lim[c] ? x * scale_log2 : NEG_INF;
    s[e] = x;
    mx[c] = fmaxf(mx[c], x);
  }
  float alpha[2], base[2];
#pragma unroll
  for (int c = 0; c < 2; ++c) {
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) mx[c] = fmaxf(mx[c], __shfl_xor_sync(0xffffffffu, mx[c], off));
    const float m_new = fmaxf(st.m[c], mx[c]);
    base[c] = m_new == NEG_INF ? 0.f : m_new;
    alpha[c] = exp2f(st.m[c] - base[c]);
    st.m[c] = m_new;
  }
  if (rescales(alpha)) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      st.l[c] *= alpha[c];
      st.pm[c] *= alpha[c];
    }
#pragma unroll
    for (int mt = 0; mt < KT_MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st.o[mt][e] *= alpha[e & 1];
  }
  // P^T (V scales folded in) -> B fragments: keys 2q, 2q+1 (b0) and 2q+8, 2q+9 (b1) of row g
  uint32_t pk[2];
#pragma unroll
  for (int hk = 0; hk < 2; ++hk) {
    const float p0 = exp2f(s[2 * hk] - base[0]), p1 = exp2f(s[2 * hk + 1] - base[1]);
    st.l[0] += p0;
    st.l[1] += p1;
    if (INT4) {
      st.pm[0] += p0 * vm[hk];
      st.pm[1] += p1 * vm[hk];
    }
    pk[hk] = movmatrix_t(pack_half2(p0 * vs[hk], p1 * vs[hk]));
  }
  const uint8_t* sv = stage + S::V_OFF;
  if constexpr (INT4) {
    constexpr int VW = D / 64;  // words of a key's V codes per thread (its D/8 dims)
    uint32_t v[4][VW];          // keys 2q, 2q+1, 2q+8, 2q+9
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint8_t* row = sv + (k0 + 2 * q + (i & 1) + 8 * (i >> 1)) * V_STRIDE + g * (D / 16);
      if constexpr (VW == 2) {
        const uint2 x = *reinterpret_cast<const uint2*>(row);
        v[i][0] = x.x; v[i][1] = x.y;
      } else {
        v[i][0] = *reinterpret_cast<const uint32_t*>(row);
      }
    }
#pragma unroll
    for (int mt = 0; mt < KT_MT; ++mt) {  // mt = 4 W + 2 H + Sh (W: word, H: byte pair, Sh: >> 8)
      const int w = mt >> 2, hsel = (mt >> 1) & 1, sh = (mt & 1) * 8;
      const uint32_t sel = hsel ? 0x7632u : 0x5410u;
      const uint32_t x01 = __byte_perm(v[0][w], v[1][w], sel) >> sh;
      const uint32_t x89 = __byte_perm(v[2][w], v[3][w], sel) >> sh;
      const uint32_t a[4] = {sub_magic((x01 & 0x000F000Fu) | MAGIC),
                             sub_magic((x01 & 0x00F000F0u) | MAGIC),
                             sub_magic((x89 & 0x000F000Fu) | MAGIC),
                             sub_magic((x89 & 0x00F000F0u) | MAGIC)};
      mma(st.o[mt], a, pk[0], pk[1]);
    }
  } else {
#pragma unroll
    for (int mt = 0; mt < KT_MT; ++mt) {
      uint32_t a[4];
      const int key = k0 + (lane & 7) + 8 * ((lane >> 4) & 1);
      ldsm_x4_trans(sv + key * V_STRIDE + 2 * (16 * mt + 8 * ((lane >> 3) & 1)), a);
      mma(st.o[mt], a, pk[0], pk[1]);
    }
  }
}

// Head-dim index of O^T element e (row g | g+8 of m-tile mt) for this thread, and its factor.
__device__ __forceinline__ int kt_dim(int mt, int e, int g) {
  return INT4 ? g * (D / 8) + 2 * mt + (e >> 1) : 16 * mt + g + 8 * (e >> 1);
}

}  // namespace
