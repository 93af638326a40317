"""Lowering hook: fused kernels that replace the reference interpreter for a flow stage on a device.

A kernel backend registers a function against a *pattern*: a library flow whose stage graph the
kernel computes. A flow stage runs on that kernel when its traced graph has the same structure as
the pattern's, traced at the same (page_size, head_dim, group) (`pattern.stage_signature`: ops,
wiring, attributes, shapes, summary names, packed-code widths; never the flow's name or class). So
a user's flow that computes quest's score with the same ops gets quest's kernels, and `class NegQuest(Quest)` that
overrides `forward_indexer` runs its own program.

    register_lowering("quest", "indexer", "cuda", quest_indexer)     # pattern: the library's quest
    fn = find_lowering(my_flow, "indexer", "cuda", shape=(16, 128, 4))   # None -> interpreter

The runtime does not call `find_lowering` per step: `bound_flow.bind_flow` resolves both stages
once per (flow, shape, device). `find_lowering` imports `vortex_hybrid.cpu_kernels.lowerings`
(device "cpu") or `vortex_hybrid.gpu_kernels.lowerings` (device "cuda") once and registers their
LOWERINGS tables; an `ImportError` there means "no lowering".

Signatures (N physical pages, Hkv KV heads, P page_size, D head_dim, B requests, Hq query heads,
R summary rows):

cache fn:   fn(k_pool [N, Hkv, P, D], pages int64 [n] (physical pages, all full),
               summaries: dict[str, Tensor], rows int64 [n] | None = None, *, check=True) -> None
            summaries[name] is float32, bfloat16 or float8_e4m3fn [R, Hkv, *shape] on k_pool's
            device, or for a coded summary (`vflow.Codes`) uint8 [R, Hkv, r, packed width]
            (`vortex_hybrid.packed_codes`); fn writes row rows[i] (default pages[i]) from page
            pages[i].
indexer fn: fn(q [B, Hq, D], summaries, page_table int32 [B, max_pages] (logical page -> summary
               row), seq_lens int32 [B], budget, sink, recent, *, page_size: int, check=True)
               -> sel int32 [B, Hkv, budget]
            -1 padded, any order, with exactly the semantics of `vortex_hybrid.vflow.select_pages`:
            `vortex_hybrid.reference.topk_pages` applied to the flow's page scores.
`check=False` skips argument validation (the runtime validates once per step).
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable, Optional, Union

import torch

from .flow import Flow
from .pattern import stage_signature
from .registry import load_flow

log = logging.getLogger(__name__)

STAGES = ("cache", "indexer")
DEVICES = ("cpu", "cuda")
BACKEND_MODULES = {"cpu": "vortex_hybrid.cpu_kernels", "cuda": "vortex_hybrid.gpu_kernels"}
"""Each backend's `lowerings` submodule holds LOWERINGS = {(pattern, stage): fn}, registered here on
first use (the backends import nothing from vflow)."""

_lowerings: dict[tuple[str, str, str], Callable] = {}     # (pattern flow, stage, device) -> fn
_signatures: dict[tuple, tuple] = {}                       # (pattern, stage, shape) -> signature
_backends_tried: set[str] = set()
generation = 0
"""Bumped by every (un)registration: `bound_flow` rebinds flows bound under an older registry."""

Shape = tuple[int, int, int]
"""(page_size, head_dim, group): the shapes a stage is traced at."""


def device_type(device: Union[str, torch.device]) -> str:
    """"cpu" or "cuda" for a device name or torch.device; ValueError otherwise."""
    try:
        kind = torch.device(device).type if isinstance(device, (str, torch.device)) else None
    except RuntimeError:
        kind = None
    if kind not in DEVICES:
        raise ValueError(f"device={device!r} must be one of {list(DEVICES)} (or a torch.device of "
                         "those types)")
    return kind


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} must be one of {list(STAGES)}")


def register_lowering(pattern: str, stage: str, device: Union[str, torch.device],
                      fn: Callable) -> Callable:
    """Run `fn` for `stage` ("cache" or "indexer") on `device` ("cpu" or "cuda") of every flow whose
    stage graph has the structure of the registered flow `pattern`'s. Returns `fn`; registering the
    same (pattern, stage, device) again replaces the function."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern={pattern!r} must be the name of a registered flow, e.g. 'quest'")
    _check_stage(stage)
    kind = device_type(device)
    if not callable(fn):
        raise ValueError(f"fn={fn!r} must be callable (see the signatures in this module)")
    global generation
    key = (pattern, stage, kind)
    if key in _lowerings and _lowerings[key] is not fn:
        log.info("lowering for %s replaced: %s -> %s", key, _lowerings[key], fn)
    _lowerings.pop(key, None)
    _lowerings[key] = fn                    # the newest registration is tried first
    generation += 1
    for sig_key in [k for k in _signatures if k[0] == pattern]:
        del _signatures[sig_key]            # a flow re-registered under the name may trace anew
    return fn


