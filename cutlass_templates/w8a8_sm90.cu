// W8A8 GEMM on Hopper tensor cores (wgmma, sm_90a): C = fp16(s_x * s_w * (A . B^T) (+ bias)),
// the same operands, layout (w8a8_rm) and epilogue as w8a8_sm80.cu, for an sm90 target only.
//
// Why: mma.sync s8 tops out near 1289 TOP/s on an H100 (our sm80 kernels reach 60-70% of it),
// while wgmma s8 has about 1979 TOP/s dense.  This is the first Hopper-native template: a
// cp.async multistage pipeline feeding warpgroup MMAs from shared memory (both operands "SS").
//
// Shared memory: STAGES x [A stage: BM rows][B stage: BN rows] of 128-byte swizzled rows,
// filled by qc::RowLoader exactly as the sm80 kernels do: wgmma's canonical K-major layout
// (wgmma_sm90.cuh).  Warpgroup w computes rows 64w..64w+63 of the tile over all BN columns.
//
// Pipeline (one wgmma batch in flight): prologue loads tiles 0..S-3; iteration kt waits for
// tile kt (cp.async), fences the generic->async proxy, barrier, refills the stage of tile kt-2
// (whose batch every thread retired at the end of iteration kt-1) with tile kt+S-2, issues the
// batch of tile kt, then retires the batch of tile kt-1 (wgmma.wait_group 1).
//
//   nvcc -fatbin -arch=sm_90a -DQC_KERNEL=.. -DQC_BM=128 -DQC_BN=128 -DQC_BK=128 -DQC_WARPS_M=8
//        -DQC_WARPS_N=1 -DQC_STAGES=5 -DQC_SPLITK=1 w8a8_sm90.cu
// Entry: QC_KERNEL(A, s_x, B, s_w, bias, C, workspace, flags, M, N, K) (workspace, flags
// unused), grid (ceil(N/BN), ceil(M/BM)), block 2*BM threads, dynamic smem STAGES*(BM+BN)*128.
#include "wgmma_sm90.cuh"

#if !defined(QC_KERNEL) || !defined(QC_BM) || !defined(QC_BN) || !defined(QC_BK) || \
    !defined(QC_WARPS_M) || !defined(QC_WARPS_N) || !defined(QC_STAGES) || !defined(QC_SPLITK)
#error "define QC_KERNEL, QC_BM, QC_BN, QC_BK, QC_WARPS_M, QC_WARPS_N, QC_STAGES, QC_SPLITK"
#endif

namespace {

using T = qc::Tile<QC_BM, QC_BN, QC_BK, QC_WARPS_M, QC_WARPS_N, QC_STAGES, QC_SPLITK>;
static_assert(T::SPLITK == 1, "the wgmma template has no split-K yet");
static_assert(T::BK == 128, "one 128-byte swizzle atom per row: BK must be 128");
static_assert(T::WARPS_N == 1 && T::WARPS_M * 16 == T::BM && T::BM % 64 == 0,
              "one warpgroup (4 warps) per 64 rows: WARPS_M = BM / 16, WARPS_N = 1");
static_assert(T::BN % 8 == 0 && T::BN <= 256, "wgmma N: a multiple of 8 up to 256");
static_assert(T::STAGES >= 3, "one stage in flight for the MMA, one landing, one loading");

constexpr int kAcc = T::BN / 2;  // 64 x BN int32 over 128 threads
constexpr int B_STAGE = T::BN * T::BK;

}  // namespace

extern "C" __global__ void __launch_bounds__(T::THREADS, 1)
    QC_KERNEL(const int8_t* __restrict__ A, const float* __restrict__ s_x,
              const int8_t* __restrict__ B, const float* __restrict__ s_w,
              const __half* __restrict__ bias, __half* __restrict__ C,
              int32_t* __restrict__ workspace, uint32_t* __restrict__ flags, int M, int N,
              int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(1024) char smem[];
  const int np = qc::round_up(N, 32), kp = qc::round_up(K, 32);
  const int tid = threadIdx.x, wg = tid / 128, lane = tid & 31, warp = (tid / 32) & 3;
  const int2 origin = qc::tile_origin<T>();
  const int m0 = origin.x, n0 = origin.y;
  const int tiles = qc::ceil_div(kp, T::BK);

  char* const sa0 = smem;
  char* const sb0 = smem + T::STAGES * T::A_STAGE;
  const qc::RowLoader<T, T::BM> aload(A, M, K, m0, tid);
  const qc::RowLoader<T, T::BN> bload(B, np, kp, n0, tid);
  auto load = [&](int kt) {
    const int s = kt % T::STAGES;
    aload.load(sa0 + s * T::A_STAGE, kt * T::BK, tid);
    bload.load(sb0 + s * B_STAGE, kt * T::BK, tid);
  };

  uint32_t acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0u;

#pragma unroll
  for (int s = 0; s < T::STAGES - 2; ++s) {
    if (s < tiles) load(s);
    cute::cp_async_fence();
  }
  for (int kt = 0; kt < tiles; ++kt) {
    cute::cp_async_wait<T::STAGES - 3>();  // tile kt has landed (this thread's chunks)
    qc::sm90::fence_async_proxy();          // ... and is visible to wgmma's async proxy
    __syncthreads();                        // ... for every thread's chunks
    if (kt + T::STAGES - 2 < tiles) load(kt + T::STAGES - 2);
    cute::cp_async_fence();

    const int s = kt % T::STAGES;
    const char* sa = sa0 + s * T::A_STAGE + wg * 64 * T::BK;
    const char* sb = sb0 + s * B_STAGE;
    qc::sm90::fence_operands(acc);
    cute::warpgroup_arrive();
    qc::sm90::wgmma_k128<T::BN>(sa, sb, acc);
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<1>();  // the batch of tile kt-1 is done: its stage may be refilled
    qc::sm90::fence_operands(acc);
  }
  cute::warpgroup_wait<0>();
  qc::sm90::fence_operands(acc);
  cute::cp_async_wait<0>();

  qc::sm90::store<T::BN>(qc::EpiW8A8{s_x, s_w}, acc, bias, C, M, N, m0, n0, wg, warp, lane);
#else
  __trap();  // built for an architecture without wgmma: the runtime never selects it there
#endif
}
