"""vFlow ops: what flow code may compute. Each call records a node and checks shapes and dtypes.

Shapes are logical (see `vtensor`); `PAGES` is the page axis. Elementwise ops broadcast like numpy
(sizes match or one is 1, aligned from the right). A bad call raises `FlowError` naming the op and
the flow's line. Importing this module also attaches the common ops to `VTensor` as methods and
operators (`x.sum(0)`, `a * b`, `q @ k`, `x > 0`, `-x`, `abs(x)`).

Both stages
    add sub mul div maximum minimum (a, b)       gt ge lt le (a, b) -> bool     where(cond, a, b)
    neg abs exp relu sqrt (x)                    sum mean max min norm (x, dim=None, keepdim=False)
    matmul(a, b)  [..., M, K] @ [..., K, N]      gemm(x, y) = y @ x^T: [M, K], [..., N, K] -> [..., N, M]
    gemv(v, y)    [K], [..., N, K] -> [..., N]   transpose(x, d0, d1)
    take(x, index, dim)  pick channels/rows by a constant index list (a projection onto a subset)
    fill(shape, value)   a constant-filled tensor  constant(tensor)  a fixed tensor (e.g. a projection)
Indexer only
    softmax(x, dim=0, scale=1.0), normalize(x, dim=0)  over pages (masked to the request's pages)
    page_index()         (pages,) the page numbers 0, 1, ... as floats
    topk(score)          the output: score (pages,) (other axes of size 1) -> a Selection
    union(*selections, shares=None)  split the free budget between selections (equal by default)
Reductions over the page's tokens (cache stage) are the same reductions over dim 0 of `keys`.
"""

from __future__ import annotations

import builtins
import numbers
from typing import Any, Optional, Sequence, Union

import torch

from .graph import BOOL, FLOAT, PAGES, SELECTION, Graph, active_graph, format_shape
from .errors import user_location
from .vtensor import Selection, VTensor

Dim = Union[int, Sequence[int], None]


# ---- helpers --------------------------------------------------------------------------------------
def _graph(op: str, *args: Any) -> Graph:
    g = active_graph(op)
    for a in args:
        if isinstance(a, (VTensor, Selection)) and a.graph is not g:
            raise g.error(op, f"a tensor traced in {a.graph.context} is used in {g.context}; tensors "
                          "do not carry over between stages or compilations: store what the indexer "
                          "needs as a summary in forward_cache and read it from `cache`")
    return g


def _new(g: Graph, op: str, inputs: Sequence[VTensor], attrs: dict, shape: tuple,
         dtype: str = FLOAT) -> VTensor:
    node = g.add(op, tuple(x.node.id for x in inputs), attrs, shape, dtype, user_location())
    return VTensor(g, node)


def _operand(g: Graph, op: str, x: Any) -> VTensor:
    if isinstance(x, VTensor):
        return x
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return _new(g, "const", (), {"value": torch.tensor(float(x), dtype=torch.float64)}, ())
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
            raise g.error(op, f"constant tensor has dtype {x.dtype}; use a float tensor")
        value = x.detach().to("cpu", torch.float64).clone()
        return _new(g, "const", (), {"value": value}, tuple(value.shape))
    raise g.error(op, f"operand {x!r} of type {type(x).__name__} is not a vflow tensor, a number or "
                  "a torch.Tensor constant")


def _need_float(g: Graph, op: str, *xs: VTensor) -> None:
    for x in xs:
        if x.dtype != FLOAT:
            raise g.error(op, f"operand {format_shape(x.shape)} has dtype {x.dtype} (a comparison "
                          "result); arithmetic needs float: turn it into numbers with "
                          "ops.where(cond, 1.0, 0.0)")


def _broadcast(g: Graph, op: str, *shapes: tuple) -> tuple:
    rank = builtins.max(len(s) for s in shapes)
    out = []
    for i in range(1, rank + 1):
        sizes = {s[-i] for s in shapes if i <= len(s)} - {1}
        if len(sizes) > 1:
            shown = " and ".join(format_shape(s) for s in shapes)
            raise g.error(op, f"shape mismatch: {shown} do not broadcast (dim -{i}: "
                          f"{' vs '.join(repr(s[-i]) for s in shapes if i <= len(s))})")
        out.append(sizes.pop() if sizes else 1)
    return tuple(reversed(out))


def _norm_dim(g: Graph, op: str, d: Any, rank: int) -> int:
    if not isinstance(d, int) or isinstance(d, bool) or not -rank <= d < rank:
        raise g.error(op, f"dim={d!r} is out of range for a tensor of rank {rank} "
                      f"(valid: {-rank}..{rank - 1})" if rank else f"dim={d!r}: the tensor is a scalar")
    return d % rank


