"""HybridAttention: every placement returns the reference output over the same selection, across
random batches with requests joining and leaving, caches down to one slot, pages filling, being
summarised, offloaded, cached and evicted; request isolation; the fault cases."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from vortex_hybrid import HybridAttention, HybridConfig, reference, vflow
from vortex_hybrid.runtime.fixed_shape import FixedShape

L, HQ, HKV, D, P = 2, 4, 2, 8, 4
PLACEMENTS = ["dense", "gpu", "cpu", "offload", "hybrid"]


def make(placement: str, slots: int = 4, costs=None, **kw) -> HybridAttention:
    cfg = HybridConfig(page_size=P, flow=kw.pop("flow", "quest"), budget_pages=kw.pop("budget", 4),
                       budget_ratio=None, sink_pages=1, recent_pages=2, placement=placement,
                       gpu_cache_pages=slots if placement in ("offload", "hybrid") else 256,
                       kv_dtype="float32", **kw)
    return HybridAttention(cfg, L, HQ, HKV, D, device_pages=64 + slots, host_pages=256, costs=costs)


class Shadow:
    """The authoritative KV of every request, kept by the test, and the reference step output."""

    def __init__(self, attn: HybridAttention, seed: int):
        self.attn, self.gen = attn, torch.Generator().manual_seed(seed)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.gen)

    def add(self, tokens: int) -> int:
        k, v = self.rand(L, tokens, HKV, D), self.rand(L, tokens, HKV, D)
        rid = self.attn.add_request(k.to(self.attn.device), v.to(self.attn.device))
        self.kv[rid] = (k, v)
        return rid

    def remove(self, rid: int) -> None:
        self.attn.remove_request(rid)
        del self.kv[rid]

    def step(self, rids: list[int], reference=None) -> float:
        """One decode step through the runtime; returns the worst relative error vs the reference
        (`reference_output`, or a function of the same arguments)."""
        attn, cfg = self.attn, self.attn.cfg
        attn.plan(rids)
        worst, grown = 0.0, {r: ([], []) for r in rids}
        for layer in range(L):
            q, kn, vn = (self.rand(len(rids), h, D) for h in (HQ, HKV, HKV))
            dev = attn.device
            o = attn.run(layer, q.to(dev), kn.to(dev), vn.to(dev)).cpu()
            for b, rid in enumerate(rids):
                k = torch.cat([self.kv[rid][0][layer], kn[b:b + 1]])      # [T + 1, Hkv, D]
                v = torch.cat([self.kv[rid][1][layer], vn[b:b + 1]])
                grown[rid][0].append(k)
                grown[rid][1].append(v)
                want = (reference or reference_output)(cfg, q[b:b + 1], k, v)
                worst = max(worst, ((o[b] - want).norm() / want.norm().clamp_min(1e-30)).item())
        for rid, (ks, vs) in grown.items():
            self.kv[rid] = (torch.stack(ks), torch.stack(vs))
        return worst


def reference_output(cfg: HybridConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     select=None):
    """float64 attention of q [1, Hq, D] over the pages the flow selects from k, v [T, Hkv, D]
    (`select(cfg, q, k_pages, table, lens, num_pages)` instead of `vflow.select_pages` if given)."""
    T = k.shape[0]
    n = -(-T // P)
    pad = n * P - T
    kp = torch.cat([k, torch.zeros(pad, HKV, D)]).reshape(n, P, HKV, D).transpose(1, 2).contiguous()
    vp = torch.cat([v, torch.zeros(pad, HKV, D)]).reshape(n, P, HKV, D).transpose(1, 2).contiguous()
    table = torch.arange(n, dtype=torch.int32)[None]
    lens = torch.tensor([T], dtype=torch.int32)
    if cfg.placement == "dense":
        sel = reference.all_pages_sel(lens, HKV, n, P)
    elif select is not None:
        sel = select(cfg, q, kp, table, lens, n)
    else:
        sel = vflow.select_pages(cfg.flow, q, kp, table, lens, cfg.budget_for(n), cfg.sink_pages,
                                 cfg.recent_pages, summary_dtype=getattr(torch, cfg.summary_dtype))
    o, _ = reference.sparse_decode_attention(q.double(), kp.double(), vp.double(), table, lens, sel)
    return o[0].float()


@pytest.mark.parametrize("placement", PLACEMENTS + ["hybrid/split", "hybrid/subbatch"])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), slots=st.integers(1, 6),
       ops=st.lists(st.tuples(st.sampled_from(["add", "step", "step", "remove"]),
                              st.integers(0, 3 * P + 2)), min_size=3, max_size=10))
def test_every_placement_returns_the_reference_over_the_same_selection(placement, seed, slots, ops):
    placement, _, shape = placement.partition("/")          # hybrid alone: "auto", both shapes
    attn = make(placement, slots, **({"step_shape": shape} if shape else {}))
    shadow = Shadow(attn, seed)
    live: list[int] = []
    for op, n in ops:
        if op == "add" or not live:
            live.append(shadow.add(n))
        elif op == "remove" and len(live) > 1:
            shadow.remove(live.pop(n % len(live)))
        else:
            for _ in range(1 + n % 3):
                err = shadow.step(list(live))
                assert err < 1e-5, f"{placement} seed {seed}: relative error {err:.2e}"
    attn.close()


@pytest.mark.parametrize("placement", ["gpu", "cpu", "offload", "hybrid"])
@pytest.mark.parametrize("flow", ["streaming", "centroid"])
def test_other_flows_return_the_reference_as_pages_fill(placement, flow):
    """Flows without summaries (streaming) or with other summaries (centroid) run in every sparse
    placement while the new tokens fill pages."""
    attn = make(placement, flow=flow)
    shadow = Shadow(attn, 21)
    rids = [shadow.add(29), shadow.add(14)]
    for _ in range(2 * P + 1):
        err = shadow.step(rids)
        assert err < 1e-5, f"{placement} {flow}: relative error {err:.2e}"
    attn.close()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_prefill_in_chunks_equals_one_prefill(placement):
    """extend_request (a chunked prefill's next chunks, e.g. from SGLang) leaves the request as if
    its whole prompt came in one add_request: steps equal the reference over the same selection."""
    attn = make(placement)
    shadow = Shadow(attn, 31)
    whole = shadow.add(0)
    k, v = shadow.rand(L, 3 * P + 3, HKV, D), shadow.rand(L, 3 * P + 3, HKV, D)
    for a, b in ((0, 5), (5, 5), (5, 3 * P + 3)):            # an empty chunk, a page border
        attn.extend_request(whole, k[:, a:b].to(attn.device), v[:, a:b].to(attn.device))
    shadow.kv[whole] = (k, v)
    other = shadow.add(2 * P + 1)
    for _ in range(P + 1):
        assert shadow.step([whole, other]) < 1e-5
    k, v = k.to(attn.device), v.to(attn.device)
    with pytest.raises(ValueError, match="unknown request id 99"):
        attn.extend_request(99, k, v)
    with pytest.raises(ValueError, match="k must be a float tensor"):
        attn.extend_request(whole, k[:1], v[:1])
    attn.close()


@pytest.mark.parametrize("placement", ["gpu", "hybrid"])
def test_planning_again_before_layer_0_replaces_the_unrun_plan(placement):
    """plan() twice (a scheduler changing its mind) leaves no unwritten token behind."""
    attn = make(placement)
    shadow = Shadow(attn, 4)
    rids = [shadow.add(13), shadow.add(20)]
    attn.plan(rids)
    attn.plan(rids[:1])
    assert [attn.kv.seq_len(r) for r in rids] == [14, 20]
    assert shadow.step(rids) < 1e-5                 # Shadow.step plans once more
    assert [attn.kv.seq_len(r) for r in rids] == [14, 21]
    attn.close()


@pytest.mark.parametrize("placement", ["cpu", "offload", "hybrid"])
def test_host_placements_use_both_paths_and_count_them(placement):
    attn = make(placement, slots=2, budget=4)
    shadow = Shadow(attn, 7)
    rids = [shadow.add(40), shadow.add(9)]
    for _ in range(6):
        assert shadow.step(rids) < 1e-5
    s = attn.stats()
    last, total = s["last_step"], s["totals"]
    assert total["steps"] == 6 and last["gpu_pages"] > 0
    attn.plan(rids)                       # the hand-off order follows the last step's bytes
    order = attn._step.launch_order
    if placement == "cpu":
        assert total["cpu_pages"] > 0 and total["fetched_pages"] == 0
        assert order == ("cpu", "gpu")
    if placement == "offload":
        assert total["fetched_pages"] > 0 and total["bytes_h2d"] > 0
        if last["cpu_pages"] == 0:
            assert order == ("gpu", "cpu")
    if placement in ("offload", "hybrid"):
        assert total["cache_hits"] + total["cache_misses"] > 0
    attn.close()


def test_cpu_worker_fault_undoes_the_step_and_the_next_step_works(monkeypatch):
    attn = make("cpu")
    shadow = Shadow(attn, 3)
    rids = [shadow.add(30)]
    assert shadow.step(rids) < 1e-5

    def boom(*args):
        raise ZeroDivisionError("cpu kernel failed")

    monkeypatch.setattr(attn, "_cpu_attend", boom)
    attn.plan(rids)
    with pytest.raises(ZeroDivisionError, match="cpu kernel failed"):
        attn.run(0, *(torch.randn(1, h, D).to(attn.device) for h in (HQ, HKV, HKV)))
    monkeypatch.undo()
    assert attn.kv.seq_len(rids[0]) == 31          # the failed step's token is gone at once
    assert shadow.step(rids) < 1e-5
    assert attn.kv.seq_len(rids[0]) == 32
    attn.close()


def test_a_flow_that_reads_page_keys_is_refused_at_construction():
    with pytest.raises(ValueError, match="flow 'oracle' reads page keys when it selects"):
        make("gpu", flow="oracle")


def test_api_misuse_is_refused_with_the_argument_named():
    attn = make("gpu")
    rid = attn.add_request(*(torch.randn(L, 5, HKV, D, device=attn.device) for _ in "kv"))
    q, kn = torch.randn(1, HQ, D).to(attn.device), torch.randn(1, HKV, D).to(attn.device)
    with pytest.raises(ValueError, match="run\\(\\) needs a plan"):
        attn.run(0, q, kn, kn)
    with pytest.raises(ValueError, match="unknown request id 99"):
        attn.plan([rid, 99])
    with pytest.raises(ValueError, match="rids lists a request twice"):
        attn.plan([rid, rid])
    attn.plan([rid])
    with pytest.raises(ValueError, match="layer=1: layers run in order; layer 0 is next"):
        attn.run(1, q, kn, kn)
    with pytest.raises(ValueError, match="q must be a float tensor \\[1, 4, 8\\]"):
        attn.run(0, torch.randn(2, HQ, D).to(attn.device), kn, kn)
    with pytest.raises(ValueError, match="k_new must be a float tensor"):
        attn.run(0, q, torch.randn(1, HKV, D + 1).to(attn.device), kn)
    if attn.device.type == "cuda":
        with pytest.raises(ValueError, match="q is on cpu; the runtime's device is cuda"):
            attn.run(0, q.cpu(), kn, kn)
    attn.run(0, q, kn, kn)
    with pytest.raises(ValueError, match=f"request {rid} is in the current step"):
        attn.remove_request(rid)
    attn.run(1, q, kn, kn)
    attn.remove_request(rid)
    with pytest.raises(ValueError, match="k must be a float tensor \\[2, T, 2, 8\\]"):
        attn.add_request(*(torch.randn(L, 5, HKV + 1, D, device=attn.device) for _ in "kv"))
    with pytest.raises(ValueError, match="num_q_heads=5 must be a multiple of num_kv_heads=2"):
        HybridAttention(HybridConfig(), L, 5, 2, D)


def test_pinned_memory_beyond_the_cap_is_refused_before_allocating():
    cfg = HybridConfig(page_size=P, placement="cpu", host_memory_gib=1e-6, kv_dtype="float32")
    with pytest.raises(ValueError, match="host_pages=1000 .* exceed host_memory_gib=1e-06"):
        HybridAttention(cfg, L, HQ, HKV, D, device_pages=8, host_pages=1000)


def test_requests_never_read_each_others_pages():
    """Two requests whose values differ in scale: each output stays in its own value range, and
    every cached slot belongs to the request that fetched it."""
    attn = make("hybrid", slots=3, budget=3)
    gen = torch.Generator().manual_seed(11)
    dev = attn.device
    small = attn.add_request(torch.randn(L, 33, HKV, D, generator=gen).to(dev),
                             torch.full((L, 33, HKV, D), 0.001, device=dev))
    big = attn.add_request(torch.randn(L, 33, HKV, D, generator=gen).to(dev),
                           torch.full((L, 33, HKV, D), 1000.0, device=dev))
    for _ in range(4):
        attn.plan([small, big])
        for layer in range(L):
            o = attn.run(layer, *(t.to(attn.device) for t in (
                torch.randn(2, HQ, D, generator=gen), torch.randn(2, HKV, D, generator=gen),
                torch.full((2, HKV, D), 0.001))))
            assert o[0].abs().max() < 0.01 and o[1].abs().max() > 10
        cache = attn._cache
        for layer in range(L):
            for rid in (small, big):
                for p in cache.pages_of(rid, layer).tolist():
                    assert p < attn.kv.num_pages(rid)
            owners = cache.owner[layer].cpu()
            used = owners[:, 0] >= 0
            for slot in used.nonzero().flatten().tolist():       # slot -> (request, page) -> slot
                r, p = owners[slot].tolist()
                assert int(cache.slot_of[layer, r, p]) == slot
    attn.close()


@pytest.mark.parametrize("index_given", [False, True])
@pytest.mark.parametrize("placement", ["gpu", "cpu", "offload", "hybrid"])
def test_a_given_selection_is_attended_exactly(placement, index_given):
    """run(..., sel=) replays a selection (benchmarks): the output is the reference over it; with
    `index_given` the flow's indexer still runs on every layer (its cost paid) and its choice is
    dropped."""
    attn = make(placement, slots=2)
    attn.index_given = index_given
    indexed = []
    index = attn.store.index
    attn.store.index = lambda layer, *a, **kw: indexed.append(layer) or index(layer, *a, **kw)
    gen = torch.Generator().manual_seed(21)
    lens = (29, 12)
    kv = [(torch.randn(L, n, HKV, D, generator=gen), torch.randn(L, n, HKV, D, generator=gen))
          for n in lens]
    rids = [attn.add_request(k.to(attn.device), v.to(attn.device)) for k, v in kv]
    attn.plan(rids)
    for layer in range(L):
        q, kn, vn = (torch.randn(2, h, D, generator=gen) for h in (HQ, HKV, HKV))
        sel = torch.tensor([[[0, 3, 7, -1], [7, 5, -1, -1]], [[0, 1, 3, -1], [2, -1, -1, -1]]],
                           dtype=torch.int32)
        o = attn.run(layer, *(t.to(attn.device) for t in (q, kn, vn)), sel=sel.to(attn.device))
        for b, (k, v) in enumerate(kv):
            kk = torch.cat([k[layer], kn[b:b + 1]])
            vv = torch.cat([v[layer], vn[b:b + 1]])
            T = kk.shape[0]
            n = -(-T // P)
            pad = n * P - T
            kp = torch.cat([kk, torch.zeros(pad, HKV, D)]).reshape(n, P, HKV, D).transpose(1, 2)
            vp = torch.cat([vv, torch.zeros(pad, HKV, D)]).reshape(n, P, HKV, D).transpose(1, 2)
            want, _ = reference.sparse_decode_attention(
                q[b:b + 1].double(), kp.double().contiguous(), vp.double().contiguous(),
                torch.arange(n, dtype=torch.int32)[None], torch.tensor([T], dtype=torch.int32),
                sel[b:b + 1])
            err = ((o[b].cpu() - want[0]).norm() / want[0].norm()).item()
            assert err < 1e-5, (placement, layer, b, err)
    last = attn.stats()["last_step"]                # every selected page-head counted once
    assert last["gpu_pages"] + last["cpu_pages"] == 9 * L, last
    assert indexed == (list(range(L)) if index_given else []), indexed
    attn.close()


def test_a_bad_given_selection_is_refused():
    attn = make("gpu")
    dev = attn.device
    rid = attn.add_request(*(torch.randn(L, 9, HKV, D, device=dev) for _ in "kv"))
    attn.plan([rid])
    args = [torch.randn(1, h, D).to(dev) for h in (HQ, HKV, HKV)]
    with pytest.raises(ValueError, match="sel\\[0, 1, 0\\]=3 is not a page of request"):
        attn.run(0, *args, sel=torch.tensor([[[0, 1], [3, -1]]], dtype=torch.int32, device=dev))
    with pytest.raises(ValueError, match="sel lists a page twice"):
        attn.run(0, *args, sel=torch.tensor([[[0, 0], [1, -1]]], dtype=torch.int32, device=dev))
    with pytest.raises(ValueError, match="sel must be an int32 tensor \\[1, 2, K\\]"):
        attn.run(0, *args, sel=torch.zeros(1, 3, 2, dtype=torch.int32, device=dev))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("placement", ["dense", "gpu", "cpu", "offload", "hybrid/split",
                                       "hybrid/subbatch"])
@pytest.mark.parametrize("replay", [False, True])
def test_cuda_graph_steps_equal_eager_steps(placement, replay):
    """The captured per-layer work (whole layers, or the two parts around the CPU hand-off) gives
    the eager outputs and the same cache decisions, step after step (pages fill, get offloaded,
    cached and evicted; batch shapes change and come back), with the flow's selection or a
    replayed one."""
    if replay and placement == "dense":
        pytest.skip("dense attends every page")
    placement, _, shape = placement.partition("/")       # a fixed shape: "auto" follows timings
    kw = {"step_shape": shape} if shape else {}
    graphed, eager = make(placement, slots=3, **kw), make(placement, slots=3, **kw)
    eager._graphs = None
    assert graphed._graphs is not None
    gen = torch.Generator().manual_seed(5)
    rids = {}
    for n in (3, 17, 30):
        k, v = torch.randn(L, n, HKV, D, generator=gen), torch.randn(L, n, HKV, D, generator=gen)
        k, v = k.cuda(), v.cuda()
        rids[n] = (graphed.add_request(k, v), eager.add_request(k, v))
    for step in range(12):
        batch = [rids[n] for n in ((3, 17, 30) if step % 4 != 3 else (17, 30))]
        graphed.plan([g for g, _ in batch])
        eager.plan([e for _, e in batch])
        for layer in range(L):
            q, kn, vn = (torch.randn(len(batch), h, D, generator=gen).cuda() for h in (HQ, HKV, HKV))
            sel = None
            if replay:                      # the first two and the last page of each request
                n_pages = [-(-graphed.kv.seq_len(g) // P) for g, _ in batch]
                sel = torch.tensor([[[0, min(1, n - 1) if n > 1 else -1, n - 1]
                                     if n > 2 else [0, n - 1 if n > 1 else -1, -1]] * HKV
                                    for n in n_pages], dtype=torch.int32, device="cuda")
            a = graphed.run(layer, q, kn, vn, sel=sel)
            b = eager.run(layer, q, kn, vn, sel=sel)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (step, layer)
        assert graphed.stats()["last_step"] == {**eager.stats()["last_step"], **{
            k: graphed.stats()["last_step"][k] for k in ("gpu_wait_s", "step_host_s",
                                                         "cpu_kernel_s")}}, step
    assert len(graphed._graphs._sets) == 2
    assert graphed._graphs._sets[next(reversed(graphed._graphs._sets))].graphs    # captured


def test_subbatch_gives_the_cpu_whole_requests_and_auto_tries_both_shapes():
    """"subbatch": the CPU's requests fetch nothing, the others fetch every miss (cache room
    permitting); "auto" measures both shapes in a situation before it picks one."""
    from vortex_hybrid.scheduler.cost_model import DEFAULTS
    attn = make("hybrid", slots=64, step_shape="subbatch", budget=6, costs=DEFAULTS,
                cache_prefill=False)            # the cache as the steps fill it
    shadow = Shadow(attn, 11)
    rids = [shadow.add(60) for _ in range(4)]
    n_cpu = round(attn._cpu_share * 4)
    assert 0 < n_cpu < 4, attn._cpu_share
    assert shadow.step(rids) < 1e-5
    cache = attn._cache
    for layer in range(L):                  # only the GPU's sub-batch has pages in the cache
        assert [cache.pages_of(r, layer).numel() > 0 for r in rids] == \
            [False] * n_cpu + [True] * (4 - n_cpu)
    last = attn.stats()["last_step"]
    assert last["step_shape"] == "subbatch" and last["cpu_pages"] > 0 and last["fetched_pages"] > 0
    attn.close()
    auto = make("hybrid", slots=64, budget=6, cached_steps=False)   # the cache holds them all
    shadow = Shadow(auto, 12)
    rids = [shadow.add(60) for _ in range(3)]
    shapes = []
    for _ in range(6):
        assert shadow.step(rids) < 1e-5
        shapes.append(auto.stats()["last_step"]["step_shape"])
    assert shapes[:4] == ["split", "subbatch", "split", "subbatch"], shapes   # explored in turn
    totals = auto.stats()["totals"]
    assert totals["steps_split"] + totals["steps_subbatch"] == 6
    summary = auto._shapes.summary()[("hybrid", 4)]
    best = min(summary, key=lambda s: summary[s]["ema"])
    assert shapes[4:] == [best, best] or summary[shapes[4]]["n"] >= 2, (shapes, summary)
    auto.close()


def test_a_trace_records_each_layer_on_each_lane():
    from vortex_hybrid.runtime.step_trace import StepTrace
    attn = make("hybrid", slots=2)
    shadow = Shadow(attn, 9)
    rids = [shadow.add(37), shadow.add(21)]
    shadow.step(rids)
    attn.trace = StepTrace(attn.device)
    assert shadow.step(rids) < 1e-5
    spans = attn.trace.spans()
    attn.trace = None
    lanes = {(s["lane"], s["layer"]) for s in spans}
    for layer in range(L):
        assert {("host", layer), ("gpu", layer), ("cpu", layer)} <= lanes, lanes
    assert all(0 <= s["start_ms"] <= s["end_ms"] for s in spans)
    runs = [s for s in spans if s["name"] == "run()"]
    assert [s["layer"] for s in runs] == list(range(L))
    for s in spans:                       # every span of a layer lies inside its run() call
        if s["lane"] == "host" and s["name"] != "run()":
            r = runs[s["layer"]]
            assert r["start_ms"] <= s["start_ms"] and s["end_ms"] <= r["end_ms"]


def test_hybrid_fetches_more_of_a_request_whose_selection_is_reused():
    """The split charges a fetch its amortised cost: with reuse near 1 (and room in the cache) a
    copy serves later steps, so more misses go to the copy than with reuse 0; with reuse 0 the
    copy and the CPU's remaining work end together (the greedy's stop rule). Head-pages: a fetch
    copies what the CPU would read, one KV head of one page (seed 3)."""
    import dataclasses

    from vortex_hybrid.scheduler.cost_model import DEFAULTS
    costs = dataclasses.replace(DEFAULTS, cpu_call_s=1e-12)   # no fixed cost: bytes alone
    attn = make("hybrid", slots=1000, costs=costs)
    gen = torch.Generator().manual_seed(3)
    misses = torch.rand(2 * HKV, 300, generator=gen).to(attn.device) < 0.7   # rows x selection
    wanted = misses.sum()
    fetched = {}
    for r in (0.0, 0.5, 0.9):
        reuse = torch.full((2 * HKV,), r, device=attn.device)
        f = attn._hybrid_fetch(misses, reuse, wanted)
        assert not bool((f & ~misses).any())          # only misses are fetched
        fetched[r] = int(f.sum())
    print("head-pages fetched by reuse:", fetched)
    assert 0 < fetched[0.0] < fetched[0.5] < fetched[0.9] <= int(wanted), fetched
    f = attn._hybrid_fetch(misses, torch.zeros(2 * HKV, device=attn.device), wanted)
    hb = attn._head_bytes
    copy_s = int(f.sum()) * hb / costs.h2d_bw_concurrent
    cpu_s = int((misses & ~f).sum()) * hb / costs.cpu_attn_bw_concurrent
    assert abs(copy_s - cpu_s) <= hb / costs.h2d_bw_concurrent + hb / \
        costs.cpu_attn_bw_concurrent, (copy_s, cpu_s)
    attn.close()


def _hybrid_fetch_loop(miss, reuse, wanted, cpu_rate, call_s, slots, hb, bw):
    """hybrid_fetch's rule as a float64 loop: rows by amortised cost (stable), their head-pages
    in row order, fetched until the first whose copy would end after the CPU's remaining work
    with it kept plus one call."""
    miss, reuse = miss.cpu().numpy(), reuse.double().cpu().numpy()
    survive = min(1.0, slots / max(1, int(wanted)))
    factor = np.maximum(1 - reuse * survive, 0.05)
    order = sorted(range(miss.shape[0]), key=lambda r: (factor[r], r))
    entries = [(r, j) for r in order for j in range(miss.shape[1]) if miss[r, j]]
    cpu_s, total = hb / cpu_rate, len(entries)
    out = np.zeros_like(miss)
    copy = 0.0
    for i, (r, j) in enumerate(entries):
        copy += factor[r] * hb / bw
        if copy > (total - i - 1) * cpu_s + cpu_s + call_s:
            break
        out[r, j] = True
    return torch.from_numpy(out)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hybrid_fetch_follows_its_rule_written_as_a_loop(seed):
    """`hybrid_fetch` (ranks without a sort, scans per row) picks exactly the head-pages of its
    rule written as a plain float64 loop: rows of random reuse (ties included), misses at random,
    CPU rates and call costs that stop it early, late or never."""
    from vortex_hybrid.runtime.split_step import hybrid_fetch
    gen = torch.Generator().manual_seed(seed)
    R, K = int(torch.randint(1, 40, (), generator=gen)), int(torch.randint(1, 30, (), generator=gen))
    miss = torch.rand(R, K, generator=gen) < float(torch.rand((), generator=gen))
    reuse = (torch.rand(R, generator=gen) * 4).round() / 4          # ties between rows
    wanted = miss.sum() + int(torch.randint(0, 50, (), generator=gen))
    hb, bw = 8192, 50e9
    for cpu_rate, call_s in ((17e9, 1e-4), (5e9, 0.0), (40e9, 1e-3), (1e12, 0.0)):
        got = hybrid_fetch(miss, reuse, wanted, torch.tensor(cpu_rate, dtype=torch.float64),
                           torch.tensor(call_s, dtype=torch.float64), 64, hb, bw)
        want = _hybrid_fetch_loop(miss, reuse, wanted, cpu_rate, call_s, 64, hb, bw)
        assert torch.equal(got, want), (seed, cpu_rate, call_s)


@pytest.mark.parametrize("call_us", [20.0, 400.0])
def test_hybrid_split_counts_the_cpu_calls_fixed_cost(call_us):
    """With a fixed cost per CPU call, the copy takes what the CPU would do in that time too: a
    host part whose copy ends within the call's cost is fetched whole (the CPU gets nothing), a
    larger one splits so that the copy ends when the CPU's bytes plus its call would (seed 4)."""
    import dataclasses

    from vortex_hybrid.scheduler.cost_model import DEFAULTS
    costs = dataclasses.replace(DEFAULTS, cpu_call_s=call_us * 1e-6)
    attn = make("hybrid", slots=100000, costs=costs)
    hb, gen = attn._head_bytes, torch.Generator().manual_seed(4)
    zero = torch.zeros(2 * HKV, device=attn.device)
    small = torch.zeros(2 * HKV, 300, dtype=torch.bool)
    small[0, :3] = True                                   # 3 head-pages: far below one call
    small = small.to(attn.device)
    f = attn._hybrid_fetch(small, zero, small.sum())
    assert torch.equal(f, small)                          # all fetched, the CPU gets none
    per = hb / costs.h2d_bw_concurrent                    # seconds to copy one head-page
    n_rows = int(4 * call_us * 1e-6 / per / 300) + 2      # rows enough for ~4 calls' copy time
    big = (torch.rand(n_rows, 300, generator=gen) < 0.9).to(attn.device)
    f = attn._hybrid_fetch(big, torch.zeros(n_rows, device=attn.device), big.sum())
    assert not bool((f & ~big).any())
    copy_s = int(f.sum()) * per
    cpu_s = int((big & ~f).sum()) * hb / costs.cpu_attn_bw_concurrent
    assert cpu_s > 0
    row = 300 * (per + hb / costs.cpu_attn_bw_concurrent)   # a row's worth of either side
    assert abs(copy_s - (cpu_s + costs.cpu_call_s)) <= row, (copy_s, cpu_s, costs.cpu_call_s)
    attn.close()


