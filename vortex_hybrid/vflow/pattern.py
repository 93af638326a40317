"""Pattern matching for the lowering hook: a stage whose traced graph has the same structure as a
lowered flow's stage runs on that flow's fused kernel, whatever the flow is called.

Structure = the ops in order, their wiring, attributes, logical shapes and dtypes, and the stage's
named inputs and outputs (summary names included); source locations and the flow's name are left
out. So a user flow that writes quest's score in the same ops gets quest's kernels, and a flow that
differs in any op, attribute or summary name falls back to the reference interpreter.

    fn = matching_lowering(flow, compiled, "indexer", q.device)    # None -> interpret
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Union

import torch

from .compiler import CompiledFlow
from .flow import Flow
from .graph import Graph
from .lowering import find_lowering, registered_names
from .registry import load_flow

log = logging.getLogger(__name__)

_library_signatures: dict[tuple[str, str, int, int, int], tuple] = {}


def _frozen(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape), t.numpy().tobytes())
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def graph_signature(graph: Graph) -> tuple:
    """A hashable description of a stage graph's structure (no source lines, no flow name)."""
    nodes = tuple((n.op, n.inputs, _frozen(n.attrs), n.shape, n.dtype) for n in graph.nodes)
    return nodes, tuple(sorted(graph.inputs.items())), tuple(sorted(graph.outputs.items()))


def _stage_graph(compiled: CompiledFlow, stage: str) -> Graph:
    return compiled.cache_graph if stage == "cache" else compiled.indexer_graph


def _signature_of(name: str, stage: str, compiled: CompiledFlow) -> tuple:
    key = (name, stage, compiled.page_size, compiled.head_dim, compiled.group)
    if key not in _library_signatures:
        other = load_flow(name).compiled(compiled.page_size, compiled.head_dim, compiled.group)
        _library_signatures[key] = graph_signature(_stage_graph(other, stage))
    return _library_signatures[key]


def matching_lowering(flow: Flow, compiled: CompiledFlow, stage: str,
                      device: Union[str, torch.device]) -> Optional[Callable]:
    """The lowering registered for `flow` itself, else the one of a flow whose `stage` graph has
    the same structure (traced at the same page_size, head_dim and group), else None."""
    if flow.name is not None:
        fn = find_lowering(flow.name, stage, device)
        if fn is not None:
            return fn
    mine = graph_signature(_stage_graph(compiled, stage))
    for name in registered_names(stage, device):
        if name == flow.name:
            continue
        try:
            theirs = _signature_of(name, stage, compiled)
        except ValueError:          # lowered under a name that is no registered flow
            continue
        if theirs == mine:
            log.debug("%s.%s matches %s: using its lowering", flow.name, stage, name)
            return find_lowering(name, stage, device)
    return None
