"""`Selection`: the indexer pass of a layer (a mixin of `HybridAttention`): the flow scores each
request's pages from the stored summaries and keeps a budget per (request, KV head): one pass per
distinct budget, or per calibrated budget (`head_budgets`), or one pass with the budgets as data
(a fixed-shape step, `fixed_shape`). Pure GPU work on the step's tensors, so
both step kinds capture it in their CUDA graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .step_plan import StepPlan


class Selection:
    """Selection of a layer's pages (module docstring)."""

    index_given: bool = False
    """Benchmarks replaying selections (`run(..., sel=)`): when True the flow's indexer still runs
    on every layer and its choice is dropped, so a step that attends a replayed selection also
    pays what selecting costs (the indexer's kernels are captured in the step's graphs alike)."""

    def _chosen(self, step: StepPlan, layer: int, q: torch.Tensor, sel) -> torch.Tensor:
        """The pages a layer attends: a given `sel`, else the flow's (`_select`); with
        `index_given`, a given sel after the flow's indexer ran for its cost."""
        if sel is None:
            return self._select(step, layer, q)
        if self.index_given:
            self._select(step, layer, q)        # its cost paid, its choice dropped
        return sel

    def _select(self, step: StepPlan, layer: int, q: torch.Tensor) -> torch.Tensor:
        """sel int32 [B, Hkv, width]: each row at its own budget (-1 padded to the widest); with a
        calibration, each (row, KV head) at its own (`head_budgets`)."""
        B = step.batch
        if step.budgets is not None:        # a fixed-shape step: one pass, budgets as data
            return self.store.index(layer, q, step.s_table, step.s_lens, step.width,
                                    self.cfg.sink_pages, self.cfg.recent_pages, check=False,
                                    budgets=step.budgets[layer])
        if step.passes is not None:
            return self._select_per_head(step, layer, q)
        if len(step.groups) == 1:
            (budget, _), = step.groups.items()
            return self.store.index(layer, q, step.s_table, step.s_lens, budget,
                                    self.cfg.sink_pages, self.cfg.recent_pages, check=False)
        sel = torch.full((B, self.num_kv_heads, step.width), -1, dtype=torch.int32,
                         device=self.device)
        for budget, rows in step.groups.items():
            part = self.store.index(layer, q[rows.to(q.device)], step.s_table[rows],
                                    step.s_lens[rows], budget, self.cfg.sink_pages,
                                    self.cfg.recent_pages, check=False)
            sel[rows.to(self.device), :, :budget] = part
        return sel

    def _select_per_head(self, step: StepPlan, layer: int, q: torch.Tensor) -> torch.Tensor:
        sel = torch.full((step.batch, self.num_kv_heads, step.width), -1, dtype=torch.int32,
                         device=self.device)
        for p in step.passes[layer]:
            if p.rows is None:
                part = self.store.index(layer, q, step.s_table, step.s_lens, p.budget,
                                        self.cfg.sink_pages, self.cfg.recent_pages, check=False)
                sel[:, :, :p.budget] = torch.where(p.keep[:, :, None], part, sel[:, :, :p.budget])
                continue
            part = self.store.index(layer, q[p.rows.to(q.device)], step.s_table[p.rows_store],
                                    step.s_lens[p.rows_store], p.budget, self.cfg.sink_pages,
                                    self.cfg.recent_pages, check=False)
            cur = sel[p.rows, :, :p.budget]
            sel[p.rows, :, :p.budget] = torch.where(p.keep[:, :, None], part.to(self.device), cur)
        return sel
