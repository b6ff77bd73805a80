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
//   A page holds its BS records head-major (runtime/ops/kv.py PageLayout): [Hkv][BS] codes
//   (or halves), then [Hkv][BS] pairs, so a CTA reads one contiguous run of its kv head per
//   page; kv_new stays token-major.
//
// Work: a CTA is (block of ROWS query rows of one sequence, kv head h, key split z). A query
// row is (new token i, query head g of the group): rows of one sequence are numbered
// i * G + g, so a CTA serves every query head of its kv head and reads each page once for all
// of them (GQA). blockIdx.x enumerates the row blocks of all sequences (CTAs past the last
// exit); each CTA finds its sequence by a prefix sum over query_start, so nothing is
// data-dependent on the host and the launch is CUDA-graph capturable.
//   _decode  : ROWS = 16, the 4 warps share the rows and split each key tile (16 fp16 or 32
//              int4 keys each), then merge in shared memory (flash-decoding inside the CTA).
//   _prefill : ROWS = 64, each warp owns 16 rows and reads every key of the tile (FA2).
//   _prefill2: ROWS = 128, each warp owns 32 rows (two m16 tiles sharing every K / V
//              fragment read), its Q fragments parked in shared memory.
// Keys [0, ctx + i_last] of a block are cut into gridDim.z splits of whole tiles. With one
// split the CTA writes fp16 out; with more, fp32 partial (O / l, log2-sum-exp) to workspace and
// the _merge entry combines them.
//
// Maths: mma.sync m16n8k16 fp16 -> fp32 for S = Q K^T and O = P V, online softmax in fp32
// (base 2).  The head dim is permuted per thread (the same permutation for Q and K, and an
// output permutation for V) so that every thread reads whole 16-, 8- or 4-byte runs of a
// record.  int4 codes become fp16 without a conversion: (w & 0x000F000F) | 0x64006400 is the
// half2 (1024 + c0, 1024 + c4), and the mask 0x00F000F0 gives 1024 + 16 c; the 1024 offsets
// and the x16 are exact: for K they are removed after the MMA with per-row sums, for V by a
// half2 subtraction before it (left in, they would accumulate over thousands of keys):
//   S[r, t] = sum_d q'_d (1024 + f_d c_td) with q'_d = q_d / f_d, so
//   q . k_t = scale_t * (S - 1024 sum_d q'_d) + min_t * sum_d q_d;
//   P' = p_t * scale_t (fp16), acc_d = sum_t P'_t f_d c_td, so
//   sum_t p_t v_td = acc_d / f_d + sum_t p_t min_t.
// Shared memory per stage (attention_tile.cuh): K [TN][K_STRIDE], V [TN][V_STRIDE] (+ int4
// (scale, min) of each), strides padded so each warp's fragment loads hit distinct banks;
// STAGES-deep cp.async.
//
// Entries (all: grid from the launcher, THREADS threads):
//   QC_KERNEL          (decode)  args below, grid (row blocks, Hkv, splits)
//   QC_KERNEL_prefill, _prefill2 same args
//   QC_KERNEL_merge    (ws_o, ws_lse, out, T, Hq, splits), grid ceil(T*Hq/4)
//   QC_KERNEL_encode   (k, v, out, T, Hkv, R), grid ceil(2*T*Hkv/4): records of one step
//   QC_KERNEL_encode_strided (k, v, out, T, Hkv, R, ks, vs): the same, tokens ks / vs apart
//   QC_KERNEL_encode_rot (k, v, out, T, Hkv, R, ks, vs, rot): the same, keys rotated first
// The attention entries' last argument `rot` (nullptr: none) is the key rotation of int4
// caches (passes/rotate_kv.py), applied to q in registers: the runtime folds the graph's two
// mms a layer into the kernels (runtime/compiled.py fast_kv_rotation "kernel").
//   QC_KERNEL_store    (recs, cache, slots, M, T, H, HB, PB, BS, R, NB), grid ceil(M*T*H/4)
#if !defined(QC_KERNEL) || !defined(QC_HEAD_DIM) || !defined(QC_KV_INT4) || !defined(QC_STAGES)
#error "define QC_KERNEL, QC_HEAD_DIM, QC_KV_INT4, QC_STAGES"
#endif

