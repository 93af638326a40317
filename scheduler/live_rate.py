"""The CPU attention rate the running steps measure, for the `hybrid` split.

The split (`HybridAttention._hybrid_fetch`, and the `subbatch` share) gives the CPU host pages until
its work would end after the copy's; it needs the CPU's rate while the copy runs. The cost model
measures one once per machine (`MachineCosts.cpu_attn_bw_concurrent`), with an even selection and
nothing else running; a real step's CPU part runs beside the GPU's fetch kernel, the driving thread
and the hand-off worker, over selections of uneven rows, and was measured at about half of it (an
H100 machine: 18 against 34-44 GB/s, docs/BENCHMARKS.md). A split planned with the higher figure
hands the CPU too much, and the CPU becomes the step's critical path.

`LiveCpuRate` starts from the cost model's figure and follows what whole steps measure (bytes the
CPU attended over the seconds its kernel calls took, less the fixed cost of each call) as a moving
average. The rate lives in a device tensor that the split reads inside its CUDA graphs, so an
update (between steps, one small copy, no synchronisation) reaches every later replay. Steps whose
CPU part read less than `MIN_BYTES_PER_CALL` a call say little about bandwidth and are not counted;
the rate stays within [FLOOR, CEILING] x the cost model's figure, so a slow step cannot drive the
split to give the CPU nothing for good.
"""

from __future__ import annotations

import torch

MIN_BYTES_PER_CALL = 1 << 20
"""A step counts only when its CPU calls read at least this many bytes each on average."""
WEIGHT = 0.3
"""Weight of the newest step in the moving average."""
FLOOR, CEILING = 0.1, 1.5
"""Bounds of the rate, as multiples of the cost model's figure."""


class LiveCpuRate:
    """The CPU's concurrent attention rate in bytes/s: `value` (host float) and `tensor` (float64
    [1] on `device`, read by captured graphs). initial: the cost model's figure; call_s: its fixed
    cost of one CPU kernel call."""

    def __init__(self, initial: float, call_s: float, device: torch.device) -> None:
        if not initial > 0 or call_s < 0:
            raise ValueError(f"initial={initial!r} must be > 0 and call_s={call_s!r} >= 0")
        self.initial, self.call_s = float(initial), float(call_s)
        self.value = self.initial
        self.tensor = torch.full((1,), self.initial, dtype=torch.float64, device=device)
        self.steps = 0
        """Steps that moved the rate."""

    def observe(self, nbytes: float, kernel_s: float, calls: int) -> bool:
        """A finished step's CPU part: `nbytes` read in `calls` kernel calls taking `kernel_s`
        seconds in all. Returns whether the rate moved."""
        if calls < 1 or nbytes < MIN_BYTES_PER_CALL * calls or kernel_s <= 0:
            return False
        busy = max(kernel_s - calls * self.call_s, kernel_s / 2)
        seen = min(max(nbytes / busy, FLOOR * self.initial), CEILING * self.initial)
        self.value = (1 - WEIGHT) * self.value + WEIGHT * seen
        self.tensor.fill_(self.value)
        self.steps += 1
        return True
