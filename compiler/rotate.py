"""QoQ's rotation step: orthogonal rotations folded into the canonical weights.

The residual stream of a Llama-family decoder carries a few channels with huge magnitudes,
which ruin per-token INT8/INT4 activation quantization. Rotating the stream by a random
orthogonal Hadamard-type matrix R (x -> x R) spreads every channel over all of them, so the
rotated activations have no outlier channel, while the network computes exactly the same
function (R R^T = I). QoQ (QServe) applies R offline, folded into the weights, and rotates the
values of each attention head by a second, per-head Hadamard matrix Rh, folded into v_proj
and o_proj, to smooth the KV4 values.

All functions take and return canonical weights (`qcompile.models.loaders`): a NEW dict is
returned and the input is never modified (tensors a function does not change are shared,
not copied). The math runs in float32; every result keeps the dtype of its input tensor.

* `fold_norms(cfg, w)`: RMSNorm gains into the linears that read them; norms become ones.
  Tied embeddings are untied (`lm_head` = a clone of `embed`) because the final norm's gain
  goes into the head only. The decoder uses `lm_head` whenever it is present, so the
  result runs as is even though `cfg.tie_word_embeddings` still says True.
* `hadamard(n, generator)`: a randomized orthogonal Hadamard matrix diag(s) H / sqrt(n).
* `random_orthogonal(n, generator)`, `rotation_matrix(n, generator)`: the fallback for
  orders with no known construction here (see below).
* `rotate_residual(cfg, w, R)`: x -> x R on the residual stream (needs folded norms).
* `rotate_heads(cfg, w, Rh)`: v -> v Rh per head, undone in o_proj.
* `rotate(cfg, w, seed=0)`: all of the above, deterministic from the seed.

Hadamard orders covered (`hadamard_construction(n)` says how, or None):
  n = 2^a * m, built as kron(P_m, Sylvester(2^a)) with the largest power of two possible,
  where P_m is
  * m = 1: nothing (pure Sylvester: 2, 4, ..., 64, 128, 4096, 8192, ...);
  * Paley I, order m = q + 1 for a prime power q = 3 mod 4 (12: q=11, 20: q=19, 28: q=27,
    44: q=43, 60: q=59, 84: q=83, ...);
  * Paley II, order m = 2 (q + 1) for a prime power q = 1 mod 4 (36: q=17, 52: q=25,
    76: q=37, 100: q=49, 148: q=73, ...).
  This covers every hidden size and head_dim of the supported families: SmolLM2 576 =
  36 * 16, Llama/Mistral 4096, 8192 (Sylvester), 5120 = 20 * 256, Qwen2 896 = 28 * 32,
  1536 = 12 * 128, 2048, 3584 = 28 * 128, head_dim 64, 128 (Sylvester), 80 = 20 * 4,
  96 = 12 * 8. Hadamard matrices exist only for n = 1, 2 and multiples of 4; among those,
  orders that need other constructions (Williamson, ...: e.g. 92, 116, 156, 172, 184) are
  not built here.
  `hadamard` raises ValueError for an order it cannot build; `rotation_matrix` (used by
  `rotate`) then falls back, with a warning, to a Haar-random orthogonal matrix from the QR
  of a Gaussian: still exact (the logits do not change) but its entries are not of equal
  magnitude, so it spreads outliers less evenly.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from qcompile.models.config import ModelConfig

__all__ = ["fold_norms", "hadamard", "hadamard_construction", "random_orthogonal",
           "rotation_matrix", "rotate_residual", "rotate_heads", "rotate"]


# ----------------------------------------------------------------------------- folding

def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def _like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return x.to(ref.dtype).contiguous()


def _norm_names(cfg: ModelConfig) -> list[str]:
    return ([f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in ("attn_norm", "mlp_norm")]
            + ["norm"])


def fold_norms(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold every RMSNorm gain into the columns of the linears that read its output
    (`attn_norm` -> `wqkv`, `mlp_norm` -> `w_gate_up`, `norm` -> `lm_head`) and set the gains
    to ones. `linear(w * n, W) == linear(n, W * w)`, so the function is unchanged (up to
    rounding). Tied embeddings are untied first: `lm_head` = a clone of `embed`."""
    out = dict(weights)
    if "lm_head" not in out:
        out["lm_head"] = out["embed"].clone()
    pairs = [(f"layers.{i}.attn_norm", f"layers.{i}.wqkv") for i in range(cfg.num_layers)]
    pairs += [(f"layers.{i}.mlp_norm", f"layers.{i}.w_gate_up") for i in range(cfg.num_layers)]
    pairs.append(("norm", "lm_head"))
    for norm, lin in pairs:
        g, w = out[norm], out[lin]
        out[lin] = _like(_f32(w) * _f32(g).to(w.device)[None, :], w)
        out[norm] = torch.ones_like(g)
    return out


