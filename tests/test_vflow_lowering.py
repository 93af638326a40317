"""The lowering hook: registration, lazy backend import, and select_pages using a registered
lowering (or the interpreter when lower=False, for float64, or when none is registered)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from test_vflow_select import assert_selection, brute_scores, make_inputs, tolerance
from vortex_hybrid import reference, vflow
from vortex_hybrid.contracts import pages_of
from vortex_hybrid.vflow import lowering
from vortex_hybrid.vflow.flows import Centroid
from vortex_hybrid.vflow.flow import Flow
from vortex_hybrid.vflow.interpreter import run_cache
from vortex_hybrid.vflow.select import full_pages, new_summaries


@vflow.register("test_lowered_centroid")
class LoweredCentroid(Centroid):
    """Centroid under another name, so this file's fake lowerings touch no library flow."""


def fake_cache(k_pool, pages, summaries, rows=None, *, check=True):
    """A stand-in 'kernel' with the cache signature: mean key of each full page."""
    fake_cache.calls.append((pages.clone(), {k: (v.shape, v.dtype) for k, v in summaries.items()}))
    rows = pages if rows is None else rows
    summaries["mean"][rows] = k_pool[pages].float().mean(2, keepdim=True)


def fake_indexer(q, summaries, page_table, seq_lens, budget, sink, recent, *, page_size,
                 check=True):
    """A stand-in 'kernel' with the indexer signature: centroid scores, then reference.topk_pages."""
    fake_indexer.calls += 1
    B, hq, d = q.shape
    n_phys, hkv = summaries["mean"].shape[:2]
    mean = summaries["mean"][page_table.long().clamp(0, n_phys - 1)][:, :, :, 0]   # [B, S, Hkv, D]
    qg = q.float().reshape(B, hkv, hq // hkv, d).sum(2)                             # [B, Hkv, D]
    scores = torch.einsum("bhd,bshd->bhs", qg, mean)
    return reference.topk_pages(scores.contiguous(), budget, pages_of(seq_lens, page_size).int(),
                                sink, recent)


@pytest.fixture
def fakes():
    fake_cache.calls, fake_indexer.calls = [], 0
    vflow.register_lowering("test_lowered_centroid", "cache", "cpu", fake_cache)
    vflow.register_lowering("test_lowered_centroid", "indexer", torch.device("cpu"), fake_indexer)
    yield
    vflow.unregister_lowering("test_lowered_centroid", "cache", "cpu")
    vflow.unregister_lowering("test_lowered_centroid", "indexer", "cpu")


def test_register_find_and_unregister():
    fn = lambda *args, **kw: None                                       # noqa: E731
    assert vflow.register_lowering("test_lowered_centroid", "indexer", "cpu", fn) is fn
    # found by structure: the pattern itself, and the library centroid (the same graph) ...
    assert vflow.find_lowering("test_lowered_centroid", "indexer", torch.device("cpu")) is fn
    assert vflow.find_lowering(Centroid(), "indexer", "cpu") is fn      # newest registration wins
    assert vflow.find_lowering("test_lowered_centroid", "indexer", "cpu", (8, 32, 4)) is fn
    # ... never for a flow whose indexer differs, even one that shares the pattern's summaries
    assert vflow.find_lowering(PatternOther(), "indexer", "cpu") is None
    assert ("test_lowered_centroid", "indexer", "cpu") in vflow.registered_lowerings()
    vflow.unregister_lowering("test_lowered_centroid", "indexer", "cpu")
    assert vflow.find_lowering("test_lowered_centroid", "indexer", "cpu") is not fn


@pytest.mark.parametrize("args,match", [
    (("quest", "score", "cpu", print), "stage='score' must be one of"),
    (("quest", "cache", "tpu", print), "device='tpu' must be one of"),
    (("", "cache", "cpu", print), "pattern='' must be the name of a registered flow"),
    (("quest", "cache", "cpu", 3), "fn=3 must be callable"),
])
def test_bad_registration_is_rejected(args, match):
    with pytest.raises(ValueError, match=match):
        vflow.register_lowering(*args)


def test_find_lowering_imports_the_backend_once(monkeypatch):
    monkeypatch.setattr(lowering, "_backends_tried", set())
    monkeypatch.setitem(lowering.BACKEND_MODULES, "cpu", "vortex_hybrid.no_such_backend")
    assert vflow.find_lowering("streaming", "indexer", "cpu") is None   # ImportError -> None
    assert "cpu" in lowering._backends_tried
    monkeypatch.setattr(lowering, "_backends_tried", set())
    monkeypatch.setitem(lowering.BACKEND_MODULES, "cpu", "vortex_hybrid.cpu_kernels")
    vflow.find_lowering("streaming", "indexer", "cpu")
    assert "vortex_hybrid.cpu_kernels" in sys.modules


@pytest.mark.parametrize("group", [1, 4])
def test_select_pages_uses_registered_lowerings(fakes, group):
    q, k_pool, table, lens = make_inputs(4, torch.float32, 3, 2, group, 16, 4, 9)
    lowered = vflow.select_pages("test_lowered_centroid", q, k_pool, table, lens, 5, 1, 2)
    assert fake_indexer.calls == 1 and len(fake_cache.calls) == 1
    pages, shapes = fake_cache.calls[0]
    assert pages.dtype == torch.int64
    assert pages.tolist() == full_pages(table, lens, 4).tolist()
    assert shapes == {"mean": (torch.Size([k_pool.shape[0], 2, 1, 16]), torch.float32)}
    interpreted = vflow.select_pages("test_lowered_centroid", q, k_pool, table, lens, 5, 1, 2,
                                     lower=False)
    assert fake_indexer.calls == 1 and len(fake_cache.calls) == 1    # lower=False: not called
    scores = brute_scores("centroid", q, k_pool, table, lens)
    for sel in (lowered, interpreted):
        assert_selection(sel, scores, lens, 4, 5, 1, 2, tolerance(torch.float32, scores))


def test_float64_takes_the_interpreter(fakes):
    q, k_pool, table, lens = make_inputs(6, torch.float64, 2, 1, 2, 8, 4, 6)
    sel = vflow.select_pages("test_lowered_centroid", q, k_pool, table, lens, 4, 1, 1)
    assert fake_indexer.calls == 0 and fake_cache.calls == []
    assert_selection(sel, brute_scores("centroid", q, k_pool, table, lens), lens, 4, 4, 1, 1)


def test_lowering_with_a_wrong_output_shape_is_reported(fakes):
    q, k_pool, table, lens = make_inputs(6, torch.float32, 2, 1, 2, 8, 4, 6)
    vflow.register_lowering("test_lowered_centroid", "indexer", "cpu",
                            lambda *a, **kw: torch.zeros(1, 1, 1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="returned sel \\(1, 1, 1\\)"):
        vflow.select_pages("test_lowered_centroid", q, k_pool, table, lens, 4, 1, 1)


def test_interpreted_cache_stage_writes_exactly_the_full_pages():
    q, k_pool, table, lens = make_inputs(8, torch.float32, 3, 2, 2, 8, 4, 7)
    compiled = vflow.load_flow("quest").compiled(4, 8, 2)
    summaries = new_summaries(compiled.summaries, k_pool.shape[0], 2, torch.float32, k_pool.device)
    for t in summaries.values():
        t.fill_(float("nan"))                                              # poison
    pages = full_pages(table, lens, 4)
    run_cache(compiled, k_pool, pages, summaries)
    written = torch.zeros(k_pool.shape[0], dtype=torch.bool)
    written[pages] = True
    for name, fn in (("kmin", np.min), ("kmax", np.max)):
        store = summaries[name]
        assert torch.isnan(store[~written]).all() and not torch.isnan(store[written]).any()
        want = fn(k_pool[pages].numpy(), axis=2, keepdims=True)
        np.testing.assert_array_equal(store[pages].numpy(), want)


@pytest.mark.parametrize("flow", ["quest", "centroid"])
def test_backend_lowerings_agree_with_the_interpreter(flow):
    """Runs only where a kernel backend registered a lowering for this device (cpu_kernels here)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if vflow.find_lowering(flow, "indexer", dev) is None and vflow.find_lowering(flow, "cache", dev) is None:
        pytest.skip(f"no {flow} lowering registered for {dev}")
    q, k_pool, table, lens = make_inputs(12, torch.float32, 3, 2, 4, 32, 8, 12)
    q, k_pool, table, lens = (t.to(dev) for t in (q, k_pool, table, lens))
    scores = brute_scores(flow, q.cpu(), k_pool.cpu(), table.cpu(), lens.cpu())
    for budget in (3, 6, 13):
        lowered = vflow.select_pages(flow, q, k_pool, table, lens, budget, 1, 2)
        interpreted = vflow.select_pages(flow, q, k_pool, table, lens, budget, 1, 2, lower=False)
        for sel in (lowered, interpreted):
            assert_selection(sel, scores, lens.cpu(), 8, budget, 1, 2, tolerance(torch.float32, scores))


@vflow.register("test_pattern_src")
class PatternSource(Centroid):
    """A flow with a lowering (registered below): |sum_j q_j . mean_p|."""

    def forward_indexer(self, q, cache):
        return vflow.ops.topk(vflow.ops.gemm(q, cache["mean"]).sum((-2, -1)).abs())


@vflow.register("test_pattern_clone")
class PatternClone(Flow):
    """The same computation written from scratch under another name: no lowering of its own."""

    def create_cache(self, page_size, head_dim):
        return {"mean": (1, head_dim)}

    def forward_cache(self, keys, cache):
        cache["mean"] = keys.mean(0, keepdim=True)

    def forward_indexer(self, q, cache):
        score = vflow.ops.gemm(q, cache["mean"])
        return vflow.ops.topk(score.sum((-2, -1)).abs())


@vflow.register("test_pattern_other")
class PatternOther(PatternClone):
    """One op differs (relu instead of abs): must not take the lowering."""

    def forward_indexer(self, q, cache):
        return vflow.ops.topk(vflow.ops.gemm(q, cache["mean"]).sum((-2, -1)).relu())


def abs_centroid_indexer(q, summaries, page_table, seq_lens, budget, sink, recent, *, page_size,
                         check=True):
    abs_centroid_indexer.calls += 1
    B, hq, d = q.shape
    n_phys, hkv = summaries["mean"].shape[:2]
    mean = summaries["mean"][page_table.long().clamp(0, n_phys - 1)][:, :, :, 0]
    qg = q.float().reshape(B, hkv, hq // hkv, d).sum(2)
    scores = torch.einsum("bhd,bshd->bhs", qg, mean).abs()
    return reference.topk_pages(scores.contiguous(), budget, pages_of(seq_lens, page_size).int(),
                                sink, recent)


def test_structurally_equal_flow_takes_the_lowering_of_another_name():
    abs_centroid_indexer.calls = 0
    vflow.register_lowering("test_pattern_src", "indexer", "cpu", abs_centroid_indexer)
    try:
        q, k_pool, table, lens = make_inputs(6, torch.float32, 3, 2, 4, 16, 4, 9)
        want = vflow.select_pages("test_pattern_clone", q, k_pool, table, lens, 5, 1, 2, lower=False)
        assert abs_centroid_indexer.calls == 0
        got = vflow.select_pages("test_pattern_clone", q, k_pool, table, lens, 5, 1, 2)
        assert abs_centroid_indexer.calls == 1
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
        vflow.select_pages("test_pattern_other", q, k_pool, table, lens, 5, 1, 2)
        assert abs_centroid_indexer.calls == 1          # relu != abs: interpreted
    finally:
        vflow.unregister_lowering("test_pattern_src", "indexer", "cpu")


@vflow.register("test_quest_rewritten")
class QuestRewritten(Flow):
    """Quest written from scratch (no subclassing, another name and class)."""

    def create_cache(self, page_size, head_dim):
        return {"kmin": (1, head_dim), "kmax": (1, head_dim)}

    def forward_cache(self, keys, cache):
        cache["kmin"] = keys.min(0, keepdim=True)
        cache["kmax"] = keys.max(0, keepdim=True)

    def forward_indexer(self, q, cache):
        score = vflow.ops.maximum(q * cache["kmax"], q * cache["kmin"]).sum((-2, -1))
        return vflow.ops.topk(score)


def test_library_clone_runs_on_the_library_kernels():
    """A flow whose graphs equal quest's finds quest's lowerings by structure alone."""
    from vortex_hybrid.cpu_kernels import quest_cache, quest_indexer

    bound = vflow.bind_flow("test_quest_rewritten", 4, 16, 2, "cpu")
    assert bound.flow.name == "test_quest_rewritten"
    assert bound.cache_kernel is quest_cache and bound.indexer_kernel is quest_indexer


def test_subclass_that_changes_the_indexer_runs_its_own_program():
    """class NegQuest(Quest) inherits quest's name but not its kernels: its indexer differs."""
    from vortex_hybrid.cpu_kernels import quest_cache
    from vortex_hybrid.vflow.flows import Quest

    class NegQuest(Quest):
        def forward_indexer(self, q, cache):
            score = vflow.ops.maximum(q * cache["kmax"], q * cache["kmin"]).sum((-2, -1))
            return vflow.ops.topk(-score)

    neg = NegQuest()
    assert neg.name == "quest"                          # inherited: must not matter
    bound = vflow.bind_flow(neg, 4, 16, 2, "cpu")
    assert bound.cache_kernel is quest_cache            # the cache stage is quest's
    assert bound.indexer_kernel is None                 # the indexer is its own: interpreted
    q, k_pool, table, lens = make_inputs(14, torch.float32, 3, 2, 2, 16, 4, 10)
    got = vflow.select_pages(neg, q, k_pool, table, lens, 5, 1, 2)
    scores = -brute_scores("quest", q, k_pool, table, lens)          # numpy: -inf -> +inf
    scores[np.isinf(scores)] = -np.inf
    assert_selection(got, scores, lens, 4, 5, 1, 2, tolerance(torch.float32, scores))
    quest = vflow.select_pages("quest", q, k_pool, table, lens, 5, 1, 2)
    assert not torch.equal(got.sort(-1).values, quest.sort(-1).values)


def test_bind_flow_resolves_once_and_rebinds_after_a_registration():
    a = vflow.bind_flow("centroid", 4, 16, 2, "cpu")
    assert vflow.bind_flow("centroid", 4, 16, 2, "cpu") is a            # cached: no new match
    fn = lambda *args, **kw: None                                       # noqa: E731
    vflow.register_lowering("test_lowered_centroid", "indexer", "cpu", fn)
    try:
        b = vflow.bind_flow("centroid", 4, 16, 2, "cpu")
        assert b is not a and b.indexer_kernel is fn
    finally:
        vflow.unregister_lowering("test_lowered_centroid", "indexer", "cpu")
    assert vflow.bind_flow("centroid", 4, 16, 2, "cpu").indexer_kernel is a.indexer_kernel