def unregister_lowering(pattern: str, stage: str, device: Union[str, torch.device]) -> None:
    """Remove the lowering for (pattern, stage, device) if there is one."""
    global generation
    _check_stage(stage)
    _lowerings.pop((pattern, stage, device_type(device)), None)
    generation += 1


def _import_backend(kind: str) -> None:
    if kind in _backends_tried:
        return
    _backends_tried.add(kind)
    try:
        table = importlib.import_module(BACKEND_MODULES[kind] + ".lowerings").LOWERINGS
    except ImportError as exc:
        log.info("no %s lowerings (%s does not import: %s); the reference interpreter runs",
                 kind, BACKEND_MODULES[kind], exc)
        return
    global generation
    mine = {(pattern, stage, kind): fn for (pattern, stage), fn in table.items()}
    theirs = {key: fn for key, fn in _lowerings.items() if key not in mine}
    _lowerings.clear()                      # the backend's go first: registrations made before
    _lowerings.update(mine)                 # the backend loaded stay newer and win
    _lowerings.update(theirs)
    generation += 1


def _pattern_signature(pattern: str, stage: str, shape: Shape) -> Optional[tuple]:
    key = (pattern, stage, shape)
    if key not in _signatures:
        try:
            compiled = load_flow(pattern).compiled(*shape)
        except ValueError as exc:            # not a registered flow, or it cannot trace this shape
            log.debug("lowering pattern %r does not trace at %s: %s", pattern, shape, exc)
            _signatures[key] = None
        else:
            _signatures[key] = stage_signature(compiled, stage)
    return _signatures[key]


def find_lowering(flow: Union[str, Flow], stage: str, device: Union[str, torch.device],
                  shape: Optional[Shape] = None) -> Optional[Callable]:
    """The registered function whose pattern's `stage` graph has the structure of `flow`'s, traced
    at `shape` = (page_size, head_dim, group) (default: the flow's `probe_shape`); None to
    interpret. When several patterns match, the newest registration wins. Compares graphs: call it
    once per (flow, shape, device) (see `bound_flow`)."""
    _check_stage(stage)
    kind = device_type(device)
    _import_backend(kind)
    flow = load_flow(flow)
    shape = tuple(shape) if shape is not None else tuple(flow.probe_shape)
    mine = stage_signature(flow.compiled(*shape), stage)
    for (pattern, st, k), fn in reversed(list(_lowerings.items())):
        if st == stage and k == kind and _pattern_signature(pattern, stage, shape) == mine:
            log.debug("%r.%s on %s has the structure of %r: using its lowering", flow, stage, kind,
                      pattern)
            return fn
    return None


def registered_lowerings() -> dict[tuple[str, str, str], Callable]:
    """A copy of the registry: (pattern, stage, device) -> fn, for the backends imported so far."""
    return dict(_lowerings)
