"""SummaryStore: summaries kept equal to the flow's cache stage over the authoritative KV through any
interleaving of appends, page fills, offloads, loads, evictions and frees; selection from the store
equals the stateless `select_pages` over the same KV (library flows, a user flow, a subclass that
changes the indexer), over caches split between pools; short requests at every boundary.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import DEVICE
from vortex_hybrid import HybridConfig, PagedKVCache, vflow
from vortex_hybrid.vflow import ops
from vortex_hybrid.vflow.flows import Quest
from vortex_hybrid.vflow.interpreter import run_cache
from vortex_hybrid.vflow.summary_store import SummaryStore

L, HKV, D, P, G = 2, 2, 8, 4, 2
LIBRARY = ["streaming", "quest", "centroid", "oracle", "double_sparsity", "lowbit"]


class NegQuest(Quest):
    """Unregistered subclass: inherits quest's name and cache stage, changes the indexer."""

    def forward_indexer(self, q, cache):
        return ops.topk(-ops.maximum(q * cache["kmax"], q * cache["kmin"]).sum((-2, -1)))


class MaxCentroid(vflow.Flow):
    """A user flow with its own summary (not lowered: runs on the interpreter)."""

    def create_cache(self, page_size, head_dim):
        return {"peak": (1, head_dim)}

    def forward_cache(self, keys, cache):
        cache["peak"] = keys.abs().max(0, keepdim=True)

    def forward_indexer(self, q, cache):
        return ops.topk((q.abs() * cache["peak"]).sum((-2, -1)))


def new_cache(device_pages=24, host_pages=24, dtype=torch.float32):
    return PagedKVCache(L, HKV, D, P, device_pages, host_pages, dtype=dtype, device=DEVICE)


def recomputed(store: SummaryStore, rid: int, layer: int) -> dict[str, torch.Tensor]:
    """The flow's cache stage over the request's authoritative KV (float64 interpreter):
    name -> [full pages, Hkv, r, c]."""
    k, _ = store.kv.read(rid, layer)
    n = k.shape[0] // P
    pool = k[:n * P].double().reshape(n, P, HKV, D).transpose(1, 2).contiguous()
    compiled = store.flow.compiled(P, D, G)
    out = {name: torch.zeros(n, HKV, r, c, dtype=torch.float64)
           for name, (r, c) in compiled.summaries.items()}
    run_cache(compiled, pool, torch.arange(n), out)
    return out


def assert_store_matches_kv(store: SummaryStore) -> None:
    for rid in store.kv.request_ids:
        rows = store.rows(rid)
        n_full = store.kv.num_full_pages(rid)
        assert all(r >= 0 for r in rows[:n_full]), (rid, rows)
        for layer in range(L):
            want = recomputed(store, rid, layer)
            for name, ref in want.items():
                got = store.layer(layer)[name][rows[:n_full]].double().cpu()
                tol = 0.0 if name in ("kmin", "kmax") else 1e-5
                assert (got - ref).abs().max().item() <= tol if n_full else True, (rid, layer, name)


def dense_copy(kv: PagedKVCache, rids, layer: int):
    """A fresh pool holding every page of `rids` (from wherever each lives) and its page table."""
    width = max([kv.num_pages(r) for r in rids], default=0)
    pool = torch.zeros(max(len(rids) * width, 1), HKV, P, D, dtype=kv.dtype)
    for i, rid in enumerate(rids):
        k, _ = kv.read(rid, layer)
        n = kv.num_pages(rid)
        padded = torch.zeros(n * P, HKV, D, dtype=kv.dtype)
        padded[:k.shape[0]] = k
        pool[i * width:i * width + n] = padded.reshape(n, P, HKV, D).transpose(1, 2)
    table = torch.arange(len(rids) * width, dtype=torch.int32).reshape(len(rids), width)
    lens = torch.tensor([kv.seq_len(r) for r in rids], dtype=torch.int32)
    return pool.to(DEVICE), table.to(DEVICE), lens.to(DEVICE)


