// One pipeline stage of 4-bit weights for the Hopper W4A8 template (w4a8_rs_sm90.cu, weights
// unpacked into wgmma's register A operand): the packed nibble tiles of QServe's compute-aware
// layout (w4a8_layout.py) for BN weight rows x BK, and with groups the stage's s2 / negzs rows, as
// cp.async brings them.
//
// Layout of a stage (BYTES): [NIB: BN/32 x BK/32 tiles of 512 bytes, tile t = ti * KT + tj (N tile
// ti, K tile tj within the stage; 16 bytes per lane L = 4c + f of a tile)][with groups: GROUP_ROWS
// rows of BN bytes of s2, then GROUP_ROWS rows of negzs]. In a tile, lane L's word w = 2a + r holds
// in byte i the code of k = 16r + 4f + i, row c + 8a in the low nibble and row c + 8a + 16 in the
// high one; so the low (high) nibbles of words 0, 2, 1, 3 are mma.sync m16n8k32's A fragment a0..a3
// of rows 0..15 (16..31), which is also the register layout of a wgmma A operand's 16-row warp
// slice.
#pragma once

#include "common.cuh"

namespace qc {

template <class T, int G>
struct W4Stage {
  static_assert(G == 0 || G == 64 || G == 128, "QC_GROUP: 0 (per channel), 64 or 128");
  static_assert(T::BK % 32 == 0 && T::BK % (G ? G : 1) == 0, "whole groups per stage");
  static constexpr int KT = T::BK / 32;                     // 32x32 tiles per stage along K
  static constexpr int GROUP_ROWS = G ? T::BK / G : 0;      // s2 / negzs rows per stage
  static constexpr int GROUP_STEPS = G ? G / 32 : 0;        // k32 steps per group
  static constexpr int SCALE_BYTES = round_up(2 * GROUP_ROWS * T::BN, 128);
  static constexpr int NIB = T::BN * T::BK / 2;             // packed nibbles
  static constexpr int BYTES = NIB + SCALE_BYTES;
  static constexpr int UNITS = NIB / 16;                    // 16-byte lane units
  static_assert(UNITS % T::THREADS == 0, "every thread loads whole units");
  static constexpr int UPT = UNITS / T::THREADS;

  // cp.async of one stage: weight rows n0.., k0.. of B [Np/32, Kp/32, 512] (each N tile's K
  // tiles contiguous); tiles past np / kp and group rows past kp / G are zero-filled.
  static __device__ __forceinline__ void load(char* raw, const uint8_t* B, const uint8_t* s2,
                                              const uint8_t* negzs, int np, int kp, int n0,
                                              int k0, int tid) {
    const int nt_total = np / 32, kt_total = kp / 32;
    if constexpr (G > 0) {  // GROUP_ROWS rows of BN bytes of s2, then of negzs
      constexpr int CPR = T::BN / 16, CHUNKS = 2 * GROUP_ROWS * CPR;
      auto chunk = [&](int c) {
        const int which = c / (GROUP_ROWS * CPR), rc = c % (GROUP_ROWS * CPR);
        const int g = k0 / G + rc / CPR, n = n0 + (rc % CPR) * 16;
        const bool ok = g < kp / G && n < np;
        const uint8_t* base = which ? negzs : s2;
        cp_async16(raw + NIB + c * 16, ok ? base + (size_t)g * np + n : base, ok);
      };
      if constexpr (CHUNKS <= T::THREADS) {  // one chunk for the first CHUNKS threads
        if (tid < CHUNKS) chunk(tid);
      } else {
        for (int c = tid; c < CHUNKS; c += T::THREADS) chunk(c);
      }
    }
#pragma unroll
    for (int i = 0; i < UPT; ++i) {
      const int u = tid + i * T::THREADS, t = u >> 5, lane = u & 31;
      const int nt = n0 / 32 + t / KT, kt = k0 / 32 + t % KT;
      const bool ok = nt < nt_total && kt < kt_total;
      const uint8_t* src = B + ((size_t)(ok ? nt : 0) * kt_total + (ok ? kt : 0)) * 512 + lane * 16;
      cp_async16(raw + u * 16, src, ok);
    }
  }

  // With groups: the lane's s2 / negzs words for tile (ti, tj) (byte j serves rows
  // 32 ti + c + 8 j), one 32-bit shared load each.
  struct Scales {
    uint32_t s2, nz;
  };

  static __device__ __forceinline__ Scales scales(const char* raw, int ti, int tj, int c) {
    if constexpr (G == 0) {
      return {0u, 0u};
    } else {
      const int off = NIB + (tj * 32 / G) * T::BN + ti * 32 + 4 * c;
      return {*reinterpret_cast<const uint32_t*>(raw + off),
              *reinterpret_cast<const uint32_t*>(raw + off + GROUP_ROWS * T::BN)};
    }
  }

  // The per-byte-lane constants of dequant for a Scales (s2 and the zero word of rows
  // 32 ti + c + 8 j), computed once per group instead of once per register.  dequant turns
  // four codes (one byte each, 0..15) of rows 32 ti + c + 8 j into the MMA's s8 weights: the
  // codes themselves per channel (the zero point is the epilogue's), (q - z2) * s2 exactly with
  // groups (one IMAD and one XOR, group_zero_word).
  struct Deq {
    uint32_t s[4], z[4];
  };

  static __device__ __forceinline__ Deq prepare(const Scales& sc) {
    Deq d{};
    if constexpr (G > 0) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        d.s[j] = (sc.s2 >> (8 * j)) & 0xFFu;
        d.z[j] = group_zero_word(sc.nz >> (8 * j));
      }
    }
    return d;
  }

  static __device__ __forceinline__ uint32_t dequant(uint32_t q4, const Deq& d, int j) {
    if constexpr (G == 0) {
      return q4;
    } else {
      return (q4 * d.s[j] + d.z[j]) ^ 0x80808080u;
    }
  }
};

}  // namespace qc
