"""Micro-batches staggered by a layer (`runtime.micro_batches`, `HybridAttention.run_begin` /
`run_end`): runtimes over disjoint requests sharing one hand-off worker give, step after step, the
outputs, counters and page-cache state of ordinary steps of twin runtimes; the worker serves their
CPU parts in the order the GPU needs them (A(l), B(l), A(l + 1), ...); a failed CPU part undoes only
its own runtime's step; per-channel hand-off steps; misuse refused in one line. Without CUDA the
whole steps run eagerly with the stand-in hand-off (the same flag protocol).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_hybrid_attention import HKV, HQ, L, D, make
from test_runtime_transactions import Boom, assert_same, state
from test_whole_step import DEV, same_stats

from vortex_hybrid.handoff_words import ROW
from vortex_hybrid.runtime.handoff import StandInHandoff
from vortex_hybrid.runtime.micro_batches import MicroBatches

HOST = ["cpu", "offload", "hybrid/split", "hybrid/subbatch"]


def build(placement: str):
    """(part, twin) for each of two micro-batches: the parts share a worker, the twins run
    ordinary steps."""
    placement, _, shape = placement.partition("/")
    kw = {"step_shape": shape} if shape else {}
    kw["cache_prefill"] = False
    parts = [make(placement, slots=3, **kw) for _ in range(2)]
    twins = [make(placement, slots=3, **kw) for _ in range(2)]
    for t in twins:
        t._graphs = None
    return parts, twins


def add(parts, twins, sizes, gen):
    """Requests of `sizes[i]` tokens in part i and its twin (the same KV): [(part rids, twin rids)]."""
    out = []
    for p, t, ns in zip(parts, twins, sizes):
        pr, tr = [], []
        for n in ns:
            k, v = torch.randn(L, n, HKV, D, generator=gen), torch.randn(L, n, HKV, D, generator=gen)
            pr.append(p.add_request(k.to(DEV), v.to(DEV)))
            tr.append(t.add_request(k.to(DEV), v.to(DEV)))
        out.append((pr, tr))
    return out


def inputs(n, gen):
    return tuple(torch.randn(n, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV))


def staggered_step(mb, twins, rids, gen) -> None:
    """One step of both micro-batches in the staggered order, against the twins' ordinary steps."""
    mb.plan([pr for pr, _ in rids])
    for t, (_, tr) in zip(twins, rids):
        t.plan(tr)
    x = {(i, layer): inputs(len(pr), gen) for layer in range(L) for i, (pr, _) in enumerate(rids)}
    pend = [p.run_begin(0, *x[i, 0]) for i, p in enumerate(mb.parts)]
    for layer in range(L):
        for i, (p, t) in enumerate(zip(mb.parts, twins)):
            got = p.run_end(pend[i])
            torch.testing.assert_close(got, t.run(layer, *x[i, layer]), rtol=1e-5, atol=1e-6,
                                       msg=f"part {i} layer {layer}")
            if layer + 1 < L:
                pend[i] = p.run_begin(layer + 1, *x[i, layer + 1])
    mb.finish_step()


def steps_equal_twins(mb, twins, rids, gen, steps: int, check=None) -> None:
    """`steps` staggered steps, each part's counters equal to its twin's after each, then
    `check(step)`."""
    for step in range(steps):
        staggered_step(mb, twins, rids, gen)
        for p, t in zip(mb.parts, twins):
            same_stats(p, t)
        if check is not None:
            check(step)


def close_all(mb, twins):
    mb.close()
    for t in twins:
        t.close()


@pytest.mark.parametrize("placement", HOST)
def test_staggered_micro_batches_equal_ordinary_steps(monkeypatch, placement):
    """Ten steps (pages fill, are offloaded, cached, evicted) of two micro-batches staggered by a
    layer: each part's outputs, counters and page cache equal its twin's ordinary steps; the
    worker ran the CPU parts as A(l), B(l), A(l + 1), ... (those with a host part; in `cpu` every
    layer has one) (seed 3)."""
    parts, twins = build(placement)
    calls = []
    for i, p in enumerate(parts):
        real = p._whole_cpu_part
        monkeypatch.setattr(p, "_whole_cpu_part",
                            lambda layer, step, real=real, i=i: (calls.append((step, layer, i)),
                                                                 real(layer, step))[1])
    mb = MicroBatches(parts)
    gen = torch.Generator().manual_seed(3)
    rids = add(parts, twins, [(3, 40), (17, 30, 45)], gen)
    try:
        def same_cache(step):
            for p, t in zip(parts, twins):
                if p._cache is not None:
                    for a, b in zip(p._cache.state(0), t._cache.state(0)):
                        assert torch.equal(a, b), step
        steps_equal_twins(mb, twins, rids, gen, 10, same_cache)
        want = [(s, layer, i) for s in range(10) for layer in range(L) for i in range(2)]
        if placement == "cpu":          # every layer has a host part
            assert calls == want
        else:                           # layers with an empty host part call no CPU part
            assert calls == sorted(set(calls)) and set(calls) <= set(want)
        total = mb.stats()
        assert total["cpu_pages"] == sum(p.stats()["last_step"]["cpu_pages"] for p in parts)
    finally:
        close_all(mb, twins)


