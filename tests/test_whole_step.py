"""Whole decode steps (`runtime.whole_step`): a step planned with `plan(rids, whole_step=True)` runs
every layer over static buffers without synchronising (captured in one CUDA graph on a GPU, run
eagerly here), the CPU hand-off through the flag protocol. Such steps give the outputs, cache
decisions and counters of ordinary steps in every placement, with the flow's selection or a given
one; a failed CPU part or a step whose layers did not run is undone; misuse is refused in one line.
"""

from __future__ import annotations

import pytest
import torch
from test_hybrid_attention import HKV, HQ, L, D, P, make
from test_runtime_transactions import Boom, assert_same, state

PLACEMENTS = ["dense", "gpu", "cpu", "offload", "hybrid/split", "hybrid/subbatch"]
TIMING = ("gpu_wait_s", "step_host_s", "cpu_part_s", "cpu_kernel_s")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pair(placement: str, flow: str = "quest"):
    placement, _, shape = placement.partition("/")       # a fixed shape: "auto" follows timings
    kw = {"step_shape": shape} if shape else {}
    kw["flow"] = flow
    # Cold caches: the undo tests compare counters after an undone step with a twin's, and an
    # undo frees the slots the failed step took (their copies were being overwritten), so caches
    # warmed by the prefill would then differ in what they hold (never in outputs).
    kw["cache_prefill"] = False
    whole, eager = make(placement, slots=3, **kw), make(placement, slots=3, **kw)
    eager._graphs = None
    return whole, eager


def three_requests(whole, eager, gen) -> dict:
    """Requests of 3, 17 and 30 tokens, the same KV in both runtimes: {tokens: (rid, rid)}."""
    rids = {}
    for n in (3, 17, 30):
        k, v = torch.randn(L, n, HKV, D, generator=gen), torch.randn(L, n, HKV, D, generator=gen)
        rids[n] = (whole.add_request(k.to(DEV), v.to(DEV)), eager.add_request(k.to(DEV), v.to(DEV)))
    return rids


def two_requests(whole, eager, gen) -> tuple[list, list]:
    """Requests of 40 and 45 tokens (full pages on the host), the same KV in both runtimes."""
    ws, es = [], []
    for n in (40, 45):
        k, v = torch.randn(L, n, HKV, D, generator=gen), torch.randn(L, n, HKV, D, generator=gen)
        ws.append(whole.add_request(k.to(DEV), v.to(DEV)))
        es.append(eager.add_request(k.to(DEV), v.to(DEV)))
    return ws, es


def ordinary_step_equals(whole, eager, ws, es, gen) -> None:
    """One whole step (run eagerly) and one ordinary step: equal outputs and counters."""
    whole.plan(ws, whole_step=True)
    eager.plan(es)
    for layer in range(L):
        q, kn, vn = (torch.randn(len(ws), h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV))
        torch.testing.assert_close(whole.run(layer, q, kn, vn), eager.run(layer, q, kn, vn),
                                   rtol=1e-5, atol=1e-6)
    whole.finish_step()
    same_stats(whole, eager)


