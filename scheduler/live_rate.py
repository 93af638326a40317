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

The fixed cost of one CPU call (`call_s`) is followed the same way, from the steps the rate passes
over: when a step's calls read little, their time is mostly that cost (the kernel time less the
bytes at the current rate, per call), kept as a moving average within [0, CALL_MAX] in a second
device tensor (`call_tensor`) that the split reads too. The cost model measures it with a call of
one request; a step's call over a large batch costs more (an H100 machine: ~1 ms against 50 us), and
a split that believes the smaller figure hands the CPU parts too small to pay for their call.
"""

from __future__ import annotations

import torch

MIN_BYTES_PER_CALL = 1 << 20
"""A step counts only when its CPU calls read at least this many bytes each on average."""
WEIGHT = 0.3
"""Weight of the newest step in the moving average."""
FLOOR, CEILING = 0.1, 1.5
"""Bounds of the rate, as multiples of the cost model's figure."""
CALL_MAX = 5e-3
"""Largest fixed cost of a CPU call the split believes, in seconds."""


class LiveCpuRate:
    """The CPU's concurrent attention rate in bytes/s: `value` (host float) and `tensor` (float64
    [1] on `device`, read by captured graphs). initial: the cost model's figure; call_s: its fixed
    cost of one CPU kernel call, followed as `call_s` (host float) and `call_tensor` (float64 [1]
    on `device`)."""

    def __init__(self, initial: float, call_s: float, device: torch.device) -> None:
        if not initial > 0 or call_s < 0:
            raise ValueError(f"initial={initial!r} must be > 0 and call_s={call_s!r} >= 0")
        self.initial, self.call_s = float(initial), float(call_s)
        self.value = self.initial
        self.tensor = torch.full((1,), self.initial, dtype=torch.float64, device=device)
        self.call_tensor = torch.full((1,), self.call_s, dtype=torch.float64, device=device)
        self.steps = 0
        """Steps that moved the rate."""
        self.call_steps = 0
        """Steps that moved the fixed cost of a call."""

    def observe(self, nbytes: float, kernel_s: float, calls: int) -> bool:
        """A finished step's CPU part: `nbytes` read in `calls` kernel calls taking `kernel_s`
        seconds in all. Returns whether the rate or the fixed cost of a call moved (the rate from
        steps whose calls read at least MIN_BYTES_PER_CALL each, the call's cost from the
        others)."""
        if calls < 1 or kernel_s <= 0:
            return False
        if nbytes < MIN_BYTES_PER_CALL * calls:
            per_call = min(max((kernel_s - nbytes / self.value) / calls, 0.0), CALL_MAX)
            self.call_s = (1 - WEIGHT) * self.call_s + WEIGHT * per_call
            self.call_tensor.fill_(self.call_s)
            self.call_steps += 1
            return True
        busy = max(kernel_s - calls * self.call_s, kernel_s / 2)
        seen = min(max(nbytes / busy, FLOOR * self.initial), CEILING * self.initial)
        self.value = (1 - WEIGHT) * self.value + WEIGHT * seen
        self.tensor.fill_(self.value)
        self.steps += 1
        return True
