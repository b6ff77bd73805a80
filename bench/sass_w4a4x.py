"""Instruction-level estimate of the sm80 W4Ax kernel (issue 15): the SASS of the w4a4x_s4
kind's main loop, split into its parts per 128-channel block (the loop head: barrier, cp.async
of the next stage, the block's scale loads; the s4 branch, a packed 4-bit block; the s8 branch,
an 8-bit block; the tail, the block's partials scaled into the fp32 sum), and the cycles each
part needs of an A100 SM sub-partition (one warp scheduler: one instruction a clock; its tensor
core: one m16n8k32 s8 or m16n8k64 s4 IMMA every 8 clocks (624 / 1248 dense TOP/s at 1.41 GHz on
108 SMs); I2F a quarter of the FP32 rate, 8 clocks a warp; FP32 16 lanes, 2 clocks a warp).
The speed of sm80 code cannot be measured on the Hopper GPUs this project is lent (they emulate
s4 MMAs), so this is the estimate the issue asks for.

    python bench/sass_w4a4x.py [--tiles A4X_WIDE,A4X_THIN,A4X_DECODE] [--cuobjdump PATH]
                               [--out bench/results/w4a4x-s4-sass.md]

Needs nvcc and cuobjdump (the CUDA toolkit's, or the nvidia-cuda-cuobjdump wheel's).
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")

# cycles of one warp instruction on an A100 SM sub-partition's pipes (see the module docstring)
TENSOR_CYCLES = {"IMMA.16832.S8.S8": 8, "IMMA.16864.S4.U4": 8}
I2F_CYCLES = 8
FP32_CYCLES = 2


@dataclass
class Part:
    name: str
    ops: collections.Counter

    @property
    def issue(self) -> int:
        return sum(self.ops.values())

    @property
    def tensor(self) -> int:
        return sum(n * TENSOR_CYCLES.get(op, 0) for op, n in self.ops.items())

    @property
    def i2f(self) -> int:
        return sum(n for op, n in self.ops.items() if op.startswith("I2F")) * I2F_CYCLES

    @property
    def fp32(self) -> int:
        return sum(n for op, n in self.ops.items()
                   if op.split(".")[0] in ("FADD", "FMUL", "FFMA")) * FP32_CYCLES


def parse(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of every instruction."""
    out = []
    for line in sass.splitlines():
        m = _LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return out


def _target(operands: str) -> int | None:
    m = re.match(r"(?:`\()?0x([0-9a-f]+)", operands)
    return int(m.group(1), 16) if m else None


def split_loop(insts: list[tuple[int, str, str]]) -> dict[str, Part]:
    """The main loop's parts: the loop is the widest backward BRA whose body holds IMMAs; the s4
    branch runs from after the conditional BRA before its first s4 IMMA to the unconditional
    BRA after its last; that BRA jumps over the s8 branch to the tail."""

    loops = [(t, a) for a, op, rest in insts if op == "BRA" and (t := _target(rest)) is not None
             and t < a and any(o.startswith("IMMA") for b, o, _ in insts if t <= b <= a)]
    if not loops:
        raise ValueError("no main loop (a backward BRA around IMMAs) in this SASS")
    start, back = max(loops, key=lambda r: r[1] - r[0])
    body = [(a, op, rest) for a, op, rest in insts if start <= a <= back]
    s4 = [i for i, (_, op, _) in enumerate(body) if op == "IMMA.16864.S4.U4"]
    if not s4:
        raise ValueError("no s4 IMMA in the main loop: not a w4a4x_s4 kernel?")
    cond = max(i for i in range(s4[0]) if body[i][1] == "BRA")
    jump = min(i for i in range(s4[-1], len(body)) if body[i][1] == "BRA")
    join = _target(body[jump][2])
    j = next(i for i, (a, _, _) in enumerate(body) if a == join)

    def part(name, rows):
        return Part(name, collections.Counter(op for _, op, _ in rows))
    return {"head": part("head", body[:cond + 1]), "s4": part("s4", body[cond + 1:jump + 1]),
            "s8": part("s8", body[jump + 1:j]), "tail": part("tail", body[j:])}


def block_cycles(parts: dict[str, Part], branch: str) -> dict[str, int]:
    """Lower bounds, in clocks of one sub-partition running one warp, of a block on `branch`:
    each pipe's busy time, and the instructions to issue; the block takes at least the max."""
    ps = [parts["head"], parts[branch], parts["tail"]]
    return {"issue": sum(p.issue for p in ps), "tensor": sum(p.tensor for p in ps),
            "i2f": sum(p.i2f for p in ps), "fp32": sum(p.fp32 for p in ps)}


def disassemble(kind: str, cfg, cuobjdump: str) -> str:
    from qcompile.cutlass_templates import build as B
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.cubin"
        job = B._job(kind, cfg, "sm80", Path(tmp), None, None, None)
        cmd = [("-cubin" if c == "-fatbin" else c) for c in B._command(job, out)]
        gencode = [i for i, c in enumerate(cmd) if c == "-gencode"]
        for i in reversed(gencode[1:]):  # SASS only: the PTX embedding adds nothing here
            del cmd[i:i + 2]
        subprocess.run(cmd, check=True, capture_output=True)
        return subprocess.run([cuobjdump, "-sass", str(out)], check=True, capture_output=True,
                              text=True).stdout


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", default="A4X_WIDE,A4X_THIN,A4X_DECODE")
    p.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    from qcompile.cutlass_templates import configs as C
    rows = ["| tile | warp tile | part | instructions | IMMA | I2F | FADD+FMUL |",
            "|---|---|---|---|---|---|---|"]
    est = ["| tile | block | issue | tensor | I2F pipe | FP32 pipe | bound (clk) | s8 / s4 |",
           "|---|---|---|---|---|---|---|---|"]
    for name in a.tiles.split(","):
        cfg = getattr(C, name)
        parts = split_loop(parse(disassemble("w4a4x_s4", cfg, a.cuobjdump)))
        wt = f"{cfg.bm // cfg.warps_m}x{cfg.bn // cfg.warps_n}"
        for part in parts.values():
            o = part.ops
            rows.append(f"| {name} | {wt} | {part.name} | {part.issue} | "
                        f"{sum(v for k, v in o.items() if k.startswith('IMMA'))} | "
                        f"{sum(v for k, v in o.items() if k.startswith('I2F'))} | "
                        f"{sum(v for k, v in o.items() if k.split('.')[0] in ('FADD', 'FMUL'))} |")
        bound = {}
        for branch in ("s8", "s4"):
            c = block_cycles(parts, branch)
            bound[branch] = max(c.values())
        for branch in ("s8", "s4"):
            c = block_cycles(parts, branch)
            est.append(f"| {name} | {branch} | {c['issue']} | {c['tensor']} | {c['i2f']} | "
                       f"{c['fp32']} | {bound[branch]} | "
                       f"{bound['s8'] / bound['s4']:.2f} |" if branch == "s4" else
                       f"| {name} | {branch} | {c['issue']} | {c['tensor']} | {c['i2f']} | "
                       f"{c['fp32']} | {bound[branch]} | |")
    text = ("Main-loop SASS of w4a4x_s4 (sm_80), per 128-channel block and warp:\n\n"
            + "\n".join(rows) + "\n\nClocks a block needs of one A100 sub-partition, lower "
            "bounds per resource (one warp a sub-partition):\n\n" + "\n".join(est) + "\n")
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
