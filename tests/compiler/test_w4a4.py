"""COMET's W4A4 (issue 15) compiled end to end on a tiny checkpoint: the `fmpq` step keeps the
float model's function, its 8-bit block counts reach the program's quantizers and GEMMs, the
artifact serves, and a round-to-nearest w4a4 has every block in int4; and `--lm-head w8a8`."""
import json
from collections import Counter

import pytest
import torch

from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import CompileConfig
from qcompile.compiler.fmpq import (CLIP_CANDIDATES, input_rotations, linear_args, model_block,
                                    rotate_blocks)
from qcompile.compiler.qoq import apply_qoq
from qcompile.models.config import ModelConfig
from qcompile.models.loaders import load_checkpoint
from qcompile.runtime.artifact import load_program
from qcompile.runtime.engine import Engine

from test_rotate import logits, rel  # the same logits oracle

OPS = torch.ops.qcompile


@pytest.fixture(scope="module")
def tiny(make_tiny_checkpoint):
    # widths 64 / 128: FMPQ's 64-channel blocks (the default tiny's 96 divides by neither)
    return make_tiny_checkpoint("llama", intermediate_size=128)


def _calls(art, op):
    return [n for n in load_program(art).graph_module.graph.nodes
            if n.op == "call_function" and n.target == op]


def test_fmpq_step_keeps_the_float_model(tiny):
    """rotate + fmpq against rotate alone: the permutations are exact in float, so the
    transformed weights give the same logits; the report's counts fill `fraction` of the
    blocks, each within its linear."""
    ckpt = load_checkpoint(tiny)
    cfg = ckpt.config

    def run(steps, permute="absmax"):
        ccfg = CompileConfig(precision="w4a4", dtype="float32", quantizer="qoq", qoq_steps=steps,
                             calib_samples=4, calib_seq_len=64, fmpq_int8_fraction=0.25,
                             kernels="skip", fmpq_down_rotation="none", fmpq_permute=permute)
        return apply_qoq(ckpt, ccfg, progress=False)

    w_rot, _, keys_rot, _ = run("rotate,smooth")
    w_fmpq, _, keys_fmpq, report = run("rotate,smooth,fmpq")
    err = rel(logits(cfg, w_fmpq), logits(cfg, w_rot))
    assert err < 1e-5, f"fmpq changed the float model's logits: relative error {err:.2e}"
    assert not torch.equal(w_fmpq["layers.0.w_down"], w_rot["layers.0.w_down"])
    fm = report["fmpq"]
    assert fm["block"] == 64 and set(fm["n8"]) == {f"layers.{i}.{k}" for i in range(2)
                                                   for k in ("wqkv", "wo", "w_gate_up",
                                                             "w_down")}
    blocks = {"wqkv": 1, "wo": 1, "w_gate_up": 1, "w_down": 2}  # 64 / 64 / 64 / 128 channels
    assert all(0 <= n <= blocks[name.rsplit(".", 1)[1]] for name, n in fm["n8"].items())
    assert sum(fm["n8"].values()) == round(0.25 * 2 * sum(blocks.values()))
    # the kv heads moved with their keys: the same keys, in the new head order
    assert torch.equal(keys_fmpq.sort(dim=1).values, keys_rot.sort(dim=1).values)
    # the ablation without FMPQ's permutation: the model's own channel order, the budget spent
    w_same, _, keys_same, report = run("rotate,smooth,fmpq", permute="none")
    assert all(torch.equal(w_same[k], w_rot[k]) for k in w_rot) and torch.equal(keys_same,
                                                                                 keys_rot)
    assert sum(report["fmpq"]["n8"].values()) == sum(fm["n8"].values())


def test_w4a4_compiles_and_serves(tiny, tmp_path):
    cfg = CompileConfig(precision="w4a4", kv="int4", dtype="float32", calib_samples=4,
                        calib_seq_len=64, fmpq_int8_fraction=0.5, kernels="skip")
    assert cfg.quantizer == "qoq" and "fmpq" in cfg.steps  # the default recipe
    art = compile_model(tiny, cfg, tmp_path / "art", progress=False)
    manifest = json.loads((art / "manifest.json").read_text())
    n8 = manifest["qoq"]["fmpq"]["n8"]
    # w_down's input rotated in 64-channel blocks at run time (the default)
    assert manifest["qoq"]["fmpq"]["down_rotation"]["block"] == 64
    assert "fmpq_rotation_64" in manifest["program"]["weights"]
    quants, gemms = _calls(art, OPS.quant_a4x.default), _calls(art, OPS.gemm_w4a4x.default)
    assert len(gemms) == 8 and len(quants) == 8  # every decoder linear has its own input
    # each GEMM's (n8, block) is its quantizer's, and together they are the report's counts
    assert Counter(g.args[8] for g in gemms) == Counter(n8.values())
    # the quantizer also takes the linear's 4-bit clip (searched: the default), the GEMM not
    # (the saved program leaves out an argument at its default: clip 1000)
    clips = manifest["qoq"]["fmpq"]["clip"]
    qclips = []
    for g in gemms:
        qargs = g.args[0].args[0].args[1:]
        assert qargs[:2] == (g.args[8], g.args[9]) and g.args[9] == 64
        qclips.append(qargs[2] if len(qargs) > 2 else 1000)
    assert set(qclips) <= set(CLIP_CANDIDATES) and Counter(qclips) == Counter(clips.values())
    out = Engine.load(art).generate(["the quick brown fox"], max_new_tokens=4)[0]
    assert len(out.token_ids) == 4


