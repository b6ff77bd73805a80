"""The sm80 W4Ax kernel's s4 path (issue 15; w4a8_sm80.cu with QC_A4X == 2), modelled lane by
lane on the CPU: the packed 4-bit activations (`pack_a4x`) as ldmatrix hands them to a lane,
the W4A8 layout's weight words as `W4Operand::convert_s4` pairs them, and
`mma.m16n8k64.s4.u4` by the PTX ISA's fragment tables, must give x_q . q for every n8 tile
and k64 step. The GPU test (test_gemm_w4a4x_gpu.py) checks the kernel itself bitwise; this one
pins the k permutation that lets one weight layout serve s4 and s8 MMAs, where no GPU is."""
import torch

from qcompile.compiler.schemes import SPECS
from qcompile.runtime.ops.quant import a4x_width, pack_a4x, unpack_a4x

LO = 0x0F0F0F0F
MASK = 0xFFFFFFFF


def _word(b: torch.Tensor) -> int:
    """Four bytes, little-endian, as a 32-bit register."""
    return sum(int(v) << (8 * i) for i, v in enumerate(b.to(torch.uint8).tolist()))


def _nibbles(r: int, signed: bool) -> list[int]:
    out = [(r >> (4 * j)) & 0xF for j in range(8)]
    return [v - 16 if signed and v >= 8 else v for v in out]


def _convert_s4(w0: list[int], w1: list[int]) -> list[list[int]]:
    """W4Operand::convert_s4 for one 32-column tile: b[n8 tile][k32 tile of the k64 step]."""
    b = [[0, 0] for _ in range(4)]
    for j, w in enumerate((w0, w1)):
        for a in range(2):
            r0, r1 = w[2 * a], w[2 * a + 1]
            b[a][j] = (r0 & LO) | ((r1 << 4) & ~LO & MASK)
            b[a + 2][j] = ((r0 >> 4) & LO) | (r1 & ~LO & MASK)
    return b


def _mma_s4u4(a_regs: list[list[int]], b_regs: list[list[int]]) -> torch.Tensor:
    """mma.m16n8k64.row.col.s32.s4.u4 from the 32 lanes' registers (PTX fragment tables):
    lane 4g + t holds A (row g / g + 8, k 8t + j / 32 + 8t + j) in a0..a3 and B (col g, k 8t + j
    / 32 + 8t + j) in b0, b1."""
    A, B = torch.zeros(16, 64, dtype=torch.int64), torch.zeros(64, 8, dtype=torch.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i, (row, k0) in enumerate(((g, 0), (g + 8, 0), (g, 32), (g + 8, 32))):
            A[row, k0 + 8 * t:k0 + 8 * t + 8] = torch.tensor(_nibbles(a_regs[lane][i], True))
        for i, k0 in enumerate((0, 32)):
            B[k0 + 8 * t:k0 + 8 * t + 8, g] = torch.tensor(_nibbles(b_regs[lane][i], False))
    return A @ B


def test_pack_a4x_round_trips_and_sizes():
    g = torch.Generator().manual_seed(0)
    xq = torch.cat([torch.randint(-127, 128, (3, 256), generator=g),
                    torch.randint(-7, 8, (3, 384), generator=g)], dim=1).to(torch.int8)
    packed = pack_a4x(xq, 2)
    assert packed.dtype == torch.int8 and packed.shape == (3, a4x_width(640, 2)) == (3, 448)
    assert torch.equal(packed[:, :256], xq[:, :256])
    assert torch.equal(unpack_a4x(packed, 2), xq)
    # byte b of a 32-channel group: channel b low, b + 16 high
    c = xq[0, 256:288].tolist()
    assert [int(v) & 0xFF for v in packed[0, 256:272]] == [
        (c[b] & 0xF) | ((c[b + 16] & 0xF) << 4) for b in range(16)]


def test_s4_lanes_give_the_block_product():
    """Every lane's fragments, built as the kernel builds them from the real packers' bytes,
    multiply to x_q . q on each n8 tile of a 32-column tile and each k64 step of a block."""
    g = torch.Generator().manual_seed(1)
    n, k = 64, 128
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    xq = torch.randint(-7, 8, (16, k), generator=g, dtype=torch.int8)
    wl = SPECS["w4a4"].layout.pack(q)  # [Np/32, Kp/32, 512]: W4A8's layout, unchanged
    xp = pack_a4x(xq, 0)  # [16, 64] bytes
    for nt32 in range(n // 32):
        for ks in range(k // 64):
            tiles = [wl[nt32, 2 * ks + j] for j in range(2)]
            a_regs = []
            lane_b = []
            for lane in range(32):
                gi, t = lane >> 2, lane & 3
                rows = xp[:, 32 * ks:32 * ks + 32]  # this k64 step's 32 bytes a row
                # ldmatrix.x4: (rows 0-7 | 8-15) x (bytes 0-15 | 16-31); lane gets 4t..4t+3
                a_regs.append([_word(rows[r, c + 4 * t:c + 4 * t + 4])
                               for r, c in ((gi, 0), (gi + 8, 0), (gi, 16), (gi + 8, 16))])
                w = [[_word(tl[16 * lane + 4 * i:16 * lane + 4 * i + 4]) for i in range(4)]
                     for tl in tiles]
                lane_b.append(_convert_s4(w[0], w[1]))
            for a in range(4):
                got = _mma_s4u4(a_regs, [lane_b[lane][a] for lane in range(32)])
                rows_n = q[32 * nt32 + 8 * a:32 * nt32 + 8 * a + 8, 64 * ks:64 * ks + 64]
                want = xq[:, 64 * ks:64 * ks + 64].long() @ rows_n.long().t()
                assert torch.equal(got, want), (nt32, ks, a)
