"""`PageCache`: policy and bookkeeping of the GPU page cache (HBM slots holding copies of host pages).

Modelled on SPIN's locality-aware KV cache manager: per-request HBM budgets and a bucketed LRU.
A pure data structure over keys `(request_id, logical_page)`; it moves no bytes. Once per decode
step the runtime calls `step`, then performs the plan on a `PagedKVCache`: first
`kv.evict(rid, plan.evict[rid])`, then `kv.load(rid, plan.fetch[rid])` (evictions free the slots
the fetches reuse), and attends `plan.misses_left` on the CPU.

    cache = PageCache(num_slots=4096, num_buckets=8)
    cache.set_budget(rid, 256) -> list[int]   # cap on rid's slots (None: no cap); returns pages
                                              # dropped to fit a lowered cap (caller evicts them)
    plan = cache.step(wanted, in_use=None, max_fetch=None) -> StepPlan
    cache.remove_request(rid) -> list[int]    # pages it held, slots freed
    cache.pages_of(rid) -> set[int]; cache.slot_of(rid, page) -> int | None
    cache.bucket_of(rid, page) -> int | None  # 0: used this step .. num_buckets-1: oldest
    cache.num_free, cache.budget_of(rid), cache.stats() -> dict[str, int], cache.slot_table()

`step(wanted: dict[int, Sequence[int]], in_use: dict[int, Iterable[int]] | None, max_fetch)`:
`wanted[rid]` lists the pages step wants on the GPU, highest priority first. Cached ones are hits;
misses are fetched round-robin by rank across requests (every request's first miss, then every
second, ...) until `max_fetch` fetches. Rules: a page is fetched at most once per step (a page
listed twice is a `ValueError`); pages in use this step (hits, fetched pages, and cached pages in
`in_use`, which may also name uncached pages: they are ignored) are never evicted and count as
used; a request never holds more than its budget, so at its cap it may only replace its own
pages; otherwise a free slot is taken, else the least recently used slot of any request. When no
slot can be freed the page is left to the CPU (`misses_left`) rather than evicting a page in use.

Bucketed LRU: recency is kept per step, not per access. A slot's stamp is the last step that used
it; its bucket is `min(now - stamp, num_buckets - 1)`: the last `num_buckets - 1` steps have a
bucket each and everything older shares the last one. Eviction takes any slot of the oldest
non-empty bucket (no order within a bucket), never bucket 0 (this step). On a GPU this is one
scatter of the current step into an int array of stamps per step and a bucket histogram at
eviction: no list to reorder per access, no round trip. Here each bucket is a Python set (one
ring of sets for the whole cache, one per request), so a step costs O(pages touched +
num_buckets * evictions), not O(num_slots). Slot -> (request, page, stamp) lives in NumPy int64
arrays (-1 = free) that a later change can move to a GPU tensor.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

FREE = -1


def _int(name: str, value, allowed: str = "a non-negative integer", low: int = 0) -> int:
    """`value` as an int >= `low`, else a ValueError naming it, its value and what is allowed."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        v = None
    if v is None or v < low:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")
    return v


class _Buckets:
    """Slots by recency bucket: a ring of `n - 1` per-step sets and one set of older slots."""

    def __init__(self, num_buckets: int) -> None:
        self.r = num_buckets - 1
        self.ring: list[set[int]] = [set() for _ in range(self.r)]
        self.ring_step = [FREE] * self.r          # step each ring set holds, FREE when empty
        self.old: set[int] = set()

    def _age(self, now: int) -> None:
        """Merge ring sets that fell out of the last `r` steps into `old` (amortised O(1))."""
        for k, s in enumerate(self.ring_step):
            if s != FREE and s <= now - self.r:
                self.old |= self.ring[k]
                self.ring[k].clear()
                self.ring_step[k] = FREE

    def add(self, slot: int, now: int) -> None:
        self._age(now)
        k = now % self.r
        self.ring_step[k] = now
        self.ring[k].add(slot)

    def discard(self, slot: int, stamp: int) -> None:
        k = stamp % self.r
        (self.ring[k] if self.ring_step[k] == stamp else self.old).discard(slot)

    def oldest(self, now: int, spare_now: bool = True) -> Optional[int]:
        """A slot of the oldest non-empty bucket (skipping step `now` if `spare_now`), or None."""
        self._age(now)
        if self.old:
            return next(iter(self.old))
        for s, k in sorted((s, k) for k, s in enumerate(self.ring_step) if s != FREE):
            if self.ring[k] and not (spare_now and s == now):
                return next(iter(self.ring[k]))
        return None


@dataclass
class _Request:
    budget: Optional[int]
    buckets: _Buckets
    pages: dict[int, int] = field(default_factory=dict)     # logical page -> slot


