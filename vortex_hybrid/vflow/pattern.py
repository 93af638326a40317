"""Graph structure of a traced flow stage: what the lowering hook compares.

Structure = the ops in order, their wiring, attributes, logical shapes and dtypes, the stage's
named inputs and outputs (summary names included) and which summaries are packed codes of how many
bits (a kernel reads and writes the store's layout); source locations and the flow's name are left
out. Two flows whose stage graphs have equal signatures compute the same function, so one kernel
serves both; a flow that differs in any op, attribute or summary name gets a different signature.
"""

from __future__ import annotations

from typing import Any

import torch

from .compiler import CompiledFlow
from .graph import Graph


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


def stage_signature(compiled: CompiledFlow, stage: str) -> tuple:
    """The structure `lowering` compares: `graph_signature` of the stage graph and the flow's coded
    summaries (name -> bits)."""
    return graph_signature(stage_graph(compiled, stage)), tuple(sorted(compiled.codes.items()))


def stage_graph(compiled: CompiledFlow, stage: str) -> Graph:
    """The traced graph of `stage` ("cache" or "indexer")."""
    return compiled.cache_graph if stage == "cache" else compiled.indexer_graph
