"""`ResidentStep`: a layer of `dense` and `gpu` (a mixin of `HybridAttention`): every page is in
the device pool, so the layer is append, select (gpu), attend: one CUDA graph ("layer"). A host
placement's `cached` step (every host page of its batch in the GPU page cache, in every layer:
`plan()` checks) runs the same way over the cache's slots (`attend_cached`; its own graph set, as
the step shape is part of a set's key): no cache step, no fetch, no CPU part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .. import reference

if TYPE_CHECKING:
    from .step_plan import StepPlan


class ResidentStep:
    """The resident layer (module docstring)."""

    def _resident_part(self, layer: int):
        def body(step: StepPlan, inp: dict) -> tuple:
            self._append(step, layer, inp["k_new"], inp["v_new"])
            return self.attend_whole(step, layer, inp["q"], inp.get("sel"))
        return body

    def attend_whole(self, step: StepPlan, layer: int, q: torch.Tensor,
                     sel: Optional[torch.Tensor] = None) -> tuple:
        """A layer that runs whole (no CPU hand-off): `attend_cached` in a `cached` step, else
        `dense` / `gpu`'s `attend_resident`: (o,), or with a given `sel` (`gpu`) (o, counts)."""
        if step.shape == "cached":
            return self.attend_cached(step, layer, q, sel)
        return self.attend_resident(step, layer, q, sel)

    def attend_cached(self, step: StepPlan, layer: int, q: torch.Tensor,
                      sel: Optional[torch.Tensor] = None) -> tuple:
        """A host placement's layer in a `cached` step: select and attend over the layer's head
        table with the page cache's slots filled in (`step.cached_heads`, made by plan()), as
        `gpu` attends its pool. The cache's state is read, never changed (no hits stamped, no
        reuse measured: nothing can be evicted in such a step). Returns (o in q's dtype,); with a
        given `sel` (research), (o, counts [5] (`COUNTS`): page-heads attended, 0 fetched, of them
        read from cache slots, 0, 0), counted on the device (plan() counts the flow's selection).
        Pure GPU work on the step's tensors: what `layer_graphs` captures."""
        table = step.cached_heads[layer]
        given = sel is not None
        sel = self._chosen(step, layer, q, sel)
        o, _ = self._back(step, layer, q, sel, table, None, None)
        if not given:
            return (o.to(q.dtype),)
        B, H, K = sel.shape
        sel_r = sel.reshape(B * H, K)
        chosen = sel_r >= 0
        from_cache = chosen & (torch.gather(step.dev_heads, 1, sel_r.clamp_min(0).long()) < 0)
        return o.to(q.dtype), self._given_counts(chosen, from_cache)

    def attend_resident(self, step: StepPlan, layer: int, q: torch.Tensor,
                        sel: Optional[torch.Tensor] = None) -> tuple:
        """`dense` and `gpu`: every page is in the device pool; select (gpu) and attend: (o in
        q's dtype,); with a given `sel` (`gpu`, research), (o, counts [5] (`COUNTS`): page-heads
        attended, then zeros), counted on the device (plan() counts the flow's selection). Pure
        GPU work on the step's tensors: what `layer_graphs` captures."""
        k_pool, v_pool = self.kv.device_pool.k[layer], self.kv.device_pool.v[layer]
        given = sel is not None
        if self.placement == "dense":
            sel = reference.all_pages_sel(step.lens, self.num_kv_heads, step.dev_table.shape[1],
                                          self.cfg.page_size)
        else:
            sel = self._chosen(step, layer, q, sel)
        o, _ = self._gpu.attend(q, k_pool, v_pool, step.dev_table, step.lens, sel)
        if not given:
            return (o.to(q.dtype),)
        return o.to(q.dtype), self._given_counts(sel >= 0)

    def _given_counts(self, chosen: torch.Tensor,
                      from_cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A whole layer's counts of a given selection (`COUNTS`, on the device): the page-heads
        it attends, none fetched, those of them read from cache slots (`from_cache`), no misses,
        no evictions."""
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        cached = zero if from_cache is None else from_cache.sum()
        return torch.stack([chosen.sum(), zero, cached, zero, zero])