#define QC_CAT_(a, b) a##b
#define QC_CAT(a, b) QC_CAT_(a, b)

#include "attention_tile.cuh"
#include "attention_decode.cuh"

namespace {

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
  // Batch invariance (runtime/attention_kernels.py, Engine.load(batch_invariant=True)):
  int split_keys;  // > 0: split z is keys [z * split_keys, (z + 1) * split_keys) of every block
                   // (a multiple of every entry's tile); 0: the keys cut into gridDim.z parts
  int select;      // sequences served: 0 all, 1 those with one new token, 2 those with more
  // The key rotation applied to q here (kv_encode_int4's rotation; int4 pages only): H [D, D],
  // a signed Sylvester Hadamard matrix (rotate_q); nullptr: q as it is.
  const __half* rot;
};

// The head dim of an int4 row is held by its 4 lanes (q), a quarter each: lane q's element
// (s, kk) is dim q * D / 4 + q_local(s, kk) (q_dim).
__device__ __forceinline__ constexpr int q_local(int s, int kk) {
  return 8 * (s >> 1) + 2 * (s & 1) + (kk == 0 ? 0 : kk == 1 ? 4 : kk == 2 ? 1 : 5);
}

// x (this lane's quarter of one int4 row) times the key rotation H = diag(sign) Hs |h|, Hs the
// Sylvester Hadamard matrix of order D (passes/rotate_kv.py's; runtime/compiled.py checks the
// form before it hands H to the kernels): the signs of H's first column, the Walsh-Hadamard
// butterflies of the quarter's bits in registers and of its top two bits by shuffles across
// the row's 4 lanes (D log D / 4 adds a lane), times |h|, rounded to fp16 as the graph's mm
// was. Every lane of the warp calls it.
__device__ __forceinline__ void rotate_q(float (&x)[KSTEPS][4], const __half* rot, int lane) {
  constexpr int Q = D / 4;
  const int q = lane & 3;
  float y[Q];
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const bool neg = __half2float(rot[(size_t)q_dim(s, kk, q) * D]) < 0.f;
      y[q_local(s, kk)] = neg ? -x[s][kk] : x[s][kk];
    }
#pragma unroll
  for (int hb = 1; hb < Q; hb <<= 1)
#pragma unroll
    for (int i = 0; i < Q; ++i)
      if (!(i & hb)) {
        const float a = y[i], b = y[i + hb];
        y[i] = a + b;
        y[i + hb] = a - b;
      }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1)
#pragma unroll
    for (int i = 0; i < Q; ++i) {
      const float o = __shfl_xor_sync(0xffffffffu, y[i], off);
      y[i] = (q & off) ? o - y[i] : y[i] + o;
    }
  const float mag = fabsf(__half2float(rot[0]));
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      x[s][kk] = __half2float(__float2half_rn(y[q_local(s, kk)] * mag));
}

// This lane's elements of query row `row` (zero when !ok), rotated when the launch has a
// rotation (int4 pages only).
__device__ __forceinline__ void read_q(float (&x)[KSTEPS][4], const Args& p, int tok0, int h,
                                       int G, int row, bool ok, int lane) {
  const __half* src =
      p.q + ((size_t)(tok0 + (ok ? row / G : 0)) * p.Hq + h * G + (ok ? row % G : 0)) * D;
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) x[s][kk] = ok ? __half2float(src[q_dim(s, kk, lane & 3)]) : 0.f;
  if constexpr (INT4)
    if (p.rot != nullptr) rotate_q(x, p.rot, lane);
}

