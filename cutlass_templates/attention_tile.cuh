// Building blocks of paged_attention.cu (included there after QC_HEAD_DIM, QC_KV_INT4 and
// QC_STAGES are defined): tile geometry and shared-memory layout, cp.async staging of a key
// tile from pages, and one warp's S = Q K^T, online softmax and O += P V on mma.sync m16n8k16,
// with the int4 codes turned into fp16 in registers (see paged_attention.cu's header).
#pragma once

#include <cstdint>
#include <cuda_fp16.h>

namespace {

constexpr int D = QC_HEAD_DIM;
constexpr bool INT4 = QC_KV_INT4 != 0;
constexpr int STAGES = QC_STAGES;
constexpr int WARPS = 4, THREADS = WARPS * 32;
// keys per stage: the decode entry's 4 warps take 32 int4 keys each (more independent MMAs
// per barrier); fp16 stages stay at 64 keys (a 128-key fp16 stage would not fit 2 CTAs/SM).
constexpr int DECODE_TN = INT4 ? 128 : 64;
constexpr int KSTEPS = D / 16;  // k16 steps of S = Q K^T
constexpr int NTILES = D / 8;   // n8 tiles of O
static_assert(D == 64 || D == 128, "head_dim 64 or 128");
static_assert(STAGES >= 2, "at least double buffering");

// Shared-memory rows (bytes). int4 K: a thread reads D/8 bytes at q*D/8 of key g (16 B loads
// of 8 keys x 64 B: contiguous). int4 V: a thread reads D/16 bytes at g*D/16 of keys 2q+e:
// stride = 16 mod 64 puts the 4 q's 32 bytes apart. fp16 K: 8 B at 32s + 8q of key g, stride
// 32 mod 128; fp16 V: ldmatrix rows, stride 16 mod 128.
constexpr int K_STRIDE = INT4 ? D / 2 : 2 * D + 32;
constexpr int V_STRIDE = INT4 ? D / 2 + 16 : 2 * D + 16;
constexpr int HEAD_BYTES = INT4 ? D / 2 : 2 * D;  // one kv head of one record, without params
constexpr int CHUNKS = HEAD_BYTES / 16;           // 16-byte copies per key per K or V
constexpr float NEG_INF = -__builtin_huge_valf();
constexpr uint32_t MAGIC = 0x64006400u;  // half2 (1024, 1024)

// One pipeline stage of TN keys: [K rows][V rows][int4: K (scale, min)][V (scale, min)].
template <int TN_>
struct Stage {
  static constexpr int TN = TN_;
  static constexpr int P_BYTES = INT4 ? TN * 4 : 0;
  static constexpr int K_OFF = 0, V_OFF = TN * K_STRIDE, KP_OFF = V_OFF + TN * V_STRIDE,
                       VP_OFF = KP_OFF + P_BYTES, BYTES = VP_OFF + P_BYTES;
};

constexpr int MERGE_BYTES = WARPS * 16 * (D + 4) * 4 + 2 * WARPS * 16 * 4;
constexpr int SMEM_DECODE = STAGES * Stage<DECODE_TN>::BYTES > MERGE_BYTES
                                ? STAGES * Stage<DECODE_TN>::BYTES : MERGE_BYTES;
constexpr int SMEM_PREFILL = STAGES * Stage<64>::BYTES;
// The _prefill2 entry: each warp owns P2_MT m16 tiles of rows, so every K and V fragment it
// reads from a stage (and turns into fp16) serves 32 rows, as FlashAttention-2 does; its Q
// fragments wait in shared memory after the stages (registers hold 2 x 16 rows of O).
constexpr int P2_MT = 2, P2_ROWS = WARPS * 16 * P2_MT;
constexpr int P2_TN = D == 128 ? 32 : 64;  // keys per stage: S of 32 rows x TN in registers
constexpr int P2_Q_BYTES = WARPS * P2_MT * KSTEPS * 32 * 16;
constexpr int SMEM_PREFILL2 = STAGES * Stage<P2_TN>::BYTES + P2_Q_BYTES;
#if defined(QC_SMEM_DECODE) && defined(QC_SMEM_PREFILL)  // attention_configs.py's numbers
static_assert(SMEM_DECODE == QC_SMEM_DECODE && SMEM_PREFILL == QC_SMEM_PREFILL,
              "AttnConfig.smem_bytes disagrees with this template's shared-memory layout");
#endif
#if defined(QC_SMEM_PREFILL2)
static_assert(SMEM_PREFILL2 == QC_SMEM_PREFILL2, "AttnConfig.smem_bytes(prefill2) disagrees");
#endif


__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool pred, int bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int n = pred ? bytes : 0;  // 0: zero-fill, nothing read
  if (bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x4_trans(const void* smem, uint32_t (&r)[4]) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// (1024 + x) - 1024 on both halves: exact for the codes c and 16 c.
__device__ __forceinline__ uint32_t sub_magic(uint32_t x) {
  uint32_t r;
  asm("sub.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(x), "r"(MAGIC));
  return r;
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ float2 unpack_half2(uint32_t w) {
  return __half22float2(*reinterpret_cast<__half2*>(&w));
}

// Head-dim index of the Q element in A-fragment slot kk (0: k=2q, 1: 2q+1, 2: 2q+8, 3: 2q+9)
// of k16 step s for quad lane q, matching how the K fragment is read (see the header), and the
// factor f (1 or 16) the int4 K fragment carries in that slot.
__device__ __forceinline__ int q_dim(int s, int kk, int q) {
  if (INT4) {
    const int base = q * (D / 4) + 8 * (s >> 1) + 2 * (s & 1);
    return base + (kk == 0 ? 0 : kk == 1 ? 4 : kk == 2 ? 1 : 5);
  }
  return 16 * s + 4 * q + kk;
}

// Output column c (0..7) of n8 tile j -> head-dim index, and its factor f (int4 V fragments).
__device__ __forceinline__ int o_dim(int j, int c) {
  return INT4 ? c * (D / 8) + 2 * (j >> 1) + (j & 1) : 8 * j + c;
}

// Where the sequence's key t lives: a cache page (t < ctx) or this step's records. Pages are
// head-major (runtime/ops/kv.py PageLayout): in page pg, kv head h's token slot o has its codes
// (or fp16 values) at pg * BS * R + (h * BS + o) * HEAD_BYTES and (int4) its (scale, min) at
// pg * BS * R + Hkv * BS * HEAD_BYTES + (h * BS + o) * 4; a record of kv_new is [Hkv][HEAD_BYTES]
// then [Hkv][4]. K and V planes are v_step(t) bytes apart.
struct KeySource {
  const uint8_t* cache;
  const uint8_t* kv_new;
  const int* table;
  int ctx, nb, bs, bs_shift, r, t_total, new0, hkv, h;  // bs_shift = log2(bs), or -1

  // Cache page of key t (a block-table read; 0 for a new key, which needs none).
  __device__ __forceinline__ int page(int t) const {
    if (t >= ctx) return 0;
    return __ldg(table + (bs_shift >= 0 ? t >> bs_shift : t / bs));
  }
  // K codes (fp16: values) of key t on page pg, and its int4 (scale, min) pair.
  __device__ __forceinline__ const uint8_t* codes(int t, int pg) const {
    if (t < ctx) {
      const int off = bs_shift >= 0 ? t & (bs - 1) : t % bs;
      return cache + (size_t)pg * bs * r + (size_t)(h * bs + off) * HEAD_BYTES;
    }
    return kv_new + (size_t)(new0 + t - ctx) * r + h * HEAD_BYTES;
  }
  __device__ __forceinline__ const uint8_t* params(int t, int pg) const {
    if (t < ctx) {
      const int off = bs_shift >= 0 ? t & (bs - 1) : t % bs;
      return cache + (size_t)pg * bs * r + (size_t)hkv * bs * HEAD_BYTES + (h * bs + off) * 4;
    }
    return kv_new + (size_t)(new0 + t - ctx) * r + hkv * HEAD_BYTES + 4 * h;
  }
  __device__ __forceinline__ size_t v_step(int t) const {
    return (size_t)(t < ctx ? nb * bs : t_total) * r;
  }
};

// Keys of a stage this thread copies: CHUNKS threads share a key (one address computation per
// key and thread; a warp instruction copies whole 64- or 256-byte runs).
template <class S>
constexpr int KEYS_PER_THREAD = S::TN * CHUNKS / THREADS;
static_assert(P2_TN * CHUNKS % THREADS == 0, "a _prefill2 stage is whole keys per thread");

// The pages of the keys this thread will copy for the tile at t0, read from the block table
// one tile ahead of the copy, so the table's latency hides behind a tile of maths instead of
// stalling the cp.async issue.
template <class S>
__device__ __forceinline__ void fetch_pages(int (&pg)[KEYS_PER_THREAD<S>], const KeySource& src,
                                            int t0, int t_end, int tid) {
#pragma unroll
  for (int j = 0; j < KEYS_PER_THREAD<S>; ++j) {
    const int t = t0 + tid / CHUNKS + j * (THREADS / CHUNKS);
    pg[j] = t < t_end ? src.page(t) : 0;
  }
}

// Copy keys [t0, t0 + TN) (K, V and int4 params of one kv head) into a stage, their pages in
// pg (fetch_pages); keys >= t_end are zero-filled.
template <class S>
__device__ __forceinline__ void load_tile(uint8_t* st, const KeySource& src,
                                          const int (&pg)[KEYS_PER_THREAD<S>], int t0, int t_end,
                                          int tid) {
  const int part = tid % CHUNKS;
#pragma unroll
  for (int j = 0; j < KEYS_PER_THREAD<S>; ++j) {
    const int key = tid / CHUNKS + j * (THREADS / CHUNKS), t = t0 + key;
    const bool ok = t < t_end;
    const uint8_t* kc = ok ? src.codes(t, pg[j]) : src.cache;
    const size_t vs = ok ? src.v_step(t) : 0;
    cp_async(st + S::K_OFF + key * K_STRIDE + part * 16, kc + part * 16, ok, 16);
    cp_async(st + S::V_OFF + key * V_STRIDE + part * 16, kc + vs + part * 16, ok, 16);
    if constexpr (INT4) {
      if (part == 0) {
        const uint8_t* kp = ok ? src.params(t, pg[j]) : src.cache;
        cp_async(st + S::KP_OFF + 4 * key, kp, ok, 4);
        cp_async(st + S::VP_OFF + 4 * key, kp + vs, ok, 4);
      }
    }
  }
}

// One warp's running state for its 16 rows (this thread holds rows g and g + 8).
struct RowState {
  float m[2], l[2], pm[2];  // max (log2 units), sum p, int4: sum p * min
  float o[NTILES][4];
  float qm[2], qs[2];  // int4: 1024 * sum q', sum q of rows g, g + 8
  uint32_t a[KSTEPS][4];
  int lim[2];  // keys < lim are visible to the row (causal and in range)
};

// S = Q K^T for NT n8 tiles of keys starting at key k0 of the stage.
template <int NT>
__device__ __forceinline__ void qk(const RowState& st, const uint8_t* sk, int k0, int lane,
                                   float (&s)[NT][4]) {
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    const uint8_t* row = sk + (k0 + nt * 8 + g) * K_STRIDE;
    if constexpr (INT4) {
      uint32_t w[D / 32];
      if constexpr (D == 128) {
        const uint4 v = *reinterpret_cast<const uint4*>(row + q * 16);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(row + q * 8);
        w[0] = v.x; w[1] = v.y;
      }
#pragma unroll
      for (int j = 0; j < D / 32; ++j) {
        const uint32_t hi = w[j] >> 8;
        mma(s[nt], st.a[2 * j], (w[j] & 0x000F000Fu) | MAGIC, (w[j] & 0x00F000F0u) | MAGIC);
        mma(s[nt], st.a[2 * j + 1], (hi & 0x000F000Fu) | MAGIC, (hi & 0x00F000F0u) | MAGIC);
      }
    } else {
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) {
        const uint2 v = *reinterpret_cast<const uint2*>(row + 32 * ks + 8 * q);
        mma(s[nt], st.a[ks], v.x, v.y);
      }
    }
  }
}

// Whether any row of the warp must rescale its running sums and O by alpha: exp2f(0) is exactly
// 1 when a row's max did not grow, and x * 1 == x, so skipping then changes no bit. Once the
// maxima settle (after the first tiles of a long context) most tiles skip the NTILES * 4
// multiplies (a third of the int4 decode's non-MMA arithmetic) for one warp vote.
__device__ __forceinline__ bool rescales(const float (&alpha)[2]) {
  return __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f);
}

// int4 (scale, min) of two adjacent keys (fp16 pairs in the stage) as floats.
__device__ __forceinline__ void key_params(const uint8_t* at, float (&scale)[2],
                                           float (&mn)[2]) {
  const uint2 w = *reinterpret_cast<const uint2*>(at);
  const float2 p0 = unpack_half2(w.x), p1 = unpack_half2(w.y);
  scale[0] = p0.x; mn[0] = p0.y; scale[1] = p1.x; mn[1] = p1.y;
}

// Online softmax over NT n8 tiles of keys (absolute index key0 + tile key): masked logits
// (log2 units), the running max and sums, O rescaled, and P (V scales folded in) as fp16 A
// fragments, two n8 key tiles per k16 step: pf[kk] = a0 (g, k lo) a1 (g+8, k lo) a2 (g, k hi)
// a3 (g+8, k hi).
template <class S, int NT>
__device__ __forceinline__ void softmax_p(RowState& st, const uint8_t* stage, int k0, int key0,
                                          float scale_log2, int lane, float (&s)[NT][4],
                                          uint32_t (&pf)[NT / 2][4]) {
  const int q = lane & 3;
  float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int key = k0 + nt * 8 + 2 * q;
    float ks[2] = {1.f, 1.f}, km[2] = {0.f, 0.f};
    if (INT4) key_params(stage + S::KP_OFF + 4 * key, ks, km);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1, c = e & 1;
      float x = s[nt][e];
      if (INT4) x = ks[c] * (x - st.qm[r]) + km[c] * st.qs[r];
      x = key0 + key + c < st.lim[r] ? x * scale_log2 : NEG_INF;
      s[nt][e] = x;
      mx[r] = fmaxf(mx[r], x);
    }
  }
  float alpha[2], base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(st.m[r], mx[r]);
    base[r] = m_new == NEG_INF ? 0.f : m_new;
    alpha[r] = exp2f(st.m[r] - base[r]);
    st.m[r] = m_new;
  }
  if (rescales(alpha)) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      st.l[r] *= alpha[r];
      st.pm[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < NTILES; ++j) {
      st.o[j][0] *= alpha[0]; st.o[j][1] *= alpha[0];
      st.o[j][2] *= alpha[1]; st.o[j][3] *= alpha[1];
    }
  }
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk)
#pragma unroll
    for (int t2 = 0; t2 < 2; ++t2) {
      const int nt = 2 * kk + t2, key = k0 + nt * 8 + 2 * q;
      float vs[2] = {1.f, 1.f}, vm[2] = {0.f, 0.f};
      if (INT4) key_params(stage + S::VP_OFF + 4 * key, vs, vm);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float p0 = exp2f(s[nt][2 * r] - base[r]), p1 = exp2f(s[nt][2 * r + 1] - base[r]);
        st.l[r] += p0 + p1;
        if (INT4) st.pm[r] += p0 * vm[0] + p1 * vm[1];
        pf[kk][2 * t2 + r] = pack_half2(p0 * vs[0], p1 * vs[1]);
      }
    }
}

