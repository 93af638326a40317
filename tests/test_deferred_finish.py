"""`finish_step(wait=False)`: a whole step ended without waiting is completed by the next `plan()`
once that plan's own host work is done (so on a GPU the host prepares step t + 1 while step t
runs), or by `complete_step()`, `stats()`, a request change or `close()`. Such steps give the
outputs, counters and cache state of ordinary steps; a deferred step that failed raises from the
call that completes it, with it (and that plan's new step) undone; a plan that fails for its own
reason still completes the step before it.
"""

from __future__ import annotations

import pytest
import torch
from test_hybrid_attention import HKV, HQ, L, D, make
from test_runtime_transactions import Boom, assert_same, fail_on_call, state
from test_whole_step import DEV, ordinary_step_equals, pair, same_stats, three_requests, \
    two_requests

from vortex_hybrid.runtime import hybrid_attention


def same_state(a, b) -> None:
    """Two runtimes hold the same requests, KV, summaries and cache state (timings aside: the
    counters are compared by `same_stats`)."""
    x, y = state(a), state(b)
    x.pop("stats", None)
    y.pop("stats", None)
    assert_same(x, y)


def layers(whole, eager, n: int, gen) -> None:
    """Every layer of the planned step in both runtimes, the same inputs: equal outputs."""
    for layer in range(L):
        q, kn, vn = (torch.randn(n, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV))
        torch.testing.assert_close(whole.run(layer, q, kn, vn), eager.run(layer, q, kn, vn),
                                   rtol=1e-5, atol=1e-6, msg=f"layer {layer}")


@pytest.mark.parametrize("placement", ["gpu", "cpu", "offload", "hybrid/split", "hybrid/subbatch"])
def test_deferred_steps_equal_ordinary_steps(placement):
    """Ten steps ended with finish_step(wait=False), each completed by the next plan (the batch
    changes and comes back): every step's outputs, counters and page-cache state equal an
    ordinary twin's (seed 5)."""
    whole, eager = pair(placement)
    gen = torch.Generator().manual_seed(5)
    rids = three_requests(whole, eager, gen)
    try:
        for step in range(10):
            batch = [rids[n] for n in ((3, 17, 30) if step % 4 != 3 else (17, 30))]
            whole.plan([w for w, _ in batch], whole_step=True)    # completes the step before
            if step:
                assert whole._step.serial == eager._step.serial + 1
                same_stats(whole, eager)
            eager.plan([e for _, e in batch])
            layers(whole, eager, len(batch), gen)
            whole.finish_step(wait=False)
            assert not whole._step.finished
        whole.complete_step()
        assert whole._step.finished
        same_stats(whole, eager)
        assert whole.stats()["totals"]["steps"] == eager.stats()["totals"]["steps"] == 10
        same_state(whole, eager)
    finally:
        whole.close()
        eager.close()


@pytest.mark.parametrize("placement", ["cpu", "offload", "hybrid/split"])
def test_a_failed_deferred_step_raises_from_the_next_plan_with_both_steps_undone(monkeypatch,
                                                                                  placement):
    """The CPU part of a deferred step raises: finish_step(wait=False) returns, the next plan()
    raises that exception (same type), every request is as before the failed step (the new plan
    undone too), and a step afterwards equals an ordinary twin's (seed 13)."""
    whole, eager = pair(placement)
    gen = torch.Generator().manual_seed(13)
    ws, es = two_requests(whole, eager, gen)
    try:
        before = state(whole)
        calls = fail_on_call(monkeypatch, whole, "_cpu_state", 1)
        whole.plan(ws, whole_step=True)
        for layer in range(L):
            q, kn, vn = (torch.randn(2, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV))
            whole.run(layer, q, kn, vn)
        whole.finish_step(wait=False)                   # nothing raised yet
        with pytest.raises(Boom, match="_cpu_state call 1") as info:
            whole.plan(ws, whole_step=True)
        assert whole.deferred_failure is info.value          # the step before, not this plan
        assert calls["n"] >= 1
        assert whole._step is None
        assert_same(before, state(whole))
        whole.complete_step()                           # nothing left to complete
        ordinary_step_equals(whole, eager, ws, es, gen)
    finally:
        whole.close()
        eager.close()


