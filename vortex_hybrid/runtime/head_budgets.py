"""Per-head budgets from a calibration, as selection passes the runtime's indexer runs.

With a `Calibration` each (layer, KV head) attends its own budget: pages =
max(sink + recent, ceil(ratio * request pages)), capped at the request's pages (a budget past them
selects the same pages). The flow's indexer selects a whole request (every KV head) at one budget,
so a layer runs one pass per distinct budget among its heads and rows, and each (row, head) keeps
the pass at its own budget: the same pages `select_pages` gives that head at that budget. Passes
are built on the host once per distinct budget array and reused while it stays the same (budgets
change when a request's page count crosses a ratio's step), so `plan` costs a lookup.

Heads the calibration puts at token granularity select pages the same way; the CPU worker then
attends only the best share of the tokens of their host pages (`HybridAttention._cpu_attend`):
"page then token" where the CPU attends. Pages attended on the GPU stay whole, and the `dense` and
`gpu` placements, which have no CPU part, attend every head page by page.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

KEEP = 8
"""Distinct budget arrays whose passes are kept."""


@dataclass(frozen=True)
class Pass:
    """One indexer run of a layer: `rows` (None: every row) at `budget`, whose result is kept for
    the (row, head) pairs where `keep` [rows, Hkv] is True."""
    budget: int
    rows_store: Optional[torch.Tensor]     # int64 on the summary store's device
    rows: Optional[torch.Tensor]           # int64 on the runtime's device
    keep: torch.Tensor                     # bool [rows, Hkv] on the runtime's device


class HeadBudgets:
    """Selection passes per layer for a batch, from a calibration (module docstring)."""

    def __init__(self, calibration, device: torch.device, store_device: torch.device) -> None:
        self.cal = calibration
        self.device, self.store_device = device, store_device
        heads = torch.as_tensor(calibration.token_heads())
        self.token_heads: list = [heads[layer] if bool(heads[layer].any()) else None
                                  for layer in range(heads.shape[0])]
        """Per layer: bool [Hkv] (CPU) of the heads at token granularity, or None (all pages):
        the CPU worker attends those heads' host pages token by token."""
        self._passes: OrderedDict[bytes, tuple[list[list[Pass]], int, int]] = OrderedDict()

    def budgets(self, num_pages: list[int]) -> np.ndarray:
        """int64 [L, Hkv, B]: each (layer, head, request)'s pages, capped at the request's pages
        (never below sink + recent, what the top-k requires)."""
        n = np.asarray(num_pages, dtype=np.int64)
        floor = self.cal.sink_pages + self.cal.recent_pages
        return np.minimum(self.cal.head_budgets(n), np.maximum(n, floor)[None, None, :])

    def plan(self, num_pages: list[int]) -> tuple[list[list[Pass]], int, bytes, int]:
        """(passes per layer, the widest budget, a key naming the budgets, page-heads a step
        attends per layer on average) for requests of `num_pages` pages."""
        b = self.budgets(num_pages)
        key = b.tobytes() + bytes(str(b.shape), "ascii")
        hit = self._passes.get(key)
        if hit is None:
            n = np.asarray(num_pages, dtype=np.int64)
            attended = int(round(np.minimum(b, n[None, None, :]).sum() / b.shape[0]))
            hit = (self._build(b), int(b.max(initial=0)), attended)
            self._passes[key] = hit
            if len(self._passes) > KEEP:
                self._passes.popitem(last=False)
        else:
            self._passes.move_to_end(key)
        return hit[0], hit[1], key, hit[2]

    def _build(self, b: np.ndarray) -> list[list[Pass]]:
        L, H, B = b.shape
        out = []
        for layer in range(L):
            passes = []
            for budget in np.unique(b[layer]):
                keep = (b[layer] == budget).T                          # [B, H]
                rows = np.flatnonzero(keep.any(1))
                whole = len(rows) == B
                passes.append(Pass(
                    int(budget),
                    None if whole else torch.as_tensor(rows).to(self.store_device),
                    None if whole else torch.as_tensor(rows).to(self.device),
                    torch.as_tensor(keep[rows]).to(self.device)))
            out.append(passes)
        return out


__all__ = ["HeadBudgets", "Pass"]
