"""FMPQ before its kernels (issue 15): what 4-bit activations cost SmolLM2-135M, simulated.

    python bench/fmpq_sim.py [--steps rotate,smooth,clip,gptq] [--block 64] [--num-seqs 8]
                             [--sources pydoc,cpython-prose,...] [--out DIR]

The weights are QoQ's W4 per-channel weights exactly as `qcompile --precision w4a8` makes
them (`apply_qoq`: transformed, GPTQ-rounded, dequantized). The float decoder then runs
eagerly on the CPU with the input of every decoder linear fake-quantized per token in one of
the activation modes below (the LM head and the KV cache stay 16-bit in every row, so the
rows differ only in the linears' activations):

| mode | activations of each decoder linear |
|---|---|
| a16 | float (W4A16: the weights' own cost) |
| a8 | int8 per token, symmetric (our W4A8) |
| a4 | int4 per token and block of `--block` channels, symmetric [-7, 7], channels in order |
| a4-sorted | the same with the channels sorted by calibrated max magnitude, so that blocks hold channels of similar range (FMPQ's permutation, with no 8-bit block) |
| fmpq-F | sorted, the first F of the blocks (the largest channels) int8 [-127, 127], the rest int4 |
| budget-F | sorted, F of all blocks int8, spent where int4 costs the most output error (`compiler/fmpq.py`'s `allocate_blocks`: a linear's share may be 0 or all of its blocks) |
| budget-rel-F | the same, the error of each linear relative to its output's energy |

The sort is FMPQ's channel permutation: in the compiled graph it is folded into the producers
(RMSNorm gains and the rows of the previous projection), so it costs nothing at run time; in
this simulation the channels are quantized in sorted order and not moved. Magnitudes come from
a calibration forward of the transformed float model over 8 x 512 tokens of the calibration
text (pydoc after the evaluation split), never a scored window.

Perplexity over `--num-seqs` windows of 512 tokens per source (`runtime/texts.py`); each row
also as the ratio to the a8 row (issue 15's target: FMPQ within 1.10x of W4A8 QoQ on every
source). Tables to stdout and <out>/fmpq-sim.md.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from qcompile.compiler.calibrate import (FloatGraph, _prefill_attention, _prefill_inputs,
                                         calibration_sequences, canonical_name)
from qcompile.compiler.clip import fake_quant_act
from qcompile.compiler.config import CompileConfig
from qcompile.compiler.fmpq import block_rotation, rotate_blocks
from qcompile.compiler.qoq import apply_qoq
from qcompile.models.decoder import Decoder
from qcompile.models.loaders import load_checkpoint
from qcompile.runtime.eval import eval_windows
from qcompile.runtime.ops import ATTENTION_OPS
from qcompile.runtime.ops.quant import quant_a4x_ref
from qcompile.runtime.texts import read_source

LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")


A4_CLIP = 1000  # --a4-clip, per mille: the 4-bit blocks' scale as a share of max |x| / 7


def quant_blocks(x: torch.Tensor, n8: int, block: int) -> torch.Tensor:
    """x [T, K] fake-quantized as FMPQ quantizes it (runtime/ops/quant.py's quant_a4x): per
    token and block of `block` channels, symmetric, the first n8 blocks 8-bit, the rest 4-bit
    (their scale clipped to --a4-clip of the block max)."""
    t, k = x.shape
    xq, s, _ = quant_a4x_ref(x, n8, block, A4_CLIP)
    return (xq.float().reshape(t, k // block, block) * s[..., None]).reshape(t, k).to(x.dtype)


class Plan:
    """How one linear's input is quantized: a channel order, how many of its (leading,
    largest) blocks are 8-bit, and optionally an orthonormal rotation of every block (an
    in-block Hadamard before quantization, its transpose folded into the weight's columns: at
    run time one small matmul a block for an input no offline rotation reaches, w_down's)."""

    def __init__(self, order: torch.Tensor, n8: int, block: int,
                 rot: torch.Tensor | None = None):
        self.order, self.n8, self.block, self.rot = order, n8, block, rot
        self.inverse = torch.argsort(order)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])[:, self.order]
        if self.rot is not None:
            x = rotate_blocks(x, self.rot)
        x = quant_blocks(x, self.n8, self.block)
        if self.rot is not None:
            x = rotate_blocks(x, self.rot.t())
        return x[:, self.inverse].reshape(shape)