// Q fragments of rows (block row0 + g, + 8); rows >= nrows are zero.
__device__ __forceinline__ void load_q(RowState& st, const Args& p, int tok0, int h, int G,
                                       int row0, int nrows, int lane) {
  const int g = lane >> 2;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + g + 8 * half;
    float x[KSTEPS][4];
    read_q(x, p, tok0, h, G, row, row < nrows, lane);
    float sum_q = 0.f, sum_qf = 0.f;
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) {
      float v[4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        v[kk] = x[s][kk];
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

// Whether a launch with `select` serves a sequence of `tokens` new tokens (Args::select).
__device__ __forceinline__ bool selected(int select, int tokens) {
  return select == 0 || (select == 1 ? tokens == 1 : tokens > 1);
}

// Which sequence and row block blockIdx.x is (b = -1: none). Row blocks of sequence b:
// ceil(n_b * G / ROWS), enumerated in sequence order (a warp-wide prefix sum), each
// sequence's last block first: under the causal mask it reads the most keys, and the
// lightest blocks then fill the last wave.
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
      if (b < p.B) {
        const int tokens = __ldg(p.query_start + b + 1) - __ldg(p.query_start + b);
        n = selected(p.select, tokens) ? tokens * G : 0;
      }
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
        blk.row0 = (start + blocks - 1 - x) * ROWS;  // last rows (most keys, causal) first
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

// The keys [k_begin, k_end) of one kv head through the STAGES-deep cp.async pipeline:
// compute(stage, first key of the tile) runs once per tile, all threads, between barriers.
// Block-table entries are read one tile ahead of their copies (fetch_pages).
template <class S, int STAGES = STAGES, class F>
__device__ __forceinline__ void run_tiles(uint8_t* smem, const KeySource& src, int k_begin,
                                          int k_end, int tid, F&& compute) {
  constexpr int TN = S::TN;
  const int tiles = k_end > k_begin ? (k_end - k_begin + TN - 1) / TN : 0;
  int pg[KEYS_PER_THREAD<S>];
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < tiles) {
      fetch_pages<S>(pg, src, k_begin + i * TN, k_end, tid);
      load_tile<S>(smem + i * S::BYTES, src, pg, k_begin + i * TN, k_end, tid);
    }
    cp_commit();
  }
  fetch_pages<S>(pg, src, k_begin + (STAGES - 1) * TN, k_end, tid);
  for (int i = 0; i < tiles; ++i) {
    cp_wait<STAGES - 2>();
    __syncthreads();
    const int nxt = i + STAGES - 1;
    if (nxt < tiles) {
      load_tile<S>(smem + (nxt % STAGES) * S::BYTES, src, pg, k_begin + nxt * TN, k_end, tid);
      fetch_pages<S>(pg, src, k_begin + (nxt + 1) * TN, k_end, tid);
    }
    cp_commit();
    compute(smem + (i % STAGES) * S::BYTES, k_begin + i * TN);
  }
  cp_wait<0>();
}

// The 4 warps of a CTA each hold partial (unnormalised O, m, l) of the same RW rows over their
// own keys, in shared memory: so [WARPS][RW][D + 4], sm and sl [WARPS][RW]. Combine them (fixed
// order: deterministic) and store the block's rows.
template <int RW>
__device__ __forceinline__ void merge_warps(const Args& p, const Block& blk, int h, int G,
                                            int split, const float* so, const float* sm,
                                            const float* sl) {
  __syncthreads();
  for (int idx = threadIdx.x; idx < RW * D; idx += THREADS) {
    const int row = idx / D, d = idx % D, brow = blk.row0 + row;
    if (brow >= blk.nrows) continue;
    float m = NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) m = fmaxf(m, sm[w * RW + row]);
    const float base = m == NEG_INF ? 0.f : m;
    float o = 0.f, l = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float f = exp2f(sm[w * RW + row] - base);
      o += f * so[(w * RW + row) * (D + 4) + d];
      l += f * sl[w * RW + row];
    }
    const int tok = blk.tok0 + brow / G, hq = h * G + brow % G;
    store(p, tok, hq, d, o, l, split);
    if (d == 0) store_lse(p, tok, hq, m, l, split);
  }
}

