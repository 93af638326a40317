"""gpu_kernels cache kernels (quest_cache, centroid_cache) and indexers (quest_indexer,
centroid_indexer) against brute-force numpy formulas in float64 and reference.topk_pages.

Runs under TRITON_INTERPRET=1 on the CPU (small shapes) and natively on a GPU.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import test_seed

from vortex_hybrid import reference, vflow
from vortex_hybrid.contracts import pages_of
from vortex_hybrid.gpu_kernels import lowerings
from vortex_hybrid.gpu_kernels import centroid_indexer, quest_indexer
from vortex_hybrid.gpu_kernels import centroid_cache, quest_cache

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CACHE = {"quest": (quest_cache, ("kmin", "kmax")), "centroid": (centroid_cache, ("mean",))}
INDEXER = {"quest": quest_indexer, "centroid": centroid_indexer}


def make_pool(rng: random.Random, B, hkv, group, d, page_size, integer=False, dtype=torch.float32):
    """q [B, Hq, D], k_pool [N, Hkv, P, D] (shuffled pages, spare ones), page_table, seq_lens."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    seq_lens = [rng.choice([1, page_size, rng.randint(1, 12 * page_size)]) for _ in range(B)]
    n_pages = [-(-s // page_size) for s in seq_lens]
    N = sum(n_pages) + 3
    draw = (lambda *shape: torch.randint(-3, 4, shape, generator=g).float()) if integer else \
        (lambda *shape: torch.randn(*shape, generator=g))
    k_pool = draw(N, hkv, page_size, d).to(dtype)
    q = draw(B, hkv * group, d)
    perm = torch.randperm(N, generator=g)
    table = torch.full((B, max(n_pages) + 2), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(n_pages):
        table[b, :n] = perm[at:at + n].to(torch.int32)
        at += n
    return q, k_pool, table, torch.tensor(seq_lens, dtype=torch.int32)


def poisoned_summaries(flow, k_pool):
    N, hkv, _, d = k_pool.shape
    return {name: torch.full((N, hkv, 1, d), float("nan"), device=DEVICE)
            for name in CACHE[flow][1]}


def brute_scores(flow, q, k_pool, table, seq_lens):
    """float64 numpy [B, Hkv, max_pages] straight from the formulas over the pages' keys."""
    q, kp = q.double().numpy(), k_pool.double().numpy()
    B, hq, _ = q.shape
    hkv, P = kp.shape[1], kp.shape[2]
    G = hq // hkv
    out = np.zeros((B, hkv, table.shape[1]))
    for b in range(B):
        for h in range(hkv):
            qs = q[b, h * G:(h + 1) * G]                                   # [G, D]
            for p in range(int(pages_of(seq_lens[b:b + 1], P)[0])):
                keys = kp[int(table[b, p]), h]                             # [P, D]
                if flow == "quest":
                    kmax, kmin = keys.max(0), keys.min(0)
                    out[b, h, p] = np.maximum(qs * kmax, qs * kmin).sum()
                else:
                    out[b, h, p] = (qs @ keys.mean(0)).sum()
    return torch.from_numpy(out)


def run_indexer(flow, q, k_pool, table, seq_lens, budget, sink, recent):
    """Cache kernel over every full page, then the indexer; everything on DEVICE, sel on the CPU."""
    summaries = poisoned_summaries(flow, k_pool)
    P = k_pool.shape[2]
    full = torch.arange(table.shape[1])[None, :] < (seq_lens.long() // P)[:, None]
    pages = torch.unique(table.long()[full])
    CACHE[flow][0](k_pool.to(DEVICE), pages.to(DEVICE), summaries)
    sel = INDEXER[flow](q.to(DEVICE), summaries, table.to(DEVICE), seq_lens.to(DEVICE), budget,
                        sink, recent, page_size=P)
    assert sel.dtype == torch.int32 and sel.shape == (q.shape[0], k_pool.shape[1], budget)
    return sel.cpu()


@pytest.mark.parametrize("flow", ["quest", "centroid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cache_kernels_write_exactly_the_listed_pages(flow, dtype):
    rng = random.Random(test_seed())
    for hkv, d, P in ((2, 64, 4), (2, 128, 16), (3, 128, 128)):      # last: one head per program
        _, k_pool, _, _ = make_pool(rng, 1, hkv, 1, d, P, dtype=dtype)
        k_pool = torch.cat([k_pool, torch.randn(4, *k_pool.shape[1:]).to(dtype)])
        pages = torch.randperm(k_pool.shape[0])[: k_pool.shape[0] // 2]
        summaries = poisoned_summaries(flow, k_pool)
        CACHE[flow][0](k_pool.to(DEVICE), pages.to(DEVICE), summaries)
        keys = k_pool.double().numpy()
        want = {"kmin": keys.min(2), "kmax": keys.max(2), "mean": keys.mean(2)}
        listed = torch.zeros(k_pool.shape[0], dtype=torch.bool)
        listed[pages] = True
        for name, store in summaries.items():
            store = store.cpu()[:, :, 0]
            assert torch.isnan(store[~listed]).all(), f"{name}: rows not listed were written"
            assert not torch.isnan(store[listed]).any(), f"{name}: listed rows not fully written"
            got, ref = store[listed].double().numpy(), want[name][listed.numpy()]
            assert np.linalg.norm(got - ref) <= 1e-6 * np.linalg.norm(ref), name


def test_cache_kernels_accept_an_empty_page_list():
    k_pool = torch.randn(3, 2, 4, 16, device=DEVICE)
    summaries = poisoned_summaries("quest", k_pool)
    quest_cache(k_pool, torch.zeros(0, dtype=torch.int64, device=DEVICE), summaries)
    assert all(torch.isnan(t).all() for t in summaries.values())


@pytest.mark.parametrize("flow", ["quest", "centroid"])
def test_indexer_equals_reference_topk_of_brute_scores_exactly(flow):
    """Small-integer keys and queries: every score is exact in float32, ties are frequent, so the
    selection must equal reference.topk_pages of the float64 brute-force scores page for page."""
    rng = random.Random(test_seed())
    for group in (1, 3, 4, 8):
        q, k_pool, table, lens = make_pool(rng, 3, 2, group, 64, 4, integer=True)
        scores = brute_scores(flow, q, k_pool, table, lens)
        n_max = table.shape[1]
        for budget, sink, recent in ((2, 0, 1), (rng.randint(3, n_max), 1, 2), (n_max + 1, 1, 1)):
            sel = run_indexer(flow, q, k_pool, table, lens, budget, sink, recent)
            want = reference.topk_pages(scores, budget, pages_of(lens, 4).int(), sink, recent)
            assert torch.equal(sel.sort(-1).values, want.sort(-1).values), (group, budget)


@pytest.mark.parametrize("flow", ["quest", "centroid"])
def test_indexer_on_random_floats_picks_the_best_pages_up_to_rounding(flow):
    rng = random.Random(test_seed())
    q, k_pool, table, lens = make_pool(rng, 2, 2, 4, 128, 16)
    scores = brute_scores(flow, q, k_pool, table, lens)
    n = pages_of(lens, 16)
    tol = 1e-4 * float(scores.abs().max())
    for budget, sink, recent in ((int(n.max()) // 2 + 2, 1, 1), (int(n.max()) // 4 + 3, 2, 1)):
        sel = run_indexer(flow, q, k_pool, table, lens, budget, sink, recent)
        for b in range(2):
            nb = int(n[b])
            for h in range(2):
                row = sel[b, h]
                picked = row[row >= 0].long()
                assert picked.unique().numel() == picked.numel() == min(nb, budget)
                if nb <= budget:
                    continue
                forced = {*range(sink), *range(nb - recent, nb)}
                assert forced <= set(picked.tolist())
                free = torch.tensor([p for p in range(nb) if p not in forced])
                chosen = torch.isin(free, picked)
                assert scores[b, h, free[chosen]].min() >= scores[b, h, free[~chosen]].max() - tol


def test_indexer_rejects_bad_arguments():
    q = torch.randn(1, 2, 16, device=DEVICE)
    summaries = {"mean": torch.zeros(4, 2, 1, 16, device=DEVICE)}
    table = torch.zeros(1, 4, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([9], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="page_size=0 must be a positive integer"):
        centroid_indexer(q, summaries, table, lens, 3, 1, 1, page_size=0)
    with pytest.raises(ValueError, match="need more pages than page_table's 4 columns"):
        centroid_indexer(q, summaries, table, lens, 3, 1, 1, page_size=2)
    with pytest.raises(ValueError, match="budget=1 must be >= sink \\+ recent = 2"):
        centroid_indexer(q, summaries, table, lens, 1, 1, 1, page_size=4)
    with pytest.raises(ValueError, match="summaries lacks 'kmax'"):
        quest_indexer(q, summaries, table, lens, 3, 1, 1, page_size=4)
    with pytest.raises(ValueError, match="summaries\\['mean'\\] is torch.float64"):
        centroid_indexer(q, {"mean": summaries["mean"].double()}, table, lens, 3, 1, 1, page_size=4)


def test_cache_kernels_reject_bad_arguments():
    k_pool = torch.randn(3, 2, 4, 16, device=DEVICE)
    summaries = poisoned_summaries("quest", k_pool)
    with pytest.raises(ValueError, match="pages holds 0..3; the pool has pages 0..2"):
        quest_cache(k_pool, torch.tensor([0, 3], device=DEVICE), summaries)
    with pytest.raises(ValueError, match="summaries lacks 'mean'"):
        centroid_cache(k_pool, torch.tensor([0], device=DEVICE), summaries)


def test_lowerings_are_registered_for_cuda():
    for (flow, stage), fn in lowerings.LOWERINGS.items():
        assert vflow.find_lowering(flow, stage, "cuda") is fn


@pytest.mark.skipif(not torch.cuda.is_available(), reason="select_pages lowers only on CUDA")
@pytest.mark.parametrize("flow", ["quest", "centroid"])
def test_select_pages_through_the_lowering_equals_the_interpreter_on_exact_inputs(flow):
    rng = random.Random(test_seed())
    q, k_pool, table, lens = make_pool(rng, 4, 8, 4, 128, 16, integer=True)
    q, k_pool, table, lens = (t.to(DEVICE) for t in (q, k_pool, table, lens))
    for budget in (3, 9, 40):
        lowered = vflow.select_pages(flow, q, k_pool, table, lens, budget, 1, 2)
        interpreted = vflow.select_pages(flow, q, k_pool, table, lens, budget, 1, 2, lower=False)
        assert torch.equal(lowered.sort(-1).values, interpreted.sort(-1).values)
