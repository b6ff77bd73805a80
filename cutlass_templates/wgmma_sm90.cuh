// Warpgroup-MMA building blocks of the Hopper templates (w8a8_sm90.cu, w4a8_rs_sm90.cu; sm_90a).
//
// Operands live in shared memory as the sm80 kernels stage A: rows of 128 bytes (BK = 128
// int8) with the 16-byte chunks XOR-swizzled by the row index mod 8 (qc::swz).  That is
// wgmma's canonical K-major SWIZZLE_128B layout: 8-row x 128-byte core groups of 1024 bytes
// stacked along M (N), so one descriptor (start address, stride byte offset 1024) describes a
// whole 64-row (BN-row) operand, and a k32 step is a 32-byte advance of the start address
// inside the swizzle atom.  Buffers must start 1024-byte aligned.
//
// A warpgroup (128 threads) computes 64 x BN with one m64nBNk32 wgmma per k32 step; its
// accumulator fragment is mma.sync's m16n8 one repeated: warp w % 4 holds rows 16(w%4)..+15,
// lane 4g+t rows g and g+8, columns 8j+2t and 8j+2t+1 of n8 tile j in registers 4j..4j+3.
#pragma once

#include "common.cuh"

#include <cute/arch/mma_sm90.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>

#include <utility>

namespace qc::sm90 {

template <int BN>
using MmaS8 = decltype(cute::SM90::GMMA::ss_op_selector<int8_t, int8_t, int32_t,
                                                          cute::Shape<cute::_64, cute::Int<BN>,
                                                                      cute::_32>>());

__device__ __forceinline__ uint64_t desc_sw128(const char* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return static_cast<uint64_t>((a & 0x3FFFF) >> 4)  // start address
         | (1ull << 16)                              // leading byte offset: unused with swizzle
         | (static_cast<uint64_t>(1024 >> 4) << 32)  // stride byte offset: 8 rows of 128 B
         | (1ull << 62);                             // SWIZZLE_128B
}

template <int BN, size_t... I>
__device__ __forceinline__ void wgmma_impl(uint64_t da, uint64_t db, uint32_t (&d)[BN / 2],
                                           std::index_sequence<I...>) {
  MmaS8<BN>::fma(da, db, d[I]..., cute::SM90::GMMA::ScaleOut::One);
}

// acc += A[64 rows at sa] . B[BN rows at sb]^T over the 128-byte rows (four k32 steps).
template <int BN>
__device__ __forceinline__ void wgmma_k128(const char* sa, const char* sb, uint32_t (&acc)[BN / 2]) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
    wgmma_impl<BN>(desc_sw128(sa + ks * 32), desc_sw128(sb + ks * 32), acc,
                   std::make_index_sequence<BN / 2>{});
}

// Register-sourced A (w4a8_rs_sm90.cu): the warpgroup's 64 x 32 A operand comes from
// registers, warp w % 4 holding rows 16(w%4)..+15 exactly as mma.sync m16n8k32's A fragment
// (common.cuh; CuTe GMMA::ALayout_64x32); B is BN rows of 128-byte swizzled shared rows.
template <int BN>
using MmaRS8 = decltype(cute::SM90::GMMA::rs_op_selector<int8_t, int8_t, int32_t,
                                                          cute::Shape<cute::_64, cute::Int<BN>,
                                                                      cute::_32>>());

template <int BN, size_t... I>
__device__ __forceinline__ void wgmma_rs_impl(const uint32_t (&a)[4], uint64_t db,
                                              uint32_t (&d)[BN / 2], std::index_sequence<I...>,
                                              cute::SM90::GMMA::ScaleOut scale) {
  MmaRS8<BN>::fma(a[0], a[1], a[2], a[3], db, d[I]..., scale);
}

// acc += A (registers, one k32 step) . B[BN rows at sb, k32 at byte sb's chunk]^T; with
// `accumulate` false, acc = A . B^T (wgmma's scale-d 0: the old values are not read, so a
// restart costs no register zeroing).
template <int BN>
__device__ __forceinline__ void wgmma_rs_k32(const uint32_t (&a)[4], const char* sb,
                                             uint32_t (&acc)[BN / 2], bool accumulate = true) {
  wgmma_rs_impl<BN>(a, desc_sw128(sb), acc, std::make_index_sequence<BN / 2>{},
                    accumulate ? cute::SM90::GMMA::ScaleOut::One
                               : cute::SM90::GMMA::ScaleOut::Zero);
}

// Generic-proxy shared-memory writes (cp.async, st.shared) -> visible to wgmma's async proxy.
__device__ __forceinline__ void fence_async_proxy() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Keep the compiler from moving accumulator accesses across wgmma issue/wait points.
template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// The epilogue of warpgroup wg's 64 x BN accumulators at tile origin (m0, n0).
template <int BN, class Epi>
__device__ __forceinline__ void store(const Epi& epi, const uint32_t (&acc)[BN / 2],
                                      const __half* bias, __half* C, int M, int N, int m0,
                                      int n0, int wg, int warp, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = m0 + wg * 64 + warp * 16 + g + 8 * h;
    if (m >= M) continue;
    const typename Epi::Row row = epi.row(m);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int n = n0 + 8 * j + 2 * t;
      if (n < N)
        finish_pair(epi, row, bias, C, N, m, n, (int)acc[4 * j + 2 * h],
                    (int)acc[4 * j + 2 * h + 1]);
    }
  }
}

}  // namespace qc::sm90
