"""`CpuWorker`: one persistent thread that runs CPU attention while the caller drives the GPU;
`HostBuffers`: the pinned buffers the GPU hands the CPU's inputs over in.

The Numba kernels release the GIL (`nogil=True`) and parallelise over Numba's own threads, so one
submitting thread is enough: `submit(fn, *args)` returns a `concurrent.futures.Future`; `result()`
re-raises the kernel's exception with its original type. The thread lives as long as the worker
(no per-step thread start), and a failed call leaves it ready for the next one.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch


class CpuWorker:
    """A single background thread for CPU-side work of a decode step."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vortex-cpu")

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        return self._pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class HostBuffers:
    """Staging buffers in (pinned) host memory for what the GPU hands to the CPU worker: `get`
    returns a view of the named buffer, grown when too small. A copy into a pinned buffer is
    asynchronous (and can be captured in a CUDA graph); the worker waits on an event before reading.
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype, pin_memory=self.pin)
        return buf[:n].view(shape)