def test_a_cached_part_beside_a_split_one_equals_ordinary_steps():
    """Part A's cache holds its batch (its steps run `cached`: no layer published to the shared
    worker), part B's does not (split, with CPU parts): staggered steps across filled pages equal
    each twin's ordinary steps, outputs and counters (seed 13)."""
    kw = dict(budget=4, step_shape="split")     # "auto" explores shapes in ordinary steps only
    parts = [make("hybrid", slots=64, **kw), make("hybrid", slots=3, **kw)]
    twins = [make("hybrid", slots=64, **kw), make("hybrid", slots=3, **kw)]
    for t in twins:
        t._graphs = None
    mb = MicroBatches(parts)
    gen = torch.Generator().manual_seed(13)
    rids = add(parts, twins, [(21, 10), (17, 30, 45)], gen)
    try:
        def shapes(step):
            a, b = (p.stats()["last_step"] for p in parts)
            assert a["step_shape"] == "cached" and a["cpu_pages"] == 0, (step, a)
            assert b["step_shape"] != "cached", (step, b)
        steps_equal_twins(mb, twins, rids, gen, 6, shapes)
        assert parts[1].stats()["totals"]["cpu_pages"] > 0
    finally:
        close_all(mb, twins)


def test_a_failed_cpu_part_undoes_only_its_own_runtime(monkeypatch):
    """Part B's CPU part raises in layer 0: finish_step() raises it (after finishing A), B's
    requests are as before plan(), A's step stands (its outputs equal its twin's), and the next
    staggered step of both equals ordinary steps (seed 5)."""
    parts, twins = build("cpu")
    mb = MicroBatches(parts)
    gen = torch.Generator().manual_seed(5)
    rids = add(parts, twins, [(40,), (45,)], gen)
    try:
        before_b = state(parts[1])
        real = parts[1]._cpu_state
        fired = {"n": 0}

        def boom(*a, **kw):
            fired["n"] += 1
            if fired["n"] == 1:
                raise Boom("injected in part B")
            return real(*a, **kw)
        monkeypatch.setattr(parts[1], "_cpu_state", boom)
        mb.plan([pr for pr, _ in rids])
        twins[0].plan(rids[0][1])                 # B's twin skips the step B loses
        x = {(i, layer): inputs(1, gen) for layer in range(L) for i in range(2)}
        pend = [p.run_begin(0, *x[i, 0]) for i, p in enumerate(parts)]
        for layer in range(L):
            for i, p in enumerate(parts):
                got = p.run_end(pend[i])
                if i == 0:
                    torch.testing.assert_close(got, twins[0].run(layer, *x[0, layer]),
                                               rtol=1e-5, atol=1e-6)
                if layer + 1 < L:
                    pend[i] = p.run_begin(layer + 1, *x[i, layer + 1])
        with pytest.raises(Boom, match="injected in part B"):
            mb.finish_step()
        assert fired["n"] == 1
        assert_same(before_b, state(parts[1]))
        same_stats(parts[0], twins[0])
        staggered_step(mb, twins, rids, gen)
        for p, t in zip(parts, twins):
            same_stats(p, t)
    finally:
        close_all(mb, twins)


def test_lowest_sequence_number_is_served_first_across_channels():
    """While the worker is busy with channel 0's layer 0, channel 1's layer 0 and channel 0's
    layer 1 are published (in that order reversed): it serves channel 1's layer 0 next."""
    order, gate = [], threading.Event()

    def part(channel):
        def fn(layer, step):
            order.append((channel, layer))
            if (channel, layer) == (0, 0):
                assert gate.wait(5.0)
        return fn

    h = StandInHandoff(2, [part(0), part(1)], timeout_s=5.0)
    with h:
        h.begin_step()
        h.publish(0, channel=0)
        while not order:                     # the worker is inside channel 0's layer 0
            pass
        h.publish(1, channel=0)              # seq 2 on channel 0, published first
        h.publish(0, channel=1)              # seq 1 on channel 1
        gate.set()
        for layer in range(2):
            h.wait(layer, channel=0)
        h.wait(0, channel=1)
        h.publish(1, channel=1)
        h.wait(1, channel=1)
        h.finish_step()
    assert order == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_channels_open_and_fail_their_steps_independently():
    """Channel 1's CPU part raises: its finish_step raises it, channel 0's step finishes; each
    channel's step count is its own (channel 0 runs two steps while channel 1 runs one)."""
    out = np.zeros(2)

    def ok(layer, step):
        out[0] += 1

    def bad(layer, step):
        raise Boom(f"channel 1 layer {layer}")

    h = StandInHandoff(1, [ok, bad], timeout_s=1.0)
    with h:
        assert h.begin_step(1) == 0
        for s in range(2):
            assert h.begin_step(0) == s
            h.publish(0, channel=0)
            h.wait(0, channel=0)
            h.finish_step(0)
        h.publish(0, channel=1)
        h.wait(0, channel=1)
        with pytest.raises(Boom, match="channel 1 layer 0"):
            h.finish_step(1)
        assert h.steps == [1, 0] and out[0] == 2 and not h.in_step
        with pytest.raises(ValueError, match="channel=2 must be None"):
            h.begin_step(2)
        assert int(h.words[1 * ROW + 9]) == 0         # ERROR cleared: channel 1 runs again


