"""GpuPageCache: the per-layer cache state on the device. Random steps, requests joining and leaving,
caches down to one slot: no slot mapped twice, slot <-> page maps agree, nothing used this step is
evicted, evictions take the least recently used slots, counters add up."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import pytest

from conftest import DEVICE
from vortex_hybrid.scheduler.gpu_page_cache import WINDOW_FACTOR, WINDOW_MIN, GpuPageCache

L, W = 2, 12


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.slots = None
        self.cache = None
        self.live: list[int] = []
        self.next_rid = 0
        self.last_used: dict[tuple[int, int, int], int] = {}   # (layer, rid, page) -> step

    @initialize(slots=st.integers(1, 6), quotas=st.booleans(), windowed=st.booleans())
    def build(self, slots, quotas, windowed):
        self.slots = slots
        # windowed: a clock window of 4 x capacity slots (window_min=1), else every slot ranked
        self.cache = GpuPageCache(L, slots, DEVICE, max_requests=1, max_pages=4, quotas=quotas,
                                  window_min=1 if windowed else WINDOW_MIN)
        self.cache.reserve(W)
        self.steps = 0

    @precondition(lambda self: self.cache is not None)
    @rule()
    def join(self):
        if len(self.live) < 4:
            self.live.append(self.next_rid)
            self.cache.index_of(self.next_rid)
            self.next_rid += 1

    @precondition(lambda self: self.cache is not None and self.live)
    @rule(pick=st.integers(0, 9))
    def leave(self, pick):
        rid = self.live.pop(pick % len(self.live))
        self.cache.remove_request(rid)
        self.last_used = {k: v for k, v in self.last_used.items() if k[1] != rid}
        for layer in range(L):
            assert self.cache.pages_of(rid, layer).numel() == 0

    @precondition(lambda self: self.cache is not None and self.live)
    @rule(layer=st.integers(0, L - 1), seed=st.integers(0, 2**16), p_want=st.floats(0, 1),
          p_fetch=st.floats(0, 1), cap=st.integers(0, 6))
    def step(self, layer, seed, p_want, p_fetch, cap):
        cache = self.cache
        self.steps += 1
        cache.next_step()
        gen = torch.Generator().manual_seed(seed)
        B = len(self.live)
        rows = torch.tensor([cache.index_of(r) for r in self.live], dtype=torch.int64).to(DEVICE)
        wanted = (torch.rand(B, W, generator=gen) < p_want).to(DEVICE)
        fetch = wanted & (torch.rand(B, W, generator=gen) < p_fetch).to(DEVICE)
        slots = cache.table(layer, rows, W)
        before = slots.clone()
        stamps_before = cache.stamp[layer, :self.slots].clone()
        k = min(cap, self.slots) or cache.capacity(B, W)          # 0: the default capacity
        w = max(cache.window_min, WINDOW_FACTOR * k)
        hand = int(cache.hand[layer])
        window = list(range(self.slots)) if w >= self.slots else \
            [(hand + i) % self.slots for i in range(w)]            # the slots it may evict
        full = cache.step(layer, rows, slots, wanted, fetch, capacity=k)
        plan_rows, plan_pages, plan_slots = full.valid()
        n = plan_slots.numel()
        assert bool((full.slots[n:] == -1).all() and (full.rows[n:] == -1).all())  # masked tail
        plan = full
        hit = wanted & (before >= 0)
        assert int(plan.hits) == int(hit.sum())
        assert int(plan.misses) == int((wanted & (before < 0)).sum())
        assert n <= int((fetch & (before < 0)).sum()) and n <= k
        assert set(plan_slots.tolist()) <= set(window)                # only the window's slots
        assert len(set(plan_slots.tolist())) == n                      # one copy per slot
        hit_slots = set(before[hit].tolist())
        assert not hit_slots & set(plan_slots.tolist())               # nothing in use evicted
        if n:                                 # victims were not used this step
            used = stamps_before.clone()
            used[before[hit].long()] = cache.now
            assert int(used[plan_slots].max()) < cache.now
            if not cache.quotas:              # plain LRU: and they are the window's oldest
                others = used[window].clone()
                others[[window.index(s) for s in plan_slots.tolist()]] = torch.iinfo(torch.int64).max
                assert int(used[plan_slots].max()) <= int(others.min())
        after = cache.table(layer, rows, W)
        for b, p, s in zip(plan_rows.tolist(), plan_pages.tolist(), plan_slots.tolist()):
            assert int(after[b, p]) == s
        missed = fetch & (before < 0)
        if n < int(missed.sum()):                     # the rest: no room, or no slot left
            assert n == k or int((cache.stamp[layer, window] < cache.now).sum()) == 0

    @precondition(lambda self: self.cache is not None and self.live)
    @rule(pick=st.integers(0, 9), pages=st.sets(st.integers(0, W - 1), max_size=6))
    def admit_filled(self, pick, pages):
        """`admit_all`: pages a step filled take the free slots, in every layer, in slot order;
        those already cached keep theirs; no free slot left: -1."""
        cache, rid = self.cache, self.live[pick % len(self.live)]
        r = cache.index_of(rid)
        pages = sorted(pages)
        before = [cache.slot_of[layer, r, pages].cpu() for layer in range(L)]
        free = [(cache.owner[layer, :self.slots, 0] < 0).nonzero().flatten().tolist()
                for layer in range(L)]
        got = cache.admit_all(torch.full((len(pages),), r, dtype=torch.int64, device=DEVICE),
                              torch.tensor(pages, dtype=torch.int64, device=DEVICE)).cpu()
        assert tuple(got.shape) == (L, len(pages))
        for layer in range(L):
            new = [i for i in range(len(pages)) if before[layer][i] < 0]
            taken = free[layer][:len(new)]                   # the first free slots, in order
            want = [-1] * len(pages)
            for i, slot in zip(new, taken):
                want[i] = slot
            assert got[layer].tolist() == want, (layer, pages, free[layer])
            for i, p in enumerate(pages):                    # mapped, cached ones unchanged
                slot = want[i] if want[i] >= 0 else int(before[layer][i])
                assert int(cache.slot_of[layer, r, p]) == slot

    @invariant()
    def maps_agree(self):
        if self.cache is None:
            return
        c = self.cache
        for layer in range(L):
            owner = c.owner[layer, :self.slots].cpu()
            held = torch.bincount(owner[:, 0][owner[:, 0] >= 0].long(),
                                  minlength=c.held.shape[1] - 1)
            assert c.held[layer, :-1].cpu().tolist() == held.tolist()   # kept count == recount
            assert bool((c.owner[layer, self.slots] == -1).all())       # the spare row stays free
            assert bool((c.slot_of[layer, :, c.max_pages] == -1).all())  # so does the spare column
            used = (owner[:, 0] >= 0).nonzero().flatten().tolist()
            keys = [tuple(owner[s].tolist()) for s in used]
            assert len(set(keys)) == len(keys)                        # no page in two slots
            for s, (r, p) in zip(used, keys):
                assert int(c.slot_of[layer, r, p]) == s
            mapped = (c.slot_of[layer] >= 0).sum().item()
            assert mapped == len(used)                                # no slot mapped twice
            assert bool((c.stamp[layer, :self.slots][owner[:, 0] < 0] == -1).all())


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_least_recently_used_slot_is_evicted_first():
    cache = GpuPageCache(1, 2, DEVICE)
    rows = torch.tensor([cache.index_of(7)], device=DEVICE)
    cache.reserve(8)

    def step(want_pages):
        cache.next_step()
        want = torch.zeros(1, 8, dtype=torch.bool, device=DEVICE)
        want[0, want_pages] = True
        return cache.step(0, rows, cache.table(0, rows, 8), want, want)

    step([0, 1])                          # both cached
    step([0])                             # 0 used again: 1 is now the oldest
    plan = step([0, 2])                   # 2 needs a slot: evicts 1, never 0 (in use)
    assert plan.valid()[1].tolist() == [2] and int(plan.evictions) == 1
    assert sorted(cache.pages_of(7, 0).tolist()) == [0, 2]
    plan = step([3, 4, 5])                # 3 fetches want 2 slots, both older than this step
    assert plan.valid()[1].tolist() == [3, 4] and int(plan.count) == 2


@pytest.mark.parametrize("quotas", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_step_over_the_selection_equals_the_step_over_every_page(seed, quotas):
    """`step(..., pages=sel)` (entries [B, K] of the selection) changes the state and plans the
    fetches exactly as the step over every page [B, W] with the same pages wanted, when each row
    lists its pages in ascending order (padding last): row-major order is the same then. Several
    windowed steps, slots shared by three requests of 2 KV heads, and a masked tail."""
    gen = torch.Generator().manual_seed(seed)
    B, H, Wp, K, S = 3, 2, 40, 9, 23
    caches = [GpuPageCache(2, S, DEVICE, max_requests=B, max_pages=Wp, quotas=quotas, heads=H,
                           window_min=8) for _ in range(2)]
    rows = caches[0].rows(torch.tensor([caches[0].index_of(r) for r in range(B)], device=DEVICE))
    assert torch.equal(rows, caches[1].rows(torch.tensor([caches[1].index_of(r) for r in range(B)],
                                                         device=DEVICE)))
    R = B * H
    for t in range(12):
        layer = t % 2
        n = torch.randint(0, K + 1, (R,), generator=gen)
        sel = torch.full((R, K), -1, dtype=torch.int64)
        for r in range(R):      # ascending pages, padding last; recent pages more often
            pool = torch.cat([torch.arange(Wp - 12, Wp), torch.randperm(Wp, generator=gen)[:16]])
            pages = torch.unique(pool)[torch.randperm(torch.unique(pool).numel(), generator=gen)]
            sel[r, :int(n[r])] = pages[:int(n[r])].sort().values
        chosen = sel >= 0
        wanted = chosen & (torch.rand(R, K, generator=gen) < 0.9)
        fetch = wanted & (torch.rand(R, K, generator=gen) < 0.8)
        idx = sel.clamp_min(0)
        dense_want = torch.zeros(R, Wp, dtype=torch.int64).scatter_add_(1, idx, wanted.long()) > 0
        dense_fetch = torch.zeros(R, Wp, dtype=torch.int64).scatter_add_(1, idx, fetch.long()) > 0
        cap = int(torch.randint(1, S + 1, (), generator=gen))
        plans = []
        for c, form in zip(caches, ("dense", "selection")):
            c.next_step()
            if form == "dense":
                plans.append(c.step(layer, rows, c.table(layer, rows, Wp), dense_want.to(DEVICE),
                                    dense_fetch.to(DEVICE), capacity=cap))
            else:
                slots = c.table(layer, rows, Wp).gather(1, idx.to(DEVICE))
                plans.append(c.step(layer, rows, slots, wanted.to(DEVICE), fetch.to(DEVICE),
                                    capacity=cap, pages=idx.to(DEVICE)))
        a, b = plans
        for f in ("rows", "pages", "slots", "hits", "misses", "evictions", "count"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (t, f)
        for x, y in zip(caches[0].state(layer), caches[1].state(layer)):
            assert torch.equal(x, y), t


def test_growing_requests_and_pages_keeps_the_maps():
    cache = GpuPageCache(2, 3, DEVICE, max_requests=1, max_pages=2)
    rows = torch.tensor([cache.index_of(r) for r in (1, 2, 3)], device=DEVICE)
    cache.reserve(10)
    cache.next_step()
    want = torch.zeros(3, 10, dtype=torch.bool, device=DEVICE)
    want[0, 9] = want[2, 4] = True
    cache.step(1, rows, cache.table(1, rows, 10), want, want)
    assert cache.pages_of(1, 1).tolist() == [9] and cache.pages_of(3, 1).tolist() == [4]
    cache.remove_request(1)
    assert cache.pages_of(1, 1).tolist() == [] and int((cache.owner[1, :, 0] >= 0).sum()) == 1


def test_capacity_bounds_the_fetches_and_the_rest_stays_masked():
    cache = GpuPageCache(1, 4, DEVICE)
    rows = torch.tensor([cache.index_of(3)], device=DEVICE)
    cache.reserve(8)
    cache.next_step()
    want = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    plan = cache.step(0, rows, cache.table(0, rows, 8), want, want, capacity=3)
    assert plan.slots.numel() == 3 and int(plan.count) == 3
    assert plan.valid()[1].tolist() == [0, 1, 2] and cache.pages_of(3, 0).tolist() == [0, 1, 2]
    for bad in (5, -1):
        try:
            cache.step(0, rows, cache.table(0, rows, 8), want, want, capacity=bad)
        except ValueError as e:
            assert f"capacity={bad}" in str(e)
        else:
            raise AssertionError(f"capacity={bad} accepted")


def test_step_never_synchronises_the_gpu():
    """The cache step is graph-capturable: no device-to-host read anywhere (CUDA only)."""
    if DEVICE.type != "cuda":
        import pytest
        pytest.skip("needs CUDA (sync detection)")
    cache = GpuPageCache(2, 5, DEVICE)
    rows = torch.tensor([cache.index_of(r) for r in (1, 2)], device=DEVICE)
    cache.reserve(16)
    want = torch.rand(2, 16, device=DEVICE) < 0.5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            cache.next_step()
            cache.step(1, rows, cache.table(1, rows, 16), want, want)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quotas_keep_the_working_set_of_the_request_that_reuses_it(seed):
    """Request A cycles through 6 pages, 3 a step (reuse 2/3); request B wants 3 new pages every
    step (reuse 0); 9 slots (A's 6 + B's 3 in use). Plain LRU lets B's never-reused pages push A's out; quotas sized from
    measured reuse keep A's working set, so A hits more. Reuse estimates converge to the truth."""
    gen = torch.Generator().manual_seed(seed)
    hits = {}
    for quotas in (False, True):
        cache = GpuPageCache(1, 9, DEVICE, quotas=quotas)
        order = [0, 1] if torch.rand(1, generator=gen).item() < 0.5 else [1, 0]
        rows = torch.tensor([cache.index_of(r) for r in order], device=DEVICE)   # A=0, B=1
        cache.reserve(200)
        total = 0
        for s in range(40):
            cache.next_step()
            want = torch.zeros(2, 200, dtype=torch.bool, device=DEVICE)
            a, b = order.index(0), order.index(1)
            want[a, [(s + i) % 6 for i in range(3)]] = True
            want[b, [10 + 3 * s + i for i in range(3)]] = True
            slots = cache.table(0, rows, 200)
            plan = cache.step(0, rows, slots, want, want)
            if s >= 10:
                total += int((want[a] & (slots[a] >= 0)).sum())
        hits[quotas] = total
        if quotas:
            reuse = cache.reuse[0, rows.cpu()].tolist()
            assert abs(reuse[a] - 2 / 3) < 0.05 and reuse[b] < 0.05, reuse
    print("A's hits over 30 steps (of 90):", hits)
    assert hits[True] > hits[False] + 20, hits


