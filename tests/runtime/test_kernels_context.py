"""Kernel tables belong to their users (issue 13, item 4): each `gemm_kernels.Kernels` keeps
its table and counts, the ops serve the active one (`using`, `Kernels.wrap`), the process
default serves calls outside any. CPU: the attention lookup needs no GPU, and a stand-in
table has a loaded table's interface (kernel names, a directory)."""
import threading

import torch

from qcompile.cutlass_templates.attention_configs import KIND_OF_FORMAT, AttnConfig
from qcompile.runtime import attention_kernels, gemm_kernels


class _Table:
    def __init__(self, names):
        self.kernels, self.dir = dict.fromkeys(names), "stand-in"


NAME = AttnConfig(64).name(KIND_OF_FORMAT["int4"])


def _find():
    return attention_kernels._find("int4", 64, torch.float16, "attention")


def test_each_user_keeps_its_table_and_counts():
    a = gemm_kernels.Kernels(_Table([NAME]), attention=True)
    b = gemm_kernels.Kernels(_Table([]), attention=True)
    default_before = sum(attention_kernels.STATS.fallbacks.values())
    with gemm_kernels.using(a):
        assert _find() is not None and gemm_kernels.active() is a
        with gemm_kernels.using(b):
            assert _find() is None  # b's table lacks the kernel: the reference, counted in b
            assert gemm_kernels.active() is b
        assert gemm_kernels.active() is a
    assert gemm_kernels.active() is gemm_kernels._DEFAULT
    assert not a.attention.fallbacks
    assert list(b.attention.fallbacks.values()) == [1]
    assert "not in stand-in" in next(iter(b.attention.fallbacks))
    assert sum(attention_kernels.STATS.fallbacks.values()) == default_before


def test_wrap_makes_the_kernels_active_for_the_program_only():
    k = gemm_kernels.Kernels(_Table([NAME]))
    run = k.wrap(lambda x: (gemm_kernels.active(), x))
    assert run(3) == (k, 3)
    assert gemm_kernels.active() is gemm_kernels._DEFAULT


def test_attention_can_be_turned_off_per_user(monkeypatch):
    off = gemm_kernels.Kernels(_Table([NAME]), attention=False)
    with gemm_kernels.using(off):
        assert _find() is None
    assert "turned off" in next(iter(off.attention.fallbacks))
    monkeypatch.setenv("QCOMPILE_ATTENTION", "reference")
    assert not gemm_kernels.Kernels(_Table([NAME])).attention_on


def test_another_thread_starts_from_the_default():
    k, seen = gemm_kernels.Kernels(_Table([NAME])), []
    with gemm_kernels.using(k):
        t = threading.Thread(target=lambda: seen.append(gemm_kernels.active()))
        t.start()
        t.join()
    assert seen == [gemm_kernels._DEFAULT]
