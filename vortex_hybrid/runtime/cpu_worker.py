"""`CpuWorker`: one persistent thread that runs CPU attention while the caller drives the GPU.

The Numba kernels release the GIL (`nogil=True`) and parallelise over Numba's own threads, so one
submitting thread is enough: `submit(fn, *args)` returns a `concurrent.futures.Future`; `result()`
re-raises the kernel's exception with its original type. The thread lives as long as the worker
(no per-step thread start), and a failed call leaves it ready for the next one.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class CpuWorker:
    """A single background thread for CPU-side work of a decode step."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vortex-cpu")

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        return self._pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