def test_run_begin_and_run_end_refuse_misuse():
    """A second run_begin before run_end, and run_end of a layer that is not the open one, are
    refused in one line; run_begin / run_end outside whole steps equal run()."""
    a, b = make("cpu", slots=3), make("cpu", slots=3)
    gen = torch.Generator().manual_seed(9)
    k = torch.randn(L, 20, HKV, D, generator=gen)
    ra, rb = a.add_request(k.to(DEV), k.to(DEV)), b.add_request(k.to(DEV), k.to(DEV))
    try:
        a.plan([ra], whole_step=True)
        p0 = a.run_begin(0, *inputs(1, gen))
        with pytest.raises(ValueError, match="while layer 0 is begun and not ended"):
            a.run_begin(1, *inputs(1, gen))
        a.run_end(p0)
        with pytest.raises(ValueError, match="not the layer begun"):
            a.run_end(p0)
        with pytest.raises(ValueError, match="takes what run_begin"):
            a.run_end("layer 1")
        a.cancel_step()
        a.plan([ra])
        b.plan([rb])
        for layer in range(L):
            x = inputs(1, gen)
            torch.testing.assert_close(a.run_end(a.run_begin(layer, *x)), b.run(layer, *x))
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("placements, msg", [
    (["cpu"], "two or more"),
    (["gpu", "gpu"], "has no CPU part to overlap"),
    (["cpu", "hybrid"], "differ from part 0"),
])
def test_micro_batches_refuse_what_cannot_share_a_worker(placements, msg):
    parts = [make(p, slots=3) for p in placements]
    try:
        with pytest.raises(ValueError, match=msg):
            MicroBatches(parts)
    finally:
        for p in parts:
            p.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("overlap_back", [False, True])
@pytest.mark.parametrize("placement", ["cpu", "hybrid/split", "offload"])
def test_staggered_step_captured_in_one_cuda_graph_equals_ordinary_steps(placement, overlap_back):
    """Both micro-batches' layers, staggered, captured in one CUDA graph (the two hand-offs inside
    it), replayed step after step with new inputs: each part's outputs and counters equal its
    twin's ordinary steps (seed 13). overlap_back: each part's back parts (fetches, its own
    attention) on a stream of its own inside the graph, joined at run_end."""
    parts, twins = build(placement)
    mb = MicroBatches(parts, overlap_back=overlap_back)
    assert all((p._back_stream is not None) == overlap_back for p in parts)
    gen = torch.Generator().manual_seed(13)
    rids = add(parts, twins, [(3, 40), (17, 30, 45)], gen)
    graphs = {}
    try:
        for step in range(8):
            key = mb.plan([pr for pr, _ in rids])
            for t, (_, tr) in zip(twins, rids):
                t.plan(tr)
            sizes = [len(pr) for pr, _ in rids]
            ins = [[inputs(b, gen) for _ in range(L)] for b in sizes]
            if key not in graphs:
                bufs = [dict(q=torch.zeros(L, b, HQ, D, device="cuda"),
                             k=torch.zeros(L, b, HKV, D, device="cuda"),
                             v=torch.zeros(L, b, HKV, D, device="cuda"),
                             out=torch.zeros(L, b, HQ, D, device="cuda")) for b in sizes]
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    pend = [p.run_begin(0, bf["q"][0], bf["k"][0], bf["v"][0])
                            for p, bf in zip(parts, bufs)]
                    for layer in range(L):
                        for i, (p, bf) in enumerate(zip(parts, bufs)):
                            bf["out"][layer].copy_(p.run_end(pend[i]))
                            if layer + 1 < L:
                                pend[i] = p.run_begin(layer + 1, bf["q"][layer + 1],
                                                      bf["k"][layer + 1], bf["v"][layer + 1])
                graphs[key] = (g, bufs)
            g, bufs = graphs[key]
            for bf, part_ins in zip(bufs, ins):
                for layer, (q, kn, vn) in enumerate(part_ins):
                    bf["q"][layer].copy_(q)
                    bf["k"][layer].copy_(kn)
                    bf["v"][layer].copy_(vn)
            g.replay()
            mb.finish_step()
            for i, (t, bf) in enumerate(zip(twins, bufs)):
                for layer, x in enumerate(ins[i]):
                    torch.testing.assert_close(bf["out"][layer], t.run(layer, *x).float(),
                                               rtol=1e-5, atol=1e-6,
                                               msg=f"step {step} part {i} layer {layer}")
                same_stats(parts[i], t)
        assert len(graphs) == 1
    finally:
        close_all(mb, twins)