// Keys of the block [0, ctx + its last token + 1) cut into gridDim.z splits of whole TN-key
// tiles, or into splits of split_keys each (a function of the sequence alone, not of the
// batch: batch-invariant; splits past the keys are empty): this CTA's [begin, end).
template <int ROWS, int TN>
__device__ __forceinline__ int2 key_range(const Block& blk, int G, int split_keys) {
  const int last_row = min(blk.row0 + ROWS, blk.nrows) - 1;
  const int k_all = blk.ctx + last_row / G + 1;
  const int per = split_keys > 0 ? split_keys
                                 : (((k_all + gridDim.z - 1) / gridDim.z) + TN - 1) / TN * TN;
  const int k_begin = blockIdx.z * per;
  return make_int2(k_begin, min(k_all, k_begin + per));
}

// A warp's 16 rows from block row wrow0: empty running state, each row's key limit.
__device__ __forceinline__ void init_rows(RowState& st, const Block& blk, int G, int wrow0,
                                          int k_end, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wrow0 + (lane >> 2) + 8 * r;
    st.m[r] = NEG_INF;
    st.l[r] = st.pm[r] = 0.f;
    st.lim[r] = row < blk.nrows ? min(k_end, blk.ctx + row / G + 1) : 0;
  }
#pragma unroll
  for (int j = 0; j < NTILES; ++j) st.o[j][0] = st.o[j][1] = st.o[j][2] = st.o[j][3] = 0.f;
}

// A warp's 16 finished rows from block row wrow0 -> out (or the split's workspace).
__device__ __forceinline__ void store_rows(const Args& p, const RowState& st, const Block& blk,
                                           int h, int G, int wrow0, int split, int lane) {
  const int g = lane >> 2, q = lane & 3;
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

  const int2 kr = key_range<ROWS, TN>(blk, G, p.split_keys);
  const int k_begin = kr.x, k_end = kr.y;

  RowState st;
  load_q(st, p, blk.tok0, h, G, wrow0, blk.nrows, lane);
  init_rows(st, blk, G, wrow0, k_end, lane);

  const int bs_shift = (p.BS & (p.BS - 1)) == 0 ? __ffs(p.BS) - 1 : -1;
  const KeySource src{p.cache, p.kv_new, p.block_tables + (size_t)blk.b * p.MB, blk.ctx,
                      p.NB, p.BS, bs_shift, p.R, p.T, blk.tok0, p.Hkv, h};
  const int lim_max = max(st.lim[0], st.lim[1]);  // this thread's rows see keys < lim_max
  run_tiles<S>(smem, src, k_begin, k_end, tid, [&](const uint8_t* stage, int key0) {
    // prefill: a warp whose rows are all masked for every key of the tile (past the causal
    // diagonal, or rows past the block's: a decode row in a mixed step has G valid rows of
    // 64) skips it; nothing would change (exact, as _prefill2)
    if (!SPLIT_WARPS && !__any_sync(0xffffffffu, key0 < lim_max)) return;
    const int k0 = SPLIT_WARPS ? 8 * NT * warp : 0;
    float s[NT][4];
    qk<NT>(st, stage + S::K_OFF, k0, lane, s);
    softmax_pv<S, NT>(st, stage, k0, key0, p.scale_log2, lane, s);
  });
  finish_rows(st);

  const int q = lane & 3;
  if constexpr (SPLIT_WARPS) {  // merge the 4 warps' partial rows (fixed order: deterministic)
    __syncthreads();  // every warp is done with the stages
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
    merge_warps<16>(p, blk, h, G, split, so, sm, sl);
  } else {
    store_rows(p, st, blk, h, G, wrow0, split, lane);
  }
}

