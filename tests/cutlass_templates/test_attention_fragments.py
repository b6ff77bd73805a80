"""The keys-as-M decode path's register maths (attention_decode.cuh), emulated lane by lane
on the CPU with the PTX fragment layouts of mma.m16n8k16, movmatrix.trans and
ldmatrix.x4.trans: one warp's S^T = K Q^T over 16 keys (with the int4 offset and x16
corrections) and O^T = V^T P^T (the int4 byte interleave, the fp16 transposed loads) must
equal K Q^T and P^T V exactly. It pins the index maths that the GPU tests can only check as a
whole, and runs without a GPU."""
import numpy as np
import pytest


def _mma(c, a, b):
    """c[lane][4] += A B for fragments a[lane][4 half2], b[lane][2 half2] (m16n8k16)."""
    am, bm = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, q = lane >> 2, lane & 3
        for r, (row, col) in enumerate([(g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8),
                                        (g + 8, 2 * q + 8)]):
            am[row, col], am[row, col + 1] = a[lane][r]
        for r, k in enumerate([2 * q, 2 * q + 8]):
            bm[k, g], bm[k + 1, g] = b[lane][r]
    cm = am @ bm
    for lane in range(32):
        g, q = lane >> 2, lane & 3
        for r, (row, col) in enumerate([(g, 2 * q), (g, 2 * q + 1), (g + 8, 2 * q),
                                        (g + 8, 2 * q + 1)]):
            c[lane][r] += cm[row, col]


def _movmatrix_t(vals):
    m = np.zeros((8, 8))
    for lane, (lo, hi) in enumerate(vals):
        m[lane >> 2, 2 * (lane & 3)], m[lane >> 2, 2 * (lane & 3) + 1] = lo, hi
    t = m.T
    return [(t[lane >> 2, 2 * (lane & 3)], t[lane >> 2, 2 * (lane & 3) + 1]) for lane in range(32)]


def _magic(w, mask):  # half2 ((w & mask) | 0x64006400) = (1024 + lo bits, 1024 + hi bits)
    x = w & mask
    return 1024.0 + (x & 0xFFFF), 1024.0 + (x >> 16)


def _byte_perm(x, y, s):
    b = [(x >> 8 * i) & 0xFF for i in range(4)] + [(y >> 8 * i) & 0xFF for i in range(4)]
    return sum(b[(s >> 4 * i) & 0xF] << 8 * i for i in range(4))


