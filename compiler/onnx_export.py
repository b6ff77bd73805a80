"""Export an artifact's program to ONNX, runnable in onnxruntime on the CPU
(`qcompile export-onnx ARTIFACT -o FILE.onnx`).

The program (models/decoder.py) reads a paged KV cache of uint8 byte records and decodes them
by reinterpreting bytes (`Tensor.view(dtype)`); standard ONNX has no bitcast, so that cache
cannot be expressed as it is. The exported graph takes a typed cache instead, in the layout
of ONNX LLM exports (Optimum, onnxruntime-genai): per layer one tensor of keys and one of
values, which the caller feeds back each step.

| name | shape, dtype | meaning |
|---|---|---|
| input_ids | [B, S] int64 | S new tokens of each of B sequences |
| past_key_values.{i}.key / .value | [B, Hkv, P, D] activation dtype | layer i's cache, P >= 0 |
| logits | [B, S, V] float32 | the logits of every new token |
| present.{i}.key / .value | [B, Hkv, P + S, D] activation dtype | past and new: the next past |

What it covers: token s of every row sits at position P + s, so the rows share one length (no
padding mask, no ragged or paged batch: sequences of different lengths run as separate
calls), and every token's logits are computed. The cache holds what the program's attention
reads after decoding its records: keys after RoPE and, where the artifact rotates or centers
keys (--kv int4), rotated and centered, so it is not interchangeable with another exporter's.
For --kv int4 the graph quantizes each new (token, head) to 4 bits and dequantizes it: the
attention reads the reference's numbers, but the cache is stored decoded, in the activation
dtype. How each qcompile op is expressed, and why float16 programs are exported computing in
float32 with explicit float16 roundings: compiler/onnx_lowering.py. Int8 sums
(MatMulInteger) are torch._int_mm's exactly; what remains is float32 summation order
(attention, RMSNorm's mean, float linears), which can move a value across a float16 rounding
and so flip an int8 or int4 code (bench/results/onnx-export-2026-12-07.md).

torch.onnx's optimizer (onnxscript's rewrite rules) is off: on SmolLM2 W8A8 with KV int4 it
took the export from 90 s to 305 s on 2 cores, for no faster onnxruntime (which folds
constants itself when it loads the file) and a 2% smaller file. The weights are
initializers: one file, or past 2 GB a .data file beside it (torch.onnx's save).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .onnx_lowering import example_args, io_names, load_decoder, matmul_integer

@dataclass
class OnnxExport:
    path: Path
    seconds: float
    bytes: int
    ops: dict[str, int]  # ONNX op type -> count


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's notes that do not concern a qcompile export: torchvision ops it skips
    registering, that the past dims of the cache tensors share their Dim objects, and a
    deprecation inside torch.export's pytree code."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*The axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec",
                                    category=FutureWarning)
            yield
    finally:
        log.setLevel(level)


def export_onnx(artifact, out) -> OnnxExport:
    """Write the artifact's program as ONNX to `out` (weights inside, or past 2 GB in a .data
    file beside it), checked by onnx.checker with full_check (shapes and types inferred too).
    Written in a temporary folder beside `out`, then moved: `out` is never half-written."""
    import onnx
    if importlib.util.find_spec("onnxscript") is None:  # torch.onnx's exporter needs it
        raise ImportError("ONNX export needs onnxscript: pip install onnxscript")
    t0, out = time.perf_counter(), Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a directory; give -o a file name such as model.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    decoder, art = load_decoder(artifact)
    inputs, outputs = io_names(art.model.num_layers)
    batch, seq, past = (torch.export.Dim(n, min=m) for n, m in
                        (("batch", 1), ("sequence", 1), ("past_sequence", 0)))
    dynamic = {"input_ids": {0: batch, 1: seq},
               "past": [{0: batch, 2: past}] * (2 * art.model.num_layers)}
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            decoder.eval(), example_args(art.model, art.compile.torch_dtype), dynamo=True,
            dynamic_shapes=dynamic, input_names=inputs, output_names=outputs,
            custom_translation_table={torch.ops.aten._int_mm.default: matmul_integer},
            verbose=False, optimize=False)  # optimize: see the module docstring
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        program.save(staged)  # external data, if any, beside it: moved with it
        onnx.checker.check_model(staged, full_check=True)
        model = onnx.load(staged, load_external_data=False)
        files = sorted(Path(tmp).iterdir())
        for f in files:
            os.replace(f, out.parent / f.name)
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    size = sum((out.parent / f.name).stat().st_size for f in files)
    return OnnxExport(out, time.perf_counter() - t0, size, ops)
