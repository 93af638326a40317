"""`PageCache`: policy and bookkeeping of the GPU page cache (HBM slots copying host pages).

Modelled on SPIN's locality-aware KV cache manager: per-request HBM budgets and a bucketed LRU. A
pure data structure over keys `(request_id, logical_page)` that moves no bytes: once per decode step
the runtime calls `step`, then on its `PagedKVCache` runs `kv.evict(rid, plan.evict[rid])` first
(that frees the slots fetches reuse), then `kv.load(rid, plan.fetch[rid])`, and attends
`plan.misses_left` on the CPU.

    cache = PageCache(num_slots: int, num_buckets: int = 8)
    cache.set_budget(rid, slots: int | None) -> list[int]   # pages dropped to fit; caller evicts
    plan = cache.step(wanted: dict[int, Sequence[int]],
                      in_use: dict[int, Iterable[int]] | None = None,
                      max_fetch: int | None = None) -> StepPlan
    cache.remove_request(rid) -> list[int]                  # pages it held; slots freed
    cache.pages_of(rid) -> set[int]; cache.slot_of(rid, page) -> int | None
    cache.bucket_of(rid, page) -> int | None   # 0: used in the last step .. num_buckets-1: oldest
    cache.num_free: int; cache.budget_of(rid); cache.stats() -> dict[str, int]; cache.slot_table()

`wanted[rid]` lists the host-resident pages a step wants on the GPU, highest priority first. Cached
ones are hits; misses are fetched round-robin by rank across requests (every request's first miss,
then every second, ...) until `max_fetch` fetches. A page is fetched at most once per step (listed
twice: `ValueError`). Pages in use this step (hits, fetched pages, cached pages named in `in_use`;
uncached ones there are ignored) count as used and are never evicted. A request never holds more
than its budget: at its cap it may only replace its own pages; otherwise it takes a free slot, else
the least recently used slot of any request. When no slot can be had the page is left to the CPU
(`misses_left`) rather than evicting a page in use.

Bucketed LRU: recency is kept per step, not per access. A slot's stamp is the last step that used
it; its bucket is `min(now - stamp, num_buckets - 1)` (the last `num_buckets - 1` steps have a
bucket each, everything older shares the last). Eviction takes any slot of the oldest non-empty
bucket, never bucket 0. On a GPU that is one scatter of the step number into an int array of stamps
per step and a bucket histogram at eviction: no list reordered per access, no round trip. Here each
bucket is a Python set (a ring of them for the cache, one per request), so a step costs O(pages
touched + num_buckets * evictions), not O(num_slots) (the constructor is O(num_slots)). Slot ->
request, page, stamp live in NumPy int64 arrays (-1: free) that can later move to a GPU tensor.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

FREE = -1


def _int(name: str, value: object, allowed: str = "a non-negative integer", low: int = 0) -> int:
    """`value` as an int >= `low` (bools and floats refused), else a ValueError naming it, its
    value and what is allowed."""
    index = None if isinstance(value, bool) else getattr(type(value), "__index__", None)
    v = operator.index(value) if index else None
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
        k = now % self.r
        if self.ring_step[k] != now:      # first slot of this step: age the ring once
            self._age(now)
            self.ring_step[k] = now
        self.ring[k].add(slot)

    def discard(self, slot: int, stamp: int) -> None:
        k = stamp % self.r
        (self.ring[k] if self.ring_step[k] == stamp else self.old).discard(slot)

    def pop_oldest(self, now: int, spare_now: bool = True) -> Optional[int]:
        """Take a slot of the oldest non-empty bucket (never step `now` if `spare_now`), or None."""
        self._age(now)
        if self.old:
            return self.old.pop()     # set.pop, not next(iter()): no rescan of a sparse table
        for s, k in sorted((s, k) for k, s in enumerate(self.ring_step) if s != FREE):
            if self.ring[k] and not (spare_now and s == now):
                return self.ring[k].pop()
        return None


@dataclass
class _Request:
    budget: Optional[int]
    buckets: _Buckets
    pages: dict[int, int] = field(default_factory=dict)     # logical page -> slot


@dataclass
class StepPlan:
    """What one `step` decided; every value is a list of logical pages (plain ints).

    `hits`, `fetch`, `fetch_slots` (the cache slot, not a `PagedKVCache` device page, of each
    fetched page, same order) and `misses_left` have a key for every requested rid; `evict` only
    for requests that lose pages.
    """

    hits: dict[int, list[int]] = field(default_factory=dict)
    fetch: dict[int, list[int]] = field(default_factory=dict)
    fetch_slots: dict[int, list[int]] = field(default_factory=dict)
    evict: dict[int, list[int]] = field(default_factory=dict)
    misses_left: dict[int, list[int]] = field(default_factory=dict)


class PageCache:
    """GPU page cache bookkeeping: slots 0..num_slots-1, `num_buckets` >= 2 recency buckets."""

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

    @property
    def num_free(self) -> int:
        """Slots holding nothing."""
        return len(self._free)

    def pages_of(self, rid: int) -> set[int]:
        """Logical pages of `rid` in the cache (empty for an unknown rid)."""
        return set(self._reqs[rid].pages) if rid in self._reqs else set()

    def slot_of(self, rid: int, page: int) -> Optional[int]:
        """The slot holding `(rid, page)`, or None."""
        return self._reqs[rid].pages.get(page) if rid in self._reqs else None

    def bucket_of(self, rid: int, page: int) -> Optional[int]:
        """Recency bucket of a cached page: 0 used in the last step .. num_buckets - 1, or None."""
        slot = self.slot_of(rid, page)
        return None if slot is None else int(min(self._now - self._slot_stamp[slot],
                                                 self.num_buckets - 1))

    def budget_of(self, rid: int) -> Optional[int]:
        """The cap `set_budget` gave `rid` (None: no cap beyond num_slots)."""
        return self._reqs[rid].budget if rid in self._reqs else None

    def stats(self) -> dict[str, int]:
        """Cumulative counters: steps, hits, misses (= fetches + pages left to the CPU), fetches,
        evictions (including pages dropped by `set_budget`)."""
        return dict(self._stats)

    def slot_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of slot -> request id, slot -> logical page, slot -> last step used (-1: free)."""
        return self._slot_rid.copy(), self._slot_page.copy(), self._slot_stamp.copy()

    def _req(self, rid: int) -> _Request:
        if rid not in self._reqs:
            self._reqs[rid] = _Request(None, _Buckets(self.num_buckets))
        return self._reqs[rid]

    def set_budget(self, rid: int, slots: Optional[int]) -> list[int]:
        """Cap the slots `rid` may hold (None: no cap); an unknown rid is created. Returns the pages
        dropped, oldest bucket first, when `rid` holds more than the new cap; the caller
        evicts them (`kv.evict`) before the next step."""
        rid = _int("rid", rid, "a non-negative integer request id")
        if slots is not None:
            slots = _int("slots", slots, "None (no cap) or a non-negative integer")
        r = self._req(rid)
        r.budget = slots
        dropped = []
        while slots is not None and len(r.pages) > slots:
            slot = r.buckets.pop_oldest(self._now, spare_now=False)
            dropped.append(int(self._slot_page[slot]))
            self._drop(slot)
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
        del self._reqs[rid]
        return pages

    def _drop(self, slot: int) -> None:
        """Empty `slot` and push it on the free list."""
        rid, stamp = int(self._slot_rid[slot]), int(self._slot_stamp[slot])
        r = self._reqs[rid]
        del r.pages[int(self._slot_page[slot])]
        r.buckets.discard(slot, stamp)
        self._all.discard(slot, stamp)
        self._slot_rid[slot] = self._slot_page[slot] = self._slot_stamp[slot] = FREE
        self._free.append(slot)

    def _touch(self, r: _Request, slot: int) -> None:
        """Stamp `slot` (of request `r`) with this step and move it to bucket 0."""
        stamp = int(self._slot_stamp[slot])
        if stamp == self._now:
            return
        if stamp != FREE:
            r.buckets.discard(slot, stamp)
            self._all.discard(slot, stamp)
        self._slot_stamp[slot] = self._now
        r.buckets.add(slot, self._now)
        self._all.add(slot, self._now)

    def _check(self, wanted: object, in_use: object, max_fetch: object
               ) -> tuple[dict[int, list[int]], dict[int, list[int]], Optional[int]]:
        """`step`'s arguments as plain ints (a ValueError on anything else), before any change."""
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
                spent = max_fetch is not None and fetched >= max_fetch
                slot = None if spent else self._claim(rid, plan)
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
        for key, n in (("steps", 1), ("hits", sum(map(len, plan.hits.values()))),
                       ("misses", sum(map(len, misses.values()))), ("fetches", fetched),
                       ("evictions", sum(map(len, plan.evict.values())))):
            self._stats[key] += n
        return plan

    def _claim(self, rid: int, plan: StepPlan) -> Optional[int]:
        """A slot for a new page of `rid`: its own LRU page at its cap, else a free slot, else the
        cache's LRU page; never one used this step. None when no slot can be had."""
        r = self._reqs[rid]
        if r.budget is not None and len(r.pages) >= r.budget:
            slot = r.buckets.pop_oldest(self._now)
        elif self._free:
            return self._free.pop()
        else:
            slot = self._all.pop_oldest(self._now)
        if slot is None:
            return None
        plan.evict.setdefault(int(self._slot_rid[slot]), []).append(int(self._slot_page[slot]))
        self._drop(slot)
        return self._free.pop()     # the slot just dropped
