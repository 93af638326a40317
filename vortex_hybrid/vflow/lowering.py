"""Lowering hook: fused kernels that replace the reference interpreter for a (flow, stage, device).

The kernel backends register functions here when they are imported; the interpreter asks
`find_lowering` before running a stage and falls back to the reference ops when it gets `None`.

    register_lowering("quest", "indexer", "cuda", quest_indexer)
    fn = find_lowering("quest", "indexer", q.device)      # None -> reference interpreter

`find_lowering` imports `vortex_hybrid.cpu_kernels` (device "cpu") or `vortex_hybrid.gpu_kernels`
(device "cuda") once, on first use, so their import-time registrations happen; an `ImportError`
there means "no lowering" and the reference interpreter runs.

Signatures (N physical pages, Hkv KV heads, P page_size, D head_dim, B requests, Hq query heads):

cache fn:   fn(k_pool [N, Hkv, P, D] any float dtype, pages int64 [n] (physical pages, all full),
               summaries: dict[str, Tensor]) -> None
            summaries[name] is float32 [N, Hkv, *shape] (the flow's declared shape per KV head),
            rows indexed by physical page, on k_pool's device; fn writes rows `pages` in place.
indexer fn: fn(q [B, Hq, D], summaries (as above), page_table int32 [B, max_pages],
               seq_lens int32 [B], budget: int, sink: int, recent: int, *, page_size: int)
               -> sel int32 [B, Hkv, budget]
            -1 padded, any order, with exactly the semantics of `vortex_hybrid.vflow.select_pages`:
            `vortex_hybrid.reference.topk_pages` applied to the flow's page scores. `page_size`
            (tokens per page of the pool the summaries describe) counts each request's pages.
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable, Optional, Union

import torch

log = logging.getLogger(__name__)

STAGES = ("cache", "indexer")
DEVICES = ("cpu", "cuda")
BACKEND_MODULES = {"cpu": "vortex_hybrid.cpu_kernels", "cuda": "vortex_hybrid.gpu_kernels"}

_lowerings: dict[tuple[str, str, str], Callable] = {}
_backends_tried: set[str] = set()


def _device_type(device: Union[str, torch.device]) -> str:
    try:
        kind = torch.device(device).type if isinstance(device, (str, torch.device)) else None
    except RuntimeError:
        kind = None
    if kind not in DEVICES:
        raise ValueError(f"device={device!r} must be one of {list(DEVICES)} (or a torch.device of "
                         "those types)")
    return kind


def _check_key(flow: str, stage: str) -> None:
    if not isinstance(flow, str) or not flow:
        raise ValueError(f"flow={flow!r} must be a non-empty flow name such as 'quest'")
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} must be one of {list(STAGES)}")


def register_lowering(flow: str, stage: str, device: Union[str, torch.device],
                      fn: Callable) -> Callable:
    """Use `fn` for `stage` ("cache" or "indexer") of `flow` on `device` ("cpu" or "cuda").

    Returns `fn`. A second registration for the same key replaces the first.
    """
    _check_key(flow, stage)
    kind = _device_type(device)
    if not callable(fn):
        raise ValueError(f"fn={fn!r} must be callable (see the signatures in this module)")
    key = (flow, stage, kind)
    if key in _lowerings and _lowerings[key] is not fn:
        log.info("lowering for %s replaced: %s -> %s", key, _lowerings[key], fn)
    _lowerings[key] = fn
    return fn


def unregister_lowering(flow: str, stage: str, device: Union[str, torch.device]) -> None:
    """Remove the lowering for (flow, stage, device) if there is one."""
    _check_key(flow, stage)
    _lowerings.pop((flow, stage, _device_type(device)), None)


def _import_backend(kind: str) -> None:
    if kind in _backends_tried:
        return
    _backends_tried.add(kind)
    try:
        importlib.import_module(BACKEND_MODULES[kind])
    except ImportError as exc:
        log.info("no %s lowerings (%s does not import: %s); the reference interpreter runs",
                 kind, BACKEND_MODULES[kind], exc)


def find_lowering(flow: str, stage: str, device: Union[str, torch.device]) -> Optional[Callable]:
    """The registered function for (flow, stage, device type), or None to interpret."""
    _check_key(flow, stage)
    kind = _device_type(device)
    _import_backend(kind)
    return _lowerings.get((flow, stage, kind))


def registered_names(stage: str, device: Union[str, torch.device]) -> list[str]:
    """Flow names with a lowering for (stage, device type), sorted; imports that backend first."""
    kind = _device_type(device)
    _import_backend(kind)
    return sorted(f for f, st, k in _lowerings if st == stage and k == kind)


def registered_lowerings() -> dict[tuple[str, str, str], Callable]:
    """A copy of the registry: (flow, stage, device) -> fn, for the backends imported so far."""
    return dict(_lowerings)
