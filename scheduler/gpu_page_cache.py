"""`GpuPageCache`: the GPU page cache's state as tensors on the GPU, one cache per layer.

Each layer has `num_slots` slots (HBM pages holding copies of host pages). The state is three
tensors per layer, on the runtime's device, so a step needs no host round trip at all:

    slot_of   int32 [L, R, W + 1]  request index r, logical page p -> slot, -1 when not cached; the
                                   spare last column stays -1 (masked entries add 0 to it)
    owner     int32 [L, S + 1, 2]  slot -> (request index, page), -1 when free; spare last row
                                   (-1, -1), the slot a masked entry names
    stamp     int64 [L, S + 1]     the last step that used the slot (-1: free, the oldest)

`step(layer, rows, slots, wanted, fetch)` (per layer, vectorised, no synchronisation): pages in
`wanted` that are cached are hits and get this step's stamp (so nothing in use this step is
evicted); pages in `fetch` that are not cached take the slots with the oldest stamps (LRU by step:
a counting sort of the slots by age in steps, exact up to `AGES` steps; exact in a cache of up to
`WINDOW_MIN` slots, and in a larger one over a window of slots that a clock hand moves round, so a
step's work grows with what it may fetch, not with the cache), whose old pages are evicted;
when too few slots are older than this step, the rest stays with the CPU. Every output has a fixed
size (`capacity` entries, the valid ones first), so a step can be captured in a CUDA graph: the
fetch count stays on the device and the copy kernel skips entries marked -1. Request indices are
dense (0..R-1), given out by `index_of`; R and W grow by doubling, which reallocates `slot_of` and
bumps `generation` (graphs captured over the old tensor must be captured again).
The host copy of every page stays authoritative: evicting drops a copy, never data.

Granularity (`heads`): a request has `heads` rows, one per KV head (row = request index x heads +
head), and a slot holds one KV head of one page, so a head's selection is cached and fetched on its
own: a page that one head selects costs one head's bytes, not every head's. `rows(indices)` gives
a batch's rows. With heads=1 a row is a request and a slot a whole page.

Per-request budgets (SPIN's locality-aware manager is the model): each request keeps a moving
average of its selection reuse per layer (the share of the pages it wants this step that it also
wanted the step before). Its quota of slots is proportional to reuse x pages wanted, over the batch;
eviction takes free slots first, then the least recently used slots of requests holding more than
their quota (requests outside the batch hold no quota), then the least recently used of the rest.
So a request whose selection changes every step cannot flush the pages of one that reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vortex_hybrid.compiled import compiled as compile_fn
from vortex_hybrid.transfers import to_device


@dataclass
class FetchPlan:
    """One layer's step: rows, pages (logical), slots [capacity] (device int64) of the pages to
    copy, the first `count` valid and the rest -1; hits / misses / evictions / count as 0-dim
    device tensors (nothing here needs a sync)."""

    rows: torch.Tensor
    pages: torch.Tensor
    slots: torch.Tensor
    hits: torch.Tensor
    misses: torch.Tensor
    evictions: torch.Tensor
    count: torch.Tensor

    def valid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, pages, slots) of the fetched pages only (synchronises; tests and diagnostics)."""
        n = int(self.count)
        return self.rows[:n], self.pages[:n], self.slots[:n]


WINDOW_MIN = 8192
"""A step ranks at most max(WINDOW_MIN, WINDOW_FACTOR x capacity) slots for eviction (a window that
a clock hand moves over the slots), so its work does not grow with the cache; a cache of at most
that many slots is ranked whole (exact LRU)."""
WINDOW_FACTOR = 4

REUSE_ALPHA = 0.25
"""Weight of the newest step in each request's moving average of selection reuse."""


