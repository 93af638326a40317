"""The GPU page cache policy: a hypothesis state machine over steps, budgets and removals (cache
sizes down to zero slots), plus LRU order, budgets, max_fetch, validation and a PagedKVCache run."""

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vortex_hybrid.kv import NOT_RESIDENT, PagedKVCache
from vortex_hybrid.scheduler.page_cache import PageCache

RIDS, PAGES = st.integers(0, 3), st.integers(0, 7)


class PageCacheMachine(RuleBasedStateMachine):
    """Random steps, budget changes and removals. The model keeps the cached keys, the step each key
    was last used and the counters, rebuilt only from what the plans say; every step is checked
    against the rules of `step` and the invariants against the cache's own tables."""

    @initialize(num_slots=st.integers(0, 6), num_buckets=st.integers(2, 4))
    def setup(self, num_slots, num_buckets):
        self.c = PageCache(num_slots, num_buckets)
        self.n, self.R = num_slots, num_buckets - 1
        self.now = 0
        self.last_use = {}     # (rid, page) -> step that last used it; its keys are the cached keys
        self.budget = {}       # rid -> cap
        self.count = dict(steps=0, hits=0, misses=0, fetches=0, evictions=0)

    def cached(self, rid):
        return {p for (r, p) in self.last_use if r == rid}

    def bucket(self, key):
        return min(self.now - self.last_use[key], self.R)

    def check_lru(self, victims, survivors):
        """Every victim sits in a bucket at least as old as any survivor that could have gone."""
        if victims and survivors:
            assert min(map(self.bucket, victims)) >= max(map(self.bucket, survivors))

    @rule(wanted=st.dictionaries(RIDS, st.lists(PAGES, unique=True, max_size=6), max_size=4),
          in_use=st.none() | st.dictionaries(RIDS, st.sets(PAGES, max_size=4), max_size=3),
          max_fetch=st.none() | st.integers(0, 4))
    def step(self, wanted, in_use, max_fetch):
        rids = set(wanted) | {r for r, _ in self.last_use} | set(in_use or ())
        before = {rid: self.cached(rid) for rid in rids}
        plan = self.c.step(wanted, in_use, max_fetch)
        self.now += 1
        after = {rid: self.c.pages_of(rid) for rid in rids}
        assert set(plan.hits) == set(plan.fetch) == set(plan.misses_left) == set(wanted)
        protected = {(r, p) for r, ps in (in_use or {}).items() for p in ps if p in before[r]}
        for rid, want in wanted.items():
            hits, fetch, left = plan.hits[rid], plan.fetch[rid], plan.misses_left[rid]
            assert sorted(hits + fetch + left) == sorted(want)          # a partition of wanted
            assert set(hits) == set(want) & before[rid]
            for part in (hits, fetch, left):                            # each in priority order
                assert part == [p for p in want if p in set(part)]
            assert [self.c.slot_of(rid, p) for p in fetch] == plan.fetch_slots[rid]
            protected |= {(rid, p) for p in hits + fetch}
        n_fetch = sum(map(len, plan.fetch.values()))
        n_evict = sum(map(len, plan.evict.values()))
        assert max_fetch is None or n_fetch <= max_fetch
        assert n_evict <= n_fetch
        victims, survivors = [], []
        for rid in rids:
            ev, fe = set(plan.evict.get(rid, [])), set(plan.fetch.get(rid, []))
            assert len(ev) == len(plan.evict.get(rid, [])) and ev <= before[rid]
            assert not ev & {p for r, p in protected if r == rid}        # nothing in use evicted
            assert after[rid] == (before[rid] - ev) | fe                  # plan says every change
            stale = [(rid, p) for p in before[rid] - ev if (rid, p) not in protected]
            self.check_lru([(rid, p) for p in ev], stale)
            victims += [(rid, p) for p in ev]
            survivors += stale
        if all(b is None for b in self.budget.values()):
            self.check_lru(victims, survivors)
        for rid in wanted:   # a page goes to the CPU only if max_fetch is spent or no slot is free
            if plan.misses_left[rid] and (max_fetch is None or n_fetch < max_fetch):
                at_cap = self.budget.get(rid) is not None and len(after[rid]) == self.budget[rid] \
                    and all(self.c.bucket_of(rid, p) == 0 for p in after[rid])
                full = self.c.num_free == 0 and (self.c.slot_table()[2] == self.now).all()
                assert at_cap or full, (rid, plan)
        if self.c.num_free:   # no free slot ran out, so every eviction was a request at its cap
            for rid, ev in plan.evict.items():
                assert self.budget.get(rid) is not None and len(after[rid]) == self.budget[rid]
        for rid in rids:
            for p in before[rid] - after[rid]:
                del self.last_use[(rid, p)]
        for key in protected:
            self.last_use[key] = self.now
        self.count["steps"] += 1
        self.count["hits"] += sum(map(len, plan.hits.values()))
        self.count["misses"] += sum(len(w) for w in wanted.values()) - \
            sum(map(len, plan.hits.values()))
        self.count["fetches"] += n_fetch
        self.count["evictions"] += n_evict

    @rule(rid=RIDS, slots=st.none() | st.integers(0, 4))
    def set_budget(self, rid, slots):
        before = self.cached(rid)
        dropped = self.c.set_budget(rid, slots)
        expect = 0 if slots is None else max(0, len(before) - slots)
        assert len(dropped) == len(set(dropped)) == expect
        assert set(dropped) <= before and self.c.pages_of(rid) == before - set(dropped)
        self.check_lru([(rid, p) for p in dropped], [(rid, p) for p in before - set(dropped)])
        for p in dropped:
            del self.last_use[(rid, p)]
        self.budget[rid] = slots
        self.count["evictions"] += len(dropped)
        assert self.c.budget_of(rid) == slots

    @rule(rid=RIDS)
    def remove(self, rid):
        before, free = self.cached(rid), self.c.num_free
        assert self.c.remove_request(rid) == sorted(before)
        assert self.c.pages_of(rid) == set() and self.c.budget_of(rid) is None
        assert self.c.num_free == free + len(before)
        for p in before:
            del self.last_use[(rid, p)]
        self.budget.pop(rid, None)

    @invariant()
    def tables_agree_with_each_other_and_the_model(self):
        rid_of, page_of, stamp = self.c.slot_table()
        used = [s for s in range(self.n) if rid_of[s] != -1]
        keys = [(int(rid_of[s]), int(page_of[s])) for s in used]
        assert len(keys) == len(set(keys))                                 # no key in two slots
        assert set(keys) == set(self.last_use)                             # model agrees
        assert all(self.c.slot_of(*k) == s for k, s in zip(keys, used))    # and both maps agree
        assert self.c.num_free + len(used) == self.n
        free = [s for s in range(self.n) if rid_of[s] == -1]
        assert all(page_of[s] == -1 and stamp[s] == -1 for s in free)
        for key, s in zip(keys, used):
            assert stamp[s] == self.last_use[key] and self.c.bucket_of(*key) == self.bucket(key)

    @invariant()
    def budgets_hold_and_counters_add_up(self):
        for rid, cap in self.budget.items():
            assert cap is None or len(self.c.pages_of(rid)) <= cap
        assert self.c.stats() == self.count
        assert self.count["fetches"] <= self.count["misses"]


