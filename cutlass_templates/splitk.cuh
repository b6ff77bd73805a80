// Split-K of the INT8 GEMMs: a CTA per (tile, K slice); every slice publishes its raw int32
// sums to a workspace; then either the last slice of each tile to arrive (a per-tile arrival
// counter) adds the others' into its registers and runs the epilogue in the same launch
// ("fixup"), or, when the launch passes no counters, the *_reduce entry sums the workspace and
// runs the epilogue in a second launch ("separate"), or, on sm_90 when the launch makes the
// SPLITK slices of a tile one thread-block cluster ("cluster"), the slices meet in distributed
// shared memory: no workspace, no second launch.  Which is faster depends on the shape (the
// fixup puts three dependent L2 round trips on the tail of the critical path, a second launch
// about one); the tile table (configs.py) chooses.
#pragma once

#include "common.cuh"

namespace qc {

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

}  // namespace qc
