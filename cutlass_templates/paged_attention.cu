// Paged attention over a flat batch of prefill chunks and decode steps, and the KV encode.
// The contract is runtime/ops/attention.py (paged_attention_ref) and runtime/ops/kv.py.
//
// Inputs (activations fp16; one layer):
//   q        [T, Hq, D] fp16, query head j reads kv head j / G (G = Hq / Hkv)
//   kv_new   [2, T, R] uint8, this step's K and V records (from the encode entry)
//   cache    [2, NB, BS, R] uint8 pages; block_tables [B, MB] int32; ctx_lens [B] int32;
//   query_start [B + 1] int32: sequence b owns tokens qs[b] .. qs[b+1] at positions ctx + i,
//   and attends causally to its ctx cached tokens (pages) then its own new tokens (kv_new).
//   Records (R bytes per token, every kv head): fp16 = [Hkv, D] halves; int4 = [Hkv, D/2]
//   codes (low nibble = even d), then [Hkv] (scale, min) fp16 pairs; x = code * scale + min.
//
// Work: a CTA is (block of ROWS query rows of one sequence, kv head h, key split z). A query
// row is (new token i, query head g of the group): rows of one sequence are numbered
// i * G + g, so a CTA serves every query head of its kv head and reads each page once for all
// of them (GQA). blockIdx.x enumerates the row blocks of all sequences (CTAs past the last
// exit); each CTA finds its sequence by a prefix sum over query_start, so nothing is
// data-dependent on the host and the launch is CUDA-graph capturable.
//   _decode  : ROWS = 16, the 4 warps share the rows and split each 64-key tile (16 keys
//              each), then merge in shared memory (flash-decoding inside the CTA).
//   _prefill : ROWS = 64, each warp owns 16 rows and reads every key of the tile (FA2).
// Keys [0, ctx + i_last] of a block are cut into gridDim.z splits (multiples of 64). With one
// split the CTA writes fp16 out; with more, fp32 partial (O / l, log2-sum-exp) to workspace and
// the _merge entry combines them.
//
// Maths: mma.sync m16n8k16 fp16 -> fp32 for S = Q K^T and O = P V, online softmax in fp32
// (base 2).  The head dim is permuted per thread (the same permutation for Q and K, and an
// output permutation for V) so that every thread reads whole 16-, 8- or 4-byte runs of a
// record.  int4 codes become fp16 without a conversion: (w & 0x000F000F) | 0x64006400 is the
// half2 (1024 + c0, 1024 + c4), and the mask 0x00F000F0 gives 1024 + 16 c; the 1024 offsets
// and the x16 are exact and are removed after the MMA with per-row sums:
//   S[r, t] = sum_d q'_d (1024 + f_d c_td) with q'_d = q_d / f_d, so
//   q . k_t = scale_t * (S - 1024 sum_d q'_d) + min_t * sum_d q_d;
//   P' = p_t * scale_t (fp16), acc_d = sum_t P'_t (1024 + f_d c_td), so
//   sum_t p_t v_td = (acc_d - 1024 sum_t P'_t) / f_d + sum_t p_t min_t.
// Shared memory per stage: K [64][K_STRIDE], V [64][V_STRIDE] (+ int4 (scale, min) of each),
// strides padded so each warp's fragment loads hit distinct banks; STAGES-deep cp.async.
//
// Entries (all: grid from the launcher, THREADS threads):
//   QC_KERNEL          (decode)  args below, grid (row blocks, Hkv, splits)
//   QC_KERNEL_prefill            same args
//   QC_KERNEL_merge    (ws_o, ws_lse, out, T, Hq, splits), grid ceil(T*Hq/4)
//   QC_KERNEL_encode   (k, v, out, T, Hkv, R), grid ceil(2*T*Hkv/4): records of one step
#include <cstdint>
#include <cuda_fp16.h>

#if !defined(QC_KERNEL) || !defined(QC_HEAD_DIM) || !defined(QC_KV_INT4) || !defined(QC_STAGES)
#error "define QC_KERNEL, QC_HEAD_DIM, QC_KV_INT4, QC_STAGES"
#endif