def test_a_plan_that_fails_itself_still_completes_the_deferred_step(monkeypatch):
    """plan() fails after a good deferred step (its table building raises): that plan raises its
    own error and leaves its requests as they were, and the step before it is completed and
    counted as an ordinary twin counts it (seed 17)."""
    whole, eager = pair("hybrid/split")
    gen = torch.Generator().manual_seed(17)
    ws, es = two_requests(whole, eager, gen)
    try:
        whole.plan(ws, whole_step=True)
        eager.plan(es)
        layers(whole, eager, 2, gen)
        whole.finish_step(wait=False)

        def broken(*args, **kw):
            raise Boom("injected in build_plan")
        monkeypatch.setattr(hybrid_attention, "build_plan", broken)
        with pytest.raises(Boom, match="build_plan"):
            whole.plan(ws, whole_step=True)
        assert whole.deferred_failure is None                # this plan's own failure
        monkeypatch.undo()
        assert whole._step is not None and whole._step.finished
        same_stats(whole, eager)
        same_state(whole, eager)
        ordinary_step_equals(whole, eager, ws, es, gen)
    finally:
        whole.close()
        eager.close()


def test_request_changes_stats_and_a_second_finish_see_a_deferred_step():
    """After finish_step(wait=False): finish_step() again is refused in one line; run() needs a
    new plan; stats() completes the step (its counters are there); a request in that step can
    then be removed, and a new one added (seed 19)."""
    attn = make("hybrid", step_shape="split", cache_prefill=False)
    gen = torch.Generator().manual_seed(19)
    try:
        a = attn.add_request(*(torch.randn(L, 40, HKV, D, generator=gen).to(DEV) for _ in "kv"))
        b = attn.add_request(*(torch.randn(L, 33, HKV, D, generator=gen).to(DEV) for _ in "kv"))
        attn.plan([a, b], whole_step=True)
        for layer in range(L):
            attn.run(layer, *(torch.randn(2, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV)))
        attn.finish_step(wait=False)
        with pytest.raises(ValueError, match="finish_step\\(\\) ends a step planned with"):
            attn.finish_step()
        with pytest.raises(ValueError):
            attn.run(0, *(torch.randn(2, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV)))
        assert not attn._step.finished
        totals = attn.stats()["totals"]
        assert attn._step.finished and totals["steps"] == 1 and totals["cpu_pages"] + \
            totals["gpu_pages"] > 0
        attn.remove_request(a)
        c = attn.add_request(*(torch.randn(L, 5, HKV, D, generator=gen).to(DEV) for _ in "kv"))
        assert sorted(attn.kv.request_ids) == sorted([b, c])
        assert attn.kv.seq_len(b) == 34
    finally:
        attn.close()


def test_close_waits_for_a_deferred_step():
    """close() after finish_step(wait=False) completes the step first and closes (seed 23)."""
    attn = make("hybrid", step_shape="split", cache_prefill=False)
    gen = torch.Generator().manual_seed(23)
    a = attn.add_request(*(torch.randn(L, 40, HKV, D, generator=gen).to(DEV) for _ in "kv"))
    attn.plan([a], whole_step=True)
    for layer in range(L):
        attn.run(layer, *(torch.randn(1, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV)))
    attn.finish_step(wait=False)
    step = attn._step
    attn.close()
    assert step.finished and attn.kv is None


@pytest.mark.parametrize("placement", ["gpu", "hybrid/split"])
def test_plan_after_a_deferred_step_does_not_wait_for_it_before_completing_it(monkeypatch,
                                                                             placement):
    """On a GPU, the next plan()'s own work (tables, budgets, the page cache's rows) makes no
    synchronising call before it completes the deferred step, so it can run while that step does
    (CUDA only: torch's sync detection; a step in which no page fills, seed 29)."""
    if DEV.type != "cuda":
        pytest.skip("needs CUDA (sync detection)")
    name, _, shape = placement.partition("/")
    kw = {"step_shape": shape} if shape else {}
    whole = make(name, slots=3, cache_prefill=False, cached_steps=False, **kw)  # no device check
    gen = torch.Generator().manual_seed(29)
    a = whole.add_request(*(torch.randn(L, 37, HKV, D, generator=gen).to(DEV) for _ in "kv"))
    b = whole.add_request(*(torch.randn(L, 21, HKV, D, generator=gen).to(DEV) for _ in "kv"))
    real = whole._finish_whole
    seen = {}

    def finish(step, undo=True):
        seen["completed"] = True
        torch.cuda.set_sync_debug_mode("default")        # completing it synchronises, once
        return real(step, undo)
    try:
        for step in range(3):
            if step == 2:
                torch.cuda.synchronize()
                monkeypatch.setattr(whole, "_finish_whole", finish)
                torch.cuda.set_sync_debug_mode("error")
            whole.plan([a, b], whole_step=True)
            torch.cuda.set_sync_debug_mode("default")
            for layer in range(L):
                whole.run(layer, *(torch.randn(2, h, D, generator=gen).to(DEV)
                                   for h in (HQ, HKV, HKV)))
            whole.finish_step(wait=False)
        assert seen.get("completed")
    finally:
        torch.cuda.set_sync_debug_mode("default")
        whole.close()
