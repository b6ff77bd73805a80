"""GPTQ: the algorithm against RTN on the same grid and against a direct implementation of the
paper's update, the Hessians calibration collects, the packing path that ships GPTQ's codes
unchanged, and the QoQ driver with the `gptq` step on a tiny checkpoint."""
import copy
import json

import pytest
import safetensors.torch
import dataclasses

import torch
import torch.nn.functional as F

from qcompile.compiler.calibrate import calibrate
from qcompile.compiler.capture import KVSpec, capture
from qcompile.compiler.clip import clip_weight
from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import W4A8, W4A8_G64, W4A8_G128, W4A16_G128, W8A8, CompileConfig
from qcompile.compiler.gptq import gptq_quantize, output_error
from qcompile.compiler.quantize import (W4FloatGroupWeights, W4GroupWeights, W4Weights,
                                        W8Weights, dequantize, quantize_weight)
from qcompile.compiler.qoq import apply_qoq
from qcompile.models.decoder import Decoder, rms_norm
from qcompile.models.loaders import load_checkpoint
from qcompile.passes.base import Lowering, run_pass
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.swap_gemm import GEMM_FORMATS, swap_gemm
from qcompile.runtime.engine import Engine

SCHEMES = [W4A8, W4A8_G128, W4A8_G64, W8A8, W4A16_G128]


def _correlated(k: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs [n, k] with strongly correlated channels (a few latent factors + noise) and
    uneven channel scales, as linear inputs in an LLM."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g)
    return (z + 0.3 * torch.randn(n, k, generator=g)) * torch.rand(k, generator=g).add(0.2)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2 * x.T @ x / x.shape[0]


def _params(qw) -> list[torch.Tensor]:
    if isinstance(qw, W8Weights):
        return [qw.scale]
    if isinstance(qw, (W4Weights, W4FloatGroupWeights)):
        return [qw.scale, qw.zero]
    return [qw.s1, qw.s2, qw.z2]


def _check_ranges(qw) -> None:
    if isinstance(qw, W8Weights):
        assert qw.q.dtype == torch.int8 and int(qw.q.abs().max()) <= 127
        return
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    if isinstance(qw, W4GroupWeights):
        assert int(qw.s2.min()) >= 1 and int(qw.s2.max()) <= 16 and int(qw.z2.max()) <= 15


# ------------------------------------------------------------------------------- algorithm

@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("k", [256, 200])  # 200: a partial last group
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_diagonal_hessian_gives_rtn(scheme, k, act_order):
    """Uncorrelated inputs: no error to feed back, so GPTQ rounds as RTN, bit for bit, in
    either order; a dead input channel (diag 0) gets the weight 0 (its zero point)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, k, generator=g)
    h = torch.diag(torch.rand(k, generator=g, dtype=torch.float64) + 0.1)
    h[5, 5] = 0.0
    got, rtn = gptq_quantize(w, h, scheme, act_order=act_order), quantize_weight(w, scheme)
    assert type(got) is type(rtn)
    for a, b in zip(_params(got), _params(rtn)):
        assert torch.equal(a, b)
    live = torch.arange(k) != 5
    assert torch.equal(got.q[:, live], rtn.q[:, live])
    assert (dequantize(got)[:, 5] == 0).all()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_gptq_beats_rtn_on_correlated_inputs(scheme, act_order):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 320, generator=g)
    h = _hessian(_correlated(320))
    got, rtn = gptq_quantize(w, h, scheme, act_order=act_order), quantize_weight(w, scheme)
    _check_ranges(got)
    for a, b in zip(_params(got), _params(rtn)):  # GPTQ picks codes, never the grid
        assert torch.equal(a, b)
    e_gptq, e_rtn = output_error(w, dequantize(got), h), output_error(w, dequantize(rtn), h)
    assert e_gptq < 0.7 * e_rtn, f"{scheme.name}: GPTQ {e_gptq:.4g} vs RTN {e_rtn:.4g}"


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_never_worse_than_rtn_over_seeds(scheme):
    """The Hessian-weighted error tr(dW H dW^T) of GPTQ is at most RTN's on the same grid,
    for mildly (realistic) to strongly correlated inputs."""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(32, 192, generator=g) * torch.rand(32, 1, generator=g).add(0.1)
        x = _correlated(192, n=512, seed=seed)
        x = x + (1 + 3 * seed) * torch.randn(512, 192, generator=g)  # weaker correlation
        h = _hessian(x)
        e_gptq = output_error(w, dequantize(gptq_quantize(w, h, scheme)), h)
        e_rtn = output_error(w, dequantize(quantize_weight(w, scheme)), h)
        assert e_gptq <= e_rtn, f"{scheme.name} seed {seed}: {e_gptq:.4g} > {e_rtn:.4g}"


def test_act_order_is_natural_order_on_permuted_channels():
    """Per channel (one grid for all columns): act-order's codes are natural-order GPTQ's on
    the input channels sorted by decreasing diag(H), put back in place."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 160, generator=g)
    x = _correlated(160) * torch.rand(160, generator=g).add(0.1) * 3  # uneven channel scales
    h = _hessian(x)
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    act = gptq_quantize(w, h, W4A8, act_order=True)
    natural = gptq_quantize(w[:, order], h[order][:, order], W4A8)
    assert torch.equal(act.q[:, order], natural.q)
    assert not torch.equal(act.q, gptq_quantize(w, h, W4A8).q)


def _gptq_by_the_paper(w, h, scheme, percdamp=0.01):
    """The paper's Algorithm without its two tricks: the inverse Hessian of the free columns
    updated by Gaussian elimination after each column (float64), no Cholesky, no lazy batch."""
    grid = quantize_weight(w, scheme)
    w = w.double().clone()
    h = h.double().clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    out = torch.empty_like(w)
    for j in range(w.shape[1]):
        col = w[:, j].float()
        if isinstance(grid, W8Weights):
            v = torch.clamp(torch.round(col / grid.scale), -127, 127) * grid.scale
        elif isinstance(grid, W4Weights):
            q = torch.clamp(torch.round(col / grid.scale) + grid.zero, 0, 15)
            v = (q - grid.zero) * grid.scale
        else:
            gi = j // grid.group_size
            s2, z2 = grid.s2[:, gi].float(), grid.z2[:, gi].float()
            w8 = torch.clamp(torch.round(col / grid.s1), -119, 119)
            v = (torch.clamp(torch.round(w8 / s2) + z2, 0, 15) - z2) * s2 * grid.s1
        out[:, j] = v.double()
        err = (w[:, j] - out[:, j]) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None]
        hinv -= hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]  # eliminate column j
    return out


