"""`ResidentStep`: a layer of `dense` and `gpu` (a mixin of `HybridAttention`): every page is in
the device pool, so the layer is append, select (gpu), attend: one CUDA graph ("layer").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import reference

if TYPE_CHECKING:
    from .step_plan import StepPlan


class ResidentStep:
    """The resident layer (module docstring)."""

    def _resident_part(self, layer: int):
        def body(step: StepPlan, inp: dict) -> tuple:
            self._append(step, layer, inp["k_new"], inp["v_new"])
            return (self.attend_resident(step, layer, inp["q"]),)
        return body

    def attend_resident(self, step: StepPlan, layer: int, q: torch.Tensor) -> torch.Tensor:
        """`dense` and `gpu`: every page is in the device pool; select (gpu) and attend. Pure GPU
        work on the step's tensors: what `layer_graphs` captures."""
        k_pool, v_pool = self.kv.device_pool.k[layer], self.kv.device_pool.v[layer]
        if self.placement == "dense":
            sel = reference.all_pages_sel(step.lens, self.num_kv_heads, step.dev_table.shape[1],
                                          self.cfg.page_size)
        else:
            sel = self._select(step, layer, q)
        o, _ = self._gpu.attend(q, k_pool, v_pool, step.dev_table, step.lens, sel)
        return o.to(q.dtype)
