"""float8_e4m3fn summary stores: the cache stage of both backends (Numba on the CPU, Triton on
DEVICE: the interpreter in CI, native on a GPU) writes the float64 summaries rounded by
`contracts.to_summary_dtype` (quest's min/max exactly, the centroid mean within one float8 step),
saturating at +-448 and touching only listed rows; the indexers score float8 summaries as float64
formulas over the same stored values do; a `SummaryStore` of float8 holds the float32 store's rows
rounded, and a runtime with `summary_dtype="float8_e4m3fn"` attends what the float64 reference
attends over its own selection.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_hybrid_attention import HKV, HQ, D, P, Shadow, make, reference_output
from test_summary_store import new_cache, split_batch

from vortex_hybrid import cpu_kernels, gpu_kernels, reference, vflow
from vortex_hybrid.contracts import FP8_SUMMARY_MAX, to_summary_dtype
from vortex_hybrid.vflow.summary_store import SummaryStore, summary_bytes

FP8 = torch.float8_e4m3fn
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = {"cpu": (cpu_kernels, torch.device("cpu")), "gpu": (gpu_kernels, DEVICE)}
NAMES = {"quest": ("kmin", "kmax"), "centroid": ("mean",)}


def poisoned(n, hkv, d, device):
    """A float8 store whose every byte is 0x7F (NaN): rows not written stay NaN."""
    return torch.full((n, hkv, 1, d), 0x7F, dtype=torch.uint8, device=device).view(FP8)


def fp8_step(x: torch.Tensor) -> torch.Tensor:
    """One float8_e4m3fn step at |x| (2**(e - 3), subnormals 2**-9): the rounding's bound."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -6)))
    return torch.pow(2.0, e - 3)


def keys(seed, n, hkv, P, d, scale=1.0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hkv, P, d, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("flow", ["quest", "centroid"])
def test_cache_stage_writes_the_rounded_float64_summaries(flow, backend, seed):
    kernels, dev = BACKENDS[backend]
    n, hkv, P, d = 12, 2, 16, 64
    k = keys(seed, n, hkv, P, d, scale=200.0)             # some of it beyond float8's +-448
    pages = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:7]
    stores = {name: poisoned(n, hkv, d, dev) for name in NAMES[flow]}
    cache = kernels.quest_cache if flow == "quest" else kernels.centroid_cache
    cache(k.to(dev), pages.to(dev), stores)
    kd = k.double()
    want = {"kmin": kd.amin(2, keepdim=True), "kmax": kd.amax(2, keepdim=True),
            "mean": kd.mean(2, keepdim=True)}
    listed = torch.zeros(n, dtype=torch.bool)
    listed[pages] = True
    for name, store in stores.items():
        got = store.cpu().double()
        assert torch.isnan(got[~listed]).all(), f"seed {seed}: {name}: rows not listed written"
        assert not torch.isnan(got[listed]).any(), f"seed {seed}: {name}: listed rows unwritten"
        assert got[listed].abs().max() <= FP8_SUMMARY_MAX, f"seed {seed}: {name} not saturated"
        ref = want[name][listed].clamp(-FP8_SUMMARY_MAX, FP8_SUMMARY_MAX)
        if flow == "quest":                # min/max are exact: one rounding, the same one
            assert torch.equal(got[listed], to_summary_dtype(ref, FP8).double()), \
                f"seed {seed}: {name} differs from the rounded float64 values"
        else:                              # float32 accumulation may land one float8 step away
            err = (got[listed] - ref).abs()
            assert bool((err <= fp8_step(ref)).all()), \
                f"seed {seed}: {name} off by {float((err / fp8_step(ref)).max()):.2f} steps"


