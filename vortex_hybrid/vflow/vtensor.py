"""vTensor: the page-centric tensor that flow code handles while it is traced.

Flow code sees logical shapes for one (request, KV head) at a time:
    forward_cache:   keys        (page_size, D)       one full page of one KV head
    forward_indexer: q           (G, D)               the G query heads that read this KV head
                     cache[name] (pages, r, c)        the summary `name` of every page
                     cache["k"]  (pages, page_size, D) every page's keys (the partial tail masked)
A vTensor records ops into the IR graph instead of computing; the interpreter later runs the graph
over the whole batch. `format` says how the interpreter lays the value out:
    "batched"  the query: one row per request and KV head
    "paged"    one row per logical page of a request, gathered through the page table; requests
               hold different page counts, so it is ragged, and masked past each request's end
    "page"     the tokens of one full page (cache stage)
    "const"    a constant
Page tables, batching, GQA grouping and padding stay out of sight: padded pages and tokens past
`seq_len` are masked and never reach a reduction.

Using a torch function on a vTensor, branching on its value or indexing it raises `FlowError` with
the line of the flow that did it.
"""

from __future__ import annotations

from typing import Any

from .graph import Graph, Node, format_shape

FORMATS = ("batched", "paged", "page", "const")


class VTensor:
    """A traced tensor: a node of a graph, its logical shape and dtype ("float" or "bool")."""

    __slots__ = ("graph", "node", "format")

    def __init__(self, graph: Graph, node: Node, format: str) -> None:
        self.graph, self.node, self.format = graph, node, format

    @property
    def shape(self) -> tuple:
        """Logical shape; the page axis is `vflow.PAGES`."""
        return self.node.shape

    @property
    def dtype(self) -> str:
        return self.node.dtype

    @property
    def ndim(self) -> int:
        return len(self.node.shape)

    def __repr__(self) -> str:
        return f"vTensor(%{self.node.id}, {format_shape(self.shape)}, {self.dtype}, {self.format})"

    # ---- ops as methods and operators (all defined in ops.py) -----------------------------------
    def sum(self, dim=None, keepdim: bool = False) -> "VTensor":
        from . import ops
        return ops.sum(self, dim, keepdim)

    def mean(self, dim=None, keepdim: bool = False) -> "VTensor":
        from . import ops
        return ops.mean(self, dim, keepdim)

    def max(self, dim=None, keepdim: bool = False) -> "VTensor":
        from . import ops
        return ops.max(self, dim, keepdim)

    def min(self, dim=None, keepdim: bool = False) -> "VTensor":
        from . import ops
        return ops.min(self, dim, keepdim)

    def norm(self, dim=None, keepdim: bool = False) -> "VTensor":
        from . import ops
        return ops.norm(self, dim, keepdim)

    def abs(self) -> "VTensor":
        from . import ops
        return ops.abs(self)

    def exp(self) -> "VTensor":
        from . import ops
        return ops.exp(self)

    def relu(self) -> "VTensor":
        from . import ops
        return ops.relu(self)

    def transpose(self, dim0: int, dim1: int) -> "VTensor":
        from . import ops
        return ops.transpose(self, dim0, dim1)

    def _binary(self, name: str, other: Any, reflected: bool = False) -> "VTensor":
        from . import ops
        fn = getattr(ops, name)
        return fn(other, self) if reflected else fn(self, other)

    def __add__(self, o): return self._binary("add", o)
    def __radd__(self, o): return self._binary("add", o, True)
    def __sub__(self, o): return self._binary("sub", o)
    def __rsub__(self, o): return self._binary("sub", o, True)
    def __mul__(self, o): return self._binary("mul", o)
    def __rmul__(self, o): return self._binary("mul", o, True)
    def __truediv__(self, o): return self._binary("div", o)
    def __rtruediv__(self, o): return self._binary("div", o, True)
    def __matmul__(self, o): return self._binary("matmul", o)
    def __rmatmul__(self, o): return self._binary("matmul", o, True)
    def __gt__(self, o): return self._binary("gt", o)
    def __ge__(self, o): return self._binary("ge", o)
    def __lt__(self, o): return self._binary("lt", o)
    def __le__(self, o): return self._binary("le", o)

    def __neg__(self):
        from . import ops
        return ops.neg(self)

    def __abs__(self):
        return self.abs()

    # ---- what a traced tensor cannot do ---------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        graph = next((a.graph for a in _flatten(args, kwargs) if isinstance(a, VTensor)), None)
        name = f"torch.{getattr(func, '__name__', func)}"
        problem = ("a native torch op applied to a vflow tensor; flows are traced, not run: use "
                   "the vflow op of the same meaning (vortex_hybrid.vflow.ops, or a vTensor method)")
        if graph is None:
            from .errors import flow_error
            raise flow_error("vflow", name, problem)
        raise graph.error(name, problem)

    def _no(self, what: str, fix: str):
        raise self.graph.error(what, f"not possible on a traced vflow tensor {format_shape(self.shape)}; "
                               + fix)

    def __bool__(self):
        self._no("bool()", "values are unknown while tracing: use ops.where(cond, a, b) instead of "
                 "`if`/`and`/`or` on tensors")

    def __len__(self):
        self._no("len()", "use .shape")

    def __iter__(self):
        self._no("iter()", "loops over tensor values are not traceable; use reductions")

    def __getitem__(self, item):
        self._no("indexing", "use ops.take(x, index, dim) to pick channels or rows")

    def __float__(self):
        self._no("float()", "values are unknown while tracing")

    def __index__(self):
        self._no("int()", "values are unknown while tracing")

    def __array__(self, *args, **kwargs):
        self._no("numpy", "numpy cannot run on traced tensors; use vflow ops")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise self.graph.error(f".{name}", f"vTensor has no method {name!r}; see vortex_hybrid.vflow.ops "
                               "for the ops a flow can use")


class Selection:
    """The indexer's output: pages chosen by `ops.topk` or combined by `ops.union`."""

    __slots__ = ("graph", "node")

    def __init__(self, graph: Graph, node: Node) -> None:
        self.graph, self.node = graph, node

    def __repr__(self) -> str:
        return f"Selection(%{self.node.id} {self.node.op})"

    def __bool__(self):
        raise self.graph.error("bool()", "a selection has no truth value")


def _flatten(args, kwargs):
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, (list, tuple)):
            yield from _flatten(a, None)
        else:
            yield a


__all__ = ["VTensor", "Selection", "FORMATS"]