class StoreMachine(RuleBasedStateMachine):
    """Random interleavings of every KV operation; summaries always equal the recomputed ones."""

    def __init__(self):
        super().__init__()
        self.kv = new_cache()
        self.stores = [SummaryStore(self.kv, "quest", group=G),          # fused CPU/GPU kernels
                       SummaryStore(self.kv, MaxCentroid(), group=G),    # interpreter
                       SummaryStore(self.kv, "centroid", group=G, dtype=torch.bfloat16)]

    @rule()
    def create(self):
        if len(self.kv.request_ids) < 4:
            self.kv.create_request()

    @precondition(lambda self: self.kv.request_ids)
    @rule(pick=st.integers(0, 99), n=st.integers(1, 2 * P + 1), seed=st.integers(0, 2**16))
    def append(self, pick, n, seed):
        rid = self.kv.request_ids[pick % len(self.kv.request_ids)]
        if self.kv.device_alloc.num_free < (n + P - 1) // P + 1:
            return
        gen = torch.Generator().manual_seed(seed)
        k = torch.randn(L, n, HKV, D, generator=gen)
        self.kv.append(rid, k, torch.randn(L, n, HKV, D, generator=gen))

    def _full_pages(self, pick, where):
        rid = self.kv.request_ids[pick % len(self.kv.request_ids)]
        res = self.kv.residency(rid)[:self.kv.num_full_pages(rid)]
        return rid, [p for p, (d, h) in enumerate(res) if where(d, h)]

    @precondition(lambda self: self.kv.request_ids)
    @rule(pick=st.integers(0, 99), frac=st.floats(0, 1))
    def offload(self, pick, frac):
        rid, pages = self._full_pages(pick, lambda d, h: d >= 0)
        pages = pages[:int(len(pages) * frac)]
        if len([p for p in pages]) <= self.kv.host_alloc.num_free:
            self.kv.offload(rid, pages)

    @precondition(lambda self: self.kv.request_ids)
    @rule(pick=st.integers(0, 99))
    def load(self, pick):
        rid, pages = self._full_pages(pick, lambda d, h: d < 0)
        pages = pages[:2]
        if len(pages) <= self.kv.device_alloc.num_free - 2:
            self.kv.load(rid, pages)

    @precondition(lambda self: self.kv.request_ids)
    @rule(pick=st.integers(0, 99))
    def evict(self, pick):
        rid, pages = self._full_pages(pick, lambda d, h: d >= 0 and h >= 0)
        self.kv.evict(rid, pages)

    @precondition(lambda self: self.kv.request_ids)
    @rule(pick=st.integers(0, 99))
    def free(self, pick):
        self.kv.free_request(self.kv.request_ids[pick % len(self.kv.request_ids)])

    @invariant()
    def summaries_equal_the_cache_stage_over_the_kv(self):
        for store in self.stores:
            if store.dtype == torch.float32:
                assert_store_matches_kv(store)
            used = sum(self.kv.num_full_pages(r) for r in self.kv.request_ids)
            assert store.rows_used == used

    @invariant()
    def rows_are_unique_across_requests(self):
        for store in self.stores:
            rows = [r for rid in self.kv.request_ids for r in store.rows(rid) if r >= 0]
            assert len(rows) == len(set(rows))


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)