def _norm_dims(g: Graph, op: str, dim: Dim, rank: int) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(rank))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = tuple(sorted({_norm_dim(g, op, d, rank) for d in dims}))
    if len(out) != len(dims):
        raise g.error(op, f"dim={dim!r} names an axis twice")
    return out


# ---- elementwise ----------------------------------------------------------------------------------
def _binary(op: str, a: Any, b: Any, dtype: str = FLOAT) -> VTensor:
    g = _graph(op, a, b)
    x, y = _operand(g, op, a), _operand(g, op, b)
    _need_float(g, op, x, y)
    return _new(g, op, (x, y), {}, _broadcast(g, op, x.shape, y.shape), dtype)


def add(a, b) -> VTensor: return _binary("add", a, b)
def sub(a, b) -> VTensor: return _binary("sub", a, b)
def mul(a, b) -> VTensor: return _binary("mul", a, b)
def div(a, b) -> VTensor: return _binary("div", a, b)
def maximum(a, b) -> VTensor: return _binary("maximum", a, b)
def minimum(a, b) -> VTensor: return _binary("minimum", a, b)
def gt(a, b) -> VTensor: return _binary("gt", a, b, BOOL)
def ge(a, b) -> VTensor: return _binary("ge", a, b, BOOL)
def lt(a, b) -> VTensor: return _binary("lt", a, b, BOOL)
def le(a, b) -> VTensor: return _binary("le", a, b, BOOL)


def where(cond: VTensor, a: Any, b: Any) -> VTensor:
    """`a` where `cond` holds, else `b` (cond from a comparison; a and b floats or numbers)."""
    g = _graph("where", cond, a, b)
    c, x, y = (_operand(g, "where", v) for v in (cond, a, b))
    if c.dtype != BOOL:
        raise g.error("where", f"cond {format_shape(c.shape)} has dtype {c.dtype}; it must be a "
                      "comparison result such as ops.gt(x, 0)")
    _need_float(g, "where", x, y)
    return _new(g, "where", (c, x, y), {}, _broadcast(g, "where", c.shape, x.shape, y.shape))


def _unary(op: str, x: Any) -> VTensor:
    g = _graph(op, x)
    v = _operand(g, op, x)
    _need_float(g, op, v)
    return _new(g, op, (v,), {}, v.shape)


def neg(x) -> VTensor: return _unary("neg", x)
def abs(x) -> VTensor: return _unary("abs", x)      # noqa: A001 - the vflow op of that name
def exp(x) -> VTensor: return _unary("exp", x)
def relu(x) -> VTensor: return _unary("relu", x)
def sqrt(x) -> VTensor: return _unary("sqrt", x)


# ---- reductions -----------------------------------------------------------------------------------
def _reduce(op: str, x: Any, dim: Dim, keepdim: bool) -> VTensor:
    g = _graph(op, x)
    v = _operand(g, op, x)
    _need_float(g, op, v)
    dims = _norm_dims(g, op, dim, len(v.shape))
    if not dims:
        raise g.error(op, f"dim={dim!r} names no axis of a tensor of shape {format_shape(v.shape)}")
    shape = tuple(1 if i in dims else s for i, s in enumerate(v.shape)) if keepdim else \
        tuple(s for i, s in enumerate(v.shape) if i not in dims)
    return _new(g, op, (v,), {"dims": dims, "keepdim": bool(keepdim)}, shape)


def sum(x, dim: Dim = None, keepdim: bool = False) -> VTensor:    # noqa: A001
    """Sum over `dim` (all axes when None); masked tokens/pages do not count."""
    return _reduce("sum", x, dim, keepdim)


def mean(x, dim: Dim = None, keepdim: bool = False) -> VTensor:
    """Mean over `dim` of the valid entries."""
    return _reduce("mean", x, dim, keepdim)


def max(x, dim: Dim = None, keepdim: bool = False) -> VTensor:    # noqa: A001
    """Maximum over `dim` of the valid entries."""
    return _reduce("max", x, dim, keepdim)


def min(x, dim: Dim = None, keepdim: bool = False) -> VTensor:    # noqa: A001
    """Minimum over `dim` of the valid entries."""
    return _reduce("min", x, dim, keepdim)


def norm(x, dim: Dim = None, keepdim: bool = False) -> VTensor:
    """L2 norm over `dim` of the valid entries."""
    return _reduce("norm", x, dim, keepdim)


