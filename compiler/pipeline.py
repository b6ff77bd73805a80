"""The pass pipeline: one ordered list built from the CompileConfig (order and invariants in
passes/README.md)."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from qcompile.passes.base import Lowering, PassResult, run_pass
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.center_keys import center_keys
from qcompile.passes.fuse_rmsnorm_quant import fuse_rmsnorm_quant
from qcompile.passes.fuse_swiglu_quant import fuse_swiglu_quant
from qcompile.passes.rewrite_attention import rewrite_attention
from qcompile.passes.rotate_blocks import rotate_blocks
from qcompile.passes.rotate_kv import rotate_kv
from qcompile.passes.swap_gemm import swap_gemm

from .config import CompileConfig


def build_pipeline(cfg: CompileConfig, quantized: dict | None = None,
                   key_mean: torch.Tensor | None = None, linear_args: dict | None = None,
                   linear_schemes: dict | None = None, input_rotations: dict | None = None
                   ) -> list[Callable[[Lowering], int]]:
    """quantized: integer weights chosen before the passes (GPTQ), by canonical weight name;
    swap_gemm packs them instead of rounding those linears itself. key_mean [L, Hkv * D]: the
    calibrated mean post-RoPE key, needed when cfg centers keys (`--kv-key-centering mean`).
    linear_args: per-linear arguments of the scheme (w4a4: FMPQ's n8), by canonical name.
    linear_schemes: decoder linears in another scheme (`--int8-linears`: W8A8), by name.
    input_rotations: {canonical linear name: H} whose input the graph rotates in blocks at run
    time (FMPQ's `down_rotation`: the weights already hold H's transpose)."""
    if quantized and cfg.scheme is None:
        raise ValueError(f"integer weights given for a float --precision {cfg.precision}")
    if cfg.centers_keys and key_mean is None:
        raise ValueError("--kv-key-centering mean needs the calibrated key means (key_mean); "
                         "compile_checkpoint measures them")
    steps: list[Callable[[Lowering], int]] = [canonicalize]
    if cfg.kv != "fp16":
        steps.append(_named(rewrite_attention, fmt=cfg.kv))
        if cfg.centers_keys:  # before the rotation: it rotates the centered keys
            steps.append(_named(center_keys, key_mean=key_mean))
        if cfg.kv_rotation == "hadamard":
            steps.append(rotate_kv)
    if input_rotations:
        steps.append(_named(rotate_blocks, rotations=input_rotations))
    if cfg.scheme is not None:
        steps += [_named(swap_gemm, scheme=cfg.scheme, quantized=quantized,
                         linear_args=linear_args, head_scheme=cfg.head_scheme,
                         linear_schemes=linear_schemes),
                  fuse_rmsnorm_quant, fuse_swiglu_quant]
    return steps


def _named(fn, **kwargs):
    bound = functools.partial(fn, **kwargs)
    bound.pass_name = fn.__name__
    return bound


def run_pipeline(lowering: Lowering, cfg: CompileConfig, quantized: dict | None = None,
                 key_mean: torch.Tensor | None = None, linear_args: dict | None = None,
                 linear_schemes: dict | None = None,
                 input_rotations: dict | None = None) -> list[PassResult]:
    return [run_pass(step, lowering)
            for step in build_pipeline(cfg, quantized, key_mean, linear_args, linear_schemes,
                                       input_rotations)]