@dataclass
class Coverage:
    """What a caller knows of the cache without asking the device: a check
    (`GpuPageCache.coverage`) found every layer caching the first `pages[rid]` logical pages of
    each request, and at least `free` free slots in every layer; true while the cache's `version`
    is `version` (no change since), or changed only by admissions this knowledge accounted for
    (`admitted`)."""

    version: int
    free: int
    pages: dict

    def holds(self, cache: "GpuPageCache", rids, host) -> bool:
        """Whether every request `rids[i]` has its first `host[i]` pages cached in every layer."""
        return self.version == cache.version and \
            all(self.pages.get(r, -1) >= n for r, n in zip(rids, host))

    def admitted(self, cache: "GpuPageCache", version_before: int, head_pages: int,
                 pages: dict) -> bool:
        """After `cache.admit_all` of `head_pages` head-pages (per layer) made at `version_before`:
        if they fit the known free slots, every one got a slot in every layer, so the knowledge
        holds on; `pages` (request -> (first, end): its pages [first, end) were all admitted)
        extends a request's known pages to `end` where they already reached `first`. Else the
        knowledge is void. Returns whether it holds."""
        if self.version != version_before or head_pages > self.free:
            return False
        self.version, self.free = cache.version, self.free - head_pages
        for rid, (first, end) in pages.items():
            if self.pages.get(rid, -1) >= first:
                self.pages[rid] = end
        return True