def split_batch(seed: int, kv: PagedKVCache, lens=(37, 0, 5, 23)):
    """Requests of `lens` tokens with about half of their full pages offloaded and one reloaded."""
    gen = torch.Generator().manual_seed(seed)
    rids = []
    for n in lens:
        rid = kv.create_request()
        kv.append(rid, torch.randn(L, n, HKV, D, generator=gen).to(kv.dtype),
                  torch.randn(L, n, HKV, D, generator=gen).to(kv.dtype))
        full = kv.num_full_pages(rid)
        off = [p for p in range(full) if torch.rand(1, generator=gen).item() < 0.5]
        kv.offload(rid, off)
        if off:
            kv.load(rid, off[:1])
        rids.append(rid)
    return rids


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("flow", LIBRARY + ["user", "negquest"])
def test_selection_from_the_store_equals_stateless_select_pages(flow, seed):
    kv = new_cache(device_pages=40, host_pages=40)
    obj = {"user": MaxCentroid(), "negquest": NegQuest()}.get(flow, flow)
    store = SummaryStore(kv, obj, group=G)
    rids = split_batch(seed, kv)
    assert any(d < 0 for rid in rids for d, _ in kv.residency(rid)), "nothing offloaded"
    gen = torch.Generator().manual_seed(100 + seed)
    q = torch.randn(len(rids), HKV * G, D, generator=gen).to(DEVICE)
    for layer in range(L):
        pool, table, lens = dense_copy(kv, rids, layer)
        for budget in (3, 5, 12):
            got = store.select_pages(layer, q, rids, budget, 1, 2)
            want = vflow.select_pages(obj, q, pool, table, lens, budget, 1, 2)
            assert got.device == q.device and got.shape == want.shape
            assert torch.equal(got.sort(-1).values, want.sort(-1).values), \
                f"seed {seed} layer {layer} budget {budget}"


def test_a_device_table_with_offloaded_pages_selects_through_the_store():
    """The stateless path needs every page resident; the store path does not."""
    kv = new_cache()
    store = SummaryStore(kv, "quest", group=G)
    rid = kv.create_request()
    kv.append(rid, torch.randn(L, 30, HKV, D), torch.randn(L, 30, HKV, D))
    kv.offload(rid, [0, 1, 2])
    q = torch.randn(1, HKV * G, D).to(DEVICE)
    table, lens = kv.page_table([rid])
    with pytest.raises(ValueError, match="page_table maps a used page to physical page -1"):
        vflow.select_pages("quest", q, kv.device_pool.k[0], table, lens, 4, 1, 2)
    sel = store.select_pages(0, q, [rid], 4, 1, 2)
    assert sel.shape == (1, HKV, 4) and int(sel.max()) < kv.num_pages(rid)


@pytest.mark.parametrize("flow", ["quest", "centroid", "streaming", "user"])
def test_short_requests_select_all_their_pages(flow):
    """0, 1 and sink + recent - 1 pages, at the config's budget: every page, padded with -1."""
    cfg = HybridConfig(page_size=P, sink_pages=1, recent_pages=2, budget_ratio=0.02)
    kv = new_cache()
    obj = MaxCentroid() if flow == "user" else flow
    store = SummaryStore(kv, obj, group=G)
    for tokens in (0, 1, P, P + 1, 2 * P, 2 * P + 1):          # 0, 1, 1, 2, 2, 3 pages
        rid = kv.create_request()
        kv.append(rid, torch.randn(L, tokens, HKV, D), torch.randn(L, tokens, HKV, D))
        n = kv.num_pages(rid)
        budget = cfg.budget_for(n)
        assert budget == 3
        q = torch.randn(1, HKV * G, D).to(DEVICE)
        sel = store.select_pages(0, q, [rid], budget, cfg.sink_pages, cfg.recent_pages)
        want = list(range(n)) + [-1] * (budget - n)
        assert all(sorted(row, key=lambda p: (p < 0, p)) == want for row in sel[0].tolist()), \
            (tokens, sel)
        table, lens = kv.page_table([rid])
        stateless = vflow.select_pages(obj, q, kv.device_pool.k[0], table, lens, budget, 1, 2)
        assert torch.equal(stateless.sort(-1).values, sel.sort(-1).values)
        kv.free_request(rid)


def test_empty_pool_selects_minus_one_rows_of_the_right_shape():
    q = torch.randn(2, HKV * G, D)
    k_pool = torch.zeros(0, HKV, P, D)
    table = torch.zeros(2, 0, dtype=torch.int32)
    lens = torch.zeros(2, dtype=torch.int32)
    sel = vflow.select_pages("quest", q, k_pool, table, lens, 3, 1, 2)
    assert sel.shape == (2, HKV, 3) and bool((sel == -1).all())


