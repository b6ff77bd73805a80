"""`--int8-linears` (compiler/sensitivity.py): the linears where QoQ's 4-bit weights cost the
most stay at W8A8, within the share of the weights asked for; the program has one W8A8 GEMM
per kept linear, its logits are closer to the float model's than all-4-bit, and it serves."""
import json

import pytest
import torch

from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import CompileConfig
from qcompile.compiler.sensitivity import choose_int8, loss_costs
from qcompile.models.loaders import load_checkpoint
from qcompile.runtime.artifact import load_program
from qcompile.runtime.engine import Engine

OPS = torch.ops.qcompile


def _calls(art, op):
    return [n for n in load_program(art).graph_module.graph.nodes
            if n.op == "call_function" and n.target == op]


def test_choose_int8_spends_the_share_on_the_costliest():
    costs = {"a": 0.5, "b": 0.4, "c": 0.3, "d": 0.01}
    sizes = {"a": 60, "b": 30, "c": 10, "d": 100}  # 200 weights
    assert choose_int8(costs, sizes, 0.0) == []
    assert choose_int8(costs, sizes, 0.3) == ["a"]            # 60 of 60
    assert choose_int8(costs, sizes, 0.45) == ["a", "b"]      # 90 of 90
    assert choose_int8(costs, sizes, 0.25) == ["b", "c"]      # a does not fit; b and c do
    assert choose_int8(costs, sizes, 1.0) == ["a", "b", "c", "d"]


def test_int8_linears_options_are_checked():
    with pytest.raises(ValueError, match=r"--int8-linears must be in \[0, 1\]"):
        CompileConfig(precision="w4a8", int8_linears=1.5)
    for kw in (dict(precision="w8a8"), dict(precision="w4a8", quantizer="rtn"),
               dict(precision="w4a8", quantizer="qoq", qoq_steps="rotate,smooth,clip"),
               dict(precision="w4a4")):
        with pytest.raises(ValueError, match="--int8-linears keeps W4A8 linears at W8A8"):
            CompileConfig(int8_linears=0.1, **kw)


def test_default_share_is_the_recipes():
    """None resolves to the measured recipes' share (issue 14's held-out bounds: 0.2
    per-channel, 0.3 g64), 0 where the recipe has no GPTQ or was not measured; an artifact
    older than the option was compiled without it."""
    want = {("w4a8", "auto"): 0.2, ("w4a8-g64", "auto"): 0.3, ("w4a8-g128", "auto"): 0.0,
            ("w4a8", "rtn"): 0.0, ("w8a8", "auto"): 0.0, ("w4a4", "auto"): 0.0,
            ("fp16", "auto"): 0.0}
    for (precision, quantizer), share in want.items():
        assert CompileConfig(precision=precision, quantizer=quantizer).int8_linears == share
    assert CompileConfig(qoq_steps="rotate,smooth,clip").int8_linears == 0.0
    assert CompileConfig(int8_linears=0.0).int8_linears == 0.0
    old = {"precision": "w4a8", "quantizer": "qoq", "qoq_steps": "rotate,smooth,clip,gptq"}
    assert CompileConfig.from_json(old).int8_linears == 0.0
    from qcompile.compiler.cli import build_parser
    assert build_parser().parse_args(["m", "--int8-linears", "0"]).int8_linears == 0.0


@pytest.fixture(scope="module")
def compiled(make_tiny_checkpoint, tiny_artifact, tmp_path_factory):
    """The tiny checkpoint at per-channel W4A8 QoQ, all 4-bit and with 30% kept at 8 bits."""
    tiny = make_tiny_checkpoint("llama")
    out = {}
    for share in (0.0, 0.3):
        cfg = CompileConfig(precision="w4a8", kv="fp16", dtype="float32", kernels="skip",
                            calib_samples=2, calib_seq_len=32, int8_linears=share,
                            lm_head="float")  # its W8A8 GEMMs are the kept linears alone
        out[share] = compile_model(tiny, cfg, tmp_path_factory.mktemp("int8") / "art",
                                   progress=False)
    out["float"] = tiny_artifact(CompileConfig(precision="fp16", kv="fp16", dtype="float32",
                                               kernels="skip"))
    return out


