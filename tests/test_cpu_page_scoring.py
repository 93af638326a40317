"""CPU lowerings of the quest and centroid flows vs the reference interpreter.

Cache stage: summaries of full pages equal the interpreter's (min/max exactly, mean to float32
rounding) and only rows `pages` are written. Indexer: page scores equal `vflow.page_scores` and the
selection equals `select_pages(..., lower=False)` (any order) for budgets from the forced floor to
all pages, with partial tail pages, shuffled page tables and every KV storage dtype.
"""

from __future__ import annotations

import pytest
import torch

from attention_cases import make_case, new_seed
from vortex_hybrid.cpu_kernels import (centroid_cache, centroid_indexer, quest_cache,
                                       quest_indexer)
from vortex_hybrid.cpu_kernels.page_scoring import launch_page_scores
from vortex_hybrid.vflow.interpreter import run_cache
from vortex_hybrid.vflow.registry import load_flow
from vortex_hybrid.vflow.select import full_pages, new_summaries, select_pages
from vortex_hybrid.vflow.select import page_scores as reference_scores

FLOWS = {"quest": (("kmax", "kmin"), quest_cache, quest_indexer),
         "centroid": (("mean", "mean"), centroid_cache, centroid_indexer)}


def _summaries(flow_name, k_pool, page_table, seq_lens, cache_fn, poison=float("nan")):
    """Our summaries (unwritten rows keep `poison`) and the interpreter's."""
    N, hkv, P, d = k_pool.shape
    compiled = load_flow(flow_name).compiled(P, d, 1)
    pages = full_pages(page_table, seq_lens, P)
    ours = {name: t.fill_(poison) for name, t in
            new_summaries(compiled.summaries, N, hkv, torch.float32, k_pool.device).items()}
    cache_fn(k_pool, pages, ours)
    ref = new_summaries(compiled.summaries, N, hkv, torch.float64, k_pool.device)
    run_cache(compiled, k_pool.double(), pages, ref)
    return ours, ref, pages


def _sorted(sel):
    return torch.where(sel >= 0, sel, 1 << 30).sort(dim=-1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("flow", ["quest", "centroid"])
def test_cache_stage_writes_exactly_the_full_pages(flow, dtype):
    seed = new_seed()
    q, k, v, pt, sl, _ = make_case(seed, dtype, 4, 64, batch=3, page_size=4, max_pages=9)
    ours, ref, pages = _summaries(flow, k, pt, sl, FLOWS[flow][1])
    written = torch.zeros(k.shape[0], dtype=torch.bool)
    written[pages] = True
    for name in ours:
        assert torch.isnan(ours[name][~written]).all(), f"seed {seed}: wrote rows not in pages"
        got, want = ours[name][written].double(), ref[name][written]
        tol = 0.0 if flow == "quest" else 1e-6
        assert (got - want).abs().max().item() <= tol, f"seed {seed}: {name} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("flow", ["quest", "centroid"])
def test_indexer_scores_and_selection_match_the_interpreter(flow, group, dtype):
    seed = new_seed()
    q, k, v, pt, sl, _ = make_case(seed, dtype, group, 64, batch=3, page_size=4, max_pages=12)
    (a, b), cache_fn, indexer = FLOWS[flow]
    ours, _, _ = _summaries(flow, k, pt, sl, cache_fn, poison=0.0)
    scores = launch_page_scores(q, ours[a], ours[b], pt, sl, 4, quest=flow == "quest")
    want = reference_scores(flow, q.double(), k.double(), pt, sl)
    scored = torch.isfinite(want)
    assert torch.equal(torch.isfinite(scores), scored), f"seed {seed}: scored pages differ"
    err = (scores.double()[scored] - want[scored]).abs().max().item()
    assert err < 1e-4 * max(1.0, want[scored].abs().max().item()), f"seed {seed}: err {err:.2e}"
    for budget in (3, 4, 7, 12):
        out = indexer(q, ours, pt, sl, budget, 1, 2, page_size=4)
        ref = select_pages(flow, q, k, pt, sl, budget, 1, 2, lower=False)
        assert out.shape == ref.shape and out.dtype == torch.int32
        assert torch.equal(_sorted(out), _sorted(ref)), f"seed {seed}, budget {budget}"


def test_indexer_rejects_missing_page_size_and_summaries():
    q, k, v, pt, sl, _ = make_case(new_seed(), torch.float32, 4, 64)
    summaries = {"kmin": torch.zeros(k.shape[0], 2, 1, 64), "kmax": torch.zeros(k.shape[0], 2, 1, 64)}
    with pytest.raises(TypeError, match="page_size"):
        quest_indexer(q, summaries, pt, sl, 4, 1, 2)         # keyword-only, as on the GPU
    with pytest.raises(ValueError, match="page_size=0 must be a positive integer"):
        quest_indexer(q, summaries, pt, sl, 4, 1, 2, page_size=0)
    with pytest.raises(ValueError, match="summaries lacks 'mean'"):
        centroid_indexer(q, summaries, pt, sl, 4, 1, 2, page_size=8)
    with pytest.raises(ValueError, match="budget=2 must be >= sink \\+ recent|k=2 must be >= sink"):
        quest_indexer(q, summaries, pt, sl, 2, 1, 2, page_size=8)
    with pytest.raises(ValueError, match="recent=0 must be >= 1"):
        quest_indexer(q, summaries, pt, sl, 4, 1, 0, page_size=8)


def test_cache_rejects_pages_outside_the_pool():
    _, k, _, _, _, _ = make_case(new_seed(), torch.float32, 1, 64)
    summaries = {"mean": torch.zeros(k.shape[0], 2, 1, 64)}
    with pytest.raises(ValueError, match="pages holds 0..99; the pool has pages"):
        centroid_cache(k, torch.tensor([0, 99]), summaries)
