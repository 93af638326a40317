"""Worker threads of the CPU kernels: how many, which Numba threading layer, and safe concurrent calls.

The runtime calls CPU kernels from Python worker threads while the main thread drives the GPU, so
two Python threads may launch parallel Numba kernels at once. Numba's `workqueue` layer aborts the
process on concurrent launches; the `omp` and `tbb` layers are thread-safe. On import this module asks
Numba for a thread-safe layer when one is installed and the user chose none (`NUMBA_THREADING_LAYER`
unset); when only `workqueue` exists, `kernel_call()` serialises launches with a lock instead.
GNU OpenMP is not fork-safe: fork worker processes before the first kernel call, or use `spawn`.
The runtime thread that drives the GPU needs a core too: `cpu_threads = cores - 1` avoids parallel
regions waiting for a worker the OS descheduled (seen on the shared 2-core machine, docs/BENCHMARKS.md).

Thread count: `set_cpu_threads(n)` or `set_cpu_threads(config)` (a `HybridConfig`, whose
`resolved_cpu_threads()` reads `cpu_threads`, then `NUMBA_NUM_THREADS`, then the core count), capped
at Numba's pool size `numba.config.NUMBA_NUM_THREADS`. Numba's thread count is per calling thread, so
`kernel_call()` applies it in whichever thread launches a kernel.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from typing import Iterator, Optional, Union

import numba

from vortex_hybrid.config import HybridConfig

log = logging.getLogger(__name__)

_THREADSAFE_POOLS = ("numba.np.ufunc.tbbpool", "numba.np.ufunc.omppool")


def _threadsafe_layer_installed() -> bool:
    for mod in _THREADSAFE_POOLS:
        try:
            importlib.import_module(mod)
            return True
        except ImportError:
            continue
    return False


if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    if _threadsafe_layer_installed():
        numba.config.THREADING_LAYER = "threadsafe"
    else:
        log.info("no thread-safe Numba threading layer (tbb/omp); CPU kernel launches are serialised")

_launch_lock = threading.Lock()
_threads: Optional[int] = None


def max_threads() -> int:
    """Size of Numba's worker pool (`NUMBA_NUM_THREADS` at import): the most threads a kernel gets."""
    return int(numba.config.NUMBA_NUM_THREADS)


def set_cpu_threads(threads: Union[int, HybridConfig, None]) -> int:
    """Set the kernels' thread count from an int, a `HybridConfig`, or None (config default).

    Returns the count in use, capped at `max_threads()`; raises ValueError for a count below 1.
    """
    global _threads
    if isinstance(threads, HybridConfig):
        n = threads.resolved_cpu_threads()
    elif threads is None:
        n = HybridConfig().resolved_cpu_threads()
    elif isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
        n = threads
    else:
        raise ValueError(f"threads={threads!r} must be a positive int, a HybridConfig or None")
    if n > max_threads():
        log.info("cpu_threads=%d exceeds Numba's pool of %d threads; using %d", n, max_threads(),
                 max_threads())
    _threads = min(n, max_threads())
    return _threads


def cpu_threads() -> int:
    """Thread count the kernels use (set by `set_cpu_threads`, else from the default config)."""
    return _threads if _threads is not None else set_cpu_threads(None)


_layer: Optional[str] = None


def _serialised() -> bool:
    global _layer
    if _layer is None:
        try:
            _layer = numba.threading_layer()
        except ValueError:      # no parallel kernel has run yet: be safe until one has
            return True
    return _layer == "workqueue"


@contextlib.contextmanager
def kernel_call() -> Iterator[int]:
    """Context for one kernel launch: applies the thread count in this thread, and holds a lock
    when the threading layer is not thread-safe. Yields the thread count."""
    n = cpu_threads()
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    if _serialised():
        with _launch_lock:
            yield n
    else:
        yield n