def given_sel(attn, rids) -> torch.Tensor:
    """The first two and the last page of each request (a replayed selection)."""
    n_pages = [-(-attn.kv.seq_len(r) // P) for r in rids]
    return torch.tensor([[[0, min(1, n - 1) if n > 1 else -1, n - 1]
                          if n > 2 else [0, n - 1 if n > 1 else -1, -1]] * HKV
                         for n in n_pages], dtype=torch.int32, device=DEV)


def same_stats(whole, eager, shape: bool = True) -> None:
    """The two runtimes' last steps counted the same; shape=False: whatever shape each ran
    (a fixed-shape step never runs `cached`, an ordinary one may: the counts still agree)."""
    a, b = whole.stats()["last_step"], eager.stats()["last_step"]
    skip = set(TIMING) if shape else set(TIMING) | {"step_shape", "steps_split", "steps_cached"}
    assert {k: v for k, v in a.items() if k not in skip} == \
        {k: v for k, v in b.items() if k not in skip}


@pytest.mark.parametrize("placement,flow", [(p, "quest") for p in PLACEMENTS] +
                         [(p, "lowbit") for p in ("gpu", "offload", "hybrid/split")])
@pytest.mark.parametrize("replay", [False, True])
def test_whole_steps_equal_ordinary_steps(placement, flow, replay):
    """Twelve steps (pages fill, are offloaded, cached and evicted; the batch shape changes and
    comes back): the same outputs, the same counters, the same page-cache state (seed 7); with
    quest, and with lowbit (packed codes, its fused kernels)."""
    if replay and placement == "dense":
        pytest.skip("dense attends every page")
    whole, eager = pair(placement, flow)
    gen = torch.Generator().manual_seed(7)
    rids = three_requests(whole, eager, gen)
    keys = set()
    try:
        for step in range(12):
            batch = [rids[n] for n in ((3, 17, 30) if step % 4 != 3 else (17, 30))]
            keys.add(whole.plan([w for w, _ in batch], whole_step=True))
            eager.plan([e for _, e in batch])
            for layer in range(L):
                q, kn, vn = (torch.randn(len(batch), h, D, generator=gen).to(DEV)
                             for h in (HQ, HKV, HKV))
                sel = given_sel(whole, [w for w, _ in batch]) if replay else None
                a = whole.run(layer, q, kn, vn, sel=sel)
                b = eager.run(layer, q, kn, vn, sel=sel)
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step} layer {layer}")
            whole.finish_step()
            same_stats(whole, eager)
            if whole._cache is not None:
                for t, u in zip(whole._cache.state(0), eager._cache.state(0)):
                    assert torch.equal(t, u), step
        assert len(keys) == 2           # two batch shapes, each one key
        assert all(k is not None and hash(k) is not None for k in keys)
    finally:
        whole.close()
        eager.close()


@pytest.mark.parametrize("placement", ["cpu", "hybrid/split", "offload"])
def test_a_failed_cpu_part_undoes_the_whole_step(monkeypatch, placement):
    """The CPU part raises inside the hand-off: finish_step() re-raises that exception (same type,
    a note naming the layer), every request is as before plan(), and the next step equals an
    ordinary one (seed 11)."""
    whole, eager = pair(placement)
    gen = torch.Generator().manual_seed(11)
    ws, es = two_requests(whole, eager, gen)
    try:
        before = state(whole)
        real = whole._cpu_state
        calls = {"n": 0}

        def boom(*args, **kw):
            calls["n"] += 1
            if calls["n"] == 1:
                raise Boom("injected in the CPU part")
            return real(*args, **kw)
        monkeypatch.setattr(whole, "_cpu_state", boom)
        whole.plan(ws, whole_step=True)
        for layer in range(L):
            q, kn, vn = (torch.randn(2, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV))
            whole.run(layer, q, kn, vn)
        with pytest.raises(Boom, match="injected") as info:
            whole.finish_step()
        assert any("CPU part of layer" in n for n in getattr(info.value, "__notes__", []))
        assert calls["n"] >= 1
        assert_same(before, state(whole))
        ordinary_step_equals(whole, eager, ws, es, gen)
    finally:
        whole.close()
        eager.close()


@pytest.mark.parametrize("placement", ["gpu", "hybrid"])
def test_a_step_whose_layers_did_not_run_is_refused_and_undone(placement):
    attn = make(placement, cache_prefill=False)     # an undo frees the slots a step took: see pair
    try:
        gen = torch.Generator().manual_seed(3)
        rid = attn.add_request(*(torch.randn(L, 20, HKV, D, generator=gen).to(DEV) for _ in "kv"))
        before = state(attn)
        attn.plan([rid], whole_step=True)
        q, kn, vn = (torch.randn(1, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV))
        attn.run(0, q, kn, vn)                      # one layer of two
        with pytest.raises(RuntimeError, match=f"1 of {L} layers of the step ran"):
            attn.finish_step()
        assert_same(before, state(attn))
        with pytest.raises(ValueError, match="finish_step\\(\\) ends a step planned with"):
            attn.finish_step()
        attn.plan([rid])                            # an ordinary step is not finished by it
        with pytest.raises(ValueError, match="finish_step\\(\\) ends a step planned with"):
            attn.finish_step()
    finally:
        attn.close()


def test_an_unfinished_whole_step_is_replaced_by_the_next_plan_and_refuses_request_changes():
    attn = make("hybrid", step_shape="split", cache_prefill=False)   # (see pair)
    try:
        gen = torch.Generator().manual_seed(4)
        rid = attn.add_request(*(torch.randn(L, 33, HKV, D, generator=gen).to(DEV) for _ in "kv"))
        before = state(attn)
        attn.plan([rid], whole_step=True)
        for layer in range(L):
            attn.run(layer, *(torch.randn(1, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV)))
        with pytest.raises(ValueError, match="in the current step \\(finish_step\\(\\) not called yet"):
            attn.remove_request(rid)
        with pytest.raises(ValueError, match="planned whole \\(finish_step\\(\\) not called yet\\)"):
            attn.add_request(*(torch.zeros(L, 1, HKV, D).to(DEV) for _ in "kv"))
        attn.cancel_step()                          # the step ran, but it is undone whole
        assert_same(before, state(attn))
        attn.plan([rid], whole_step=True)
        attn.plan([rid], whole_step=True)           # replaced before any layer ran
        for layer in range(L):
            attn.run(layer, *(torch.randn(1, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV)))
        attn.finish_step()
        assert attn.kv.seq_len(rid) == 34
    finally:
        attn.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("replay", [False, True])
def test_whole_steps_captured_in_one_cuda_graph_equal_ordinary_steps(placement, replay):
    """Every layer's run() of a step captured in one CUDA graph per key (the CPU hand-off inside
    it), replayed step after step with new inputs: the ordinary steps' outputs and counters."""
    if replay and placement == "dense":
        pytest.skip("dense attends every page")
    whole, eager = pair(placement)
    gen = torch.Generator().manual_seed(9)
    rids = three_requests(whole, eager, gen)
    graphs = {}
    try:
        for step in range(12):
            batch = [rids[n] for n in ((3, 17, 30) if step % 4 != 3 else (17, 30))]
            B = len(batch)
            key = whole.plan([w for w, _ in batch], whole_step=True)
            eager.plan([e for _, e in batch])
            ins = [tuple(torch.randn(B, h, D, generator=gen).cuda() for h in (HQ, HKV, HKV))
                   for _ in range(L)]
            sels = [given_sel(whole, [w for w, _ in batch]) if replay else None
                    for _ in range(L)]
            if key not in graphs:
                buf = dict(q=torch.zeros(L, B, HQ, D, device="cuda"),
                           k=torch.zeros(L, B, HKV, D, device="cuda"),
                           v=torch.zeros(L, B, HKV, D, device="cuda"),
                           sel=torch.zeros(L, B, HKV, 3, dtype=torch.int32, device="cuda"),
                           out=torch.zeros(L, B, HQ, D, device="cuda"))
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for layer in range(L):
                        buf["out"][layer].copy_(whole.run(
                            layer, buf["q"][layer], buf["k"][layer], buf["v"][layer],
                            sel=buf["sel"][layer] if replay else None))
                graphs[key] = (g, buf)
            g, buf = graphs[key]
            for layer, (q, kn, vn) in enumerate(ins):
                buf["q"][layer].copy_(q)
                buf["k"][layer].copy_(kn)
                buf["v"][layer].copy_(vn)
                if replay:
                    buf["sel"][layer].copy_(sels[layer])
            g.replay()
            whole.finish_step()
            for layer, (q, kn, vn) in enumerate(ins):
                b = eager.run(layer, q, kn, vn, sel=sels[layer])
                torch.testing.assert_close(buf["out"][layer], b.float(), rtol=1e-5, atol=1e-6,
                                           msg=f"step {step} layer {layer}")
            same_stats(whole, eager)
        assert len(graphs) == 2
    finally:
        whole.close()
        eager.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_run_inside_a_capture_needs_a_whole_step():
    attn = make("gpu")
    try:
        rid = attn.add_request(*(torch.randn(L, 20, HKV, D).cuda() for _ in "kv"))
        attn.plan([rid])
        q, kn, vn = (torch.randn(1, h, D).cuda() for h in (HQ, HKV, HKV))
        g = torch.cuda.CUDAGraph()
        with pytest.raises(ValueError, match="whole_step=True"):
            with torch.cuda.graph(g):
                attn.run(0, q, kn, vn)
    finally:
        attn.close()


@pytest.mark.parametrize("placement", ["offload", "hybrid/split"])
def test_a_whole_step_failing_inside_a_layer_is_undone_with_that_layers_cache(monkeypatch,
                                                                              placement):
    """Run eagerly, a whole step whose second layer fails inside its page-cache step (after that
    layer's checkpoint and first changes): the step is undone, the failing layer's cache included,
    and the next step equals an ordinary one (seed 13)."""
    whole, eager = pair(placement)
    gen = torch.Generator().manual_seed(13)
    ws, es = two_requests(whole, eager, gen)
    try:
        before = state(whole)
        real, calls = whole._cache.step, {"n": 0}

        def step_then_boom(layer, *args, **kw):
            calls["n"] += 1
            out = real(layer, *args, **kw)            # the layer's cache state has changed
            if layer == 1:
                raise Boom("injected after layer 1's cache step")
            return out
        monkeypatch.setattr(whole._cache, "step", step_then_boom)
        whole.plan(ws, whole_step=True)
        q, kn, vn = (torch.randn(2, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV))
        whole.run(0, q, kn, vn)
        with pytest.raises(Boom):
            whole.run(1, q, kn, vn)
        assert calls["n"] == 2
        assert_same(before, state(whole))
        monkeypatch.setattr(whole._cache, "step", real)
        ordinary_step_equals(whole, eager, ws, es, gen)
    finally:
        whole.close()
        eager.close()


def test_the_cpu_parts_of_an_undone_step_are_passed_over_not_served_later():
    """hybrid: a whole step whose second layer never ran (finish_step refuses it) leaves its
    unpublished sequence numbers abandoned, so the next step's CPU parts are exactly its own:
    the same counters as an ordinary step (seed 17)."""
    whole, eager = pair("hybrid/split")
    gen = torch.Generator().manual_seed(17)
    ws, es = two_requests(whole, eager, gen)
    try:
        calls = []
        real = whole._cpu_state
        whole._cpu_state = lambda layer, *a, **kw: (calls.append(layer), real(layer, *a, **kw))[1]
        whole.plan(ws, whole_step=True)
        whole.run(0, *(torch.randn(2, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV)))
        with pytest.raises(RuntimeError, match=f"1 of {L} layers"):
            whole.finish_step()
        calls.clear()
        ordinary_step_equals(whole, eager, ws, es, gen)
        assert calls == list(range(L)), calls          # one CPU part per layer, in order
    finally:
        whole.close()
        eager.close()


def test_a_whole_step_whose_host_parts_are_empty_equals_an_ordinary_step():
    """Every page cached by the prefill (hybrid, slots for all of them): each layer's CPU part has
    nothing to attend and answers an empty state; outputs and counters equal an ordinary step's,
    and the CPU attended no page (seed 11)."""
    whole, eager = make("hybrid", slots=16), make("hybrid", slots=16)
    eager._graphs = None
    gen = torch.Generator().manual_seed(11)
    try:
        ws, es = two_requests(whole, eager, gen)
        ordinary_step_equals(whole, eager, ws, es, gen)
        assert whole.stats()["last_step"]["cpu_pages"] == 0
        assert whole.stats()["last_step"]["cpu_calls"] == 0
    finally:                            # the hand-off worker's thread ends with the runtime
        whole.close()
        eager.close()
