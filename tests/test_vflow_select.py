"""select_pages of the library flows vs brute-force numpy formulas (docs/architecture.md contract).

Random inputs: float32 and float64, GQA ratios 1/3/4/8, partial and full last pages, unused
page-table columns holding -1, budgets from one page to more than all pages. float64 must match
exactly; float32 may differ only where two scores sit within rounding of the selection boundary.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vortex_hybrid import vflow
from vortex_hybrid.vflow.flows import DoubleSparsity

# ---- shared brute force (also imported by test_vflow_user_flow.py) ------------------------------


def make_inputs(seed: int, dtype: torch.dtype, B: int, hkv: int, group: int, D: int, P: int,
                max_pages: int):
    """Random q [B, Hq, D], k_pool [N, Hkv, P, D], page_table int32 (unused columns -1), seq_lens."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, P * max_pages + 1, size=B)
    if B > 1:                                   # one request ends exactly on a page boundary
        lens[0] = P * int(rng.integers(1, max_pages + 1))
    n = -(-lens // P)
    N = int(n.sum()) + 3
    perm = rng.permutation(N)
    table = np.full((B, max_pages), -1, dtype=np.int32)
    at = 0
    for b in range(B):
        table[b, :n[b]] = perm[at:at + n[b]]
        at += n[b]
    k_pool = rng.standard_normal((N, hkv, P, D)) + rng.standard_normal((N, hkv, 1, D))
    q = rng.standard_normal((B, hkv * group, D))
    return (torch.tensor(q, dtype=dtype), torch.tensor(k_pool, dtype=dtype), torch.tensor(table),
            torch.tensor(lens, dtype=torch.int32))


def page_keys(k_pool, table, lens, b, h, p):
    """Keys of logical page p of request b, KV head h: [tokens, D] float64 numpy."""
    P = k_pool.shape[2]
    count = min(P, int(lens[b]) - p * P)
    return k_pool[int(table[b, p]), h, :count].double().numpy()


def per_head_page_scores(q, k_pool, table, lens, score) -> np.ndarray:
    """[B, Hkv, max_pages, G] float64: `score(qg [G, D], keys [P, D])` -> [G] for each full page
    of each (request, KV head); -inf where a page has no summary (past the request, or its
    partial last page)."""
    B, hq, D = q.shape
    _, hkv, P, _ = k_pool.shape
    G = hq // hkv
    out = np.full((B, hkv, table.shape[1], G), -np.inf)
    for b in range(B):
        for h in range(hkv):
            qg = q[b, h * G:(h + 1) * G].double().numpy()                      # [G, D]
            for p in range(int(lens[b]) // P):                                  # full pages
                out[b, h, p] = score(qg, page_keys(k_pool, table, lens, b, h, p))
    return out


def brute_scores(flow: str, q, k_pool, table, lens, channels=None):
    """Scores [B, Hkv, max_pages] float64 numpy from the issue's formulas; -inf where unscored."""
    B, hq, D = q.shape
    _, hkv, P, _ = k_pool.shape
    G = hq // hkv
    out = np.full((B, hkv, table.shape[1]), -np.inf)
    for b in range(B):
        n = -(-int(lens[b]) // P)
        for h in range(hkv):
            qg = q[b, h * G:(h + 1) * G].double().numpy()                      # [G, D]
            for p in range(n):
                keys = page_keys(k_pool, table, lens, b, h, p)
                full = keys.shape[0] == P
                if flow == "oracle":
                    out[b, h, p] = (qg @ keys.T).max()
                elif flow == "streaming":
                    out[b, h, p] = p
                elif not full:
                    continue                                                   # no summary yet
                elif flow == "quest":
                    out[b, h, p] = np.maximum(qg * keys.max(0), qg * keys.min(0)).sum()
                elif flow == "double_sparsity":
                    kc, qc = keys[:, channels], qg[:, channels]
                    out[b, h, p] = np.maximum(qc * kc.max(0), qc * kc.min(0)).sum()
                elif flow == "centroid":
                    out[b, h, p] = (qg @ keys.mean(0)).sum()
                else:
                    raise AssertionError(flow)
    return out


def brute_select(scores_row, n: int, budget: int, sink: int, recent: int) -> set[int]:
    """The contract's selection (docs/architecture.md) for one (request, KV head) row of scores."""
    if n <= budget:
        return set(range(n))
    forced = set(range(min(sink, n))) | set(range(n - recent, n))
    rest = sorted((p for p in range(n) if p not in forced), key=lambda p: (-scores_row[p], p))
    return forced | set(rest[:budget - len(forced)])


def assert_selection(sel, scores, lens, P, budget, sink, recent, tol: float = 0.0):
    """sel [B, Hkv, budget] equals brute_select row by row; with tol > 0, pages may swap only where
    their scores lie within tol of the boundary score."""
    sel = sel.cpu()
    B, hkv = scores.shape[:2]
    assert sel.dtype == torch.int32 and tuple(sel.shape) == (B, hkv, budget)
    for b in range(B):
        n = -(-int(lens[b]) // P)
        for h in range(hkv):
            row = sel[b, h].tolist()
            got = {p for p in row if p >= 0}
            assert all(p >= -1 for p in row) and len(got) == sum(p >= 0 for p in row), row
            assert row.count(-1) == budget - len(got)
            want = brute_select(scores[b, h], n, budget, sink, recent)
            if got == want:
                continue
            assert tol > 0 and len(got) == len(want), (b, h, sorted(got), sorted(want))
            boundary = [scores[b, h, p] for p in want - got] + [scores[b, h, p] for p in got - want]
            assert max(boundary) - min(boundary) <= tol, (b, h, sorted(got), sorted(want))


def tolerance(dtype, scores) -> float:
    finite = np.abs(scores[np.isfinite(scores)])
    scale = float(finite.max()) if finite.size else 1.0
    return 0.0 if dtype == torch.float64 else 1e-4 * (scale + 1.0)


# ---- tests ---------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), flow=st.sampled_from(["quest", "centroid", "oracle"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), group=st.sampled_from([1, 3, 4, 8]),
       hkv=st.integers(1, 2), B=st.integers(1, 3), P=st.sampled_from([1, 2, 4, 8]),
       D=st.sampled_from([4, 8, 16]), max_pages=st.integers(1, 9), sink=st.integers(0, 2),
       recent=st.integers(1, 2), data=st.data())
def test_library_flow_selects_like_brute_force(seed, flow, dtype, group, hkv, B, P, D, max_pages,
                                               sink, recent, data):
    q, k_pool, table, lens = make_inputs(seed, dtype, B, hkv, group, D, P, max_pages)
    budget = data.draw(st.integers(sink + recent, max(sink + recent, max_pages + 2)), label="budget")
    sel = vflow.select_pages(flow, q, k_pool, table, lens, budget, sink, recent, lower=False)
    scores = brute_scores(flow, q, k_pool, table, lens)
    assert_selection(sel, scores, lens, P, budget, sink, recent, tolerance(dtype, scores))


@pytest.mark.parametrize("flow", ["quest", "centroid", "oracle", "streaming", "double_sparsity"])
@pytest.mark.parametrize("budget", [1, 2, 3, 5, 8, 11])
def test_every_budget_from_one_page_to_all(flow, budget):
    q, k_pool, table, lens = make_inputs(7, torch.float64, 3, 2, 4, 16, 4, 10)
    sel = vflow.select_pages(flow, q, k_pool, table, lens, budget, 0, 1)
    channels = DoubleSparsity().heavy_channels(16)
    scores = brute_scores(flow, q, k_pool, table, lens, channels)
    assert_selection(sel, scores, lens, 4, budget, 0, 1)


@pytest.mark.parametrize("flow", ["quest", "centroid", "oracle", "streaming", "double_sparsity"])
def test_page_scores_match_formulas(flow):
    q, k_pool, table, lens = make_inputs(3, torch.float64, 2, 2, 3, 8, 4, 6)
    got = vflow.page_scores(flow, q, k_pool, table, lens).numpy()
    want = brute_scores(flow, q, k_pool, table, lens, DoubleSparsity().heavy_channels(8))
    scored = np.isfinite(want)
    assert (np.isfinite(got) == scored).all()
    np.testing.assert_allclose(got[scored], want[scored], rtol=1e-12, atol=1e-12)


def test_double_sparsity_with_calibrated_channels():
    q, k_pool, table, lens = make_inputs(11, torch.float64, 2, 1, 4, 16, 2, 8)
    flow = DoubleSparsity(channels=[3, 5, 11])
    sel = vflow.select_pages(flow, q, k_pool, table, lens, 4, 1, 1)
    scores = brute_scores("double_sparsity", q, k_pool, table, lens, [3, 5, 11])
    assert_selection(sel, scores, lens, 2, 4, 1, 1)
    assert flow.compiled(2, 16, 4).summaries == {"kmin": (1, 3), "kmax": (1, 3)}


def test_streaming_keeps_sink_and_latest_pages():
    q, k_pool = torch.randn(1, 2, 4), torch.randn(8, 1, 2, 4)
    table = torch.arange(8, dtype=torch.int32)[None].flip(1).contiguous()
    lens = torch.tensor([15], dtype=torch.int32)          # 8 pages, the last one partial
    sel = vflow.select_pages("streaming", q, k_pool, table, lens, 5, 2, 1)
    assert sel[0, 0].tolist() == [0, 1, 5, 6, 7]


def test_budget_at_least_all_pages_selects_every_page():
    q, k_pool, table, lens = make_inputs(9, torch.float32, 2, 2, 2, 8, 4, 5)
    n = -(-lens.long() // 4)
    sel = vflow.select_pages("quest", q, k_pool, table, lens, 7, 1, 2)
    for b in range(2):
        for h in range(2):
            assert sel[b, h].tolist() == list(range(int(n[b]))) + [-1] * (7 - int(n[b]))


def test_empty_batch_gives_empty_selection():
    q, k_pool, table, lens = make_inputs(1, torch.float32, 1, 2, 2, 8, 4, 3)
    sel = vflow.select_pages("centroid", q[:0], k_pool, table[:0], lens[:0], 3, 1, 1)
    assert sel.shape == (0, 2, 3) and sel.dtype == torch.int32


@pytest.mark.parametrize("budget,sink,recent,match", [
    (2, 1, 2, "budget=2 must be >= sink \\+ recent = 3"),
    (0, 0, 1, "budget=0 must be >= sink \\+ recent = 1"),
    (4, 1, 0, "recent=0 must be >= 1"),
    (4, -1, 1, "sink=-1 must be a non-negative integer"),
    (2.0, 0, 1, "budget=2.0 must be a non-negative integer"),
])
def test_bad_budget_is_rejected(budget, sink, recent, match):
    q, k_pool, table, lens = make_inputs(2, torch.float32, 1, 1, 1, 4, 2, 3)
    with pytest.raises(ValueError, match=match):
        vflow.select_pages("quest", q, k_pool, table, lens, budget, sink, recent)


def test_bad_tensors_and_unknown_flow_are_rejected():
    q, k_pool, table, lens = make_inputs(2, torch.float32, 2, 2, 2, 8, 4, 3)
    with pytest.raises(ValueError, match="num_q_heads=3 must be a positive multiple"):
        vflow.select_pages("quest", q[:, :3], k_pool, table, lens, 3, 1, 1)
    with pytest.raises(ValueError, match="unknown flow 'qest' \\(did you mean 'quest'\\?\\)"):
        vflow.select_pages("qest", q, k_pool, table, lens, 3, 1, 1)
    with pytest.raises(ValueError, match="page_size=3 is not a power of two"):
        vflow.select_pages("quest", torch.randn(1, 2, 4), torch.randn(2, 1, 3, 4),
                           torch.tensor([[0, 1]], dtype=torch.int32),
                           torch.tensor([5], dtype=torch.int32), 3, 1, 1)


def test_float32_and_float64_agree_on_well_separated_scores():
    q, k_pool, table, lens = make_inputs(21, torch.float64, 2, 2, 4, 16, 4, 12)
    sel64 = vflow.select_pages("quest", q, k_pool, table, lens, 6, 1, 2)
    sel32 = vflow.select_pages("quest", q.float(), k_pool.float(), table, lens, 6, 1, 2, lower=False)
    scores = brute_scores("quest", q, k_pool, table, lens)
    assert_selection(sel64, scores, lens, 4, 6, 1, 2)
    assert_selection(sel32, scores, lens, 4, 6, 1, 2, tolerance(torch.float32, scores))


@pytest.mark.parametrize("flow", ["quest", "oracle", "double_sparsity"])
def test_one_flow_object_runs_on_every_device(flow):
    """One flow object selects on every device like the numpy brute force: float64 (the reference
    interpreter) exactly, float32 (the device's registered lowerings where there are any) up to
    rounding at the selection boundary; traced once for the shape whatever the device."""
    obj = vflow.load_flow(flow)
    q, k_pool, table, lens = make_inputs(13, torch.float64, 2, 2, 3, 8, 4, 8)
    scores = brute_scores(flow, q, k_pool, table, lens, DoubleSparsity().heavy_channels(8))
    traced = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for dtype in (torch.float64, torch.float32):
            args = (q.to(dev, dtype), k_pool.to(dev, dtype), table.to(dev), lens.to(dev))
            got = vflow.select_pages(obj, *args, 4, 1, 1)
            assert got.device.type == dev, (dev, dtype)
            assert_selection(got, scores, lens, 4, 4, 1, 1, tolerance(dtype, scores))
            traced = traced or dict(obj._compiled)
    assert obj._compiled == traced                                # traced once for this shape


def test_library_is_listed_and_documented():
    names = vflow.list_flows()
    assert {"streaming", "quest", "centroid", "oracle", "double_sparsity"} <= set(names)
    for name in ("streaming", "quest", "centroid", "oracle", "double_sparsity"):
        doc = type(vflow.load_flow(name)).__doc__
        assert "arXiv:" in doc, name
    assert len(DoubleSparsity().heavy_channels(64)) == 8
