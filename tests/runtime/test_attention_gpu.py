"""The paged attention and KV encode kernels (paged_attention.cu) against the PyTorch
reference ops, on fresh random data, with poisoned outputs, and under CUDA-graph replay.

Batches mix decode steps, prefill chunks over cached context, fresh prefills and sequences
with no new tokens; pages are scattered and out of order, and every page nobody owns holds
random bytes (NaN and inf patterns included), so a kernel that reads past a context or
outside its table fails. Every entry (kt, decode, prefill) and key splits are forced on the
same batch. Needs the kernel table built by `bench/build_kernels.py` (QCOMPILE_KERNEL_DIR, default
build/kernels_sm<major>0)."""
import math

import pytest
import torch

from qcompile.cutlass_templates.attention_configs import KIND_OF_FORMAT, ROWS, AttnConfig
from qcompile.runtime.ops import KV_ENCODE_OPS, kv_record_bytes
from qcompile.runtime.ops.attention import paged_attention_ref
from qcompile.runtime.ops.kv import PageLayout

pytestmark = pytest.mark.gpu

FORMATS = ("fp16", "int4")
BS = 16


@pytest.fixture(scope="module")
def kernels(kernel_dir):
    from qcompile.runtime import attention_kernels, gemm_kernels
    attention_kernels.enable(gemm_kernels.enable(kernel_dir))
    return attention_kernels


def make_batch(fmt, hq, hkv, d, seqs, seed=0, extra_pages=5):
    """seqs: [(ctx, new)] -> inputs of the attention op (CPU), pages scattered; unowned
    pages random bytes."""
    g = torch.Generator().manual_seed(seed)
    r = kv_record_bytes(fmt, hkv, d, torch.float16)
    pages = [math.ceil(c / BS) for c, _ in seqs]
    nb = sum(pages) + extra_pages
    cache = torch.randint(0, 256, (2, nb, BS, r), dtype=torch.uint8, generator=g)
    order = torch.randperm(nb, generator=g).tolist()
    mb = max(1, max(pages))
    tables = torch.zeros(len(seqs), mb, dtype=torch.int32)
    for b, ((ctx, _), n) in enumerate(zip(seqs, pages)):
        own = [order.pop() for _ in range(n)]
        tables[b, :n] = torch.tensor(own, dtype=torch.int32)
        if ctx:
            k = torch.randn(ctx, hkv, d, generator=g).half()
            v = torch.randn(ctx, hkv, d, generator=g).half()
            recs = KV_ENCODE_OPS[fmt](k, v)
            pos = torch.arange(ctx)
            slots = torch.tensor(own, dtype=torch.long)[pos // BS] * BS + pos % BS
            PageLayout.of(fmt, hkv, d, torch.float16).to_pages(cache, recs, slots)
    t_new = sum(n for _, n in seqs)
    q = torch.randn(t_new, hq, d, generator=g).half()
    kv_new = KV_ENCODE_OPS[fmt](torch.randn(t_new, hkv, d, generator=g).half(),
                                torch.randn(t_new, hkv, d, generator=g).half())
    ctx_lens = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
    starts = torch.tensor([0] + [n for _, n in seqs], dtype=torch.int32).cumsum(0).int()
    return q, kv_new, cache, tables, ctx_lens, starts


def _reference(fmt, batch, hkv, d):
    return paged_attention_ref(fmt, *batch, hkv, d ** -0.5).float()


def _run(kernels, fmt, batch, hkv, d, **kw):
    q = batch[0].cuda()
    out = torch.full_like(q, float("nan"))  # poisoned
    cfg = AttnConfig(d)
    args = [x.cuda() for x in batch]
    kernels.launch_attention(cfg, KIND_OF_FORMAT[fmt], *args, hkv, d ** -0.5, out=out, **kw)
    return out.float().cpu()


def _check(got, ref, what):
    assert not torch.isnan(got).any(), f"{what}: rows left unwritten (NaN from the poison)"
    err = (got - ref).abs().max().item()
    sqnr = 10 * math.log10(ref.pow(2).sum() / (got - ref).pow(2).sum().clamp_min(1e-30))
    assert err < 1e-2 and sqnr > 45, f"{what}: max abs err {err:.2e}, SQNR {sqnr:.1f} dB"


MIXED = [(0, 1), (5, 1), (16, 1), (17, 0), (33, 1), (100, 37), (0, 130), (250, 1), (64, 3),
         (0, 0), (1000, 1)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d", (64, 128))
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 4), (8, 2), (16, 2), (14, 2)])
def test_mixed_batch_every_entry(kernels, fmt, d, hq, hkv):
    batch = make_batch(fmt, hq, hkv, d, MIXED, seed=hq + d)
    ref = _reference(fmt, batch, hkv, d)
    for entry in ROWS:
        for splits in (1, 3):
            got = _run(kernels, fmt, batch, hkv, d, entry=entry, splits=splits)
            _check(got, ref, f"{fmt} d{d} {hq}/{hkv} {entry} splits={splits}")
    _check(_run(kernels, fmt, batch, hkv, d), ref, f"{fmt} d{d} planned")


