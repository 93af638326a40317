"""The vFlow IR: a flow stage traced into a list of nodes over logical shapes.

A node is one op: `%3 = mul(%0, %2) : (pages, 4, 64) float  # quest.py:41`. Shapes are logical
(what flow code sees), with the symbolic `PAGES` axis standing for the request's pages; the batch,
KV-head and physical-page axes are added by the interpreter and never appear here.

Node ops and attributes (inputs in order):
    input      name ("q", "keys", "summary:NAME")        const      value (a CPU tensor)
    fill       shape, value                              page_index (pages as floats 0, 1, ...)
    add sub mul div maximum minimum gt ge lt le (a, b)   where      (cond, a, b)
    neg abs exp relu sqrt (x)                            sum mean max min norm (x) dims, keepdim
    matmul (a, b)                                        transpose  (x) dims
    take (x) dim, index                                  softmax    (x) dim, scale
    normalize (x) dim                                    topk       (score)
    union (selection, ...) shares
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from .errors import FlowError, flow_error


class _Pages:
    """The symbolic page axis of paged tensors (its length differs per request)."""

    _instance: Optional["_Pages"] = None

    def __new__(cls) -> "_Pages":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "pages"

    def __reduce__(self):
        return (_Pages, ())


PAGES = _Pages()
"""The page axis in a logical shape, e.g. a summary's shape `(PAGES, r, c)`."""

FLOAT, BOOL, SELECTION = "float", "bool", "selection"


def format_shape(shape: tuple) -> str:
    return "(" + ", ".join(repr(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


@dataclass
class Node:
    id: int
    op: str
    inputs: tuple[int, ...]
    attrs: dict[str, Any]
    shape: tuple
    dtype: str
    where: str

    def __str__(self) -> str:
        args = ", ".join(f"%{i}" for i in self.inputs)
        attrs = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items()
                          if k != "value" or not hasattr(v, "shape"))
        both = ", ".join(s for s in (args, attrs) if s)
        return f"%{self.id} = {self.op}({both}) : {format_shape(self.shape)} {self.dtype}  # {self.where}"


@dataclass
class Graph:
    """One traced stage of one flow: nodes in execution order plus named inputs and outputs.

    `outputs` maps a summary name to its node (cache stage) or "selection" to the final node
    (indexer stage).
    """

    flow: str
    stage: str
    nodes: list[Node] = field(default_factory=list)
    inputs: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)

    @property
    def context(self) -> str:
        return f"{self.flow}.forward_{self.stage}"

    def add(self, op: str, inputs: tuple[int, ...], attrs: dict[str, Any], shape: tuple,
            dtype: str, where: str) -> Node:
        node = Node(len(self.nodes), op, tuple(inputs), dict(attrs), tuple(shape), dtype, where)
        self.nodes.append(node)
        return node

    def error(self, op: str, problem: str, where: Optional[str] = None) -> FlowError:
        return flow_error(self.context, op, problem, where)

    def __str__(self) -> str:
        head = f"graph {self.context}  inputs={self.inputs}  outputs={self.outputs}"
        return "\n".join([head] + ["  " + str(n) for n in self.nodes])


_active: list[Graph] = []


@contextlib.contextmanager
def tracing(graph: Graph) -> Iterator[Graph]:
    """Make `graph` the one that ops record into while a flow method runs."""
    _active.append(graph)
    try:
        yield graph
    finally:
        _active.pop()


def active_graph(op: str) -> Graph:
    if not _active:
        raise flow_error("vflow", op, "vflow ops only run while a flow is traced (inside "
                         "forward_cache / forward_indexer); call vflow.compile_flow or select_pages")
    return _active[-1]
