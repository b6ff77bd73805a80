"""Registry of named weight layouts: those the INT8 tensor-core GEMM kernels consume, and the
kernel-less W4A16 baseline format (read by its PyTorch reference only)."""
from __future__ import annotations

from typing import Union

from .w4a16_layout import W4A16Layout, w4a16_layout
from .w4a8_layout import W4A8_PER_CHANNEL, W4Layout, w4a8_group_layout
from .w8a8_layout import W8A8_ROW_MAJOR, W8Layout

Layout = Union[W4Layout, W8Layout, W4A16Layout]

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        W4A8_PER_CHANNEL,
        w4a8_group_layout(64),
        w4a8_group_layout(128),
        W8A8_ROW_MAJOR,
        w4a16_layout(128),
    )
}


def get_layout(name: str) -> Layout:
    """Look up a layout by name; KeyError lists the known names."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise KeyError(f"unknown layout {name!r}; known layouts: {sorted(LAYOUTS)}") from None
