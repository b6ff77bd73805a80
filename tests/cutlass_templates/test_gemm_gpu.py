"""The CUTLASS GEMM kernels against their PyTorch references on fresh random data, at tile
and group edges, with poisoned outputs, and captured in a CUDA graph.

Needs the kernel table built by `bench/build_kernels.py` (QCOMPILE_KERNEL_DIR points at it,
default build/kernels_sm<major>0)."""

import pytest
import torch

from qcompile.compiler.config import W4A8, W4A8_G128, W8A8
from qcompile.compiler.schemes import GEMM_OPS, GEMM_REFERENCES
from qcompile.passes.swap_gemm import GEMM_FORMATS
from qcompile.runtime.ops import gemm as ref
from qcompile.runtime.ops.quant import quant_a8_ref

pytestmark = pytest.mark.gpu

MS = (1, 3, 16, 17, 127, 129, 1000)
KS = (576, 4096, 14336)
NS = (192, 1536, 4096, 11008)
SCHEMES = {"w8a8": W8A8, "w4a8": W4A8, "w4a8-g128": W4A8_G128}
# the references, called directly on CUDA tensors (exact: float64 accumulation on the GPU)
REFERENCE = GEMM_REFERENCES


@pytest.fixture(scope="module")
def kernels(kernel_dir):
    from qcompile.runtime import gemm_kernels
    gemm_kernels.enable(kernel_dir)
    return gemm_kernels


def _weights(scheme, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    packed = [t.cuda() for t in GEMM_FORMATS[scheme].pack(torch.randn(n, k, generator=g),
                                                          scheme).values()]
    bias = torch.randn(n, generator=g).half().cuda() if seed % 2 else None
    return packed, bias, ((scheme.group_size,) if scheme.group_size else ())


def _acts(scheme, m, k, seed):
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3).half().cuda()
    xq, sx, xsum = quant_a8_ref(x)
    return (xq, sx, xsum) if scheme == W4A8 else (xq, sx)


def _operands(scheme, m, n, k, seed):
    return (_acts(scheme, m, k, seed), *_weights(scheme, n, k, seed))


def _sqnr_db(ref, got):
    return (10 * torch.log10(ref.float().pow(2).sum() / (ref.float() - got.float()).pow(2).sum()
                             .clamp_min(1e-30))).item()


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
def test_kernel_matches_reference(kernels, name, n, k):
    scheme = SCHEMES[name]
    packed, bias, extra = _weights(scheme, n, k, seed=n + k)
    for m in MS:
        head = _acts(scheme, m, k, seed=m)
        want = REFERENCE[scheme](*head, *packed, bias, n, *extra, torch.float16)
        got = GEMM_OPS[scheme](*head, *packed, bias, n, *extra, torch.float16)
        assert kernels.STATS.launches, "the kernel never ran (reference fallback)"
        assert torch.isfinite(got).all()
        # the int32 accumulation is exact; only the fp16 rounding of the result may differ
        assert _sqnr_db(want, got) > 60, f"M={m}"


def test_poisoned_output_is_fully_written(kernels):
    from qcompile.cutlass_templates.configs import select_config
    for m, n, k in [(3, 192, 576), (129, 1536, 4096), (1, 4096, 14336)]:
        head, packed, bias, extra = _operands(W4A8, m, n, k, seed=7)
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        cfg = select_config("w4a8", m, n, k)
        kernel = kernels.active().table.kernels[cfg.name("w4a8")]
        kernels._run("w4a8", (cfg, kernel), head[0], head[1], (head[2], *packed, bias), n,
                     packed[0].shape[1] * 32, out=out)
        want = ref.gemm_w4a8_ref(*head, *packed, bias, n, torch.float16)
        assert not out.isnan().any()
        assert _sqnr_db(want, out) > 60