// The _prefill2 entry: a CTA is P2_ROWS (128) query rows of one sequence; warp w owns rows
// 32 w .. 32 w + 31 as P2_MT m16 tiles, reads each K / V fragment once for both, and skips a
// tile that is wholly past its rows' causal limits.
__device__ __forceinline__ void attention_p2(const Args& p) {
  constexpr int MT = P2_MT, NT = P2_TN / 8;
  using S = Stage<P2_TN>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int G = p.Hq / p.Hkv, h = blockIdx.y, split = blockIdx.z;
  const Block blk = find_block<P2_ROWS>(p, G);
  if (blk.b < 0) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int2 kr = key_range<P2_ROWS, P2_TN>(blk, G, p.split_keys);
  const int k_begin = kr.x, k_end = kr.y;
  uint4* sq = reinterpret_cast<uint4*>(smem + STAGES * S::BYTES) + warp * MT * KSTEPS * 32;

  RowState st[MT];
  int lim_max = 0;  // this thread's rows see keys < lim_max
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int wrow0 = blk.row0 + 16 * (MT * warp + mt);
    load_q(st[mt], p, blk.tok0, h, G, wrow0, blk.nrows, lane);
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s)
      sq[(mt * KSTEPS + s) * 32 + lane] =
          make_uint4(st[mt].a[s][0], st[mt].a[s][1], st[mt].a[s][2], st[mt].a[s][3]);
    init_rows(st[mt], blk, G, wrow0, k_end, lane);
    lim_max = max(lim_max, max(st[mt].lim[0], st[mt].lim[1]));
  }

  const int bs_shift = (p.BS & (p.BS - 1)) == 0 ? __ffs(p.BS) - 1 : -1;
  const KeySource src{p.cache, p.kv_new, p.block_tables + (size_t)blk.b * p.MB, blk.ctx,
                      p.NB, p.BS, bs_shift, p.R, p.T, blk.tok0, p.Hkv, h};
  run_tiles<S>(smem, src, k_begin, k_end, tid, [&](const uint8_t* stage, int key0) {
    // every key of the tile masked for every row of the warp: nothing would change (exact)
    if (!__any_sync(0xffffffffu, key0 < lim_max)) return;
    float s[MT][NT][4];
    qk_sq<MT, NT>(sq, stage + S::K_OFF, 0, lane, s);
    uint32_t pf[MT][NT / 2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      softmax_p<S, NT>(st[mt], stage, 0, key0, p.scale_log2, lane, s[mt], pf[mt]);
    pv<S, NT, MT>(st, pf, stage, 0, lane);
  });

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    finish_rows(st[mt]);
    store_rows(p, st[mt], blk, h, G, blk.row0 + 16 * (MT * warp + mt), split, lane);
  }
}

// Q^T B fragments of row block row0 + g (zero past nrows), and the int4 row sums of rows 2q,
// 2q + 1 (computed by their own lanes, then fetched).
__device__ __forceinline__ void load_q_t(KtState& st, const Args& p, int tok0, int h, int G,
                                         int row0, int nrows, int lane) {
  const int g = lane >> 2, q = lane & 3, row = row0 + g;
  float x[KSTEPS][4];
  read_q(x, p, tok0, h, G, row, row < nrows, lane);
  float sum_q = 0.f, sum_qf = 0.f;
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s) {
    float v[4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      v[kk] = x[s][kk];
      sum_q += v[kk];
      if (INT4 && kk >= 2) v[kk] *= 0.0625f;  // exact: the fragment holds 16 * code
      sum_qf += __half2float(__float2half_rn(v[kk]));
    }
    st.b[s][0] = pack_half2(v[0], v[1]);
    st.b[s][1] = pack_half2(v[2], v[3]);
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    sum_q += __shfl_xor_sync(0xffffffffu, sum_q, off);
    sum_qf += __shfl_xor_sync(0xffffffffu, sum_qf, off);
  }