def scores_from_stored(flow, q, stores, table, seq_lens, P):
    """float64 [B, Hkv, max_pages] from the stored (float8) summary values, -inf without one."""
    q = q.double()
    B, hq, _ = q.shape
    s = {name: t.cpu().double()[:, :, 0] for name, t in stores.items()}
    hkv = next(iter(s.values())).shape[1]
    G = hq // hkv
    out = torch.full((B, hkv, table.shape[1]), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for p in range(int(seq_lens[b]) // P):
            row = int(table[b, p])
            for h in range(hkv):
                qs = q[b, h * G:(h + 1) * G]
                if flow == "quest":
                    out[b, h, p] = torch.maximum(qs * s["kmax"][row, h], qs * s["kmin"][row, h]).sum()
                else:
                    out[b, h, p] = (qs @ s["mean"][row, h]).sum()
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("flow", ["quest", "centroid"])
def test_indexer_scores_float8_summaries_as_the_float64_formula(flow, backend, seed):
    kernels, dev = BACKENDS[backend]
    hkv, G, d, P, B, width = 2, 4, 64, 8, 3, 10
    n = B * width
    k = keys(seed, n, hkv, P, d)
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(B, hkv * G, d, generator=g)
    table = torch.randperm(n, generator=g).to(torch.int32).reshape(B, width)
    seq_lens = torch.tensor([width * P, 7 * P + 3, 2 * P], dtype=torch.int32)
    stores = {name: poisoned(n, hkv, d, dev) for name in NAMES[flow]}
    cache = kernels.quest_cache if flow == "quest" else kernels.centroid_cache
    cache(k.to(dev), torch.arange(n, device=dev), stores)
    a, b = ("kmax", "kmin") if flow == "quest" else ("mean", "mean")
    scores = kernels.page_scoring.launch_page_scores(
        q.to(dev), stores[a], stores[b], table.to(dev), seq_lens.to(dev), P,
        quest=flow == "quest").cpu().double()
    want = scores_from_stored(flow, q, stores, table, seq_lens, P)
    scored = torch.isfinite(want)         # full pages (the GPU leaves other columns unwritten)
    err = (scores[scored] - want[scored]).abs().max().item()
    assert err <= 1e-4 * max(1.0, want[scored].abs().max().item()), f"seed {seed}: err {err:.2e}"
    indexer = kernels.quest_indexer if flow == "quest" else kernels.centroid_indexer
    sel = indexer(q.to(dev), stores, table.to(dev), seq_lens.to(dev), 5, 1, 1, page_size=P).cpu()
    ref = reference.topk_pages(want.float(), 5, (seq_lens + P - 1) // P, 1, 1)
    assert torch.equal(sel.sort(-1).values, ref.sort(-1).values), f"seed {seed}: selection differs"


@pytest.mark.parametrize("location", ["device", "host"])
def test_a_float8_store_holds_the_float32_rows_rounded(location):
    kv = new_cache()
    s32 = SummaryStore(kv, "quest", group=2, location=location)
    s8 = SummaryStore(kv, "quest", group=2, location=location, dtype=FP8)
    rids = split_batch(5, kv)
    for rid in rids:
        r32 = [r for r in s32.rows(rid) if r >= 0]
        r8 = [r for r in s8.rows(rid) if r >= 0]
        for layer in range(kv.num_layers):
            for name in ("kmin", "kmax"):
                want = to_summary_dtype(s32.layer(layer)[name][r32].cpu(), FP8)
                got = s8.layer(layer)[name][r8].cpu()
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), \
                    f"request {rid}, layer {layer}, {name}"
    assert s8.nbytes * 4 == s32.nbytes
    q = torch.randn(len(rids), kv.num_kv_heads * 2, kv.head_dim,
                    generator=torch.Generator().manual_seed(5)).to(DEVICE)
    sel = s8.select_pages(1, q, rids, 4, 1, 1)
    table, lens = s8.table(rids)
    ref = vflow.bind_flow("quest", kv.page_size, kv.head_dim, 2, s8.device, lower=False).indexer(
        q.to(s8.device), s8.layer(1), table, lens, 4, 1, 1)
    assert torch.equal(sel.cpu().sort(-1).values, ref.cpu().sort(-1).values)


@pytest.mark.parametrize("placement", ["gpu", "cpu", "hybrid"])
def test_a_runtime_with_float8_summaries_attends_what_the_reference_selects(placement):
    """Decode steps with float8 summaries equal the float64 reference attention over the pages the
    reference interpreter selects from the same keys' summaries rounded to float8."""
    seed = 3
    attn = make(placement, slots=3, summary_dtype="float8_e4m3fn")
    try:
        shadow = Shadow(attn, seed)
        rids = [shadow.add(n) for n in (23, 9, 30)]
        for step in range(3):
            worst = shadow.step(rids, reference=fp8_reference_output)
            assert worst < 1e-5, f"seed {seed}, step {step}: relative error {worst:.2e}"
    finally:
        attn.close()


def fp8_reference_output(cfg, q, k, v):
    """`test_hybrid_attention.reference_output` with the selection from float8 summaries."""
    return reference_output(cfg, q, k, v, select=fp8_select)


def fp8_select(cfg, q, kp, table, lens, n):
    """The interpreter's selection over the pages' summaries stored as float8."""
    bound = vflow.bind_flow(cfg.flow, P, D, HQ // HKV, "cpu", lower=False)
    stores = {name: torch.zeros(n, HKV, r, c, dtype=FP8) for name, (r, c) in bound.summaries.items()}
    bound.cache(kp.double(), torch.arange(int(lens[0]) // P), stores)
    return bound.indexer(q, stores, table, lens, cfg.budget_for(n), cfg.sink_pages, cfg.recent_pages)


def test_float8_summaries_take_a_quarter_of_float32_bytes():
    f32 = summary_bytes("quest", 32, 1000, 8, 16, 128, torch.float32)
    assert summary_bytes("quest", 32, 1000, 8, 16, 128, FP8) * 4 == f32
