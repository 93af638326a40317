"""`StepTrace`: a timeline of what a decode step did where, for docs and diagnosis.

    attn.trace = StepTrace(attn.device)       # start recording
    ... attn.plan(...); attn.run(...) ...
    spans = attn.trace.spans()                # [{"layer", "lane", "name", "start_ms", "end_ms"}]
    attn.trace = None                         # stop (the default: no cost)

Lanes: "host" (the Python thread driving the step), "cpu" (the CPU worker's kernels), "gpu"
(kernels on the current CUDA stream, timed with CUDA events). Host and CPU times come from
`time.perf_counter`; GPU times from events relative to one recorded when the trace starts, after a
synchronisation that lines the two clocks up. Without CUDA the "gpu" lane is timed on the host.
Recording GPU spans adds events, not synchronisations; `spans()` synchronises once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import torch


class StepTrace:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()
        self._t0 = time.perf_counter()
        self._host: list[tuple] = []            # (layer, lane, name, start_s, end_s)
        self._gpu: list[tuple] = []             # (layer, name, start event, end event)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def host(self, layer: int, name: str, lane: str = "host") -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._host.append((layer, lane, name, start - self._t0,
                                   time.perf_counter() - self._t0))

    @contextlib.contextmanager
    def gpu(self, layer: int, name: str) -> Iterator[None]:
        if not self.cuda:
            with self.host(layer, name, "gpu"):
                yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._gpu.append((layer, name, start, end))

    def spans(self) -> list[dict]:
        """Every recorded span, in ms from the start of the trace, sorted by start."""
        out = [dict(layer=l, lane=lane, name=n, start_ms=a * 1e3, end_ms=b * 1e3)
               for l, lane, n, a, b in self._host]
        if self._gpu:
            torch.cuda.synchronize()
            out += [dict(layer=l, lane="gpu", name=n, start_ms=self._base.elapsed_time(s),
                         end_ms=self._base.elapsed_time(e)) for l, n, s, e in self._gpu]
        return sorted(out, key=lambda s: s["start_ms"])


class _NoTrace:
    """The tracer while none records (`HybridAttention.trace is None`): spans cost nothing."""

    @staticmethod
    def host(*args):
        return contextlib.nullcontext()

    gpu = host


NO_TRACE = _NoTrace()