#pragma unroll
  for (int c = 0; c < 2; ++c) {  // row 2q + c lives in lanes (2q + c) * 4 ..
    st.qs[c] = __shfl_sync(0xffffffffu, sum_q, (2 * q + c) * 4);
    st.qm[c] = 1024.f * __shfl_sync(0xffffffffu, sum_qf, (2 * q + c) * 4);
  }
}

// The keys-as-M decode (attention_decode.cuh): a CTA is (8 query rows of one sequence, kv
// head, split); the 4 warps take 16 keys each of every 64-key tile and merge at the end.
__device__ __forceinline__ void attention_kt(const Args& p) {
  using S = Stage<KT_TN>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int G = p.Hq / p.Hkv, h = blockIdx.y, split = blockIdx.z;
  const Block blk = find_block<KT_ROWS>(p, G);
  if (blk.b < 0) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;
  const int2 kr = key_range<KT_ROWS, KT_TN>(blk, G, p.split_keys);
  const int k_begin = kr.x, k_end = kr.y;

  KtState st;
  load_q_t(st, p, blk.tok0, h, G, blk.row0, blk.nrows, lane);
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int row = blk.row0 + 2 * q + c;
    st.m[c] = NEG_INF;
    st.l[c] = st.pm[c] = 0.f;
    st.lim[c] = row < blk.nrows ? min(k_end, blk.ctx + row / G + 1) : 0;
  }
#pragma unroll
  for (int mt = 0; mt < KT_MT; ++mt) st.o[mt][0] = st.o[mt][1] = st.o[mt][2] = st.o[mt][3] = 0.f;

  const int bs_shift = (p.BS & (p.BS - 1)) == 0 ? __ffs(p.BS) - 1 : -1;
  const KeySource src{p.cache, p.kv_new, p.block_tables + (size_t)blk.b * p.MB, blk.ctx,
                      p.NB, p.BS, bs_shift, p.R, p.T, blk.tok0, p.Hkv, h};
  run_tiles<S, KT_STAGES>(smem, src, k_begin, k_end, tid, [&](const uint8_t* stage, int key0) {
    float s[4];
    qk_t(st, stage + S::K_OFF, 16 * warp, lane, s);
    softmax_pv_t<S>(st, stage, 16 * warp, key0, p.scale_log2, lane, s);
  });

  // sums over the warp's keys (lanes of one q hold keys g = 0..7 of rows 2q, 2q + 1)
#pragma unroll
  for (int c = 0; c < 2; ++c)
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      st.l[c] += __shfl_xor_sync(0xffffffffu, st.l[c], off);
      st.pm[c] += __shfl_xor_sync(0xffffffffu, st.pm[c], off);
    }
  __syncthreads();  // every warp is done with the stages
  float* so = reinterpret_cast<float*>(smem);  // [WARPS][8][D + 4]
  float* sm = so + WARPS * KT_ROWS * (D + 4);   // [WARPS][8] m, then l
  float* sl = sm + WARPS * KT_ROWS;
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int row = 2 * q + c;
    if (g == 0) {
      sm[warp * KT_ROWS + row] = st.m[c];
      sl[warp * KT_ROWS + row] = st.l[c];
    }
#pragma unroll
    for (int mt = 0; mt < KT_MT; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float o = st.o[mt][2 * hh + c];
        if (INT4) o = o * (hh ? 0.0625f : 1.f) + st.pm[c];  // true units (see the header)
        so[(warp * KT_ROWS + row) * (D + 4) + kt_dim(mt, 2 * hh, g)] = o;
      }
  }
  merge_warps<KT_ROWS>(p, blk, h, G, split, so, sm, sl);
}

}  // namespace