#define QC_CAT_(a, b) a##b
#define QC_CAT(a, b) QC_CAT_(a, b)

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
#if defined(QC_SMEM_DECODE) && defined(QC_SMEM_PREFILL)  // attention_configs.py's numbers
static_assert(SMEM_DECODE == QC_SMEM_DECODE && SMEM_PREFILL == QC_SMEM_PREFILL,
              "AttnConfig.smem_bytes disagrees with this template's shared-memory layout");
#endif

struct Args {
  const __half* q;
  const uint8_t* kv_new;
  const uint8_t* cache;
  const int* block_tables;
  const int* ctx_lens;
  const int* query_start;
  __half* out;
  float* ws_o;    // [splits, T, Hq, D] (splits > 1)
  float* ws_lse;  // [splits, T, Hq]
  int T, B, MB, NB, BS, R, Hq, Hkv;
  float scale_log2;  // softmax scale * log2(e)
};

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

// Where the sequence's key t lives: a cache page (t < ctx) or this step's records.
struct KeySource {
  const uint8_t* cache;
  const uint8_t* kv_new;
  const int* table;
  int ctx, nb, bs, bs_shift, r, t_total, new0;  // bs_shift = log2(bs), or -1

  // K record of key t; its V record is v_step(t) bytes further.
  __device__ __forceinline__ const uint8_t* k_record(int t) const {
    if (t < ctx) {
      const int idx = bs_shift >= 0 ? t >> bs_shift : t / bs;
      const int off = bs_shift >= 0 ? t & (bs - 1) : t % bs;
      return cache + ((size_t)__ldg(table + idx) * bs + off) * r;
    }
    return kv_new + (size_t)(new0 + t - ctx) * r;
  }
  __device__ __forceinline__ size_t v_step(int t) const {
    return (size_t)(t < ctx ? nb * bs : t_total) * r;
  }
};

