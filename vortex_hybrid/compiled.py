"""`compiled(fn)`: `fn` run through `torch.compile`, falling back to `fn` itself for good when
compiling fails (no working Inductor backend on the machine, an operator it cannot lower): a
warning names the function and the error, and the results are the same, only slower. An error
that `fn` raises eagerly too is the caller's, and propagates.

Used for the page cache's per-layer work (`HybridConfig.compile_cache_step`).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def compiled(fn: Callable) -> Callable:
    """`fn` compiled (`torch.compile(fn, dynamic=False)`: each input shape compiles once), or
    `fn` when compiling it fails (module docstring)."""
    state = {"call": torch.compile(fn, dynamic=False)}

    def call(*args, **kwargs):
        try:
            return state["call"](*args, **kwargs)
        except Exception as exc:                       # noqa: BLE001 - decided below
            if state["call"] is fn:
                raise
            state["call"] = fn
            log.warning("vortex_hybrid: torch.compile of %s failed (%s: %s); it runs eagerly "
                        "from now on (same results, slower)", fn.__qualname__,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return fn(*args, **kwargs)

    call.__wrapped__ = fn
    return call