def plans(mode: str, absmax: dict[str, torch.Tensor], block: int,
          kinds: tuple[str, ...] = LINEARS, rotated: tuple[str, ...] = ()) -> dict[str, object]:
    """Per linear: a Plan, "a8", or None (float); linears of other `kinds` take a8; those of
    `rotated` kinds rotate their blocks."""
    out = {}
    for name, amax in absmax.items():
        k = amax.numel()
        if name.rsplit(".", 1)[-1] not in kinds:
            out[name] = "a8"
        elif mode == "a16":
            out[name] = None
        elif mode == "a8":
            out[name] = "a8"
        else:
            nb = k // block
            sort = mode != "a4"
            order = torch.argsort(amax, descending=True) if sort else torch.arange(k)
            frac = float(mode.split("-", 1)[1].rstrip("%")) / 100 if mode.startswith("fmpq") \
                else 0.0
            n8 = min(nb, max(1, round(frac * nb))) if frac else 0
            rot = block_rotation(block) if name.rsplit(".", 1)[-1] in rotated else None
            out[name] = Plan(order, n8, block, rot)
    return out


class _Record(TorchFunctionMode):
    """Keeps the first `tokens` rows of every decoder linear's input (calibration forward)."""

    def __init__(self, names: dict[int, str], tokens: int):
        super().__init__()
        self.names, self.tokens, self.inputs = names, tokens, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is ATTENTION_OPS["fp16"]:
            return _prefill_attention(*args, **kwargs)
        if func is F.linear and id(args[1]) in self.names:
            name = self.names[id(args[1])]
            x = args[0].reshape(-1, args[0].shape[-1])
            have = self.inputs.get(name)
            if have is None or len(have) < self.tokens:
                x = x if have is None else torch.cat([have, x])
                self.inputs[name] = x[:self.tokens].detach().float().clone()
        return func(*args, **kwargs)


def budget_plans(fraction: float, absmax, inputs, weights, block: int, kinds,
                 relative: bool = False, rotated: tuple[str, ...] = ()) -> dict:
    """budget-F: every chosen linear's channels sorted by magnitude, F of all their blocks
    int8, allocated by output error (compiler/fmpq.py); budget-rel-F: by relative output
    error (each linear's error over its output's energy). Inputs of `rotated` kinds and
    their weights' columns rotated in blocks first."""
    from qcompile.compiler.fmpq import allocate_blocks, block_errors, channel_order
    orders, errors, rots = {}, {}, {}
    for name, amax in absmax.items():
        if name.rsplit(".", 1)[-1] in kinds:
            orders[name] = order = channel_order(amax)
            rots[name] = rot = block_rotation(block) \
                if name.rsplit(".", 1)[-1] in rotated else None
            x, w = inputs[name][:, order], weights[name].float()[:, order]
            if rot is not None:
                x, w = rotate_blocks(x, rot), rotate_blocks(w, rot)
            errors[name] = block_errors(x, block, w, relative)
    n8 = allocate_blocks(errors, fraction)
    return {name: Plan(orders[name], n8[name], block, rots[name]) if name in orders else "a8"
            for name in absmax}


class _Sim(TorchFunctionMode):
    """Decoder linears' inputs through their plan; attention by the causal prefill path."""

    def __init__(self, names: dict[int, str], plan: dict):
        super().__init__()
        self.names, self.plan = names, plan

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is ATTENTION_OPS["fp16"]:
            return _prefill_attention(*args, **kwargs)
        if func is F.linear and id(args[1]) in self.names:
            p = self.plan.get(self.names[id(args[1])])
            if p == "a8":  # our W4A8's per-token int8, dequantized
                args = (fake_quant_act(args[0], 8).to(args[0].dtype), *args[1:])
            elif p is not None:
                args = (p(args[0]), *args[1:])
        return func(*args, **kwargs)


