import itertools

import pytest
import torch

from qcompile.cutlass_templates.layouts import LAYOUTS, get_layout
from qcompile.cutlass_templates.w4a16_layout import dequantize_packed, unpack_codes, w4a16_layout
from qcompile.cutlass_templates.w4a8_layout import (
    W4A8_PER_CHANNEL,
    check_group_codes,
    pack_group_params,
    pack_w4,
    unpack_group_params,
    unpack_w4,
    w4a8_group_layout,
)
from qcompile.cutlass_templates.w8a8_layout import W8A8_ROW_MAJOR

NS = [1, 31, 32, 33, 192, 576]
KS = [32, 64, 576, 1536]
W4_LAYOUTS = [W4A8_PER_CHANNEL, w4a8_group_layout(64), w4a8_group_layout(128)]


def _rand_q(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)


def _ref_coord(lane, word, byte, nibble):
    """Spec: lane 4c+f, word 2a+r, byte i, nibble h -> (n, k) inside a 32x32 tile."""
    c, f = divmod(lane, 4)
    a, r = divmod(word, 2)
    return c + 8 * a + 16 * nibble, 16 * r + 4 * f + byte


def test_registry():
    assert set(LAYOUTS) == {"w4a8_pc_sm80", "w4a8_g64_sm80", "w4a8_g128_sm80", "w8a8_rm",
                            "w4a16_g128_rm", "fp8_rm"}
    assert get_layout("w4a8_g128_sm80").k_multiple == 128
    with pytest.raises(KeyError, match="w8a8_rm"):
        get_layout("nope")