#define QC_ATTN_PARAMS                                                                      \
  const __half *q, const uint8_t *kv_new, const uint8_t *cache, const int *block_tables,    \
      const int *ctx_lens, const int *query_start, __half *out, float *ws_o, float *ws_lse, \
      int T, int B, int MB, int NB, int BS, int R, int Hq, int Hkv, float scale_log2,        \
      int split_keys, int select, const __half *rot
#define QC_ATTN_ARGS                                                                            \
  Args{q, kv_new, cache, block_tables, ctx_lens, query_start, out, ws_o, ws_lse, T, B, MB, NB, \
       BS, R, Hq, Hkv, scale_log2, split_keys, select, rot}

extern "C" __global__ void __launch_bounds__(THREADS) QC_KERNEL(QC_ATTN_PARAMS) {
  attention<16, DECODE_TN>(QC_ATTN_ARGS);
}

extern "C" __global__ void __launch_bounds__(THREADS, 5) QC_CAT(QC_KERNEL, _kt)(QC_ATTN_PARAMS) {
  attention_kt(QC_ATTN_ARGS);
}

extern "C" __global__ void __launch_bounds__(THREADS) QC_CAT(QC_KERNEL, _prefill)(QC_ATTN_PARAMS) {
  attention<64, 64>(QC_ATTN_ARGS);
}

extern "C" __global__ void __launch_bounds__(THREADS) QC_CAT(QC_KERNEL, _prefill2)(QC_ATTN_PARAMS) {
  attention_p2(QC_ATTN_ARGS);
}

// out[t, hq, :] = sum_z 2^(lse_z - M) O_z / sum_z 2^(lse_z - M); one warp per (t, hq). With
// select != 0 only the rows of the sequences that the attention launch served (the others
// belong to another launch of the step): token t's sequence by a binary search of query_start.
extern "C" __global__ void __launch_bounds__(THREADS)
QC_CAT(QC_KERNEL, _merge)(const float* ws_o, const float* ws_lse, __half* out, int T, int Hq,
                          int splits, const int* query_start, int B, int select) {
  const int row = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= T * Hq) return;
  if (select != 0) {
    const int t = row / Hq;
    int lo = 0, hi = B - 1;  // the last b with query_start[b] <= t
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (__ldg(query_start + mid) <= t) lo = mid; else hi = mid - 1;
    }
    if (!selected(select, __ldg(query_start + lo + 1) - __ldg(query_start + lo))) return;
  }
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

// A key's D / 32 elements in this lane (dims lane * D / 32 + i) times the rotation H (as
// rotate_q): butterflies of the low bits in registers, of the top five across the warp.
__device__ __forceinline__ void rotate_k(float (&f)[D / 32], const __half* rot, int lane) {
  constexpr int PER = D / 32;
#pragma unroll
  for (int i = 0; i < PER; ++i)
    if (__half2float(rot[(size_t)(lane * PER + i) * D]) < 0.f) f[i] = -f[i];
#pragma unroll
  for (int hb = 1; hb < PER; hb <<= 1)
#pragma unroll
    for (int i = 0; i < PER; ++i)
      if (!(i & hb)) {
        const float a = f[i], b = f[i + hb];
        f[i] = a + b;
        f[i + hb] = a - b;
      }
#pragma unroll
  for (int off = 1; off < 32; off <<= 1)
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const float o = __shfl_xor_sync(0xffffffffu, f[i], off);
      f[i] = (lane & off) ? o - f[i] : f[i] + o;
    }
  const float mag = fabsf(__half2float(rot[0]));
#pragma unroll
  for (int i = 0; i < PER; ++i) f[i] = __half2float(__float2half_rn(f[i] * mag));
}