@pytest.mark.parametrize("scheme", [W4A8, W4A8_G64], ids=lambda s: s.name)
def test_cholesky_lazy_batch_equals_the_papers_update(scheme):
    """Cholesky rows of H^-1 and lazy block updates (block 64 over K = 200: a partial block)
    are the same algorithm as the per-column Gaussian elimination: the same weights but for
    rare ties flipped by float32 rounding of the updates."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 200, generator=g)
    h = _hessian(_correlated(200))
    got = dequantize(gptq_quantize(w, h, scheme, block=64)).double()
    ref = _gptq_by_the_paper(w, h, scheme)
    same = (got == ref.float().double()) | torch.isclose(got, ref, rtol=1e-5, atol=1e-6)
    assert same.float().mean() > 0.99
    e_got, e_ref = output_error(w, got, h), output_error(w, ref, h)
    assert e_got == pytest.approx(e_ref, rel=0.02)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_grid_comes_from_grid_from(scheme):
    """QoQ passes the clipped weights as grid_from: the grid is RTN's of the clipped weights,
    the target stays the unclipped ones."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 256, generator=g)
    w[3, 10] = 12.0  # an outlier that clipping takes out
    wc = clip_weight(w, torch.full((32,), 0.8), scheme)
    h = _hessian(_correlated(256))
    got = gptq_quantize(w, h, scheme, grid_from=wc)
    for a, b in zip(_params(got), _params(quantize_weight(wc, scheme))):
        assert torch.equal(a, b)
    _check_ranges(got)


def test_input_validation():
    with pytest.raises(ValueError, match="shapes"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6), W4A8)
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(torch.randn(4, 8), torch.full((8, 8), float("nan")), W4A8)
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(torch.randn(4, 8), -torch.eye(8).double(), W4A8)