def test_loss_costs_are_the_first_order_loss_change(make_tiny_checkpoint):
    """A gradient check: with one linear moved by a small step, its estimated cost is the
    loss change (the float decoder's loss over two sequences), and the others' are zero."""
    ckpt = load_checkpoint(make_tiny_checkpoint("llama"))
    cfg, w = ckpt.config, {k: v.float() for k, v in ckpt.weights.items()}
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (24, 17)]
    name = "layers.1.w_down"
    step = 1e-3 * torch.randn(w[name].shape, generator=gen)
    moved = {**w, name: w[name] + step}
    costs = loss_costs(cfg, moved, w, seqs)
    assert len(costs) == 8 and all(c == 0 for n, c in costs.items() if n != name)
    loss = lambda weights: _loss(cfg, weights, seqs)  # noqa: E731
    change = loss(moved) - loss(w)
    assert abs(costs[name] - change) < 0.05 * abs(change) + 1e-7, (costs[name], change)


def _loss(cfg, weights, seqs) -> float:
    from qcompile.compiler.calibrate import _prefill_inputs
    from qcompile.compiler.capture import KVSpec
    from qcompile.models.decoder import Decoder
    spec = KVSpec.of(cfg, "fp16", 16, torch.float32)
    args = list(_prefill_inputs((spec.num_layers, 2, 0, spec.block_size, spec.record_bytes),
                                seqs, "cpu"))
    args[-1] = torch.arange(sum(len(s) for s in seqs))
    with torch.no_grad():
        logits, _ = Decoder(cfg, weights, torch.float32)(*args)
    nll, lo = 0.0, 0
    for s in seqs:
        nll += float(torch.nn.functional.cross_entropy(
            logits[lo:lo + len(s) - 1], torch.tensor(s[1:]), reduction="sum"))
        lo += len(s)
    return nll / sum(len(s) - 1 for s in seqs)


def test_kept_linears_are_the_programs_w8a8_gemms(compiled, make_tiny_checkpoint):
    report = json.loads((compiled[0.3] / "manifest.json").read_text())["qoq"]
    kept, cost = report["int8_linears"], report["int4_loss"]
    assert kept and len(cost) == 8  # 2 layers x 4 linears
    sizes = {n: v.numel() for n, v in load_checkpoint(make_tiny_checkpoint("llama"))
             .weights.items() if n in cost}
    assert kept == choose_int8({n: c / sizes[n] for n, c in cost.items()}, sizes, 0.3)
    assert len(_calls(compiled[0.3], OPS.gemm_w8a8.default)) == len(kept)
    assert len(_calls(compiled[0.3], OPS.gemm_w4a8.default)) == 8 - len(kept)
    assert not _calls(compiled[0.0], OPS.gemm_w8a8.default)
    assert "int8_linears" not in json.loads((compiled[0.0] / "manifest.json").read_text())["qoq"]


def test_kept_linears_bring_the_logits_closer_to_float(compiled):
    """Relative logits error against the float artifact, on random token windows: smaller
    with the costliest linears at 8 bits; and the mixed artifact serves."""
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 200, (40,), generator=gen).tolist() for _ in range(4)]
    engines = {k: Engine.load(v) for k, v in compiled.items()}
    logits = {k: torch.cat([x.float() for x in e.score(windows)]) for k, e in engines.items()}

    def err(k):
        return ((logits[k] - logits["float"]).norm() / logits["float"].norm()).item()
    assert err(0.3) < err(0.0), (err(0.3), err(0.0))
    assert engines[0.3].generate(["the quick brown fox"], max_new_tokens=3)[0].token_ids