def _q_dim(s, kk, q, d, int4):  # paged_attention.cu's q_dim
    if int4:
        return q * (d // 4) + 8 * (s >> 1) + 2 * (s & 1) + (0, 4, 1, 5)[kk]
    return 16 * s + 4 * q + kk


@pytest.mark.parametrize("d", (64, 128))
@pytest.mark.parametrize("int4", (True, False), ids=("int4", "fp16"))
def test_keys_as_m_warp_maths(d, int4):
    rng = np.random.default_rng(d + int4)
    keys, rows = 16, 8
    q_ = rng.standard_normal((rows, d))
    if int4:
        kc, vc = rng.integers(0, 16, (keys, d)), rng.integers(0, 16, (keys, d))
        ks, km, vs, vm = (rng.uniform(lo, hi, keys) for lo, hi in
                          ((0.1, 0.3), (-2, 0), (0.1, 0.3), (-2, 0)))
        k_, v_ = kc * ks[:, None] + km[:, None], vc * vs[:, None] + vm[:, None]
        kb = [[int(c[2 * i]) | int(c[2 * i + 1]) << 4 for i in range(d // 2)] for c in kc]
        vb = [[int(c[2 * i]) | int(c[2 * i + 1]) << 4 for i in range(d // 2)] for c in vc]
        word = lambda b, o: b[o] | b[o + 1] << 8 | b[o + 2] << 16 | b[o + 3] << 24  # noqa: E731
    else:
        k_, v_ = rng.standard_normal((keys, d)), rng.standard_normal((keys, d))
    # Q^T B fragments of row g (int4: x16 slots scaled by 1/16), row sums (load_q_t)
    qb, qs, qm = [[None] * (d // 16) for _ in range(32)], np.zeros(rows), np.zeros(rows)
    for lane in range(32):
        g, q = lane >> 2, lane & 3
        for s in range(d // 16):
            v = [q_[g, _q_dim(s, kk, q, d, int4)] for kk in range(4)]
            qs[g] += sum(v)
            if int4:
                v[2], v[3] = v[2] / 16, v[3] / 16
            qm[g] += 1024 * sum(v)
            qb[lane][s] = [(v[0], v[1]), (v[2], v[3])]
    # S^T (qk_t)
    st = [[0.0] * 4 for _ in range(32)]
    for s in range(d // 16):
        a = []
        for lane in range(32):
            g, q = lane >> 2, lane & 3
            if int4:
                off = q * (d // 8) + 4 * (s >> 1)
                x, y = word(kb[g], off), word(kb[g + 8], off)
                if s & 1:
                    x, y = x >> 8, y >> 8
                a.append([_magic(x, 0x000F000F), _magic(y, 0x000F000F),
                          _magic(x, 0x00F000F0), _magic(y, 0x00F000F0)])
            else:
                d0 = 16 * s + 4 * q
                a.append([(k_[g, d0], k_[g, d0 + 1]), (k_[g + 8, d0], k_[g + 8, d0 + 1]),
                          (k_[g, d0 + 2], k_[g, d0 + 3]), (k_[g + 8, d0 + 2], k_[g + 8, d0 + 3])])
        _mma(st, a, [qb[lane][s] for lane in range(32)])
    logits = np.zeros((keys, rows))
    for lane in range(32):
        g, q = lane >> 2, lane & 3
        for e in range(4):
            key, c = g + 8 * (e >> 1), 2 * q + (e & 1)
            x = st[lane][e]
            logits[key, c] = ks[key] * (x - qm[c]) + km[key] * qs[c] if int4 else x
    np.testing.assert_allclose(logits, k_ @ q_.T, atol=1e-9)
    # P^T B fragments (V scales folded in) by movmatrix, then O^T = V^T P^T (softmax_pv_t)
    p = rng.uniform(0, 1, (keys, rows))
    pk = [_movmatrix_t([(p[g + 8 * hk, 2 * q] * (vs[g + 8 * hk] if int4 else 1),
                         p[g + 8 * hk, 2 * q + 1] * (vs[g + 8 * hk] if int4 else 1))
                        for g, q in ((lane >> 2, lane & 3) for lane in range(32))])
          for hk in range(2)]
    pb = [[pk[0][lane], pk[1][lane]] for lane in range(32)]
    out = np.zeros((rows, d))
    pm = (p * vm[:, None]).sum(0) if int4 else np.zeros(rows)
    for mt in range(d // 16):
        a = []
        for lane in range(32):
            g, q = lane >> 2, lane & 3
            if int4:  # words of keys 2q, 2q+1, 2q+8, 2q+9 at g * D/16 bytes
                w = [word(vb[k], g * (d // 16) + 4 * (mt >> 2)) for k in
                     (2 * q, 2 * q + 1, 2 * q + 8, 2 * q + 9)]
                sel, sh = (0x7632 if (mt >> 1) & 1 else 0x5410), (mt & 1) * 8
                x01, x89 = _byte_perm(w[0], w[1], sel) >> sh, _byte_perm(w[2], w[3], sel) >> sh
                a.append([tuple(h - 1024 for h in _magic(x, m)) for x, m in
                          ((x01, 0x000F000F), (x01, 0x00F000F0), (x89, 0x000F000F),
                           (x89, 0x00F000F0))])
            else:  # ldmatrix.x4.trans: lane l addresses row l & 7 of matrix l >> 3
                regs = []
                for i in range(4):
                    key0, dim0 = 8 * (i >> 1), 16 * mt + 8 * (i & 1)
                    regs.append((v_[key0 + 2 * q, dim0 + g], v_[key0 + 2 * q + 1, dim0 + g]))
                a.append(regs)
        o = [[0.0] * 4 for _ in range(32)]
        _mma(o, a, pb)
        for lane in range(32):
            g, q = lane >> 2, lane & 3
            for e in range(4):
                hh, c = e >> 1, e & 1
                dim = g * (d // 8) + 2 * mt + hh if int4 else 16 * mt + g + 8 * hh  # kt_dim
                out[2 * q + c, dim] = o[lane][e] * (1 / 16 if int4 and hh else 1) + pm[2 * q + c]
    np.testing.assert_allclose(out, p.T @ v_, atol=1e-9)