def test_cuda_graph_capture_and_replay(kernels):
    head, packed, bias, extra = _operands(W4A8_G128, 16, 4096, 4096, seed=3)
    op = GEMM_OPS[W4A8_G128]
    static_x = head[0].clone()
    op(static_x, head[1], *packed, bias, 4096, 128, torch.float16)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(static_x, head[1], *packed, bias, 4096, 128, torch.float16)
    new_x = torch.randint(-127, 128, static_x.shape, dtype=torch.int8, device="cuda")
    static_x.copy_(new_x)
    graph.replay()
    want = op(new_x, head[1], *packed, bias, 4096, 128, torch.float16)
    assert torch.equal(out, want)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_split_k_is_bitwise_unsplit_and_leaves_counters_zero(kernels, name):
    """Every split-K reduction (the separate _reduce launch, the in-kernel fixup and, on sm_90,
    the cluster's distributed shared memory) sums exact int32 parts, so each must equal the
    same tile without split bit for bit, launch after launch (the fixup's arrival counters
    reset themselves)."""
    from qcompile.cutlass_templates.configs import select_config
    scheme, kind = SCHEMES[name], name.replace("-", "_")
    m, n, k = 3, 4096, 14336
    head, packed, bias, _ = _operands(scheme, m, n, k, seed=11)
    k_packed = packed[0].shape[1] * (32 if scheme.weight_bits == 4 else 1)
    cfg = select_config(kind, m, n, k)
    assert cfg.split_k > 1 and cfg.reduce == "separate"
    outs = []
    fix = cfg.with_split(cfg.split_k, "fixup")
    kernel = kernels.active().table.kernels[cfg.name(kind)]
    # the unsplit twin is not in the table: build it (cached; about a second of nvcc)
    from qcompile.cutlass_templates.build import build_kernel
    from qcompile.runtime.launcher import CudaModule
    one = cfg.with_split(1)
    binary = build_kernel(kind, one, f"sm{torch.cuda.get_device_capability()[0]}0")
    unsplit = CudaModule(binary.path).function(one.name(kind))
    unsplit.set_max_dynamic_smem(one.smem_bytes(kind))
    runs = [(one, unsplit), (cfg, kernel), (cfg, kernel), (fix, kernel), (fix, kernel),
            (fix, kernel)]
    clu = cfg.with_split(cfg.split_k, "cluster")
    if kernels.has_clusters(torch.device("cuda")) and clu.fits(kind, k):
        runs += [(clu, kernel), (clu, kernel)]
    for c, kern in runs:
        outs.append(kernels._run(kind, (c, kern), head[0], head[1],
                                 (*head[2:], *packed, bias), n, k_packed))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    torch.cuda.synchronize()
    assert kernels.split_k_flags(torch.device("cuda")).count_nonzero().item() == 0


@pytest.mark.parametrize("name", list(SCHEMES))
def test_raster_bands_cover_every_tile_once(kernels, name):
    """Wide grids walk bands of 8 tile rows (common.cuh tile_origin, from 128 tile columns):
    with 10 tile rows (a full band and a thin one) and 130 tile columns (the last partial)
    every output element is written, and right."""
    from qcompile.cutlass_templates.configs import select_config
    scheme, kind = SCHEMES[name], name.replace("-", "_")
    n, k = 16544, 576
    head, packed, bias, extra = _operands(scheme, 1, n, k, seed=5)
    cfg = select_config(kind, 1157, n, k)
    m = 9 * cfg.bm + 5  # 10 tile rows
    head = _acts(scheme, m, k, seed=6)
    assert cfg.grid(m, n)[:2] == (130, 10)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    k_packed = packed[0].shape[1] * (32 if scheme.weight_bits == 4 else 1)
    kernel = kernels.active().table.kernels[cfg.name(kind)]
    got = kernels._run(kind, (cfg, kernel), head[0], head[1], (*head[2:], *packed, bias), n,
                       k_packed, out=out)
    want = REFERENCE[scheme](*head, *packed, bias, n, *extra, torch.float16)
    assert torch.isfinite(got).all()
    assert _sqnr_db(want, got) > 60