// Copy keys [t0, t0 + TN) (K, V and int4 params of one kv head) into a stage; keys >= t_end
// are zero-filled. CHUNKS threads share a key (one address computation per key and thread;
// a warp instruction copies whole 64- or 256-byte runs).
template <class S>
__device__ __forceinline__ void load_tile(uint8_t* st, const KeySource& src, int t0, int t_end,
                                          int hkv, int h, int tid) {
  const int part = tid % CHUNKS;
#pragma unroll
  for (int key = tid / CHUNKS; key < S::TN; key += THREADS / CHUNKS) {
    const int t = t0 + key;
    const bool ok = t < t_end;
    const uint8_t* kr = ok ? src.k_record(t) : src.cache;
    const uint8_t* vr = ok ? kr + src.v_step(t) : src.cache;
    cp_async(st + S::K_OFF + key * K_STRIDE + part * 16, kr + h * HEAD_BYTES + part * 16, ok, 16);
    cp_async(st + S::V_OFF + key * V_STRIDE + part * 16, vr + h * HEAD_BYTES + part * 16, ok, 16);
    if constexpr (INT4) {
      if (part == 0) {
        cp_async(st + S::KP_OFF + 4 * key, kr + hkv * (D / 2) + 4 * h, ok, 4);
        cp_async(st + S::VP_OFF + 4 * key, vr + hkv * (D / 2) + 4 * h, ok, 4);
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

// Q fragments of rows (block row0 + g, + 8); rows >= nrows are zero.
__device__ __forceinline__ void load_q(RowState& st, const Args& p, int tok0, int h, int G,
                                       int row0, int nrows, int lane) {
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + g + 8 * half;
    const bool ok = row < nrows;
    const __half* src =
        p.q + ((size_t)(tok0 + (ok ? row / G : 0)) * p.Hq + h * G + (ok ? row % G : 0)) * D;
    float sum_q = 0.f, sum_qf = 0.f;
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) {
      float v[4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        v[kk] = ok ? __half2float(src[q_dim(s, kk, q)]) : 0.f;
        sum_q += v[kk];
        if (INT4 && kk >= 2) v[kk] *= 0.0625f;  // exact: the fragment holds 16 * code
        sum_qf += __half2float(__float2half_rn(v[kk]));
      }
      st.a[s][half] = pack_half2(v[0], v[1]);
      st.a[s][2 + half] = pack_half2(v[2], v[3]);
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      sum_q += __shfl_xor_sync(0xffffffffu, sum_q, off);
      sum_qf += __shfl_xor_sync(0xffffffffu, sum_qf, off);
    }
    st.qs[half] = sum_q;
    st.qm[half] = 1024.f * sum_qf;
  }
}

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

// Online softmax over NT n8 tiles of keys (absolute index key0 + tile key), then O += P V.
template <class S, int NT>
__device__ __forceinline__ void softmax_pv(RowState& st, const uint8_t* stage, int k0, int key0,
                                           float scale_log2, int lane, float (&s)[NT][4]) {
  const int g = lane >> 2, q = lane & 3;
  const uint8_t* sv = stage + S::V_OFF;
  // logits (log2 units), masked
  float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int key = k0 + nt * 8 + 2 * q;
    float ks[2] = {1.f, 1.f}, km[2] = {0.f, 0.f};
    if (INT4) {
      const uint2 kp = *reinterpret_cast<const uint2*>(stage + S::KP_OFF + 4 * key);
      const float2 p0 = unpack_half2(kp.x), p1 = unpack_half2(kp.y);
      ks[0] = p0.x; km[0] = p0.y; ks[1] = p1.x; km[1] = p1.y;
    }
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
    st.l[r] *= alpha[r];
    st.pm[r] *= alpha[r];
  }
#pragma unroll
  for (int j = 0; j < NTILES; ++j) {
    st.o[j][0] *= alpha[0]; st.o[j][1] *= alpha[0];
    st.o[j][2] *= alpha[1]; st.o[j][3] *= alpha[1];
  }
  // P (fp16 A fragments, two n8 key tiles per k16 step) and O += P V
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    uint32_t a[4];
#pragma unroll
    for (int t2 = 0; t2 < 2; ++t2) {
      const int nt = 2 * kk + t2, key = k0 + nt * 8 + 2 * q;
      float vs[2] = {1.f, 1.f}, vm[2] = {0.f, 0.f};
      if (INT4) {
        const uint2 vp = *reinterpret_cast<const uint2*>(stage + S::VP_OFF + 4 * key);
        const float2 p0 = unpack_half2(vp.x), p1 = unpack_half2(vp.y);
        vs[0] = p0.x; vm[0] = p0.y; vs[1] = p1.x; vm[1] = p1.y;
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float p0 = exp2f(s[nt][2 * r] - base[r]), p1 = exp2f(s[nt][2 * r + 1] - base[r]);
        st.l[r] += p0 + p1;
        if (INT4) st.pm[r] += p0 * vm[0] + p1 * vm[1];
        a[2 * t2 + r] = pack_half2(p0 * vs[0], p1 * vs[1]);  // a0 (g, k lo) a1 (g+8, k lo) a2 (g, k hi) a3 (g+8, k hi)
      }
    }
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
        mma(st.o[2 * pb], a, sub_magic((x01 & 0x000F000Fu) | MAGIC),
            sub_magic((x89 & 0x000F000Fu) | MAGIC));
        mma(st.o[2 * pb + 1], a, sub_magic((x01 & 0x00F000F0u) | MAGIC),
            sub_magic((x89 & 0x00F000F0u) | MAGIC));
      }
    } else {
#pragma unroll
      for (int jp = 0; jp < NTILES / 2; ++jp) {
        uint32_t b[4];
        const int key = kb + (lane & 7) + 8 * ((lane >> 3) & 1);
        ldsm_x4_trans(sv + key * V_STRIDE + 2 * 8 * (2 * jp + (lane >> 4)), b);
        mma(st.o[2 * jp], a, b[0], b[1]);
        mma(st.o[2 * jp + 1], a, b[2], b[3]);
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

// Row `row` of the block (value o (unnormalised, head dim d), l, m) -> out or workspace.
__device__ __forceinline__ void store(const Args& p, int tok, int hq, int d, float o, float l,
                                      int split) {
  const float v = l > 0.f ? o / l : 0.f;
  if (gridDim.z == 1)
    p.out[((size_t)tok * p.Hq + hq) * D + d] = __float2half_rn(v);
  else
    p.ws_o[(((size_t)split * p.T + tok) * p.Hq + hq) * D + d] = v;
}
__device__ __forceinline__ void store_lse(const Args& p, int tok, int hq, float m, float l,
                                          int split) {
  if (gridDim.z > 1)
    p.ws_lse[((size_t)split * p.T + tok) * p.Hq + hq] = l > 0.f ? m + log2f(l) : NEG_INF;
}

struct Block {
  int b, row0, nrows, tok0, ctx;  // sequence, first row, rows of the sequence, first token
};

// Which sequence and row block blockIdx.x is (b = -1: none). Row blocks of sequence b:
// ceil(n_b * G / ROWS), enumerated in sequence order (a warp-wide prefix sum).
template <int ROWS>
__device__ Block find_block(const Args& p, int G) {
  __shared__ Block blk;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int before = 0;
    blk.b = -1;
    for (int b0 = 0; b0 < p.B; b0 += 32) {
      const int b = b0 + lane;
      int n = 0;
      if (b < p.B) n = (__ldg(p.query_start + b + 1) - __ldg(p.query_start + b)) * G;
      const int blocks = (n + ROWS - 1) / ROWS;
      int incl = blocks;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
      }
      const int start = before + incl - blocks;
      const int x = blockIdx.x;
      if (x >= start && x < start + blocks) {
        blk.b = b;
        blk.row0 = (x - start) * ROWS;
        blk.nrows = n;
        blk.tok0 = __ldg(p.query_start + b);
        blk.ctx = __ldg(p.ctx_lens + b);
      }
      before += __shfl_sync(0xffffffffu, incl, 31);
      if (before > x) break;
    }
  }
  __syncthreads();
  return blk;
}

