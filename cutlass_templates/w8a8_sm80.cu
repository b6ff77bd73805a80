// W8A8 GEMM: C[M, N] = fp16( s_x[m] * s_w[n] * sum_k A[m, k] B[n, k]  (+ bias[n]) ).
//
// A   [M, K] int8 row-major (K % 16 == 0), s_x [M] f32 (per token)
// B   [Np, Kp] int8 row-major, layout w8a8_rm (Np = N up to 32, Kp = K up to 32, zero padded)
// s_w [Np] f32, bias [N] fp16 or nullptr, C [M, N] fp16 (row stride N)
// workspace [QC_SPLITK, M, Np] int32 and flags [grid tiles] uint32 (zeroed once, left zero)
// when QC_SPLITK > 1 (else unused, may be nullptr): split-K as in common.cuh
//
// Epilogue rounding sequence = the reference (runtime/ops/gemm.py gemm_w8a8):
//   y = fp32(acc) * s_x ; y = y * s_w ; y = y + fp32(bias) ; fp16(y)
//
// Build (one entry per tile config; configs.py writes the defines):
//   nvcc -cubin -std=c++17 -O3 --expt-relaxed-constexpr -arch=sm_80 -I<cutlass>/include \
//        -DQC_KERNEL=qc_w8a8_... -DQC_BM=.. -DQC_BN=.. -DQC_BK=.. -DQC_WARPS_M=.. \
//        -DQC_WARPS_N=.. -DQC_STAGES=.. -DQC_SPLITK=.. w8a8_sm80.cu
// Entries: QC_KERNEL (grid (ceil(N/BN), ceil(M/BM), QC_SPLITK), block WARPS_M*WARPS_N*32,
// dynamic smem STAGES*(BM*BK + BN*BK)) and, when QC_SPLITK > 1, QC_KERNEL##_reduce (same
// arguments; block qc::kReduceThreads, any grid) for launches with flags == nullptr.
#include "gemm_sm80.cuh"

#if !defined(QC_KERNEL) || !defined(QC_BM) || !defined(QC_BN) || !defined(QC_BK) || \
    !defined(QC_WARPS_M) || !defined(QC_WARPS_N) || !defined(QC_STAGES) || !defined(QC_SPLITK)
#error "define QC_KERNEL, QC_BM, QC_BN, QC_BK, QC_WARPS_M, QC_WARPS_N, QC_STAGES, QC_SPLITK"
#endif

namespace {

using T = qc::Tile<QC_BM, QC_BN, QC_BK, QC_WARPS_M, QC_WARPS_N, QC_STAGES, QC_SPLITK>;

// B [Np, Kp] row-major int8: staged exactly like A (swizzled rows of BK bytes) and read with
// ldmatrix.x4, which yields the B fragments of two n8 tiles: matrices (n 0-7, k 0-15),
// (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31) = b0, b1 of n8 tile 0, b0, b1 of tile 1.
struct W8Operand {
  static constexpr int kStageBytes = T::BN * T::BK;
  const int8_t* B;
  int np, kp;

  using Loader = qc::RowLoader<T, T::BN>;
  __device__ __forceinline__ Loader loader(int n0, int tid) const {
    return Loader(B, np, kp, n0, tid);
  }

  struct Raw {
    uint32_t b[T::NT][2];
  };

  __device__ __forceinline__ void load_raw(const char* sb, int warp_n, int lane, int ks,
                                           Raw& raw) const {
    const int kb = ks * 32 + ((lane >> 3) & 1) * 16;
#pragma unroll
    for (int p = 0; p < T::NT / 2; ++p) {
      const int row = warp_n * T::WN + p * 16 + (lane & 7) + 8 * (lane >> 4);
      uint32_t r[4];
      qc::ldsm_x4(sb + qc::swz(row * T::BK + kb), r);
      raw.b[2 * p][0] = r[0];
      raw.b[2 * p][1] = r[1];
      raw.b[2 * p + 1][0] = r[2];
      raw.b[2 * p + 1][1] = r[3];
    }
  }

  __device__ __forceinline__ void convert(const Raw& raw, uint32_t (&b)[T::NT][2]) const {
#pragma unroll
    for (int nt = 0; nt < T::NT; ++nt) {
      b[nt][0] = raw.b[nt][0];
      b[nt][1] = raw.b[nt][1];
    }
  }
};

}  // namespace

extern "C" __global__ void __launch_bounds__(T::THREADS, 1)
    QC_KERNEL(const int8_t* __restrict__ A, const float* __restrict__ s_x,
              const int8_t* __restrict__ B, const float* __restrict__ s_w,
              const __half* __restrict__ bias, __half* __restrict__ C,
              int32_t* __restrict__ workspace, uint32_t* __restrict__ flags, int M,
              int N, int K) {
  extern __shared__ __align__(128) char smem[];
  const int np = qc::round_up(N, 32), kp = qc::round_up(K, 32);
  qc::gemm_body<T>(smem, A, M, N, K, kp, W8Operand{B, np, kp}, qc::EpiW8A8{s_x, s_w}, bias, C,
                   workspace, flags);
}

#if QC_SPLITK > 1
extern "C" __global__ void __launch_bounds__(qc::kReduceThreads)
    QC_CAT(QC_KERNEL, _reduce)(const int8_t* __restrict__ A, const float* __restrict__ s_x,
                               const int8_t* __restrict__ B, const float* __restrict__ s_w,
                               const __half* __restrict__ bias, __half* __restrict__ C,
                               int32_t* __restrict__ workspace, uint32_t* __restrict__ flags,
                               int M, int N, int K) {
  qc::splitk_reduce<T::SPLITK>(workspace, M, N, qc::EpiW8A8{s_x, s_w}, bias, C);
}
#endif