@pytest.mark.parametrize("layout", W4_LAYOUTS, ids=lambda l: l.name)
@pytest.mark.parametrize("n,k", list(itertools.product(NS, KS)))
def test_w4_round_trip_and_zero_padding(layout, n, k):
    q = _rand_q(n, k, seed=n * 7 + k)
    packed = layout.pack(q)
    np_, kp = layout.padded_shape(n, k)
    assert np_ % 32 == 0 and kp % layout.k_multiple == 0 and np_ >= n and kp >= k
    assert packed.dtype == torch.uint8 and packed.shape == (np_ // 32, kp // 32, 512)
    assert torch.equal(layout.unpack(packed, n, k), q)
    full = unpack_w4(packed, np_, kp)
    assert not full[n:].any() and not full[:, k:].any()


def test_group_padding_example():
    assert w4a8_group_layout(128).padded_shape(576, 576) == (576, 640)
    assert w4a8_group_layout(64).padded_shape(33, 576) == (64, 576)


def test_fragment_order_reference_loop():
    q = _rand_q(64, 96, seed=1)  # 2 x 3 tiles
    packed = pack_w4(q)
    for nt, kt in [(0, 0), (1, 2)]:
        tile = packed[nt, kt].tolist()
        for lane, word, byte in itertools.product(range(32), range(4), range(4)):
            b = tile[16 * lane + 4 * word + byte]
            for nibble, val in enumerate((b & 0xF, b >> 4)):
                n, k = _ref_coord(lane, word, byte, nibble)
                assert val == q[32 * nt + n, 32 * kt + k], (nt, kt, lane, word, byte, nibble)


def _ref_tables():
    """n/k inside a tile for [lane, word, nibble, byte] and the n8-tile index j."""
    n_idx = torch.empty(32, 4, 2, 4, dtype=torch.long)
    k_idx = torch.empty_like(n_idx)
    for lane, word, nibble, byte in itertools.product(range(32), range(4), range(2), range(4)):
        n_idx[lane, word, nibble, byte], k_idx[lane, word, nibble, byte] = _ref_coord(lane, word, byte, nibble)
    # The lane's param word holds rows [c, c+8, c+16, c+24]; row c+8a+16h is byte a+2h.
    j_idx = torch.tensor([[[4 * (lane // 4) + word // 2 + 2 * h for h in range(2)] for word in range(4)]
                          for lane in range(32)])  # [lane, word, nibble]
    return n_idx, k_idx, j_idx


def _simulate_kernel_dequant(packed, s2p, negzsp, group_size):
    """Emulate the kernel: 128-bit load, LOP3 unpack, then per 32-bit register one IMAD
    (q * s2 + zero_word) and one XOR 0x80808080 (w4a8_sm80.cu W4Operand::zero_word)."""
    nt, kt, _ = packed.shape
    n_idx, k_idx, j_idx = _ref_tables()
    by = packed.view(nt, kt, 32, 4, 4).to(torch.int64)  # [Nt, Kt, lane, word, byte]
    words = (by << (8 * torch.arange(4))).sum(-1)  # little-endian u32
    nib = torch.stack((words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F), dim=-1)  # [.., word, h]
    grp = torch.arange(kt) * 32 // group_size  # group of each K tile
    s2 = s2p[grp].transpose(0, 1)[:, :, j_idx].to(torch.int64)  # [Nt, Kt, lane, word, h]
    nz = negzsp[grp].transpose(0, 1)[:, :, j_idx].to(torch.int64)
    zero_word = (0x80808080 - ((-nz) & 0xFF) * 0x01010101) & 0xFFFFFFFF
    reg = ((nib * s2 + zero_word) & 0xFFFFFFFF) ^ 0x80808080  # uint32 arithmetic
    out_bytes = (reg.unsqueeze(-1) >> (8 * torch.arange(4))) & 0xFF
    w8 = out_bytes.to(torch.uint8).view(torch.int8)  # [Nt, Kt, lane, word, h, byte]
    full = torch.zeros(nt * 32, kt * 32, dtype=torch.int8)
    rows = torch.arange(nt).view(nt, 1, 1, 1, 1, 1) * 32 + n_idx
    cols = torch.arange(kt).view(1, kt, 1, 1, 1, 1) * 32 + k_idx
    full[rows, cols] = w8
    return full


def _valid_group_codes(n, kp, group_size, seed):
    """Random s2 (1..16), z2 (0..15) and codes q with every (q - z2) * s2 in [-128, 127],
    extremes included."""
    gen = torch.Generator().manual_seed(seed)
    s2 = torch.randint(1, 17, (n, kp // group_size), generator=gen, dtype=torch.uint8)
    z2 = torch.randint(0, 16, (n, kp // group_size), generator=gen, dtype=torch.uint8)
    s2f = s2.to(torch.int32).repeat_interleave(group_size, dim=1)
    z2f = z2.to(torch.int32).repeat_interleave(group_size, dim=1)
    lo = torch.clamp(z2f - torch.div(128, s2f, rounding_mode="floor"), min=0)
    hi = torch.clamp(z2f + torch.div(127, s2f, rounding_mode="floor"), max=15)
    u = torch.rand(n, kp, generator=gen)
    u[:, ::7], u[:, 3::7] = 0.0, 1.0  # hit both ends of the valid range
    q = (lo + torch.floor(u * (hi - lo + 1)).clamp(max=(hi - lo).float())).to(torch.uint8)
    return q, s2, z2


@pytest.mark.parametrize("n,k,group_size", [(33, 576, 128), (96, 256, 64), (64, 128, 128)])
def test_simulated_kernel_dequant(n, k, group_size):
    layout = w4a8_group_layout(group_size)
    kp = layout.padded_shape(n, k)[1]
    q, s2, z2 = _valid_group_codes(n, kp, group_size, seed=3)
    q = q[:, :k]
    check_group_codes(q, s2, z2, group_size)
    s2p, nzp = pack_group_params(s2, z2)
    got = _simulate_kernel_dequant(layout.pack(q), s2p, nzp, group_size)[:n, :k].to(torch.int32)
    s2_full = s2.to(torch.int32).repeat_interleave(group_size, dim=1)[:, :k]
    z2_full = z2.to(torch.int32).repeat_interleave(group_size, dim=1)[:, :k]
    want = (q.to(torch.int32) - z2_full) * s2_full
    assert int(want.min()) <= -112 and int(want.max()) >= 112  # near both int8 ends
    assert torch.equal(got, want)


def test_group_codes_outside_int8_are_refused():
    q = torch.full((2, 128), 15, dtype=torch.uint8)
    s2 = torch.full((2, 1), 16, dtype=torch.uint8)
    z2 = torch.zeros(2, 1, dtype=torch.uint8)  # (15 - 0) * 16 = 240
    with pytest.raises(ValueError, match=r"outside int8.*240.*\[-128, 127\]"):
        check_group_codes(q, s2, z2, 128)
    z2[:] = 7  # (15 - 7) * 16 = 128: still one too many
    with pytest.raises(ValueError, match="outside int8"):
        check_group_codes(q, s2, z2, 128)
    z2[:] = 8  # 112 .. -128
    check_group_codes(q, s2, z2, 128)
    check_group_codes(torch.zeros_like(q), s2, z2, 128)


@pytest.mark.parametrize("n,g", [(1, 1), (31, 3), (33, 5), (576, 12)])
def test_group_params_round_trip(n, g):
    gen = torch.Generator().manual_seed(n + g)
    s2 = torch.randint(1, 17, (n, g), generator=gen, dtype=torch.uint8)
    z2 = torch.randint(0, 16, (n, g), generator=gen, dtype=torch.uint8)
    s2p, nzp = pack_group_params(s2, z2)
    np_ = -(-n // 32) * 32
    assert s2p.shape == nzp.shape == (g, np_ // 32, 32) and s2p.dtype == nzp.dtype == torch.uint8
    for gi, t, c, j in itertools.product(range(g), range(np_ // 32), range(8), range(4)):
        ch = 32 * t + c + 8 * j
        want_s2 = int(s2[ch, gi]) if ch < n else 0
        want_nz = (-int(z2[ch, gi]) * int(s2[ch, gi])) % 256 if ch < n else 0
        assert (int(s2p[gi, t, 4 * c + j]), int(nzp[gi, t, 4 * c + j])) == (want_s2, want_nz)
    s2_back, z2_back = unpack_group_params(s2p, nzp, n)
    assert torch.equal(s2_back, s2) and torch.equal(z2_back, z2)


@pytest.mark.parametrize("n,k", [(1, 32), (33, 576), (192, 1536)])
def test_w8_round_trip_and_padding(n, k):
    w = torch.randint(-128, 128, (n, k), generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    packed = W8A8_ROW_MAJOR.pack(w)
    np_, kp = W8A8_ROW_MAJOR.padded_shape(n, k)
    assert packed.dtype == torch.int8 and packed.shape == (np_, kp) and np_ % 32 == 0 and kp % 32 == 0
    assert packed.is_contiguous() and not packed[n:].any() and not packed[:, k:].any()
    assert torch.equal(W8A8_ROW_MAJOR.unpack(packed, n, k), w)


def test_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        pack_w4(torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="<= 15"):
        pack_w4(torch.full((4, 4), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_w4(torch.zeros(4, 4, dtype=torch.uint8), k_multiple=48)
    with pytest.raises(ValueError, match="multiple of 32"):
        w4a8_group_layout(48)
    with pytest.raises(ValueError, match="does not fit"):
        unpack_w4(pack_w4(torch.zeros(4, 40, dtype=torch.uint8)), 40, 40)
    with pytest.raises(ValueError, match=">= 1"):
        pack_group_params(torch.zeros(4, 2, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="<= 15"):
        pack_group_params(torch.ones(4, 2, dtype=torch.uint8), torch.full((4, 2), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="int8"):
        W8A8_ROW_MAJOR.pack(torch.zeros(4, 4, dtype=torch.float32))


@pytest.mark.parametrize("n,k", [(1, 32), (33, 576), (192, 200), (64, 1536)])
def test_w4a16_round_trip_and_padding(n, k):
    """Two codes a byte, low nibble = even k; scales/zeros row-major [Np, Kp/g]; padded rows
    dequantize to 0."""
    layout = get_layout("w4a16_g128_rm")
    gen = torch.Generator().manual_seed(n + k)
    q = _rand_q(n, k, seed=n + k)
    groups = -(-k // 128)
    scale = torch.rand(n, groups, generator=gen) + 0.01
    zero = torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.uint8)
    packed = layout.pack(q)
    np_, kp = layout.padded_shape(n, k)
    assert np_ % 32 == 0 and kp % 128 == 0
    assert packed.dtype == torch.uint8 and packed.shape == (np_, kp // 2)
    assert torch.equal(packed[:n, 0] & 0xF, q[:, 0]) and torch.equal(packed[:n, 0] >> 4, q[:, 1])
    assert torch.equal(layout.unpack(packed, n, k), q)
    full = unpack_codes(packed)
    assert full.shape == (np_, kp) and not full[n:].any() and not full[:, k:].any()
    s, z = layout.pack_params(scale, zero)
    assert s.dtype == torch.float16 and z.dtype == torch.uint8 and s.shape == z.shape == (np_, groups)
    assert torch.equal(s[:n], scale.half()) and torch.equal(z[:n], zero)
    w = dequantize_packed(packed, s, z, 128)
    g = torch.arange(k) // 128
    want = (q.float() - zero[:, g].float()) * scale.half().float()[:, g]
    assert torch.equal(w[:n, :k], want) and not w[n:].any()


def test_w4a16_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        get_layout("w4a16_g128_rm").pack(torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="above 15"):
        get_layout("w4a16_g128_rm").pack(torch.full((4, 4), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="even"):
        w4a16_layout(33)
