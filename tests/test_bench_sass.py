"""bench/sass_w4a4x.py's reading of a main loop (the compile and the disassembly need nvcc and
cuobjdump; here a hand-made SASS listing of the same shape)."""
from __future__ import annotations

import pytest


# head (barrier, a branch to the s8 block), s4 block (two IMMAs, one convert), BRA to the tail,
# s8 block (four IMMAs), tail (scaling), the loop's back edge; then the epilogue
LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   LDG.E R2, [R4.64] ;
        /*0030*/              @!P0 BRA 0x80 ;
        /*0040*/                   LOP3.LUT R6, R6, 0xf0f0f0f, R7, 0xe4, !PT ;
        /*0050*/                   IMMA.16864.S4.U4 R8, R12.ROW, R6.COL, RZ ;
        /*0060*/                   IMMA.16864.S4.U4 R8, R16.ROW, R6.COL, R8 ;
        /*0070*/                   BRA 0xc0 ;
        /*0080*/                   IMMA.16832.S8.S8 R8, R12.ROW, R6.COL, RZ ;
        /*0090*/                   IMMA.16832.S8.S8 R8, R12.ROW, R6.COL, R8 ;
        /*00a0*/                   IMMA.16832.S8.S8 R8, R12.ROW, R6.COL, R8 ;
        /*00b0*/                   IMMA.16832.S8.S8 R8, R12.ROW, R6.COL, R8 ;
        /*00c0*/                   I2F R9, R8 ;
        /*00d0*/                   FMUL R9, R2, R9 ;
        /*00e0*/                   FADD R20, R20, R9 ;
        /*00f0*/              @P1 BRA 0x10 ;
        /*0100*/                   STG.E [R4.64], R20 ;
        /*0110*/                   EXIT ;
"""


@pytest.fixture(scope="module")
def sass(bench_module):
    with bench_module("sass_w4a4x") as mod:
        yield mod


def test_loop_splits_into_head_branches_and_tail(sass):
    parts = sass.split_loop(sass.parse(LISTING))
    assert {k: p.issue for k, p in parts.items()} == {"head": 3, "s4": 4, "s8": 4, "tail": 4}
    assert parts["s4"].ops["IMMA.16864.S4.U4"] == 2 and parts["s8"].ops["IMMA.16832.S8.S8"] == 4
    # per block on each branch: head + branch + tail; the tensor time of 8 clocks an IMMA
    assert sass.block_cycles(parts, "s4") == {"issue": 11, "tensor": 16, "i2f": 8, "fp32": 4}
    assert sass.block_cycles(parts, "s8") == {"issue": 11, "tensor": 32, "i2f": 8, "fp32": 4}


def test_a_kernel_without_s4_says_so(sass):
    s8_only = "\n".join(line for line in LISTING.splitlines() if "16864" not in line)
    with pytest.raises(ValueError, match="no s4 IMMA"):
        sass.split_loop(sass.parse(s8_only))