TestPageCacheMachine = PageCacheMachine.TestCase
TestPageCacheMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def fill(cache, rid, pages):
    """One step per page, in order: pages[0] is the least recently used afterwards."""
    for p in pages:
        assert cache.step({rid: [p]}).fetch[rid] == [p]


def test_recently_used_page_survives_and_the_oldest_goes_first():
    c = PageCache(3, num_buckets=8)
    fill(c, 0, [0, 1, 2])
    assert [c.bucket_of(0, p) for p in (0, 1, 2)] == [2, 1, 0]
    plan = c.step({0: [0, 3]})                  # 0 is used again, so 1 is now the oldest
    assert plan.hits[0] == [0] and plan.fetch[0] == [3] and plan.evict == {0: [1]}
    assert c.step({0: [4]}).evict == {0: [2]}
    assert c.pages_of(0) == {0, 3, 4}


def test_buckets_are_coarse_and_the_oldest_bucket_goes_first():
    c = PageCache(3, num_buckets=3)             # buckets: this step, one step ago, older
    fill(c, 0, [0, 1, 2])
    assert [c.bucket_of(0, p) for p in (0, 1, 2)] == [2, 1, 0]
    plan = c.step({0: [5, 6]})                  # 0 and 1 now share the oldest bucket; 2 stays
    assert sorted(plan.evict[0]) == [0, 1] and c.pages_of(0) == {2, 5, 6}
    assert c.bucket_of(0, 2) == 1 and c.bucket_of(0, 5) == 0


def test_a_hit_listed_after_a_miss_is_not_evicted_for_it():
    c = PageCache(2)
    fill(c, 0, [1, 0])                          # 1 is older than 0
    plan = c.step({0: [5, 1]})
    assert plan.hits[0] == [1] and plan.evict == {0: [0]} and c.pages_of(0) == {1, 5}


def test_in_use_pages_are_never_evicted_and_count_as_used():
    c = PageCache(1)
    fill(c, 7, [0])
    plan = c.step({3: [4]}, in_use={7: {0, 9}})   # 9 is not cached: ignored
    assert plan.fetch[3] == [] and plan.misses_left[3] == [4] and plan.evict == {}
    assert c.bucket_of(7, 0) == 0
    c2 = PageCache(2)
    fill(c2, 0, [0, 1])
    c2.step({}, in_use={0: [0]})                # refreshes 0, so 1 is the oldest
    assert c2.step({0: [2]}).evict == {0: [1]}


