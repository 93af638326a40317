"""Whole steps of a fixed shape (`runtime.fixed_shape`, `plan(rids, whole_step=True,
fixed=FixedShape(batch, max_pages))`): what a caller that captures one CUDA graph per batch size
(SGLang) needs. Every step of one FixedShape has one key while requests grow, join and leave and
their budgets change; the requests' outputs equal an ordinary step's and the float64 reference's in
every placement; padding rows return zeros and change no request (their K/V may be NaN); bad
plans are refused in one line and change nothing. On a GPU the steps run from one captured graph
per key.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from conftest import test_seed
from test_hybrid_attention import HKV, HQ, L, D, P, reference_output
from test_runtime_transactions import assert_same, state
from test_whole_step import same_stats

from vortex_hybrid import HybridAttention, HybridConfig
from vortex_hybrid.runtime import FixedShape

PLACEMENTS = ["dense", "gpu", "cpu", "offload", "hybrid/split", "hybrid/subbatch"]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = FixedShape(batch=4, max_pages=16)


def make(placement: str, **kw) -> HybridAttention:
    """Budgets that follow the request's pages (40%), so they change as requests grow."""
    placement, _, shape = placement.partition("/")
    if shape:
        kw["step_shape"] = shape
    cfg = HybridConfig(page_size=P, flow="quest", budget_ratio=0.4, sink_pages=1, recent_pages=2,
                       placement=placement, kv_dtype="float32", cache_prefill=False,
                       gpu_cache_pages=3 if placement in ("offload", "hybrid") else 256, **kw)
    return HybridAttention(cfg, L, HQ, HKV, D, device_pages=70, host_pages=256)