@pytest.mark.parametrize("fmt", FORMATS)
def test_long_context_decode_splits(kernels, fmt):
    """One sequence of 20000 cached tokens (the plan splits its keys) and a short one."""
    batch = make_batch(fmt, 32, 8, 128, [(20000, 1), (3, 1)], seed=7)
    ref = _reference(fmt, batch, 8, 128)
    _check(_run(kernels, fmt, batch, 8, 128), ref, f"{fmt} long decode")
    for entry in ("kt", "decode"):
        _check(_run(kernels, fmt, batch, 8, 128, splits=1, entry=entry), ref,
               f"{fmt} long decode unsplit ({entry})")


@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_graph_replay_reads_device_metadata(kernels, fmt):
    """Capture once, then change lengths, tables and data in place: replay follows them."""
    hq, hkv, d = 8, 2, 64
    seqs_a = [(40, 1), (7, 1), (129, 1), (0, 1)]
    seqs_b = [(3, 1), (70, 1), (0, 1), (100, 1)]
    a = [x.cuda() for x in make_batch(fmt, hq, hkv, d, seqs_a, seed=1)]
    b = make_batch(fmt, hq, hkv, d, seqs_b, seed=2)
    mb = max(a[3].shape[1], b[3].shape[1])
    nb = max(a[2].shape[1], b[2].shape[1])
    static = [a[0], a[1], torch.zeros(2, nb, BS, a[2].shape[-1], dtype=torch.uint8, device="cuda"),
              torch.zeros(4, mb, dtype=torch.int32, device="cuda"), a[4], a[5]]
    static[2][:, : a[2].shape[1]] = a[2]
    static[3][:, : a[3].shape[1]] = a[3]
    cfg, kind = AttnConfig(d), KIND_OF_FORMAT[fmt]
    out = torch.full_like(static[0], float("nan"))
    kernels.launch_attention(cfg, kind, *static, hkv, d ** -0.5, out=out)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.launch_attention(cfg, kind, *static, hkv, d ** -0.5, out=out)
    for src, seqs in ((a, seqs_a), (b, seqs_b)):
        src = [x.cuda() for x in src]
        static[0].copy_(src[0])
        static[1].copy_(src[1])
        static[2].zero_()
        static[2][:, : src[2].shape[1]] = src[2]
        static[3].zero_()
        static[3][:, : src[3].shape[1]] = src[3]
        static[4].copy_(src[4])
        static[5].copy_(src[5])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(fmt, [x.cpu() for x in static], hkv, d)
        _check(out.float().cpu(), ref, f"{fmt} graph replay {seqs}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("hkv,d", [(1, 64), (3, 64), (8, 128)])
def test_encode_bitwise(kernels, fmt, hkv, d):
    g = torch.Generator().manual_seed(d + hkv)
    k = (torch.randn(77, hkv, d, generator=g) * 3).half()
    v = torch.randn(77, hkv, d, generator=g).half()
    k[3] = 0.5  # a constant head: scale falls back to 1e-4
    want = KV_ENCODE_OPS[fmt](k, v)  # CPU reference
    got = KV_ENCODE_OPS[fmt](k.cuda(), v.cuda()).cpu()
    assert torch.equal(got, want)
    assert kernels.STATS.launches, "the CUDA encode did not run"
    # k and v as column slices of one [T, 3 Hkv, D] output (the fused QKV projection's):
    # read in place by the strided entry, the same records
    qkv = torch.cat([k, torch.zeros_like(k), v], dim=1).cuda()
    before = sum(n for e, n in kernels.STATS.launches.items() if e.endswith("_encode_strided"))
    got = KV_ENCODE_OPS[fmt](qkv[:, :hkv], qkv[:, 2 * hkv:]).cpu()
    assert torch.equal(got, want)
    assert sum(n for e, n in kernels.STATS.launches.items()
               if e.endswith("_encode_strided")) == before + 1


def test_ops_route_to_kernels(kernels):
    """The registered CUDA implementation runs the kernel, not the reference fallback."""
    fmt, hq, hkv, d = "int4", 8, 2, 128
    batch = [x.cuda() for x in make_batch(fmt, hq, hkv, d, [(50, 1), (0, 20)], seed=3)]
    before = sum(kernels.STATS.launches.values())
    fallbacks = dict(kernels.STATS.fallbacks)  # the process default's: earlier tests' count
    from qcompile.runtime.ops import ATTENTION_OPS
    got = ATTENTION_OPS[fmt](*batch, hkv, d ** -0.5).float().cpu()
    assert sum(kernels.STATS.launches.values()) == before + 1
    assert dict(kernels.STATS.fallbacks) == fallbacks
    _check(got, _reference(fmt, [x.cpu() for x in batch], hkv, d), "op dispatch")


def test_no_host_synchronisation(kernels):
    """The attention and encode ops never wait for the device (sync debug mode raises)."""
    fmt, hq, hkv, d = "int4", 32, 8, 64
    batch = [x.cuda() for x in make_batch(fmt, hq, hkv, d, [(300, 1)] * 8, seed=5)]
    from qcompile.runtime.ops import ATTENTION_OPS
    k = torch.randn(8, hkv, d, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ATTENTION_OPS[fmt](*batch, hkv, d ** -0.5)
        KV_ENCODE_OPS[fmt](k, k)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("hkv,d", [(1, 64), (3, 64), (8, 128)])
def test_store_bitwise_and_under_graph_replay(kernels, fmt, hkv, d):
    """The page store kernel writes exactly what `PageLayout.to_pages` writes (the step's
    records of every layer and K / V, scattered slots, other bytes untouched), also replayed
    from a CUDA graph with new slots and records staged in place."""
    g = torch.Generator().manual_seed(7 * d + hkv)
    layout = PageLayout.of(fmt, hkv, d, torch.float16)
    r = kv_record_bytes(fmt, hkv, d, torch.float16)
    lead, nb, t = (3, 2), 11, 21
    cache = torch.randint(0, 256, (*lead, nb, BS, r), dtype=torch.uint8, generator=g)
    dev = cache.cuda()
    recs = torch.randint(0, 256, (*lead, t, r), dtype=torch.uint8, generator=g)
    slots = torch.randperm(nb * BS, generator=g)[:t]
    layout.to_pages(cache, recs, slots)
    before = sum(kernels.STATS.launches.values())
    assert kernels.store_pages(layout, dev, recs.cuda(), slots.cuda())
    assert sum(kernels.STATS.launches.values()) == before + 1
    assert torch.equal(dev.cpu(), cache)

    recs_d, slots_d = recs.cuda(), slots.cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.store_pages(layout, dev, recs_d, slots_d)
    for seed in (1, 2):
        g.manual_seed(seed)
        recs = torch.randint(0, 256, (*lead, t, r), dtype=torch.uint8, generator=g)
        slots = torch.randperm(nb * BS, generator=g)[:t]
        recs_d.copy_(recs), slots_d.copy_(slots)
        layout.to_pages(cache, recs, slots)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(dev.cpu(), cache), f"graph replay {seed}"


def _subset(batch, idx):
    """The sequences idx (in that order) of a make_batch batch, as a batch of their own: the
    same pages, rows and new records."""
    q, kv_new, cache, tables, ctx_lens, starts = batch
    rows = [torch.arange(starts[b], starts[b + 1]) for b in idx]
    at = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    counts = [len(r) for r in rows]
    sub_starts = torch.tensor([0] + counts, dtype=torch.int32).cumsum(0).int()
    return (q[at], kv_new[:, at], cache, tables[idx], ctx_lens[idx], sub_starts), rows


INVARIANT = [(700, 1), (3000, 1), (40, 1), (100, 40), (0, 130), (1500, 1), (2100, 5), (9, 1)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (32, 8, 128), (18, 2, 64)])
@pytest.mark.parametrize("split_keys", [128, 512])
def test_batch_invariant_plans(kernels, fmt, hq, hkv, d, split_keys):
    """With split_keys (plan_invariant) a sequence's rows come out bitwise the same alone, in
    any batch and order, with or without prefill chunks in the step, and under CUDA-graph
    replay; and they match the reference."""
    full = make_batch(fmt, hq, hkv, d, INVARIANT, seed=hq + d + split_keys)
    ref = _reference(fmt, full, hkv, d)
    n = len(INVARIANT)
    subsets = [list(range(n)), list(reversed(range(n))), [0, 1, 2, 5, 7], [3, 0, 6], [4, 2]]
    subsets += [[b] for b in range(n)]
    seen: dict[int, torch.Tensor] = {}
    for idx in subsets:
        sub, rows = _subset(full, idx)
        got = _run(kernels, fmt, sub, hkv, d, split_keys=split_keys)
        at = 0
        for b, r in zip(idx, rows):
            mine = got[at:at + len(r)]
            at += len(r)
            _check(mine, ref[r], f"{fmt} {hq}/{hkv} d{d} seq {b} in {idx}")
            if b in seen:
                assert torch.equal(mine, seen[b]), f"seq {b} changed in batch {idx}"
            seen[b] = mine
    # the same plan captured and replayed
    dev = [x.cuda() for x in full]
    cfg, kind = AttnConfig(d), KIND_OF_FORMAT[fmt]
    out = torch.full_like(dev[0], float("nan"))
    kernels.launch_attention(cfg, kind, *dev, hkv, d ** -0.5, out=out, split_keys=split_keys)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.launch_attention(cfg, kind, *dev, hkv, d ** -0.5, out=out, split_keys=split_keys)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    got = out.float().cpu()
    for b, r in enumerate(_subset(full, list(range(n)))[1]):
        assert torch.equal(got[r], seen[b]), f"seq {b} changed under graph replay"


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (32, 8, 128), (14, 2, 64)])
def test_rotation_in_kernels(kernels, hq, hkv, d):
    """The key rotation handed to the int4 kernels (`rotation=H`, runtime/compiled.py
    fold_kv_rotation): the encode rotates keys and every attention entry rotates queries in
    registers, matching the reference ops, which multiply by H first; values are not
    rotated (bitwise the reference); also under CUDA-graph replay."""
    from qcompile.passes.rotate_kv import kv_rotation_matrix
    from qcompile.runtime.ops import ATTENTION_OPS
    from qcompile.runtime.ops.kv import decode_int4
    h = kv_rotation_matrix(d, seed=d + hq).half()
    hc = h.cuda()
    g = torch.Generator().manual_seed(hq * d)
    k = (torch.randn(70, hkv, d, generator=g) * 3).half()
    v = torch.randn(70, hkv, d, generator=g).half()
    want = KV_ENCODE_OPS["int4"](k, v, rotation=h)
    rot_before = kernels.STATS.launches[f"{AttnConfig(d).name('attn_int4')}_encode_rot"]
    got = KV_ENCODE_OPS["int4"](k.cuda(), v.cuda(), rotation=hc).cpu()
    assert kernels.STATS.launches[f"{AttnConfig(d).name('attn_int4')}_encode_rot"] == \
        rot_before + 1
    assert torch.equal(got[1], want[1])  # values as they are
    exact = (k.float().reshape(-1, d) @ h.float()).view(k.shape)
    params = want[0][:, hkv * d // 2:hkv * (d // 2 + 4)].contiguous().view(torch.float16)
    step = params.view(70, hkv, 2)[..., 0].float()[..., None]  # each (token, head)'s scale
    for recs in (want, got):
        keys = decode_int4(recs[0], hkv, d, torch.float16).float()
        assert ((keys - exact).abs() <= 0.51 * step + 1e-2).all()
    same = (got[0] == want[0]).float().mean().item()
    assert same > 0.98, f"only {same:.1%} of the key bytes equal the reference's"

    batch = make_batch("int4", hq, hkv, d, MIXED, seed=hq + d)
    ref = paged_attention_ref("int4", *batch, hkv, d ** -0.5, rotation=h).float()
    for entry in ROWS:
        for splits in (1, 3):
            got = _run(kernels, "int4", batch, hkv, d, entry=entry, splits=splits, rotation=hc)
            _check(got, ref, f"rotated d{d} {hq}/{hkv} {entry} splits={splits}")
    dev = [x.cuda() for x in batch]
    fallbacks = dict(kernels.STATS.fallbacks)
    _check(ATTENTION_OPS["int4"](*dev, hkv, d ** -0.5, rotation=hc).float().cpu(), ref,
           "rotated, through the op")
    assert dict(kernels.STATS.fallbacks) == fallbacks
    cfg = AttnConfig(d)
    out = torch.full_like(dev[0], float("nan"))
    kernels.launch_attention(cfg, "attn_int4", *dev, hkv, d ** -0.5, out=out, rotation=hc)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.launch_attention(cfg, "attn_int4", *dev, hkv, d ** -0.5, out=out, rotation=hc)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    _check(out.float().cpu(), ref, "rotated, graph replay")