def perplexity(dec: Decoder, names, plan, windows, kv_shape) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(windows), 4):
        group = windows[i:i + 4]
        args = list(_prefill_inputs(kv_shape, group, "cpu"))
        args[-1] = torch.arange(sum(len(s) for s in group))  # every position's logits
        with torch.no_grad(), _Sim(names, plan):
            logits = dec(*args)[0]
        start = 0
        for seq in group:
            lg = logits[start:start + len(seq)]
            nll += F.cross_entropy(lg[:-1].float(), torch.tensor(seq[1:]), reduction="sum").item()
            count += len(seq) - 1
            start += len(seq)
    return math.exp(nll / count)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="rotate,smooth,clip,gptq", help="QoQ steps of the weights")
    ap.add_argument("--block", type=int, default=64, help="channels per activation block")
    ap.add_argument("--num-seqs", type=int, default=8)
    ap.add_argument("--sources", default="pydoc,cpython-prose,package-readmes,package-licenses")
    ap.add_argument("--modes", default="a16,a8,a4,a4-sorted,fmpq-12.5%,fmpq-25%")
    ap.add_argument("--kinds", default=",".join(LINEARS),
                    help="linear kinds whose inputs take each mode (the others: a8)")
    ap.add_argument("--rotate-kinds", default="",
                    help="linear kinds whose input blocks take an in-block Hadamard (e.g. "
                         "w_down: the one input no offline rotation reaches)")
    ap.add_argument("--a4-clip", type=float, default=1.0,
                    help="the 4-bit blocks' scale as a share of max |x| / 7 (1: no clipping)")
    ap.add_argument("--per-kind", action="store_true",
                    help="each mode on one kind of linear at a time (the others a8)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    global A4_CLIP
    A4_CLIP = round(args.a4_clip * 1000)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(_default_model(), progress=False)
    ccfg = CompileConfig(precision="w4a8", quantizer="qoq", qoq_steps=args.steps,
                         dtype="float32")
    weights, _, _, _ = apply_qoq(ckpt, ccfg, progress=True)
    print(f"QoQ weights ({args.steps}) in {time.perf_counter() - t0:.0f} s", flush=True)
    cfg = ckpt.config
    graph = FloatGraph(cfg)
    seqs = calibration_sequences(ckpt.tokenizer, 8, 512)
    absmax = {k: v for k, v in graph.stats(weights, seqs, progress=False).absmax.items()
              if k.rsplit(".", 1)[-1] in LINEARS}
    dec = Decoder(cfg, {k: v.float() for k, v in weights.items()}, torch.float32)
    names = {id(t): canonical_name(p) for p, t in dec.named_buffers()}
    sources = args.sources.split(",")
    windows = {}
    for s in sources:
        text = None if s == "pydoc" else read_source(s)
        windows[s] = eval_windows(ckpt.tokenizer, args.num_seqs, 512, text, s)
    inputs = {}
    if any(m.startswith("budget") for m in args.modes.split(",")):
        rec = _Record(names, 2048)  # 4 x 512 tokens of the magnitudes' calibration text
        for i in range(2):
            prefill = list(_prefill_inputs(graph.kv_shape, seqs[2 * i:2 * i + 2], "cpu"))
            with torch.no_grad(), rec:
                dec(*prefill)
        inputs = rec.inputs
    rows = {}
    rotated = tuple(k for k in args.rotate_kinds.split(",") if k)
    groups = [(k,) for k in args.kinds.split(",")] if args.per_kind \
        else [tuple(args.kinds.split(","))]
    for mode in args.modes.split(","):
        for kinds in groups if mode not in ("a16", "a8") else groups[:1]:
            label = mode if not args.per_kind or mode in ("a16", "a8") \
                else f"{mode} on {kinds[0]}"
            if mode.startswith("budget"):
                frac = float(mode.rsplit("-", 1)[1].rstrip("%")) / 100
                plan = budget_plans(frac, absmax, inputs, weights, args.block, kinds,
                                    relative=mode.startswith("budget-rel"), rotated=rotated)
                print(mode, "n8 per kind:", {k: sum(p.n8 for n, p in plan.items()
                                                    if isinstance(p, Plan) and n.endswith(k))
                                             for k in kinds}, flush=True)
            else:
                plan = plans(mode, absmax, args.block, kinds, rotated)
            rows[label] = {s: perplexity(dec, names, plan, windows[s], graph.kv_shape)
                           for s in sources}
            print(label, {s: round(v, 2) for s, v in rows[label].items()}, flush=True)
    base = rows.get("a8")
    lines = [f"QoQ weights `{args.steps}` (W4 per channel), KV16, blocks of {args.block}, "
             f"modes on the inputs of {args.kinds}{' one kind at a time' if args.per_kind else ''}"
             " (others a8), "
             + (f"in-block Hadamard on the inputs of {args.rotate_kinds}, " if rotated else "")
             + (f"4-bit scales at {args.a4_clip:g} x max |x| / 7, " if args.a4_clip != 1 else "")
             + f"{args.num_seqs} x 512 tokens per source; ratio to a8 (W4A8) in brackets.", "",
             "| activations | " + " | ".join(sources) + " | worst ratio |",
             "|---|" + "---|" * (len(sources) + 1)]
    for mode, r in rows.items():
        ratios = {s: r[s] / base[s] for s in sources} if base else {}
        cells = [f"{r[s]:.2f}" + (f" ({ratios[s]:.3f}x)" if base else "") for s in sources]
        worst = f"{max(ratios.values()):.3f}x" if base else ""
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {worst} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"fmpq-sim-{args.steps.replace(',', '-') or 'none'}-b{args.block}"
    if args.per_kind:
        stem += "-per-kind"
    elif args.kinds != ",".join(LINEARS):
        stem += "-" + args.kinds.replace(",", "-")
    if rotated:
        stem += "-rot-" + "-".join(rotated)
    if args.a4_clip != 1.0:
        stem += f"-clip{args.a4_clip:g}"
    (out / f"{stem}.md").write_text(table + "\n")
    print(f"wrote {out / stem}.md in {time.perf_counter() - t0:.0f} s")


def _default_model():
    from qcompile.models.default_model import default_model_path
    return default_model_path()


if __name__ == "__main__":
    main()
