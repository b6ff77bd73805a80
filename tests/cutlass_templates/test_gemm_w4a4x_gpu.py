"""COMET's W4Ax GEMM kernels (issue 15): W4A8's templates with per-block activation scales
(-DQC_A4X: w4a8_sm80.cu through gemm_sm80.cuh, and the register-A wgmma w4a8_rs_sm90.cu),
bit for bit against `gemm_w4a4x_ref` (each block's int32 partial is exact, scaled and summed
in fp32 in block order, then the shared epilogue), at tile, row and K edges, for every share
of 8-bit blocks, with poisoned outputs and under CUDA-graph replay; each for int8 codes
(kind w4a4x, s8 MMAs: sm90 artifacts) and packed ones (kind w4a4x_s4, s4 MMAs on the 4-bit
blocks: sm80 artifacts, whose sm80 code runs on an H100 too, slowly: correctness only). Needs the kernel table of
bench/build_kernels.py (the mma.sync kinds) and, on sm_90, nvcc (the test builds the wgmma
tiles it launches; cached)."""
import pytest
import torch

from qcompile.compiler.schemes import SPECS
from qcompile.runtime.ops import gemm as ref
from qcompile.runtime.ops.quant import FMPQ_BLOCK, quant_a4x_ref

from test_gemm_gpu import kernels  # noqa: F401  (fixture)

pytestmark = pytest.mark.gpu

SPEC = SPECS["w4a4"]
MS = (1, 3, 16, 17, 77, 129, 300, 1000)
SHAPES = [(192, 4096), (1536, 4096), (4096, 4096), (11008, 4096), (4096, 14336)]