// O += P V for MT row states (st[0..MT)) over the k16 steps of NT n8 key tiles at k0 of the
// stage: each V fragment is read (int4: and turned into fp16) once for all MT states.
template <class S, int NT, int MT>
__device__ __forceinline__ void pv(RowState* st, const uint32_t (*pf)[NT / 2][4],
                                   const uint8_t* stage, int k0, int lane) {
  const int g = lane >> 2, q = lane & 3;
  const uint8_t* sv = stage + S::V_OFF;
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    const int kb = k0 + 16 * kk;  // first key of this k16 step
    if constexpr (INT4) {
      constexpr int VB = D / 16;  // bytes of a key's V codes per thread
      uint32_t v[4][VB / 4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint8_t* row = sv + (kb + 2 * q + (i & 1) + 8 * (i >> 1)) * V_STRIDE + g * VB;
        if constexpr (VB == 8) {
          const uint2 x = *reinterpret_cast<const uint2*>(row);
          v[i][0] = x.x; v[i][1] = x.y;
        } else {
          v[i][0] = *reinterpret_cast<const uint32_t*>(row);
        }
      }
#pragma unroll
      for (int pb = 0; pb < VB; ++pb) {
        const uint32_t sel = (pb & 3) | ((4 + (pb & 3)) << 8);
        const uint32_t x01 = __byte_perm(v[0][pb >> 2], v[1][pb >> 2], sel);
        const uint32_t x89 = __byte_perm(v[2][pb >> 2], v[3][pb >> 2], sel);
        // codes exact in fp16 (the 1024 offset subtracted before the MMA: left in, it would
        // accumulate over thousands of keys in the tensor core's fp32 sum and lose bits)
        const uint32_t lo0 = sub_magic((x01 & 0x000F000Fu) | MAGIC);
        const uint32_t lo1 = sub_magic((x89 & 0x000F000Fu) | MAGIC);
        const uint32_t hi0 = sub_magic((x01 & 0x00F000F0u) | MAGIC);
        const uint32_t hi1 = sub_magic((x89 & 0x00F000F0u) | MAGIC);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(st[mt].o[2 * pb], pf[mt][kk], lo0, lo1);
          mma(st[mt].o[2 * pb + 1], pf[mt][kk], hi0, hi1);
        }
      }
    } else {
#pragma unroll
      for (int jp = 0; jp < NTILES / 2; ++jp) {
        uint32_t b[4];
        const int key = kb + (lane & 7) + 8 * ((lane >> 3) & 1);
        ldsm_x4_trans(sv + key * V_STRIDE + 2 * 8 * (2 * jp + (lane >> 4)), b);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(st[mt].o[2 * jp], pf[mt][kk], b[0], b[1]);
          mma(st[mt].o[2 * jp + 1], pf[mt][kk], b[2], b[3]);
        }
      }
    }
  }
}