# ------------------------------------------------------------------------------- Hessians

@pytest.fixture(scope="module")
def ckpt(make_tiny_checkpoint):
    return load_checkpoint(make_tiny_checkpoint("llama"))


def _lowering(ckpt):
    cfg = ckpt.config
    low = Lowering.from_exported(capture(Decoder(cfg, ckpt.weights),
                                         KVSpec.of(cfg, "fp16", 16, torch.float32)))
    run_pass(canonicalize, low)
    return low


@pytest.fixture(scope="module")
def lowering(ckpt):
    """`fresh()` -> `_lowering(ckpt)`, a copy of one cached capture per call (swap_gemm
    rewrites the graph in place; a capture of the tiny decoder takes ~0.5 s on 2 cores)."""
    base = _lowering(ckpt)

    def fresh() -> Lowering:
        return Lowering(copy.deepcopy(base.gm), dict(base.weights), base.inputs,
                        dict(base.origin))
    return fresh


def test_calibration_collects_hessians_on_request(ckpt, lowering):
    cfg, w = ckpt.config, ckpt.weights
    low = lowering()
    seqs = [list(range(5, 45)), list(range(50, 70))]
    plain = calibrate(low, seqs, batch=1, rows_per_batch=8, progress=False)
    assert not plain.xtx
    with pytest.raises(KeyError, match="hessian=True"):
        plain.hessian("layers.0.wqkv")
    st = calibrate(low, seqs, batch=1, rows_per_batch=8, hessian=True, progress=False)
    names = {f"layers.{i}.{n}" for i in range(cfg.num_layers)
             for n in ("wqkv", "wo", "w_gate_up", "w_down")}
    assert names <= set(st.xtx)
    # every token, not the 8-row subsample: the wqkv input of layer 0 is the normed embedding
    x = rms_norm(F.embedding(torch.tensor(seqs[0] + seqs[1]), w["embed"]),
                 w["layers.0.attn_norm"], cfg.rms_norm_eps).double()
    assert st.tokens["layers.0.wqkv"] == 60
    assert st.xtx["layers.0.wqkv"].dtype == torch.float32  # summed in float32 (2 batches)
    assert st.hessian("layers.0.wqkv").dtype == torch.float32  # GPTQ factors in float32
    assert torch.allclose(st.hessian("layers.0.wqkv").double(), 2 * x.T @ x / 60, rtol=1e-4,
                          atol=1e-6)
    assert st.xtx["layers.1.w_down"].shape == (cfg.intermediate_size,) * 2


# -------------------------------------------------------------------------------- packing

def _weight_node(low, canonical):
    ph = next(p for p, path in low.origin.items() if path.removeprefix("top.") == canonical)
    return ph


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_swap_gemm_packs_the_given_integer_weights(ckpt, lowering, scheme):
    """Codes that RTN would not give (GPTQ's, on RTN's grid) reach the packed GEMM weights
    unchanged; the other linears are rounded as before."""
    w = ckpt.weights["layers.1.w_down"].float()
    h = _hessian(_correlated(w.shape[1]))
    qw = gptq_quantize(w, h, scheme)
    rtn = quantize_weight(w, scheme)
    assert not torch.equal(qw.q, rtn.q)  # else the test cannot tell the paths apart
    low, ref = lowering(), lowering()
    ph = _weight_node(low, "layers.1.w_down")
    assert swap_gemm(low, scheme, quantized={"layers.1.w_down": qw}) == 8
    swap_gemm(ref, scheme)
    want = GEMM_FORMATS[scheme].pack(w, scheme, qw)
    for k, v in want.items():
        assert torch.equal(low.weights[f"{ph}_{k}"], v), k
    assert not torch.equal(low.weights[f"{ph}_q"], ref.weights[f"{ph}_q"])
    for name, v in ref.weights.items():  # every other linear: RTN, as without `quantized`
        if not name.startswith(f"{ph}_"):
            assert torch.equal(low.weights[name], v), name


