"""The Hopper wgmma templates (w8a8_sm90.cu; w4a8_rs_sm90.cu, the weights unpacked into the
register A operand of the transposed problem) against the sm80 kernels and the reference: the
int32 accumulation is exact and the epilogue code is shared, so the kernels must agree bit for
bit, at tile, row and K edges. Needs an sm_90 GPU and nvcc (the test builds the kernels it
launches; cached)."""
import pytest
import torch

from qcompile.compiler.config import W8A8
from qcompile.runtime.ops import gemm as ref

from test_gemm_gpu import _operands, _sqnr_db, kernels  # noqa: F401  (fixture)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def wgmma_kernels():
    from qcompile.cutlass_templates.build import build_kernel
    from qcompile.cutlass_templates.configs import (WGMMA, WGMMA_RS, WGMMA_RS_1WG,
                                                    WGMMA_RS_T64, WGMMA_WIDE)
    from qcompile.runtime.launcher import CudaModule
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("wgmma needs an sm_90 GPU")
    out = {}
    ss, rs = (WGMMA, WGMMA_WIDE), (WGMMA_RS, WGMMA_RS_1WG, WGMMA_RS_T64)
    for kind, cfgs in (("w8a8_sm90", ss), ("w4a8_rs_sm90", rs), ("w4a8_g128_rs_sm90", rs),
                       ("w4a8_g64_rs_sm90", rs[:1])):
        for cfg in cfgs:
            fn = CudaModule(build_kernel(kind, cfg, "sm90").path).function(cfg.name(kind))
            fn.set_max_dynamic_smem(cfg.smem_bytes(kind))
            out[kind, cfg] = fn
    return out


@pytest.mark.parametrize("m,n,k", [(1, 128, 4096), (77, 1536, 576), (128, 4096, 4096),
                                   (300, 200, 4096), (1000, 11008, 14336), (4096, 4096, 4096)])
def test_wgmma_w8a8_is_bitwise_the_sm80_kernel(kernels, wgmma_kernels, m, n, k):  # noqa: F811
    from qcompile.cutlass_templates.configs import select_config
    head, packed, bias, _ = _operands(W8A8, m, n, k, seed=m + n)
    sm80 = select_config("w8a8", m, n, k)
    want = kernels._run("w8a8", (sm80, kernels.active().table.kernels[sm80.name("w8a8")]), head[0],
                        head[1], (*packed, bias), n, packed[0].shape[1])
    assert _sqnr_db(ref.gemm_w8a8_ref(*head, *packed, bias, n, torch.float16), want) > 60
    for (kind, cfg), fn in wgmma_kernels.items():
        if kind != "w8a8_sm90":
            continue
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        got = kernels._run("w8a8_sm90", (cfg, fn), head[0], head[1], (*packed, bias), n,
                           packed[0].shape[1], out=out)
        assert torch.equal(got, want), (cfg, (got.float() - want.float()).abs().max())


def test_w8a8_op_dispatches_to_wgmma_on_sm90(kernels, wgmma_kernels):  # noqa: F811
    """From M = 513 the public op runs the wgmma template (the kernel table, built for sm90 by
    bench/build_kernels.py, ships it) and still equals the reference."""
    from qcompile.compiler.schemes import GEMM_OPS
    m, n, k = 1000, 4096, 4096
    head, packed, bias, _ = _operands(W8A8, m, n, k, seed=3)
    before = sum(v for name, v in kernels.STATS.launches.items() if "w8a8_sm90" in name)
    got = GEMM_OPS[W8A8](*head, *packed, bias, n, torch.float16)
    after = sum(v for name, v in kernels.STATS.launches.items() if "w8a8_sm90" in name)
    assert after == before + 1
    assert _sqnr_db(ref.gemm_w8a8_ref(*head, *packed, bias, n, torch.float16), got) > 60


@pytest.mark.parametrize("m,n,k", [(1, 128, 4096), (77, 1536, 576), (128, 4096, 4096),
                                   (300, 192, 4096), (1000, 11008, 14336), (4096, 4096, 4096)])
def test_wgmma_w4a8_is_bitwise_the_sm80_kernel(kernels, wgmma_kernels, m, n, k):  # noqa: F811
    """The per-channel W4A8 wgmma template unpacks the compute-aware nibble tiles into the
    register A operand of C^T = W X^T (a lane's 16 bytes are two warp slices of A); exact int32
    sums and the shared epilogue: bit for bit the sm80 kernel, for every RS tile."""
    from qcompile.compiler.config import W4A8
    from qcompile.cutlass_templates.configs import select_config
    head, packed, bias, _ = _operands(W4A8, m, n, k, seed=m + n + 1)
    sm80 = select_config("w4a8", m, n, k)
    kp = packed[0].shape[1] * 32
    want = kernels._run("w4a8", (sm80, kernels.active().table.kernels[sm80.name("w4a8")]), head[0],
                        head[1], (head[2], *packed, bias), n, kp)
    assert _sqnr_db(ref.gemm_w4a8_ref(*head, *packed, bias, n, torch.float16), want) > 60
    for (kind, cfg), fn in wgmma_kernels.items():
        if kind != "w4a8_rs_sm90":
            continue
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        got = kernels._run(kind, (cfg, fn), head[0], head[1], (head[2], *packed, bias), n, kp,
                           out=out)
        assert torch.equal(got, want), (cfg, (got.float() - want.float()).abs().max())


@pytest.mark.parametrize("group", [128, 64])
@pytest.mark.parametrize("m,n,k", [(1, 128, 4096), (77, 1536, 576), (300, 192, 4096),
                                   (1000, 11008, 14336), (4096, 4096, 4096)])
def test_wgmma_w4a8_group_is_bitwise_the_sm80_kernel(kernels, wgmma_kernels, m, n, k,  # noqa: F811
                                                     group):
    """Progressive groups: the unpack dequantizes (q - z2) * s2 exactly (one IMAD + XOR per
    four weights, scales from the stage); bit for bit the sm80 group kernel, K = 576 included
    (a partial group, padded to 640)."""
    from qcompile.compiler.config import W4A8_G64, W4A8_G128
    from qcompile.cutlass_templates.configs import select_config
    scheme, base = (W4A8_G128, "w4a8_g128") if group == 128 else (W4A8_G64, "w4a8_g64")
    head, packed, bias, extra = _operands(scheme, m, n, k, seed=m + n + 2)
    sm80 = select_config(base, m, n, k)
    kp = packed[0].shape[1] * 32
    want = kernels._run(base, (sm80, kernels.active().table.kernels[sm80.name(base)]),
                        head[0], head[1], (*packed, bias), n, kp)
    assert _sqnr_db(ref.gemm_w4a8_group_ref(*head, *packed, bias, n, *extra, torch.float16),
                    want) > 60
    tested = 0
    for (kind, cfg), fn in wgmma_kernels.items():
        if kind != base + "_rs_sm90":
            continue
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        got = kernels._run(kind, (cfg, fn), head[0], head[1], (*packed, bias), n, kp, out=out)
        assert torch.equal(got, want), (kind, cfg, (got.float() - want.float()).abs().max())
        tested += 1
    assert tested >= 1
