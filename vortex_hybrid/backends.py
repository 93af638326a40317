"""Which kernel backends this machine can run, each a module with the contract functions.

`reference` (plain torch) always; `cpu` when `vortex_hybrid.cpu_kernels` provides the contract;
`gpu` when CUDA is present and `vortex_hybrid.gpu_kernels` provides it.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CONTRACT = ("sparse_decode_attention", "merge_states", "topk_pages")
_MODULES = {"reference": "vortex_hybrid.reference", "cpu": "vortex_hybrid.cpu_kernels",
            "gpu": "vortex_hybrid.gpu_kernels"}


def load_backend(name: str) -> ModuleType | None:
    """The backend module, or None when it is missing here (no CUDA, not built, import error)."""
    if name not in _MODULES:
        raise ValueError(f"backend={name!r} must be one of {list(_MODULES)}")
    if name == "gpu" and not torch.cuda.is_available():
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        log.warning("backend %s unavailable: %s", name, exc)
        return None
    return mod if all(hasattr(mod, fn) for fn in CONTRACT) else None


def available_backends() -> dict[str, ModuleType]:
    """Name -> module for every backend usable on this machine."""
    found = {name: load_backend(name) for name in _MODULES}
    return {name: mod for name, mod in found.items() if mod is not None}