def test_bfloat16_summaries_are_the_rounded_float32_ones():
    kv = new_cache()
    s32 = SummaryStore(kv, "quest", group=G)
    s16 = SummaryStore(kv, "quest", group=G, dtype=torch.bfloat16)
    rids = split_batch(3, kv)
    for rid in rids:
        assert s32.rows(rid) == [r for r in s32.rows(rid)]
        for layer in range(L):
            for name in ("kmin", "kmax"):
                a = s32.layer(layer)[name][[r for r in s32.rows(rid) if r >= 0]]
                b = s16.layer(layer)[name][[r for r in s16.rows(rid) if r >= 0]]
                assert torch.equal(a.to(torch.bfloat16), b)
    q = torch.randn(len(rids), HKV * G, D).to(DEVICE)
    sel = s16.select_pages(1, q, rids, 5, 1, 2)
    # the same selection as the interpreter over the same bf16 summaries
    table, lens = s16.table(rids)
    ref = vflow.bind_flow("quest", P, D, G, s16.device, lower=False).indexer(
        q.to(s16.device), s16.layer(1), table, lens, 5, 1, 2)
    assert torch.equal(sel.cpu().sort(-1).values, ref.cpu().sort(-1).values)


def test_store_attached_late_summarizes_existing_pages_and_frees_rows():
    kv = new_cache()
    rid = kv.create_request()
    kv.append(rid, torch.randn(L, 21, HKV, D), torch.randn(L, 21, HKV, D))
    kv.offload(rid, [1, 3])
    store = SummaryStore(kv, "centroid", group=G)
    assert store.rows_used == 5
    assert_store_matches_kv(store)
    kv.free_request(rid)
    assert store.rows_used == 0


@pytest.mark.parametrize("location", ["device", "host"])
def test_location_is_a_setting(location):
    kv = new_cache()
    store = SummaryStore(kv, "quest", group=G, location=location)
    want = torch.device("cpu") if location == "host" else kv.device
    assert store.device.type == want.type
    rids = split_batch(5, kv)
    assert_store_matches_kv(store)
    q = torch.randn(len(rids), HKV * G, D).to(DEVICE)
    pool, table, lens = dense_copy(kv, rids, 0)
    got = store.select_pages(0, q, rids, 4, 1, 2)
    want_sel = vflow.select_pages("quest", q, pool, table, lens, 4, 1, 2)
    assert got.device == q.device
    assert torch.equal(got.sort(-1).values, want_sel.sort(-1).values)


@pytest.mark.parametrize("kwargs,match", [
    ({"location": "gpu"}, "location='gpu' must be one of"),
    ({"dtype": torch.float16}, "dtype=torch.float16 must be one of"),
    ({"group": 0}, "group=0 must be a positive integer"),
])
def test_bad_store_arguments_are_refused(kwargs, match):
    args = {"group": G, **kwargs}
    with pytest.raises(ValueError, match=match):
        SummaryStore(new_cache(), "quest", **args)


def test_select_pages_checks_its_arguments():
    kv = new_cache()
    store = SummaryStore(kv, "quest", group=G)
    rid = kv.create_request()
    kv.append(rid, torch.randn(L, 9, HKV, D), torch.randn(L, 9, HKV, D))
    q = torch.randn(1, HKV * G, D).to(DEVICE)          # only the argument named is wrong
    with pytest.raises(ValueError, match="budget=2 must be >= sink \\+ recent = 3"):
        store.select_pages(0, q, [rid], 2, 1, 2)
    with pytest.raises(ValueError, match="layer=5 outside"):
        store.select_pages(5, q, [rid], 3, 1, 2)
    with pytest.raises(ValueError, match="q must be a float tensor \\[2, 4, 8\\]"):
        store.select_pages(0, q, [rid, rid], 3, 1, 2)
    import numpy as np
    sel = store.select_pages(0, q, [rid], np.int64(3), np.int32(1), 2)
    assert sel.shape == (1, HKV, 3)