@dataclass
class StepPlan:
    """What one `step` decided; every value is a list of logical pages (plain ints).

    `hits`, `fetch`, `fetch_slots` (slot per fetched page, same order) and `misses_left` have a key
    for every requested rid; `evict` only for requests that lose pages.
    """

    hits: dict[int, list[int]] = field(default_factory=dict)
    fetch: dict[int, list[int]] = field(default_factory=dict)
    fetch_slots: dict[int, list[int]] = field(default_factory=dict)
    evict: dict[int, list[int]] = field(default_factory=dict)
    misses_left: dict[int, list[int]] = field(default_factory=dict)


class PageCache:
    """GPU page cache bookkeeping: `num_slots` slots (0..num_slots-1), `num_buckets` >= 2 buckets."""

    def __init__(self, num_slots: int, num_buckets: int = 8) -> None:
        self.num_slots = _int("num_slots", num_slots, "a non-negative integer (0: no GPU cache)")
        self.num_buckets = _int("num_buckets", num_buckets,
                                "an integer >= 2 (this step's bucket and at least one older)", 2)
        self._slot_rid = np.full(self.num_slots, FREE, dtype=np.int64)
        self._slot_page = np.full(self.num_slots, FREE, dtype=np.int64)
        self._slot_stamp = np.full(self.num_slots, FREE, dtype=np.int64)
        self._free = list(range(self.num_slots - 1, -1, -1))    # pop() hands out slot 0 first
        self._all = _Buckets(self.num_buckets)
        self._reqs: dict[int, _Request] = {}
        self._now = 0
        self._stats = dict(steps=0, hits=0, misses=0, fetches=0, evictions=0)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Slots holding nothing."""
        return len(self._free)

    def pages_of(self, rid: int) -> set[int]:
        """Logical pages of `rid` in the cache (empty for an unknown rid)."""
        r = self._reqs.get(rid)
        return set(r.pages) if r else set()

    def slot_of(self, rid: int, page: int) -> Optional[int]:
        """The slot holding `(rid, page)`, or None."""
        r = self._reqs.get(rid)
        return r.pages.get(page) if r else None

    def bucket_of(self, rid: int, page: int) -> Optional[int]:
        """Recency bucket of a cached page: 0 used in the last step .. num_buckets - 1, or None."""
        slot = self.slot_of(rid, page)
        if slot is None:
            return None
        return int(min(self._now - self._slot_stamp[slot], self.num_buckets - 1))

    def budget_of(self, rid: int) -> Optional[int]:
        """The cap `set_budget` gave `rid` (None: no cap beyond num_slots)."""
        r = self._reqs.get(rid)
        return r.budget if r else None

    def stats(self) -> dict[str, int]:
        """Cumulative counters: steps, hits, misses (= fetches + pages left to the CPU), fetches,
        evictions (including pages dropped by `set_budget`)."""
        return dict(self._stats)

    def slot_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of slot -> request id, slot -> logical page, slot -> last step used (-1: free)."""
        return self._slot_rid.copy(), self._slot_page.copy(), self._slot_stamp.copy()

    # ---- requests ------------------------------------------------------------------------------
    def _req(self, rid: int) -> _Request:
        r = self._reqs.get(rid)
        if r is None:
            r = self._reqs[rid] = _Request(None, _Buckets(self.num_buckets))
        return r

    def set_budget(self, rid: int, slots: Optional[int]) -> list[int]:
        """Cap the slots `rid` may hold (None: no cap); an unknown rid is created. Returns the pages
        dropped, least recently used first, when `rid` holds more than the new cap; the caller
        evicts them (`kv.evict`) before the next step."""
        rid = _int("rid", rid, "a non-negative integer request id")
        if slots is not None:
            slots = _int("slots", slots, "None (no cap) or a non-negative integer")
        r = self._req(rid)
        r.budget = slots
        dropped = []
        while slots is not None and len(r.pages) > slots:
            slot = r.buckets.oldest(self._now, spare_now=False)
            dropped.append(int(self._slot_page[slot]))
            self._drop(slot)
            self._free.append(slot)
        self._stats["evictions"] += len(dropped)
        return dropped

    def remove_request(self, rid: int) -> list[int]:
        """Forget `rid` and its budget, freeing its slots; returns the pages it held, ascending
        (an unknown rid holds nothing)."""
        r = self._reqs.get(rid)
        if r is None:
            return []
        pages = sorted(r.pages)
        for slot in list(r.pages.values()):
            self._drop(slot)
            self._free.append(slot)
        del self._reqs[rid]
        return pages

    # ---- slot changes --------------------------------------------------------------------------
    def _drop(self, slot: int) -> None:
        rid, stamp = int(self._slot_rid[slot]), int(self._slot_stamp[slot])
        r = self._reqs[rid]
        del r.pages[int(self._slot_page[slot])]
        r.buckets.discard(slot, stamp)
        self._all.discard(slot, stamp)
        self._slot_rid[slot] = self._slot_page[slot] = self._slot_stamp[slot] = FREE

    def _touch(self, r: _Request, slot: int) -> None:
        stamp = int(self._slot_stamp[slot])
        if stamp == self._now:
            return
        if stamp != FREE:
            r.buckets.discard(slot, stamp)
            self._all.discard(slot, stamp)
        self._slot_stamp[slot] = self._now
        r.buckets.add(slot, self._now)
        self._all.add(slot, self._now)

    # ---- one decode step -----------------------------------------------------------------------
    def _check(self, wanted, in_use, max_fetch):
        if not isinstance(wanted, Mapping):
            raise ValueError(f"wanted={wanted!r} is invalid: a dict request id -> list of pages")
        want = {}
        for rid, pages in wanted.items():
            rid = _int("wanted request id", rid, "a non-negative integer request id")
            if isinstance(pages, (str, bytes, set, frozenset)) or not isinstance(pages, Iterable):
                raise ValueError(f"wanted[{rid}]={pages!r} is invalid: a sequence of pages in "
                                 f"priority order")
            ps = [_int(f"wanted[{rid}] page", p, "a non-negative logical page") for p in pages]
            if len(set(ps)) != len(ps):
                dup = sorted({p for p in ps if ps.count(p) > 1})
                raise ValueError(f"wanted[{rid}] lists pages {dup} twice; each page may be "
                                 f"requested (and fetched) once per step")
            want[rid] = ps
        if in_use is not None and not isinstance(in_use, Mapping):
            raise ValueError(f"in_use={in_use!r} is invalid: None or a dict request id -> pages")
        used = {}
        for rid, pages in (in_use or {}).items():
            rid = _int("in_use request id", rid, "a non-negative integer request id")
            used[rid] = [_int(f"in_use[{rid}] page", p, "a non-negative logical page")
                         for p in pages]
        if max_fetch is not None:
            max_fetch = _int("max_fetch", max_fetch, "None (no limit) or a non-negative integer")
        return want, used, max_fetch

    def step(self, wanted: Mapping[int, Sequence[int]],
             in_use: Optional[Mapping[int, Iterable[int]]] = None,
             max_fetch: Optional[int] = None) -> StepPlan:
        """Decide one step: hits, fetches (with the slot each lands in), evictions and misses left
        to the CPU (module docstring). Validates everything before changing anything."""
        want, used, max_fetch = self._check(wanted, in_use, max_fetch)
        self._now += 1
        plan = StepPlan()
        misses: dict[int, list[int]] = {}
        for rid, pages in want.items():
            r = self._req(rid)
            plan.hits[rid], misses[rid] = [], []
            plan.fetch[rid], plan.fetch_slots[rid], plan.misses_left[rid] = [], [], []
            for p in pages:
                slot = r.pages.get(p)
                if slot is None:
                    misses[rid].append(p)
                else:
                    plan.hits[rid].append(p)
                    self._touch(r, slot)
        for rid, pages in used.items():
            r = self._reqs.get(rid)
            for p in pages if r else ():
                if p in r.pages:
                    self._touch(r, r.pages[p])
        fetched = 0
        for rank in range(max((len(m) for m in misses.values()), default=0)):
            for rid, m in misses.items():
                if rank >= len(m):
                    continue
                slot = None if max_fetch is not None and fetched >= max_fetch else \
                    self._claim(rid, plan)
                if slot is None:
                    plan.misses_left[rid].append(m[rank])
                    continue
                r = self._reqs[rid]
                self._slot_rid[slot], self._slot_page[slot] = rid, m[rank]
                r.pages[m[rank]] = slot
                self._touch(r, slot)
                plan.fetch[rid].append(m[rank])
                plan.fetch_slots[rid].append(slot)
                fetched += 1
        s = self._stats
        s["steps"] += 1
        s["hits"] += sum(map(len, plan.hits.values()))
        s["misses"] += sum(map(len, misses.values()))
        s["fetches"] += fetched
        s["evictions"] += sum(map(len, plan.evict.values()))
        return plan

    def _claim(self, rid: int, plan: StepPlan) -> Optional[int]:
        """A slot for a new page of `rid`: its own LRU page at its cap, else a free slot, else the
        cache's LRU page; never one used this step. None when no slot can be had."""
        r = self._reqs[rid]
        if r.budget is not None and len(r.pages) >= r.budget:
            slot = r.buckets.oldest(self._now)
        elif self._free:
            return self._free.pop()
        else:
            slot = self._all.oldest(self._now)
        if slot is not None:
            plan.evict.setdefault(int(self._slot_rid[slot]), []).append(int(self._slot_page[slot]))
            self._drop(slot)
        return slot