def test_budget_caps_a_request_and_makes_it_replace_its_own_pages():
    c = PageCache(4)
    assert c.set_budget(0, 1) == []
    plan = c.step({0: [0, 1], 1: [10]})
    assert plan.fetch == {0: [0], 1: [10]} and plan.misses_left[0] == [1]
    plan = c.step({0: [1]})                     # free slots remain, but 0 is at its cap
    assert plan.evict == {0: [0]} and c.pages_of(0) == {1} and c.num_free == 2
    c.set_budget(1, None)
    fill(c, 1, [11, 12])
    assert c.set_budget(1, 1) == [10, 11]       # lowered cap drops least recently used first
    assert c.pages_of(1) == {12} and c.stats()["evictions"] == 3
    assert c.step({0: [2]}, in_use={0: {1}}).misses_left[0] == [2]   # 0's own page is in use


def test_max_fetch_goes_round_robin_by_priority():
    c = PageCache(8)
    plan = c.step({0: [0, 1, 2], 1: [10, 11]}, max_fetch=3)
    assert plan.fetch == {0: [0, 1], 1: [10]} and plan.misses_left == {0: [2], 1: [11]}
    assert c.stats() == dict(steps=1, hits=0, misses=5, fetches=3, evictions=0)


def test_zero_slots_leave_everything_to_the_cpu_and_remove_frees_slots():
    c = PageCache(0)
    assert c.step({0: [0, 1]}).misses_left == {0: [0, 1]} and c.num_free == 0
    c = PageCache(3)
    c.step({0: [4, 2], 1: [0]})
    assert c.remove_request(0) == [2, 4] and c.num_free == 2 and c.pages_of(0) == set()
    assert c.remove_request(0) == [] and c.slot_of(1, 0) is not None


@pytest.mark.parametrize("call, message", [
    (lambda: PageCache(-1), r"num_slots=-1 is invalid: a non-negative integer"),
    (lambda: PageCache(2.0), r"num_slots=2.0 is invalid"),
    (lambda: PageCache(4, num_buckets=1), r"num_buckets=1 is invalid: an integer >= 2"),
    (lambda: PageCache(4).set_budget(0, -2), r"slots=-2 is invalid: None \(no cap\) or a non-neg"),
    (lambda: PageCache(4).set_budget(True, 1), r"rid=True is invalid: a non-negative integer"),
    (lambda: PageCache(4).step([1, 2]), r"wanted=\[1, 2\] is invalid: a dict request id"),
    (lambda: PageCache(4).step({0: [3, 1, 3]}), r"wanted\[0\] lists pages \[3\] twice"),
    (lambda: PageCache(4).step({0: [-1]}), r"wanted\[0\] page=-1 is invalid: a non-negative"),
    (lambda: PageCache(4).step({0: {1, 2}}), r"wanted\[0\]=\{1, 2\} is invalid: a sequence"),
    (lambda: PageCache(4).step({-3: [1]}), r"wanted request id=-3 is invalid"),
    (lambda: PageCache(4).step({0: [1]}, in_use={0: ["a"]}), r"in_use\[0\] page='a' is invalid"),
    (lambda: PageCache(4).step({0: [1]}, max_fetch=-1), r"max_fetch=-1 is invalid: None"),
])
def test_bad_input_is_named_in_the_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_rejected_step_changes_nothing():
    c = PageCache(2)
    fill(c, 0, [0, 1])
    table, stats = c.slot_table(), c.stats()
    with pytest.raises(ValueError):
        c.step({0: [2], 1: [5, 5]})
    assert c.stats() == stats and c.pages_of(0) == {0, 1} and c.pages_of(1) == set()
    assert all((a == b).all() for a, b in zip(table, c.slot_table()))


def test_plans_run_on_a_paged_kv_cache():
    """Executing plans with kv.evict then kv.load keeps the device copies equal to the cache."""
    kv = PagedKVCache(1, 1, 4, 4, device_pages=8, host_pages=16, dtype=torch.float32, device="cpu")
    rids = [kv.create_request() for _ in range(2)]
    for rid in rids:
        kv.append(rid, torch.randn(1, 24, 1, 4), torch.randn(1, 24, 1, 4))
        kv.offload(rid, range(6))
    c = PageCache(3, num_buckets=2)
    c.set_budget(rids[0], 2)
    for wanted in ([[0, 1, 2], [3]], [[4], [3, 5]], [[0, 5], [1, 2, 4]], [[], [0]]):
        plan = c.step(dict(zip(rids, wanted)))
        for rid, pages in plan.evict.items():
            kv.evict(rid, pages)
        for rid, pages in plan.fetch.items():
            kv.load(rid, pages)
        for rid in rids:
            on_device = {p for p, (d, _) in enumerate(kv.residency(rid)) if d != NOT_RESIDENT}
            assert on_device == c.pages_of(rid)