# ---- products and layout --------------------------------------------------------------------------
def matmul(a: Any, b: Any) -> VTensor:
    """[..., M, K] @ [..., K, N] -> [..., M, N]; leading axes broadcast; both ranks >= 2."""
    g = _graph("matmul", a, b)
    x, y = _operand(g, "matmul", a), _operand(g, "matmul", b)
    _need_float(g, "matmul", x, y)
    if len(x.shape) < 2 or len(y.shape) < 2:
        raise g.error("matmul", f"operands {format_shape(x.shape)} and {format_shape(y.shape)} need "
                      "rank >= 2 (use gemv for a vector)")
    if x.shape[-1] != y.shape[-2]:
        raise g.error("matmul", f"shape mismatch: {format_shape(x.shape)} @ {format_shape(y.shape)}: "
                      f"inner sizes {x.shape[-1]!r} and {y.shape[-2]!r} differ")
    batch = _broadcast(g, "matmul", x.shape[:-2], y.shape[:-2])
    return _new(g, "matmul", (x, y), {}, batch + (x.shape[-2], y.shape[-1]))


def transpose(x: Any, dim0: int, dim1: int) -> VTensor:
    g = _graph("transpose", x)
    v = _operand(g, "transpose", x)
    r = len(v.shape)
    d0, d1 = _norm_dim(g, "transpose", dim0, r), _norm_dim(g, "transpose", dim1, r)
    shape = list(v.shape)
    shape[d0], shape[d1] = shape[d1], shape[d0]
    return _new(g, "transpose", (v,), {"dims": (d0, d1)}, tuple(shape), v.dtype)


def gemm(x: Any, y: Any) -> VTensor:
    """Score every row of `x` [M, K] against every row of `y` [..., N, K]: y @ x^T -> [..., N, M].

    With q (G, D) and a summary (pages, r, D): (pages, r, G), one dot product per query head.
    """
    g = _graph("gemm", x, y)
    a, b = _operand(g, "gemm", x), _operand(g, "gemm", y)
    if len(a.shape) != 2 or len(b.shape) < 2 or a.shape[-1] != b.shape[-1]:
        raise g.error("gemm", f"shape mismatch: x {format_shape(a.shape)} must be [M, K] and y "
                      f"{format_shape(b.shape)} [..., N, K] with the same K")
    return matmul(b, transpose(a, -1, -2))


def gemv(v: Any, y: Any) -> VTensor:
    """Dot product of the vector `v` [K] with every row of `y` [..., N, K] -> [..., N]."""
    g = _graph("gemv", v, y)
    vec = _operand(g, "gemv", v)
    if len(vec.shape) != 1:
        raise g.error("gemv", f"v has shape {format_shape(vec.shape)}; expected a vector [K] (reduce "
                      "the query heads first, e.g. q.sum(0))")
    return sum(mul(y, vec), -1)


def take(x: Any, index: Sequence[int], dim: int = -1) -> VTensor:
    """Entries `index` (a constant list of ints) along `dim`: a projection onto a channel subset."""
    g = _graph("take", x)
    v = _operand(g, "take", x)
    d = _norm_dim(g, "take", dim, len(v.shape))
    size = v.shape[d]
    if size is PAGES:
        raise g.error("take", "cannot pick pages by index; the page axis is chosen by topk")
    if isinstance(index, torch.Tensor):
        index = index.tolist()
    if not isinstance(index, (list, tuple, range)) or not index or \
            not builtins.all(isinstance(i, int) and not isinstance(i, bool) for i in index):
        raise g.error("take", f"index={index!r} must be a non-empty list of ints")
    bad = [i for i in index if not 0 <= i < size]
    if bad:
        raise g.error("take", f"index {bad} out of range for dim {d} of size {size}")
    shape = v.shape[:d] + (len(index),) + v.shape[d + 1:]
    return _new(g, "take", (v,), {"dim": d, "index": tuple(index)}, shape, v.dtype)


def fill(shape: Sequence[int], value: float) -> VTensor:
    """A tensor of logical `shape` (positive ints) filled with `value`."""
    g = _graph("fill")
    shape = tuple(shape)
    if not builtins.all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise g.error("fill", f"shape={shape!r} must be positive ints")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise g.error("fill", f"value={value!r} must be a number")
    return _new(g, "fill", (), {"shape": shape, "value": float(value)}, shape)


def constant(t: torch.Tensor) -> VTensor:
    """A fixed tensor (e.g. a projection matrix) as a vflow tensor of its own shape."""
    g = _graph("constant")
    if not isinstance(t, torch.Tensor):
        raise g.error("constant", f"expected a torch.Tensor, got {type(t).__name__}")
    return _operand(g, "constant", t)