# ----------------------------------------------------------------------------- matrices

def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    for p in range(2, math.isqrt(q) + 1):
        if q % p == 0:
            k = 0
            while q % p == 0:
                q //= p
                k += 1
            return (p, k) if q == 1 else None
    return q, 1


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficients low -> high, f monic."""
    a = list(a)
    for i in range(len(a) - 1, len(f) - 2, -1):
        c = a[i] % p
        if c:
            for j in range(len(f)):
                a[i - len(f) + 1 + j] = (a[i - len(f) + 1 + j] - c * f[j]) % p
    return [c % p for c in a[:len(f) - 1]] + [0] * max(0, len(f) - 1 - len(a))


def _monic(p: int, deg: int):
    for e in range(p ** deg):
        yield [(e // p ** i) % p for i in range(deg)] + [1]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (trial division)."""
    for f in _monic(p, k):
        if all(any(_poly_mod(f, g, p)) for d in range(1, k // 2 + 1) for g in _monic(p, d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) over GF(q) (chi: quadratic character, chi(0) = 0), float32."""
    p, k = _prime_power(q)
    if k == 1:
        is_sq = torch.zeros(q, dtype=torch.bool)
        is_sq[(torch.arange(1, q) ** 2) % q] = True
        idx = torch.arange(q)
        diff = (idx[:, None] - idx[None, :]) % q
    else:  # GF(p^k) = GF(p)[x] / f; element e <-> its base-p digits (coefficients)
        f = _irreducible(p, k)
        digits = [[(e // p ** i) % p for i in range(k)] for e in range(q)]
        is_sq = torch.zeros(q, dtype=torch.bool)
        for x in digits[1:]:
            sq = [0] * (2 * k - 1)
            for i, a in enumerate(x):
                for j, b in enumerate(x):
                    sq[i + j] += a * b
            r = _poly_mod(sq, f, p)
            is_sq[sum(c * p ** i for i, c in enumerate(r))] = True
        d = torch.tensor(digits)
        place = torch.tensor([p ** i for i in range(k)])
        diff = (((d[:, None, :] - d[None, :, :]) % p) * place).sum(-1)
    chi = torch.where(is_sq, 1.0, -1.0)
    chi[0] = 0.0
    return chi[diff]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 (q = 3 mod 4): I + [[0, 1^T], [-1, Q]]."""
    s = torch.zeros(q + 1, q + 1)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return s + torch.eye(q + 1)


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) (q = 1 mod 4): the conference matrix C = [[0, 1^T], [1, Q]] with
    0 -> [[1, -1], [-1, -1]] and +-1 -> +-[[1, 1], [1, -1]]."""
    c = torch.zeros(q + 1, q + 1)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1), b)


def _plan(n: int) -> tuple[int, str | None, int] | None:
    """(power of two 2^a, 'paley1'/'paley2'/None, q) building order n, or None."""
    if n < 1:
        return None
    a = (n & -n).bit_length() - 1
    for b in range(a, -1, -1):
        m = n >> b
        if m == 1:
            return 1 << b, None, 0
        if m % 4:
            continue
        pp = _prime_power(m - 1)
        if pp and (m - 1) % 4 == 3:
            return 1 << b, "paley1", m - 1
        pp = _prime_power(m // 2 - 1)
        if pp and (m // 2 - 1) % 4 == 1:
            return 1 << b, "paley2", m // 2 - 1
    return None


def hadamard_construction(n: int) -> str | None:
    """How `hadamard(n)` builds its matrix, e.g. 'paley2(q=17, order 36) x sylvester(16)';
    None when it cannot."""
    plan = _plan(n)
    if plan is None:
        return None
    two, kind, q = plan
    if kind is None:
        return f"sylvester({two})"
    order = q + 1 if kind == "paley1" else 2 * (q + 1)
    return f"{kind}(q={q}, order {order}) x sylvester({two})"


@functools.lru_cache(maxsize=8)
def _paley(kind: str, q: int) -> torch.Tensor:
    """The Paley factor (small; cached, never mutate)."""
    return _paley1(q) if kind == "paley1" else _paley2(q)


def _hadamard_pm1(n: int) -> torch.Tensor:
    """An (unnormalized, +-1) Hadamard matrix of order n, float32."""
    plan = _plan(n)
    if plan is None:
        raise ValueError(_unsupported(n))
    two, kind, q = plan
    syl = torch.ones(1, 1)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    for _ in range(two.bit_length() - 1):
        syl = torch.kron(syl, h2)
    if kind is None:
        return syl
    return torch.kron(_paley(kind, q), syl)


def _unsupported(n: int) -> str:
    why = ("Hadamard matrices exist only for orders 1, 2 and multiples of 4" if n < 1 or
           (n > 2 and n % 4) else
           "it is not 2^a times a Paley order (q + 1 for a prime power q = 3 mod 4, or "
           "2(q + 1) for a prime power q = 1 mod 4)")
    return (f"no Hadamard matrix of order n={n} can be built: {why}. Use "
            f"random_orthogonal({n}, generator) (or rotation_matrix, which falls back to it) "
            "for an exact but less even rotation.")


def hadamard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A randomized orthogonal Hadamard matrix [n, n] float32: diag(s) H / sqrt(n) with
    random signs s = +-1 drawn from `generator` (no signs when None). H H^T = I and every
    entry is +-1/sqrt(n). Raises ValueError when n is not covered (module docstring)."""
    h = _hadamard_pm1(n).mul_(1.0 / math.sqrt(n))
    if generator is not None:
        s = torch.randint(0, 2, (n,), generator=generator).to(torch.float32) * 2 - 1
        h.mul_(s[:, None])
    return h


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random orthogonal matrix [n, n] float32: Q of the QR of a Gaussian matrix
    (columns' signs fixed by diag(R)), computed in float64."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(torch.float32)


def rotation_matrix(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`hadamard(n, generator)` when order n is covered, else (with a warning)
    `random_orthogonal(n, generator)`."""
    if _plan(n) is not None:
        return hadamard(n, generator)
    warnings.warn(f"{_unsupported(n).split('. Use')[0]}; using a random orthogonal matrix "
                  "instead (exact, but spreads outliers less evenly)", stacklevel=2)
    return random_orthogonal(n, generator)


def _check_rotation(r: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if tuple(r.shape) != (n, n):
        raise ValueError(f"{what} must be [{n}, {n}], got {list(r.shape)}")
    r = _f32(r)
    # cheap orthogonality probe: an orthogonal map preserves the norm of every vector
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0)).to(r.device)
    err = ((x @ r).norm(dim=1) / x.norm(dim=1) - 1).abs().max().item()
    if err > 1e-3:
        raise ValueError(f"{what} is not orthogonal (changes vector norms by {err:.1e})")
    return r


# ----------------------------------------------------------------------------- rotations

def rotate_residual(cfg: ModelConfig, weights: dict[str, torch.Tensor],
                    R: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rotate the residual stream: x -> x R for an orthogonal R [H, H].

    `embed <- embed R`; readers of the stream (y = x W^T: `wqkv`, `w_gate_up`, `lm_head`)
    get `W <- W R` (their biases are unchanged); writers into it (`wo`, `w_down`) get
    `W <- R^T W`. A tied head (no `lm_head`) reads `embed`, which rotates consistently.
    RMSNorm(x R) == RMSNorm(x) R only for all-ones gains: run `fold_norms` first; norms that
    are not all ones are refused with ValueError."""
    bad = [n for n in _norm_names(cfg) if not bool((weights[n] == 1).all())]
    if bad:
        raise ValueError(f"rotate_residual needs folded RMSNorm weights (all ones), but "
                         f"{len(bad)} are not (e.g. {', '.join(bad[:3])}): run "
                         "fold_norms(cfg, weights) first")
    R = _check_rotation(R, cfg.hidden_size, "R")
    out = dict(weights)

    def read(name):  # W [out, H] -> W R
        w = out[name]
        out[name] = _like(_f32(w) @ R.to(w.device), w)

    def write(name):  # W [H, in] -> R^T W
        w = out[name]
        out[name] = _like(R.to(w.device).T @ _f32(w), w)

    read("embed")  # embed [V, H]: each row is a residual vector, x -> x R
    if "lm_head" in out:
        read("lm_head")
    for i in range(cfg.num_layers):
        read(f"layers.{i}.wqkv")
        read(f"layers.{i}.w_gate_up")
        write(f"layers.{i}.wo")
        write(f"layers.{i}.w_down")
    return out


def rotate_heads(cfg: ModelConfig, weights: dict[str, torch.Tensor],
                 Rh: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rotate the values of every head: v_h -> v_h Rh for an orthogonal Rh [D, D].

    The v rows of each kv head j become `Rh^T W_v,j` (bias `b_v,j Rh`); attention output
    is linear in V, so query head h (reading kv head h // (Hq / Hkv)) outputs o_h Rh, which
    o_proj undoes: `W_o[:, h] <- W_o[:, h] Rh`. Queries and keys are untouched."""
    D, nq, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    Rh = _check_rotation(Rh, D, "Rh")
    out = dict(weights)
    v0 = cfg.q_size + cfg.kv_size  # first v row of wqkv
    for i in range(cfg.num_layers):
        name = f"layers.{i}.wqkv"
        w = out[name]
        r = Rh.to(w.device)
        wf = _f32(w).clone()
        v = wf[v0:].reshape(nkv, D, -1)                     # [Hkv, D, H]
        wf[v0:] = torch.einsum("de,jdh->jeh", r, v).reshape(cfg.kv_size, -1)  # Rh^T W_v,j
        out[name] = _like(wf, w)
        if f"layers.{i}.bqkv" in out:
            name = f"layers.{i}.bqkv"
            b = out[name]
            bf = _f32(b).clone()
            bf[v0:] = (bf[v0:].reshape(nkv, D) @ r).reshape(-1)
            out[name] = _like(bf, b)
        name = f"layers.{i}.wo"
        w = out[name]
        wo = _f32(w).reshape(w.shape[0], nq, D)            # [H, Hq, D]; same Rh for every head
        out[name] = _like((wo @ r).reshape(w.shape[0], -1), w)
    return out


def rotate(cfg: ModelConfig, weights: dict[str, torch.Tensor],
           seed: int = 0) -> dict[str, torch.Tensor]:
    """QoQ's rotation: `fold_norms`, then `rotate_residual` with a randomized Hadamard
    matrix of order hidden_size, then `rotate_heads` with one of order head_dim (both from
    `rotation_matrix`, seeded with `seed`; the same seed gives the same weights)."""
    g = torch.Generator().manual_seed(seed)
    R = rotation_matrix(cfg.hidden_size, g)
    Rh = rotation_matrix(cfg.head_dim, g)
    return rotate_heads(cfg, rotate_residual(cfg, fold_norms(cfg, weights), R), Rh)