class GpuPageCache:
    """Per-layer GPU page cache state (module docstring). quotas: size each request's share of the
    slots from its measured reuse (module docstring); False for plain LRU."""

    def __init__(self, num_layers: int, num_slots: int, device: torch.device,
                 max_requests: int = 8, max_pages: int = 64, quotas: bool = True,
                 prior_reuse=None, heads: int = 1, window_min: int = WINDOW_MIN,
                 compiled: bool = False) -> None:
        if num_slots < 0 or num_layers < 1 or heads < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 0, num_layers={num_layers} and "
                             f"heads={heads} >= 1")
        self.num_layers, self.num_slots, self.device, self.heads = \
            num_layers, num_slots, device, heads
        self.slot_of = torch.full((num_layers, max_requests * heads, max_pages + 1), -1,
                                  dtype=torch.int32, device=device)
        self.owner = torch.full((num_layers, num_slots + 1, 2), -1, dtype=torch.int32,
                                device=device)
        # one spare column past the slots takes the stamps of masked-out entries (no compaction)
        self.stamp = torch.full((num_layers, num_slots + 1), -1, dtype=torch.int64, device=device)
        self.quotas = quotas
        # selection reuse: the last step each (request, page) was wanted, and each request's
        # moving average of the share of its wanted pages that were wanted the step before
        self.seen = torch.full_like(self.slot_of, -1)
        self.prior = torch.ones(num_layers, 1, dtype=torch.float32, device=device)
        """A new request's reuse per layer before it is measured: 1 (optimistic), or a calibration's
        measured reuse (`prior_reuse`, [num_layers] in [0, 1])."""
        if prior_reuse is not None:
            prior = torch.as_tensor(prior_reuse, dtype=torch.float32).reshape(-1)
            if prior.numel() != num_layers or not bool(((prior >= 0) & (prior <= 1)).all()):
                raise ValueError(f"prior_reuse must be {num_layers} shares in [0, 1]")
            self.prior = prior.to(device)[:, None]
        self.reuse = self.prior.expand(num_layers, max_requests * heads).clone()
        self.held = torch.zeros(num_layers, max_requests * heads + 1, dtype=torch.int32,
                                device=device)
        self.hand = torch.zeros(num_layers, dtype=torch.int64, device=device)
        """Per layer, the first slot of the next eviction window (large caches: `WINDOW_MIN`)."""
        self.window_min = window_min
        """Slots each row holds, kept by `step` (its k entries; no scan over the slots); the spare
        last column absorbs masked-out entries."""
        self._compiled = compile_fn(_layer_step) if compiled else None
        """`_layer_step` compiled (Inductor fuses its small kernels), or None: eager."""
        self.now = 0
        self.now_t = torch.zeros((), dtype=torch.int64, device=device)   # `now` on the device
        self.generation = 0                      # bumped when slot_of is reallocated
        self.version = 0
        """Bumped by every eager change of the state (admissions, removals, restores, growth, a
        step called outside a graph). A graph's replay of `step` changes the state without
        Python: a caller that keeps anything derived from the state across steps drops it after
        any step whose layers may have run split (`HybridAttention.plan`)."""
        self._none = torch.full((), -1, dtype=torch.int32, device=device)
        self._index: dict[int, int] = {}         # request id -> dense index
        self._free = list(range(max_requests - 1, -1, -1))
        self._last_rows: tuple | None = None     # (dense indices, their rows): `rows_of`
        self._backup: tuple[torch.Tensor, ...] = ()
        self._new_backup()

    def _state(self) -> tuple[torch.Tensor, ...]:
        """Every layer's state that a step changes ([L, ...] each; `state` gives one layer's)."""
        return (self.slot_of, self.owner, self.stamp, self.seen, self.reuse, self.held, self.hand)

    def _new_backup(self) -> None:
        """Room for every layer's state as it was before the current step (`checkpoint`)."""
        self._backup = tuple(torch.empty_like(t) for t in self._state())

    # ---- requests ---------------------------------------------------------------------------
    def index_of(self, rid: int) -> int:
        """The dense index of a request, given out on first use."""
        if rid not in self._index:
            if not self._free:
                self._grow(requests=2 * self.max_requests)
            self._index[rid] = self._free.pop()
        return self._index[rid]

    def has(self, rid: int) -> bool:
        """Whether the request has a dense index (was in a step since it last left)."""
        return rid in self._index

    def reserve(self, pages: int) -> None:
        """Room for requests of up to `pages` pages."""
        if pages > self.max_pages:
            self._grow(pages=max(pages, 2 * self.max_pages))

    def presize(self, requests: int, pages: int) -> None:
        """Room for `requests` requests of up to `pages` pages now, so that no later step within
        those bounds reallocates the state (the generation stays: fixed-shape steps' graphs)."""
        if requests > self.max_requests or pages > self.max_pages:
            self._grow(requests=requests, pages=pages)

    def state_bytes(self) -> int:
        """Bytes of the state and its undo copies (what `presize` and growth allocate)."""
        return sum(t.numel() * t.element_size() for t in
                   (self.slot_of, self.owner, self.stamp, self.seen, self.reuse, self.held,
                    *self._backup))

    @property
    def max_pages(self) -> int:
        return self.slot_of.shape[2] - 1

    @property
    def max_requests(self) -> int:
        return self.slot_of.shape[1] // self.heads

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The rows of requests' dense `indices` [B] (device int64): [B * heads], head-minor."""
        h = self.heads
        if h == 1:
            return indices
        return (indices[:, None] * h + torch.arange(h, device=indices.device)).flatten()

    def rows_of(self, rids) -> torch.Tensor:
        """`rows` of requests `rids` (their dense indices given out if new), on the device; the
        last batch's tensor again when the batch is the same (no new tensor per step). Callers
        must not write into it."""
        indices = tuple(self.index_of(r) for r in rids)
        if self._last_rows is None or self._last_rows[0] != indices:
            t = to_device(torch.as_tensor(indices, dtype=torch.int64), self.device)
            self._last_rows = (indices, self.rows(t))
        return self._last_rows[1]

    def _grow(self, requests: int = 0, pages: int = 0) -> None:
        L, R, W, h = self.slot_of.shape[0], self.max_requests, self.max_pages, self.heads
        R2, W2 = max(R, requests), max(W, pages)
        self.version += 1
        grown = torch.full((L, R2 * h, W2 + 1), -1, dtype=torch.int32, device=self.device)
        grown[:, :R * h, :W] = self.slot_of[:, :, :W]
        self.slot_of = grown
        seen = torch.full_like(grown, -1)
        seen[:, :R * h, :W] = self.seen[:, :, :W]
        self.seen = seen
        reuse = self.prior.expand(L, R2 * h).clone()
        reuse[:, :R * h] = self.reuse
        self.reuse = reuse
        held = torch.zeros(L, R2 * h + 1, dtype=torch.int32, device=self.device)
        held[:, :R * h] = self.held[:, :R * h]
        self.held = held
        self.generation += 1
        self._free = list(range(R2 - 1, R - 1, -1)) + self._free
        self._new_backup()

    def remove_request(self, rid: int) -> None:
        """Free every slot of a request in every layer."""
        r = self._index.pop(rid, None)
        if r is None:
            return
        self.version += 1
        h = self.heads
        mine = self.owner[:, :self.num_slots, 0].div(h, rounding_mode="floor") == r     # [L, S]
        self.owner[:, :self.num_slots][mine] = -1
        self.stamp[:, :self.num_slots][mine] = -1
        self.slot_of[:, r * h:(r + 1) * h] = -1
        self.seen[:, r * h:(r + 1) * h] = -1
        self.reuse[:, r * h:(r + 1) * h] = self.prior
        self.held[:, r * h:(r + 1) * h] = 0
        self._free.append(r)

    def admit(self, rid: int, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take free slots of `layer` for pages a request's prefill just wrote (logical pages
        `pages`, int64 [n] on the device, ascending and consecutive): as many whole pages (every
        KV head) as the free slots hold, the last ones first (a decode step reads the recent
        pages most). Returns (the pages admitted [m], their slots [m, heads]) for the caller to
        fill before the next step; they are stamped with the current step, so they age as pages
        used now. Synchronises (counts the free slots): between steps only."""
        S, h = self.num_slots, self.heads
        free = (self.owner[layer, :S, 0] < 0).nonzero().flatten()
        m = min(pages.numel(), free.numel() // h)
        if m == 0:
            return pages[:0], free[:0].view(0, h)
        self.version += 1
        self.reserve(int(pages[-1]) + 1)
        r = self.index_of(rid)
        got = pages[pages.numel() - m:]
        slots = free[:m * h].view(m, h)
        rows = (r * h + torch.arange(h, device=self.device))[None, :].expand(m, h)
        page_of = got[:, None].expand(m, h)
        self.slot_of[layer, rows, page_of] = slots.to(torch.int32)
        self.owner[layer, slots, 0] = rows.to(torch.int32)
        self.owner[layer, slots, 1] = page_of.to(torch.int32)
        self.stamp[layer, slots] = self.now
        self.held[layer, rows[0]] += m
        return got, slots

    def admit_layers(self, rid: int, pages: range) -> tuple[list[int], torch.Tensor]:
        """`admit(rid, layer, pages)` for every layer at once (the same slots, state and version
        as those calls one layer after another), `pages` given as a host range of logical pages:
        one synchronisation (the free slots of every layer, counted together), not two a layer,
        and the state written by one op per tensor. Returns (m, slots): per layer how many pages
        it admitted (its last m[layer] pages), and slots int64 [L, max(m), heads] whose first
        m[layer] rows are that layer's (the rest is not meaningful). Between steps only."""
        L, S, h, n = self.num_layers, self.num_slots, self.heads, len(pages)
        if n == 0 or S == 0 or pages.step != 1:
            if n == 0 or S == 0:
                return [0] * L, torch.zeros(L, 0, h, dtype=torch.int64, device=self.device)
            raise ValueError(f"pages must be consecutive, got {pages}")
        dev = self.device
        free = self.owner[:, :S, 0] < 0                                          # [L, S]
        counts = free.sum(1).tolist()                                           # the one sync
        m = [min(n, c // h) for c in counts]
        M = max(m)
        if M == 0:
            return m, torch.zeros(L, 0, h, dtype=torch.int64, device=dev)
        self.version += sum(1 for x in m if x)                  # as one admit() call a layer
        self.reserve(pages[-1] + 1)
        r = self.index_of(rid)
        # each layer's first free slots in ascending order (what `nonzero` lists first): the
        # largest of S - slot over the free ones
        rank = free.to(torch.int32) * (S - torch.arange(S, dtype=torch.int32, device=dev))
        slots = torch.topk(rank, M * h, dim=1).indices.view(L, M, h)             # [L, M, h]
        j = torch.arange(M, device=dev)
        m_t = to_device(torch.as_tensor(m, dtype=torch.int64), dev)
        page = (pages.start + n - m_t)[:, None] + j[None, :]                    # [L, M]
        rows = (r * h + torch.arange(h, device=dev))[None, None, :].expand(L, M, h)
        layer = torch.arange(L, device=dev)[:, None, None].expand(L, M, h)
        page = page[:, :, None].expand(L, M, h)
        if min(m) == M:                                         # every layer admits M pages
            self.slot_of[layer, rows, page] = slots.to(torch.int32)
            self.owner[layer, slots, 0] = rows.to(torch.int32)
            self.owner[layer, slots, 1] = page.to(torch.int32)
            self.stamp[layer, slots] = self.now
        else:       # masked entries write -1 into the spare column / spare slot S (stay -1)
            valid = (j[None, :] < m_t[:, None])[:, :, None].expand(L, M, h)
            at = torch.where(valid, slots, S)
            self.slot_of[layer, rows, torch.where(valid, page, self.max_pages)] = \
                torch.where(valid, slots, -1).to(torch.int32)
            self.owner[layer, at, 0] = torch.where(valid, rows, -1).to(torch.int32)
            self.owner[layer, at, 1] = torch.where(valid, page, -1).to(torch.int32)
            self.stamp[layer, at] = torch.where(valid, self.now, -1)
        self.held[:, r * h:(r + 1) * h] += m_t.to(torch.int32)[:, None]
        return m, slots

    def admit_all(self, rows: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        """Take free slots, in every layer, for head-pages (row `rows[i]`, logical page
        `pages[i]`; int64 [m] on the device, distinct, rows given out by `rows`) that a decode
        step just filled: those not cached yet get the layer's first free slots, as many as it has.
        Returns slots int64 [L, m], -1 where none was taken (cached already, or no free slot left);
        the caller fills them before the next step. Stamped with the current step. No sync; the
        free slots are found with one `topk` over every layer's slots (callers gate it: the
        runtime admits only while its batch fits the cache)."""
        L, S, m = self.num_layers, self.num_slots, rows.numel()
        if m == 0 or S == 0:
            return torch.full((L, m), -1, dtype=torch.int64, device=self.device)
        self.version += 1
        k = min(m, S)
        free = (self.owner[:, :S, 0] < 0).to(torch.int32)                      # [L, S]
        first = free * (S - torch.arange(S, dtype=torch.int32, device=self.device))  # earliest
        val, idx = torch.topk(first, k, dim=1)                                  # [L, k]
        new = self.slot_of[:, rows, pages] < 0                                  # [L, m]
        order = torch.cumsum(new.to(torch.int64), 1) - 1                       # j-th new: slot j
        inside = order.clamp(0, k - 1)
        valid = new & (order < k) & (torch.gather(val, 1, inside) > 0)
        slot = torch.where(valid, torch.gather(idx, 1, inside), S)             # spare: slot S
        layer = torch.arange(L, device=self.device)[:, None].expand(L, m)
        row = rows[None, :].expand(L, m)
        self.slot_of[layer, row, torch.where(valid, pages, self.max_pages)] = \
            torch.where(valid, slot, -1).to(torch.int32)                        # spare column
        self.owner[layer, slot] = torch.stack([torch.where(valid, row, -1),
                                               torch.where(valid, pages, -1).expand(L, m)],
                                              2).to(torch.int32)
        self.stamp[layer, slot] = torch.where(valid, self.now_t, -1)
        spare = self.held.shape[1] - 1
        self.held.scatter_add_(1, torch.where(valid, row, spare), valid.to(torch.int32))
        self.held[:, spare] = 0
        return torch.where(valid, slot, -1)

    def coverage(self, rows: torch.Tensor, pages: torch.Tensor, width: int) -> tuple[bool, int]:
        """Whether every layer caches logical pages [0, pages[i]) of row `rows[i]` (int64 [m],
        device; `width` = max(pages), known to the caller), and the fewest free slots of any
        layer. One synchronisation (between steps: `plan`)."""
        S = self.num_slots
        if width > self.max_pages:
            return False, 0
        free = (self.owner[:, :S, 0] < 0).sum(1).min() if S else torch.zeros((), device=self.device)
        if width == 0:
            return True, int(free)
        inside = torch.arange(width, device=self.device)[None, :] < pages[:, None]   # [m, W]
        got = self.slot_of[:, :, :width].index_select(1, rows) >= 0                  # [L, m, W]
        ok, free = torch.stack([(got | ~inside).all().to(free.dtype), free]).tolist()
        return bool(ok), int(free)

    def pages_of(self, rid: int, layer: int) -> torch.Tensor:
        """Logical pages of `rid` cached in `layer` (for tests and diagnostics)."""
        r = self._index.get(rid)
        if r is None:
            return torch.zeros(0, dtype=torch.int64)
        h = self.heads
        cached = self.slot_of[layer, r * h:(r + 1) * h, :self.max_pages] >= 0
        return cached.any(0).nonzero().flatten().cpu()

    # ---- one step ---------------------------------------------------------------------------
    def next_step(self) -> None:
        self.now += 1
        self.now_t.fill_(self.now)

    def undo_step(self) -> None:
        """Undo `next_step` (a step that failed, after `restore` of the layers it ran)."""
        self.now -= 1
        self.now_t.fill_(self.now)

    def checkpoint(self, layer: "int | None" = None) -> None:
        """Keep the layer's state (every layer's with None) as it is now (before its step; device
        copies, no sync, fine inside a CUDA graph), for `restore` if the step fails."""
        for keep, t in zip(self._backup, self._state()):
            (keep if layer is None else keep[layer]).copy_(t if layer is None else t[layer])

    def restore(self, layer: int) -> None:
        """The layer's state as at its last `checkpoint`, except that slots that changed owner
        since are free: their pages were (or were about to be) overwritten by fetches."""
        S = self.num_slots
        self.version += 1
        before = self._backup[1][layer, :S]
        changed = (self.owner[layer, :S] != before).any(1)
        for keep, t in zip(self._backup, self.state(layer)):
            t.copy_(keep[layer])
        lost = changed & (before[:, 0] >= 0)
        req, page = before[lost].to(torch.int64).unbind(1)
        self.slot_of[layer, req, page] = -1
        self.owner[layer, :S][changed] = -1
        self.stamp[layer, :S][changed] = -1
        owner = self.owner[layer, :S, 0].to(torch.int64)       # the failure path: a full count
        self.held[layer].zero_()
        self.held[layer].scatter_add_(0, owner.clamp_min(0), (owner >= 0).to(torch.int32))

    def table(self, layer: int, rows: torch.Tensor, width: int) -> torch.Tensor:
        """slots int32 [B, width] of the batch's requests (`rows`: dense indices [B], device)."""
        return self.slot_of[layer].index_select(0, rows)[:, :width]

    def capacity(self, batch: int, width: int) -> int:
        """Fetch entries a step's plan holds: no more than the slots or the batch's pages."""
        return max(1, min(self.num_slots, batch * width))

    def state(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Every tensor `step(layer, ...)` changes (views), e.g. to restore them."""
        return tuple(t[layer] for t in self._state())

    def step(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, wanted: torch.Tensor,
             fetch: torch.Tensor, capacity: int = 0,
             pages: "torch.Tensor | None" = None) -> FetchPlan:
        """rows [B] dense request indices; slots [B, W] = `table(layer, rows, W)`; wanted, fetch
        bool [B, W]: pages this step reads from the cache or would like fetched. Or, with `pages`
        (int64 [B, K], e.g. a step's selection), the same over those pages only: slots, wanted,
        fetch [B, K] for the pages `pages` names (the pages an entry with wanted or fetch set
        names are distinct within its row; the others are ignored), so the step's work follows
        the selection, not every page of the batch. Updates the state and returns what to copy,
        `capacity` entries (default `capacity(B, W)`): the first that want a slot, row-major over
        the entries. No sync. The work over the layer's state is one function of its tensors
        (`_layer_step`), compiled by `torch.compile` when the cache was built with
        `compiled=True`."""
        S = self.num_slots
        self.version += 1                   # at capture only, when a graph records this step
        k = capacity or self.capacity(*wanted.shape)
        if not 1 <= k <= S:
            raise ValueError(f"capacity={k} must lie in [1, num_slots={S}]")
        if pages is None:
            pages = torch.arange(wanted.shape[1], device=wanted.device).expand(wanted.shape)
        window = self._window(layer, k)                                 # the slots ranked
        core = _layer_step if self._compiled is None else self._compiled
        out = core(self.slot_of[layer], self.owner[layer], self.stamp[layer], self.seen[layer],
                   self.reuse[layer], self.held[layer], self.now_t, rows, pages, slots, wanted,
                   fetch, window, k, self.quotas)
        return FetchPlan(*out)

    def _window(self, layer: int, k: int) -> torch.Tensor:
        """The slots this step may evict from (int64 [w]): every slot when the cache has at most
        max(window_min, WINDOW_FACTOR x k); else the next w slots from the layer's clock hand,
        which then moves past them (so every slot comes up in turn, and a step's work depends on
        its capacity k, not on the cache's size). No sync."""
        S = self.num_slots
        w = max(self.window_min, WINDOW_FACTOR * k)
        if w >= S:
            return torch.arange(S, device=self.device)
        hand = self.hand[layer]
        window = (hand + torch.arange(w, device=self.device)) % S
        hand.copy_((hand + w) % S)
        return window


def _layer_step(slot_of: torch.Tensor, owner: torch.Tensor, stamp: torch.Tensor,
                seen: torch.Tensor, reuse: torch.Tensor, held: torch.Tensor, now: torch.Tensor,
                rows: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor,
                wanted: torch.Tensor, fetch: torch.Tensor, window: torch.Tensor, k: int,
                quotas: bool) -> tuple:
    """`GpuPageCache.step` over one layer's state (its tensors, changed in place: views of the
    cache's [L, ...] state), the entries' pages [B, K], the eviction `window` chosen and `k` the
    entries: the FetchPlan's fields. A function of tensors only (no layer index), so one compiled
    graph serves every layer.

    Masked-out entries never write: updates go through `_put` (an add of 0 spread over real
    cells), so no cell takes the writes of every masked entry (one cell taking thousands of
    writes serialises them on the GPU)."""
    S = owner.shape[0] - 1
    hit = wanted & (slots >= 0)
    _stamp(stamp, slots.flatten(), hit.flatten(), now, S)
    want_new = fetch & (slots < 0)
    misses = (wanted & (slots < 0)).sum()
    n = torch.minimum(want_new.sum(), (stamp[window] < now).sum()).clamp_max(k)  # wanted, room
    valid = torch.arange(k, device=slots.device) < n
    bj = torch.nonzero_static(want_new, size=k, fill_value=0)      # the first k, row-major
    b = torch.where(valid, bj[:, 0], -1)
    p = torch.where(valid, pages[bj[:, 0], bj[:, 1]], -1)
    if quotas:
        group = _quota_groups(owner, stamp, seen, reuse, held, now, rows, pages, wanted, window)
    else:
        group = torch.where(owner[window, 0] < 0, 0, 2)
    pos = _oldest(group, stamp[window], now, n, k)
    victims = torch.where(valid, window[pos], S)                    # masked: the spare slot
    old = owner[victims].to(torch.int64)                            # [k, 2]; spare: (-1, -1)
    taken = old[:, 0] >= 0
    req = torch.where(valid, rows[b.clamp_min(0)].to(torch.int64), -1)
    spread = torch.arange(k, device=slots.device)
    spare_cells = spread % slot_of.shape[0] * slot_of.shape[1] + (slot_of.shape[1] - 1)
    # slot_of: the evicted pages' cells to -1, the fetched pages' cells to their slots (the two
    # sets of cells are apart: one holds cached pages, the other pages not cached)
    cells = slot_of.view(-1)
    Wc, R = slot_of.shape[1], slot_of.shape[0]
    gone = old[:, 0].clamp_min(0) * Wc + old[:, 1].clamp_min(0)
    _put(cells, gone, taken, -1 - cells[gone].to(torch.int64), spare_cells)
    into = req.clamp_min(0) * Wc + p.clamp_min(0)
    _put(cells, into, valid, victims - cells[into].to(torch.int64), spare_cells)
    # owner: each victim slot (distinct) its new (request, page)
    new_owner = torch.stack([req, torch.where(valid, p, -1)], 1)
    flat = owner.view(-1)
    two = torch.arange(2, device=slots.device)
    at = (victims[:, None] * 2 + two).flatten()
    _put(flat, at, valid[:, None].expand(k, 2).flatten(), (new_owner - old).flatten(),
         ((spread % S)[:, None] * 2 + two).flatten())
    _put(held, old[:, 0].clamp_min(0), taken, torch.full_like(req, -1), spread % R)
    _put(held, req.clamp_min(0), valid, torch.ones_like(req), spread % R)
    _stamp(stamp, victims, valid, now, S)
    return b, p, torch.where(valid, victims, -1), hit.sum(), misses, taken.sum(), n


def _put(flat: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, delta: torch.Tensor,
         elsewhere: torch.Tensor) -> None:
    """flat[index[i]] += delta[i] where keep[i] (those cells distinct); the other entries add 0
    to cells `elsewhere[i]` (spread, so no cell takes many of them). No sync."""
    flat.scatter_add_(0, torch.where(keep, index, elsewhere),
                      torch.where(keep, delta, 0).to(flat.dtype))


def _stamp(stamp: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor, now: torch.Tensor,
           S: int) -> None:
    """stamp[slots[i]] = now where keep[i] (a stamp only grows to `now`); the other entries are
    a max with -1 (no change) at spread slots. No sync."""
    spread = torch.arange(slots.numel(), device=slots.device) % max(S, 1)
    stamp.scatter_reduce_(0, torch.where(keep, slots.to(torch.int64), spread),
                          torch.where(keep, now, -1).expand(slots.shape), "amax")


AGES = 64
"""Eviction ranks a group's slots by age in steps up to AGES - 1; older slots rank together."""


def _oldest(group: torch.Tensor, stamp: torch.Tensor, now: torch.Tensor, n: torch.Tensor,
            k: int) -> torch.Tensor:
    """Positions (int64 [k], the first `n` valid, in position order) of the `n` slots that rank
    first for eviction: by group (0 first), then by age (`now - stamp`, oldest first; ages from
    AGES - 1 on rank together, as do slots of one age, by position). A counting sort over
    3 x AGES buckets (a few passes over the slots) instead of a `topk` of `k`, which costs a
    sort when `k` is near the number of slots. No sync; `n` (a device scalar) at most the slots
    older than this step, which rank before every slot used in it."""
    age = (now - stamp).clamp(0, AGES - 1)
    bucket = group.to(torch.int64) * AGES + (AGES - 1 - age)                 # small: first
    counts = torch.zeros(3 * AGES, dtype=torch.int64, device=stamp.device)
    cum = torch.cumsum(counts.scatter_add_(0, bucket, torch.ones_like(bucket)), 0)
    last = (cum < n).sum()                                 # the bucket of the n-th slot
    before = torch.where(last > 0, cum.gather(0, (last - 1).clamp_min(0).view(1))[0], 0)
    tie = bucket == last
    take = (bucket < last) | (tie & (torch.cumsum(tie.to(torch.int64), 0) <= n - before))
    return torch.nonzero_static(take, size=k, fill_value=0).flatten()


def _quota_groups(owner: torch.Tensor, stamp: torch.Tensor, seen: torch.Tensor,
                  reuse: torch.Tensor, held: torch.Tensor, now: torch.Tensor, rows: torch.Tensor,
                  pages: torch.Tensor, wanted: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Update the batch's reuse averages and group the `window` slots for eviction (`_oldest`
    then ranks each group by stamp, LRU): 0 free slots, 1 slots of requests holding more than
    their quota (a request outside the batch has none), 2 the rest. Quota of a batch request =
    slots x its reuse x its wanted pages / the batch's sum; slots used this step rank last and
    are never taken (the caller takes only slots older than this step). One layer's tensors;
    `pages` [B, K] the entries' pages (distinct where wanted)."""
    S = owner.shape[0] - 1
    Wc = seen.shape[1]
    cell = rows[:, None] * Wc + pages                                # [B, K]
    seen_b = seen.view(-1)[cell]
    n_want = wanted.sum(1)
    again = (wanted & (seen_b == now - 1)).sum(1)
    rate = again.float() / n_want.clamp_min(1).float()
    old = reuse.index_select(0, rows)
    new = torch.where(n_want > 0, REUSE_ALPHA * rate + (1 - REUSE_ALPHA) * old, old)
    reuse.index_copy_(0, rows, new)
    # seen[row, page] = now where wanted (seen only grows to now; the rest: a max with -1)
    seen.view(-1).scatter_reduce_(0, cell.flatten(), torch.where(wanted, now.to(seen.dtype), -1)
                                  .flatten(), "amax")
    weight = new * n_want.float()
    quota = torch.zeros(reuse.shape[0], dtype=torch.float32, device=reuse.device)
    quota.index_copy_(0, rows, S * weight / weight.sum().clamp_min(1e-9))
    owner_w = owner[window, 0].to(torch.int64)
    stamp_w = stamp[window]
    over = (owner_w >= 0) & (held[:-1][owner_w.clamp_min(0)] > quota[owner_w.clamp_min(0)]) & \
        (stamp_w < now)
    return torch.where(owner_w < 0, 0, torch.where(over, 1, 2))