// Records of one step: k, v [T, Hkv, D] fp16 -> out [2, T, R] uint8, bitwise the reference
// codec (runtime/ops/kv.py). One warp per (K or V, token, kv head); lane holds D/32 values.
// A token's heads are contiguous; tokens are ks / vs halves apart (v is usually a column slice
// of the fused QKV projection's output, read in place rather than copied first).
__device__ __forceinline__ void encode(const __half* k, const __half* v, uint8_t* out, int T,
                                       int Hkv, int R, long long ks, long long vs,
                                       const __half* rot = nullptr) {
  const int item = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (item >= 2 * T * Hkv) return;
  const int which = item / (T * Hkv), t = (item / Hkv) % T, h = item % Hkv;
  constexpr int PER = D / 32;
  const __half* x = (which ? v + t * vs : k + t * ks) + (size_t)h * D + lane * PER;
  uint8_t* rec = out + ((size_t)which * T + t) * R;
  float f[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) f[i] = __half2float(x[i]);
  if (INT4 && which == 0 && rot != nullptr) rotate_k(f, rot, lane);
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

extern "C" __global__ void __launch_bounds__(THREADS)
QC_CAT(QC_KERNEL, _encode)(const __half* k, const __half* v, uint8_t* out, int T, int Hkv, int R) {
  encode(k, v, out, T, Hkv, R, (long long)Hkv * D, (long long)Hkv * D);
}

// _encode with the token strides of k and v (in halves) as arguments.
extern "C" __global__ void __launch_bounds__(THREADS)
QC_CAT(QC_KERNEL, _encode_strided)(const __half* k, const __half* v, uint8_t* out, int T, int Hkv,
                                   int R, long long ks, long long vs) {
  encode(k, v, out, T, Hkv, R, ks, vs);
}

// _encode_strided with the keys rotated first (rotate_k; H [D, D] as rotate_q's): the graph's
// mm by the rotation before the encode folded in. Int4 binaries only use rot.
extern "C" __global__ void __launch_bounds__(THREADS)
QC_CAT(QC_KERNEL, _encode_rot)(const __half* k, const __half* v, uint8_t* out, int T, int Hkv,
                               int R, long long ks, long long vs, const __half* rot) {
  encode(k, v, out, T, Hkv, R, ks, vs, rot);
}

// The step's records into their pages: recs [M, T, R] (M = layers x {K, V}, contiguous) ->
// cache [M, NB, BS, R] at slots [T] (page * BS + offset), head-major within a page as
// runtime/ops/kv.py's PageLayout.to_pages: head h, slot o's HB bytes of codes (or values) at
// (h * BS + o) * HB, its PB bytes of (scale, min) at H * BS * HB + (h * BS + o) * PB. Pure byte
// movement, so any binary's entry serves any layout (HB, PB are arguments; HB % 4 == 0, PB 0
// or 4). One warp per (m, t, h), 4-byte words; 64-bit offsets (a cache is tens of GB, where
// ATen's index_put split itself into 32-bit pieces: 64 launches a step for the 1B shape).
extern "C" __global__ void __launch_bounds__(THREADS)
QC_CAT(QC_KERNEL, _store)(const uint8_t* recs, uint8_t* cache, const long long* slots, int M,
                          int T, int H, int HB, int PB, int BS, int R, long long NB) {
  const long long item = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (item >= (long long)M * T * H) return;
  const int h = (int)(item % H), t = (int)((item / H) % T);
  const long long m = item / ((long long)T * H);
  const long long slot = slots[t], page = slot / BS;
  const int off = (int)(slot % BS);
  const uint8_t* src = recs + (m * T + t) * (long long)R;
  uint8_t* dst = cache + (m * NB + page) * (long long)BS * R;
  const uint32_t* s4 = reinterpret_cast<const uint32_t*>(src + h * HB);
  uint32_t* d4 = reinterpret_cast<uint32_t*>(dst + ((long long)h * BS + off) * HB);
  for (int i = lane; i < HB / 4; i += 32) d4[i] = s4[i];
  if (PB == 4 && lane == 0)
    *reinterpret_cast<uint32_t*>(dst + (long long)H * BS * HB + ((long long)h * BS + off) * 4) =
        *reinterpret_cast<const uint32_t*>(src + H * HB + h * 4);
}