template <int ROWS, int TN>
__device__ __forceinline__ void attention(const Args& p) {
  using S = Stage<TN>;
  constexpr bool SPLIT_WARPS = ROWS == 16;  // decode: warps split the keys of a tile
  constexpr int NT = SPLIT_WARPS ? TN / 8 / WARPS : TN / 8;
  extern __shared__ __align__(128) uint8_t smem[];
  const int G = p.Hq / p.Hkv, h = blockIdx.y, split = blockIdx.z;
  const Block blk = find_block<ROWS>(p, G);
  if (blk.b < 0) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2;
  const int wrow0 = blk.row0 + (SPLIT_WARPS ? 0 : 16 * warp);

  // keys of this block: [0, ctx + last token + 1), cut into gridDim.z splits of whole tiles
  const int last_row = min(blk.row0 + ROWS, blk.nrows) - 1;
  const int k_all = blk.ctx + last_row / G + 1;
  const int per = (((k_all + gridDim.z - 1) / gridDim.z) + TN - 1) / TN * TN;
  const int k_begin = split * per, k_end = min(k_all, k_begin + per);

  RowState st;
  load_q(st, p, blk.tok0, h, G, wrow0, blk.nrows, lane);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wrow0 + g + 8 * r;
    st.m[r] = NEG_INF;
    st.l[r] = st.pm[r] = 0.f;
    st.lim[r] = row < blk.nrows ? min(k_end, blk.ctx + row / G + 1) : 0;
  }