def test_rtn_w4a4_is_all_int4(tiny, tmp_path):
    cfg = CompileConfig(precision="w4a4", kv="fp16", dtype="float32", quantizer="rtn",
                        kernels="skip")
    art = compile_model(tiny, cfg, tmp_path / "art", progress=False)
    # (n8, block, clip, packed: the default target, sm80, packs the 4-bit blocks)
    assert {q.args[1:] for q in _calls(art, OPS.quant_a4x.default)} == {(0, 64, 1000, 1)}
    assert Engine.load(art).generate(["the quick brown fox"], max_new_tokens=2)[0].token_ids


def test_blocks_and_arguments():
    common = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=5e5,
                  max_position_embeddings=8192)
    llama8b = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_layers=2, num_heads=32, num_kv_heads=8, head_dim=128, **common)
    assert model_block(llama8b) == 128
    args = linear_args(llama8b, {"fmpq": {"n8": {"layers.1.wo": 3}}})
    assert args["layers.1.wo"] == {"n8": 3, "block": 128}
    assert args["layers.0.wqkv"] == {"n8": 0, "block": 128}
    args = linear_args(llama8b, {"fmpq": {"n8": {}, "clip": {"layers.1.wo": 850}}})
    assert args["layers.1.wo"] == {"n8": 0, "block": 128, "clip": 850}
    assert "clip" not in args["layers.0.wo"]
    # sm80 artifacts pack the 4-bit blocks two codes a byte for the s4 MMAs (sm90 has none)
    assert linear_args(llama8b, None, "sm80")["layers.0.wo"] == {"n8": 0, "block": 128,
                                                                 "packed": 1}
    odd = ModelConfig(vocab_size=10, hidden_size=96, intermediate_size=128, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=48, **common)
    with pytest.raises(ValueError, match="not multiples of 128 or 64"):
        model_block(odd)
    with pytest.raises(ValueError, match="fmpq chooses w4a4"):
        CompileConfig(precision="w4a8", quantizer="qoq", qoq_steps="rotate,fmpq")


def test_w8a8_lm_head_compiles_and_serves(tiny, tmp_path):
    """`--lm-head w8a8` on a W4A8 RTN compile: the head is the program's one W8A8 GEMM."""
    cfg = CompileConfig(precision="w4a8", kv="int4", dtype="float32", quantizer="rtn",
                        lm_head="w8a8", kernels="skip")
    art = compile_model(tiny, cfg, tmp_path / "art", progress=False)
    assert len(_calls(art, OPS.gemm_w8a8.default)) == 1
    assert len(_calls(art, OPS.gemm_w4a8.default)) == 8
    assert Engine.load(art).generate(["the quick brown fox"], max_new_tokens=2)[0].token_ids


class _RotateInputs(torch.overrides.TorchFunctionMode):
    """F.linear with a weight of `weights` reads its input rotated in blocks by h (what
    passes/rotate_blocks.py puts in the graph)."""

    def __init__(self, weights, h):
        super().__init__()
        self.ids, self.h = {id(w) for w in weights}, h

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear and id(args[1]) in self.ids:
            args = (rotate_blocks(args[0], self.h), *args[1:])
        return func(*args, **(kwargs or {}))


def test_down_rotation_is_exact_with_the_input_rotated(tiny):
    """fmpq with w_down's input rotated in blocks: w_down holds W B, the report says how to
    rebuild H, and the decoder with its w_down inputs rotated gives the float logits; the
    statistics the later steps read (samples, X^T X) are the rotated input's."""
    from qcompile.models.decoder import Decoder
    ckpt = load_checkpoint(tiny)
    cfg = ckpt.config

    def run(rotation):
        ccfg = CompileConfig(precision="w4a4", dtype="float32", quantizer="qoq",
                             qoq_steps="rotate,smooth,fmpq", calib_samples=4, calib_seq_len=64,
                             kernels="skip", fmpq_down_rotation=rotation)
        return apply_qoq(ckpt, ccfg, progress=False)

    w_plain, _, _, rep_plain = run("none")
    w_rot, _, _, rep = run("hadamard")
    assert "down_rotation" not in rep_plain["fmpq"]
    assert rep["fmpq"]["down_rotation"] == {"block": 64, "seed": 1}
    rotations = input_rotations(cfg, rep)
    assert set(rotations) == {f"layers.{i}.w_down" for i in range(cfg.num_layers)}
    h = rotations["layers.0.w_down"]
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)
    for i in range(cfg.num_layers):
        name = f"layers.{i}.w_down"
        assert torch.allclose(w_rot[name], rotate_blocks(w_plain[name], h), atol=1e-6)
    assert input_rotations(cfg, rep_plain) == {}

    dec = Decoder(cfg, w_rot)
    downs = [buf for name, buf in dec.named_buffers() if name.endswith(".w_down")]
    with _RotateInputs(downs, h):
        got = logits(cfg, w_rot, decoder=dec)
    assert rel(got, logits(cfg, w_plain)) < 1e-5
    assert rel(logits(cfg, w_rot), logits(cfg, w_plain)) > 1e-2  # the weights alone differ