def _weights(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    packed = [t.cuda() for t in SPEC.pack_weight(torch.randn(n, k, generator=g)).values()]
    bias = torch.randn(n, generator=g).half().cuda() if seed % 2 else None
    return packed, bias


def _acts(m, k, n8, seed, pack=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[:, : n8 * FMPQ_BLOCK] *= 8  # the outlier blocks FMPQ keeps in 8 bits
    return quant_a4x_ref(x.half().cuda(), n8, FMPQ_BLOCK, 1000, pack)


def _want(head, packed, bias, n, n8, pack=0):
    return ref.gemm_w4a4x_ref(*head, *packed, bias, n, n8, FMPQ_BLOCK, pack, torch.float16)


KIND = {0: "w4a4x", 1: "w4a4x_s4"}  # x_q int8 codes / packed


def _launches(kernels, kind):  # noqa: F811
    return sum(v for name, v in kernels.STATS.launches.items() if name.startswith(f"qc_{kind}_"))


@pytest.mark.parametrize("pack", [0, 1], ids=KIND.get)
@pytest.mark.parametrize("n,k", SHAPES)
def test_op_is_bitwise_the_reference(kernels, n, k, pack):  # noqa: F811
    """The public op on CUDA tensors: the kernel the table selects (mma.sync, or on sm_90 the
    wgmma tile from M = 257 where the table ships it, int8 codes only), for 0, some and all
    8-bit blocks."""
    packed, bias = _weights(n, k, seed=n + k)
    nb = k // FMPQ_BLOCK
    for m in MS:
        for n8 in (0, nb // 8, nb):
            head = _acts(m, k, n8, seed=m + n8, pack=pack)
            before = _launches(kernels, "w4a4x")
            got = SPEC.op(*head, *packed, bias, n, n8, FMPQ_BLOCK, pack, torch.float16)
            assert _launches(kernels, "w4a4x") > before, "the kernel never ran (reference)"
            want = _want(head, packed, bias, n, n8, pack)
            assert torch.equal(got, want), (m, n8, (got.float() - want.float()).abs().max())


@pytest.mark.parametrize("pack", [0, 1], ids=KIND.get)
def test_poisoned_output_is_fully_written(kernels, pack):  # noqa: F811
    from qcompile.cutlass_templates.configs import select_config
    kind = KIND[pack]
    for m, n, k in [(3, 192, 4096), (129, 1536, 4096), (1, 4096, 14336), (300, 4096, 4096)]:
        packed, bias = _weights(n, k, seed=7)
        head = _acts(m, k, 4, seed=7, pack=pack)
        cfg = select_config(kind, m, n, k)
        kernel = kernels.active().table.kernels[cfg.name(kind)]
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        kernels._run(kind, (cfg, kernel), head[0], head[1], (head[2], *packed, bias), n,
                     packed[0].shape[1] * 32, out=out, k=k, extra=(4,) if pack else ())
        assert not out.isnan().any()
        assert torch.equal(out, _want(head, packed, bias, n, 4, pack))


@pytest.mark.parametrize("pack", [0, 1], ids=KIND.get)
def test_cuda_graph_capture_and_replay(kernels, pack):  # noqa: F811
    n, k, n8 = 4096, 4096, 4
    packed, bias = _weights(n, k, seed=3)
    head = [t.clone() for t in _acts(16, k, n8, seed=3, pack=pack)]
    op = lambda *h: SPEC.op(*h, *packed, bias, n, n8, FMPQ_BLOCK, pack,  # noqa: E731
                            torch.float16)
    op(*head)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(*head)
    new = _acts(16, k, n8, seed=4, pack=pack)
    for static, fresh in zip(head, new):
        static.copy_(fresh)
    graph.replay()
    assert torch.equal(out, _want(new, packed, bias, n, n8, pack))


def test_wrong_operands_say_what_is_wrong(kernels):  # noqa: F811
    packed, bias = _weights(192, 4096, seed=1)
    xq, sx, t = _acts(4, 4096, 2, seed=1)
    with pytest.raises(ValueError, match="s_x: expected shape"):
        SPEC.op(xq, sx[:, :-1].contiguous(), t, *packed, bias, 192, 2, FMPQ_BLOCK, 0,
                torch.float16)
    with pytest.raises(ValueError, match="t: expected dtype"):
        SPEC.op(xq, sx, t.double(), *packed, bias, 192, 2, FMPQ_BLOCK, 0, torch.float16)
    # int8 codes called packed: 4096 bytes would hold 7936 channels, 62 blocks, not s_x's 32
    with pytest.raises(ValueError, match="s_x: expected shape"):
        SPEC.op(xq, sx, t, *packed, bias, 192, 2, FMPQ_BLOCK, 1, torch.float16)


@pytest.fixture(scope="module")
def wgmma_a4x():
    from qcompile.cutlass_templates.build import build_kernel
    from qcompile.cutlass_templates.configs import WGMMA_RS_T64, WGMMA_RS_T64_WIDE
    from qcompile.runtime.launcher import CudaModule
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("wgmma needs an sm_90 GPU")
    out = {}
    for cfg in (WGMMA_RS_T64, WGMMA_RS_T64_WIDE):
        fn = CudaModule(build_kernel("w4a4x_rs_sm90", cfg, "sm90").path).function(
            cfg.name("w4a4x_rs_sm90"))
        fn.set_max_dynamic_smem(cfg.smem_bytes("w4a4x_rs_sm90"))
        out[cfg] = fn
    return out


@pytest.mark.parametrize("m,n,k", [(1, 128, 4096), (77, 1536, 1024), (128, 4096, 4096),
                                   (300, 200, 4096), (1000, 11008, 14336), (4096, 4096, 4096)])
def test_wgmma_tiles_are_bitwise_the_reference(kernels, wgmma_a4x, m, n, k):  # noqa: F811
    packed, bias = _weights(n, k, seed=m + n)
    n8 = k // FMPQ_BLOCK // 8
    head = _acts(m, k, n8, seed=m)
    want = _want(head, packed, bias, n, n8)
    for cfg, fn in wgmma_a4x.items():
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        got = kernels._run("w4a4x_rs_sm90", (cfg, fn), head[0], head[1],
                           (head[2], *packed, bias), n, packed[0].shape[1] * 32, out=out)
        assert torch.equal(got, want), (cfg, (got.float() - want.float()).abs().max())