#pragma unroll
  for (int j = 0; j < NTILES; ++j) st.o[j][0] = st.o[j][1] = st.o[j][2] = st.o[j][3] = 0.f;

  const int bs_shift = (p.BS & (p.BS - 1)) == 0 ? __ffs(p.BS) - 1 : -1;
  const KeySource src{p.cache, p.kv_new, p.block_tables + (size_t)blk.b * p.MB, blk.ctx,
                      p.NB, p.BS, bs_shift, p.R, p.T, blk.tok0};
  const int tiles = k_end > k_begin ? (k_end - k_begin + TN - 1) / TN : 0;
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < tiles) load_tile<S>(smem + i * S::BYTES, src, k_begin + i * TN, k_end, p.Hkv, h, tid);
    cp_commit();
  }
  for (int i = 0; i < tiles; ++i) {
    cp_wait<STAGES - 2>();
    __syncthreads();
    const int nxt = i + STAGES - 1;
    if (nxt < tiles)
      load_tile<S>(smem + (nxt % STAGES) * S::BYTES, src, k_begin + nxt * TN, k_end, p.Hkv, h,
                   tid);
    cp_commit();
    const uint8_t* stage = smem + (i % STAGES) * S::BYTES;
    const int k0 = SPLIT_WARPS ? 8 * NT * warp : 0;
    float s[NT][4];
    qk<NT>(st, stage + S::K_OFF, k0, lane, s);
    softmax_pv<S, NT>(st, stage, k0, k_begin + i * TN, p.scale_log2, lane, s);
  }
  cp_wait<0>();
  finish_rows(st);

  const int q = lane & 3;
  if constexpr (SPLIT_WARPS) {  // merge the 4 warps' partial rows (fixed order: deterministic)
    __syncthreads();
    float* so = reinterpret_cast<float*>(smem);  // [WARPS][16][D + 4]
    float* sm = so + WARPS * 16 * (D + 4);        // [WARPS][16] m, then l
    float* sl = sm + WARPS * 16;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = g + 8 * r;
      if (q == 0) {
        sm[warp * 16 + row] = st.m[r];
        sl[warp * 16 + row] = st.l[r];
      }
#pragma unroll
      for (int j = 0; j < NTILES; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          so[(warp * 16 + row) * (D + 4) + o_dim(j, 2 * q + c)] = st.o[j][2 * r + c];
    }
    __syncthreads();
    for (int idx = tid; idx < 16 * D; idx += THREADS) {
      const int row = idx / D, d = idx % D, brow = blk.row0 + row;
      if (brow >= blk.nrows) continue;
      float m = NEG_INF;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) m = fmaxf(m, sm[w * 16 + row]);
      const float base = m == NEG_INF ? 0.f : m;
      float o = 0.f, l = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) {
        const float f = exp2f(sm[w * 16 + row] - base);
        o += f * so[(w * 16 + row) * (D + 4) + d];
        l += f * sl[w * 16 + row];
      }
      const int tok = blk.tok0 + brow / G, hq = h * G + brow % G;
      store(p, tok, hq, d, o, l, split);
      if (d == 0) store_lse(p, tok, hq, m, l, split);
    }
  } else {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int brow = wrow0 + g + 8 * r;
    if (brow >= blk.nrows) continue;
    const int tok = blk.tok0 + brow / G, hq = h * G + brow % G;
#pragma unroll
    for (int j = 0; j < NTILES; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c)
        store(p, tok, hq, o_dim(j, 2 * q + c), st.o[j][2 * r + c], st.l[r], split);
    if (q == 0) store_lse(p, tok, hq, st.m[r], st.l[r], split);
  }
  }
}

}  // namespace

#define QC_ATTN_PARAMS                                                                      \
  const __half *q, const uint8_t *kv_new, const uint8_t *cache, const int *block_tables,    \
      const int *ctx_lens, const int *query_start, __half *out, float *ws_o, float *ws_lse, \
      int T, int B, int MB, int NB, int BS, int R, int Hq, int Hkv, float scale_log2
#define QC_ATTN_ARGS \
  Args{q, kv_new, cache, block_tables, ctx_lens, query_start, out, ws_o, ws_lse, T, B, MB, NB, BS, R, Hq, Hkv, scale_log2}

extern "C" __global__ void __launch_bounds__(THREADS) QC_KERNEL(QC_ATTN_PARAMS) {
  attention<16, DECODE_TN>(QC_ATTN_ARGS);
}

