"""Registry of named weight layouts consumed by the INT8 tensor-core GEMM kernels."""
from __future__ import annotations

from typing import Union

from .w4a8_layout import W4A8_PER_CHANNEL, W4Layout, w4a8_group_layout
from .w8a8_layout import W8A8_ROW_MAJOR, W8Layout

Layout = Union[W4Layout, W8Layout]

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        W4A8_PER_CHANNEL,
        w4a8_group_layout(64),
        w4a8_group_layout(128),
        W8A8_ROW_MAJOR,
    )
}


def get_layout(name: str) -> Layout:
    """Look up a layout by name; KeyError lists the known names."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise KeyError(f"unknown layout {name!r}; known layouts: {sorted(LAYOUTS)}") from None
