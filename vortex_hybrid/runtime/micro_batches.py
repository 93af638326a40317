"""`MicroBatches`: runtimes over disjoint requests whose whole steps share one CPU hand-off worker,
so a caller that runs its model as micro-batches staggered by a layer keeps the GPU and the CPU
busy at once.

In a whole step of a host placement, a layer's CPU part and the GPU's work around it (the model's
projections and MLP, the next layer's front) depend on each other: layer l + 1 needs layer l's
output. With one batch, the CPU idles while the GPU runs its part of a layer and the GPU waits
while the CPU attends. Two micro-batches A and B, each served by its own runtime, break the chain:

    begin A(0); begin B(0)
    for each layer l:
        end A(l)  -> A's o_proj, MLP, next QKV -> begin A(l + 1)    # the CPU attends B(l) meanwhile
        end B(l)  -> B's o_proj, MLP, next QKV -> begin B(l + 1)    # the CPU attends A(l + 1)

(`HybridAttention.run_begin` / `run_end`: begin is the GPU's part up to its wait for the CPU, end
the wait and the merge). The CPU parts of both runtimes go to one worker thread, one channel each
(`runtime.handoff`), served lowest sequence number first, so the CPU takes A(l), B(l), A(l + 1), ...
in the order the GPU needs them, and the CPU kernels' thread team serves one part at a time.

Each runtime is a whole `HybridAttention` with its own pools, page cache, summaries and steps
(built by the caller, e.g. with half the memory each): a request lives in one of them. Their steps
open and finish independently (a CPU part that fails undoes only its runtime's step).

    parts = [HybridAttention(cfg_half, ...), HybridAttention(cfg_half, ...)]
    mb = MicroBatches(parts)
    keys = mb.plan([rids_a, rids_b])             # outside the graph; the parts' whole-step keys
    ...                                          # capture or replay the staggered step
    mb.finish_step()                             # every part's; the first failure re-raised
    mb.close()
"""

from __future__ import annotations

from typing import Sequence

import torch

from .hybrid_attention import HybridAttention
from .memory_model import HOST_PLACEMENTS


class MicroBatches:
    """Runtimes (one per micro-batch) sharing one hand-off worker (module docstring).

    parts: two or more `HybridAttention` of one host placement, one device, the same model shape,
    none of which has run a whole step yet (its own hand-off would exist). The parts stay usable
    one by one (plan, run, finish_step); `close()` closes them and the shared worker.
    overlap_back (CUDA, captured steps): each part's back parts (fetches over PCIe, its own
    attention) run on a stream of its own, forked after the front and joined in run_end, so the
    other micro-batch's GPU work overlaps a part's fetches too, not only its CPU part."""

    def __init__(self, parts: Sequence[HybridAttention], overlap_back: bool = False) -> None:
        parts = list(parts)
        if len(parts) < 2 or not all(isinstance(p, HybridAttention) for p in parts):
            raise ValueError(f"parts must be two or more HybridAttention runtimes, got "
                             f"{[type(p).__name__ for p in parts]}")
        if len({id(p) for p in parts}) != len(parts):
            raise ValueError("parts must be distinct runtimes (one per micro-batch)")
        first = parts[0]
        shape = lambda p: (p.placement, p.device, p.num_layers, p.num_q_heads,  # noqa: E731
                           p.num_kv_heads, p.head_dim)
        odd = [i for i, p in enumerate(parts) if shape(p) != shape(first)]
        if odd:
            raise ValueError(f"parts {odd} differ from part 0 in placement, device or model shape "
                             f"(part 0: {shape(first)}); micro-batches run one model")
        if first.placement not in HOST_PLACEMENTS:
            raise ValueError(f"placement {first.placement!r} has no CPU part to overlap; "
                             f"micro-batches serve the host placements {sorted(HOST_PLACEMENTS)}")
        busy = [i for i, p in enumerate(parts) if p._whole_handoff is not None]
        if busy:
            raise ValueError(f"parts {busy} already have a hand-off of their own (a whole step ran): "
                             "share the worker before the first whole step")
        self.handoff = first._new_handoff([p._whole_cpu_part for p in parts])
        for channel, p in enumerate(parts):
            p._whole_handoff, p._handoff_ch, p._handoff_owned = self.handoff, channel, False
            if overlap_back and p.device.type == "cuda":
                p._back_stream = torch.cuda.Stream(device=p.device)
        self.parts = parts

    def plan(self, rids: Sequence[Sequence[int]], fixed=None) -> tuple:
        """Plan one whole step of every part (`rids[i]`: part i's requests, batch order; none
        empty): the tuple of their whole-step keys (one graph per tuple). All or nothing: a part
        that refuses (e.g. `OutOfPagesError`) undoes the parts planned before it."""
        if len(rids) != len(self.parts):
            raise ValueError(f"plan() takes one list of requests per part: {len(self.parts)} "
                             f"parts, {len(rids)} lists")
        empty = [i for i, r in enumerate(rids) if len(r) == 0]
        if empty and fixed is None:
            raise ValueError(f"parts {empty} have no requests this step; every micro-batch needs "
                             "one (or plan with fixed= for padding rows)")
        keys = []
        for i, (p, r) in enumerate(zip(self.parts, rids)):
            try:
                keys.append(p.plan(r, whole_step=True, fixed=fixed))
            except BaseException:
                for q in self.parts[:i]:
                    q.cancel_step()
                raise
        return tuple(keys)

    def finish_step(self) -> None:
        """`finish_step()` of every part (each reads its own counters and its CPU parts' errors);
        a part that failed is undone alone, the others' steps stand; the first failure is raised
        after every part finished."""
        error = None
        for p in self.parts:
            try:
                p.finish_step()
            except BaseException as exc:      # noqa: BLE001 - re-raised below, after the others
                error = error or exc
        if error is not None:
            raise error

    def stats(self) -> dict:
        """The parts' `stats()["last_step"]` counters summed (numbers; others from the first part
        that has them): what one step of the whole batch counted. The CPU parts' seconds add up
        too: one worker thread runs them one after another."""
        out: dict = {}
        for p in self.parts:
            for k, v in p.stats()["last_step"].items():
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    out.setdefault(k, v)
                else:
                    out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        """Close every part, then stop the shared worker (idempotent)."""
        for p in self.parts:
            p.close()
        self.handoff.close()