extern "C" __global__ void __launch_bounds__(THREADS) QC_CAT(QC_KERNEL, _prefill)(QC_ATTN_PARAMS) {
  attention<64, 64>(QC_ATTN_ARGS);
}

// out[t, hq, :] = sum_z 2^(lse_z - M) O_z / sum_z 2^(lse_z - M); one warp per (t, hq).
extern "C" __global__ void __launch_bounds__(THREADS)
QC_CAT(QC_KERNEL, _merge)(const float* ws_o, const float* ws_lse, __half* out, int T, int Hq,
                          int splits) {
  const int row = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= T * Hq) return;
  float m = NEG_INF;
  for (int z = 0; z < splits; ++z) m = fmaxf(m, ws_lse[(size_t)z * T * Hq + row]);
  const float base = m == NEG_INF ? 0.f : m;
  float acc[D / 32] = {}, wsum = 0.f;
  for (int z = 0; z < splits; ++z) {
    const float w = exp2f(ws_lse[(size_t)z * T * Hq + row] - base);
    wsum += w;
#pragma unroll
    for (int i = 0; i < D / 32; ++i) acc[i] += w * ws_o[((size_t)z * T * Hq + row) * D + lane + 32 * i];
  }
#pragma unroll
  for (int i = 0; i < D / 32; ++i)
    out[(size_t)row * D + lane + 32 * i] = __float2half_rn(wsum > 0.f ? acc[i] / wsum : 0.f);
}

// Records of one step: k, v [T, Hkv, D] fp16 -> out [2, T, R] uint8, bitwise the reference
// codec (runtime/ops/kv.py). One warp per (K or V, token, kv head); lane holds D/32 values.
extern "C" __global__ void __launch_bounds__(THREADS)
QC_CAT(QC_KERNEL, _encode)(const __half* k, const __half* v, uint8_t* out, int T, int Hkv, int R) {
  const int item = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (item >= 2 * T * Hkv) return;
  const int which = item / (T * Hkv), t = (item / Hkv) % T, h = item % Hkv;
  constexpr int PER = D / 32;
  const __half* x = (which ? v : k) + ((size_t)t * Hkv + h) * D + lane * PER;
  uint8_t* rec = out + ((size_t)which * T + t) * R;
  float f[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) f[i] = __half2float(x[i]);
  int used;
  if (INT4) {
    float lo = f[0], hi = f[0];
#pragma unroll
    for (int i = 1; i < PER; ++i) { lo = fminf(lo, f[i]); hi = fmaxf(hi, f[i]); }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    }
    const __half lo_h = __float2half_rn(lo);
    const float lo_f = __half2float(lo_h);
    __half s_h = __float2half_rn(__fdiv_rn(hi - lo_f, 15.f));
    if (!(__half2float(s_h) > 0.f)) s_h = __float2half_rn(1e-4f);
    const float s_f = __half2float(s_h);
    uint8_t* codes = rec + h * (D / 2) + lane * (PER / 2);
#pragma unroll
    for (int i = 0; i < PER; i += 2) {
      const float c0 = fminf(fmaxf(rintf(__fdiv_rn(f[i] - lo_f, s_f)), 0.f), 15.f);
      const float c1 = fminf(fmaxf(rintf(__fdiv_rn(f[i + 1] - lo_f, s_f)), 0.f), 15.f);
      codes[i / 2] = static_cast<uint8_t>(c0) | (static_cast<uint8_t>(c1) << 4);
    }
    if (lane == 0) {
      __half* prm = reinterpret_cast<__half*>(rec + Hkv * (D / 2) + 4 * h);
      prm[0] = s_h;
      prm[1] = lo_h;
    }
    used = Hkv * (D / 2 + 4);
  } else {
    __half* dst = reinterpret_cast<__half*>(rec + h * 2 * D) + lane * PER;
#pragma unroll
    for (int i = 0; i < PER; ++i) dst[i] = x[i];
    used = Hkv * 2 * D;
  }
  if (h == 0)  // zero the record's padding (R is a multiple of 16)
    for (int i = used + lane; i < R; i += 32) rec[i] = 0;
}
