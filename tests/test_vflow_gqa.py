"""The flows' `gqa` option (how a KV head's query heads combine: sum, max, softmax, union) against
float64 numpy formulas written here, through the reference interpreter (float64 exactly, float32 up
to rounding at the selection boundary) and through what the runtime binds on this device (the
library's fused kernels keep serving gqa="sum" only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vortex_hybrid import vflow
from vortex_hybrid.vflow.flows import Centroid, DoubleSparsity, Quest
from vortex_hybrid.vflow.flows.gqa import GQA
from vortex_hybrid.vflow.pattern import graph_signature

from test_vflow_select import (assert_selection, brute_select, make_inputs,
                               per_head_page_scores, tolerance)

FLOWS = {"quest": Quest, "centroid": Centroid, "double_sparsity": DoubleSparsity}


def head_scores(flow: str, q, k_pool, table, lens, channels) -> np.ndarray:
    """[B, Hkv, max_pages, G] float64: each query head's own score of each full page; -inf where a
    page has no summary (past the request, or its partial last page)."""
    def score(qg, keys):
        if flow == "quest":
            return np.maximum(qg * keys.max(0), qg * keys.min(0)).sum(1)
        if flow == "double_sparsity":
            kc, qc = keys[:, channels], qg[:, channels]
            return np.maximum(qc * kc.max(0), qc * kc.min(0)).sum(1)
        return qg @ keys.mean(0)
    return per_head_page_scores(q, k_pool, table, lens, score)


def combined(per_head: np.ndarray, gqa: str, scale: float) -> np.ndarray:
    """[B, Hkv, max_pages]: the group's scores combined by `gqa` (not "union")."""
    if gqa == "sum":
        return per_head.sum(-1)
    if gqa == "max":
        return per_head.max(-1)
    assert gqa == "softmax"
    scored = np.isfinite(per_head)
    z = np.where(scored, per_head * scale, -np.inf)
    top = np.where(scored.any(2, keepdims=True), z.max(2, keepdims=True), 0.0)
    e = np.where(scored, np.exp(z - top), 0.0)
    p = e / np.maximum(e.sum(2, keepdims=True), 1e-300)
    return np.where(scored.any(-1), p.sum(-1), -np.inf)


def union_select(per_head_row: np.ndarray, n: int, budget: int, sink: int, recent: int) -> set:
    """Per-query-head union for one (request, KV head) row [max_pages, G]: head j in turn adds its
    best pages not yet chosen until (j + 1) / G of the free budget is used (ties to the lower page)."""
    if n <= budget:
        return set(range(n))
    G = per_head_row.shape[1]
    chosen = set(range(min(sink, n))) | set(range(n - recent, n))
    free = budget - len(chosen)
    taken = 0
    for j in range(G):
        quota = (j + 1) * free // G
        rest = sorted((p for p in range(n) if p not in chosen),
                      key=lambda p: (-per_head_row[p, j], p))
        chosen |= set(rest[:quota - taken])
        taken = quota
    return chosen


def assert_union(sel, per_head, lens, P, budget, sink, recent):
    sel = sel.cpu()
    B, hkv = per_head.shape[:2]
    assert tuple(sel.shape) == (B, hkv, budget)
    for b in range(B):
        n = -(-int(lens[b]) // P)
        for h in range(hkv):
            got = {p for p in sel[b, h].tolist() if p >= 0}
            assert got == union_select(per_head[b, h], n, budget, sink, recent), (b, h)


CASES = [(seed, flow, gqa) for seed in (0, 1, 2) for flow in FLOWS for gqa in GQA]


@pytest.mark.parametrize("seed,flow,gqa", CASES)
def test_gqa_option_selects_like_the_float64_formula(seed, flow, gqa):
    """Random shapes from `seed` (printed in the test id): GQA groups 1/3/4, pages of 4, partial
    last pages, budgets from sink + recent to more than all pages, float64 and float32."""
    rng = np.random.default_rng(seed)
    group, D, P, max_pages = int(rng.choice([1, 3, 4])), 16, 4, 11
    q, k_pool, table, lens = make_inputs(100 + seed, torch.float64, 3, 2, group, D, P, max_pages)
    obj = FLOWS[flow](gqa=gqa)
    channels = DoubleSparsity().heavy_channels(D)
    per_head = head_scores(flow, q, k_pool, table, lens, channels)
    for budget, sink, recent in ((3, 1, 2), (5, 1, 1), (7, 0, 2), (13, 1, 2)):
        for dtype in (torch.float64, torch.float32):
            for lower in (False, True):
                sel = vflow.select_pages(obj, q.to(dtype), k_pool.to(dtype), table, lens, budget,
                                         sink, recent, lower=lower)
                if gqa == "union":
                    assert_union(sel, per_head, lens, P, budget, sink, recent)
                    continue
                want = combined(per_head, gqa, D ** -0.5)
                assert_selection(sel, want, lens, P, budget, sink, recent, tolerance(dtype, want))


@pytest.mark.parametrize("flow", sorted(FLOWS))
@pytest.mark.parametrize("gqa", [g for g in GQA if g != "union"])
def test_gqa_page_scores_match_the_formula(flow, gqa):
    q, k_pool, table, lens = make_inputs(5, torch.float64, 2, 2, 3, 8, 4, 7)
    got = vflow.page_scores(FLOWS[flow](gqa=gqa), q, k_pool, table, lens).numpy()
    per_head = head_scores(flow, q, k_pool, table, lens, DoubleSparsity().heavy_channels(8))
    want = combined(per_head, gqa, 8 ** -0.5)
    scored = np.isfinite(want)
    assert (np.isfinite(got) == scored).all()
    np.testing.assert_allclose(got[scored], want[scored], rtol=1e-12, atol=1e-12)


def test_default_gqa_is_the_lowered_sum():
    """gqa="sum" traces the graph the fused kernels were registered for, so quest and centroid keep
    their kernels; the other options run their own program."""
    for flow in ("quest", "centroid"):
        base = vflow.load_flow(flow)
        assert base.gqa == "sum"
        sig = graph_signature(base.compiled(16, 64, 3).indexer_graph)
        for gqa in GQA:
            other = FLOWS[flow](gqa=gqa).compiled(16, 64, 3).indexer_graph
            assert (graph_signature(other) == sig) == (gqa == "sum"), (flow, gqa)


def test_bad_gqa_is_rejected():
    with pytest.raises(ValueError, match=r"gqa='mean' must be one of \['sum', 'max', 'softmax', "
                                         r"'union'\]"):
        Quest(gqa="mean")
    from vortex_hybrid import HybridConfig
    with pytest.raises(ValueError, match="gqa='avg'"):
        HybridConfig(flow="centroid", extra={"gqa": "avg"})
    assert HybridConfig(flow="centroid", extra={"gqa": "max"}).extra == {"gqa": "max"}
    assert brute_select(np.zeros(3), 3, 3, 1, 1) == {0, 1, 2}