def test_state_lists_everything_a_step_changes():
    """Graph capture restores `state(layer)` after its warm-up runs: a step must change nothing
    else (another layer's state included)."""
    cache = GpuPageCache(2, 3, DEVICE)
    rows = torch.tensor([cache.index_of(r) for r in (5, 6)], device=DEVICE)
    cache.reserve(8)
    want = torch.rand(2, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE) < 0.5
    for _ in range(2):
        cache.next_step()
        cache.step(1, rows, cache.table(1, rows, 8), want, want)
    every = {n: getattr(cache, n).clone() for n in ("slot_of", "owner", "stamp", "seen", "reuse")}
    saved = [t.clone() for t in cache.state(1)]
    cache.next_step()
    cache.step(1, rows, cache.table(1, rows, 8), ~want, ~want)
    for t, old in zip(cache.state(1), saved):
        t.copy_(old)
    for n, old in every.items():
        assert torch.equal(getattr(cache, n), old), n


def test_per_head_rows_cache_each_kv_head_on_its_own_and_leave_together():
    """heads=2: a request has two rows (request index x 2 + head); each row's pages take their own
    slots, a page cached for one head is a miss for the other, and removing the request frees the
    slots of both rows."""
    cache = GpuPageCache(L, 6, DEVICE, heads=2)
    a, b = cache.index_of(10), cache.index_of(11)
    rows = cache.rows(torch.tensor([a, b], device=DEVICE))
    assert rows.tolist() == [2 * a, 2 * a + 1, 2 * b, 2 * b + 1]
    want = torch.zeros(4, W, dtype=torch.bool, device=DEVICE)
    want[0, 3] = True                               # request 10, head 0: page 3
    want[3, 5] = True                               # request 11, head 1: page 5
    cache.next_step()
    plan = cache.step(0, rows, cache.table(0, rows, W), want, want)
    r, p, s = plan.valid()
    assert sorted(zip(r.tolist(), p.tolist())) == [(0, 3), (3, 5)]
    table = cache.table(0, rows, W)
    assert table[0, 3] >= 0 and table[1, 3] < 0     # head 1 of page 3 is not cached
    want2 = torch.zeros_like(want)
    want2[1, 3] = True                              # head 1 now wants page 3: a miss
    cache.next_step()
    plan = cache.step(0, rows, cache.table(0, rows, W), want2, want2)
    assert int(plan.misses) == 1 and int(plan.hits) == 0 and int(plan.count) == 1
    assert cache.pages_of(10, 0).tolist() == [3]
    cache.remove_request(10)
    assert cache.pages_of(10, 0).tolist() == []
    owners = cache.owner[0, :6, 0]
    assert not bool(((owners >= 0) & (owners // 2 == a)).any())     # both rows' slots free
    assert int((owners >= 0).sum()) == 1                            # request 11's slot kept


def test_a_large_cache_ranks_a_moving_window_not_every_slot():
    """100 slots, capacity 5, window_min 1: each step ranks the 20 slots after the clock hand,
    takes its victims there (the free ones first), and moves the hand on; every slot comes up in
    turn, and a slot in use this step is never taken even inside the window."""
    cache = GpuPageCache(1, 100, DEVICE, window_min=1, quotas=False)
    rows = torch.tensor([cache.index_of(1)], device=DEVICE)
    cache.reserve(64)
    taken = []
    for step in range(6):
        cache.next_step()
        want = torch.zeros(1, 64, dtype=torch.bool, device=DEVICE)
        want[0, 5 * step:5 * step + 5] = True
        plan = cache.step(0, rows, cache.table(0, rows, 64), want, want, capacity=5)
        slots = sorted(plan.valid()[2].tolist())
        lo = (20 * step) % 100
        assert all(lo <= s < lo + 20 for s in slots), (step, slots)
        assert len(slots) == 5 and int(cache.hand[0]) == (lo + 20) % 100
        taken += slots
    assert len(set(taken)) == 30              # fresh slots each step: the free ones first
    cache.next_step()                         # the window is now slots 20..39
    want = torch.zeros(1, 64, dtype=torch.bool, device=DEVICE)
    want[0, :5] = True                        # pages 0..4 in use (hits) ...
    want[0, 40:45] = True                     # ... and 5 new ones need slots in the window
    plan = cache.step(0, rows, cache.table(0, rows, 64), want, want, capacity=5)
    assert int(plan.hits) == 5 and int(plan.count) == 5
    assert sorted(cache.pages_of(1, 0).tolist())[:5] == [0, 1, 2, 3, 4]   # in use: kept


@pytest.mark.parametrize("seed", range(6))
def test_eviction_takes_the_n_slots_that_rank_first(seed):
    """`_oldest` (the counting sort that replaced a `topk`): the `n` positions it takes are `n`
    distinct slots whose (group, age) keys are the `n` smallest, ages capped at AGES - 1; slots
    used this step (age 0) are never among them while `n` counts only older ones (seed 0-5)."""
    from vortex_hybrid.scheduler.gpu_page_cache import AGES, _oldest
    gen = torch.Generator().manual_seed(seed)
    w, now = 200, 100
    group = torch.randint(0, 3, (w,), generator=gen)
    stamp = torch.randint(-1, now + 1, (w,), generator=gen)
    stamp[group == 0] = -1                                  # free slots
    group[stamp == now] = 2                                 # used this step: never over quota
    older = int((stamp < now).sum())
    for n in sorted({0, 1, older // 3, older}):
        k = max(1, older)
        pos = _oldest(group.to(DEVICE), stamp.to(DEVICE), torch.tensor(now, device=DEVICE),
                      torch.tensor(n, device=DEVICE), k).cpu()[:n]
        assert len(set(pos.tolist())) == n
        key = group * AGES + (AGES - 1 - (now - stamp).clamp(0, AGES - 1))
        assert sorted(key[pos].tolist()) == sorted(key.tolist())[:n], (seed, n)
        assert bool((stamp[pos] < now).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coverage_and_free_slots_match_a_count_over_the_state(seed):
    """`coverage(rows, pages, width)`: whether every layer caches pages [0, pages[i]) of row
    rows[i], and the fewest free slots of any layer, equal a plain loop over slot_of and owner
    after admissions that differ per layer (random, seed printed), and `version` moves with every
    eager change."""
    g = torch.Generator().manual_seed(seed)
    print(f"seed {seed}")
    layers, heads, slots = 3, 2, 20
    cache = GpuPageCache(layers, slots, DEVICE, heads=heads)
    rids = [5, 6]
    v = cache.version
    for layer in range(layers):                   # layer-dependent page counts per request
        for rid in rids:
            n = int(torch.randint(0, 5, (1,), generator=g))
            cache.admit(rid, layer, torch.arange(n, device=DEVICE))
    assert cache.version > v
    rows = cache.rows_of(rids)
    assert cache.rows_of(rids) is rows            # the same batch: the same tensor
    for _ in range(6):
        pages = torch.randint(0, 5, (len(rids) * heads,), generator=g)
        ok, free = cache.coverage(rows, pages.to(DEVICE), int(pages.max()))
        want_free = min(int((cache.owner[layer, :slots, 0] < 0).sum()) for layer in range(layers))
        want_ok = all(int(cache.slot_of[layer, int(r), p]) >= 0
                      for layer in range(layers) for r, n in zip(rows.tolist(), pages.tolist())
                      for p in range(n))
        assert (ok, free) == (want_ok, want_free), (pages.tolist(), ok, free)
    v = cache.version
    cache.remove_request(5)
    assert cache.version > v
    assert cache.coverage(rows, torch.zeros_like(rows), cache.max_pages + 1) == (False, 0)


def test_coverage_knowledge_extends_only_pages_that_join_what_it_knew():
    """`Coverage.admitted`: admissions into known-free slots extend a request's known pages only
    where they continue them (a gap of pages never admitted stays unknown), use up the free slots
    they may take, and a change the knowledge did not see (another version), or more head-pages
    than its free slots, voids it."""
    from vortex_hybrid.scheduler.gpu_page_cache import Coverage
    cache = GpuPageCache(2, 16, DEVICE, heads=2)
    known = Coverage(cache.version, 6, {1: 4, 2: 2})
    before = cache.version
    cache.version += 1                            # what admit_all does
    assert known.admitted(cache, before, 4, {1: (4, 6), 2: (3, 5)})
    assert known.pages == {1: 6, 2: 2} and known.free == 2 and known.version == cache.version
    assert known.holds(cache, [1, 2], [6, 2]) and not known.holds(cache, [1, 2], [6, 3])
    before = cache.version
    cache.version += 1
    assert not known.admitted(cache, before, 4, {1: (6, 8)})        # 4 > 2 free slots
    assert not Coverage(0, 99, {}).admitted(cache, cache.version - 1, 0, {})  # unseen change


@pytest.mark.parametrize("seed", range(6))
def test_admit_layers_is_admit_layer_by_layer(seed):
    """`admit_layers` (one sync for every layer) leaves the state, version and slots exactly as
    `admit` called layer after layer, also where the layers have different free slots."""
    gen = torch.Generator().manual_seed(seed)
    L, S, h = 3, 24, 2
    caches = [GpuPageCache(L, S, DEVICE, heads=h, max_requests=2, max_pages=4) for _ in "ab"]
    for cache in caches:                      # the same history: other requests' slots per layer
        g = torch.Generator().manual_seed(seed)
        for layer in range(L):
            n = int(torch.randint(0, 8, (1,), generator=g))
            cache.admit(7, layer, torch.arange(n, dtype=torch.int64, device=DEVICE))
    first = int(torch.randint(0, 5, (1,), generator=gen))
    n = int(torch.randint(0, 12, (1,), generator=gen))
    a, b = caches
    want = [a.admit(3, layer, torch.arange(first, first + n, dtype=torch.int64, device=DEVICE))
            for layer in range(L)]
    m, slots = b.admit_layers(3, range(first, first + n))
    assert m == [got.numel() for got, _ in want]
    for layer, (got, s) in enumerate(want):
        assert torch.equal(slots[layer, :m[layer]], s)
    assert a.version == b.version
    for x, y in zip(a._state(), b._state()):
        assert torch.equal(x, y)
    assert a._index == b._index