# ---- indexer only ---------------------------------------------------------------------------------
def _indexer_graph(op: str, *args: Any) -> Graph:
    g = _graph(op, *args)
    if g.stage != "indexer":
        raise g.error(op, "only forward_indexer can use this op")
    return g


def _over_pages(op: str, x: Any, dim: int, attrs: dict) -> VTensor:
    g = _indexer_graph(op, x)
    v = _operand(g, op, x)
    _need_float(g, op, v)
    d = _norm_dim(g, op, dim, len(v.shape))
    return _new(g, op, (v,), {"dim": d, **attrs}, v.shape)


def softmax(x: Any, dim: int = 0, scale: float = 1.0) -> VTensor:
    """softmax(scale * x) along `dim` (the page axis by default), over the request's pages."""
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise _indexer_graph("softmax").error("softmax", f"scale={scale!r} must be a number")
    return _over_pages("softmax", x, dim, {"scale": float(scale)})


def normalize(x: Any, dim: int = 0) -> VTensor:
    """x / ||x||_2 along `dim` (the page axis by default), over the request's pages."""
    return _over_pages("normalize", x, dim, {})


def page_index() -> VTensor:
    """(pages,): each page's number 0, 1, 2, ... as a float (later pages score higher)."""
    g = _indexer_graph("page_index")
    return _new(g, "page_index", (), {}, (PAGES,))


def topk(score: VTensor) -> Selection:
    """The indexer's output: keep the best-scoring pages of `score` (pages,) under the budget.

    The runtime adds the sink and recent pages and fills the rest of the budget with the highest
    scores (ties toward the lower page index). NaN scores rank lowest.
    """
    g = _indexer_graph("topk", score)
    s = _operand(g, "topk", score)
    _need_float(g, "topk", s)
    if PAGES not in s.shape or builtins.any(d not in (1, PAGES) for d in s.shape):
        raise g.error("topk", f"score has shape {format_shape(s.shape)}; topk needs one value per "
                      "page, shape (pages,): reduce the other axes first (e.g. .sum(-1))")
    node = g.add("topk", (s.node.id,), {}, (PAGES,), SELECTION, user_location())
    return Selection(g, node)


def union(*selections: Selection, shares: Optional[Sequence[float]] = None) -> Selection:
    """Pages chosen by any of `selections`; selection i gets `shares[i]` of the free budget.

    The free budget (budget minus sink and recent pages) is split by `shares` (equal by default);
    earlier selections choose first, later ones choose among the pages still free.
    """
    g = _indexer_graph("union", *selections)
    if len(selections) < 2 or not builtins.all(isinstance(s, Selection) for s in selections):
        raise g.error("union", f"needs two or more selections from ops.topk/ops.union, got "
                      f"{[type(s).__name__ for s in selections]}")
    shares = [1.0] * len(selections) if shares is None else list(shares)
    if len(shares) != len(selections) or not builtins.all(
            isinstance(s, numbers.Real) and not isinstance(s, bool) and s > 0 for s in shares):
        raise g.error("union", f"shares={shares!r} must be {len(selections)} positive numbers")
    total = float(builtins.sum(shares))
    node = g.add("union", tuple(s.node.id for s in selections),
                 {"shares": tuple(float(s) / total for s in shares)}, (PAGES,), SELECTION,
                 user_location())
    return Selection(g, node)


# ---- VTensor's methods and operators: these ops, attached once (as torch.fx attaches Proxy's) ----
def _attach_methods() -> None:
    for name in ("sum", "mean", "max", "min", "norm", "abs", "exp", "relu", "transpose"):
        setattr(VTensor, name, globals()[name])         # x.sum(dim, keepdim) = sum(x, dim, keepdim)
    VTensor.__neg__, VTensor.__abs__ = neg, abs
    for dunder, fn in (("add", add), ("sub", sub), ("mul", mul), ("truediv", div),
                       ("matmul", matmul)):
        setattr(VTensor, f"__{dunder}__", fn)
        setattr(VTensor, f"__r{dunder}__", _reflected(fn, f"__r{dunder}__"))
    for fn in (gt, ge, lt, le):
        setattr(VTensor, f"__{fn.__name__}__", fn)


def _reflected(fn, name: str):
    def method(self, other):
        return fn(other, self)
    method.__name__, method.__qualname__ = name, f"VTensor.{name}"
    return method


_attach_methods()

__all__ = ["add", "sub", "mul", "div", "maximum", "minimum", "gt", "ge", "lt", "le", "where",
           "neg", "abs", "exp", "relu", "sqrt", "sum", "mean", "max", "min", "norm", "matmul",
           "transpose", "gemm", "gemv", "take", "fill", "constant", "softmax", "normalize",
           "page_index", "topk", "union"]