class Twins:
    """A runtime stepping with fixed-shape whole steps and an ordinary twin, the same KV in both,
    and the KV the test keeps (for the float64 reference)."""

    def __init__(self, placement: str, seed: int) -> None:
        self.fixed, self.plain = make(placement), make(placement)
        self.plain._graphs = None
        self.gen = torch.Generator().manual_seed(seed)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # fixed's rid -> k, v
        self.ids: dict[int, int] = {}                                # fixed's rid -> plain's

    def add(self, n: int) -> int:
        k, v = (torch.randn(L, n, HKV, D, generator=self.gen) for _ in "kv")
        rid = self.fixed.add_request(k.to(DEV), v.to(DEV))
        self.ids[rid] = self.plain.add_request(k.to(DEV), v.to(DEV))
        self.kv[rid] = (k, v)
        return rid

    def remove(self, rid: int) -> None:
        self.fixed.remove_request(rid)
        self.plain.remove_request(self.ids.pop(rid))
        del self.kv[rid]

    def step(self, rids: list[int], shape: FixedShape = SHAPE, pad_value: float = float("nan")):
        """One step in both; the fixed step's padding rows get `pad_value` q/k/v. Returns its key
        and the worst relative error of its outputs against the float64 reference."""
        key = self.fixed.plan(rids, whole_step=True, fixed=shape)
        self.plain.plan([self.ids[r] for r in rids])
        n, N, worst = len(rids), shape.batch, 0.0
        grown = {r: ([], []) for r in rids}
        for layer in range(L):
            q, kn, vn = (torch.randn(n, h, D, generator=self.gen) for h in (HQ, HKV, HKV))
            pad = [torch.full((N - n, h, D), pad_value) for h in (HQ, HKV, HKV)]
            got = self.fixed.run(layer, *(torch.cat([t, p]).to(DEV) for t, p in
                                          zip((q, kn, vn), pad))).cpu()
            want = self.plain.run(layer, q.to(DEV), kn.to(DEV), vn.to(DEV)).cpu()
            torch.testing.assert_close(got[:n], want, rtol=1e-5, atol=1e-6)
            assert torch.equal(got[n:], torch.zeros_like(got[n:])), "padding rows attend nothing"
            for b, rid in enumerate(rids):
                k = torch.cat([self.kv[rid][0][layer], kn[b:b + 1]])
                v = torch.cat([self.kv[rid][1][layer], vn[b:b + 1]])
                grown[rid][0].append(k)
                grown[rid][1].append(v)
                ref = reference_output(self.fixed.cfg, q[b:b + 1], k, v)
                worst = max(worst, ((got[b] - ref).norm() / ref.norm().clamp_min(1e-30)).item())
        self.fixed.finish_step()
        same_stats(self.fixed, self.plain, shape=False)
        for rid, (ks, vs) in grown.items():
            self.kv[rid] = (torch.stack(ks), torch.stack(vs))
        return key, worst

    def close(self) -> None:
        self.fixed.close()
        self.plain.close()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_fixed_shape_steps_have_one_key_and_equal_ordinary_steps_and_the_reference(placement):
    """Fourteen steps: requests grow over page boundaries (their budgets change: 40% of their
    pages), one joins, one leaves, the batch is 1 to 4 of 4 rows, and a step of padding only
    comes between: one key; outputs equal the ordinary twin's and the float64 reference's."""
    seed = test_seed()
    print("seed", seed)
    t = Twins(placement, seed)
    try:
        live = [t.add(n) for n in (3, 17, 30)]
        keys = set()
        for i in range(14):
            if i == 4:
                live.append(t.add(9))
            if i == 9:
                t.remove(live.pop(1))
            batch = live if i % 5 != 2 else live[:1]
            if i == 6:
                keys.add(t.fixed.plan([], whole_step=True, fixed=SHAPE))    # padding only
                for layer in range(L):
                    t.fixed.run(layer, *(torch.randn(4, h, D).to(DEV) for h in (HQ, HKV, HKV)))
                t.fixed.cancel_step()
            key, err = t.step(batch)
            keys.add(key)
            assert err < 1e-5, f"{placement} step {i}: relative error {err:.2e} (seed {seed})"
        budgets = {t.fixed.cfg.budget_for(-(-t.fixed.kv.seq_len(r) // P)) for r in live}
        assert len(budgets) > 1, "the requests' budgets should differ"
        assert len(keys) == 1, keys
    finally:
        t.close()


@pytest.mark.parametrize("placement", ["gpu", "cpu", "hybrid/split"])
def test_padding_rows_with_nan_inputs_change_no_request(placement):
    """A step of padding only (NaN q, k, v), finished: every request, the pools, summaries and
    the page cache's contents as before; then a mixed step leaves the requests as the
    ordinary twin's and names no request as non-finite."""
    t = Twins(placement, 5)
    try:
        rids = [t.add(n) for n in (6, 21)]
        t.step(rids)                                    # takes the padding rows' scratch page
        before = state(t.fixed)
        t.fixed.plan([], whole_step=True, fixed=SHAPE)
        for layer in range(L):
            o = t.fixed.run(layer, *(torch.full((4, h, D), float("nan")).to(DEV)
                                     for h in (HQ, HKV, HKV)))
            assert torch.equal(o.cpu(), torch.zeros(4, HQ, D))
        t.fixed.finish_step()
        after = state(t.fixed)
        for s in (before, after):   # a finished step moves the counters, the page cache's
            s.pop("stats")          # clock, and stamps its spare slot (which absorbs no-ops)
            if "cache" in s:
                slot_of, owner, stamp, seen, reuse = s["cache"][3]
                s["cache"] = (None, None, s["cache"][2],
                              [slot_of, owner, stamp[:, :-1], seen, reuse])
        assert_same(before, after)
        t.step(rids, pad_value=float("nan"))
        assert t.fixed.stats()["last_step"]["nonfinite_requests"] == []
        a, b = state(t.fixed), state(t.plain)
        for rid in rids:
            assert a[rid][0] == b[t.ids[rid]][0]
            for (k1, v1), (k2, v2) in zip(a[rid][2], b[t.ids[rid]][2]):
                assert torch.equal(k1, k2) and torch.equal(v1, v2)
    finally:
        t.close()


@pytest.mark.parametrize("placement", ["gpu", "offload", "hybrid/subbatch"])
def test_padding_rows_between_requests_follow_the_none_in_rids(placement):
    """plan([a, None, b], fixed=...): rows 0 and 2 are a's and b's (the ordinary step's outputs),
    rows 1 and 3 padding (zeros); the key is the shape's."""
    t = Twins(placement, 12)
    try:
        a, b = t.add(13), t.add(26)
        key, _ = t.step([a, b])
        for _ in range(3):
            assert t.fixed.plan([a, None, b], whole_step=True, fixed=SHAPE) == key
            t.plain.plan([t.ids[a], t.ids[b]])
            for layer in range(L):
                q, kn, vn = (torch.randn(2, h, D, generator=t.gen) for h in (HQ, HKV, HKV))
                rows = [torch.stack([x[0], torch.full_like(x[0], float("nan")), x[1],
                                     torch.full_like(x[0], float("nan"))]).to(DEV)
                        for x in (q, kn, vn)]
                got = t.fixed.run(layer, *rows).cpu()
                want = t.plain.run(layer, q.to(DEV), kn.to(DEV), vn.to(DEV)).cpu()
                torch.testing.assert_close(got[[0, 2]], want, rtol=1e-5, atol=1e-6)
                assert not got[[1, 3]].any()
            t.fixed.finish_step()
            same_stats(t.fixed, t.plain, shape=False)
    finally:
        t.close()


def test_bad_fixed_plans_are_refused_in_one_line_and_change_nothing():
    t = Twins("hybrid/split", 6)
    try:
        rids = [t.add(n) for n in (6, 21, 9)]
        t.step(rids)
        before = state(t.fixed)
        cases = [
            (dict(fixed=SHAPE), "plan(fixed=...) is for whole steps: pass whole_step=True"),
            (dict(whole_step=True, fixed=FixedShape(2, 16)), "got 3 rows; at most 2"),
            (dict(whole_step=True, fixed=FixedShape(4, 5)),
             "holds 6 pages after this step's token; FixedShape.max_pages=5"),
            (dict(whole_step=True, fixed=(4, 16)), "fixed=(4, 16) must be a FixedShape"),
        ]
        for kw, words in cases:
            with pytest.raises(ValueError) as err:
                t.fixed.plan(rids, **kw)
            assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
            assert_same(before, state(t.fixed))
        for bad in ((0, 4), (4, True), (4, 2.5), (4, 4, 0)):
            with pytest.raises(ValueError, match="must be a positive integer"):
                FixedShape(*bad)
        t.fixed.plan(rids, whole_step=True, fixed=SHAPE)
        sel = torch.zeros(4, HKV, 3, dtype=torch.int32, device=DEV)
        with pytest.raises(ValueError, match="sel= is not taken by a fixed-shape step"):
            t.fixed.run(0, *(torch.randn(4, h, D).to(DEV) for h in (HQ, HKV, HKV)), sel=sel)
        t.fixed.cancel_step()
        assert_same(before, state(t.fixed))
    finally:
        t.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_one_captured_graph_per_fixed_shape_serves_every_step(placement):
    """A graph captured once over a step of padding only (as SGLang captures a bucket) and
    replayed for steps whose requests grow, join and leave: the ordinary twin's outputs."""
    t = Twins(placement, 8)
    try:
        live = [t.add(n) for n in (3, 17, 30)]
        N = SHAPE.batch
        buf = {name: torch.zeros(L, N, h, D, device="cuda")
               for name, h in (("q", HQ), ("k", HKV), ("v", HKV), ("out", HQ))}
        key = t.fixed.plan([], whole_step=True, fixed=SHAPE)
        for _ in range(2):                              # warm-up, as SGLang's runner does
            for layer in range(L):
                t.fixed.run(layer, buf["q"][layer], buf["k"][layer], buf["v"][layer])
            t.fixed.plan([], whole_step=True, fixed=SHAPE)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for layer in range(L):
                buf["out"][layer].copy_(t.fixed.run(layer, buf["q"][layer], buf["k"][layer],
                                                    buf["v"][layer]))
        t.fixed.cancel_step()
        for i in range(10):
            if i == 4:
                live.append(t.add(9))
            if i == 7:
                t.remove(live.pop(0))
            n = len(live)
            assert t.fixed.plan(live, whole_step=True, fixed=SHAPE) == key
            t.plain.plan([t.ids[r] for r in live])
            ins = [[torch.randn(n, h, D, generator=t.gen).cuda() for h in (HQ, HKV, HKV)]
                   for _ in range(L)]
            for layer, xs in enumerate(ins):
                for name, x in zip("qkv", xs):
                    buf[name][layer].zero_()
                    buf[name][layer, :n].copy_(x)
            g.replay()
            t.fixed.finish_step()
            for layer, xs in enumerate(ins):
                want = t.plain.run(layer, *xs).float()
                torch.testing.assert_close(buf["out"][layer, :n], want, rtol=1e-5, atol=1e-6,
                                           msg=f"step {i} layer {layer}")
                assert not buf["out"][layer, n:].any()
            same_stats(t.fixed, t.plain, shape=False)
    finally:
        t.close()


@pytest.mark.parametrize("placement", ["gpu", "cpu", "hybrid/split"])
def test_calibrated_per_head_budgets_in_fixed_shape_steps_equal_ordinary_steps(tmp_path,
                                                                              placement):
    """With a calibration (each (layer, KV head) its own budget ratio, one head at token
    granularity), the budgets as data give the ordinary step's outputs, step after step, with one
    key."""
    from test_calibrated_runtime import calibration_file
    path = calibration_file(tmp_path, granularity=[["page", "token"], ["page", "page"]],
                            token_share=0.5)
    seed = test_seed()
    print("seed", seed)
    t = Twins.__new__(Twins)
    t.fixed, t.plain = make(placement, calibration=path), make(placement, calibration=path)
    t.plain._graphs = None
    t.gen, t.kv, t.ids = torch.Generator().manual_seed(seed), {}, {}
    try:
        live = [t.add(n) for n in (5, 22, 37)]
        keys = {t.step(live if i % 3 else live[1:])[0] for i in range(8)}
        assert len(keys) == 1
    finally:
        t.close()


def test_a_fixed_plan_without_a_free_page_for_the_padding_rows_changes_nothing():
    """The first fixed-shape step needs one device page for its padding rows: with none free the
    plan raises OutOfPagesError naming it and every request, pool and counter is as before; an
    ordinary step still runs."""
    from vortex_hybrid.kv.errors import OutOfPagesError
    cfg = HybridConfig(page_size=P, flow="quest", budget_ratio=0.4, sink_pages=1, recent_pages=2,
                       placement="gpu", kv_dtype="float32")
    attn = HybridAttention(cfg, L, HQ, HKV, D, device_pages=3, host_pages=0)
    try:
        gen = torch.Generator().manual_seed(13)
        rid = attn.add_request(*(torch.randn(L, 3 * P - 1, HKV, D, generator=gen).to(DEV)
                                 for _ in "kv"))
        assert attn.kv.device_alloc.num_free == 0
        before = state(attn)
        with pytest.raises(OutOfPagesError, match="one device page for its padding rows"):
            attn.plan([rid], whole_step=True, fixed=SHAPE)
        assert_same(before, state(attn))
        attn.plan([rid])
        for layer in range(L):
            attn.run(layer, *(torch.randn(1, h, D, generator=gen).to(DEV) for h in (HQ, HKV, HKV)))
        assert attn.kv.seq_len(rid) == 3 * P
    finally:
        attn.close()



@pytest.mark.parametrize("placement", ["gpu", "offload", "hybrid/split"])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16),
       ops=st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "remove"]),
                              st.integers(0, 3 * P + 2), st.integers(0, 15)),
                    min_size=4, max_size=12))