@pytest.mark.parametrize("share", [1.0, 0.5, 0.2])
def test_fetch_share_caps_a_layers_fetches_and_the_cpu_attends_the_rest(share):
    """`hybrid` with copies far cheaper than the CPU (so the split wants every miss fetched) and
    a cold cache: each layer fetches at most ceil(share x selected head-pages), the CPU attends
    the misses left, and the output is the reference over the selection in every case; `offload`
    ignores the share (seed 23)."""
    import dataclasses

    from vortex_hybrid.scheduler.cost_model import DEFAULTS
    costs = dataclasses.replace(DEFAULTS, h2d_bw=1e15, h2d_bw_concurrent=1e15,
                                cpu_attn_bw_concurrent=1e3, cpu_call_s=1e-9)
    gen = torch.Generator().manual_seed(23)
    k, v = (torch.randn(L, 60, HKV, D, generator=gen) for _ in "kv")
    sel = torch.tensor([[[0, 2, 5, 9, 11], [1, 3, 6, 10, 13]]], dtype=torch.int32)   # 15 full
    selected = sel.numel()                                # head-pages a layer selects (all host)
    for placement in ("hybrid", "offload"):
        attn = make(placement, slots=64, budget=5, cache_prefill=False, fetch_share=share,
                    step_shape="split", costs=costs)
        rid = attn.add_request(k.to(attn.device), v.to(attn.device))
        attn.plan([rid])
        for layer in range(L):
            q, kn, vn = (torch.randn(1, h, D, generator=gen) for h in (HQ, HKV, HKV))
            o = attn.run(layer, *(t.to(attn.device) for t in (q, kn, vn)), sel=sel.to(attn.device))
            kk, vv = torch.cat([k[layer], kn]), torch.cat([v[layer], vn])
            n = -(-kk.shape[0] // P)
            pad = n * P - kk.shape[0]
            kp, vp = (torch.cat([t, torch.zeros(pad, HKV, D)]).reshape(n, P, HKV, D)
                      .transpose(1, 2).contiguous().double() for t in (kk, vv))
            want, _ = reference.sparse_decode_attention(
                q.double(), kp, vp, torch.arange(n, dtype=torch.int32)[None],
                torch.tensor([kk.shape[0]], dtype=torch.int32), sel)
            err = ((o[0].cpu() - want[0]).norm() / want[0].norm()).item()
            assert err < 1e-5, (placement, share, layer, err)
        c = attn.stats()["last_step"]
        cap = selected if placement == "offload" else -(-int(share * 100) * selected // 100)
        assert c["fetched_pages"] == L * min(cap, selected), (placement, share, c)
        assert c["cpu_pages"] == L * selected - c["fetched_pages"], (placement, share, c)
        attn.close()


def test_a_fetch_copies_only_the_kv_heads_that_selected_the_page():
    """Heads of one request select different pages: `offload` fetches each missing (page, KV head)
    once, so the bytes over the link equal the selected bytes that missed the cache, never every
    head of each page; the next step's same selection hits (seed 21)."""
    attn = make("offload", slots=64, budget=4, cache_prefill=False)   # pages enter by fetches
    gen = torch.Generator().manual_seed(21)
    rid = attn.add_request(*(torch.randn(L, 120, HKV, D, generator=gen).to(attn.device)
                             for _ in "kv"))
    n = -(-121 // P)
    sel = torch.tensor([[[0, 1 + h, 3 + h, n - 1] for h in range(HKV)]], dtype=torch.int32,
                       device=attn.device)                     # heads share only pages 0 and n-1
    for step in range(2):
        attn.plan([rid])
        for layer in range(L):
            attn.run(layer, *(torch.randn(1, h, D, generator=gen).to(attn.device)
                              for h in (HQ, HKV, HKV)), sel=sel)
        c = attn.stats()["last_step"]
        host_heads = L * HKV * 3                               # every selected full page is on host
        if step == 0:
            assert c["cache_misses"] == c["fetched_pages"] == host_heads, c
        else:
            assert c["cache_hits"] == host_heads and c["fetched_pages"] == 0, c
        assert c["bytes_h2d"] == c["fetched_pages"] * attn._head_bytes
    attn.close()


@pytest.mark.parametrize("placement", ["offload", "hybrid"])
def test_a_prefill_warms_the_cache_and_a_step_then_reads_no_host_page(placement):
    """cache_prefill (the default): the pages a prefill fills go into free cache slots with the
    KV at hand, so when the cache holds every page the first step hits every host page it
    selects (nothing fetched, nothing attended by the CPU) and still equals the reference; the
    cached copies hold exactly the prompt's pages (seed 5)."""
    attn = make(placement, slots=64, budget=4)
    shadow = Shadow(attn, 5)
    rids = [shadow.add(45), shadow.add(30)]
    cache = attn._cache
    for rid in rids:
        full = attn._offloaded[rid]
        for layer in range(L):
            assert cache.pages_of(rid, layer).tolist() == list(range(full))
    pool = attn.kv.device_pool
    for rid in rids:                          # each cached head-page is the prompt's KV
        r = cache.index_of(rid)
        for layer in range(L):
            for h in range(HKV):
                for page in range(attn._offloaded[rid]):
                    slot = int(cache.slot_of[layer, r * HKV + h, page])
                    hp = int(attn._slot_heads[slot])
                    got = pool.k[layer].view(-1, P, D)[hp].cpu()
                    want = shadow.kv[rid][0][layer, page * P:(page + 1) * P, h]
                    assert torch.equal(got, want), (rid, layer, h, page)
    assert shadow.step(rids) < 1e-5
    c = attn.stats()["last_step"]
    assert c["cache_misses"] == 0 and c["fetched_pages"] == 0 and c["cpu_pages"] == 0, c
    assert c["cache_hits"] > 0, c
    attn.close()


@pytest.mark.parametrize("placement", ["offload", "hybrid"])
@pytest.mark.parametrize("whole", [False, True])
def test_a_batch_the_cache_holds_runs_cached_steps_as_its_pages_fill(placement, whole):
    """While the GPU page cache holds every host page of the batch, each step runs `cached` (as
    `gpu` over the cache: nothing fetched, nothing for the CPU) and equals the reference; the
    pages the steps fill enter free slots as they are offloaded (copied on the device: each
    cached head-page is the request's KV), so the steps stay cached across page boundaries; whole
    steps (`plan(whole_step=True)`, run eagerly here) the same (seed 31)."""
    attn = make(placement, slots=64, budget=4)
    shadow = Shadow(attn, 31)
    rids = [shadow.add(21), shadow.add(10)]
    cache, pool = attn._cache, attn.kv.device_pool
    for step in range(2 * P + 1):               # two pages of each request fill and go to host
        if whole:
            worst = _whole_step(attn, shadow, rids)
        else:
            worst = shadow.step(rids)
        assert worst < 1e-5, (step, worst)
        c = attn.stats()["last_step"]
        assert c["step_shape"] == "cached", (step, c)
        assert c["fetched_pages"] == c["cpu_pages"] == c["cache_misses"] == 0, c
        assert c["cache_hits"] > 0 and c["gpu_pages"] >= c["cache_hits"], c
    for rid in rids:
        full = attn._offloaded[rid]
        r = cache.index_of(rid)
        for layer in range(L):
            assert cache.pages_of(rid, layer).tolist() == list(range(full)), (rid, layer)
            for h in range(HKV):
                for page in range(full):
                    hp = int(attn._slot_heads[int(cache.slot_of[layer, r * HKV + h, page])])
                    want = shadow.kv[rid][0][layer, page * P:(page + 1) * P, h]
                    assert torch.equal(pool.k[layer].view(-1, P, D)[hp].cpu(), want)
    assert attn.stats()["totals"]["steps_cached"] == 2 * P + 1
    attn.close()


@pytest.mark.parametrize("whole", [False, True])
def test_a_cached_step_counts_what_the_same_step_split_counts(whole):
    """plan() counts a cached step's page-heads (attended, read from slots) from the budgets,
    without a kernel; the same steps split (`cached_steps=False`: the cache step counts its hits
    on the device) give the same outputs and the same counts (seed 35)."""
    twins = [make("hybrid", slots=64, budget=4, cached_steps=c) for c in (True, False)]
    shadows = [Shadow(t, 35) for t in twins]
    rids = [[s.add(n) for n in (21, 10, 6)] for s in shadows]
    for step in range(P + 2):
        for t, sh, r in zip(twins, shadows, rids):
            assert (_whole_step(t, sh, r) if whole else sh.step(r)) < 1e-5
        a, b = (t.stats()["last_step"] for t in twins)
        assert a["step_shape"] == "cached" and b["step_shape"] != "cached"
        assert b["fetched_pages"] == b["cpu_pages"] == 0, b
        assert (a["gpu_pages"], a["cache_hits"]) == (b["gpu_pages"], b["cache_hits"]), (step, a, b)
    for t in twins:
        t.close()


def _whole_step(attn, shadow, rids) -> float:
    """One whole step (planned with whole_step=True, its layers run eagerly) checked like
    `Shadow.step`: the worst relative error against the reference."""
    grown = {r: ([], []) for r in rids}
    attn.plan(rids, whole_step=True)
    worst, outs = 0.0, []
    for layer in range(L):
        q, kn, vn = (shadow.rand(len(rids), h, D) for h in (HQ, HKV, HKV))
        dev = attn.device
        outs.append((layer, q, kn, vn, attn.run(layer, q.to(dev), kn.to(dev), vn.to(dev)).cpu()))
    attn.finish_step()
    for layer, q, kn, vn, o in outs:
        for b, rid in enumerate(rids):
            k = torch.cat([shadow.kv[rid][0][layer], kn[b:b + 1]])
            v = torch.cat([shadow.kv[rid][1][layer], vn[b:b + 1]])
            grown[rid][0].append(k)
            grown[rid][1].append(v)
            want = reference_output(attn.cfg, q[b:b + 1], k, v)
            worst = max(worst, ((o[b] - want).norm() / want.norm()).item())
    for rid, (ks, vs) in grown.items():
        shadow.kv[rid] = (torch.stack(ks), torch.stack(vs))
    return worst


@pytest.mark.parametrize("whole", [False, True])
def test_cached_steps_check_the_cache_on_the_device_only_when_the_runtime_cannot_know(whole):
    """The runtime checks on the device (`GpuPageCache.coverage`, a synchronisation) whether the
    cache holds the batch only when it cannot know: the first step, and after anything but cached
    steps and admissions into slots it knows are free. Pages filling across steps enter such
    slots, so 2P + 1 cached steps ask the device once; removing a request asks again (seed 37)."""
    attn = make("hybrid", slots=64, budget=4)
    shadow = Shadow(attn, 37)
    rids = [shadow.add(21), shadow.add(10)]
    cache, asked = attn._cache, []
    check = cache.coverage
    cache.coverage = lambda *a: asked.append(a) or check(*a)
    for step in range(2 * P + 1):
        worst = _whole_step(attn, shadow, rids) if whole else shadow.step(rids)
        assert worst < 1e-5, (step, worst)
        assert attn.stats()["last_step"]["step_shape"] == "cached", step
    assert len(asked) == 1, len(asked)
    if whole:                                   # a fixed-shape step never runs cached, and its
        attn.plan(rids, whole_step=True, fixed=FixedShape(4, 16))   # layers' graph replays
        assert attn._coverage is None           # would change the cache unseen: known void
        attn.cancel_step()
        assert shadow.step(rids) < 1e-5 and attn.stats()["last_step"]["step_shape"] == "cached"
        assert len(asked) == 2
        asked.pop()
    gone = shadow.add(6)
    assert len(asked) == 1                      # a prefill changed the cache: known void
    shadow.remove(gone)
    assert shadow.step(rids) < 1e-5 and attn.stats()["last_step"]["step_shape"] == "cached"
    assert len(asked) == 2
    attn.close()


def test_a_filled_page_without_a_free_slot_ends_the_cached_steps():
    """Slots taken by a request outside the batch: the batch's next filled page finds no free
    slot, so the runtime may not assume it cached (the knowledge's free-slot count is 0): the
    step after it splits (and fetches the page, so the next is cached again), every step equal
    to the reference (seed 38)."""
    attn = make("hybrid", slots=12, budget=4)    # 24 head-page slots
    shadow = Shadow(attn, 38)
    rids = [shadow.add(20), shadow.add(8)]       # 5 + 2 full pages: 14 head-pages
    shadow.add(36)                               # 9 full pages: takes the 10 slots left
    assert int((attn._cache.owner[:, :24, 0] < 0).sum()) == 0
    shapes, host = [], []
    for _ in range(6):                           # A's sixth page fills at its 24th token
        assert shadow.step(rids) < 1e-5
        c = attn.stats()["last_step"]
        shapes.append(c["step_shape"])
        host.append(c["fetched_pages"] + c["cpu_pages"])
        if c["step_shape"] != "cached":         # graph replays of its layers would change the
            assert attn._coverage is None        # cache unseen: plan() forgets what it knew
    assert shapes[:4] == ["cached"] * 4 and shapes[4] != "cached", shapes
    assert host[4] > 0, host                     # the new page came from the host
    attn.close()


def test_a_batch_past_the_cache_splits_and_cached_steps_off_split_always():
    """A third request that the slots cannot hold with the others ends the cached steps (the
    step splits, fetching and attending on the CPU, still exact); `cached_steps=False` splits
    even while the cache holds the batch, and so does a cache with room for pages it was not
    given (`cache_prefill=False`); a cancelled cached step leaves the cache as it was
    (seed 33)."""
    attn = make("hybrid", slots=12, budget=4)    # 24 head-page slots
    shadow = Shadow(attn, 33)
    rids = [shadow.add(21), shadow.add(17)]      # 5 + 4 full pages: 18 head-pages
    assert shadow.step(rids) < 1e-5
    assert attn.stats()["last_step"]["step_shape"] == "cached"
    before = attn._cache.slot_of.clone()
    attn.plan(rids)
    attn.run(0, *(torch.randn(2, h, D).to(attn.device) for h in (HQ, HKV, HKV)))
    attn.cancel_step()                          # layer 0 ran: nothing of the cache changed
    assert torch.equal(attn._cache.slot_of, before)
    rids.append(shadow.add(25))                 # 6 more full pages: 30 head-pages > 24 slots
    for _ in range(3):
        assert shadow.step(rids) < 1e-5
        assert attn.stats()["last_step"]["step_shape"] != "cached"
    attn.close()
    for kw in ({"cached_steps": False}, {"cache_prefill": False}):   # off; room, pages not in it
        other = make("hybrid", slots=64, budget=4, **kw)
        shadow = Shadow(other, 34)
        rids = [shadow.add(21), shadow.add(10)]
        assert shadow.step(rids) < 1e-5
        assert other.stats()["last_step"]["step_shape"] != "cached", kw
        other.close()


def test_a_compiled_cache_step_keeps_every_output_and_the_cache_state_of_the_eager_one():
    """compile_cache_step: the page cache's layer step compiled (one graph for every layer) gives
    the reference outputs, and the same cache state and counters as the eager step, over steps
    with misses, fetches, CPU parts and evictions (seed 41)."""
    runs = []
    for compiled in (False, True):
        attn = make("hybrid", slots=3, budget=4, compile_cache_step=compiled, cached_steps=False,
                    step_shape="split")          # "auto" picks shapes by measured time
        shadow = Shadow(attn, 41)
        rids = [shadow.add(37), shadow.add(26)]
        for _ in range(P + 1):
            assert shadow.step(rids) < 1e-5
        c = attn._cache
        runs.append((attn.stats()["totals"], [t.clone() for t in (c.slot_of, c.owner, c.stamp,
                                                                  c.held, c.reuse, c.seen)]))
        attn.close()
    (eager, state_e), (comp, state_c) = runs
    assert eager["evictions"] > 0 and eager["fetched_pages"] > 0 and eager["cpu_pages"] > 0
    timing = ("gpu_wait_s", "step_host_s", "cpu_kernel_s")
    assert {k: v for k, v in eager.items() if k not in timing} == \
        {k: v for k, v in comp.items() if k not in timing}
    for a, b in zip(state_e, state_c):
        assert torch.equal(a, b)


def test_cached_steps_must_be_a_bool():
    with pytest.raises(ValueError, match="cached_steps='yes' .*True or False"):
        HybridConfig(cached_steps="yes")


def test_a_prefill_larger_than_the_free_slots_caches_its_last_pages():
    """With fewer free slots than pages, the prefill's last pages are cached (whole pages, every
    KV head), the first ones are left to the steps; a second request finds the cache full and
    caches nothing; steps stay exact (seed 9)."""
    attn = make("hybrid", slots=4, budget=4)
    shadow = Shadow(attn, 9)
    a = shadow.add(41)                        # 10 full pages, 4 slots of 2 KV heads each
    b = shadow.add(20)
    for layer in range(L):
        assert attn._cache.pages_of(a, layer).tolist() == [6, 7, 8, 9]
        assert attn._cache.pages_of(b, layer).numel() == 0
    for _ in range(3):
        assert shadow.step([a, b]) < 1e-5
    attn.close()


def test_cache_prefill_must_be_a_bool():
    with pytest.raises(ValueError, match="cache_prefill=1 .*True or False"):
        HybridConfig(cache_prefill=1)