// Online softmax over NT n8 tiles of keys, then O += P V (one row state).
template <class S, int NT>
__device__ __forceinline__ void softmax_pv(RowState& st, const uint8_t* stage, int k0, int key0,
                                           float scale_log2, int lane, float (&s)[NT][4]) {
  uint32_t pf[1][NT / 2][4];
  softmax_p<S, NT>(st, stage, k0, key0, scale_log2, lane, s, pf[0]);
  pv<S, NT, 1>(&st, pf, stage, k0, lane);
}

// S = Q K^T for MT row states whose Q fragments are parked in shared memory (sq: [MT][KSTEPS]
// [32 lanes] uint4, the warp's own, each thread reading back what it wrote), over NT n8 tiles
// of keys at k0. A K fragment (int4: turned into fp16) is read once for all MT states.
template <int MT, int NT>
__device__ __forceinline__ void qk_sq(const uint4* sq, const uint8_t* sk, int k0, int lane,
                                      float (&s)[MT][NT][4]) {
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
  if constexpr (INT4) {
    uint32_t kw[NT][D / 32];  // the thread's K words of every key tile (see qk)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint8_t* row = sk + (k0 + nt * 8 + g) * K_STRIDE;
      if constexpr (D == 128) {
        const uint4 v = *reinterpret_cast<const uint4*>(row + q * 16);
        kw[nt][0] = v.x; kw[nt][1] = v.y; kw[nt][2] = v.z; kw[nt][3] = v.w;
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(row + q * 8);
        kw[nt][0] = v.x; kw[nt][1] = v.y;
      }
    }
#pragma unroll
    for (int j = 0; j < D / 32; ++j) {  // k16 steps 2j (bytes 0, 2 of word j) and 2j + 1
      uint32_t a[MT][2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint4 x = sq[(mt * KSTEPS + 2 * j + h) * 32 + lane];
          a[mt][h][0] = x.x; a[mt][h][1] = x.y; a[mt][h][2] = x.z; a[mt][h][3] = x.w;
        }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t w = kw[nt][j], hi = w >> 8;
        const uint32_t b0 = (w & 0x000F000Fu) | MAGIC, b1 = (w & 0x00F000F0u) | MAGIC;
        const uint32_t b2 = (hi & 0x000F000Fu) | MAGIC, b3 = (hi & 0x00F000F0u) | MAGIC;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma(s[mt][nt], a[mt][0], b0, b1);
          mma(s[mt][nt], a[mt][1], b2, b3);
        }
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint4 x = sq[(mt * KSTEPS + ks) * 32 + lane];
        a[mt][0] = x.x; a[mt][1] = x.y; a[mt][2] = x.z; a[mt][3] = x.w;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint2 v = *reinterpret_cast<const uint2*>(sk + (k0 + nt * 8 + g) * K_STRIDE +
                                                        32 * ks + 8 * q);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma(s[mt][nt], a[mt], v.x, v.y);
      }
    }
  }
}

// Unnormalised O of rows g, g+8 in true head-dim units (int4: offsets and x16 removed);
// sums reduced over the quad.
__device__ __forceinline__ void finish_rows(RowState& st) {
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], off);
      st.pm[r] += __shfl_xor_sync(0xffffffffu, st.pm[r], off);
    }
  if constexpr (INT4) {
#pragma unroll
    for (int j = 0; j < NTILES; ++j) {
      const float inv_f = (j & 1) ? 0.0625f : 1.f;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        st.o[j][e] = st.o[j][e] * inv_f + st.pm[r];
      }
    }
  }
}

}  // namespace
