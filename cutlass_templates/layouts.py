"""Registry of named weight layouts: those of the scheme rows (compiler/schemes.py), the formats
the INT8 tensor-core GEMM kernels consume, the FP8 baseline's (read by torch._scaled_mm) and
the kernel-less W4A16 baseline format (read by its PyTorch reference only)."""
from __future__ import annotations

from typing import Union

from qcompile.compiler.schemes import QUANTIZED

from .fp8_layout import FP8Layout
from .w4a16_layout import W4A16Layout
from .w4a8_layout import W4Layout
from .w8a8_layout import W8Layout

Layout = Union[W4Layout, W8Layout, W4A16Layout, FP8Layout]

LAYOUTS: dict[str, Layout] = {s.layout.name: s.layout for s in QUANTIZED}


def get_layout(name: str) -> Layout:
    """Look up a layout by name; KeyError lists the known names."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise KeyError(f"unknown layout {name!r}; known layouts: {sorted(LAYOUTS)}") from None