def test_random_joins_leaves_and_padding_positions_keep_one_key_and_ordinary_outputs(
        placement, seed, ops):
    """Requests join and leave at random, each step puts the live requests (up to 4) at random
    rows of the 4 with padding between: one key, and the ordinary twin's outputs."""
    t = Twins(placement, seed)
    live: list[int] = []
    keys = set()
    try:
        for op, n, where in ops:
            if op == "add" and len(live) < 4 or not live:
                live.append(t.add(n))
            elif op == "remove" and len(live) > 1:
                t.remove(live.pop(n % len(live)))
            else:
                rows = [None] * SHAPE.batch             # the live requests at rows picked by `where`
                free = list(range(SHAPE.batch))
                for i, rid in enumerate(live):
                    rows[free.pop((where + i) % len(free))] = rid
                keys.add(step_at_rows(t, rows))
        assert len(keys) <= 1, keys
    finally:
        t.close()


def step_at_rows(t: Twins, rows: list) -> tuple:
    """One fixed step with the requests at `rows` (None: padding), NaN padding; checks every row
    against the ordinary twin's step over the requests alone (the test's own copy of the KV,
    `Twins.kv`, is not kept: the twin is the oracle here). Returns the key."""
    rids = [r for r in rows if r is not None]
    key = t.fixed.plan(rows, whole_step=True, fixed=SHAPE)
    t.plain.plan([t.ids[r] for r in rids])
    at = [i for i, r in enumerate(rows) if r is not None]
    for layer in range(L):
        real = [torch.randn(len(rids), h, D, generator=t.gen) for h in (HQ, HKV, HKV)]
        full = [torch.full((SHAPE.batch, h, D), float("nan")) for h in (HQ, HKV, HKV)]
        for f, x in zip(full, real):
            f[at] = x
        got = t.fixed.run(layer, *(f.to(DEV) for f in full)).cpu()
        want = t.plain.run(layer, *(x.to(DEV) for x in real)).cpu()
        torch.testing.assert_close(got[at], want, rtol=1e-5, atol=1e-6)
        pad = [i for i in range(SHAPE.batch) if i not in at]
        assert not got[pad].any()
    t.fixed.finish_step()
    same_stats(t.fixed, t.plain, shape=False)
    return key
