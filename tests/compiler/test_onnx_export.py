"""ONNX export (compiler/onnx_export.py): the file passes onnx.checker, onnxruntime's logits
match the reference path's (the program with the reference ops, `Engine.score`) for fp16 and
W8A8 artifacts in float16, through prefill, batched rows and decode steps that feed the
presents back; int8 GEMMs are MatMulInteger and exact; unsupported input is one line.

Tolerance: the exported graph computes in float32 and rounds to float16 wherever the program
holds a float16 value, and MatMulInteger accumulates in int32 like torch._int_mm, so the only
differences left are float32 summation orders (RMSNorm's mean, the float16 linears' dot
products, attention), each of which can move a result by one float16 rounding. 4 float16
ulps of the largest logit bound that on the tiny model (fp16 measures 1 ulp; W8A8 and W4A8,
whose only float16 linear is the LM head, under 1e-4). On SmolLM2 an int8 or int4 code can
flip and move logits further (bench/results/onnx-export-2026-12-07.md).
"""
import numpy as np
import onnx
import pytest
import torch

from qcompile.compiler.cli import main
from qcompile.compiler.config import CompileConfig

ort = pytest.importorskip("onnxruntime")

CASES = {  # name -> (precision, kv); float16 activations, RTN weights
    "fp16": ("fp16", "fp16"),
    "w8a8": ("w8a8", "int4"),  # int4 KV: the quantize-dequantize, key rotation and centering
    "w4a8-g128": ("w4a8-g128", "int4"),
}


def _config(precision, kv):
    # sm90: without kernels the graph and weights are the same for either target, and these
    # are then test_program_device_free's artifacts (tiny_artifact compiles each once)
    return CompileConfig(target="sm90", precision=precision, kv=kv, dtype="float16",
                         kernels="skip", quantizer="rtn")


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tiny_artifact, tmp_path_factory):
    """(artifact, onnx file, Engine) per case, exported through the CLI."""
    from qcompile.runtime.engine import Engine
    art = tiny_artifact(_config(*CASES[request.param]))
    out = tmp_path_factory.mktemp(f"onnx_{request.param}") / "model.onnx"
    assert main(["export-onnx", str(art), "-o", str(out)]) == 0
    return request.param, out, Engine.load(art)


def _tolerance(ref: np.ndarray) -> float:
    return 4 * 2.0 ** (np.floor(np.log2(np.abs(ref).max())) - 10)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_file_is_valid_and_standard(exported):
    case, path, engine = exported
    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert {n.domain for n in model.graph.node} <= {""}, "a custom domain crept in"
    layers = engine.artifact.model.num_layers
    # 4 a layer, and the LM head (W8A8 by default for integer precisions)
    assert ops.count("MatMulInteger") == (0 if case == "fp16" else 4 * layers + 1)
    sess = _session(path)
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "past_key_values.0.key", "past_key_values.0.value"]
    assert len(names) == 1 + 2 * layers
    assert [i.type for i in sess.get_inputs()[:2]] == ["tensor(int64)", "tensor(float16)"]
    out = sess.get_outputs()
    assert (out[0].name, out[0].type, out[1].name) == ("logits", "tensor(float)",
                                                        "present.0.key")


def test_logits_match_reference(exported):
    """Two rows of 5 tokens, then three decode steps on the presents: every position's
    logits against one reference prefill of the 8 tokens."""
    case, path, engine = exported
    m = engine.artifact.model
    rows = [[5, 17, 42, 99, 7, 3, 120, 64], [200, 1, 33, 8, 150, 77, 2, 250]]
    want = np.stack([x.numpy() for x in engine.score(rows)])  # [2, 8, V]
    sess = _session(path)
    past = {i.name: np.zeros((2, m.num_kv_heads, 0, m.head_dim), np.float16)
            for i in sess.get_inputs()[1:]}
    got, ids = [], np.array(rows)
    out = sess.run(None, {"input_ids": ids[:, :5], **past})
    got.append(out[0])
    for t in range(5, 8):
        past = {o.name.replace("present", "past_key_values"): v
                for o, v in zip(sess.get_outputs()[1:], out[1:])}
        out = sess.run(None, {"input_ids": ids[:, t:t + 1], **past})
        got.append(out[0])
    got = np.concatenate(got, axis=1)
    assert out[1].shape == (2, m.num_kv_heads, 8, m.head_dim)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got - want).max() <= _tolerance(want), (case, np.abs(got - want).max())


def test_matmul_integer_is_exact(tmp_path):
    """aten._int_mm's translation (MatMulInteger) against torch._int_mm at K = 576, with the
    worst-case sums (every product 127 * -127) and random codes."""
    from qcompile.compiler.onnx_lowering import matmul_integer

    class IntMM(torch.nn.Module):
        def forward(self, a, b):
            return torch._int_mm(a, b)

    k, n = 576, 40
    a = torch.randint(-127, 128, (17, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    prog = torch.onnx.export(IntMM().eval(), (a, b), dynamo=True, verbose=False,
                             dynamic_shapes=({0: torch.export.Dim("m", min=1)}, None),
                             custom_translation_table={torch.ops.aten._int_mm.default:
                                                       matmul_integer})
    prog.save(tmp_path / "mm.onnx")
    sess = _session(tmp_path / "mm.onnx")
    for x, w in ((a, b), (torch.full((3, k), 127, dtype=torch.int8),
                          torch.full((k, n), -127, dtype=torch.int8))):
        got = sess.run(None, {"a": x.numpy(), "b": w.numpy()})[0]
        assert np.array_equal(got, torch._int_mm(x, w).numpy())


@pytest.mark.parametrize("precision", ["w8a8", "w4a8", "w4a8-g128"])
def test_gemm_lowering_equals_reference_on_padded_weights(precision):
    """Each GEMM lowering (weights decoded to int8 [K, N] at export) is bitwise the op's
    reference on the kernel's padded buffers, with K and N off the 32 and group multiples."""
    from qcompile.compiler.onnx_lowering import GEMMS
    from qcompile.compiler.schemes import SPECS
    from qcompile.runtime.ops.quant import quant_a8_ref

    spec, n, k = SPECS[precision], 40, 200
    packed = spec.pack_weight(torch.randn(n, k))
    xq, sx, xsum = quant_a8_ref(torch.randn(5, k, dtype=torch.float16))
    bias = torch.randn(n, dtype=torch.float16)
    act = (xq, sx, xsum) if spec.uses_sum else (xq, sx)
    args = (*act, *packed.values(), bias, n, *spec.extra, torch.float16)
    low = GEMMS[spec.op]
    weights = low.weights(args, k)
    ported = tuple(weights.get(i, a) for i, a in enumerate(args))
    assert [w.shape for w in weights.values() if w is not None and w.dtype == torch.int8] == [
        (k, n)]
    assert torch.equal(low.run(*ported), spec.reference(*args))


def test_unsupported_precision_says_what_is(tiny_artifact, tmp_path, capsys):
    art = tiny_artifact(_config("fp8", "int4"))
    capsys.readouterr()
    assert main(["export-onnx", str(art), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--precision fp8" in err
    assert "supported: fp16, w8a8, w4a8, w4a8-g128, w4a8-g64" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("problem", ["no artifact", "output is a folder"])
def test_bad_paths_are_one_line(tmp_path, capsys, problem):
    out = tmp_path / "m.onnx"
    if problem == "output is a folder":
        out.mkdir()
    assert main(["export-onnx", str(tmp_path / "missing"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "qcompile export-onnx: error:" in err
    assert ("no such artifact" if problem == "no artifact" else "is a directory") in err
