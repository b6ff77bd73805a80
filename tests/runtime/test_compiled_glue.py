"""runtime/compiled.py's graph edits for the Inductor paths: the key / query rotation as a fast
Walsh-Hadamard transform (`fwht_rotate`, `fast_kv_rotation`) or one dense reduction
(`dense_rotate`) equals the product by the rotation matrix it replaces, and only the matrices
each mode may take are replaced."""
import pytest
import torch

from qcompile.passes.rotate_kv import kv_rotation_matrix
from qcompile.runtime.compiled import (_signed_sylvester, fast_kv_rotation, fwht_rotate,
                                       rotation_mode)


@pytest.mark.parametrize("d", [2, 64, 128])
def test_fwht_is_the_rotation(d):
    h = kv_rotation_matrix(d, seed=3)
    x = torch.randn(37, d, generator=torch.Generator().manual_seed(d))
    assert torch.allclose(fwht_rotate(x, h), x @ h, atol=1e-5)
    # fp16 as the program has it: H rounded to fp16, one rounding of the result
    xh, hh = x.half(), h.half()
    got, want = fwht_rotate(xh, hh).float(), (xh.float() @ hh.float())
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=2e-3, rtol=2e-3)
    assert _signed_sylvester(h) and _signed_sylvester(hh)


def test_only_signed_sylvester_is_replaced(monkeypatch):
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    assert not _signed_sylvester(q)  # orthogonal, not a Hadamard
    assert not _signed_sylvester(torch.eye(64))
    assert not _signed_sylvester(kv_rotation_matrix(64)[:, :32])

    class Two(torch.nn.Module):
        def forward(self, h, r, x):
            return torch.mm(x, h), torch.mm(x, r)
    h, r = kv_rotation_matrix(64), q
    x = torch.randn(5, 64)
    gm = torch.export.export(Two(), (h, r, x)).module()
    want = gm(h, r, x)
    assert fast_kv_rotation(gm, (h, r)) == 0  # off by default (see its docstring)
    monkeypatch.setenv("QCOMPILE_FAST_KV_ROTATION", "1")
    assert fast_kv_rotation(gm, (h, r)) == 1  # h only; x is not a weight
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert fwht_rotate in targets and torch.ops.aten.mm.default in targets
    got = gm(h, r, x)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.equal(got[1], want[1])
    assert fast_kv_rotation(torch.export.export(Two(), (h, r, x)).module(), ()) == 0


def test_dense_rotation_replaces_any_small_square_weight(monkeypatch):
    """QCOMPILE_FAST_KV_ROTATION=dense: every mm by a square weight of at most 256 (here a
    Hadamard and a plain orthogonal matrix) becomes `dense_rotate`, the same product to
    rounding, also under torch.compile; a larger weight keeps its mm."""
    from qcompile.runtime.compiled import dense_rotate
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1)))
    big = torch.randn(300, 300, generator=torch.Generator().manual_seed(2))

    class Three(torch.nn.Module):
        def forward(self, h, r, w, x, y):
            return torch.mm(x.cos(), h), torch.mm(x, r), torch.mm(y, w)
    h = kv_rotation_matrix(64)
    x, y = torch.randn(5, 64), torch.randn(3, 300)
    gm = torch.export.export(Three(), (h, q, big, x, y)).module()
    want = gm(h, q, big, x, y)
    monkeypatch.setenv("QCOMPILE_FAST_KV_ROTATION", "dense")
    assert fast_kv_rotation(gm, (h, q, big)) == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(dense_rotate) == 2 and torch.ops.aten.mm.default in targets
    for got in (gm(h, q, big, x, y), torch.compile(gm)(h, q, big, x, y)):
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))


def test_logits_upcast_dropped():
    """The program's closing float32 cast of the logits goes (the same values in float16);
    a program whose logits are float32 already keeps its graph."""
    from qcompile.runtime.compiled import drop_logits_upcast

    class Head(torch.nn.Module):
        def forward(self, w, x):
            return torch.mm(x, w).float(), x.sum()
    w, x = torch.randn(8, 16).half(), torch.randn(3, 8).half()
    gm = torch.export.export(Head(), (w, x)).module()
    want = gm(w, x)
    assert drop_logits_upcast(gm)
    got = gm(w, x)
    assert got[0].dtype == torch.float16 and torch.equal(got[0].float(), want[0])
    assert torch.equal(got[1], want[1])
    assert not drop_logits_upcast(gm)  # nothing left to drop
    f32 = torch.export.export(Head(), (w.float(), x.float())).module()
    assert not drop_logits_upcast(f32)


def test_rotation_mode(monkeypatch):
    """An engine's rotation: in the kernels where they can, else the program's mm; a
    batch-invariant engine never keeps the mm (its cuBLAS algorithm follows the row count);
    $QCOMPILE_FAST_KV_ROTATION chooses, but not "kernel" for kernels that cannot."""
    from qcompile.runtime import compiled
    monkeypatch.delenv("QCOMPILE_FAST_KV_ROTATION", raising=False)
    monkeypatch.setattr(compiled, "KERNEL_ROTATION_DEFAULT", True)
    assert [rotation_mode(k, inv) for k in (True, False) for inv in (False, True)] == \
        ["kernel", "kernel", "0", "dense"]
    monkeypatch.setenv("QCOMPILE_FAST_KV_ROTATION", "dense")
    assert rotation_mode(True) == "dense"
    monkeypatch.setenv("QCOMPILE_FAST_KV_ROTATION", "kernel")
    assert rotation_mode(False) == "0" and rotation_mode(False, True) == "dense"
    monkeypatch.setenv("QCOMPILE_FAST_KV_ROTATION", "0")
    assert rotation_mode(True) == "0" and rotation_mode(True, True) == "kernel"
    monkeypatch.setattr(compiled, "KERNEL_ROTATION_DEFAULT", False)  # the switch off
    monkeypatch.delenv("QCOMPILE_FAST_KV_ROTATION")
    assert rotation_mode(True) == "0" and rotation_mode(True, True) == "dense"
    monkeypatch.setenv("QCOMPILE_FAST_KV_ROTATION", "fast")
    with pytest.raises(ValueError, match="expected one of 0, 1, dense, kernel"):
        rotation_mode(True)
