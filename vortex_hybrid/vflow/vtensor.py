"""vTensor: the page-centric tensor that flow code handles while it is traced.

Flow code sees logical shapes for one (request, KV head) at a time:
    forward_cache:   keys        (page_size, D)       one full page of one KV head
    forward_indexer: q           (G, D)               the G query heads that read this KV head
                     cache[name] (pages, r, c)        the summary `name` of every page
                     cache["k"]  (pages, page_size, D) every page's keys (the partial tail masked)
A vTensor records ops into the IR graph instead of computing; the interpreter later runs the graph
over the whole batch (its docstring says how it lays the values out). Page tables, batching, GQA
grouping and padding stay out of sight: padded pages and tokens past `seq_len` are masked and never
reach a reduction.

The ops a vTensor offers as methods and operators (`x.sum(0)`, `a * b`, `q @ k`, `-x`) are the
functions of `ops`, which attaches them to the class when it is imported (as torch.fx attaches
Proxy's operators), so this module does not import `ops`. Using a torch function on a vTensor,
branching on its value or indexing it raises `FlowError` with the line of the flow that did it.
"""

from __future__ import annotations

from .errors import flow_error
from .graph import Graph, Node, format_shape


class VTensor:
    """A traced tensor: a node of a graph, its logical shape and dtype ("float" or "bool")."""

    __slots__ = ("graph", "node")

    def __init__(self, graph: Graph, node: Node) -> None:
        self.graph, self.node = graph, node

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
        return f"vTensor(%{self.node.id}, {format_shape(self.shape)}, {self.dtype})"

    # sum mean max min norm abs exp relu transpose, + - * / @ (and reflected), > >= < <=, -x and
    # abs(x) are attached here by `ops` (see the end of ops.py).

    # ---- what a traced tensor cannot do ---------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        graph = next((a.graph for a in _flatten(args, kwargs) if isinstance(a, VTensor)), None)
        name = f"torch.{getattr(func, '__name__', func)}"
        problem = ("a native torch op applied to a vflow tensor; flows are traced, not run: use "
                   "the vflow op of the same meaning (vortex_hybrid.vflow.ops, or a vTensor method)")
        if graph is None:
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


__all__ = ["VTensor", "Selection"]
