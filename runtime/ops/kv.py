"""KV-cache record formats: what one token's keys (or values) look like, and how a cache page
holds them.

A record holds all KV heads of one token as bytes (what the graph's encode op returns for a
step's new tokens), and a page holds BS records' bytes, so the cache is one uint8 tensor
[L, 2, num_blocks, block_size, R] whatever the format and the graph's signature does not
change with `--kv`. Inside a page the bytes are head-major (`PageLayout`): the BS tokens of
kv head 0, then head 1, ..., then (int4) the (scale, min) pairs in the same order, so the
attention kernel's CTA for one kv head reads one contiguous run per page (1 KiB of int4 K
codes for D = 128, BS = 16) and one run of its parameters, instead of 64 bytes out of every
544-byte record and a 4-byte pair from a sector seven other CTAs also read (measured L2-bound,
`bench/results/attention-h100-2026-12-06b.md`).

| format | record layout (R bytes, padded to 16 for 128-bit loads) |
|---|---|
| fp16 | [Hkv, D] in the activation dtype (fp16/bf16/fp32), unquantized |
| int4 | [Hkv, D/2] uint8 codes (low nibble = even d), then [Hkv, 2] fp16 (scale, min) |

int4: per (token, kv head) asymmetric over the head dim, keys after RoPE:
s = (max - min) / 15 and m = min, both rounded to fp16; q = clamp(round((x - m) / s), 0, 15);
x' = q * s + m.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch

_ALIGN = 16


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def kv_record_bytes(fmt: str, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    if fmt == "fp16":
        return _round_up(num_kv_heads * head_dim * dtype.itemsize, _ALIGN)
    if fmt == "int4":
        return _round_up(num_kv_heads * (head_dim // 2 + 4), _ALIGN)
    raise ValueError(f"unknown KV format {fmt!r}; expected fp16 or int4")


def _pad_record(b: torch.Tensor, r: int) -> torch.Tensor:
    return torch.nn.functional.pad(b, (0, r - b.shape[-1])) if r > b.shape[-1] else b


def encode_float(x: torch.Tensor) -> torch.Tensor:
    """[T, Hkv, D] -> [T, R] uint8 (raw bytes of the activation dtype)."""
    t, h, d = x.shape
    b = x.contiguous().view(torch.uint8).reshape(t, h * d * x.dtype.itemsize)
    return _pad_record(b, kv_record_bytes("fp16", h, d, x.dtype))


def decode_float(rec: torch.Tensor, h: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """[..., R] uint8 -> [..., Hkv, D] dtype."""
    n = h * d * dtype.itemsize
    return rec[..., :n].contiguous().view(dtype).reshape(*rec.shape[:-1], h, d)


def encode_int4(x: torch.Tensor) -> torch.Tensor:
    """[T, Hkv, D] -> [T, R] uint8: codes, then (scale, min) as fp16."""
    t, h, d = x.shape
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True).half()
    s = ((xf.amax(dim=-1, keepdim=True) - lo.float()) / 15).half()
    s = torch.where(s > 0, s, torch.full_like(s, 1e-4))  # constant head: any scale works
    q = torch.clamp(torch.round((xf - lo.float()) / s.float()), 0, 15).to(torch.uint8)
    codes = (q[..., 0::2] | (q[..., 1::2] << 4)).reshape(t, h * d // 2)
    params = torch.cat([s, lo], dim=-1).contiguous().view(torch.uint8).reshape(t, h * 4)
    return _pad_record(torch.cat([codes, params], dim=-1), kv_record_bytes("int4", h, d, x.dtype))


def decode_int4(rec: torch.Tensor, h: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    lead = rec.shape[:-1]
    codes = rec[..., : h * d // 2].reshape(*lead, h, d // 2)
    q = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(*lead, h, d).float()
    params = rec[..., h * d // 2: h * d // 2 + 4 * h].contiguous().view(torch.float16)
    params = params.reshape(*lead, h, 2).float()
    return (q * params[..., :1] + params[..., 1:]).to(dtype)


CODECS = {"fp16": (encode_float, decode_float), "int4": (encode_int4, decode_int4)}


@dataclass(frozen=True)
class PageLayout:
    """Head-major bytes of a page [BS, R]:

    | bytes of the page | holds |
    |---|---|
    | [0, H * BS * HB) | [H, BS, HB]: head h, token slot o: its codes (int4) or values |
    | [H * BS * HB, + H * BS * PB) | [H, BS, PB]: int4 (scale, min) fp16 pairs (PB = 4) |
    | rest | zero padding (R is a multiple of 16) |

    A record (the encoders' [T, R]) is [H, HB] then [H, PB]; `to_pages` / `from_pages` move
    records between the two orders."""
    num_kv_heads: int
    head_bytes: int   # HB: one (token, head)'s codes or values
    param_bytes: int  # PB: int4 4 (fp16 scale, fp16 min); fp16 0

    @classmethod
    def of(cls, fmt: str, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> "PageLayout":
        if fmt == "fp16":
            return cls(num_kv_heads, head_dim * dtype.itemsize, 0)
        if fmt == "int4":
            return cls(num_kv_heads, head_dim // 2, 4)
        raise ValueError(f"unknown KV format {fmt!r}; expected fp16 or int4")

    def _regions(self, x: torch.Tensor, bs: int):
        """x [..., BS * R] page bytes -> views [..., H, BS, HB] and [..., H, BS, PB] (or None)."""
        h, hb, pb = self.num_kv_heads, self.head_bytes, self.param_bytes
        lead = x.shape[:-1]
        codes = x[..., : h * bs * hb].view(*lead, h, bs, hb)
        params = x[..., h * bs * hb: h * bs * (hb + pb)].view(*lead, h, bs, pb) if pb else None
        return codes, params

    def to_pages(self, cache: torch.Tensor, recs: torch.Tensor, slots: torch.Tensor) -> None:
        """cache [..., NB, BS, R] <- recs [..., T, R] at slots [T] (page * BS + offset), in
        place; device indices only (no host synchronisation, CUDA-graph capturable)."""
        *lead, nb, bs, r = cache.shape
        h, hb, pb = self.num_kv_heads, self.head_bytes, self.param_bytes
        m = math.prod(lead)  # the leading dims (layers, K / V) as one
        codes, params = self._regions(cache.view(m, nb, bs * r), bs)  # [M, NB, H, BS, *]
        recs = recs.reshape(m, -1, r)
        # one index_put per region, all four indices advanced and adjacent ([M, T, H] of
        # them broadcast): ATen split the old (lead, page, :, off) form into ~16x more kernels
        lead_i = torch.arange(m, device=slots.device)[:, None, None]
        head_i = torch.arange(h, device=slots.device)[None, None, :]
        page, off = (slots // bs)[None, :, None], (slots % bs)[None, :, None]
        idx = (lead_i, page, head_i, off)
        codes[idx] = recs[..., : h * hb].unflatten(-1, (h, hb))
        if params is not None:
            params[idx] = recs[..., h * hb: h * (hb + pb)].unflatten(-1, (h, pb))

    def from_pages(self, pages: torch.Tensor) -> torch.Tensor:
        """pages [..., n, BS, R] -> their records [..., n * BS, R] in token order."""
        *lead, n, bs, r = pages.shape
        h, hb, pb = self.num_kv_heads, self.head_bytes, self.param_bytes
        codes, params = self._regions(pages.reshape(*lead, n, bs * r), bs)
        parts = [codes.transpose(-3, -2).reshape(*lead, n * bs, h * hb)]
        if params is not None:
            parts.append(params.transpose(-3, -2).reshape(*lead, n * bs, h * pb))
        used = h * (hb + pb)
        parts.append(pages.new_zeros(*lead, n * bs, r - used))
        return torch.cat(parts, dim=-1)


def rotate_heads(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """x [T, H, D] @ rotation [D, D] per head, as passes/rotate_kv.py's graph computes it (one
    mm over [T * H, D] in x's dtype); x itself when rotation is None."""
    if rotation is None:
        return x
    return torch.mm(x.reshape(-1, x.shape[-1]), rotation).view(x.shape)


def _encode_pair(fmt: str, k: torch.Tensor, v: torch.Tensor,
                 rotation: torch.Tensor | None = None) -> torch.Tensor:
    enc = CODECS[fmt][0]
    return torch.stack([enc(rotate_heads(k, rotation)), enc(v)])


# rotation (optional, runtime/compiled.py's fast_kv_rotation "kernel" mode): the keys are
# encoded as k @ rotation, the product passes/rotate_kv.py puts before the op, which the
# attention kernels compute in registers (a signed Sylvester Hadamard matrix: they read only
# its first column). None: the keys as they are.
@torch.library.custom_op("qcompile::kv_encode_fp16", mutates_args=())
def kv_encode_fp16(k: torch.Tensor, v: torch.Tensor,
                   rotation: torch.Tensor | None = None) -> torch.Tensor:
    """k, v [T, Hkv, D] -> [2, T, R] uint8 records."""
    return _encode_pair("fp16", k, v, rotation)


@torch.library.custom_op("qcompile::kv_encode_int4", mutates_args=())
def kv_encode_int4(k: torch.Tensor, v: torch.Tensor,
                   rotation: torch.Tensor | None = None) -> torch.Tensor:
    return _encode_pair("int4", k, v, rotation)


def _fake_encode(fmt):
    def fake(k, v, rotation=None):
        r = kv_record_bytes(fmt, k.shape[1], k.shape[2], k.dtype)
        return k.new_empty((2, k.shape[0], r), dtype=torch.uint8)
    return fake


kv_encode_fp16.register_fake(_fake_encode("fp16"))
kv_encode_int4.register_fake(_fake_encode("int4"))

KV_ENCODE_OPS = {
    "fp16": torch.ops.qcompile.kv_encode_fp16.default,
    "int4": torch.ops.qcompile.kv_encode_int4.default,
}
