"""`GpuPageCache`: the GPU page cache's state as tensors on the GPU, one cache per layer.

Each layer has `num_slots` slots (HBM pages holding copies of host pages). The state is three
tensors per layer, on the runtime's device, so a step needs no per-page host round trip:

    slot_of   int32 [L, R, W]  request index r, logical page p -> slot, -1 when not cached
    owner     int32 [L, S, 2]  slot -> (request index, page), -1 when free
    stamp     int64 [L, S + 1] the last step that used the slot (-1: free, the oldest); the spare
                               last column absorbs writes of masked-out entries

`step(layer, rows, wanted, fetch)` (per layer, vectorised): pages in `wanted` that are cached are
hits and get this step's stamp (so nothing in use this step is evicted); pages in `fetch` that are
not cached take the slots with the oldest stamps (exact LRU by step: a `topk` over the stamps, the
GPU-friendly form of a bucketed LRU), whose old pages are evicted; when too few slots are older
than this step, the rest stays with the CPU. It returns the fetched (row, page, slot) triples for
the copy. Request indices are dense (0..R-1), given out by `add_request`; R and W grow by doubling.
The host copy of every page stays authoritative: evicting drops a copy, never data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FetchPlan:
    """One layer's step: rows [n], pages [n] (logical), slots [n] to copy into (device int64);
    hits / misses / evictions as 0-dim device tensors (no sync needed to count them)."""

    rows: torch.Tensor
    pages: torch.Tensor
    slots: torch.Tensor
    hits: torch.Tensor
    misses: torch.Tensor
    evictions: torch.Tensor


class GpuPageCache:
    """Per-layer GPU page cache state (module docstring)."""

    def __init__(self, num_layers: int, num_slots: int, device: torch.device,
                 max_requests: int = 8, max_pages: int = 64) -> None:
        if num_slots < 0 or num_layers < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 0 and num_layers={num_layers} >= 1")
        self.num_layers, self.num_slots, self.device = num_layers, num_slots, device
        self.slot_of = torch.full((num_layers, max_requests, max_pages), -1, dtype=torch.int32,
                                  device=device)
        self.owner = torch.full((num_layers, num_slots, 2), -1, dtype=torch.int32, device=device)
        # one spare column past the slots takes the stamps of masked-out entries (no compaction)
        self.stamp = torch.full((num_layers, num_slots + 1), -1, dtype=torch.int64, device=device)
        self.now = 0
        self._index: dict[int, int] = {}         # request id -> dense index
        self._free = list(range(max_requests - 1, -1, -1))

    # ---- requests ---------------------------------------------------------------------------
    def index_of(self, rid: int) -> int:
        """The dense index of a request, given out on first use."""
        if rid not in self._index:
            if not self._free:
                self._grow(requests=2 * self.slot_of.shape[1])
            self._index[rid] = self._free.pop()
        return self._index[rid]

    def reserve(self, pages: int) -> None:
        """Room for requests of up to `pages` pages."""
        if pages > self.slot_of.shape[2]:
            self._grow(pages=max(pages, 2 * self.slot_of.shape[2]))

    def _grow(self, requests: int = 0, pages: int = 0) -> None:
        L, R, W = self.slot_of.shape
        R2, W2 = max(R, requests), max(W, pages)
        grown = torch.full((L, R2, W2), -1, dtype=torch.int32, device=self.device)
        grown[:, :R, :W] = self.slot_of
        self.slot_of = grown
        self._free = list(range(R2 - 1, R - 1, -1)) + self._free

    def remove_request(self, rid: int) -> None:
        """Free every slot of a request in every layer."""
        r = self._index.pop(rid, None)
        if r is None:
            return
        mine = self.owner[:, :, 0] == r                                   # [L, S]
        self.owner[mine] = -1
        self.stamp[:, :self.num_slots][mine] = -1
        self.slot_of[:, r] = -1
        self._free.append(r)

    def pages_of(self, rid: int, layer: int) -> torch.Tensor:
        """Logical pages of `rid` cached in `layer` (for tests and diagnostics)."""
        r = self._index.get(rid)
        if r is None:
            return torch.zeros(0, dtype=torch.int64)
        return (self.slot_of[layer, r] >= 0).nonzero().flatten().cpu()

    # ---- one step ---------------------------------------------------------------------------
    def next_step(self) -> None:
        self.now += 1

    def table(self, layer: int, rows: torch.Tensor, width: int) -> torch.Tensor:
        """slots int32 [B, width] of the batch's requests (`rows`: dense indices [B], device)."""
        return self.slot_of[layer].index_select(0, rows)[:, :width]

    def step(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, wanted: torch.Tensor,
             fetch: torch.Tensor) -> FetchPlan:
        """rows [B] dense request indices; slots [B, W] = `table(layer, rows, W)`; wanted, fetch
        bool [B, W]: pages this step reads from the cache or would like fetched. Updates the state
        and returns what to copy. One host sync (how many fetches there are and slots to take)."""
        now, S = self.now, self.num_slots
        stamp = self.stamp[layer]
        hit = wanted & (slots >= 0)
        stamp.index_fill_(0, torch.where(hit, slots, S).flatten().to(torch.int64), now)
        want_new = fetch & (slots < 0)
        misses = (wanted & (slots < 0)).sum()
        counts = torch.stack([want_new.sum(), (stamp[:S] < now).sum()]).tolist()   # the sync
        n = min(counts)                     # fetches wanted, slots older than this step
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        if n == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return FetchPlan(empty, empty, empty, hit.sum(), misses, zero)
        b, p = torch.nonzero_static(want_new, size=n).unbind(1)          # the first n, row-major
        _, victims = torch.topk(stamp[:S], n, largest=False)
        old = self.owner[layer, victims].to(torch.int64)                 # [n, 2]
        taken = old[:, 0] >= 0
        self.slot_of[layer, old[taken, 0], old[taken, 1]] = -1
        req = rows[b].to(torch.int64)
        self.slot_of[layer, req, p] = victims.to(torch.int32)
        self.owner[layer, victims] = torch.stack([req, p], 1).to(torch.int32)
        self.stamp[layer, victims] = now
        return FetchPlan(b, p, victims, hit.sum(), misses, taken.sum())