def test_swap_gemm_rejects_weights_it_cannot_use(ckpt, lowering):
    w = ckpt.weights["layers.0.wo"].float()
    with pytest.raises(ValueError, match="did not swap"):
        swap_gemm(lowering(), W4A8, quantized={"layers.0.nope": quantize_weight(w, W4A8)})
    with pytest.raises(ValueError, match="do not fit"):  # wrong scheme
        swap_gemm(lowering(), W4A8, quantized={"layers.0.wo": quantize_weight(w, W8A8)})
    with pytest.raises(ValueError, match="do not fit"):  # wrong group size
        swap_gemm(lowering(), W4A8_G128,
                  quantized={"layers.0.wo": quantize_weight(w, W4A8_G64)})
    with pytest.raises(ValueError, match="do not fit"):  # wrong shape
        swap_gemm(lowering(), W4A8,
                  quantized={"layers.0.wo": quantize_weight(w[:, :32], W4A8)})


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("precision", ["w4a8", "w4a8-g64", "w4a16-g128"])
def test_qoq_with_gptq_compiles_packs_exactly_and_serves(make_tiny_checkpoint, tmp_path,
                                                         precision):
    cfg = CompileConfig(precision=precision, kv="int4", dtype="float32", quantizer="qoq",
                        qoq_steps="smooth_attention,clip,gptq", calib_samples=4,
                        calib_seq_len=64, kernels="skip", int8_linears=0.0)  # every one 4-bit
    src = make_tiny_checkpoint("llama", tie=True)
    ck = load_checkpoint(src)
    weights, quantized, key_mean, report = apply_qoq(ck, cfg, progress=False)
    n = ck.config.num_layers
    assert key_mean.shape == (n, ck.config.kv_size)  # from clip's calibration: no second one
    assert set(quantized) == {f"layers.{i}.{lin}" for i in range(n)
                              for lin in ("wqkv", "wo", "w_gate_up", "w_down")}
    for name, qw in quantized.items():  # the float weights are what the codes stand for
        assert torch.equal(weights[name], dequantize(qw))
    rep = report["gptq"]
    assert set(rep["error_vs_rtn"]) == set(quantized)
    assert rep["mean_error_reduction"] > 0 and all(r <= 1.0 for r in rep["error_vs_rtn"].values())
    assert rep["hessian_tokens"] == 4 * 64

    art = compile_model(src, cfg, tmp_path / "art", progress=False)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["qoq"]["steps"] == ["smooth_attention", "clip", "gptq"]
    assert manifest["qoq"]["gptq"]["error_vs_rtn"] == rep["error_vs_rtn"]  # deterministic
    packed = safetensors.torch.load_file(art / "weights.safetensors")
    low = _lowering(ck)  # for the placeholder names of the canonical weights
    fmt = GEMM_FORMATS[cfg.scheme]
    for name, qw in quantized.items():
        ph = _weight_node(low, name)
        for k, v in fmt.pack(weights[name], cfg.scheme, qw).items():
            assert torch.equal(packed[f"{ph}_{k}"], v), (name, k)
    out = Engine.load(art).generate(["the quick brown fox"], max_new_tokens=4)[0]
    assert out.token_ids


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_batched_gptq_equals_one_at_a_time(scheme, act_order):
    """`gptq_quantize_many` (how gptq_weights runs every layer's linear of one kind at once)
    gives each linear the codes GPTQ gives it alone: its own H, grid and act-order."""
    from qcompile.compiler.gptq import gptq_quantize_many
    g = torch.Generator().manual_seed(5)
    ws, hs, grids = [], [], []
    for _ in range(3):
        x = torch.randn(300, 200, generator=g) * torch.rand(200, generator=g) * 3
        x[:, 7] = 0  # a dead channel
        ws.append(torch.randn(24, 200, generator=g))
        grids.append(ws[-1] * 0.9)
        hs.append((2 * x.T.double() @ x.double() / 300))
    many = gptq_quantize_many(ws, hs, scheme, grid_from=grids, act_order=act_order)
    for w, h, grid, got in zip(ws, hs, grids, many):
        want = gptq_quantize(w, h, scheme, grid_from=grid, act_order=act_order)
        assert type(got) is type(want)
        same = (got.q == want.q).float().mean()
        assert same > 0.999, float(same)  # float summation order may flip a rare tie
        for f in dataclasses.fields(want):
            a, b = getattr(got, f.name), getattr(want, f.name)
            if f.name != "q":
                assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b
