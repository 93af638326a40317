"""Trace a flow into IR graphs and check it: `compile_flow(flow, page_size, head_dim, group)`, or
`flow.compiled(page_size, head_dim, group)`, the same cached per shape on the flow object (this
module attaches that method to `Flow`, so `flow` does not import the compiler).

Checks, each a `FlowError` naming the op and the flow's line: page size a power of two, summary
declarations well formed (`Codes` with bits 1-8), every declared summary written once with its
declared shape, no undeclared summary read, shapes and dtypes of every op (in `ops`), no torch op on
a traced tensor (in `vtensor`), and an indexer that ends in `ops.topk` / `ops.union`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..contracts import MAX_PAGE_SIZE
from ..packed_codes import CODE_DTYPE, MAX_CODE_BITS, packed_width
from . import ops  # noqa: F401  (attaches the vTensor methods and operators that flows call)
from .errors import FlowError, definition_location, flow_error, user_location
from .flow import Codes, Flow
from .graph import FLOAT, PAGES, Graph, format_shape, tracing
from .vtensor import Selection, VTensor

_LOCK = threading.RLock()           # tracing records into one active graph at a time

KEYS = "k"
"""Reserved summary name: in forward_indexer, cache["k"] is every page's keys (pages, page_size, D)."""


@dataclass(frozen=True)
class CompiledFlow:
    """A flow traced for one (page_size, head_dim, group): its summaries (logical shapes, as the
    flow computes and reads them), which of them are packed integer codes, and two graphs."""

    name: Optional[str]
    page_size: int
    head_dim: int
    group: int
    summaries: dict[str, tuple[int, int]]
    cache_graph: Graph
    indexer_graph: Graph
    codes: dict[str, int] = field(default_factory=dict)
    """Coded summaries (declared `Codes`): name -> bits a value, stored packed."""

    def stored(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
        """How a store keeps each summary when its float summaries are `dtype` (`stored_layout`)."""
        return stored_layout(self.summaries, self.codes, dtype)

    def __str__(self) -> str:
        return f"{self.cache_graph}\n{self.indexer_graph}"


def stored_layout(summaries: dict[str, tuple[int, int]], codes: dict[str, int],
                  dtype: torch.dtype) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
    """name -> ((r, width), storage dtype) per page and KV head: (r, c) in `dtype` (float
    summaries), or (r, packed_width(c, bits)) bytes of `packed_codes.CODE_DTYPE` for the ones
    named in `codes` (name -> bits)."""
    return {name: ((r, c), dtype) if name not in codes else
            ((r, packed_width(c, codes[name])), CODE_DTYPE)
            for name, (r, c) in summaries.items()}


class _CacheWriter:
    """`cache` in forward_cache: assign each declared summary once, read back what was written."""

    def __init__(self, graph: Graph, declared: dict[str, tuple[int, int]]) -> None:
        self._graph, self._declared, self._written = graph, declared, {}

    def _check_name(self, op: str, name: Any) -> None:
        if name not in self._declared:
            raise self._graph.error(op, f"summary {name!r} is not declared in create_cache "
                                    f"(declared: {sorted(self._declared)}); add it there")

    def __setitem__(self, name: str, value: Any) -> None:
        op = f"cache[{name!r}] ="
        self._check_name(op, name)
        if not isinstance(value, VTensor):
            raise self._graph.error(op, f"assigned a {type(value).__name__}; assign a vflow tensor "
                                    "computed from `keys` with vflow ops")
        if value.graph is not self._graph:
            raise self._graph.error(op, "the value was traced in another stage")
        if value.dtype != FLOAT:
            raise self._graph.error(op, f"value has dtype {value.dtype}; summaries are float")
        want = tuple(self._declared[name])
        if value.shape != want:
            raise self._graph.error(op, f"shape mismatch: value has shape {format_shape(value.shape)} "
                                    f"but create_cache declares {format_shape(want)} (use "
                                    "keepdim=True in reductions to keep the row axis)")
        if name in self._written:
            raise self._graph.error(op, f"summary {name!r} is written twice")
        self._written[name] = value
        self._graph.outputs[name] = value.node.id

    def __getitem__(self, name: str) -> VTensor:
        self._check_name(f"cache[{name!r}]", name)
        if name not in self._written:
            raise self._graph.error(f"cache[{name!r}]", f"summary {name!r} is read before it is "
                                    "written; forward_cache computes summaries from `keys`")
        return self._written[name]


class _CacheReader:
    """`cache` in forward_indexer: every page's summaries, (pages, r, c), and keys as cache["k"]."""

    def __init__(self, graph: Graph, declared: dict[str, tuple[int, int]], page_size: int,
                 head_dim: int) -> None:
        self._graph, self._declared = graph, declared
        self._page_size, self._head_dim = page_size, head_dim
        self._read: dict[str, VTensor] = {}

    def __getitem__(self, name: str) -> VTensor:
        if name in self._read:
            return self._read[name]
        if name == KEYS:
            shape, key = (PAGES, self._page_size, self._head_dim), KEYS
        elif name in self._declared:
            shape, key = (PAGES,) + tuple(self._declared[name]), f"summary:{name}"
        else:
            raise self._graph.error(f"cache[{name!r}]", f"summary {name!r} is used but never "
                                    f"declared in create_cache (declared: {sorted(self._declared)}; "
                                    f"cache[{KEYS!r}] gives the page keys)")
        node = self._graph.add("input", (), {"name": key}, shape, FLOAT, user_location())
        self._graph.inputs[key] = node.id
        self._read[name] = VTensor(self._graph, node)
        return self._read[name]

    def __setitem__(self, name: str, value: Any) -> None:
        raise self._graph.error(f"cache[{name!r}] =", "forward_indexer cannot write summaries; "
                                "write them in forward_cache")


def _declarations(flow: Flow, page_size: int, head_dim: int
                  ) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """(name -> (r, c), name -> bits of the coded ones) from `create_cache`, checked."""
    where = definition_location(type(flow).create_cache)
    ctx = f"{flow.name or type(flow).__name__}.create_cache"
    decl = flow.create_cache(page_size, head_dim)
    if not isinstance(decl, dict):
        raise flow_error(ctx, "return", f"returned {type(decl).__name__}; return a dict "
                         "{name: (r, c)}", where)
    out, codes = {}, {}
    for name, shape in decl.items():
        if not isinstance(name, str) or not name.isidentifier() or name == KEYS:
            raise flow_error(ctx, "return", f"summary name {name!r} must be a Python identifier "
                             f"other than {KEYS!r} (reserved for the page keys)", where)
        if isinstance(shape, Codes):
            bits = shape.bits
            if isinstance(bits, bool) or not isinstance(bits, int) or \
                    not 1 <= bits <= MAX_CODE_BITS:
                raise flow_error(ctx, "return", f"summary {name!r} declares Codes with bits="
                                 f"{bits!r}; expected an int in [1, {MAX_CODE_BITS}]", where)
            codes[name] = bits
            shape = (shape.r, shape.c)
        ok = isinstance(shape, (tuple, list)) and len(shape) == 2 and all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        if not ok:
            raise flow_error(ctx, "return", f"summary {name!r} has shape {shape!r}; expected two "
                             "positive ints (r, c), e.g. (1, head_dim), or Codes(r, c, bits)",
                             where)
        out[name] = (int(shape[0]), int(shape[1]))
    return out, codes


def compile_flow(flow: Flow, page_size: int, head_dim: int, group: int = 1) -> CompiledFlow:
    """Trace and check `flow` for pages of `page_size` tokens, `head_dim`, and `group` query heads
    per KV head. Raises `FlowError` (a `ValueError`) on any problem. Thread-safe."""
    with _LOCK:
        return _compile(flow, page_size, head_dim, group)


def _compile(flow: Flow, page_size: int, head_dim: int, group: int) -> CompiledFlow:
    if not isinstance(flow, Flow):
        raise FlowError(f"compile_flow: {flow!r} is not a vortex_hybrid.vflow.Flow")
    name = flow.name or type(flow).__name__
    for arg, value, lo, hi in (("page_size", page_size, 1, MAX_PAGE_SIZE),
                               ("head_dim", head_dim, 1, 1 << 16), ("group", group, 1, 1 << 16)):
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise flow_error(name, "compile", f"{arg}={value!r} must be an int in [{lo}, {hi}]",
                             definition_location(type(flow)))
    if page_size & (page_size - 1):
        raise flow_error(name, "compile", f"page_size={page_size} is not a power of two; pages hold "
                         f"1, 2, 4, ... {MAX_PAGE_SIZE} tokens", definition_location(type(flow)))
    declared, codes = _declarations(flow, page_size, head_dim)

    cache_graph = Graph(name, "cache")
    with tracing(cache_graph):
        node = cache_graph.add("input", (), {"name": "keys"}, (page_size, head_dim), FLOAT,
                               definition_location(type(flow).forward_cache))
        cache_graph.inputs["keys"] = node.id
        writer = _CacheWriter(cache_graph, declared)
        flow.forward_cache(VTensor(cache_graph, node), writer)
    missing = sorted(set(declared) - set(cache_graph.outputs))
    if missing:
        raise flow_error(cache_graph.context, "cache[...] =", f"summaries {missing} are declared in "
                         "create_cache but never written by forward_cache",
                         definition_location(type(flow).forward_cache))

    indexer_graph = Graph(name, "indexer")
    with tracing(indexer_graph):
        node = indexer_graph.add("input", (), {"name": "q"}, (group, head_dim), FLOAT,
                                 definition_location(type(flow).forward_indexer))
        indexer_graph.inputs["q"] = node.id
        reader = _CacheReader(indexer_graph, declared, page_size, head_dim)
        try:
            out = flow.forward_indexer(VTensor(indexer_graph, node), reader)
        except NotImplementedError:
            raise flow_error(indexer_graph.context, "forward_indexer", "the flow does not define "
                             "forward_indexer", definition_location(type(flow))) from None
    if not isinstance(out, Selection) or out.graph is not indexer_graph:
        raise flow_error(indexer_graph.context, "return", f"forward_indexer returned {out!r}; it must "
                         "end in `return ops.topk(score)` (or ops.union of topk selections)",
                         definition_location(type(flow).forward_indexer))
    indexer_graph.outputs["selection"] = out.node.id
    return CompiledFlow(flow.name, page_size, head_dim, group, declared, cache_graph, indexer_graph,
                        codes)


def _compiled(self: Flow, page_size: int, head_dim: int, group: int) -> CompiledFlow:
    """The traced and checked flow for these shapes (traced once, then cached on the object)."""
    cache = self.__dict__.setdefault("_compiled", {})
    key = (page_size, head_dim, group)
    if key not in cache:
        cache[key] = compile_flow(self, page_size, head_dim, group)
    return cache[key]


# Declared in flow.py, defined here: the compiler imports `Flow`, and `flow` imports nothing back.
_compiled.__name__, _compiled.__qualname__ = "compiled", "Flow.compiled"
Flow.compiled = _compiled
